"""The batched alternating fit: recovery, invariances, padding, rejection, convergence, namespaces."""

from __future__ import annotations

import array_api_compat.numpy as anp
import numpy as np
import pytest

from pipeline.fit.loop import FitOptions, fit_batch, fit_subjects, prepare_model
from pipeline.fit.normalize import face_frame, to_face
from pipeline.synthetic.toy import synthesize

EXACT = FitOptions(
    max_iterations=60,
    tolerance=1e-12,
    identity_prior_weight=1e-9,
    expression_prior_weight=1e-9,
    robust_loss="none",
    reject_nme=None,
)


MODEL = {"k_id": 20, "k_exp": 8, "seed": 1}  # the model fixture (conftest.py)


@pytest.fixture(scope="module")
def lm(model):
    return prepare_model(model, anp)


def _inputs(s):
    v = np.swapaxes(s.landmarks, -1, -2).copy()
    v[..., 1, :] *= -1.0
    S, M = v.shape[:2]
    return v, np.ones((S, M, 68)), np.ones((S, M), dtype=bool)


@pytest.mark.parametrize("n_images", [1, 4])
def test_exact_recovery_on_noiseless_landmarks(model, lm, n_images):
    s = synthesize(model, 3, n_images, noise_px=0.0, seed=10 + n_images)
    v, w, m = _inputs(s)
    r = fit_batch(lm, v, w, m, m, EXACT)
    assert np.abs(r.rotation - s.rotation).max() < 1e-6
    assert np.abs(r.scale - s.scale).max() < 1e-6
    t_img = np.stack([r.translation[..., 0], -r.translation[..., 1]], axis=-1)
    assert np.abs(t_img - s.translation).max() < 1e-4
    assert np.abs(r.alpha_id - s.alpha_id).max() < 1e-4 * np.abs(s.alpha_id).max()
    assert np.abs(r.alpha_exp - s.alpha_exp).max() < 1e-4 * np.abs(s.alpha_exp).max()
    assert r.rmse_px.max() < 1e-6
    assert r.converged.all()


def test_plain_alternation_also_recovers_but_needs_more_iterations(model, lm):
    s = synthesize(model, 2, 4, noise_px=0.0, seed=3)
    v, w, m = _inputs(s)
    from dataclasses import replace

    slow = fit_batch(lm, v, w, m, m, replace(EXACT, gauss_newton=False, max_iterations=400, tolerance=1e-14))
    fast = fit_batch(lm, v, w, m, m, EXACT)
    assert np.abs(slow.alpha_id - s.alpha_id).max() < 1e-3 * np.abs(s.alpha_id).max()
    assert fast.iterations.max() < slow.iterations.min()


def test_result_does_not_depend_on_image_order(model, lm):
    s = synthesize(model, 2, 5, noise_px=2.0, seed=4)
    v, w, m = _inputs(s)
    opt = FitOptions(robust_loss="huber", max_iterations=40, tolerance=1e-10)
    a = fit_batch(lm, v, w, m, m, opt)
    perm = np.array([3, 0, 4, 2, 1])
    b = fit_batch(lm, v[:, perm], w[:, perm], m[:, perm], m[:, perm], opt)
    assert np.allclose(a.alpha_id, b.alpha_id, atol=1e-6)
    assert np.allclose(a.rotation[:, perm], b.rotation, atol=1e-6)
    assert np.allclose(a.alpha_exp[:, perm], b.alpha_exp, atol=1e-5)


def test_ragged_batch_equals_each_subject_alone(model, lm):
    sizes = [1, 3, 5]
    sets = [synthesize(model, 1, n, noise_px=1.5, seed=20 + n) for n in sizes]
    M = max(sizes)
    v = np.zeros((3, M, 2, 68))
    w = np.zeros((3, M, 68))
    mask = np.zeros((3, M), dtype=bool)
    # padding holds garbage: it must not leak into any result
    v[:] = 1e3
    for i, s in enumerate(sets):
        vi, wi, _ = _inputs(s)
        v[i, : sizes[i]], w[i, : sizes[i]], mask[i, : sizes[i]] = vi[0], wi[0], True
    opt = FitOptions(robust_loss="huber", max_iterations=30)
    batch = fit_batch(lm, v, w, mask, mask, opt)
    for i, s in enumerate(sets):
        alone = fit_batch(lm, *(_inputs(s) + _inputs(s)[2:]), opt)
        assert np.allclose(batch.alpha_id[i], alone.alpha_id[0], atol=1e-9)
        assert np.allclose(batch.rotation[i, : sizes[i]], alone.rotation[0], atol=1e-9)
        assert batch.iterations[i] == alone.iterations[0]
        assert np.allclose(batch.history[i], alone.history[0], equal_nan=True)


def test_objective_recorded_decreases_and_convergence_is_flagged(model, lm):
    s = synthesize(model, 4, 3, noise_px=2.0, seed=5)
    v, w, m = _inputs(s)
    for loss in ("none", "huber"):
        r = fit_batch(lm, v, w, m, m, FitOptions(robust_loss=loss, max_iterations=50, tolerance=1e-6))
        for i in range(4):
            h = r.history[i, : r.iterations[i]]
            assert np.isfinite(h).all() and np.isnan(r.history[i, r.iterations[i] :]).all()
            assert np.all(np.diff(h) <= 1e-9 * h[:-1])  # monotone
            assert r.objective[i] == h[-1]
        assert r.converged.all() and (r.iterations < 50).all()
    capped = fit_batch(lm, v, w, m, m, FitOptions(max_iterations=2, tolerance=1e-15))
    assert (capped.iterations == 2).all() and not capped.converged.any()


def test_multi_image_identity_beats_single_image(model, lm):
    def id_error(n_images: int) -> float:
        s = synthesize(model, 24, n_images, noise_px=2.0, seed=6)
        v, w, m = _inputs(s)
        r = fit_batch(lm, v, w, m, m, FitOptions(robust_loss="none"))
        d = (r.alpha_id - s.alpha_id) @ model.id_basis.T.astype(np.float64)
        return float(np.sqrt(np.mean(d**2)))

    assert id_error(8) < 0.7 * id_error(1)


def test_rejection_excludes_bad_image_from_identity(model, lm):
    s = synthesize(model, 2, 4, noise_px=1.0, seed=7)
    v, w, m = _inputs(s)
    rng = np.random.default_rng(0)
    v_bad = v.copy()
    v_bad[0, 2] += rng.normal(0, 30, size=v_bad[0, 2].shape)  # a wrong landmark set
    opt = FitOptions(reject_nme=0.1, robust_loss="none")
    out = fit_subjects(lm, v_bad, w, m, opt)
    assert out.rejected[0, 2] and out.rejected.sum() == 1
    assert not out.result.identity_mask[0, 2] and out.result.identity_mask[1].all()
    assert np.isfinite(out.result.rotation[0, 2]).all()  # kept, with a pose
    keep = m.copy()
    keep[0, 2] = False
    # the same fit in face units (fit_subjects converts its pixels) without the bad image
    frame = face_frame(lm.mean, v_bad[..., lm.order], w[..., lm.order])
    without = fit_batch(lm, to_face(v_bad, frame), w, m, keep, opt)
    assert np.allclose(out.result.alpha_id[0], without.alpha_id[0], atol=1e-9)
    clean = fit_subjects(lm, v, w, m, opt)
    assert not clean.rejected.any()


def test_subject_with_all_images_rejected_keeps_a_fit(model, lm):
    s = synthesize(model, 1, 2, noise_px=0.0, seed=8)
    v, w, m = _inputs(s)
    v = v + np.random.default_rng(1).normal(0, 40, size=v.shape)
    out = fit_subjects(lm, v, w, m, FitOptions(reject_nme=0.05))
    assert out.rejected.all() and not out.result.identity_mask.any()
    assert np.isfinite(out.result.alpha_id).all()


def test_missing_landmarks_and_images_without_weight(model, lm):
    s = synthesize(model, 1, 3, noise_px=0.0, seed=9)
    v, w, m = _inputs(s)
    w[0, 0, 40:] = 0.0  # half the landmarks of image 0 missing
    v[0, 0, :, 40:] = 0.0
    m[0, 2] = False  # image 2 not fitted at all
    r = fit_batch(lm, v, w, m, m, EXACT)
    assert np.abs(r.rotation[0, :2] - s.rotation[0, :2]).max() < 1e-6
    assert np.abs(r.alpha_id - s.alpha_id).max() < 1e-4 * np.abs(s.alpha_id).max()


def test_contour_correspondence_helps_on_silhouette_landmarks(model):
    s = synthesize(model, 16, 3, noise_px=0.5, seed=11, silhouette=True, max_yaw=60)
    v, w, m = _inputs(s)
    errs = {}
    for contour in (False, True):
        r = fit_batch(prepare_model(model, anp, contour=contour), v, w, m, m, FitOptions(contour=contour))
        errs[contour] = float(np.mean(r.rmse_px))
    assert errs[True] < 0.8 * errs[False]


@pytest.mark.slow
def test_same_code_path_runs_on_another_array_namespace(model):
    """The CuPy path is these namespace functions; torch (via array-api-compat) proves they do
    not depend on NumPy semantics, since no GPU is available to run CuPy here."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tnp

    s = synthesize(model, 3, 3, noise_px=1.0, seed=12)
    v, w, m = _inputs(s)
    for contour in (False, True):
        opt = FitOptions(max_iterations=8, robust_loss="huber", contour=contour)
        rn = fit_batch(prepare_model(model, anp, contour), v, w, m, m, opt)
        rt = fit_batch(
            prepare_model(model, tnp, contour),
            torch.asarray(v),
            torch.asarray(w),
            torch.asarray(m),
            torch.asarray(m),
            opt,
        )
        assert isinstance(rt.alpha_id, torch.Tensor)
        assert np.allclose(rt.alpha_id.numpy(), rn.alpha_id, atol=1e-9)
        assert np.allclose(rt.rotation.numpy(), rn.rotation, atol=1e-9)
