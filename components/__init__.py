"""Distillery components: domain logic as plain functions and small classes.

Nothing in this package imports Prefect or DVC; MLflow is imported only by ``components.registry.store``.
"""
