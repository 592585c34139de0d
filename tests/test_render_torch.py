"""The differentiable renderer (pipeline/render): gradients checked against finite differences in
double precision, forward values against closed forms and a brute-force z-buffer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.render import camera as cam
from pipeline.render.interpolate import barycentrics, interpolate, perspective_correct, triangle_ids
from pipeline.render.raster import rasterize, rasterize_batch
from pipeline.render.renderer import Orthographic, PhongLighting, SHLighting, render, vertex_normals
from pipeline.render.shading import BAND_FACTORS, lambertian_sh, phong, sh_basis
from pipeline.render.silhouette import soft_silhouette

D = torch.float64  # gradients are checked in double precision
MODEL = {"k_id": 6, "k_exp": 3, "seed": 3, "spacing_mm": 7.0}  # the toy model (conftest.py)


def scene(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two triangles on a 12 x 10 screen at generic (non-grid) positions; screen (1, 4, 3)."""
    rng = np.random.default_rng(seed)
    pts = np.array([[1.3, 1.7, 5.0], [9.6, 2.2, 4.0], [2.4, 10.1, 3.0], [8.7, 9.4, 6.0]])
    pts[:, :2] += rng.uniform(-0.2, 0.2, (4, 2))
    return torch.tensor(pts, dtype=D)[None], torch.tensor([[0, 1, 2], [1, 3, 2]])


def _brute_force_zbuffer(
    verts: np.ndarray, tris: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel centre against every triangle: ((H, W) nearest triangle or -1, (H, W, 3) weights);
    the nearest wins, the lowest id among equally near ones."""
    owner, weights = np.full((h, w), -1), np.zeros((h, w, 3))
    best = np.full((h, w), -np.inf)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    for t, (i, j, k) in enumerate(tris):
        (ax, ay, az), (bx, by, bz), (cx, cy, cz) = verts[i], verts[j], verts[k]
        area = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
        if abs(area) <= 1e-12:
            continue
        inv = 1.0 / area  # multiplied, as the rasteriser does, so exact depth ties stay ties
        wa = ((bx - xx) * (cy - yy) - (cx - xx) * (by - yy)) * inv
        wb = ((cx - xx) * (ay - yy) - (ax - xx) * (cy - yy)) * inv
        wc = 1 - wa - wb
        depth = wa * az + wb * bz + wc * cz
        wins = (wa >= -1e-9) & (wb >= -1e-9) & (wc >= -1e-9) & (depth > best)
        owner[wins], best[wins], weights[wins] = t, depth[wins], np.stack([wa, wb, wc], -1)[wins]
    return owner, weights


def test_triangle_ids_and_weights_are_those_of_a_brute_force_zbuffer():
    rng = np.random.default_rng(1)
    verts = rng.uniform(0, 30, (40, 3))
    verts[:10, :2] = np.round(verts[:10, :2])  # corners on pixel centres: edges through them
    tris = rng.integers(0, 40, (60, 3))
    tris = tris[(tris[:, 0] != tris[:, 1]) & (tris[:, 1] != tris[:, 2]) & (tris[:, 0] != tris[:, 2])]
    owner, want_w = _brute_force_zbuffer(verts, tris, 32, 32)
    screen, triangles = torch.tensor(verts, dtype=D)[None], torch.tensor(tris)
    tid = triangle_ids(screen, triangles, 32, 32)
    np.testing.assert_array_equal(tid[0].numpy(), owner)
    w, covered = barycentrics(screen, triangles, tid)
    np.testing.assert_array_equal(covered[0].numpy(), owner >= 0)
    np.testing.assert_allclose(w[0].numpy(), want_w, atol=1e-9)
    frags = rasterize(verts, tris, 32, 32, cull_backfaces=False)  # the NumPy view of the same
    np.testing.assert_array_equal(frags.pixel, np.flatnonzero(owner >= 0))
    np.testing.assert_array_equal(frags.triangle, owner[owner >= 0])


def test_a_batch_is_rasterised_as_each_of_its_images_alone():
    """Images pooled into one pass (flat triangle ids across the batch) give each image's own
    result, with a per-triangle cull mask, overlapping and off-screen triangles."""
    rng = np.random.default_rng(2)
    screens = rng.uniform(-8, 40, (3, 50, 3))
    screens[2, :, :2] *= 3  # large triangles: the row-span path
    tris = rng.integers(0, 50, (90, 3))
    cull = rng.random(90) < 0.5
    batch = rasterize_batch(torch.tensor(screens), torch.tensor(tris), 30, 36, cull)
    for b in range(3):
        alone = rasterize_batch(torch.tensor(screens[b : b + 1]), torch.tensor(tris), 30, 36, cull)
        assert torch.equal(batch.triangle[b], alone.triangle[0])
        assert torch.equal(batch.bary[b], alone.bary[0]) and torch.equal(batch.depth[b], alone.depth[0])
        assert int((alone.triangle[0] >= 0).sum()) > 0


def test_interpolation_gradients_match_finite_differences():
    screen, tris = scene()
    tid = triangle_ids(screen, tris, 12, 10)
    attrs = torch.rand(1, 4, 2, dtype=D, requires_grad=True)
    xy = screen[..., :2].clone().requires_grad_(True)

    def f(xy: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        s = torch.cat([xy, screen[..., 2:]], dim=-1)
        w, _ = barycentrics(s, tris, tid)
        return interpolate(attrs, tris, tid, w)

    assert torch.autograd.gradcheck(f, (xy, attrs), eps=1e-6, atol=1e-6)


def test_perspective_correct_interpolation_recovers_the_3d_point():
    """Interpolating camera-frame positions with perspective-correct weights gives the surface
    point whose projection is the pixel centre (screen-space weights do not)."""
    verts = torch.tensor([[[-40.0, -30.0, 10.0], [45.0, -35.0, -60.0], [0.0, 50.0, 30.0]]], dtype=D)
    rot = torch.eye(3, dtype=D)[None]
    args = (rot, torch.zeros(1, 3, dtype=D), torch.tensor([400.0], dtype=D), torch.tensor([300.0], dtype=D),
            torch.tensor([[32.0, 32.0]], dtype=D))  # fmt: skip
    screen, w = cam.perspective(verts, *args)
    tris = torch.tensor([[0, 1, 2]])
    tid = triangle_ids(screen, tris, 64, 64)
    weights, covered = barycentrics(screen, tris, tid)
    pc = perspective_correct(weights, w, tris, tid)
    pts = interpolate(verts, tris, tid, pc)[covered]
    back, _ = cam.perspective(pts[None], *args)
    ys, xs = torch.nonzero(covered[0], as_tuple=True)
    np.testing.assert_allclose(back[0, :, 0].numpy(), xs.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(back[0, :, 1].numpy(), ys.double().numpy(), atol=1e-6)
    flat = interpolate(verts, tris, tid, weights)[covered]
    assert not np.allclose(
        cam.perspective(flat[None], *args)[0][0, :, 0].numpy(), xs.double().numpy(), atol=1e-3
    )


def test_shading_gradients_match_finite_differences():
    n = torch.nn.functional.normalize(torch.randn(1, 5, 3, dtype=D), dim=-1).requires_grad_(True)
    albedo = torch.rand(1, 5, 3, dtype=D, requires_grad=True)
    coeffs = torch.randn(1, 9, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambertian_sh, (n, albedo, coeffs), eps=1e-6, atol=1e-6)
    pts = (torch.randn(1, 5, 3, dtype=D) * 10).requires_grad_(True)
    lights = torch.tensor([[[200.0, 150.0, 400.0], [-300.0, 50.0, 350.0]]], dtype=D, requires_grad=True)
    colours = torch.rand(1, 2, 3, dtype=D, requires_grad=True)
    ambient, spec = torch.rand(1, 3, dtype=D, requires_grad=True), torch.rand(1, dtype=D, requires_grad=True)

    def f(pts, n, albedo, lights, colours, ambient, spec):
        return phong(
            pts, torch.nn.functional.normalize(n, dim=-1), albedo, lights, colours, ambient, spec, 5.0
        )

    assert torch.autograd.gradcheck(f, (pts, n, albedo, lights, colours, ambient, spec), eps=1e-6, atol=1e-5)


def test_phong_is_the_closed_form():
    """One point, one light, by hand: ambient + diffuse (n.l) + specular ((r.v)^s)."""
    t = lambda a: torch.tensor(np.asarray(a, np.float64), dtype=D)[None]  # noqa: E731
    albedo = np.array([[0.5, 0.4, 0.3]])
    colours = np.array([[1.0, 0.9, 0.8]])

    def phong_at(gloss=None):
        return phong(
            t([[0.0, 0.0, 0.0]]),
            t([[0.0, 0.0, 1.0]]),
            t(albedo),
            t([[0.0, 300.0, 400.0]]),  # direction (0, 0.6, 0.8): n.l = 0.8
            t(colours),
            t([0.1, 0.1, 0.1]),
            torch.tensor([0.5], dtype=D),
            4.0,
            gloss=None if gloss is None else t([gloss]),
        )[0].numpy()

    ndl = 0.8
    r_dot_v = 2 * ndl * 1.0 - 0.8  # r = 2 (n.l) n - l; v = +z
    want = albedo * 0.1 + albedo * ndl * colours + 0.5 * r_dot_v**4 * colours
    np.testing.assert_allclose(phong_at(), want, atol=1e-12)
    half = albedo * 0.1 + albedo * ndl * colours + 0.25 * r_dot_v**4 * colours
    np.testing.assert_allclose(phong_at(0.5), half, atol=1e-12)
    # SH: constant lighting L0 = 1 / (pi Y00) lights every normal with 1
    rng = np.random.default_rng(2)
    n = rng.normal(size=(50, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    alb = rng.uniform(0.2, 0.9, (50, 3))
    t = lambda a: torch.tensor(np.asarray(a), dtype=D)[None]  # noqa: E731
    coeffs = torch.zeros(1, 9, 3, dtype=D)
    coeffs[0, 0] = 1.0 / (BAND_FACTORS[0] * sh_basis(torch.tensor([0.0, 0.0, 1.0], dtype=D))[0])
    np.testing.assert_allclose(lambertian_sh(t(n), t(alb), coeffs)[0].numpy(), alb, atol=1e-12)
    assert math.isclose(BAND_FACTORS[1], 2 * math.pi / 3)


def test_the_silhouette_carries_gradient_and_matches_finite_differences():
    screen, tris = scene(3)
    tid = triangle_ids(screen, tris, 12, 10)
    xy = screen[..., :2].clone().requires_grad_(True)

    def f(xy: torch.Tensor) -> torch.Tensor:
        return soft_silhouette(torch.cat([xy, screen[..., 2:]], dim=-1), tris, tid)

    alpha = f(xy).detach()
    assert 0.0 <= float(alpha.min()) and float(alpha.max()) <= 1.0
    edge = (alpha > 0) & (alpha < 1)
    assert int(edge.sum()) > 4  # the boundary is blended, not a step
    assert torch.autograd.gradcheck(f, (xy,), eps=1e-7, atol=1e-5)
    # moving the right-hand vertices outward grows the covered area
    grow = torch.zeros_like(xy)
    grow[0, [1, 3], 0] = 1.0
    (g,) = torch.autograd.grad(f(xy).sum(), xy)
    assert float((g * grow).sum()) > 0


def test_render_a_face_mesh_end_to_end(model):
    """A toy morphable-model face, orthographic and SH-lit, then Phong-lit: an image with a blended
    silhouette, finite gradients for vertex positions, albedo and lighting."""
    verts = torch.tensor(model.mean.reshape(-1, 3), dtype=D)[None].clone().requires_grad_(True)
    tris = torch.tensor(np.asarray(model.triangles, np.int64))
    albedo = torch.full((1, verts.shape[1], 3), 0.6, dtype=D, requires_grad=True)
    ext = float(np.ptp(model.mean.reshape(-1, 3)[:, :2], axis=0).max())
    camera = Orthographic(
        torch.eye(3, dtype=D)[None],
        torch.tensor([40.0 / ext], dtype=D),
        torch.tensor([[24.0, 24.0]], dtype=D),
    )
    coeffs = torch.zeros(1, 9, 3, dtype=D)
    coeffs[0, 0], coeffs[0, 2] = 0.8, 0.3  # ambient + light from the front
    coeffs.requires_grad_(True)
    out = render(verts, tris, albedo, camera, SHLighting(coeffs), 48, 48)
    assert out.image.shape == (1, 48, 48, 3) and out.alpha.shape == (1, 48, 48)
    assert int((out.tri_id >= 0).sum()) > 200 and int(((out.alpha > 0) & (out.alpha < 1)).sum()) > 10
    out.image.sum().backward()
    for t in (verts, albedo, coeffs):
        assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().sum()) > 0
    lights = PhongLighting(
        torch.tensor([[[100.0, 100.0, 500.0]]]),
        torch.ones(1, 1, 3),
        torch.full((1, 3), 0.2),
        torch.tensor([0.2]),
    )
    lit = render(verts.detach(), tris, albedo.detach(), camera, lights, 48, 48)
    assert float(lit.image.max()) > 0.3
    n = vertex_normals(verts.detach(), tris)
    assert torch.allclose(n.norm(dim=-1), torch.ones(1, n.shape[1], dtype=D))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_render_on_cuda_matches_the_cpu(model):
    verts = torch.tensor(model.mean.reshape(-1, 3))[None]
    tris = torch.tensor(np.asarray(model.triangles, np.int64))
    camera = Orthographic(torch.eye(3)[None], torch.tensor([0.5]), torch.tensor([[24.0, 24.0]]))
    light = SHLighting(torch.rand(1, 9, 3))
    albedo = torch.full((1, verts.shape[1], 3), 0.6)
    cpu = render(verts, tris, albedo, camera, light, 48, 48)
    to = lambda x: x.cuda()  # noqa: E731
    gpu_cam = Orthographic(to(camera.rotation), to(camera.scale), to(camera.translation))
    gpu = render(to(verts), to(tris), to(albedo), gpu_cam, SHLighting(to(light.coefficients)), 48, 48)
    np.testing.assert_allclose(gpu.image.cpu().numpy(), cpu.image.numpy(), atol=1e-6)


def test_colours_sampled_at_the_vertices_are_differentiable_and_respect_occlusion(model):
    """Sampling an image at projected vertices: gradients for the image and the positions match
    finite differences; a face rendered under constant light gives its albedo back at the
    vertices it shows, and vertices behind it are not 'visible'."""
    from pipeline.render.appearance import sample_image, vertex_colours

    image = torch.rand(1, 9, 11, 2, dtype=D, requires_grad=True)
    xy = torch.tensor([[[2.3, 3.6], [7.7, 1.2], [5.5, 6.4]]], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(sample_image, (image, xy), eps=1e-6, atol=1e-6)
    # exact at pixel centres, x right and y down
    img = torch.arange(12, dtype=D).reshape(1, 3, 4, 1)
    assert sample_image(img, torch.tensor([[[3.0, 2.0], [0.0, 1.0]]], dtype=D)).flatten().tolist() == [
        11.0,
        4.0,
    ]

    verts = torch.tensor(model.mean.reshape(-1, 3), dtype=D)[None]
    tris = torch.tensor(np.asarray(model.triangles, np.int64))
    rng = np.random.default_rng(0)
    albedo = torch.tensor(rng.uniform(0.2, 0.8, (1, verts.shape[1], 3)), dtype=D)
    ext = float(np.ptp(model.mean.reshape(-1, 3)[:, :2], axis=0).max())
    camera = Orthographic(
        torch.eye(3, dtype=D)[None],
        torch.tensor([60.0 / ext], dtype=D),
        torch.tensor([[32.0, 32.0]], dtype=D),
    )
    coeffs = torch.zeros(1, 9, 3, dtype=D)
    coeffs[0, 0] = 1.0 / (BAND_FACTORS[0] * sh_basis(torch.tensor([0.0, 0.0, 1.0], dtype=D))[0])
    out = render(verts, tris, albedo, camera, SHLighting(coeffs), 64, 64)
    screen, _ = camera.project(verts)
    normals = vertex_normals(verts, tris)
    colours, visible = vertex_colours(out.image, screen, tris, out.tri_id, normals, tolerance=2.0)
    assert int(visible.sum()) > 0.3 * verts.shape[1]
    err = (colours - albedo)[visible].abs()
    assert float(err.median()) < 0.05  # a smooth random albedo, bilinear at non-grid positions
    # the same face seen from behind: its front vertices are hidden
    back = Orthographic(
        torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=D))[None], camera.scale, camera.translation
    )
    out_b = render(verts, tris, albedo, back, SHLighting(coeffs), 64, 64)
    screen_b, _ = back.project(verts)
    _, vis_b = vertex_colours(
        out_b.image, screen_b, tris, out_b.tri_id, normals @ back.rotation[0].T, tolerance=2.0
    )
    assert int((visible & vis_b).sum()) < 0.05 * int(visible.sum())
