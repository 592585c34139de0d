"""Per-process cache for heavy objects (detectors, landmark networks, morphable models).

Lives in an importable module on purpose: a cache in ``__main__`` is re-created for every Dask
task, this one lives as long as the worker process. Keys must capture everything that changes
the object (backend, weights path and sha256, device ...).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

_CACHE: dict[Hashable, Any] = {}
_LOCK = threading.Lock()
_CREATED: dict[Hashable, int] = {}


def get_or_create(key: Hashable, factory: Callable[[], Any]) -> Any:
    """Return the cached object for ``key``, creating it once per process."""
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    obj = factory()
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = obj
            _CREATED[key] = _CREATED.get(key, 0) + 1
        return _CACHE[key]


def creation_count(key: Hashable) -> int:
    """How many times ``key`` was created in this process (tests check models load once)."""
    return _CREATED.get(key, 0)


def clear() -> None:
    with _LOCK:
        _CACHE.clear()
        _CREATED.clear()
