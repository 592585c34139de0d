"""Per-epoch checkpoints: atomic writes, weights-only loads, pruning, finding the latest.

A checkpoint holds only tensors and primitive containers (dicts, lists, str, int, float, bool,
None), so ``torch.load(weights_only=True)`` reads it without unpickling arbitrary objects.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from pipeline.storage.atomic import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_NAME_RE = re.compile(r"^epoch-(\d{4,})\.pt$")


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.pt"


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through the one atomic write (unique temporary name, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME_RE.match(p.name))]
    return sorted(out)


def load_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True``; refuse files that are not morphset trainer checkpoints."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ...: name the file
        raise ValueError(f"{path}: cannot load checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a morphset trainer checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def latest_checkpoint(directory: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (a corrupt newest one is skipped with a warning)."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except ValueError as exc:
            log.warning("skipping unreadable checkpoint: %s", exc)
    return None


def prune(directory: Path, keep: int) -> None:
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
