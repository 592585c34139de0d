"""Encoder export and the evaluation interface (load_encoder -> embed / reconstruct)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.synthetic.trainset import draw_crop
from pipeline.train.config import validate_params
from pipeline.train.inference import TORCHSCRIPT_FILE, export_encoder, load_encoder
from pipeline.train.network import MorphNet, init_decoders_from_model

MODEL = {"k_id": 40, "k_exp": 10, "seed": 4, "spacing_mm": 7.0}  # the model fixture (conftest.py)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    rng = np.random.default_rng(1)
    norm = {
        "mid_id": rng.normal(size=40),
        "half_id": rng.uniform(1, 5, 40),
        "mid_exp": rng.normal(size=10),
        "half_exp": rng.uniform(1, 3, 10),
    }
    torch.manual_seed(0)
    net = MorphNet(40, 10, model.n_vertices, 5, 0.25, 64)
    init_decoders_from_model(net, model, norm)
    params = validate_params({"width_multiplier": 0.25, "embedding_dim": 64})
    d = export_encoder(net, tmp_path_factory.mktemp("exp") / "export", params, norm, model, epochs=3)
    return d, net


def _crops(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack(
        [draw_crop(rng.uniform(40, 200, 3), rng.normal(size=3), rng.normal(size=4), rng) for _ in range(n)]
    )


def test_embed_shapes_and_denormalisation(exported, model):
    d, net = exported
    enc = load_encoder(d)
    assert (enc.k_id, enc.k_exp, enc.model_sha256) == (40, 10, model.sha256)
    out = enc.embed(_crops(5))
    assert out["c_id"].shape == (5, 40) and out["alpha_exp"].shape == (5, 10)
    cfg = json.loads((d / "encoder.json").read_text())
    want = out["c_id"] * np.array(cfg["norm"]["half_id"]) + np.array(cfg["norm"]["mid_id"])
    assert np.allclose(out["alpha_id"], want, atol=1e-4)
    assert enc.embed(np.zeros((0, 112, 96, 3), np.uint8))["c_id"].shape == (0, 40)


def test_reconstruct_is_the_3dmm_of_the_embedded_coefficients(exported, model):
    # decoders initialised from the model: the reconstruction equals the model's shape for the
    # coefficients that embed() reports, identity part and full shape alike
    enc = load_encoder(exported[0])
    crops = _crops(3, seed=2)
    emb = enc.embed(crops)
    ident, full = enc.reconstruct(crops)
    assert ident.shape == full.shape == (3, model.n_vertices, 3)
    assert np.abs(full - model.shape(emb["alpha_id"], emb["alpha_exp"])).max() < 1e-2
    assert np.abs(ident - model.shape(emb["alpha_id"])).max() < 1e-2


def test_torchscript_export_matches_eager(exported):
    d, _ = exported
    enc = load_encoder(d)
    crops = _crops(2, seed=3)
    ts = torch.jit.load(str(d / TORCHSCRIPT_FILE))
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    c_id, c_exp, ident, full = ts(x)
    emb = enc.embed(crops)
    assert np.allclose(c_id.detach().numpy(), emb["c_id"], atol=1e-5)
    assert np.allclose(full.detach().numpy().reshape(2, -1, 3), enc.reconstruct(crops)[1], atol=1e-3)


def test_load_refuses_tampered_weights_and_bad_input(exported, tmp_path):
    d, _ = exported
    copy = tmp_path / "export"
    copy.mkdir()
    for f in d.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "encoder.pt").read_bytes())
    data[-10] ^= 0xFF
    (copy / "encoder.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="encoder.pt: sha256"):
        load_encoder(copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_encoder(empty)
    with pytest.raises(ValueError, match="uint8 array"):
        load_encoder(d).embed(np.zeros((1, 112, 96, 3), np.float32))
