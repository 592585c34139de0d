"""Genova et al.'s objectives (pipeline/train/genova.py): the alignments they render into, the
objective switch of the trainer, and the landmarks the data stream hands them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config.manifest import load_manifest
from pipeline.landmarks.scheme import IBUG68
from pipeline.synthetic.trainset import write_synthetic_trainset
from pipeline.train.config import validate_params
from pipeline.train.genova import aligned_camera, chip_affine, similarity_2d, warp_to_chip
from pipeline.train.loop import phase_schedule, train

MODEL = {"k_id": 8, "k_exp": 4, "seed": 0, "spacing_mm": 7.0}  # the toy model (conftest.py)


def test_the_aligned_camera_puts_the_points_where_asked():
    rng = np.random.default_rng(0)
    from pipeline.fit.camera import rotation_from_euler_deg

    rot = torch.as_tensor(np.stack([rotation_from_euler_deg(y, 10.0, -5.0) for y in (-30.0, 0.0, 25.0)]))
    pts = torch.as_tensor(rng.normal(0, 40, (3, 5, 3)))
    # targets that a similarity of the view can reach exactly: a turned, scaled, moved projection
    c = pts @ rot.transpose(1, 2)
    proj = torch.stack([c[..., 0], -c[..., 1]], -1)
    a = torch.tensor([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]], dtype=torch.float64)
    target = 1.7 * proj @ a.T + torch.tensor([40.0, 60.0], dtype=torch.float64)
    cam = aligned_camera(rot, pts, target)
    screen, _ = cam.project(pts)
    assert torch.allclose(screen[..., :2], target, atol=1e-6)
    assert torch.allclose(torch.linalg.det(cam.rotation), torch.ones(3, dtype=torch.float64))
    s, _, _ = similarity_2d(proj, target)
    assert torch.allclose(s, torch.full((3,), 1.7, dtype=torch.float64))


def test_the_chip_alignment_is_dlibs_own():
    """The image -> chip map reproduces dlib.get_face_chip on a real photo (the identity network
    sees renders and inputs aligned as it was trained)."""
    dlib = pytest.importorskip("dlib")
    from skimage import data

    from pipeline.embed.dlib_resnet import face_chip
    from pipeline.landmarks.dlib_backend import resolve_model

    img = data.astronaut()
    box = dlib.get_frontal_face_detector()(img, 1)[0]
    predictor = dlib.shape_predictor(
        str(resolve_model(load_manifest().get("models.dlib_landmarks") or {})[0])
    )
    shape = predictor(img, box)
    pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(IBUG68.points)], np.float64)
    theirs = face_chip(dlib, img, pts).astype(np.float64)
    image = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0
    ours = warp_to_chip(image, chip_affine(pts)[None])[0].permute(1, 2, 0).numpy() * 255.0
    assert np.abs(ours - theirs).mean() < 2.0  # bilinear sampling differences only (0.5 measured)


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("genova")
    write_synthetic_trainset(str(root), model, n_subjects=4, images_per_subject=4, n_shards=1, seed=0)
    return str(root)


def _identity_weights() -> str:
    from pipeline.embed.dlib_resnet import resolve_model

    return str(resolve_model(load_manifest().get("models.dlib_embedding") or {})[0])


@pytest.mark.parametrize("objective", ["genova", "liu+genova"])
def test_the_genova_objectives_train_and_log_their_terms(run, model, tmp_path, objective):
    base = {
        "width_multiplier": 0.125,
        "embedding_dim": 32,
        "batch_size": 8,
        "recon_vertices": 50,
        "torchscript": False,
        "progress": "never",
        "threads": 2,
        "epochs_phase1": 1,
        "epochs_phase2": 1,
        "epochs_phase3": 1,
        "objective": objective,
    }
    params = validate_params(base)
    # genova uses no 3D label: phases I (coefficients) and II (decoders) do not run
    assert phase_schedule(params) == ([3] if objective == "genova" else [1, 2, 3])
    result = train(run, params, model, tmp_path / "out", identity_weights=_identity_weights())
    recs = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    p3 = [r for r in recs if r["kind"] == "step" and r["phase"] == 3]
    assert p3
    for r in p3:
        assert all(np.isfinite(r[k]) for k in ("loopback", "multiview_identity", "batch_distribution"))
        assert ("recon" in r) == (objective == "liu+genova")  # genova alone: no label in the loss
    with pytest.raises(ValueError, match="needs the face network's weights"):
        train(run, params, model, tmp_path / "again")


def test_the_stream_mirrors_the_landmarks_with_the_image(run):
    from pipeline.train.data import TrainsetStream, scan_trainset

    info = scan_trainset(run)
    plain = list(TrainsetStream(info, "train", 0, 1, True, False, landmarks=True))
    flipped = list(TrainsetStream(info, "train", 0, 1, True, True, landmarks=True))
    mirrored = 0
    for a, b in zip(plain, flipped, strict=True):
        if torch.equal(a["image"], b["image"]):
            assert torch.equal(a["landmarks"], b["landmarks"])
            continue
        assert torch.equal(a["image"].flip(-1), b["image"])
        want = a["landmarks"][torch.as_tensor(IBUG68.mirror)] * torch.tensor([-1.0, 1.0]) + torch.tensor(
            [95.0, 0.0]
        )
        assert torch.allclose(b["landmarks"], want)
        mirrored += 1
    assert 0 < mirrored < len(plain)


def test_a_flat_appearance_colours_every_vertex_alike(model):
    """genova_appearance: flat gives every vertex the visible mean of the sampled colours, so
    renders of two shapes differ in geometry only."""
    from pipeline.train.genova import GenovaLosses, GenovaSettings

    params = load_manifest().stage_params("train")
    sampled = GenovaLosses(model, torch.nn.Identity(), GenovaSettings.from_params(params))
    flat = GenovaLosses(
        model, torch.nn.Identity(), GenovaSettings.from_params(params | {"genova_appearance": "flat"})
    )
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 112, 96)).astype(np.float32))
    vertices = sampled.shapes(torch.zeros(2, model.k_id), torch.zeros(2, model.k_exp))
    lm3 = sampled.landmarks.locate(vertices)
    points = torch.stack([lm3[..., 0] * 0.6 + 48, -lm3[..., 1] * 0.6 + 56], -1)  # a frontal face in the crop
    a, b = sampled.input_colours(image, points, vertices), flat.input_colours(image, points, vertices)
    assert a.std(dim=1).min() > 0.01  # sampled colours vary over the face
    assert torch.allclose(b, b[:, :1].expand_as(b))  # flat: one colour per image
    assert not torch.allclose(b[0, 0], b[1, 0])  # each image its own


def test_the_directional_loopback_light_shades_by_the_normal(model):
    from pipeline.render.shading import sh_irradiance
    from pipeline.train.genova import directional_light

    light_dir = torch.nn.functional.normalize(torch.tensor([[0.3, -0.4, 0.9]]), dim=1)
    lit = directional_light(torch.tensor([2.0]), 0.6, light_dir)
    side = torch.nn.functional.normalize(
        torch.cross(light_dir[0], torch.tensor([0.0, 0.0, 1.0]), dim=0), dim=0
    )
    normals = torch.stack([light_dir[0], -light_dir[0], side])[None]
    e = sh_irradiance(normals, lit.coefficients)[0, :, 0]
    # facing the light: the gain; facing away: gain (1 - share); side-on: halfway
    assert e.tolist() == pytest.approx([2.0, 0.8, 1.4], abs=1e-5)


@pytest.mark.parametrize("texture", ["own", "shuffled"])
def test_a_shuffled_loopback_render_wears_another_inputs_colours(model, texture):
    """genova_loopback_texture: shuffled renders each prediction in another input's colours, so
    the texture no longer tells the encoder whose coefficients to give back."""
    from pipeline.train.genova import GenovaLosses, GenovaSettings

    params = load_manifest().stage_params("train") | {"genova_loopback_texture": texture}
    losses = GenovaLosses(model, torch.nn.Identity(), GenovaSettings.from_params(params))
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(x)
            return torch.zeros(len(x), model.k_id), torch.zeros(len(x), model.k_exp)

    vertices = losses.shapes(torch.zeros(2, model.k_id), torch.zeros(2, model.k_exp))
    colours = torch.zeros(2, vertices.shape[1], 3)
    colours[0, :, 0] = 0.8  # the first input is red, the second blue
    colours[1, :, 2] = 0.8
    target = (torch.zeros(2, model.k_id), torch.zeros(2, model.k_exp))
    losses.loopback(Recorder(), vertices, colours, target, torch.Generator().manual_seed(0))
    x = seen[0]
    centre = x[:, :, 40:70, 35:60].mean(dim=(2, 3))  # (B, 3) in [-1, 1] over the face
    red_first = bool(centre[0, 0] > centre[0, 2])
    assert red_first == (texture == "own")
    assert bool(centre[1, 2] > centre[1, 0]) == (texture == "own")


@pytest.mark.parametrize("through", [True, False])
def test_the_loopback_moves_the_prediction_only_through_the_render_when_asked(model, through):
    from pipeline.train.genova import GenovaLosses, GenovaSettings

    params = load_manifest().stage_params("train") | {"genova_loopback_through_render": through}
    losses = GenovaLosses(model, torch.nn.Identity(), GenovaSettings.from_params(params))

    class MeanEncoder(torch.nn.Module):  # coefficients from the render's mean level
        def __init__(self) -> None:
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            level = self.gain * x.mean(dim=(1, 2, 3))[:, None]
            return level.expand(-1, model.k_id), level.expand(-1, model.k_exp)

    alpha_id = torch.full((2, model.k_id), 0.5, requires_grad=True)
    vertices = losses.shapes(alpha_id, torch.zeros(2, model.k_exp))
    colours = torch.full((2, vertices.shape[1], 3), 0.6)
    target = (torch.ones(2, model.k_id), torch.ones(2, model.k_exp))
    encoder = MeanEncoder()
    losses.loopback(encoder, vertices, colours, target, torch.Generator().manual_seed(0)).backward()
    moved = alpha_id.grad is not None and float(alpha_id.grad.abs().sum()) > 0
    assert moved == through
    assert encoder.gain.grad is not None and float(encoder.gain.grad) != 0  # the encoder learns either way


def test_genova_alone_trains_the_encoder_from_scratch_at_the_phase_one_rate(model):
    """Without Phase I the encoder starts random, so Phase III's fine-tuning rate (lr / 10) would
    leave it near its start: under genova alone it trains at lr unless lr_phase3 says otherwise."""
    from pipeline.train.loop import build_optimizer
    from pipeline.train.network import MorphNet

    net = MorphNet(model.k_id, model.k_exp, model.n_vertices, 4, 0.125, 32)

    def encoder_rate(**over) -> float:
        opt, _ = build_optimizer(net, 3, validate_params({"lr": 0.002, **over}))
        return opt.param_groups[0]["lr"]  # the encoder's group comes first

    assert encoder_rate(objective="liu") == pytest.approx(0.0002)
    assert encoder_rate(objective="liu+genova") == pytest.approx(0.0002)  # Phase I ran: fine-tuning
    assert encoder_rate(objective="genova") == pytest.approx(0.002)
    assert encoder_rate(objective="genova", lr_phase3=0.0005) == pytest.approx(0.0005)
