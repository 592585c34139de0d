"""The one atomic write every writer of morphset uses: shards, sidecars, ``run.json``, model caches,
checkpoints, exported encoders, reports and meshes.

Content goes to a temporary name in the target's own directory (``_tmp-<random>-<name>``: unique
per call, so concurrent writers never share one; the leading underscore hides it from
``pyarrow.dataset`` and the shard listings) and is then renamed over the target. A reader sees the
old file or the new one, never half of one. A writer that fails removes its temporary; one killed
outright leaves a ``_tmp-`` file that :func:`remove_temporaries` (called by the build driver before
any work) deletes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = "_tmp-"

Writer = Callable[[IO[bytes]], Any]


def temporary_name(name: str) -> str:
    """A unique hidden name for a file that will be renamed to ``name``."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"


def is_temporary(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def _write_to(f: IO[bytes], content: bytes | str | Writer) -> None:
    if isinstance(content, bytes):
        f.write(content)
    elif isinstance(content, str):
        f.write(content.encode("utf-8"))
    else:
        content(f)


def atomic_write(target: str | Path, content: bytes | str | Writer, fs: Any = None) -> None:
    """Write ``content`` (bytes, text as UTF-8, or a function that writes into a binary file) to
    ``target`` atomically. ``fs``: an fsspec filesystem for ``target`` (default: the local disk);
    a local file is fsynced before the rename either way."""
    if fs is None:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(temporary_name(path.name))
        try:
            with open(tmp, "wb") as f:
                _write_to(f, content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the original error matters more than a failed clean-up
                pass
            _raise_for_target(exc, str(path))
            raise
        return
    where = str(target)
    parent, name = where.rsplit("/", 1) if "/" in where else ("", where)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    staged = f"{parent}/{temporary_name(name)}" if parent else temporary_name(name)
    try:
        with fs.open(staged, "wb") as f:
            _write_to(f, content)
            _sync(f)
        fs.mv(staged, where)
    except BaseException as exc:
        try:
            if fs.exists(staged):
                fs.rm(staged)
        except Exception:  # the original error matters more than a failed clean-up
            pass
        _raise_for_target(exc, where)
        raise


def _sync(f: IO[bytes]) -> None:
    """fsync a file that is a local one before the rename, as the local branch does (a crash must
    not leave the new name on an empty file); object stores commit on close and have no fileno."""
    try:
        fileno = f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return
    f.flush()
    os.fsync(fileno)


def _raise_for_target(exc: BaseException, target: str) -> None:
    """An OS error while writing names the file the user knows (the target), not the temporary."""
    if isinstance(exc, OSError) and exc.errno is not None:
        raise type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), target) from exc


def remove_temporaries(directory: str, fs: Any) -> int:
    """Delete ``_tmp-*`` files directly in ``directory`` (left by killed writers). Call only when no
    writer of this directory is active."""
    if not fs.exists(directory):
        return 0
    stale = [p for p in fs.ls(directory, detail=False) if is_temporary(p.rstrip("/").rsplit("/", 1)[-1])]
    for p in stale:
        fs.rm(p)
    return len(stale)
