"""Backends by one lookup (face-alignment's style): a stage keeps ``BACKENDS``, a name -> the
module that implements it (imported on first use: heavy libraries load only when chosen)."""

from __future__ import annotations

import importlib
from types import ModuleType


def lookup(stage: str, backends: dict[str, str], name: str) -> ModuleType:
    """The module of ``stage``'s backend called ``name``; an unknown name is an error that lists
    the known ones (it once fell silently into another backend's path)."""
    if name not in backends:
        raise ValueError(f"stages.{stage}.backend: expected one of {list(backends)}, got {name!r}")
    return importlib.import_module(backends[name])
