"""Rasterisation: which triangle is nearest at each pixel centre, and its barycentric weights.

The one rasteriser of the project (``morphset synth`` and the differentiable renderer in
:mod:`pipeline.render`). Screen space: pixel x, pixel y (down), depth (larger = nearer); pixel
centres at integer coordinates. Triangles are grouped by the size of their pixel bounding box.
Small ones test every pixel centre of their box at once with edge functions (barycentrics);
large ones get exact per-row x-intervals, so work follows the covered area. There is no Python
loop over pixels or triangles. Per pixel the nearest fragment wins (a sort, deterministic). This
step is not differentiable and needs none: gradients flow through the barycentrics recomputed
from the projected vertices (:mod:`pipeline.render.interpolate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Fragment budget per vectorised chunk (candidate pixel tests held in memory at once).
_CHUNK_CANDIDATES = 1 << 21


# --- rasterisation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fragments:
    """The visible surface: for each covered pixel (flat index into H*W) its triangle, its
    barycentric weights (m, 3) and its depth (larger = nearer)."""

    height: int
    width: int
    pixel: np.ndarray  # (m,) int64, sorted
    triangle: np.ndarray  # (m,) int64
    bary: np.ndarray  # (m, 3) float64
    depth: np.ndarray  # (m,) float64

    def depth_buffer(self) -> np.ndarray:
        """(H, W) depth, -inf where nothing was drawn."""
        buf = np.full(self.height * self.width, -np.inf)
        buf[self.pixel] = self.depth
        return buf.reshape(self.height, self.width)

    def mask(self) -> np.ndarray:
        m = np.zeros(self.height * self.width, bool)
        m[self.pixel] = True
        return m.reshape(self.height, self.width)


def _bucket_sizes(extent: np.ndarray) -> np.ndarray:
    """Round bounding-box extents up to a few square candidate-grid sizes (1, 2, 3, 4, 6, 8, 12, ...)."""
    sizes = [1, 2, 3, 4]
    while sizes[-1] < 1 << 16:
        sizes += [sizes[-2] * 2, sizes[-1] * 2]
    sizes = np.asarray(sizes)
    return sizes[np.searchsorted(sizes, extent)]


_SPAN_MIN = 8  # triangles with a bounding box of at least this many pixels are filled by row spans
_EPS = 1e-9


def _box_candidates(
    t: np.ndarray, d: int, x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(triangle, x, y) of every pixel centre in each triangle's clipped bounding box (<= d x d)."""
    oy, ox = np.divmod(np.arange(d * d, dtype=np.int64), d)
    px = x0[t, None] + ox[None, :]
    py = y0[t, None] + oy[None, :]
    r, k = np.nonzero((px <= x1[t, None]) & (py <= y1[t, None]))
    return t[r], px[r, k], py[r, k]


def _span_candidates(
    t: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    area: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(triangle, x, y) of the pixel centres inside each triangle, one x-interval per pixel row.

    On a row y each barycentric weight is linear in x, w = k x + m; w >= 0 bounds x from one side.
    """
    rows = y1[t] - y0[t] + 1
    tr = np.repeat(t, rows)
    first = np.repeat(np.cumsum(rows) - rows, rows)
    y = (y0[tr] + np.arange(len(tr)) - first).astype(np.float64)
    ax, ay, bx, by, cx, cy = a[tr, 0], a[tr, 1], b[tr, 0], b[tr, 1], c[tr, 0], c[tr, 1]
    inv = 1.0 / area[tr]
    ka, ma = (by - cy) * inv, (bx * (cy - y) - cx * (by - y)) * inv
    kb, mb = (cy - ay) * inv, (cx * (ay - y) - ax * (cy - y)) * inv
    kc, mc = -(ka + kb), 1.0 - ma - mb
    lo = x0[tr].astype(np.float64)
    hi = x1[tr].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, m in ((ka, ma), (kb, mb), (kc, mc)):
            bound = (-_EPS - m) / k
            lo = np.where(k > 0, np.maximum(lo, bound), lo)
            hi = np.where(k < 0, np.minimum(hi, bound), hi)
            hi = np.where((k == 0) & (m < -_EPS), -np.inf, hi)
    # one pixel of slack each side; the exact inside test afterwards decides
    xl = np.maximum(np.ceil(lo) - 1, x0[tr]).astype(np.int64)
    xr = np.minimum(np.floor(np.maximum(hi, lo - 2)) + 1, x1[tr]).astype(np.int64)
    n = np.maximum(xr - xl + 1, 0)
    tp = np.repeat(tr, n)
    start = np.repeat(np.cumsum(n) - n, n)
    px = np.repeat(xl, n) + np.arange(len(tp)) - start
    py = np.repeat(y.astype(np.int64), n)
    return tp, px, py


def rasterize(
    screen: np.ndarray,
    triangles: np.ndarray,
    height: int,
    width: int,
    cull_backfaces: bool | np.ndarray = True,
) -> Fragments:
    """Z-buffer rasterisation of triangles given in screen space.

    ``screen`` (n, 3): pixel x, pixel y (down), depth (larger = nearer). With ``cull_backfaces``
    triangles are dropped unless they wind counter-clockwise as seen by the camera (y up), i.e.
    outward-wound surfaces facing the viewer; a boolean array (t,) culls only those triangles.
    """
    s = np.asarray(screen, np.float64)
    tri = np.asarray(triangles, np.int64)
    a, b, c = s[tri[:, 0]], s[tri[:, 1]], s[tri[:, 2]]
    # signed double area in image coordinates (y down): negative = counter-clockwise with y up
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    keep = np.abs(area) > 1e-12
    cull = np.broadcast_to(np.asarray(cull_backfaces, bool), keep.shape)
    keep &= ~cull | (area < 0)
    xs = np.stack([a[:, 0], b[:, 0], c[:, 0]], axis=1)
    ys = np.stack([a[:, 1], b[:, 1], c[:, 1]], axis=1)
    x0 = np.maximum(np.ceil(xs.min(axis=1)), 0).astype(np.int64)
    x1 = np.minimum(np.floor(xs.max(axis=1)), width - 1).astype(np.int64)
    y0 = np.maximum(np.ceil(ys.min(axis=1)), 0).astype(np.int64)
    y1 = np.minimum(np.floor(ys.max(axis=1)), height - 1).astype(np.int64)
    keep &= (x1 >= x0) & (y1 >= y0) & np.all(np.isfinite(s[tri].reshape(len(tri), -1)), axis=1)
    ids = np.nonzero(keep)[0]
    size = _bucket_sizes(np.maximum(x1[ids] - x0[ids], y1[ids] - y0[ids]) + 1)

    pix_parts, tri_parts, bary_parts, depth_parts = [], [], [], []
    for d in np.unique(size):
        group = ids[size == d]
        # small triangles: test every pixel of a d x d box; large ones: exact row spans, so the
        # work follows the covered area and not the (up to twice as large) bounding box
        per_chunk = max(1, _CHUNK_CANDIDATES // int(d * d if d < _SPAN_MIN else 4 * d))
        for start in range(0, len(group), per_chunk):
            t = group[start : start + per_chunk]
            if d < _SPAN_MIN:
                tt, px, py = _box_candidates(t, int(d), x0, x1, y0, y1)
            else:
                tt, px, py = _span_candidates(t, a, b, c, area, x0, x1, y0, y1)
            ax, ay, bx, by, cx, cy = a[tt, 0], a[tt, 1], b[tt, 0], b[tt, 1], c[tt, 0], c[tt, 1]
            inv = 1.0 / area[tt]
            # barycentric weight of each vertex = opposite edge function / signed area
            wa = ((bx - px) * (cy - py) - (cx - px) * (by - py)) * inv
            wb = ((cx - px) * (ay - py) - (ax - px) * (cy - py)) * inv
            wc = 1.0 - wa - wb
            inside = (wa >= -_EPS) & (wb >= -_EPS) & (wc >= -_EPS)
            tt, w = tt[inside], np.stack([wa[inside], wb[inside], wc[inside]], axis=1)
            pix_parts.append(py[inside] * width + px[inside])
            tri_parts.append(tt)
            bary_parts.append(w)
            depth_parts.append(w[:, 0] * a[tt, 2] + w[:, 1] * b[tt, 2] + w[:, 2] * c[tt, 2])
    if not pix_parts:
        e = np.zeros(0, np.int64)
        return Fragments(height, width, e, e, np.zeros((0, 3)), np.zeros(0))
    pix = np.concatenate(pix_parts)
    tri_id = np.concatenate(tri_parts)
    bary = np.concatenate(bary_parts)
    depth = np.concatenate(depth_parts)
    # nearest first within each pixel; triangle id breaks exact ties so the result is deterministic
    order = np.lexsort((tri_id, -depth, pix))
    first = np.ones(len(order), bool)
    first[1:] = pix[order[1:]] != pix[order[:-1]]
    sel = order[first]
    return Fragments(height, width, pix[sel], tri_id[sel], bary[sel], depth[sel])
