"""Trainer network and losses: shapes, decoder initialisation = the 3DMM, A-Softmax, batch loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.synthetic.toy import toy_model
from pipeline.train.losses import asoftmax_loss, batch_distribution_loss, softmax_loss
from pipeline.train.network import MorphNet, SphereFace20, init_decoders_from_model, stage_channels


def _norm_from(a_id: np.ndarray, a_exp: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for key, a in (("id", a_id), ("exp", a_exp)):
        lo, hi = a.min(0), a.max(0)
        out[f"mid_{key}"], out[f"half_{key}"] = (hi + lo) / 2, (hi - lo) / 2
    return out


def test_sphereface20_has_20_weight_layers_and_scales_with_width():
    full = SphereFace20(1.0, 512)
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20
    assert [c.out_channels for c in convs if c.stride == (2, 2)] == [64, 128, 256, 512]
    assert stage_channels(0.25) == (16, 32, 64, 128)
    tiny = SphereFace20(0.25, 128)
    n_full = sum(p.numel() for p in full.parameters())
    n_tiny = sum(p.numel() for p in tiny.parameters())
    assert n_tiny < n_full / 10


@pytest.mark.parametrize("width,emb", [(0.25, 64), (1.0, 512)])
def test_network_output_shapes(width, emb):
    net = MorphNet(
        k_id=40, k_exp=10, n_vertices=300, num_classes=7, width_multiplier=width, embedding_dim=emb
    )
    x = torch.rand(2, 3, 112, 96) * 2 - 1
    c_id, c_exp = net(x)
    assert c_id.shape == (2, 40) and c_exp.shape == (2, 10)
    ident, full = net.shapes(c_id, c_exp)
    assert ident.shape == full.shape == (2, 900)
    rows = torch.tensor([0, 1, 2, 30, 31, 32])
    ident_r, full_r = net.shapes(c_id, c_exp, rows)
    assert torch.allclose(full_r, full[:, rows])
    assert net.classifier(c_id).shape == (2, 7)


def test_decoders_initialised_from_model_reproduce_the_3dmm_exactly():
    model = toy_model(k_id=40, k_exp=10, seed=3, spacing_mm=3.6)
    rng = np.random.default_rng(0)
    a_id = rng.normal(size=(50, 40)) * model.id_std
    a_exp = rng.normal(size=(50, 10)) * model.exp_std
    norm = _norm_from(a_id, a_exp)
    net = MorphNet(40, 10, model.n_vertices, 3, 0.25, 32)
    init_decoders_from_model(net, model, norm)
    c_id = (a_id - norm["mid_id"]) / norm["half_id"]
    c_exp = (a_exp - norm["mid_exp"]) / norm["half_exp"]
    assert np.abs(c_id).max() <= 1 + 1e-9  # targets of the train split lie in [-1, 1]
    with torch.no_grad():
        ident, full = net.shapes(
            torch.tensor(c_id, dtype=torch.float32), torch.tensor(c_exp, dtype=torch.float32)
        )
    want_full = model.shape(a_id, a_exp).reshape(50, -1)
    want_ident = model.shape(a_id).reshape(50, -1)
    # float32 arithmetic on shapes of ~±150 mm: agreement to a micrometre
    assert np.abs(full.numpy() - want_full).max() < 1e-3
    assert np.abs(ident.numpy() - want_ident).max() < 1e-3


def test_asoftmax_with_m1_is_softmax_over_normalised_weights():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    w = torch.randn(5, 8)
    y = torch.randint(0, 5, (16,))
    loss1, _ = asoftmax_loss(x, w, y, m=1, lam=0.0)
    ref = F.cross_entropy(x @ F.normalize(w, dim=1).t(), y)
    assert torch.allclose(loss1, ref, atol=1e-5)
    # the angular margin makes the target harder: m = 4 costs more than m = 1
    loss4, _ = asoftmax_loss(x, w, y, m=4, lam=0.0)
    assert loss4 > loss1
    plain, logits = softmax_loss(x, w, y)
    assert logits.shape == (16, 5) and plain > 0


def test_asoftmax_gradients_are_finite_at_aligned_features():
    w = torch.eye(4, requires_grad=True)
    x = torch.eye(4).clone().requires_grad_(True)  # cos θ = 1 exactly for the targets
    loss, _ = asoftmax_loss(x, w, torch.arange(4), m=4, lam=5.0)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_batch_distribution_loss_zero_for_standardised_batch_and_positive_otherwise():
    torch.manual_seed(0)
    z = torch.randn(256, 6)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    assert float(batch_distribution_loss(z)) < 1e-8
    assert float(batch_distribution_loss(3 * z + 1)) > 1.0
    assert float(batch_distribution_loss(z[:1])) == 0.0  # undefined for one sample: no signal
