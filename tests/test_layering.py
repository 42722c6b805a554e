"""Imports flow one way: pipeline → components; components never import Prefect or DVC, and only
the registration component (``components/registry/``) imports MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_components_never_import_orchestration():
    offenders = []
    for path in (ROOT / "components").rglob("*.py"):
        found = _imports(path)
        rel = path.relative_to(ROOT).as_posix()
        if found & {"prefect", "dvc", "pipeline"}:
            offenders.append(f"{rel}: {sorted(found & {'prefect', 'dvc', 'pipeline'})}")
        if "mlflow" in found and not rel.startswith("components/registry/"):
            offenders.append(f"{rel}: mlflow outside the registration component")
    assert not offenders, offenders


def test_the_walk_sees_the_files():
    files = list((ROOT / "components").rglob("*.py"))
    assert len(files) > 10
    assert "torch" in _imports(ROOT / "components" / "training.py")
