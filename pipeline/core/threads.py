"""One worker process, one thread budget: every library's thread pool sized to the worker's threads.

TensorFlow, torch, OpenCV, OpenMP and BLAS each start a pool sized to the whole machine. Two
one-thread Dask workers on two cores then run 2 × (several pools × all cores) threads that fight
(measured: two workers slower than one process, with six times the system CPU). :func:`limit_threads`
sizes every pool to ``n`` for the libraries already loaded and, through the environment and the
recorded budget, for those loaded later (TensorFlow reads :func:`thread_budget` before it creates
its runtime: :func:`configure_tensorflow`). Dask workers call it at start through the worker
plugin in ``dags/cluster.py``, before any model loads.
"""

from __future__ import annotations

import os
import sys

BUDGET_ENV = "MORPHSET_THREADS"
_ENV_KEYS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def thread_budget() -> int | None:
    """The thread budget of this process (None when none was set: use the library defaults)."""
    value = os.environ.get(BUDGET_ENV)
    try:
        return max(1, int(value)) if value else None
    except ValueError:
        return None


def limit_threads(n: int) -> dict[str, int]:
    """Size every thread pool of this process to ``n``; returns what was set, by library."""
    n = max(1, int(n))
    os.environ[BUDGET_ENV] = str(n)
    for key in _ENV_KEYS:  # for OpenMP/BLAS runtimes that load after this point
        os.environ[key] = str(n)
    done: dict[str, int] = {}
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)  # BLAS and OpenMP runtimes already loaded
    done["blas_openmp"] = n
    try:
        import cv2

        cv2.setNumThreads(n)
        done["opencv"] = n
    except ImportError:
        pass
    if "torch" in sys.modules:  # never import torch only to configure it
        import torch

        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # allowed once, before any inter-op work; keep what is there
            pass
        done["torch"] = n
    if "tensorflow" in sys.modules:
        configure_tensorflow()
        done["tensorflow"] = n
    return done


def configure_tensorflow() -> None:
    """TensorFlow's intra/inter-op pools to the budget; call before TensorFlow runs anything (it
    refuses once its runtime exists, and then keeps what it has)."""
    n = thread_budget()
    if n is None:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:
        pass
