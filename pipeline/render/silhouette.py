"""A silhouette whose edges carry gradient: analytic antialiasing between neighbouring pixels.

A z-buffer's coverage is a step: moving a vertex changes it only when a pixel centre is crossed,
so its gradient is zero almost everywhere. Here, for every covered pixel ``p`` whose horizontal
or vertical neighbour ``q`` is background, the edge of ``p``'s triangle is located on the segment
``p -> q``: each barycentric weight of the triangle is linear along it, and the first to reach
zero does so at ``s*`` (pixel units from ``p``), a differentiable function of the projected
vertices. ``q`` is then covered over ``max(0, s* - 1/2)`` of its extent along that axis and ``p``
over ``min(1, s* + 1/2)`` (nvdiffrast's analytic antialiasing, in its one-axis form): the
coverage is the smallest over a covered pixel's background sides and the largest over the sides
of a background pixel. Interior pixels are 1, pixels away from the mesh 0. Edges between two
triangles of the mesh (self-occlusion) are not blended.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def shift(x: Tensor, dx: int, dy: int, fill: float | int) -> Tensor:
    """``out[b, i, j] = x[b, i + dy, j + dx]`` (``fill`` outside)."""
    out = torch.full_like(x, fill)
    h, w = x.shape[1], x.shape[2]
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[:, yd, xd] = x[:, ys, xs]
    return out


def _weights(corners: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Barycentric weights (..., 3) at points (px, py) of triangles with screen corners (..., 3, 2)."""
    ax, ay = corners[..., 0, 0], corners[..., 0, 1]
    bx, by = corners[..., 1, 0], corners[..., 1, 1]
    cx, cy = corners[..., 2, 0], corners[..., 2, 1]
    area = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
    area = torch.where(area.abs() > 1e-12, area, torch.ones_like(area))
    wa = ((bx - px) * (cy - py) - (cx - px) * (by - py)) / area
    wb = ((cx - px) * (ay - py) - (ax - px) * (cy - py)) / area
    return torch.stack([wa, wb, 1.0 - wa - wb], dim=-1)


def soft_silhouette(screen: Tensor, triangles: Tensor, tri_id: Tensor) -> Tensor:
    """(B, H, W) coverage in [0, 1], differentiable in ``screen``'s x and y near the silhouette."""
    bsz, h, w = tri_id.shape
    covered = tri_id >= 0
    batch = torch.arange(bsz, device=screen.device)[:, None, None, None]
    corners = screen[batch, triangles[tri_id.clamp(min=0)]][..., :2]  # (B, H, W, 3, 2)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=screen.device, dtype=screen.dtype),
        torch.arange(w, device=screen.device, dtype=screen.dtype),
        indexing="ij",
    )
    own = covered.to(screen.dtype)  # covered pixels' coverage, lowered at background sides
    spill = torch.zeros_like(own)  # background pixels' coverage, raised by covered neighbours
    for dx, dy in _DIRECTIONS:
        neighbour_bg = shift(~covered, dx, dy, False)  # the neighbour (p + e) is background
        edge = covered & neighbour_bg
        if not bool(edge.any()):
            continue
        w_p = _weights(corners, xs[None], ys[None])
        w_q = _weights(corners, xs[None] + dx, ys[None] + dy)
        # only at edge pixels (elsewhere the corners are not this pixel's triangle's): no 0/0 there
        leaving = (w_q < 0) & edge[..., None]
        denom = torch.where(leaving, w_p.clamp(min=0.0) - w_q, torch.ones_like(w_q))
        s_k = torch.where(leaving, w_p.clamp(min=0.0) / denom, torch.full_like(w_q, 2.0))
        s = s_k.min(dim=-1).values.clamp(0.0, 1.0)  # where p's triangle ends on p -> q
        p_cov = torch.clamp(s + 0.5, max=1.0)
        q_cov = torch.clamp(s - 0.5, min=0.0)
        own = torch.where(edge, torch.minimum(own, p_cov), own)
        # the neighbour q = p + e receives q_cov: move it onto q's pixel
        moved = shift(torch.where(edge, q_cov, torch.zeros_like(q_cov)), -dx, -dy, 0.0)
        spill = torch.maximum(spill, moved)
    return torch.where(covered, own, spill)
