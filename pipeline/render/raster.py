"""Rasterisation: which triangle is nearest at each pixel centre, and its barycentric weights.

The one rasteriser of the project (``morphset synth``, the differentiable renderer in
:mod:`pipeline.render`, the refine stage's visibility, shadow maps and the evaluation's pictures),
in torch, so a batch is rasterised where its vertices are: on the CPU, or on a CUDA device
without a round trip. Screen space: pixel x, pixel y (down), depth (larger = nearer); pixel
centres at integer coordinates. Every image's triangles are pooled and grouped by the size of
their pixel bounding box. Small ones test every pixel centre of their box at once with edge
functions (barycentrics); large ones get exact per-row x-intervals, so work follows the covered
area. There is no Python loop over images, pixels or triangles. Per pixel the nearest fragment
wins, and the lowest triangle id among equally near ones (two scatter reductions:
deterministic, on any device). The arithmetic is float64 whatever the input's dtype. This step
is not differentiable and needs none: gradients flow through the barycentrics recomputed from
the projected vertices (:mod:`pipeline.render.interpolate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor

# Fragment budget per vectorised chunk (candidate pixel tests held in memory at once).
_CHUNK_CANDIDATES = 1 << 21
_SPAN_MIN = 8  # triangles with a bounding box of at least this many pixels are filled by row spans
_EPS = 1e-9


@dataclass(frozen=True)
class Raster:
    """A batch's visible surface, per pixel: ``triangle`` (B, H, W) int64, -1 where nothing was
    drawn; ``bary`` (B, H, W, 3) float64 weights of its corners (0 where none); ``depth`` (B, H, W)
    float64, larger = nearer, -inf where none. On the device of the screen coordinates."""

    triangle: Tensor
    bary: Tensor
    depth: Tensor


@dataclass(frozen=True)
class Fragments:
    """One image's visible surface as NumPy arrays: for each covered pixel (flat index into H*W)
    its triangle, its barycentric weights (m, 3) and its depth (larger = nearer)."""

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


def _bucket_sizes(extent: Tensor) -> Tensor:
    """Round bounding-box extents up to a few square candidate-grid sizes (1, 2, 3, 4, 6, 8, 12, ...)."""
    sizes = [1, 2, 3, 4]
    while sizes[-1] < 1 << 16:
        sizes += [sizes[-2] * 2, sizes[-1] * 2]
    grid = torch.tensor(sizes, dtype=extent.dtype, device=extent.device)
    return grid[torch.searchsorted(grid, extent)]


def _box_candidates(
    t: Tensor, d: int, x0: Tensor, x1: Tensor, y0: Tensor, y1: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(triangle, x, y) of every pixel centre in each triangle's clipped bounding box (<= d x d)."""
    cell = torch.arange(d * d, dtype=torch.int64, device=t.device)
    oy, ox = cell // d, cell % d
    px = x0[t, None] + ox[None, :]
    py = y0[t, None] + oy[None, :]
    r, k = torch.nonzero((px <= x1[t, None]) & (py <= y1[t, None]), as_tuple=True)
    return t[r], px[r, k], py[r, k]


def _span_candidates(
    t: Tensor, a: Tensor, b: Tensor, c: Tensor, area: Tensor, x0: Tensor, x1: Tensor, y0: Tensor, y1: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(triangle, x, y) of the pixel centres inside each triangle, one x-interval per pixel row.

    On a row y each barycentric weight is linear in x, w = k x + m; w >= 0 bounds x from one side.
    """
    rows = y1[t] - y0[t] + 1
    tr = torch.repeat_interleave(t, rows)
    first = torch.repeat_interleave(torch.cumsum(rows, 0) - rows, rows)
    y = (y0[tr] + torch.arange(len(tr), device=t.device) - first).double()
    ax, ay, bx, by, cx, cy = a[tr, 0], a[tr, 1], b[tr, 0], b[tr, 1], c[tr, 0], c[tr, 1]
    inv = 1.0 / area[tr]
    ka, ma = (by - cy) * inv, (bx * (cy - y) - cx * (by - y)) * inv
    kb, mb = (cy - ay) * inv, (cx * (ay - y) - ax * (cy - y)) * inv
    kc, mc = -(ka + kb), 1.0 - ma - mb
    lo = x0[tr].double()
    hi = x1[tr].double()
    for k, m in ((ka, ma), (kb, mb), (kc, mc)):
        bound = (-_EPS - m) / k  # +-inf or nan where k == 0: not used there
        lo = torch.where(k > 0, torch.maximum(lo, bound), lo)
        hi = torch.where(k < 0, torch.minimum(hi, bound), hi)
        hi = torch.where((k == 0) & (m < -_EPS), -torch.inf, hi)
    # one pixel of slack each side; the exact inside test afterwards decides
    xl = torch.maximum(torch.ceil(lo) - 1, x0[tr].double()).long()
    xr = torch.minimum(torch.floor(torch.maximum(hi, lo - 2)) + 1, x1[tr].double()).long()
    n = (xr - xl + 1).clamp(min=0)
    tp = torch.repeat_interleave(tr, n)
    start = torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    px = torch.repeat_interleave(xl, n) + torch.arange(len(tp), device=t.device) - start
    py = torch.repeat_interleave(y.long(), n)
    return tp, px, py


def _weights(
    a: Tensor, b: Tensor, c: Tensor, inv: Tensor, px: Tensor, py: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Barycentric weight of each corner at pixel centres: opposite edge function / signed area."""
    ax, ay, bx, by, cx, cy = a[:, 0], a[:, 1], b[:, 0], b[:, 1], c[:, 0], c[:, 1]
    wa = ((bx - px) * (cy - py) - (cx - px) * (by - py)) * inv
    wb = ((cx - px) * (ay - py) - (ax - px) * (cy - py)) * inv
    return wa, wb, 1.0 - wa - wb


@torch.no_grad()
def rasterize_batch(
    screen: Tensor,
    triangles: Tensor,
    height: int,
    width: int,
    cull_backfaces: bool | Tensor | np.ndarray = True,
) -> Raster:
    """Z-buffer rasterisation of a batch of meshes sharing ``triangles`` (T, 3), given in screen
    space ``screen`` (B, n, 3): pixel x, pixel y (down), depth (larger = nearer).

    With ``cull_backfaces`` triangles are dropped unless they wind counter-clockwise as seen by the
    camera (y up), i.e. outward-wound surfaces facing the viewer; a boolean (T,) culls only those
    triangles. Runs on ``screen``'s device."""
    dev = screen.device
    s = screen.detach().to(torch.float64)
    bsz, n_tri = s.shape[0], triangles.shape[0]
    tri = torch.as_tensor(triangles, device=dev).long()
    # a triangle with a non-finite corner is dropped; zeros in its place keep the casts defined
    finite_vertex = torch.isfinite(s).all(dim=-1)
    finite = finite_vertex[:, tri].all(dim=-1).reshape(-1)
    s = torch.where(finite_vertex[..., None], s, 0.0)
    # every image's triangles in one list: flat id = image * T + triangle
    a, b, c = (s[:, tri[:, k]].reshape(-1, 3) for k in range(3))
    # signed double area in image coordinates (y down): negative = counter-clockwise with y up
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    keep = area.abs() > 1e-12
    cull = torch.as_tensor(cull_backfaces, dtype=torch.bool, device=dev)
    keep &= ~cull.expand(n_tri).repeat(bsz) | (area < 0)
    xs = torch.stack([a[:, 0], b[:, 0], c[:, 0]], dim=1)
    ys = torch.stack([a[:, 1], b[:, 1], c[:, 1]], dim=1)
    # clipped to the image (one past it where a box misses it), so far-off corners cast safely
    x0 = torch.ceil(xs.amin(dim=1)).clamp(0, width).long()
    x1 = torch.floor(xs.amax(dim=1)).clamp(-1, width - 1).long()
    y0 = torch.ceil(ys.amin(dim=1)).clamp(0, height).long()
    y1 = torch.floor(ys.amax(dim=1)).clamp(-1, height - 1).long()
    keep &= (x1 >= x0) & (y1 >= y0) & finite
    ids = torch.nonzero(keep).flatten()
    size = _bucket_sizes(torch.maximum(x1[ids] - x0[ids], y1[ids] - y0[ids]) + 1)

    pixels = bsz * height * width
    pix_parts, tri_parts, depth_parts = [], [], []
    for d in torch.unique(size).tolist():
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
            wa, wb, wc = _weights(a[tt], b[tt], c[tt], 1.0 / area[tt], px.double(), py.double())
            inside = (wa >= -_EPS) & (wb >= -_EPS) & (wc >= -_EPS)
            tt, px, py = tt[inside], px[inside], py[inside]
            wa, wb, wc = wa[inside], wb[inside], wc[inside]
            pix_parts.append((tt // n_tri) * (height * width) + py * width + px)
            tri_parts.append(tt)
            depth_parts.append(wa * a[tt, 2] + wb * b[tt, 2] + wc * c[tt, 2])
    triangle = torch.full((pixels,), -1, dtype=torch.int64, device=dev)
    bary = torch.zeros(pixels, 3, dtype=torch.float64, device=dev)
    depth = torch.full((pixels,), -torch.inf, dtype=torch.float64, device=dev)
    if pix_parts:
        pix, tid, dep = torch.cat(pix_parts), torch.cat(tri_parts), torch.cat(depth_parts)
        # nearest first within each pixel; the lowest triangle id breaks exact ties
        depth.scatter_reduce_(0, pix, dep, "amax")
        near = dep == depth[pix]
        pix, tid = pix[near], tid[near]
        lowest = torch.full((pixels,), n_tri * bsz, dtype=torch.int64, device=dev)
        lowest.scatter_reduce_(0, pix, tid, "amin")
        won = tid == lowest[pix]
        pix, tid = pix[won], tid[won]
        local = pix % (height * width)
        wa, wb, wc = _weights(
            a[tid], b[tid], c[tid], 1.0 / area[tid], (local % width).double(), (local // width).double()
        )
        triangle[pix] = tid % n_tri
        bary[pix] = torch.stack([wa, wb, wc], dim=1)
    return Raster(
        triangle.view(bsz, height, width), bary.view(bsz, height, width, 3), depth.view(bsz, height, width)
    )


def rasterize(
    screen: np.ndarray,
    triangles: np.ndarray,
    height: int,
    width: int,
    cull_backfaces: bool | np.ndarray = True,
) -> Fragments:
    """One mesh ``screen`` (n, 3) rasterised on the CPU (:func:`rasterize_batch`), as NumPy arrays
    of its covered pixels."""
    out = rasterize_batch(
        torch.from_numpy(np.ascontiguousarray(screen, np.float64))[None],
        torch.from_numpy(np.ascontiguousarray(triangles, np.int64).reshape(-1, 3)),
        height,
        width,
        cull_backfaces,
    )
    tri = out.triangle.reshape(-1)
    pixel = torch.nonzero(tri >= 0).flatten()
    return Fragments(
        height,
        width,
        pixel.numpy(),
        tri[pixel].numpy(),
        out.bary.reshape(-1, 3)[pixel].numpy(),
        out.depth.reshape(-1)[pixel].numpy(),
    )
