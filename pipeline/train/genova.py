"""Genova et al. (CVPR 2018) unsupervised losses, through the project's differentiable renderer.

- **loopback**: the predicted face (the morphable model's shape of the predicted α, colours taken
  from the input crop) is rendered under a random pose and lighting into a crop framed like the
  trainset's (SphereFace's five points), encoded again, and must give the same coefficients back
  (normalised units; the first prediction is the target, its gradient stopped). Optionally the
  render wears another input's colours and a directional light (so only its shape and shading
  tell the coefficients), and its gradient can be kept from the prediction (docs/render.md);
- **multiview_identity**: renders of the prediction at a few yaws, aligned as dlib's face network
  expects (its 150x150 chip), must look like the input's person to that frozen network:
  ``1 - cos(e_render, e_input)`` averaged over the views;
- **batch_distribution**: :func:`pipeline.train.losses.batch_distribution_loss` (the predicted
  coefficients in prior units have batch mean 0 and variance 1).

Appearance: the default model has no albedo basis, so a render takes per-vertex colours sampled
from the input crop (:mod:`pipeline.render.appearance`): the input's pose is estimated from its
68 landmarks and the predicted shape's landmark vertices (scaled orthographic, closed form), the
visible vertices take the crop's colour there, the hidden ones the mean of the visible. The
colours carry the input's own light and are not an albedo, so renders use a flat light
(``multiview_identity``) or a mild random one (``loopback``). Renders go over a mid-grey background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.fit.camera import estimate_camera, rotation_from_euler_deg
from pipeline.imaging.align import CROP_HEIGHT, CROP_WIDTH, REFERENCE_POINTS
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.morphable_model import MorphableModel
from pipeline.render.appearance import vertex_colours
from pipeline.render.camera import orthographic
from pipeline.render.interpolate import triangle_ids
from pipeline.render.renderer import Orthographic, SHLighting, render, vertex_normals
from pipeline.render.shading import BAND_FACTORS, sh_basis

Tensor = torch.Tensor
CHIP = 150  # dlib's face chip side
CHIP_PADDING = 0.25
BACKGROUND = 0.2  # linear grey behind renders (~0.48 in sRGB)


@dataclass(frozen=True)
class GenovaSettings:
    """The weights and random ranges of ``stages.train`` (genova_* keys)."""

    loopback_weight: float
    identity_weight: float
    batch_distribution_weight: float
    views_yaw_deg: tuple[float, ...]
    loopback_yaw_deg: float
    loopback_pitch_deg: float
    loopback_light: float
    appearance: str = "sampled"  # or "flat": every vertex the visible mean colour
    loopback_texture: str = "own"  # or "shuffled": each loopback render wears another input's colours
    loopback_directional: float = 0.0  # share of the loopback light from a random direction
    loopback_through_render: bool = True  # False: the render is of the prediction with its gradient stopped

    @classmethod
    def from_params(cls, p: dict) -> GenovaSettings:
        return cls(
            float(p["genova_loopback_weight"]),
            float(p["genova_identity_weight"]),
            float(p["genova_batch_distribution_weight"]),
            tuple(float(v) for v in p["genova_views_yaw_deg"]),
            float(p["genova_loopback_yaw_deg"]),
            float(p["genova_loopback_pitch_deg"]),
            float(p["genova_loopback_light"]),
            str(p.get("genova_appearance", "sampled")),
            str(p.get("genova_loopback_texture", "own")),
            float(p.get("genova_loopback_directional", 0.0)),
            bool(p.get("genova_loopback_through_render", True)),
        )


def five_points(points68: Tensor) -> Tensor:
    """(B, 68, d) -> (B, 5, d): eye centres, nose tip, mouth corners (SphereFace's five points)."""
    named = IBUG68.named
    return torch.stack(
        [
            points68[:, IBUG68.group("right_eye")].mean(1),
            points68[:, IBUG68.group("left_eye")].mean(1),
            points68[:, named["nose_tip"]],
            points68[:, named["right_mouth_corner"]],
            points68[:, named["left_mouth_corner"]],
        ],
        dim=1,
    )


def similarity_2d(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity (Umeyama 1991) taking ``src`` (B, k, 2) onto ``dst`` (B, k, 2):
    scale (B,), rotation (B, 2, 2) with det +1, translation (B, 2); ``dst ≈ s A src + t``."""
    ms, md = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    xs, xd = src - ms, dst - md
    cov = xd.transpose(1, 2) @ xs / src.shape[1]
    u, sv, vt = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u @ vt))
    diag = torch.ones_like(sv)
    diag[:, 1] = d
    a = u @ torch.diag_embed(diag) @ vt
    var = (xs * xs).sum(-1).mean(1)
    s = (sv * diag).sum(-1) / var.clamp(min=1e-12)
    t = md[:, 0] - s[:, None] * (a @ ms[:, 0, :, None])[..., 0]
    return s, a, t


def aligned_camera(rotation: Tensor, points: Tensor, target: Tensor) -> Orthographic:
    """A scaled-orthographic camera viewing from ``rotation`` (B, 3, 3) whose image of the model
    ``points`` (B, k, 3) lies on ``target`` (B, k, 2) pixels in the least-squares sense (the
    similarity becomes the camera's scale, translation and a turn about its axis)."""
    c = points @ rotation.transpose(1, 2)
    p = torch.stack([c[..., 0], -c[..., 1]], -1)
    s, a, t = similarity_2d(p, target)
    flip = torch.tensor([1.0, -1.0], dtype=a.dtype, device=a.device)
    b = a * flip[:, None] * flip[None, :]  # F A F: the image turn as a turn of the camera frame
    r3 = torch.eye(3, dtype=a.dtype, device=a.device).repeat(len(a), 1, 1)
    r3[:, :2, :2] = b
    return Orthographic(r3 @ rotation, s, t)


def chip_affine(points: np.ndarray) -> np.ndarray:
    """(2, 3) affine map from image pixels to dlib's 150x150 face chip of a face with these 68
    landmarks (``get_face_chip_details``, padding 0.25; what :func:`dlib.get_face_chip` samples)."""
    import dlib

    pts = np.asarray(points, np.float64).reshape(-1, 2)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    rect = dlib.rectangle(int(lo[0]), int(lo[1]), int(np.ceil(hi[0])), int(np.ceil(hi[1])))
    parts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in pts])
    d = dlib.get_face_chip_details(dlib.full_object_detection(rect, parts), CHIP, CHIP_PADDING)
    r = d.rect
    tl, tr, br = (
        np.array(p, np.float64) for p in ((r.left(), r.top()), (r.right(), r.top()), (r.right(), r.bottom()))
    )
    centre = 0.5 * (tl + br)
    rot = np.array([[np.cos(d.angle), -np.sin(d.angle)], [np.sin(d.angle), np.cos(d.angle)]])
    src = np.stack([rot @ (p - centre) + centre for p in (tl, tr, br)])
    dst = np.array([[0.0, 0.0], [CHIP - 1.0, 0.0], [CHIP - 1.0, CHIP - 1.0]])
    m = np.linalg.solve(np.c_[src, np.ones(3)], dst)  # (3, 2): [x y 1] @ m = chip
    return m.T


def warp_to_chip(images: Tensor, affines: np.ndarray) -> Tensor:
    """Images (B, 3, H, W) sampled into chips (B, 3, 150, 150) through image->chip ``affines`` (B, 2, 3)."""
    b, _, h, w = images.shape
    inv = []
    for m in affines:
        full = np.vstack([m, [0.0, 0.0, 1.0]])
        inv.append(np.linalg.inv(full)[:2])
    inv_t = torch.as_tensor(np.stack(inv), dtype=images.dtype, device=images.device)  # chip -> image
    ys, xs = torch.meshgrid(
        torch.arange(CHIP, dtype=images.dtype, device=images.device),
        torch.arange(CHIP, dtype=images.dtype, device=images.device),
        indexing="ij",
    )
    chip_xy = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3)
    img_xy = chip_xy @ inv_t.transpose(1, 2)  # (B, 150*150, 2)
    grid = torch.stack([2 * img_xy[..., 0] / (w - 1) - 1, 2 * img_xy[..., 1] / (h - 1) - 1], -1)
    out = torch.nn.functional.grid_sample(images, grid.reshape(b, CHIP, CHIP, 2), align_corners=True)
    return out


def flat_light(
    batch: int, dtype: torch.dtype, device: torch.device, gain: Tensor | None = None
) -> SHLighting:
    """SH lighting whose irradiance is ``gain`` (B,) (default 1) for every normal."""
    coeff = torch.zeros(batch, 9, 3, dtype=dtype, device=device)
    y0 = float(sh_basis(torch.tensor([[0.0, 0.0, 1.0]]))[0, 0])
    level = 1.0 / (BAND_FACTORS[0] * y0)
    coeff[:, 0, :] = level if gain is None else level * gain[:, None]
    return SHLighting(coeff)


def directional_light(gain: Tensor, share: float, direction: Tensor) -> SHLighting:
    """Order-1 SH lighting whose irradiance at unit normal ``n`` is
    ``gain (1 − share/2 + share/2 · n·l)`` for unit ``direction`` l (B, 3) in the camera frame: from
    ``gain`` where the surface faces the light down to ``gain (1 − share)`` where it faces away, so
    a render's shading shows its shape."""
    b = gain.shape[0]
    coeff = flat_light(b, gain.dtype, gain.device, gain * (1.0 - share / 2)).coefficients.clone()
    y1 = float(sh_basis(torch.tensor([[0.0, 1.0, 0.0]]))[0, 1])  # Y_1,-1 at +y: the band-1 constant
    amp = gain * share / 2 / (BAND_FACTORS[1] * y1)
    for index, axis in ((1, 1), (2, 2), (3, 0)):  # sh_basis orders band 1 as y, z, x
        coeff[:, index, :] = (amp * direction[:, axis])[:, None]
    return SHLighting(coeff)


def to_srgb(linear: Tensor) -> Tensor:
    """Linear RGB -> sRGB in [0, 1] (gamma 2.2, as synth)."""
    return linear.clamp(1e-6, 1.0) ** (1 / 2.2)


class GenovaLosses(nn.Module):
    """The two rendering losses of Genova et al. for a batch of predicted coefficients."""

    def __init__(self, model: MorphableModel, identity_net: nn.Module, settings: GenovaSettings) -> None:
        super().__init__()
        self.settings = settings
        n = model.n_vertices
        self.register_buffer("mean", torch.from_numpy(model.mean.reshape(n, 3).astype(np.float32)))
        self.register_buffer(
            "id_basis", torch.from_numpy(model.id_basis.reshape(n, 3, -1).astype(np.float32))
        )
        self.register_buffer(
            "exp_basis", torch.from_numpy(model.exp_basis.reshape(n, 3, -1).astype(np.float32))
        )
        self.register_buffer("triangles", torch.from_numpy(np.asarray(model.triangles, np.int64)))
        self.landmarks = model.landmarks_of(IBUG68)  # the crops' landmarks are iBUG-68
        self.identity_net = identity_net.eval()
        for p in self.identity_net.parameters():
            p.requires_grad_(False)

    def shapes(self, alpha_id: Tensor, alpha_exp: Tensor) -> Tensor:
        """(B, n, 3) mm: the morphable model's shapes of the coefficients."""
        return (
            self.mean
            + torch.einsum("nck,bk->bnc", self.id_basis, alpha_id.float())
            + torch.einsum("nck,bk->bnc", self.exp_basis, alpha_exp.float())
        )

    def input_colours(self, image: Tensor, landmarks: Tensor, vertices: Tensor) -> Tensor:
        """(B, n, 3) linear colours of the input crops (B, 3, H, W in [-1, 1]) at the vertices of
        ``vertices`` posed as the crops' ``landmarks`` (B, 68, 2) say; hidden ones the visible mean
        (every vertex that mean with ``appearance`` flat)."""
        with torch.no_grad():
            b, _, h, w = image.shape
            lm3 = self.landmarks.locate(vertices).double().cpu().numpy()
            pts = landmarks.double().cpu().numpy()
            x = np.moveaxis(lm3, -1, 1)  # (B, 3, L)
            v = np.stack([pts[..., 0], -pts[..., 1]], axis=1)  # y up
            f, rot, t = estimate_camera(x, v, np.ones(pts.shape[:2]))
            rot_t = torch.as_tensor(rot, dtype=vertices.dtype, device=vertices.device)
            scale = torch.as_tensor(f, dtype=vertices.dtype, device=vertices.device)
            trans = torch.as_tensor(
                np.stack([t[:, 0], -t[:, 1]], -1), dtype=vertices.dtype, device=vertices.device
            )
            screen = orthographic(vertices, rot_t, scale, trans)
            tri_id = triangle_ids(screen, self.triangles, h, w)
            normals = vertex_normals(vertices, self.triangles) @ rot_t.transpose(1, 2)
            linear = ((image.permute(0, 2, 3, 1) + 1.0) / 2.0).clamp(0, 1) ** 2.2
            # 4 mm: the screen's depth is the camera-frame z in mm (synth's landmark tolerance)
            colours, visible = vertex_colours(linear, screen, self.triangles, tri_id, normals, 4.0)
            vis = visible[..., None].to(colours.dtype)
            mean = (colours * vis).sum(1, keepdim=True) / vis.sum(1, keepdim=True).clamp(min=1.0)
            if self.settings.appearance == "flat":
                return mean.expand_as(colours).contiguous()
            return torch.where(visible[..., None], colours, mean.expand_as(colours))

    def loopback(
        self,
        encoder: nn.Module,
        vertices: Tensor,
        colours: Tensor,
        target: tuple[Tensor, Tensor],
        rng: torch.Generator,
    ) -> Tensor:
        """Mean squared difference (normalised units) between the coefficients of a random-pose,
        random-light render of the prediction and the prediction itself (gradient stopped)."""
        s = self.settings
        b = vertices.shape[0]
        if not s.loopback_through_render:
            # the encoder alone learns to give back the coefficients of a render it is shown; the
            # prediction is not moved to make its render easier to read
            vertices, colours = vertices.detach(), colours.detach()
        yaw = (torch.rand(b, generator=rng) * 2 - 1) * s.loopback_yaw_deg
        pitch = (torch.rand(b, generator=rng) * 2 - 1) * s.loopback_pitch_deg
        rot = torch.as_tensor(
            np.stack(
                [rotation_from_euler_deg(float(y), float(p), 0.0) for y, p in zip(yaw, pitch, strict=True)]
            ),
            dtype=vertices.dtype,
            device=vertices.device,
        )
        ref = torch.as_tensor(REFERENCE_POINTS, dtype=vertices.dtype, device=vertices.device).expand(b, 5, 2)
        cam = aligned_camera(rot, five_points(self.landmarks.locate(vertices)).detach(), ref)
        gain = (1.0 + (torch.rand(b, generator=rng) * 2 - 1) * s.loopback_light).to(vertices.dtype)
        if s.loopback_directional > 0:  # a light from the front, up to 55° off the view axis
            d = torch.cat([(torch.rand(b, 2, generator=rng) * 2 - 1), torch.ones(b, 1)], dim=1)
            d = (d / d.norm(dim=1, keepdim=True)).to(vertices.dtype).to(vertices.device)
            light = directional_light(gain.to(vertices.device), s.loopback_directional, d)
        else:
            light = flat_light(b, vertices.dtype, vertices.device, gain.to(vertices.device))
        if s.loopback_texture == "shuffled" and b > 1:
            # another input's colours: the texture no longer names the prediction, so the encoder
            # must read the render's shape to give its coefficients back
            colours = colours.roll(1, dims=0)
        bg = torch.full(
            (b, CROP_HEIGHT, CROP_WIDTH, 3), BACKGROUND, dtype=vertices.dtype, device=vertices.device
        )
        out = render(vertices, self.triangles, colours, cam, light, CROP_HEIGHT, CROP_WIDTH, bg)
        x = to_srgb(out.image).permute(0, 3, 1, 2) * 2.0 - 1.0
        c_id, c_exp = encoder(x)
        t_id, t_exp = (t.detach() for t in target)
        return torch.cat([c_id - t_id, c_exp - t_exp], dim=1).pow(2).mean()

    def multiview_identity(
        self, vertices: Tensor, colours: Tensor, image: Tensor, landmarks: Tensor
    ) -> Tensor:
        """Mean over the views of ``1 - cos`` between the frozen network's embeddings of a render
        of the prediction and of the input crop (both in dlib's chip alignment)."""
        b = vertices.shape[0]
        lm = landmarks.double().cpu().numpy()
        with torch.no_grad():
            chips = warp_to_chip((image + 1.0) / 2.0, np.stack([chip_affine(p) for p in lm]))
            target = self.identity_net(chips * 255.0)
        losses = []
        for yaw in self.settings.views_yaw_deg:
            rot = torch.as_tensor(
                rotation_from_euler_deg(yaw, 0.0, 0.0), dtype=vertices.dtype, device=vertices.device
            )
            rot = rot.expand(b, 3, 3)
            with torch.no_grad():  # where the view's 68 points fall, for the chip's alignment
                c = self.landmarks.locate(vertices) @ rot.transpose(1, 2)
                img_pts = torch.stack([c[..., 0], -c[..., 1]], -1)
                img_pts = img_pts - img_pts.amin(1, keepdim=True) + 10.0
                affines = np.stack([chip_affine(p) for p in img_pts.double().cpu().numpy()])
                m = torch.as_tensor(affines, dtype=vertices.dtype, device=vertices.device)
                chip_pts = img_pts @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
            cam = aligned_camera(rot, self.landmarks.locate(vertices).detach(), chip_pts)
            light = flat_light(b, vertices.dtype, vertices.device)
            bg = torch.full((b, CHIP, CHIP, 3), BACKGROUND, dtype=vertices.dtype, device=vertices.device)
            out = render(vertices, self.triangles, colours, cam, light, CHIP, CHIP, bg)
            emb = self.identity_net(to_srgb(out.image).permute(0, 3, 1, 2) * 255.0)
            losses.append(1.0 - torch.nn.functional.cosine_similarity(emb, target, dim=1))
        return torch.stack(losses).mean()
