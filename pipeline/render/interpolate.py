"""Deferred shading (tf_mesh_renderer's approach): the z-buffer says which triangle is at each
pixel; the barycentric weights are then recomputed in torch from the projected vertices, so
gradients flow to vertex positions through them, and to any per-vertex attribute.

A pixel centre ``p`` inside triangle ``(a, b, c)`` (screen x, y) has weights ``w_a = E(b, c, p) / A``,
``w_b = E(c, a, p) / A``, ``w_c = 1 - w_a - w_b`` with ``E`` the edge function and ``A = E(a, b, c)``
the signed double area. With a perspective camera, screen-space weights are made perspective-
correct: ``w_k / d_k`` normalised, ``d_k`` the vertex's view distance.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.render.raster import rasterize_batch

Tensor = torch.Tensor


def triangle_ids(
    screen: Tensor,
    triangles: Tensor,
    height: int,
    width: int,
    cull_backfaces: bool | np.ndarray | Tensor = False,
) -> Tensor:
    """(B, H, W) int64 index of the nearest triangle at each pixel centre, -1 where none
    (:func:`pipeline.render.raster.rasterize_batch`, on ``screen``'s device, no gradient)."""
    return rasterize_batch(screen, triangles, height, width, cull_backfaces).triangle


def barycentrics(screen: Tensor, triangles: Tensor, tri_id: Tensor) -> tuple[Tensor, Tensor]:
    """((B, H, W, 3) weights, (B, H, W) covered): differentiable in ``screen``'s x and y.

    Uncovered pixels get zero weights."""
    bsz, h, w = tri_id.shape
    covered = tri_id >= 0
    tid = tri_id.clamp(min=0)
    vid = triangles[tid]  # (B, H, W, 3) vertex ids
    batch = torch.arange(bsz, device=screen.device)[:, None, None, None]
    corners = screen[batch, vid][..., :2]  # (B, H, W, 3, 2)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=screen.device, dtype=screen.dtype),
        torch.arange(w, device=screen.device, dtype=screen.dtype),
        indexing="ij",
    )
    px, py = xs[None], ys[None]
    ax, ay = corners[..., 0, 0], corners[..., 0, 1]
    bx, by = corners[..., 1, 0], corners[..., 1, 1]
    cx, cy = corners[..., 2, 0], corners[..., 2, 1]
    area = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
    safe = torch.where(covered & (area.abs() > 1e-12), area, torch.ones_like(area))
    wa = ((bx - px) * (cy - py) - (cx - px) * (by - py)) / safe
    wb = ((cx - px) * (ay - py) - (ax - px) * (cy - py)) / safe
    wc = 1.0 - wa - wb
    weights = torch.stack([wa, wb, wc], dim=-1) * covered[..., None]
    return weights, covered


def perspective_correct(weights: Tensor, view_distance: Tensor, triangles: Tensor, tri_id: Tensor) -> Tensor:
    """Screen-space weights (B, H, W, 3) -> perspective-correct ones, ``view_distance`` (B, n)."""
    bsz = tri_id.shape[0]
    batch = torch.arange(bsz, device=weights.device)[:, None, None, None]
    d = view_distance[batch, triangles[tri_id.clamp(min=0)]]  # (B, H, W, 3)
    q = weights / d
    total = q.sum(dim=-1, keepdim=True)
    covered = (tri_id >= 0)[..., None]
    return torch.where(covered, q / torch.where(covered, total, torch.ones_like(total)), weights)


def interpolate(attributes: Tensor, triangles: Tensor, tri_id: Tensor, weights: Tensor) -> Tensor:
    """(B, n, C) per-vertex attributes -> (B, H, W, C) at the pixel centres (0 where uncovered)."""
    bsz = tri_id.shape[0]
    batch = torch.arange(bsz, device=attributes.device)[:, None, None, None]
    corners = attributes[batch, triangles[tri_id.clamp(min=0)]]  # (B, H, W, 3, C)
    return (weights[..., None] * corners).sum(dim=-2)
