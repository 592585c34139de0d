"""Landmark schemes as data: how many points a detector marks and what each one is.

A scheme (``pipeline/landmarks/schemes/<name>.yaml``, packaged with the project, or any file of
that form) names its points' report groups (every point in exactly one), finer parts (a brow, an
eye, the lips), single named points (the nose tip, the chin, the outer eye corners), the points
drawn on the face's visible outline (contour marching re-picks them per pose) and its left/right
mirror map. Code asks the scheme instead of writing iBUG numbers: ``IBUG68.named["nose_tip"]``,
``IBUG68.group("eyes")``. Where the points lie on a morphable model's mesh is other data, a
mapping file per scheme and model (``pipeline/models/correspondence.py``); a scheme lists the
points a mapping may leave out (``unmapped_ok``: points on the face's outline, placed per pose).

Files are read with ``yaml.safe_load``; a malformed one is refused with its path and key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

SCHEME_DIR = Path(__file__).with_name("schemes")


class SchemeError(ValueError):
    """A landmark scheme file that cannot be used (its path and the offending key in the message)."""


@dataclass(frozen=True)
class LandmarkScheme:
    name: str
    points: int
    groups: dict[str, tuple[int, ...]]
    parts: dict[str, tuple[int, ...]]
    named: dict[str, int]
    contour: tuple[int, ...]
    mirror: np.ndarray  # (points,) int64
    unmapped_ok: tuple[int, ...] = ()  # points a model mapping may leave out (outline points)

    def group(self, name: str) -> list[int]:
        """The point numbers of a report group or a part (for fancy indexing)."""
        if name in self.groups:
            return list(self.groups[name])
        if name in self.parts:
            return list(self.parts[name])
        raise KeyError(f"landmark scheme {self.name!r} has no group or part {name!r}")

    @property
    def outer_eye_corners(self) -> tuple[int, int]:
        """The two outer eye corners: their distance is the scheme's face-size unit (NME)."""
        return self.named["right_eye_outer"], self.named["left_eye_outer"]

    @property
    def inner(self) -> list[int]:
        """Every point but the jaw line's (where detectors and models agree best)."""
        jaw = set(self.groups.get("jaw", ()))
        return [i for i in range(self.points) if i not in jaw]


def _ids(value: object, n: int, where: str) -> tuple[int, ...]:
    """A list of point numbers, each checked to lie in 0..n-1."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SchemeError(f"{where}: expected a list of point numbers, got {value!r}")
    bad = [v for v in value if not 0 <= v < n]
    if bad:
        raise SchemeError(f"{where}: point numbers {bad} are outside 0..{n - 1}")
    return tuple(value)


def _ranges(block: object, n: int, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(block, dict):
        raise SchemeError(f"{where}: expected a mapping of name: [first, last]")
    out = {}
    for key, value in block.items():
        if not (isinstance(value, list) and len(value) == 2):
            raise SchemeError(f"{where}.{key}: expected an inclusive range [first, last], got {value!r}")
        first, last = _ids(value, n, f"{where}.{key}")
        if last < first:
            raise SchemeError(f"{where}.{key}: expected an inclusive range [first, last], got {value!r}")
        out[str(key)] = tuple(range(first, last + 1))
    return out


def parse_scheme(raw: object, where: str) -> LandmarkScheme:
    """A scheme from its parsed YAML mapping; ``where`` names the source in errors."""
    if not isinstance(raw, dict):
        raise SchemeError(f"{where}: expected a mapping at the top level")
    for key in ("name", "points", "groups", "mirror"):
        if key not in raw:
            raise SchemeError(f"{where}: missing key {key!r}")
    n = raw["points"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SchemeError(f"{where}: points: expected a positive integer, got {n!r}")
    groups = _ranges(raw["groups"], n, f"{where}: groups")
    covered = sorted(i for ids in groups.values() for i in ids)
    if covered != list(range(n)):
        raise SchemeError(f"{where}: groups must hold every point 0..{n - 1} exactly once")
    parts = _ranges(raw.get("parts") or {}, n, f"{where}: parts")
    named_raw = raw.get("named") or {}
    if not isinstance(named_raw, dict):
        raise SchemeError(f"{where}: named: expected a mapping of name: point")
    named = {str(k): _ids([v], n, f"{where}: named.{k}")[0] for k, v in named_raw.items()}
    contour = _ids(raw.get("contour") or [], n, f"{where}: contour")
    mirror = np.asarray(_ids(raw["mirror"], n, f"{where}: mirror"), np.int64)
    unmapped_ok = _ids(raw.get("unmapped_ok") or [], n, f"{where}: unmapped_ok")
    if len(mirror) != n or not np.array_equal(mirror[mirror], np.arange(n)):
        raise SchemeError(f"{where}: mirror: expected {n} point numbers that map back onto themselves")
    return LandmarkScheme(str(raw["name"]), n, groups, parts, named, contour, mirror, unmapped_ok)


def load_scheme(name_or_path: str | Path) -> LandmarkScheme:
    """A packaged scheme by name (``ibug68``) or a scheme file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCHEME_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SCHEME_DIR.glob("*.yaml"))
        raise SchemeError(f"{name_or_path}: no such landmark scheme file (packaged schemes: {known})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SchemeError(f"{path}: not valid YAML ({exc})") from None
    return parse_scheme(raw, str(path))


# The scheme of the shipped detectors (dlib, FAN), the landmarks tables and the default model's map.
IBUG68 = load_scheme("ibug68")
