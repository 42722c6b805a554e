-- One PostgreSQL instance, one database per service (run once, on first start).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
