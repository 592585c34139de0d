"""Cameras in torch: model points (mm, y up, z toward the viewer) to screen space.

Screen space (:mod:`pipeline.render.raster`'s): pixel x, pixel y (down), depth (larger = nearer),
pixel centres at integer coordinates. Both cameras first rotate (and translate) model points into
the camera frame, x right, y up, z toward the viewer.

- scaled orthographic (the fit's camera): ``u = t_x + f x``, ``v = t_y - f y``, depth ``z``;
- perspective (a pinhole ``distance_mm`` in front of the model's origin, on the +z axis, looking
  down -z): ``u = c_x + f x / w``, ``v = c_y - f y / w`` with ``w = distance - z`` the distance
  along the view axis; depth ``z``. ``w`` is returned for perspective-correct interpolation.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def to_camera(points: Tensor, rotation: Tensor, translation_mm: Tensor | None = None) -> Tensor:
    """(B, n, 3) model points -> camera frame: ``R X (+ t)``; rotation (B, 3, 3), translation (B, 3)."""
    cam = points @ rotation.transpose(-1, -2)
    return cam if translation_mm is None else cam + translation_mm[:, None, :]


def orthographic(points: Tensor, rotation: Tensor, scale: Tensor, translation_px: Tensor) -> Tensor:
    """(B, n, 3) screen coordinates of a scaled-orthographic camera: ``scale`` (B,) px/mm,
    ``translation_px`` (B, 2)."""
    c = to_camera(points, rotation)
    f = scale[:, None]
    return torch.stack(
        [translation_px[:, None, 0] + f * c[..., 0], translation_px[:, None, 1] - f * c[..., 1], c[..., 2]],
        dim=-1,
    )


def perspective(
    points: Tensor,
    rotation: Tensor,
    translation_mm: Tensor,
    distance_mm: Tensor,
    focal_px: Tensor,
    centre_px: Tensor,
) -> tuple[Tensor, Tensor]:
    """((B, n, 3) screen coordinates, (B, n) view distances ``w``) of a pinhole camera
    ``distance_mm`` (B,) in front of the origin with focal length ``focal_px`` (B,) and principal
    point ``centre_px`` (B, 2). Points must lie in front of it (``w > 0``)."""
    c = to_camera(points, rotation, translation_mm)
    w = distance_mm[:, None] - c[..., 2]
    f = focal_px[:, None]
    screen = torch.stack(
        [centre_px[:, None, 0] + f * c[..., 0] / w, centre_px[:, None, 1] - f * c[..., 1] / w, c[..., 2]],
        dim=-1,
    )
    return screen, w
