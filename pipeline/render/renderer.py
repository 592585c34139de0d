"""``render``: a batch of meshes of one topology to images, differentiably (deferred shading).

z-buffer (:func:`.interpolate.triangle_ids`, no gradient) -> barycentrics from the projected
vertices (gradient to positions) -> interpolated camera-frame normals and albedo -> spherical-
harmonics Lambertian or Phong shading -> composited over the background with the antialiased
silhouette (:mod:`.silhouette`). Everything after the z-buffer is torch on the inputs' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.render import camera as cam
from pipeline.render.interpolate import barycentrics, interpolate, perspective_correct, triangle_ids
from pipeline.render.shading import lambertian_sh, phong
from pipeline.render.silhouette import shift, soft_silhouette

Tensor = torch.Tensor


@dataclass(frozen=True)
class Orthographic:
    """Scaled orthographic: rotation (B, 3, 3), scale (B,) px/mm, translation (B, 2) px."""

    rotation: Tensor
    scale: Tensor
    translation: Tensor

    def project(self, points: Tensor) -> tuple[Tensor, Tensor | None]:
        return cam.orthographic(points, self.rotation, self.scale, self.translation), None


@dataclass(frozen=True)
class Perspective:
    """Pinhole: rotation (B, 3, 3), translation (B, 3) mm, distance (B,) mm, focal (B,) px, centre (B, 2) px."""

    rotation: Tensor
    translation: Tensor
    distance: Tensor
    focal: Tensor
    centre: Tensor

    def project(self, points: Tensor) -> tuple[Tensor, Tensor | None]:
        return cam.perspective(
            points, self.rotation, self.translation, self.distance, self.focal, self.centre
        )


@dataclass(frozen=True)
class SHLighting:
    """Spherical-harmonics lighting (B, 9, 3) (:func:`pipeline.render.shading.lambertian_sh`)."""

    coefficients: Tensor


@dataclass(frozen=True)
class PhongLighting:
    """Point lights in the camera frame (B, L, 3) mm and colours (B, L, 3); ambient (B, 3); specular (B,)."""

    positions: Tensor
    colours: Tensor
    ambient: Tensor
    specular: Tensor
    shininess: float = 16.0


@dataclass
class Rendered:
    image: Tensor  # (B, H, W, 3) linear RGB over the background
    alpha: Tensor  # (B, H, W) antialiased coverage
    tri_id: Tensor  # (B, H, W) int64, -1 = background
    weights: Tensor  # (B, H, W, 3) barycentrics (perspective-correct where the camera is)


def vertex_normals(vertices: Tensor, triangles: Tensor) -> Tensor:
    """(B, n, 3) unit normals: area-weighted sums of the adjacent faces' normals (outward winding)."""
    a, b, c = (vertices[:, triangles[:, k]] for k in range(3))
    face = torch.linalg.cross(b - a, c - a, dim=-1)  # length = twice the area
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals = normals.index_add(1, triangles[:, k], face)
    return normals / normals.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def render(
    vertices: Tensor,
    triangles: Tensor,
    albedo: Tensor,
    camera: Orthographic | Perspective,
    lighting: SHLighting | PhongLighting,
    height: int,
    width: int,
    background: Tensor | None = None,
) -> Rendered:
    """Render meshes ``vertices`` (B, n, 3) model mm with per-vertex ``albedo`` (B, n, 3)."""
    screen, view_distance = camera.project(vertices)
    tri_id = triangle_ids(screen, triangles, height, width)
    weights, covered = barycentrics(screen, triangles, tri_id)
    if view_distance is not None:
        weights = perspective_correct(weights, view_distance, triangles, tri_id)
    normals_cam = vertex_normals(vertices, triangles) @ camera.rotation.transpose(-1, -2)
    n = interpolate(normals_cam, triangles, tri_id, weights)
    # uncovered pixels get +z before normalising: a zero vector has no usable norm gradient
    n = torch.where(covered[..., None], n, torch.tensor([0.0, 0.0, 1.0], dtype=n.dtype, device=n.device))
    n = n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    alb = interpolate(albedo, triangles, tri_id, weights)
    if isinstance(lighting, SHLighting):
        colour = lambertian_sh(n, alb, lighting.coefficients)
    else:
        points = interpolate(cam.to_camera(vertices, camera.rotation), triangles, tri_id, weights)
        b = points.shape[0]
        colour = phong(
            points.reshape(b, -1, 3),
            n.reshape(b, -1, 3),
            alb.reshape(b, -1, 3),
            lighting.positions,
            lighting.colours,
            lighting.ambient,
            lighting.specular,
            lighting.shininess,
        ).reshape(points.shape)
    colour = colour * covered[..., None]
    alpha = soft_silhouette(screen, triangles, tri_id)
    bg = torch.zeros_like(colour) if background is None else background
    # a background pixel the silhouette reaches into shows its covered neighbours' colour
    image = alpha[..., None] * _spread(colour, covered) + (1 - alpha[..., None]) * bg
    return Rendered(image, alpha, tri_id, weights)


def _spread(colour: Tensor, covered: Tensor) -> Tensor:
    """Each covered pixel's colour; at a background pixel the mean colour of its covered 4-neighbours."""
    total = torch.zeros_like(colour)
    count = torch.zeros_like(colour[..., :1])
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        c = torch.stack([shift(colour[..., k], dx, dy, 0.0) for k in range(3)], dim=-1)
        m = shift(covered, dx, dy, False)[..., None].to(colour.dtype)
        total = total + c * m
        count = count + m
    return torch.where(covered[..., None], colour, total / count.clamp(min=1.0))
