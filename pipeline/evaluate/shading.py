"""A small orthographic shaded render of a mesh for the report's picture sheet.

Triangles go through the synth renderer's z-buffer rasteriser (:func:`pipeline.render.raster.rasterize`);
each pixel is Lambert-shaded (two-sided) with the normal interpolated from the vertex normals, in
grey on white. Coordinates follow the model convention: x right, y up, z towards the viewer.
"""

from __future__ import annotations

import numpy as np

from pipeline.models.geometry import vertex_normals
from pipeline.render.raster import rasterize

LIGHT = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])


def render_shaded(
    vertices: np.ndarray,
    triangles: np.ndarray,
    size: int = 160,
    rotation: np.ndarray | None = None,
    margin: float = 0.06,
) -> np.ndarray:
    """(size, size, 3) uint8 grey render on white; ``rotation`` (3,3) is applied before viewing."""
    v = np.asarray(vertices, np.float64)
    tri = np.asarray(triangles, np.int64)
    n = vertex_normals(v, tri, weighting="mean")
    if rotation is not None:
        r = np.asarray(rotation, np.float64).reshape(3, 3)
        v, n = v @ r.T, n @ r.T
    img = np.full((size, size, 3), 255, np.uint8)
    if not len(v):
        return img
    lo, hi = v[:, :2].min(0), v[:, :2].max(0)
    extent = float(max(hi - lo)) or 1.0
    scale = size * (1 - 2 * margin) / extent
    center = (lo + hi) / 2
    screen = np.stack(
        [
            (v[:, 0] - center[0]) * scale + size / 2,
            size / 2 - (v[:, 1] - center[1]) * scale,  # y up in the model, down in the image
            v[:, 2],
        ],
        axis=1,
    )
    if len(tri):
        # the synth renderer's z-buffer rasteriser; no back-face culling, so meshes with mixed
        # winding still render (the nearest surface wins)
        frags = rasterize(screen, tri, size, size, cull_backfaces=False)
        normal = np.einsum("mk,mkc->mc", frags.bary, n[tri[frags.triangle]])
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
        # two-sided Lambert: a normal facing away (inconsistent winding) is lit like its flip;
        # at most 245 so the surface never matches the white background
        shade = 40 + 205 * np.clip(np.abs(normal @ LIGHT), 0, 1)
        img.reshape(-1, 3)[frags.pixel] = np.round(shade).astype(np.uint8)[:, None]
    else:  # a point cloud: one black pixel per point
        ix, iy = np.round(screen[:, 0]).astype(np.int64), np.round(screen[:, 1]).astype(np.int64)
        ok = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
        img[iy[ok], ix[ok]] = 0
    return img
