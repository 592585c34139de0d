"""Array-namespace selection: one fitting code path for NumPy (CPU) and CuPy (GPU).

Every math function in :mod:`pipeline.fit` takes arrays and asks them for their namespace
(:func:`namespace_of`), so the same code runs on ``array_api_compat.numpy`` and
``array_api_compat.cupy``. Only functions from the array-API standard are used there (``matmul``,
``linalg.solve``/``svd``/``det``, ``take``, ``where`` ...): ``einsum`` and ``lstsq`` are avoided
because they are not in the standard and ``lstsq`` is 2-D only in both libraries.

CuPy is imported lazily and only when asked for or when ``auto`` finds a GPU, so CPU machines
never need it installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace

BACKENDS = ("auto", "numpy", "cupy")


class BackendError(RuntimeError):
    """The requested array backend cannot be used on this machine."""


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception:  # not installed, or a broken CUDA install: both mean "no GPU backend"
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def resolve_backend(requested: str) -> str:
    """Map ``auto|numpy|cupy`` (manifest ``execution.array_backend``) to ``numpy`` or ``cupy``."""
    if requested not in BACKENDS:
        raise BackendError(f"execution.array_backend: expected one of {list(BACKENDS)}, got {requested!r}")
    if requested == "numpy":
        return "numpy"
    if requested == "cupy":
        if not cupy_available():
            raise BackendError(
                "execution.array_backend is 'cupy' but CuPy with a CUDA device is not available "
                "(install the gpu extra (pip install '<morphset wheel or checkout>[gpu]') on a GPU machine, or set execution.array_backend=numpy)"
            )
        return "cupy"
    return "cupy" if cupy_available() else "numpy"


def get_namespace(backend: str) -> ModuleType:
    """The array-API namespace for a resolved backend name."""
    if backend == "numpy":
        return importlib.import_module("array_api_compat.numpy")
    if backend == "cupy":
        return importlib.import_module("array_api_compat.cupy")
    raise BackendError(f"unknown array backend {backend!r} (resolve 'auto' with resolve_backend first)")


def namespace_of(*arrays: Any) -> ModuleType:
    """The array-API namespace shared by ``arrays`` (raises if they mix libraries)."""
    return array_namespace(*arrays)


def to_numpy(x: Any) -> np.ndarray:
    """Copy a NumPy or CuPy array to a host NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)  # cupy.ndarray.get() copies device -> host
    if callable(get):
        return np.asarray(get())
    return np.asarray(x)
