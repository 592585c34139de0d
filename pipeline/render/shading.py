"""Shading in torch (differentiable in normals, albedo, positions and light parameters).

- Lambertian under spherical-harmonics lighting (Ramamoorthi & Hanrahan 2001): the irradiance at
  unit normal ``n`` is ``sum_i A_l(i) Y_i(n) L_i`` over the 9 real SH functions of bands 0-2, with
  the Lambertian kernel's band factors ``A_0 = pi``, ``A_1 = 2 pi / 3``, ``A_2 = pi / 4``;
  ``L`` (B, 9, 3) per colour channel. ``L = [1/(pi Y_0), 0, ...]`` lights every normal with 1.
- Phong with an ambient term and point lights (the synth renderer's model, in torch).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

# real SH constants of bands 0, 1, 2 (the order of sh_basis below)
_Y0 = 0.5 / math.sqrt(math.pi)
_Y1 = math.sqrt(3.0 / (4.0 * math.pi))
_Y2 = 0.5 * math.sqrt(15.0 / math.pi)
_Y20 = 0.25 * math.sqrt(5.0 / math.pi)
_Y22 = 0.25 * math.sqrt(15.0 / math.pi)
BAND_FACTORS = (math.pi, *(2.0 * math.pi / 3.0,) * 3, *(math.pi / 4.0,) * 5)


def sh_basis(normals: Tensor) -> Tensor:
    """(..., 3) unit normals -> (..., 9) real SH values: Y00; Y1-1, Y10, Y11; Y2-2, Y2-1, Y20, Y21, Y22."""
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    return torch.stack(
        [
            torch.full_like(x, _Y0),
            _Y1 * y,
            _Y1 * z,
            _Y1 * x,
            _Y2 * x * y,
            _Y2 * y * z,
            _Y20 * (3.0 * z * z - 1.0),
            _Y2 * x * z,
            _Y22 * (x * x - y * y),
        ],
        dim=-1,
    )


def sh_irradiance(normals: Tensor, coefficients: Tensor) -> Tensor:
    """Irradiance (B, ..., 3) at unit ``normals`` (B, ..., 3) under SH lighting ``coefficients`` (B, 9, 3)."""
    basis = sh_basis(normals) * normals.new_tensor(BAND_FACTORS)
    flat = basis.reshape(basis.shape[0], -1, 9)
    return (flat @ coefficients).reshape(*normals.shape[:-1], 3)


def lambertian_sh(normals: Tensor, albedo: Tensor, coefficients: Tensor) -> Tensor:
    """Linear RGB (B, ..., 3): ``albedo`` times the SH irradiance at ``normals``."""
    return albedo * sh_irradiance(normals, coefficients)


def phong(
    points: Tensor,
    normals: Tensor,
    albedo: Tensor,
    light_positions: Tensor,
    light_colours: Tensor,
    ambient: Tensor,
    specular: Tensor,
    shininess: float,
    view: Tensor | None = None,
    gloss: Tensor | None = None,
    visibility: Tensor | None = None,
) -> Tensor:
    """Linear RGB (B, m, 3) of surface points (B, m, 3) in the camera frame with unit normals and
    albedo, lit by point lights (B, L, 3) of colours (B, L, 3), ``ambient`` (B, 3), ``specular``
    (B,); ``view`` (B, m, 3) unit directions to the viewer, +z (orthographic) by default; ``gloss``
    (B, m) scales the specular term per point (hair is less shiny than skin); ``visibility``
    (B, m, L) in [0, 1] is how much of each light reaches each point (cast shadows; 1 = lit)."""
    if view is None:
        view = torch.zeros_like(points)
        view[..., 2] = 1.0
    out = albedo * ambient[:, None, :]
    for k in range(light_positions.shape[1]):
        ldir = light_positions[:, k, None, :] - points
        ldir = ldir / ldir.norm(dim=-1, keepdim=True)
        ndl = (normals * ldir).sum(dim=-1)
        diffuse = ndl.clamp(min=0.0)
        refl = 2.0 * ndl[..., None] * normals - ldir
        spec = (refl * view).sum(dim=-1).clamp(min=0.0) ** shininess * (ndl > 0)
        if gloss is not None:
            spec = spec * gloss
        if visibility is not None:
            diffuse = diffuse * visibility[..., k]
            spec = spec * visibility[..., k]
        colour = light_colours[:, k, None, :]
        out = out + albedo * diffuse[..., None] * colour + specular[:, None, None] * spec[..., None] * colour
    return out
