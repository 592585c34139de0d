"""The refine stage: its image model recovers a known face from renders, its windows keep pixel
positions, its table is a fits table, and the export takes its labels when it is on."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
import torch

from pipeline.config.manifest import load_manifest
from pipeline.config.schemas import SchemaError, load_schema
from pipeline.core.registry import input_tables
from pipeline.landmarks.scheme import IBUG68
from pipeline.refine.photometric import project, region_normals, rotation_from_vector, solve_appearance
from pipeline.refine.region import region_model
from pipeline.refine.solve import RefineBatch, RefineSettings, refine, visible_samples
from pipeline.refine.windows import face_window


def test_rotation_vector_is_rodrigues_and_smooth_at_zero():
    omega = torch.tensor(
        [[1.3, -0.9, 0.6], [0.0, 0.0, 0.0], [1e-3, 0.0, 0.0]], dtype=torch.float64, requires_grad=True
    )
    R = rotation_from_vector(omega)
    theta = omega[0].detach().norm()
    axis = omega[0].detach() / theta
    k = torch.tensor(
        [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64
    )
    exact = torch.eye(3, dtype=torch.float64) + torch.sin(theta) * k + (1 - torch.cos(theta)) * (k @ k)
    assert torch.allclose(R[0], exact, atol=1e-12)
    assert torch.allclose(R[1], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(
        R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3), atol=1e-12
    )
    R.sum().backward()
    assert torch.isfinite(omega.grad).all()


def test_the_pinhole_is_the_fits_formula_and_zero_inverse_distance_is_orthographic():
    pts = torch.tensor([[[10.0, 20.0, 30.0]]])
    R, f, t = torch.eye(3)[None], torch.tensor([2.0]), torch.tensor([[100.0, 50.0]])
    ortho = project(pts, R, f, t)
    assert torch.allclose(ortho, torch.tensor([[[120.0, 10.0]]]))
    assert torch.allclose(project(pts, R, f, t, torch.tensor([0.0])), ortho)
    d = 500.0  # u = t + f (R X)_xy D / (D − (R X)_z), y negated (schemas/fits.yaml)
    assert torch.allclose(
        project(pts, R, f, t, torch.tensor([1 / d])),
        torch.tensor([[[100 + 20 * d / 470, 50 - 40 * d / 470]]]),
    )


def test_the_blur_is_a_normalised_gaussian_in_each_direction():
    from pipeline.refine.solve import _blur

    img = torch.zeros(1, 41, 41, 3)
    img[0, 20, 10, 1] = 1.0
    out = _blur(img, 2.0)[0, :, :, 1]
    assert (
        float(out.sum()) == pytest.approx(1.0, abs=1e-5) and float(_blur(img, 2.0)[..., 0].abs().max()) == 0
    )
    x = torch.arange(41.0)
    assert float((out.sum(0) * x).sum()) == pytest.approx(10.0, abs=1e-4)  # x stays, y stays
    assert float((out.sum(1) * x).sum()) == pytest.approx(20.0, abs=1e-4)
    assert float((out.sum(1) * (x - 20) ** 2).sum()) == pytest.approx(4.0, rel=0.02)  # σ² along y


def test_albedo_and_shading_are_recovered_in_closed_form():
    g = torch.Generator().manual_seed(0)
    v = 200
    normals = torch.nn.functional.normalize(
        torch.randn(1, 3, v, 3, generator=g) + torch.tensor([0, 0, 2.0]), dim=-1
    )
    basis = torch.cat([torch.ones_like(normals[..., :1]), normals], -1)
    albedo = 0.2 + 0.6 * torch.rand(1, v, 3, generator=g)
    light = torch.tensor([[0.8, 0.7, 0.6], [0.1, 0.0, -0.1], [0.2, 0.3, 0.1], [0.3, 0.3, 0.3]])
    light = torch.stack([light, light * 0.8 + 0.05, light * 1.2])[None]  # three images, three lights
    colours = albedo[:, None] * torch.einsum("smvi,smic->smvc", basis, light)
    a, lt = solve_appearance(colours, basis, torch.ones(1, 3, v), albedo * 0 + 0.5, iterations=30)
    pred = a[:, None] * torch.einsum("smvi,smic->smvc", basis, lt)
    assert torch.allclose(pred, colours, atol=1e-3)  # up to the product's scale, exact


def test_a_point_left_dark_by_the_shading_keeps_its_albedo_and_a_singular_system_does_not_fail():
    """Real photos at half size (session 10): a point the lights barely reached took colour /
    shading as its albedo, a runaway value that made a shading system singular in float32 and
    failed the refine shard. Such a point keeps its previous albedo, and a singular system in a
    batch gets its least-squares solution instead of failing the others."""
    from pipeline.refine.photometric import _solve_spd, albedo_step

    den = torch.tensor([[[1.0, 2.0, 1.0], [0.9, 1.5, 1.1], [1e-6, 1e-6, 1e-6], [0.0, 0.0, 0.0]]])
    num = torch.tensor([[[0.5, 0.6, 0.4], [0.45, 0.3, 0.55], [3e-4, 2e-4, 1e-4], [0.0, 0.0, 0.0]]])
    previous = torch.full((1, 4, 3), 0.7)
    a = albedo_step(num, den, previous)
    assert torch.allclose(a[:, :2], num[:, :2] / den[:, :2])  # well lit: least squares
    assert torch.equal(a[:, 2:], previous[:, 2:])  # dark (300 without the floor) or unseen: kept
    rng = torch.Generator().manual_seed(0)
    m = torch.randn(3, 4, 4, generator=rng)
    lhs = m @ m.transpose(-1, -2) + torch.eye(4)
    lhs[1] = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 5.0))  # rank one: singular
    rhs = torch.randn(3, 4, generator=rng)
    x = _solve_spd(lhs, rhs)
    assert torch.allclose(x[[0, 2]], torch.linalg.solve(lhs[[0, 2]], rhs[[0, 2]]), atol=1e-5)
    assert torch.allclose(x[1], torch.linalg.pinv(lhs[1]) @ rhs[1], atol=1e-5)


def test_a_per_image_colour_gain_over_the_face_is_explained_only_with_the_colour_field():
    from pipeline.refine.solve import colour_field

    g = torch.Generator().manual_seed(1)
    v = 300
    normals = torch.nn.functional.normalize(
        torch.randn(1, 2, v, 3, generator=g) + torch.tensor([0, 0, 2.0]), dim=-1
    )
    coords = torch.rand(v, 2, generator=g) * 2 - 1
    sh = torch.cat([torch.ones_like(normals[..., :1]), normals], -1)
    albedo = 0.2 + 0.6 * torch.rand(1, v, 3, generator=g)
    light = torch.tensor([[0.8, 0.7, 0.6], [0.1, 0.0, -0.1], [0.2, 0.3, 0.1], [0.3, 0.3, 0.3]])
    # the second image's skin is warmer towards its left cheek (make-up): light linear across the face
    shade = torch.einsum("smvi,ic->smvc", sh, light)
    shade[0, 1] += coords[:, :1] * torch.tensor([0.15, 0.0, -0.1])
    colours = albedo[:, None] * shade
    ones = torch.ones(1, 2, v)
    assert colour_field(coords, 0).shape == (v, 0) and colour_field(coords, 2).shape == (v, 5)

    def fitted_error(order: int) -> float:
        field = colour_field(coords, order).expand(1, 2, v, -1)
        basis = torch.cat([sh, field], -1)
        a, lt = solve_appearance(colours, basis, ones, albedo * 0 + 0.5, iterations=40)
        return float((a[:, None] * torch.einsum("smvi,smic->smvc", basis, lt) - colours).abs().max())

    # the shading alone cannot make two images of one albedo differ across the face like that
    assert fitted_error(0) > 0.01 and fitted_error(1) < 0.1 * fitted_error(0)


def test_with_one_image_a_wrong_shape_leaves_a_residual_only_when_the_albedo_is_mirrored():
    g = torch.Generator().manual_seed(3)
    half = 200
    # a face of mirrored vertex pairs (x, y, z) ↔ (−x, y, z) and one albedo per pair
    right = torch.nn.functional.normalize(
        torch.randn(half, 3, generator=g) + torch.tensor([0.8, 0, 2.0]), dim=-1
    )
    normals = torch.cat([right, right * torch.tensor([-1.0, 1.0, 1.0])])[None, None]
    mirror = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
    albedo = (0.2 + 0.6 * torch.rand(1, half, 3, generator=g)).repeat(1, 2, 1)
    light = torch.tensor(
        [[0.7, 0.6, 0.5], [0.4, 0.3, 0.2], [0.1, 0.1, 0.0], [0.3, 0.3, 0.3]]
    )  # from the side
    sh = torch.cat([torch.ones_like(normals[..., :1]), normals], -1)
    colours = albedo[:, None] * (sh @ light)
    ones = torch.ones(1, 1, 2 * half)

    def residual(n: torch.Tensor, tie: torch.Tensor | None) -> float:
        basis = torch.cat([torch.ones_like(n[..., :1]), n], -1)
        a, lt = solve_appearance(colours, basis, ones, torch.full_like(albedo, 0.5), 60, mirror=tie)
        return float(((a[:, None] * (basis @ lt) - colours) ** 2).mean())

    # a wrong shape: the right half's normals tilted towards the light, the left half's not
    tilted = normals.clone()
    tilted[..., :half, :] = torch.nn.functional.normalize(
        tilted[..., :half, :] + torch.tensor([0.6, 0.0, 0.0]), dim=-1
    )
    assert residual(normals, mirror) < 1e-6  # the true shape: explained with the tied albedo
    assert residual(tilted, None) < 1e-6  # a free albedo explains any shape from one image
    assert residual(tilted, mirror) > 300 * max(residual(normals, mirror), 1e-8)


def test_the_regions_normals_are_its_shapes_area_weighted_vertex_normals(default_model):
    from pipeline.render.renderer import vertex_normals

    region, _ = region_model(default_model, IBUG68, 3.0)
    g = torch.Generator().manual_seed(0)
    a_id = 2 * torch.randn(2, region.id_basis.shape[-1], generator=g)
    a_exp = 2 * torch.randn(2, 3, region.exp_basis.shape[-1], generator=g)
    shapes = region.mean + torch.einsum("rck,sk->src", region.id_basis, a_id)
    shapes = shapes[:, None] + torch.einsum("rck,smk->smrc", region.exp_basis, a_exp)
    direct = vertex_normals(shapes.reshape(6, -1, 3), region.triangles).reshape(2, 3, -1, 3)
    normals = region_normals(region, a_id, a_exp)
    assert torch.allclose(normals, direct, atol=1e-4)
    # outward: the face's normals point at a frontal camera (+z), and the expression moves them
    assert (normals[..., 2] > 0).float().mean() > 0.9
    assert not torch.allclose(normals[:, 0], normals[:, 1], atol=1e-3)


def test_more_forehead_adds_samples_above_the_brows_only(default_model):
    base, ids = region_model(default_model, IBUG68, 3.0, forehead_mm=0.0)
    more, ids_more = region_model(default_model, IBUG68, 3.0, forehead_mm=20.0)
    mean = default_model.mean.reshape(-1, 3)
    points = default_model.landmarks_of(IBUG68).locate(mean)
    jaw_top = points[IBUG68.group("jaw")][[0, -1], 1].min()  # the outline's sides rise from here
    added = np.setdiff1d(ids_more, ids)
    assert added.size > 30 and np.isin(ids, ids_more).mean() > 0.9
    assert (mean[added, 1] > jaw_top).all()  # forehead and temples, not cheeks or chin
    assert more.coords.abs().max() <= 1.0 + 1e-6


def test_a_window_keeps_pixel_positions_at_any_image_size():
    img = np.zeros((200, 300, 3), np.uint8)
    img[120, 140] = 255  # one bright pixel at x 140, y 120
    pts = np.array([[100.0, 80.0], [180.0, 160.0]])
    for factor in (1, 2):
        big = np.kron(img, np.ones((factor, factor, 1), np.uint8)) if factor > 1 else img
        centre = (np.array([140.0, 120.0]) + 0.5) * factor - 0.5  # the pixel's centre at this size
        fw = face_window(big, pts * factor + (factor - 1) / 2, 64, 0.1)
        win, w = fw.pixels, fw.window
        assert fw.inside.all()  # the face and its margin lie well inside the image
        f, t = w.to_window(1.0, centre)
        peak = np.unravel_index(np.argmax(win.sum(-1)), win.shape[:2])
        assert abs(peak[1] - t[0]) <= 0.6 and abs(peak[0] - t[1]) <= 0.6
        assert f == pytest.approx(64 / (80 * factor * 1.2))
        f2, t2 = w.to_image(f, t)
        assert f2 == pytest.approx(1.0) and np.allclose(t2, centre)


def test_a_face_cut_by_the_photos_edge_is_seen_only_inside_the_photo(default_model):
    # a tight crop: the face's left part and forehead lie beyond the photo's edges
    img = np.full((100, 100, 3), 128, np.uint8)
    pts = np.array([[-20.0, -10.0], [80.0, 90.0]])
    cut = face_window(img, pts, 64, 0.1)
    k, (ox, oy) = cut.window.scale, cut.window.offset
    u = ox + np.arange(64) / k  # image x of each window column
    v = oy + np.arange(64) / k
    assert not cut.inside[:, u < 0].any() and not cut.inside[v < 0, :].any()
    assert not cut.inside[v > 99, :].any()  # the window also leaves the photo at the bottom
    inner = (v > 3) & (v < 96), (u > 3) & (u < 96)
    assert cut.inside[np.ix_(*inner)].all()  # the photo itself, but its 2-window-px border
    # the refinement's visibility follows the mask: no sample is taken from the padded border
    model = default_model
    region, ids = region_model(model, IBUG68, 3.0)
    mean = model.mean.reshape(-1, 3)[ids]
    scale = 0.3
    xy = np.stack([32 + scale * mean[:, 0], 32 - scale * mean[:, 1]], 1)
    inside = np.ones((64, 64), bool)
    inside[:, :32] = False  # the left half of the window is border
    batch = RefineBatch(
        windows=torch.zeros(1, 1, 64, 64, 3),
        inside=torch.tensor(inside)[None, None],
        valid=torch.ones(1, 1, dtype=torch.bool),
        alpha_id=torch.zeros(1, model.k_id),
        alpha_exp=torch.zeros(1, 1, model.k_exp),
        rotation=torch.eye(3)[None, None],
        scale=torch.tensor([[scale]]),
        translation=torch.tensor([[[32.0, 32.0]]]),
        inv_distance=torch.zeros(1, 1),
    )
    seen = visible_samples(region, batch)[0, 0].numpy() > 0
    batch.inside[:] = True
    seen_uncut = visible_samples(region, batch)[0, 0].numpy() > 0
    on_photo = np.round(xy[:, 0]) >= 32
    assert on_photo.any() and (~on_photo).any()
    assert (seen == (seen_uncut & on_photo)).all()


def test_one_image_subjects_are_refined_only_with_the_mirrored_albedo():
    from pipeline.config.manifest import ManifestError

    ok = load_manifest(overrides={"stages.refine.min_images": 1}).stage_params("refine")
    assert ok["min_images"] == 1 and ok["albedo_symmetry"] is True
    with pytest.raises(
        ManifestError, match=r"stages.refine.albedo_symmetry: expected true \(min_images 1 needs"
    ):
        load_manifest(overrides={"stages.refine.min_images": 1, "stages.refine.albedo_symmetry": False})
    with pytest.raises(ManifestError, match="stages.refine.min_images"):
        load_manifest(overrides={"stages.refine.min_images": 0})


def test_refined_fits_are_fits_with_their_own_columns():
    fits, refined = load_schema("fits"), load_schema("refined_fits")
    assert refined.columns[: len(fits.columns)] == fits.columns
    assert set(refined.columns) - set(fits.columns) == {
        "refined",
        "photo_samples",
        "photo_residual_start",
        "photo_residual",
    }
    assert refined.is_a("fits") and not fits.is_a("refined_fits")


def test_a_schema_repeating_its_bases_column_is_refused(tmp_path, monkeypatch):
    import pipeline.config.schemas as schemas

    (tmp_path / "fits.yaml").write_text((schemas.SCHEMA_DIR / "fits.yaml").read_text())
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nversion: 1\nextends: fits\ncolumns:\n  - {name: scale, type: float32}\n"
    )
    monkeypatch.setattr(schemas, "SCHEMA_DIR", tmp_path)
    schemas.load_schema.cache_clear()
    try:
        with pytest.raises(
            SchemaError,
            match=r"bad.yaml: columns\[0\]: column 'scale' declared twice \(schema 'fits' declares it\)",
        ):
            schemas.load_schema("bad")
    finally:
        schemas.load_schema.cache_clear()


def test_the_export_takes_the_refined_fits_when_the_refinement_is_on():
    m = load_manifest()
    assert input_tables("export", m)["fit"] == "fit"
    on = m.with_overrides({"stages.refine.enabled": True})
    assert input_tables("export", on)["fit"] == "refine"
    named = m.with_overrides({"stages.refine.enabled": True, "stages.export.fits_table": "fit"})
    assert input_tables("export", named)["fit"] == "fit"


def _renders(model, alpha_id: np.ndarray, yaws: list[float], size: int = 160):
    """Scaled-orthographic renders of one textured face under a different light each (the
    refinement's own image model: a flattering case), as sRGB uint8, with their cameras."""
    from pipeline.fit.camera import rotation_from_euler_deg
    from pipeline.render.renderer import Orthographic, SHLighting, render
    from pipeline.synthetic.render import to_srgb8

    verts = model.shape(alpha_id * model.id_std).astype(np.float32)
    xyz = model.mean.reshape(-1, 3)
    # a texture with edges (what photo-consistency registers: brows, eyes, lips, skin marks), and
    # not periodic: a grid of squares would register as well one square over
    rng = np.random.default_rng(5)
    centres = rng.uniform(xyz.min(0), xyz.max(0), size=(120, 3))
    d2 = ((xyz[:, None, :2] - centres[None, :, :2]) ** 2).sum(-1)
    spots = (d2.min(1) < rng.uniform(9.0, 30.0, 120)[d2.argmin(1)]).astype(np.float64)[:, None]
    albedo = 0.3 + 0.35 * spots * np.array([1.0, 0.8, 0.7])
    n = len(yaws)
    R = np.stack([rotation_from_euler_deg(np.array(y), np.array(4.0), np.array(0.0)) for y in yaws])
    sh = np.zeros((n, 9, 3), np.float32)
    sh[:, 0] = 0.9
    sh[:, 1:4] = np.array([[0.3, 0.2, -0.2], [-0.25, 0.1, 0.3], [0.1, -0.3, 0.2], [0.2, 0.3, 0.1]])[
        :n, :, None
    ]
    scale, centre = 0.8, np.array([size / 2, size / 2 + 5])
    cam = Orthographic(
        torch.tensor(R, dtype=torch.float32),
        torch.full((n,), scale),
        torch.tensor(centre, dtype=torch.float32).repeat(n, 1),
    )
    out = render(
        torch.tensor(verts).repeat(n, 1, 1),
        torch.as_tensor(model.triangles),
        torch.tensor(albedo, dtype=torch.float32).repeat(n, 1, 1),
        cam,
        SHLighting(torch.tensor(sh)),
        size,
        size,
        torch.full((n, size, size, 3), 0.2),
    )
    return [to_srgb8(im) for im in out.image.numpy()], R, scale, centre


def test_the_refinement_recovers_a_face_its_landmark_fit_missed(default_model):
    from pipeline.evaluate.identity_curve import all_vertex_error, identity_shape

    model = default_model
    truth = np.random.default_rng(3).normal(size=model.k_id) * 1.2
    yaws = [-30.0, -10.0, 15.0, 35.0]
    images, R, scale, centre = _renders(model, truth, yaws)
    region, ids = region_model(model, IBUG68, 3.0)
    start = 0.3 * truth  # the landmark fit's shrunk identity; poses off by a little
    mean = model.mean.reshape(-1, 3)[ids]
    windows, inside, f, t = [], [], [], []
    for j, im in enumerate(images):
        cam = mean @ R[j].T
        pts = np.stack([centre[0] + scale * cam[:, 0], centre[1] - scale * cam[:, 1]], 1)
        cut = face_window(im, pts, 96, 0.1)
        fw, tw = cut.window.to_window(scale * 1.02, centre + np.array([1.0, -1.0]))
        windows.append(cut.pixels), inside.append(cut.inside), f.append(fw), t.append(tw)
    m = len(images)
    batch = RefineBatch(
        windows=torch.tensor(np.stack(windows))[None],
        inside=torch.tensor(np.stack(inside))[None],
        valid=torch.ones(1, m, dtype=torch.bool),
        alpha_id=torch.tensor(start, dtype=torch.float32)[None],
        alpha_exp=torch.zeros(1, m, model.k_exp),
        rotation=torch.tensor(R, dtype=torch.float32)[None],
        scale=torch.tensor(f, dtype=torch.float32)[None],
        translation=torch.tensor(np.stack(t), dtype=torch.float32)[None],
        inv_distance=torch.zeros(1, m),
    )
    seen = visible_samples(region, batch)
    assert 0.5 < float(seen.mean()) < 1.0  # the turned images hide part of the face
    result = refine(region, batch, RefineSettings(fit_distance=False, identity_prior_weight=1.0))
    truth_shape = identity_shape(model, truth * model.id_std)
    before = all_vertex_error(identity_shape(model, start * model.id_std), truth_shape)
    after = all_vertex_error(identity_shape(model, result.alpha_id[0].numpy() * model.id_std), truth_shape)
    assert after < 0.95 * before, (before, after)
    assert float(result.residual_after.mean()) < float(result.residual_before.mean())
    # with the photometric term off nothing pulls the identity from where it started
    still = refine(region, batch, RefineSettings(fit_distance=False, photo_weight=0.0))
    assert torch.allclose(still.alpha_id, batch.alpha_id, atol=1e-4)


@pytest.mark.slow
def test_a_build_refines_when_enabled_and_the_export_takes_the_refined_labels(tmp_path):
    from pipeline import api
    from pipeline.core.tables import RunTables

    data = tmp_path / "faces"
    api.synth(data, subjects=3, images_per_subject=3, seed=4, workers=1, yaw_range=[-30, 30])
    run = tmp_path / "run"
    report = api.build(
        run, dataset="synthetic", root=str(data), landmarks="dlib", scheduler="sync", progress=False
    )
    assert report.ok
    st = api.status(run)
    assert st["refine"]["off"] and st["refine"]["done"] == st["refine"]["shards"]
    fits = RunTables(run).table("fits")
    refined = pa.concat_tables(pa.parquet.read_table(p) for p in sorted((run / "refine").glob("*.parquet")))
    assert refined.column("image_id").to_pylist() == fits.column("image_id").to_pylist()
    assert not any(refined.column("refined").to_pylist())
    trainset = RunTables(run).table("trainset")
    by_image = {r["image_id"]: r["alpha_id"] for r in fits.to_pylist()}
    assert all(np.allclose(r["alpha_id"], by_image[r["image_id"]]) for r in trainset.to_pylist())

    on = {"stages.refine.enabled": True, "stages.refine.steps": 10}
    out = api.run_stages(run, ["refine", "export"], overrides=on, scheduler="sync", progress=False)
    assert not out.get("failed_shards")
    m = load_manifest(overrides=on)
    tables = RunTables(run, m)
    assert tables.name("fits") == "refine"
    refined = tables.table("fits")
    first_fit, first_refined = (
        pa.parquet.read_schema(next((run / d).glob("*.parquet"))).metadata for d in ("fit", "refine")
    )
    for key in (b"morphset.model.sha256", b"morphset.fit.identity"):  # carried on for readers of either table
        assert first_refined[key] == first_fit[key]
    assert first_refined[b"morphset.stage_params_hash"] != first_fit[b"morphset.stage_params_hash"]
    rows = refined.to_pylist()
    done = [r for r in rows if r["refined"]]
    fitted = [r for r in fits.to_pylist() if r["failure_reason"] is None and r["used"]]
    subjects = {r["subject"] for r in fitted}
    multi = {s for s in subjects if sum(r["subject"] == s for r in fitted) >= 2}
    assert {r["subject"] for r in done} == multi and multi
    for r in done:
        assert r["photo_samples"] > 100 and r["photo_residual"] > 0 and r["camera_distance_mm"] > 0
        before = by_image[r["image_id"]]
        assert not np.allclose(r["alpha_id"], before)  # the identity moved, and by a little
        assert np.linalg.norm(np.subtract(r["alpha_id"], before)) < np.linalg.norm(before) + 1e3
    trainset = tables.table("trainset")
    params = json.loads(
        pa.parquet.read_schema(next((run / "export" / "data").glob("*.parquet"))).metadata[
            b"morphset.build.params"
        ]
    )
    assert params["refine"]["enabled"] is True  # the card's build parameters name the refinement
    by_image = {r["image_id"]: r["alpha_id"] for r in rows}
    assert all(np.allclose(r["alpha_id"], by_image[r["image_id"]]) for r in trainset.to_pylist())

    # one identity per image (evaluation sets): nothing to make agree, nothing refined
    alone = {**on, "stages.fit.identity": "image"}
    out = api.run_stages(run, ["fit", "refine"], overrides=alone, scheduler="sync", progress=False)
    assert not out.get("failed_shards")
    assert not any(RunTables(run, load_manifest(overrides=alone)).table("fits").column("refined").to_pylist())
