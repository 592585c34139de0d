"""Mesh geometry shared by the renderer and the evaluation: one vertex-normals helper."""

from __future__ import annotations

from typing import Literal

import numpy as np
import trimesh


def vertex_normals(
    vertices: np.ndarray, triangles: np.ndarray, weighting: Literal["area", "mean"] = "area"
) -> np.ndarray:
    """Unit vertex normals (n, 3) of an outward-wound triangle mesh.

    ``weighting="area"``: the area-weighted sum of the adjacent faces' normals (smooth shading of
    the renderer: large faces dominate); ``"mean"``: the mean of the adjacent faces' *unit*
    normals (trimesh's convention; the evaluation's point-to-plane distances and picture shading,
    where a sliver face should count as much as a large one). A vertex used by no face gets a zero normal.
    """
    v = np.asarray(vertices, np.float64)
    t = np.asarray(triangles, np.int64)
    if not len(t):  # no surface: face the camera
        return np.tile([0.0, 0.0, 1.0], (len(v), 1))
    face = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    if weighting == "mean":
        face = trimesh.util.unitize(face)
        n = trimesh.geometry.mean_vertex_normals(len(v), t, face)
    elif weighting == "area":
        n = np.zeros_like(v)
        idx = t.reshape(-1)
        for axis in range(3):
            n[:, axis] = np.bincount(idx, weights=np.repeat(face[:, axis], 3), minlength=len(v))
    else:
        raise ValueError(f"weighting: expected 'area' or 'mean', got {weighting!r}")
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    unit = n / np.where(norm > 0, norm, 1.0)
    return unit
