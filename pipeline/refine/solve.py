"""The refinement loop: from the landmark fit, a subject's shared identity, and each image's
expression and pose, moved to make its images agree (:mod:`pipeline.refine.photometric`), held
by the landmark fit's own inner landmarks and the priors. Batched over subjects (padded), torch
on CPU or CUDA; a coarse-to-fine schedule of blurs gives the descent a wide basin first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.refine.photometric import (
    RegionModel,
    cauchy,
    project,
    region_normals,
    rotation_from_vector,
    sh_basis,
    solve_appearance,
)
from pipeline.render.appearance import sample_image
from pipeline.render.raster import rasterize_batch

Tensor = torch.Tensor


@dataclass(frozen=True)
class RefineSettings:
    """``stages.refine``'s numbers (their meaning: ``schemas/manifest/stage.refine.schema.json``)."""

    blur_px: tuple[float, ...] = (4.0, 2.0, 1.0)  # window pixels, one level each, coarse to fine
    steps: int = 40  # Adam steps per level
    learning_rate: float = 0.02
    translation_step_px: float = 1.0  # the shift's Adam step at the coarsest blur (window px), ∝ blur after
    photo_weight: float = 0.15  # the photometric term per sample, against one landmark's squared error
    landmark_sigma_mm: float = 8.0  # how far the inner landmarks may move from the landmark fit's
    identity_prior_weight: float = 30.0  # on the identity's change from the landmark fit
    expression_prior_weight: float = 1.0
    identity_from_level: int = 2  # levels before this one move pose and expression only
    cauchy_scale: float = 1.0  # the Cauchy scale, in units of the level's median residual
    fit_distance: bool = True  # each image's pinhole distance is an unknown (from the batch's start)
    colour_field_order: int = 0  # per-image colour gain over the face: 0 none, 1 linear, 2 quadratic
    albedo_symmetry: bool = True  # a point and its mirror image share one albedo


@dataclass
class RefineBatch:
    """A padded batch of S subjects with up to M images each (window pixels, σ-unit coefficients)."""

    windows: Tensor  # (S, M, P, P, 3) linear RGB
    inside: Tensor  # (S, M, P, P) bool: the window pixel shows the image (not its padded border)
    valid: Tensor  # (S, M) bool
    alpha_id: Tensor  # (S, k_id) in units of the model's std
    alpha_exp: Tensor  # (S, M, k_exp)
    rotation: Tensor  # (S, M, 3, 3)
    scale: Tensor  # (S, M) window px per mm
    translation: Tensor  # (S, M, 2) window px
    inv_distance: Tensor  # (S, M) 1 / the pinhole's distance at the start (mm⁻¹); 0 = scaled orthographic


@dataclass
class RefineResult:
    alpha_id: Tensor
    alpha_exp: Tensor
    rotation: Tensor
    scale: Tensor
    translation: Tensor
    # (S, M) the robust photometric residual per seen sample (0 where none), at the finest blur and
    # the start's Cauchy scale both times: comparable
    residual_before: Tensor
    residual_after: Tensor
    inv_distance: Tensor  # (S, M) mm⁻¹
    seen: Tensor  # (S, M) samples the image shows


def _shapes(region: RegionModel, a_id: Tensor, a_exp: Tensor) -> Tensor:
    """(S, M, R, 3) region vertices."""
    ident = region.mean + torch.einsum("rck,sk->src", region.id_basis, a_id)
    return ident[:, None] + torch.einsum("rck,smk->smrc", region.exp_basis, a_exp)


def _landmarks(region: RegionModel, a_id: Tensor, a_exp: Tensor) -> Tensor:
    ident = region.landmark_mean + torch.einsum("lck,sk->slc", region.landmark_id, a_id)
    return ident[:, None] + torch.einsum("lck,smk->smlc", region.landmark_exp, a_exp)


def visible_samples(region: RegionModel, batch: RefineBatch) -> Tensor:
    """(S, M, V) float: the sample faces the camera, is the nearest surface at its pixel in the
    landmark fit's geometry (the one rasteriser), and that pixel shows the image
    (``batch.inside``); fixed for the refinement."""
    s, m = batch.valid.shape
    p = batch.windows.shape[2]
    with torch.no_grad():
        verts = _shapes(region, batch.alpha_id, batch.alpha_exp)
        cam = verts @ batch.rotation.transpose(-1, -2)
        facing = (region_normals(region, batch.alpha_id, batch.alpha_exp) @ batch.rotation.transpose(-1, -2))[
            ..., 2
        ]
        xy = project(verts, batch.rotation, batch.scale, batch.translation, batch.inv_distance)
        valid = torch.nonzero(batch.valid, as_tuple=True)
        screen = torch.cat([xy, cam[..., 2:]], dim=-1)[valid].double()  # (N, V, 3) the fitted images
        depth = rasterize_batch(screen, region.triangles, p, p).depth  # on the batch's device
        px = screen[..., :2].round().long().clamp(0, p - 1)
        image = torch.arange(len(screen), device=screen.device)[:, None]
        inside = ((screen[..., :2] >= 0) & (screen[..., :2] <= p - 1)).all(dim=-1)
        front = facing[valid] > 0.2
        near = screen[..., 2] >= depth[image, px[..., 1], px[..., 0]] - 2.0  # mm
        shown = batch.inside[valid][image, px[..., 1], px[..., 0]]
        out = torch.zeros(s, m, region.mean.shape[0], dtype=torch.float32, device=batch.windows.device)
        out[valid] = (inside & front & near & shown).float()
    return out


def _blur_rows(t: Tensor, kernel: Tensor) -> Tensor:
    """``t`` (..., W) convolved along its last axis (reflect padding)."""
    r = kernel.numel() // 2
    rows = torch.nn.functional.pad(t.reshape(-1, 1, t.shape[-1]), (r, r), mode="reflect")
    return torch.nn.functional.conv1d(rows, kernel[None, None]).reshape(t.shape)


def _blur(images: Tensor, sigma: float) -> Tensor:
    """(N, P, P, 3) Gaussian-blurred, separably."""
    if sigma <= 0:
        return images
    r = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    t = _blur_rows(images.permute(0, 3, 1, 2), k)  # along x
    return _blur_rows(t.transpose(-1, -2), k).transpose(-1, -2).permute(0, 2, 3, 1)  # along y


@dataclass
class Geometry:
    """A batch's shapes and cameras (window pixels, σ-unit coefficients)."""

    alpha_id: Tensor  # (S, k_id)
    alpha_exp: Tensor  # (S, M, k_exp)
    rotation: Tensor  # (S, M, 3, 3)
    scale: Tensor  # (S, M)
    translation: Tensor  # (S, M, 2)
    inv_distance: Tensor  # (S, M) 1 / the pinhole's distance (mm⁻¹); 0 = scaled orthographic


def colour_field(coords: Tensor, order: int) -> Tensor:
    """(V, n) the monomials of the samples' frontal face coordinates (V, 2) of degree 1 to
    ``order``: a per-image colour gain that varies smoothly over the face (make-up, tan, a soft
    shadow) as extra columns of the shading basis."""
    u, v = coords[:, 0:1], coords[:, 1:2]
    cols = [u, v] if order >= 1 else []
    if order >= 2:
        cols += [u * u, u * v, v * v]
    return torch.cat(cols, dim=1) if cols else coords[:, :0]


def residuals(
    region: RegionModel,
    images: Tensor,
    seen: Tensor,
    g: Geometry,
    albedo: Tensor | None,
    field_order: int = 0,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """((S, M, V) squared colour residuals of the samples, the albedo solved for them)."""
    s, m = seen.shape[:2]
    verts = _shapes(region, g.alpha_id, g.alpha_exp)
    normals = region_normals(region, g.alpha_id, g.alpha_exp) @ g.rotation.transpose(-1, -2)
    xy = project(verts, g.rotation, g.scale, g.translation, g.inv_distance)
    colours = sample_image(images, xy.reshape(s * m, -1, 2)).reshape(s, m, -1, 3)
    basis = sh_basis(normals)
    if field_order > 0:
        field = colour_field(region.coords, field_order).to(basis.dtype)
        basis = torch.cat([basis, field.expand(s, m, *field.shape)], dim=-1)
    with torch.no_grad():
        if albedo is None:
            albedo = (seen[..., None] * colours).sum(1) / seen.sum(1).clamp_min(1.0)[..., None]
        albedo, light = solve_appearance(
            colours, basis, seen, albedo, mirror=region.mirror if symmetric else None
        )
    pred = albedo[:, None] * (basis @ light)
    return ((colours - pred) ** 2).sum(-1), albedo


def median_scale(r2: Tensor, seen: Tensor) -> Tensor:
    """(S, 1, 1) each subject's median squared residual over its seen samples."""
    out = [
        r2[i][seen[i] > 0].median() if bool((seen[i] > 0).any()) else r2.new_tensor(1.0)
        for i in range(r2.shape[0])
    ]
    return torch.stack(out).detach().clamp_min(1e-8)[:, None, None]


def refine(region: RegionModel, batch: RefineBatch, settings: RefineSettings) -> RefineResult:
    """The refined shapes and cameras of a batch (see the module docstring)."""
    s, m = batch.valid.shape
    p = batch.windows.shape[2]
    dev, dt = batch.windows.device, batch.windows.dtype
    seen = visible_samples(region, batch) * batch.valid[..., None]
    n_seen = seen.sum(-1).clamp_min(1.0)
    perspective = settings.fit_distance
    rho0 = batch.inv_distance
    with torch.no_grad():
        start_lm = project(
            _landmarks(region, batch.alpha_id, batch.alpha_exp),
            batch.rotation,
            batch.scale,
            batch.translation,
            rho0,
        )
    # the distance moves as log(D / D_start); an orthographic start (ρ = 0) stays orthographic
    d_id = torch.zeros_like(batch.alpha_id, requires_grad=True)
    d_exp = torch.zeros_like(batch.alpha_exp, requires_grad=True)
    omega = torch.zeros(s, m, 3, dtype=dt, device=dev, requires_grad=True)
    log_f = torch.zeros(s, m, dtype=dt, device=dev, requires_grad=True)
    shift = torch.zeros(s, m, 2, dtype=dt, device=dev, requires_grad=True)
    log_d = torch.zeros(s, m, dtype=dt, device=dev, requires_grad=perspective)  # log of D / D_start
    params = [d_id, d_exp, omega, log_f, *([log_d] if perspective else [])]
    lm_sigma2 = (settings.landmark_sigma_mm * batch.scale[..., None]) ** 2  # (S, M, 1) window px²
    flat = batch.windows.reshape(s * m, p, p, 3)
    appearance = (settings.colour_field_order, settings.albedo_symmetry)

    def geometry() -> Geometry:
        return Geometry(
            alpha_id=batch.alpha_id + d_id,
            alpha_exp=batch.alpha_exp + d_exp,
            rotation=rotation_from_vector(omega) @ batch.rotation,
            scale=batch.scale * torch.exp(log_f),
            translation=batch.translation + shift,
            inv_distance=rho0 * torch.exp(-log_d),
        )

    def objective(images: Tensor, c2: Tensor, albedo: Tensor | None) -> tuple[Tensor, Tensor]:
        g = geometry()
        r2, albedo = residuals(region, images, seen, g, albedo, *appearance)
        photo_per_image = (seen * cauchy(r2, c2)).sum(-1) / n_seen  # (S, M) mean per seen sample
        lm = project(
            _landmarks(region, g.alpha_id, g.alpha_exp), g.rotation, g.scale, g.translation, g.inv_distance
        )
        lm_term = (((lm - start_lm) ** 2).sum(-1) / lm_sigma2).sum(-1) * batch.valid
        # the identity is held to the landmark fit's (which already weighed its prior against the
        # landmarks), the expression to the model's prior
        prior = settings.identity_prior_weight * (d_id**2).sum(-1) + settings.expression_prior_weight * (
            (g.alpha_exp**2).sum(-1) * batch.valid
        ).sum(-1)
        photo = settings.photo_weight * region.mean.shape[0] * photo_per_image
        return (photo + lm_term).sum() + prior.sum(), albedo

    blurred = {b: _blur(flat, b) for b in set(settings.blur_px)}  # each blur once
    # the residual before and after, both at the finest blur and the start's scale (comparable)
    finest = blurred[settings.blur_px[-1]]
    with torch.no_grad():
        r2, _ = residuals(region, finest, seen, geometry(), None, *appearance)
        c2_start = median_scale(r2, seen) * settings.cauchy_scale**2
        before = (seen * cauchy(r2, c2_start)).sum(-1) / n_seen
    for level, blur in enumerate(settings.blur_px):
        images = blurred[blur]
        with torch.no_grad():
            r2, albedo = residuals(region, images, seen, geometry(), None, *appearance)
        c2 = median_scale(r2, seen) * settings.cauchy_scale**2
        # the shift's step shrinks with the blur: a wide basin first, then settling to the detail
        coarsest = max(settings.blur_px)
        shift_step = settings.translation_step_px * (blur / coarsest if coarsest > 0 else 1.0)
        groups: list[dict[str, Any]] = [{"params": params}, {"params": [shift], "lr": shift_step}]
        opt = torch.optim.Adam(groups, lr=settings.learning_rate)
        for _ in range(settings.steps):
            opt.zero_grad()
            loss, albedo = objective(images, c2, albedo)
            loss.backward()
            if level < settings.identity_from_level:
                d_id.grad = None
            opt.step()
    with torch.no_grad():
        g = geometry()
        r2, _ = residuals(region, finest, seen, g, None, *appearance)
        after = (seen * cauchy(r2, c2_start)).sum(-1) / n_seen
        return RefineResult(
            alpha_id=g.alpha_id,
            alpha_exp=g.alpha_exp,
            rotation=g.rotation,
            scale=g.scale,
            translation=g.translation,
            residual_before=before,
            residual_after=after,
            inv_distance=g.inv_distance,
            seen=seen.sum(-1),
        )
