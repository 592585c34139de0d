"""Appearance without a texture model: colours sampled from an image at the projected vertices.

The default morphable model has no albedo basis, so a render of a predicted face takes its
colours from the input image itself (Genova et al.'s renders of the prediction; analysis by
synthesis): each vertex is projected into the image and the image is sampled there, bilinearly
and differentiably in both the image and the vertex positions. Only vertices the image shows are
usable: one is *visible* when it faces the camera and the z-buffer's surface at its pixel is not
nearer than it by more than ``tolerance`` (the synth renderer's landmark test).

Limits: the sampled colour is the image's, lighting and shadows included (it is not an albedo);
a vertex hidden in this view gets no colour (``visible`` False) and must be filled by the caller
(a mirror partner, a mean colour) or left out of a loss.
"""

from __future__ import annotations

import torch

from pipeline.render.interpolate import barycentrics, interpolate

Tensor = torch.Tensor


def sample_image(image: Tensor, xy: Tensor) -> Tensor:
    """Bilinear samples (B, n, C) of ``image`` (B, H, W, C) at pixel positions ``xy`` (B, n, 2)
    (x right, y down, pixel centres at integers); positions outside are clamped to the border."""
    b, h, w, _ = image.shape
    grid = torch.stack(
        [2.0 * xy[..., 0] / max(w - 1, 1) - 1.0, 2.0 * xy[..., 1] / max(h - 1, 1) - 1.0], dim=-1
    )
    out = torch.nn.functional.grid_sample(
        image.permute(0, 3, 1, 2), grid[:, None], mode="bilinear", padding_mode="border", align_corners=True
    )
    return out[:, :, 0].transpose(1, 2)


def visible_vertices(
    screen: Tensor, triangles: Tensor, tri_id: Tensor, normals_cam: Tensor, tolerance: float
) -> Tensor:
    """(B, n) bool: the vertex faces the camera (normal z > 0), lies inside the image and is not
    behind the z-buffer's surface at its (nearest) pixel by more than ``tolerance`` (depth units)."""
    b, h, w = tri_id.shape
    with torch.no_grad():
        weights, covered = barycentrics(screen, triangles, tri_id)
        depth = interpolate(screen[..., 2:], triangles, tri_id, weights)[..., 0]
        depth = torch.where(covered, depth, torch.full_like(depth, -torch.inf))
        px = screen[..., 0].round().long()
        py = screen[..., 1].round().long()
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        batch = torch.arange(b, device=screen.device)[:, None]
        surface = depth[batch, py.clamp(0, h - 1), px.clamp(0, w - 1)]
        return inside & (normals_cam[..., 2] > 0) & (screen[..., 2] >= surface - tolerance)


def vertex_colours(
    image: Tensor, screen: Tensor, triangles: Tensor, tri_id: Tensor, normals_cam: Tensor, tolerance: float
) -> tuple[Tensor, Tensor]:
    """((B, n, C) colours sampled at the projected vertices, (B, n) visible)."""
    return sample_image(image, screen[..., :2]), visible_vertices(
        screen, triangles, tri_id, normals_cam, tolerance
    )
