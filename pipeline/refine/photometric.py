"""The refinement's image model and objective, pure torch (CPU or CUDA), batched over subjects.

A subject's images are cut to square windows around the fitted face and resampled to one size
(:func:`pipeline.refine.windows.face_window`), so every setting means the same at any image size.
In each window a fixed sample of the model's face-region vertices is projected with the image's
scaled-orthographic camera (the fit's), and the (blurred) window is sampled there bilinearly.
The colours are explained as a per-vertex albedo *shared by the subject's images* times a
per-image, per-channel order-1 spherical-harmonics function of the vertex normal (shading, light
colour and white balance): with the albedo shared, the photometric term asks that a surface point
look the same in every image once lighting is taken out (photo-consistency), which only a correct
shape and pose give where the views differ. Albedo and shading are solved in closed form at every
step without gradient (at their optimum the objective's gradient in the geometry is the partial
one); a Cauchy loss weights away what the model cannot explain (hair, glasses, cast shadows,
highlights). With one image a free albedo explains every colour, and the term is zero; with the
albedo shared by each sample and its mirror image across the face's midline
(``solve_appearance(mirror=...)``) the two sides of every image must agree too, which a shape
with wrong normals on one side cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class RegionModel:
    """The model restricted to its face region (float32 tensors on one device)."""

    mean: Tensor  # (R, 3) mm
    id_basis: Tensor  # (R, 3, k_id) mm per σ unit (basis × std)
    exp_basis: Tensor  # (R, 3, k_exp) mm per σ unit
    triangles: Tensor  # (T, 3) into the region's vertices, each one a photometric sample
    landmark_mean: Tensor  # (L, 3) the inner landmarks
    landmark_id: Tensor  # (L, 3, k_id)
    landmark_exp: Tensor  # (L, 3, k_exp)
    coords: Tensor  # (R, 2) frontal face position of each vertex, about −1…1 across the face
    # each triangle's two edges from its first corner, as linear functions of the coefficients
    # like the vertices: the normals then need matrix products, not gathers of the vertices
    edge_mean: Tensor  # (2, T, 3) mm
    edge_id: Tensor  # (2, T, 3, k_id)
    edge_exp: Tensor  # (2, T, 3, k_exp)
    mirror: Tensor  # (R,) the vertex nearest each one's mirror image across the midline (itself on it)


def rotation_from_vector(omega: Tensor) -> Tensor:
    """(..., 3, 3) Rodrigues rotation of axis-angle vectors ``omega`` (..., 3); near 0 (the
    start of every refinement) sin θ / θ and (1 − cos θ) / θ² by their series, so the gradient
    is finite there."""
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]
    k = torch.zeros(*omega.shape[:-1], 3, 3, dtype=omega.dtype, device=omega.device)
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -omega[..., 2], omega[..., 1], -omega[..., 0]
    k = k - k.transpose(-1, -2)
    small = theta2 < 1e-4
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    a = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(theta) / theta)
    b = torch.where(
        small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(theta)) / (theta * theta)
    )
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + a * k + b * (k @ k)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    """u × v over the last axis (written out: faster than ``torch.linalg.cross`` here)."""
    u0, u1, u2 = u.unbind(-1)
    v0, v1, v2 = v.unbind(-1)
    return torch.stack([u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0], dim=-1)


def region_normals(region: RegionModel, alpha_id: Tensor, alpha_exp: Tensor) -> Tensor:
    """(S, M, R, 3) unit area-weighted vertex normals, in the model's frame, of the region's shapes
    for identities ``alpha_id`` (S, k_id) and expressions ``alpha_exp`` (S, M, k_exp)."""
    edges = region.edge_mean[:, None] + torch.einsum("etck,sk->estc", region.edge_id, alpha_id)
    edges = edges[:, :, None] + torch.einsum("etck,smk->esmtc", region.edge_exp, alpha_exp)
    face = _cross(edges[0], edges[1])  # (S, M, T, 3), length twice the area, outward
    corners = region.triangles.T.reshape(-1)  # every face's normal to each of its three corners
    s, m, t = face.shape[:3]
    n = face.new_zeros(s, m, region.mean.shape[0], 3).index_add(-2, corners, face.repeat(1, 1, 3, 1))
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-9)


def sh_basis(normals: Tensor) -> Tensor:
    """(..., 4) order-1 real spherical harmonics (up to constants) of unit normals (..., 3)."""
    return torch.cat([torch.ones_like(normals[..., :1]), normals], dim=-1)


def cauchy(r2: Tensor, c2: Tensor) -> Tensor:
    """Cauchy loss of squared residuals ``r2`` at squared scale ``c2``, in units of ``c2``: ~r²/c² near 0."""
    return torch.log1p(r2 / c2)


def solve_appearance(
    colours: Tensor,
    basis: Tensor,
    weights: Tensor,
    albedo: Tensor,
    iterations: int = 2,
    mirror: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-vertex albedo shared over a subject's images, and each image's per-channel shading.

    colours (S, M, V, 3) linear RGB, basis (S, M, V, n) the normals' SH (and any colour field), weights (S, M, V) (0 for
    unseen samples and padded images), albedo (S, V, 3) the previous solution (warm start),
    mirror (V,) if given: each sample's mirror image, whose albedo it shares (pooled least squares).
    Returns (albedo (S, V, 3), shading coefficients (S, M, n, 3)). Alternating least squares."""
    s, m, v, n = basis.shape
    eye = 1e-4 * torch.eye(n, dtype=colours.dtype, device=colours.device)
    # as batched matrix products over (S·M) with the samples contracted (the costly axis)
    b = basis.reshape(s * m, v, n)
    bb = torch.cat([b * b[..., i : i + 1] for i in range(n)], dim=-1)  # (S·M, V, n²): b_i b_j per sample
    wc = (weights[..., None] * colours).reshape(s * m, v, 3)
    w = weights.reshape(s * m, v, 1)
    for _ in range(iterations):
        # shading given albedo: per image and channel, min Σ w (a·(b·l) − c)²
        a = albedo[:, None].expand(s, m, v, 3).reshape(s * m, v, 3)
        lhs = ((w * a * a).transpose(1, 2) @ bb).reshape(s, m, 3, n, n) + eye
        rhs = ((wc * a).transpose(1, 2) @ b).reshape(s, m, 3, n)
        light = _solve_spd(lhs, rhs).transpose(-1, -2)  # (S, M, n, 3)
        shade = (b @ light.reshape(s * m, n, 3)).reshape(s, m, v, 3)
        # albedo given shading: per vertex and channel, over the images that see it
        num = (wc.reshape(s, m, v, 3) * shade).sum(1)
        den = (weights[..., None] * shade * shade).sum(1)
        if mirror is not None:  # one albedo for a point and its mirror image: their equations pooled
            num, den = num + num[:, mirror], den + den[:, mirror]
        albedo = albedo_step(num, den, albedo)
    return albedo, light


def albedo_step(num: Tensor, den: Tensor, previous: Tensor) -> Tensor:
    """Each point's least-squares albedo ``num / den`` (S, V, 3), where ``den`` is its squared
    shading summed over the images that see it; ``previous`` where ``den`` is below a thousandth
    of the subject's median. A point the shading leaves (nearly) dark in every image says nothing
    about its albedo: its colour over its tiny shading would be a runaway value that then
    dominates the shading's least squares (on real photos it made those normal equations singular
    in float32 and failed the shard; on the demo's renders at most one point in a solve falls
    below the floor)."""
    typical = torch.nanmedian(torch.where(den > 0, den, torch.nan), dim=1).values  # (S, 3)
    floor = (1e-3 * torch.nan_to_num(typical, nan=0.0)).clamp_min(1e-9)[:, None]
    return torch.where(den > floor, num / torch.maximum(den, floor), previous)


def _solve_spd(lhs: Tensor, rhs: Tensor) -> Tensor:
    """``lhs⁻¹ rhs`` for a batch of symmetric positive semi-definite systems (..., n, n), (..., n);
    an element whose matrix is singular in its precision gets the least-squares solution (the
    pseudo-inverse) rather than failing the batch."""
    x, info = torch.linalg.solve_ex(lhs, rhs[..., None])
    bad = info != 0
    if bool(bad.any()):
        x = x.clone()
        x[bad] = torch.linalg.pinv(lhs[bad], hermitian=True) @ rhs[bad][..., None]
    return x[..., 0]


def project(
    points: Tensor, rotation: Tensor, scale: Tensor, translation: Tensor, inv_distance: Tensor | None = None
) -> Tensor:
    """(..., n, 2) window pixels of model points (..., n, 3): ``t + f (R X)_x``, ``t_y − f (R X)_y``
    (the fit's scaled-orthographic camera), or with ``inv_distance`` ρ = 1/D (...) a pinhole D mm in
    front of the origin of the same magnification ``f`` there: each offset times 1 / (1 − ρ (R X)_z)."""
    cam = points @ rotation.transpose(-1, -2)
    f = scale[..., None]
    if inv_distance is not None:
        f = f / (1 - inv_distance[..., None] * cam[..., 2])
    return torch.stack(
        [translation[..., None, 0] + f * cam[..., 0], translation[..., None, 1] - f * cam[..., 1]], dim=-1
    )
