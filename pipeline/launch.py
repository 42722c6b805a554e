"""Run a stage module under ``torch.distributed.run`` (torchrun), one process per GPU.

``distill.processes: N`` makes the distill stage start itself this way, so ``dvc repro``, the
Prefect task and a plain ``python -m pipeline.stages.distill`` all launch the same N processes.
Multi-node runs set torchrun's own environment (``PET_NNODES``, ``PET_NODE_RANK``,
``PET_RDZV_ENDPOINT``, ``PET_RDZV_BACKEND``; see ``infra/k8s``), which it reads as defaults.

The launcher dies with its caller: torchrun gets SIGTERM when the process that started it
exits (a cancelled or timed-out flow run), and an exception in the caller (Prefect's timeout)
terminates it; torchrun then stops its workers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def torchrun_command(module: str, root: Path, processes: int) -> list[str]:
    standalone = [] if os.environ.get("PET_RDZV_ENDPOINT") else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *standalone,
            f"--nproc-per-node={processes}", "-m", module, "--root", str(root)]


def torchrun(module: str, root: Path, processes: int, grace_s: float = 30.0) -> None:
    """Run ``python -m module --root root`` in ``processes`` processes; raise if it fails."""
    cmd = torchrun_command(module, root, processes)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, cwd=root, preexec_fn=preexec)  # noqa: PLW1509
    try:
        while True:
            try:  # short waits let an exception raised in this thread (a timeout) land
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            proc.terminate()  # torchrun forwards it to the workers
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited with {code}; the failing process's "
                           "error is printed above")
