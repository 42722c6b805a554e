"""Model registry: the pure promotion gate (``gate``) and MLflow registration (``store``).

``store`` is the only module of ``components`` that imports MLflow.
"""
