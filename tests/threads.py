"""A module-scoped fixture that runs a test module on one torch and one BLAS thread.

Import it into a test module (``from tests.threads import one_thread  # noqa: F401``) to apply it
to every test there.
"""

from __future__ import annotations

import contextlib

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread for this module, restored afterwards.

    Measured on the shared 2-core machine under load from other jobs (1 vs 2 threads): Inception
    3.5-6 vs ~2 images/s; a scorer step 0.28 vs 1.2-7 s; torch-fidelity's 2048x2048 ``eigvals``
    8 vs 39 s. threadpoolctl (present through scikit-learn) limits numpy's BLAS when installed.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # only a speed-up
        blas = contextlib.nullcontext()
    else:
        blas = threadpool_limits(limits=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with blas:
        yield
    torch.set_num_threads(before)
