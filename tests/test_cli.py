"""Every command-line entry point answers ``--help`` with its usage (exit code 0), and the
report's answers without importing torch, diffusers, MLflow or Prefect (it only reads JSON)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["pipeline.configure", "pipeline.report", "pipeline.params", "pipeline.compare",
                "pipeline.registry_cli", "pipeline.stages.distill"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_prints_usage(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {module}"), proc.stdout[:300]


def test_report_imports_no_heavy_library():
    script = ("import sys, pipeline.report\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & "
              "{'torch', 'diffusers', 'mlflow', 'prefect', 'transformers'}))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_bytecode_is_compiled_at_install_not_on_every_uv_run():
    """With ``[tool.uv] compile-bytecode`` set, uv 0.13 compiles all 24,881 files of the
    environment again on every ``uv run`` (astral-sh/uv#12202): 5 s before any command, which
    made ``uv run python -m pipeline.report --help`` take 5.5 s on a busy 2-core machine instead
    of 0.5 s. The install commands compile once instead."""
    import tomllib

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"].get("uv", {})
    assert "compile-bytecode" not in settings
    readme = (ROOT / "README.md").read_text()
    for command in ("uv sync --frozen --compile-bytecode && uv run dvc repro",
                    "uv sync --frozen --compile-bytecode && uv run pytest"):
        assert command in readme
    assert "uv sync --frozen --compile-bytecode\nuv run pytest" in (ROOT / ".ci/run").read_text()
