"""dlib's face network in torch (backend ``dlib-resnet-torch``) against dlib's own (``dlib-resnet``).

The .dat of face-recognition-models is read by our parser (pipeline/embed/dlib_format.py); the
torch module must give dlib's embeddings on every fixture face and on renders, keep the identity
screening's decisions, and stay differentiable (the renderer and refinement losses use it).
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.embed import dlib_format

dlib = pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def weights():
    from pipeline.embed.dlib_resnet import resolve_model

    return resolve_model(load_manifest().model("dlib_embedding"))


@pytest.fixture(scope="module")
def backends(weights):
    from pipeline.embed.dlib_resnet import DlibResnetBackend
    from pipeline.embed.dlib_resnet_torch import TorchResnetBackend

    path, sha = weights
    return DlibResnetBackend(path, sha), TorchResnetBackend(path, sha, {"device": "cpu"})


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_torch_network_gives_dlibs_embeddings_on_renders(backends):
    from pipeline.landmarks.accuracy import synthetic_renders

    ref, net = backends
    images, truth, _ = synthetic_renders(load_manifest(), 12, seed=3)
    items = list(zip(images, truth, strict=True))
    a = np.stack(ref.embed(items))
    b = np.stack(net.embed(items))
    cos = _cosines(a, b)
    assert cos.min() >= 0.999, cos
    # and the distances the screening thresholds are set in
    assert (
        np.abs(
            np.linalg.norm(a[:, None] - a[None], axis=2) - np.linalg.norm(b[:, None] - b[None], axis=2)
        ).max()
        < 1e-3
    )


def test_a_batch_gives_the_embeddings_of_its_faces_one_by_one(backends):
    from pipeline.landmarks.accuracy import synthetic_renders

    _, net = backends
    images, truth, _ = synthetic_renders(load_manifest(), 5, seed=4)
    together = np.stack(net.embed(list(zip(images, truth, strict=True))))
    alone = np.stack([net.embed([(im, pts)])[0] for im, pts in zip(images, truth, strict=True)])
    assert np.allclose(together, alone, atol=1e-5)


def test_a_bad_face_is_its_own_error_and_the_others_are_embedded(backends):
    from pipeline.landmarks.accuracy import synthetic_renders

    _, net = backends
    images, truth, _ = synthetic_renders(load_manifest(), 2, seed=5)
    bad = np.full((68, 2), np.nan)
    out = net.embed([(images[0], truth[0]), (images[1], bad), (images[1], truth[1])])
    assert isinstance(out[1], str) and "finite" in out[1]
    assert out[0].shape == (128,) and out[2].shape == (128,)


def test_the_module_is_differentiable(weights):
    """Directional derivative of the embedding w.r.t. the chip's pixels against a central
    difference, in double precision (the renderer and refinement losses back-propagate here)."""
    import torch

    from pipeline.embed.resnet_torch import load

    net = load(weights[0]).double()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, 150, 150, generator=g, dtype=torch.float64) * 255).requires_grad_(True)
    w = torch.randn(128, generator=g, dtype=torch.float64)
    (net(x)[0] @ w).backward()
    grad = x.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    eps = 1e-6  # small enough that no ReLU or max-pool switches within it
    with torch.no_grad():
        fd = ((net(x + eps * v)[0] - net(x - eps * v)[0]) @ w) / (2 * eps)
    assert torch.isclose((grad * v).sum(), fd, rtol=1e-4, atol=1e-9), ((grad * v).sum(), fd)


# --- the file format ---------------------------------------------------------------------------
def _int(v: int) -> bytes:
    """dlib's integer encoding (serialize.h pack_int)."""
    neg, v = (0x80, -v) if v < 0 else (0, v)
    body = v.to_bytes(max(1, (v.bit_length() + 7) // 8), "little")
    return bytes([len(body) | neg]) + body


def test_integers_floats_and_strings_read_as_dlib_writes_them():
    for v in (0, 1, 2, 255, 256, -1, -300, 2**40, -(2**62)):
        assert dlib_format._Reader(_int(v), "x").int() == v
    # 122.782 as dlib's float_details: mantissa 16093282, exponent -17
    r = dlib_format._Reader(_int(16093282) + _int(-17) + _int(5) + b"con_4", "x")
    assert abs(r.float() - 122.782) < 1e-4
    assert r.string() == "con_4"
    t = dlib_format._Reader(
        _int(2) + _int(1) + _int(2) + _int(1) + _int(1) + struct.pack("<2f", 1.5, -2), "x"
    )
    assert t.tensor().reshape(-1).tolist() == [1.5, -2.0]


def test_a_truncated_or_foreign_file_is_refused_naming_the_offset(tmp_path, weights):
    data = weights[0].read_bytes()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(dlib_format.DlibFormatError, match=r"cut\.dat: at byte \d+"):
        dlib_format.read_network(cut)
    other = tmp_path / "landmarks.dat"
    from pipeline.landmarks.dlib_backend import resolve_model

    shutil.copyfile(resolve_model(load_manifest().model("dlib_landmarks"))[0], other)
    with pytest.raises(dlib_format.DlibFormatError, match="landmarks.dat"):
        dlib_format.read_network(other)


def test_an_unknown_backend_lists_the_known_ones():
    from pipeline.embed.stage import backend_module

    with pytest.raises(ValueError, match=r"dlib-resnet-torch.*dlib-resnet"):
        backend_module("dlib-resnet-tf")


# --- every fixture face, through the product's own chain ----------------------------------------
@pytest.mark.slow
def test_every_fixture_face_embeds_as_dlib_does_and_screening_decides_the_same(
    faces_dir, people_dir, tmp_path
):
    """All real photos (../shared/fixtures/faces and people), MTCNN + dlib landmarks, embedded by
    the default backend and again by dlib's own: cosine >= 0.999 per face, and the fit's identity
    screening takes the same decisions on both (with two planted strangers in one subject)."""
    from pipeline.cli import main
    from pipeline.embed.identity import ScreenParams, embedding_matrix, screen_identities

    root = tmp_path / "photos"
    for src in (faces_dir, people_dir):
        for person in sorted(p for p in src.iterdir() if p.is_dir()):
            shutil.copytree(person, root / person.name, dirs_exist_ok=True)
    # two strangers planted in amy's folder, so that the screening has something to decide
    shutil.copyfile(people_dir / "obama" / "obama.jpg", root / "amy" / "planted0.jpg")
    shutil.copyfile(sorted((faces_dir / "raj").iterdir())[0], root / "amy" / "planted1.png")
    run = tmp_path / "run"
    sync = ["--scheduler", "sync", "--no-progress"]
    assert (
        main(["build", str(run), "--root", str(root), "--landmarks", "dlib", "--until", "embed", *sync]) == 0
    )

    def embeddings() -> tuple[list[str], list[str], np.ndarray, list]:
        t = pads.dataset(str(run / "embed"), format="parquet").to_table().sort_by("image_id")
        return (
            t.column("image_id").to_pylist(),
            t.column("subject").to_pylist(),
            embedding_matrix(t.column("embedding"), t.num_rows),
            t.column("backend").to_pylist(),
        )

    ids, subjects, torch_e, names = embeddings()
    assert set(names) == {"dlib-resnet-torch"}
    assert main(["embed", str(run), "--set", "stages.embed.backend=dlib-resnet", *sync]) == 0
    ids2, _, dlib_e, names2 = embeddings()
    assert ids2 == ids and set(names2) == {"dlib-resnet"}
    have = np.all(np.isfinite(dlib_e), axis=1)
    assert have.sum() >= 45 and np.array_equal(have, np.all(np.isfinite(torch_e), axis=1))
    cos = _cosines(torch_e[have], dlib_e[have])
    assert cos.min() >= 0.999, dict(zip(np.array(ids)[have][cos < 0.999], cos[cos < 0.999], strict=True))
    fit = load_manifest().stage_params("fit")
    p = ScreenParams(
        fit["identity_outlier_distance"], fit["identity_cluster_distance"], fit["identity_ambiguous_ratio"]
    )
    decisions_torch, _ = screen_identities(np.array(subjects), torch_e, p)
    decisions_dlib, _ = screen_identities(np.array(subjects), dlib_e, p)
    assert decisions_torch == decisions_dlib
    flagged = {i for i, d in zip(ids, decisions_torch, strict=True) if d}
    assert {"amy/planted0.jpg", "amy/planted1.png"} <= flagged
