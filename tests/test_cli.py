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
