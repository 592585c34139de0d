"""Progress as log lines, for builds whose stderr is a file (Slurm logs, nohup, CI).

A terminal gets tqdm's bars; anything else gets one line per unit of work (a committed shard, an
ingest shard) or, for many small units (rendered subjects), one line every ``every_s`` seconds and
at the end: the stage, how many of how many, images, failures, the rate and the time left.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass, field


def is_batch() -> bool:
    """True when stderr is not a terminal: progress is written as lines, not bars."""
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return True


def _clock(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class ProgressLog:
    """Lines for one stage's ``total`` units; :meth:`update` after each unit finishes."""

    stage: str
    total: int
    unit: str = "shard"
    every_s: float = 0.0  # 0: a line per unit; else at most one line per this many seconds
    enabled: bool = field(default_factory=is_batch)
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    images: int = 0
    failures: int = 0
    _last: float = 0.0

    def update(self, units: int = 1, images: int = 0, failures: int = 0, what: str = "") -> None:
        self.done += units
        self.images += images
        self.failures += failures
        now = time.perf_counter()
        if not self.enabled or (self.every_s and now - self._last < self.every_s and self.done < self.total):
            return
        self._last = now
        elapsed = now - self.started
        rate = self.images / elapsed if elapsed > 0 and self.images else None
        left = (self.total - self.done) * elapsed / self.done if self.done else None
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        parts = [f"{stamp} {self.stage}: {self.done}/{self.total} {self.unit}s"]
        if what:
            parts.append(what)
        if self.images:
            parts.append(f"{self.images} images")
        parts.append(f"{self.failures} failed")
        if rate is not None:
            parts.append(f"{rate:.1f} img/s")
        if left is not None:
            parts.append(f"ETA {_clock(left)}")
        print(", ".join(parts), file=sys.stderr, flush=True)
