"""``render``: a batch of meshes of one topology to images, differentiably (deferred shading).

z-buffer (:func:`.interpolate.triangle_ids`, no gradient) -> barycentrics from the projected
vertices (gradient to positions) -> interpolated camera-frame normals and albedo -> spherical-
harmonics Lambertian or Phong shading -> composited over the background with the antialiased
silhouette (:mod:`.silhouette`). Everything after the z-buffer is torch on the inputs' device.

What ``morphset synth`` draws goes through here too (:func:`pipeline.synthetic.render.render_face`):
open meshes seen from both sides (``back_albedo``), closed ones culled (``cull``), per-vertex
``gloss``, cast ``shadows``, the eye's direction under a pinhole, and a hard edge
(``silhouette=False``) that synth antialiases by supersampling.
"""

from __future__ import annotations

from collections.abc import Callable
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
    depth: Tensor  # (B, H, W) camera-frame z of the surface (larger = nearer), -inf = background


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
    *,
    cull: Tensor | bool = False,
    back_albedo: float | None = None,
    gloss: Tensor | None = None,
    shadows: Callable[[Tensor], Tensor] | None = None,
    silhouette: bool = True,
) -> Rendered:
    """Render meshes ``vertices`` (B, n, 3) model mm with per-vertex ``albedo`` (B, n, 3).

    ``cull``: back-facing triangles are not drawn (all, or a (T,) bool mask: a closed surface
    beside an open one). ``back_albedo``: where the camera sees a triangle's back (the inside of
    an open mesh, through its holes), the normal is flipped and the albedo times this; None draws
    backs as fronts. Phong only: ``gloss`` (B, n) scales the specular term per vertex, ``shadows``
    maps the visible surface points (B, m, 3) camera frame to the share of each light reaching
    them (B, m, L) (:mod:`.shadow`), and a pinhole's highlights look from its eye. ``silhouette``
    False: a hard edge (coverage 0 or 1) instead of the antialiased one."""
    screen, view_distance = camera.project(vertices)
    full_ids = triangle_ids(screen, triangles, height, width, cull_backfaces=cull)
    # the per-pixel work runs in the window the meshes cover (with a pixel of background around it
    # for the silhouette), in the window's own pixel coordinates; the rest is background
    rows, cols = (full_ids >= 0).any(dim=0).any(dim=1), (full_ids >= 0).any(dim=0).any(dim=0)
    if not bool(rows.any()):
        rows[:1], cols[:1] = True, True
    r0, r1 = _span(rows, height)
    c0, c1 = _span(cols, width)
    tri_id = full_ids[:, r0:r1, c0:c1]
    screen = screen - screen.new_tensor([c0, r0, 0.0])
    win = None if background is None else background[:, r0:r1, c0:c1]
    out = _shade(vertices, triangles, albedo, camera, lighting, screen, view_distance, tri_id, win,
                 back_albedo, gloss, shadows, silhouette)  # fmt: skip
    return Rendered(
        _paste(out.image, background, (height, width), r0, c0, 0.0),
        _paste(out.alpha, None, (height, width), r0, c0, 0.0),
        full_ids,
        _paste(out.weights, None, (height, width), r0, c0, 0.0),
        _paste(out.depth, None, (height, width), r0, c0, -torch.inf),
    )


def _span(any_covered: Tensor, size: int) -> tuple[int, int]:
    """[first, last + 1) of the covered rows (or columns), one more on each side where there is room."""
    idx = torch.nonzero(any_covered).flatten()
    return max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, size)


def _paste(
    window: Tensor, full: Tensor | None, size: tuple[int, int], r0: int, c0: int, fill: float
) -> Tensor:
    """``window`` (B, h, w, ...) put at (r0, c0) of ``full`` (or of a tensor of ``fill``)."""
    out = torch.full(
        (window.shape[0], *size, *window.shape[3:]), fill, dtype=window.dtype, device=window.device
    )
    out = out if full is None else full.expand_as(out).clone()
    out[:, r0 : r0 + window.shape[1], c0 : c0 + window.shape[2]] = window
    return out


def _shade(
    vertices: Tensor,
    triangles: Tensor,
    albedo: Tensor,
    camera: Orthographic | Perspective,
    lighting: SHLighting | PhongLighting,
    screen: Tensor,
    view_distance: Tensor | None,
    tri_id: Tensor,
    background: Tensor | None,
    back_albedo: float | None,
    gloss: Tensor | None,
    shadows: Callable[[Tensor], Tensor] | None,
    silhouette: bool,
) -> Rendered:
    """:func:`render` within a window: ``screen`` and ``tri_id`` in the window's pixels."""
    weights, covered = barycentrics(screen, triangles, tri_id)
    if view_distance is not None:
        weights = perspective_correct(weights, view_distance, triangles, tri_id)
    normals_cam = vertex_normals(vertices, triangles) @ camera.rotation.transpose(-1, -2)
    n = interpolate(normals_cam, triangles, tri_id, weights)
    # uncovered pixels get +z before normalising: a zero vector has no usable norm gradient
    n = torch.where(covered[..., None], n, torch.tensor([0.0, 0.0, 1.0], dtype=n.dtype, device=n.device))
    n = n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    alb = interpolate(albedo, triangles, tri_id, weights)
    if back_albedo is not None:
        back = _back_facing(screen, triangles, tri_id)[..., None]
        n = torch.where(back, -n, n)
        alb = torch.where(back, alb * back_albedo, alb)
    translation = camera.translation if isinstance(camera, Perspective) else None
    points = interpolate(cam.to_camera(vertices, camera.rotation, translation), triangles, tri_id, weights)
    if isinstance(lighting, SHLighting):
        colour = lambertian_sh(n, alb, lighting.coefficients)
    else:
        b = points.shape[0]
        flat = points.reshape(b, -1, 3)
        view = None
        if isinstance(camera, Perspective):  # from each point to the eye, (0, 0, distance)
            eye = torch.zeros_like(flat)
            eye[..., 2] = camera.distance[:, None]
            view = eye - flat
            view = view / view.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        colour = phong(
            flat,
            n.reshape(b, -1, 3),
            alb.reshape(b, -1, 3),
            lighting.positions,
            lighting.colours,
            lighting.ambient,
            lighting.specular,
            lighting.shininess,
            view=view,
            gloss=None
            if gloss is None
            else interpolate(gloss[..., None], triangles, tri_id, weights).reshape(b, -1),
            visibility=None if shadows is None else shadows(flat),
        ).reshape(points.shape)
    colour = colour * covered[..., None]
    bg = torch.zeros_like(colour) if background is None else background
    depth = torch.where(covered, points[..., 2], torch.full_like(points[..., 2], -torch.inf))
    if not silhouette:
        alpha = covered.to(colour.dtype)
        image = torch.where(covered[..., None], colour, bg)
        return Rendered(image, alpha, tri_id, weights, depth)
    alpha = soft_silhouette(screen, triangles, tri_id)
    # a background pixel the silhouette reaches into shows its covered neighbours' colour
    image = alpha[..., None] * _spread(colour, covered) + (1 - alpha[..., None]) * bg
    return Rendered(image, alpha, tri_id, weights, depth)


def _back_facing(screen: Tensor, triangles: Tensor, tri_id: Tensor) -> Tensor:
    """(B, H, W) bool: the pixel's triangle turns its back to the camera (clockwise on the
    y-up screen, the winding being outward)."""
    bsz = tri_id.shape[0]
    batch = torch.arange(bsz, device=screen.device)[:, None, None, None]
    c = screen[batch, triangles[tri_id.clamp(min=0)]][..., :2]  # (B, H, W, 3, 2), y down
    area = (c[..., 1, 0] - c[..., 0, 0]) * (c[..., 2, 1] - c[..., 0, 1]) - (c[..., 2, 0] - c[..., 0, 0]) * (
        c[..., 1, 1] - c[..., 0, 1]
    )
    return (area > 0) & (tri_id >= 0)  # y down flips the sign: front faces have area < 0


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
