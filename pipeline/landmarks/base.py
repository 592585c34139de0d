"""What every landmark backend provides, and the weight-file checks they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from pipeline.landmarks.scheme import IBUG68
from pipeline.storage.hashing import sha256_file

N_POINTS = IBUG68.points

# Per face: (points (68, 2) float32 in image pixels, confidence (68,) float32), or an error text.
LandmarkResult = tuple[np.ndarray, np.ndarray] | str


class WeightsError(FileNotFoundError):
    """A landmark model file is missing, unreadable or does not match its expected sha256.

    A FileNotFoundError so that the command line reports it as a one-line error before any work.
    """


def verify_sha256(path: Path, expected: str | None, what: str, prefix_ok: bool = False) -> str:
    """Return the file's sha256; raise :class:`WeightsError` if it does not match ``expected``,
    or if there is nothing to match it against.

    ``prefix_ok``: ``expected`` may be a hex prefix (torch hub's file-name convention).
    """
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise WeightsError(f"{what}: cannot read {path}: {exc}") from None
    if not expected:  # a check the manifest does not vouch for is no check
        raise WeightsError(
            f"{what}: no sha256 to check {path} against ({actual}); put the file's sha256 in the "
            "manifest (or, for a torch hub checkpoint, keep the hash prefix in its name)"
        )
    if expected:
        exp = expected.lower()
        good = actual.startswith(exp) if prefix_ok else actual == exp
        if not good:
            raise WeightsError(
                f"{what}: {path} has sha256 {actual}, expected {'a hash starting with ' if prefix_ok else ''}{exp}; "
                "the file is corrupt or a different version - replace it"
            )
    return actual


class LandmarkBackend(ABC):
    """Predicts 68 landmarks for face boxes; created once per worker process (heavy)."""

    name: str  # "fan" | "dlib", as written to the landmarks table
    version: str  # package version of the backend
    weights_sha256: str  # sha256 of the weights file actually loaded

    @abstractmethod
    def predict(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[LandmarkResult]:
        """For each (RGB uint8 image, box x0 y0 x1 y1 in its pixels): points and confidences.

        Never raises for one bad face: that face's entry is an error text instead.
        """


def check_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """A finite, non-empty box inside the image (clipped), as float64; ValueError otherwise."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValueError(f"box must be 4 finite numbers, got {box!r}")
    b = np.array(
        [
            np.clip(b[0], 0, width - 1),
            np.clip(b[1], 0, height - 1),
            np.clip(b[2], 0, width - 1),
            np.clip(b[3], 0, height - 1),
        ]
    )
    if b[2] - b[0] < 2 or b[3] - b[1] < 2:
        raise ValueError(f"box {box!r} is empty inside a {width}x{height} image")
    return b
