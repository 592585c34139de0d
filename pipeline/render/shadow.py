"""Cast shadows by shadow mapping (Williams 1978), on the project's one rasteriser.

A point light's shadow map is the depth of the scene seen from the light: an orthographic view
along the direction from the scene towards the light (the lights of ``morphset synth`` stand
~1.5 m from a ~0.2 m head, where the rays are near parallel). A surface point is lit by that light
where nothing in the map lies nearer the light than the point (less a bias that keeps surfaces
from shadowing themselves); a 3x3 percentage-closer filter softens the edge over about one map
texel, like the penumbra of a light of finite size. Not differentiable: the map is a visibility
mask for rendering data, not a term to optimise through.
"""

from __future__ import annotations

import numpy as np

from pipeline.render.raster import rasterize


def light_frame(direction: np.ndarray) -> np.ndarray:
    """(3, 3) rows u, v, w: an orthonormal frame whose w points along ``direction`` (towards the
    light), u roughly horizontal."""
    w = np.asarray(direction, np.float64)
    w = w / np.linalg.norm(w)
    up = np.array([0.0, 1.0, 0.0]) if abs(w[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(up, w)
    u /= np.linalg.norm(u)
    return np.stack([u, np.cross(w, u), w])


def light_visibility(
    vertices: np.ndarray,
    triangles: np.ndarray,
    light_positions: np.ndarray,
    points: np.ndarray,
    extent_vertices: np.ndarray | None = None,
    resolution: int = 512,
    bias_mm: float = 1.0,
) -> np.ndarray:
    """(m, k) in [0, 1]: how much of each of k point lights reaches each of m surface points.

    ``vertices`` (n, 3) and ``points`` (m, 3) in one frame (mm) with the lights (k, 3);
    ``triangles`` (t, 3) cast the shadows. The map covers the bounding box of ``extent_vertices``
    (default all vertices) seen from each light, padded by 10 %, at ``resolution`` texels a side;
    points outside it count as lit. ``bias_mm`` plus two texels is the depth tolerance."""
    v = np.asarray(vertices, np.float64)
    p = np.asarray(points, np.float64)
    tri = np.asarray(triangles, np.int64)
    box_pts = v if extent_vertices is None else np.asarray(extent_vertices, np.float64)
    centre = 0.5 * (box_pts.min(axis=0) + box_pts.max(axis=0))
    out = np.ones((len(p), len(light_positions)))
    for k, light in enumerate(np.asarray(light_positions, np.float64)):
        frame = light_frame(light - centre)
        lv, lp, lb = v @ frame.T, p @ frame.T, box_pts @ frame.T
        lo, hi = lb[:, :2].min(axis=0), lb[:, :2].max(axis=0)
        pad = 0.1 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        texel = float(np.max(hi - lo)) / (resolution - 1)

        def screen(q: np.ndarray, lo: np.ndarray = lo, texel: float = texel) -> np.ndarray:
            return np.c_[(q[:, 0] - lo[0]) / texel, (q[:, 1] - lo[1]) / texel, q[:, 2]]

        # no culling: the open face mesh shadows from either side
        depth = rasterize(screen(lv), tri, resolution, resolution, cull_backfaces=False).depth_buffer()
        sp = screen(lp)
        x0, y0 = np.round(sp[:, 0]).astype(np.int64), np.round(sp[:, 1]).astype(np.int64)
        # the filter's neighbours lie up to ~1.4 texels away on a surface that may slope away
        bias = bias_mm + 2.0 * texel
        lit = np.zeros(len(p))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                x, y = x0 + dx, y0 + dy
                inside = (x >= 0) & (x < resolution) & (y >= 0) & (y < resolution)
                occluder = np.full(len(p), -np.inf)
                occluder[inside] = depth[y[inside], x[inside]]
                lit += sp[:, 2] >= occluder - bias
        out[:, k] = lit / 9.0
    return out
