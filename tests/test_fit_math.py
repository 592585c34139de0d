"""The fit's pure math steps: camera, linear solves, robust weights, backend selection."""

from __future__ import annotations

import ast
from pathlib import Path

import array_api_compat.numpy as anp
import numpy as np
import pytest

from pipeline.fit import robust
from pipeline.fit import xp as xpmod
from pipeline.fit.camera import estimate_camera, euler_deg, project, rotation_from_euler_deg, to_image
from pipeline.fit.expression import solve_expression
from pipeline.fit.identity import solve_identity, solve_identity_joint
from pipeline.fit.linear import shape_points
from pipeline.fit.loop import prepare_model
from pipeline.synthetic.toy import synthesize

FIT_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "fit"


MODEL = {"k_id": 12, "k_exp": 6, "seed": 3}  # the model fixture (conftest.py)


def _white(model, s):
    """The synthetic truth in the fit's internal units (coefficients / model std)."""
    return s.alpha_id / model.id_std, s.alpha_exp / model.exp_std


def _y_up(s):
    v = np.swapaxes(s.landmarks, -1, -2).copy()
    v[..., 1, :] *= -1.0
    return v


def test_camera_recovers_pose_exactly_and_rotation_is_proper(model):
    s = synthesize(model, 4, 5, noise_px=0.0, seed=1)
    lm = prepare_model(model, anp)
    c_id, c_exp = _white(model, s)
    X = shape_points(lm.mean, lm.id_basis, c_id[:, None, :])
    X = X + (lm.exp_basis @ c_exp[..., None, :, None])[..., 0]
    f, R, t = estimate_camera(X, _y_up(s), np.ones((4, 5, 68)), refine_steps=3)
    assert np.abs(R - s.rotation).max() < 1e-6
    assert np.abs(f - s.scale).max() < 1e-6
    t_img = np.stack([t[..., 0], -t[..., 1]], axis=-1)
    assert np.abs(t_img - s.translation).max() < 1e-5
    assert np.allclose(np.linalg.det(R), 1.0)
    assert np.allclose(R @ np.swapaxes(R, -1, -2), np.eye(3), atol=1e-12)


def test_camera_refinement_lowers_residual_on_noisy_points(model):
    s = synthesize(model, 6, 4, noise_px=3.0, seed=2)
    lm = prepare_model(model, anp)
    X = np.broadcast_to(lm.mean, (6, 4) + lm.mean.shape)
    v, w = _y_up(s), np.ones((6, 4, 68))
    errs = []
    for steps in (0, 5):
        f, R, t = estimate_camera(X, v, w, refine_steps=steps)
        errs.append(np.sum((v - project(X, f, R, t)) ** 2, axis=(-1, -2)))
    assert np.all(errs[1] <= errs[0] + 1e-9)
    assert errs[1].sum() < errs[0].sum()


def test_camera_ignores_zero_weight_points(model):
    s = synthesize(model, 1, 2, noise_px=0.0, seed=4)
    lm = prepare_model(model, anp)
    c_id, c_exp = _white(model, s)
    X = shape_points(lm.mean, lm.id_basis, c_id[:, None, :])
    X = X + (lm.exp_basis @ c_exp[..., None, :, None])[..., 0]
    v = _y_up(s)
    w = np.ones((1, 2, 68))
    v[..., :20] += 50.0  # garbage on points that carry no weight
    w[..., :20] = 0.0
    _, R, _ = estimate_camera(X, v, w)
    assert np.abs(R - s.rotation).max() < 1e-6


def test_euler_round_trip_and_convention():
    yaw, pitch, roll = np.array([35.0, -50.0]), np.array([-12.0, 20.0]), np.array([5.0, -8.0])
    R = rotation_from_euler_deg(yaw, pitch, roll)
    y2, p2, r2 = euler_deg(R)
    assert np.allclose([y2, p2, r2], [yaw, pitch, roll])
    nose = np.array([0.0, 0.0, 1.0])
    turned = rotation_from_euler_deg(np.array(30.0), np.array(0.0), np.array(0.0)) @ nose
    assert turned[0] > 0  # positive yaw: nose towards image right
    down = rotation_from_euler_deg(np.array(0.0), np.array(30.0), np.array(0.0)) @ nose
    assert down[1] < 0  # positive pitch: nose down (model y is up)


def test_to_image_flips_y_and_is_its_own_inverse():
    v = np.arange(12.0).reshape(2, 6)
    img = to_image(v)
    assert np.array_equal(img[0], v[0]) and np.array_equal(img[1], -v[1])
    assert np.array_equal(to_image(img), v)


def test_linear_solves_recover_coefficients_given_pose(model):
    s = synthesize(model, 3, 4, noise_px=0.0, seed=5)
    lm = prepare_model(model, anp)
    c_id, c_exp = _white(model, s)
    v, w = _y_up(s), np.ones((3, 4, 68))
    t_up = np.stack([s.translation[..., 0], -s.translation[..., 1]], axis=-1)
    tiny_id, tiny_exp = np.full(model.k_id, 1e-12), np.full(model.k_exp, 1e-12)
    neutral = shape_points(lm.mean, lm.id_basis, c_id[:, None, :])
    a_exp = solve_expression(v, w, s.scale, s.rotation, t_up, neutral, lm.exp_basis, tiny_exp)
    assert np.abs(a_exp - c_exp).max() < 1e-6
    no_id = lm.mean + (lm.exp_basis @ c_exp[..., None, :, None])[..., 0]
    a_id = solve_identity(v, w, s.scale, s.rotation, t_up, no_id, lm.id_basis, tiny_id)
    assert np.abs(a_id - c_id).max() < 1e-6
    joint = solve_identity_joint(
        v, w, s.scale, s.rotation, t_up, lm.mean, lm.id_basis, lm.exp_basis, tiny_id, tiny_exp
    )
    assert np.abs(joint - c_id).max() < 1e-6


def test_identity_solve_ignores_zero_weight_images(model):
    s = synthesize(model, 1, 3, noise_px=0.0, seed=6)
    lm = prepare_model(model, anp)
    c_id, c_exp = _white(model, s)
    v, w = _y_up(s), np.ones((1, 3, 68))
    t_up = np.stack([s.translation[..., 0], -s.translation[..., 1]], axis=-1)
    v[0, 2] += 30.0
    w[0, 2] = 0.0
    prec = np.full(model.k_id, 1e-12)
    no_id = lm.mean + (lm.exp_basis @ c_exp[..., None, :, None])[..., 0]
    a_id = solve_identity(v, w, s.scale, s.rotation, t_up, no_id, lm.id_basis, prec)
    assert np.abs(a_id - c_id).max() < 1e-6


def test_prior_shrinks_coefficients(model):
    s = synthesize(model, 2, 2, noise_px=2.0, seed=7)
    lm = prepare_model(model, anp)
    _, c_exp = _white(model, s)
    v, w = _y_up(s), np.ones((2, 2, 68))
    t_up = np.stack([s.translation[..., 0], -s.translation[..., 1]], axis=-1)
    no_id = lm.mean + (lm.exp_basis @ c_exp[..., None, :, None])[..., 0]
    norms = [
        np.linalg.norm(
            solve_identity(v, w, s.scale, s.rotation, t_up, no_id, lm.id_basis, np.full(model.k_id, lam))
        )
        for lam in (0.01, 100.0, 1e6)
    ]
    assert norms[0] > norms[1] > norms[2]
    assert norms[2] < 0.05 * norms[0]


def test_huber_weights_and_loss():
    e = np.array([0.0, 1.0, 3.0, 6.0, 30.0])
    wts = robust.weights(e, "huber", 3.0)
    assert np.allclose(wts, [1, 1, 1, 0.5, 0.1])
    loss = robust.loss(e, "huber", 3.0)
    assert np.allclose(loss[:3], e[:3] ** 2)
    assert np.allclose(loss[3:], 2 * 3.0 * e[3:] - 9.0)
    assert np.array_equal(robust.weights(e, "none", 3.0), np.ones(5))
    with pytest.raises(ValueError, match="robust loss"):
        robust.weights(e, "cauchy", 1.0)


def test_backend_resolution(monkeypatch):
    monkeypatch.setattr(xpmod, "cupy_available", lambda: False)
    assert xpmod.resolve_backend("auto") == "numpy"
    assert xpmod.resolve_backend("numpy") == "numpy"
    with pytest.raises(xpmod.BackendError, match="execution.array_backend"):
        xpmod.resolve_backend("cupy")
    with pytest.raises(xpmod.BackendError, match="expected one of"):
        xpmod.resolve_backend("jax")
    monkeypatch.setattr(xpmod, "cupy_available", lambda: True)
    assert xpmod.resolve_backend("auto") == "cupy"
    assert xpmod.get_namespace("numpy").__name__ == "array_api_compat.numpy"


def test_cupy_probe_never_raises(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "cupy", None)  # "not installed": import raises ImportError
    assert xpmod.cupy_available() is False

    def broken() -> bool:
        raise RuntimeError("CUDA driver version is insufficient")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=broken))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert xpmod.cupy_available() is False
    fake.cuda.is_available = lambda: True
    assert xpmod.cupy_available() is True


@pytest.mark.parametrize(
    "module", ["camera.py", "linear.py", "expression.py", "identity.py", "objective.py", "robust.py"]
)
def test_math_modules_use_only_the_array_namespace(module):
    """The CuPy path is the NumPy path: the math modules must not call NumPy directly."""
    tree = ast.parse((FIT_DIR / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] in ("numpy", "cupy") for a in node.names), module
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in ("numpy", "cupy"), module
