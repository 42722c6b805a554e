"""Distillery pipeline: thin wiring of components into stages, DVC and Prefect."""
