"""A deterministic triangle list for a face point set that ships without one.

The face is unwrapped onto a cylinder around a vertical axis behind it (azimuth, elevation),
Delaunay-triangulated in that 2-D chart, and over-long edges (across holes and the chart's convex
hull) are dropped. Every triangle keeps the chart's counter-clockwise order, so the winding is
consistent across every shared edge (a planar triangulation cannot disagree with itself), and the
whole list is flipped once if needed so that most normals point away from the axis (out of the
face, +z at the nose). Flipping triangles one by one would make the winding inconsistent where
the chart folds (under the nose and chin): about 1 % of triangles there face inwards instead.

Vertices that only over-long triangles touched are used by no triangle (1,218 of the default
model's 53,215, in those folds): mesh files written by :mod:`pipeline.evaluate.meshes` keep only
the used vertices and say which model vertex each one is.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import Delaunay


def cylindrical_chart(vertices: np.ndarray, axis_offset: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) chart coordinates in mm of arc and the (3,) axis point used."""
    v = np.asarray(vertices, dtype=np.float64)
    centre = np.array([np.median(v[:, 0]), 0.0, np.median(v[:, 2]) - axis_offset])
    d = v - centre
    azimuth = np.arctan2(d[:, 0], d[:, 2])
    elevation = np.arctan2(d[:, 1], np.hypot(d[:, 0], d[:, 2]))
    return np.c_[azimuth, elevation] * axis_offset, centre


def triangulate_face(
    vertices: np.ndarray, max_edge_factor: float = 4.0, axis_offset: float = 80.0
) -> np.ndarray:
    """(t, 3) int64 triangles over ``vertices`` (n, 3) mm, outward-wound, deterministic."""
    v = np.asarray(vertices, dtype=np.float64)
    chart, centre = cylindrical_chart(v, axis_offset)
    tri = Delaunay(chart).simplices.astype(np.int64)
    edges = np.stack(
        [np.linalg.norm(v[tri[:, i]] - v[tri[:, (i + 1) % 3]], axis=1) for i in range(3)], axis=1
    )
    tri = tri[edges.max(axis=1) < max_edge_factor * np.median(edges)]
    tri = orient_outward(v, tri, centre)
    # a stable order makes the file byte-identical across runs and platforms
    return tri[np.lexsort(tri.T[::-1])]


def face_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[triangles[:, i]] for i in range(3))
    return np.cross(b - a, c - a)


def outward_fraction(vertices: np.ndarray, triangles: np.ndarray, centre: np.ndarray) -> float:
    """Fraction of triangles whose normal points away from the vertical axis through ``centre``."""
    n = face_normals(vertices, triangles)
    radial = vertices[triangles].mean(axis=1) - centre
    radial[:, 1] = 0.0
    return float(np.mean(np.einsum("ij,ij->i", n, radial) > 0))


def orient_outward(vertices: np.ndarray, triangles: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The whole (consistently wound) list flipped if most of its normals point towards the axis."""
    if outward_fraction(vertices, triangles, centre) >= 0.5:
        return triangles.copy()
    return triangles[:, [0, 2, 1]].copy()
