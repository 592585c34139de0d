"""Face-relative units and the landmark error model: what a user sets means the same at any image
size, a detector's systematic offsets are not fitted as identity, and landmarks that carry no
information give the mean shape."""

from __future__ import annotations

import dataclasses
import json

import array_api_compat.numpy as anp
import numpy as np
import pytest

from pipeline.fit.calibration import MIRROR, face_residuals, fit_error_model
from pipeline.fit.loop import FitOptions, fit_subjects, prepare_model
from pipeline.fit.noise import (
    ErrorModel,
    ErrorModelError,
    bias_at,
    load_error_model,
    prepare_noise,
    resolve_error_model,
    uniform,
)
from pipeline.landmarks.base import N_POINTS as N_LANDMARKS
from pipeline.synthetic.toy import synthesize

MODEL = {"k_id": 20, "k_exp": 8, "seed": 1}  # the model fixture (conftest.py)


@pytest.fixture(scope="module")
def lm(model):
    return prepare_model(model, anp)


def _inputs(landmarks: np.ndarray):
    v = np.swapaxes(landmarks, -1, -2).copy()
    v[..., 1, :] *= -1.0  # y up
    S, M = v.shape[:2]
    return v, np.ones((S, M, N_LANDMARKS)), np.ones((S, M), dtype=bool)


def _shape_errors(model, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: RMS vertex distance (mm) between the identity shapes of coefficients a and b."""
    d = (model.id_basis.astype(np.float64) @ (np.asarray(a) - np.asarray(b)).T).T.reshape(len(a), -1, 3)
    return np.sqrt(np.mean(np.sum(d**2, axis=-1), axis=-1))


def _identity_error(model, a_est: np.ndarray, a_true: np.ndarray) -> float:
    return float(np.mean(_shape_errors(model, a_est, a_true)))


def test_scaling_the_landmarks_changes_only_scale_and_translation(model, lm):
    s = synthesize(model, 4, 3, noise_px=1.5, seed=3)
    opt = FitOptions(robust_loss="huber", reject_nme=0.1)
    noise = prepare_noise(uniform(2.0), lm.order, anp, np.float64)
    pivot = np.array([37.0, -81.0])  # any point: the image corner, the face, far away
    fits = {}
    for k in (0.25, 1.0, 8.0):
        v, w, m = _inputs((s.landmarks - pivot) * k + pivot)
        fits[k] = fit_subjects(lm, v, w, m, opt, noise).result
    for k in (0.25, 8.0):
        assert _shape_errors(model, fits[k].alpha_id, fits[1.0].alpha_id).max() <= 0.01
        np.testing.assert_allclose(fits[k].alpha_exp, fits[1.0].alpha_exp, atol=1e-5)
        np.testing.assert_allclose(fits[k].rotation, fits[1.0].rotation, atol=1e-7)
        np.testing.assert_allclose(fits[k].scale, k * fits[1.0].scale, rtol=1e-6)
        t1 = fits[1.0].translation * [1, -1]  # y down, as the landmarks
        np.testing.assert_allclose(
            fits[k].translation * [1, -1], (t1 - pivot) * k + pivot, rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(fits[k].rmse_px, k * fits[1.0].rmse_px, rtol=1e-5)


def test_landmarks_without_information_give_the_mean_shape(model, lm):
    """A detector whose points are the mean face plus noise says nothing about identity. Calibrated
    as `morphset calibrate` does (noise measured against the truth, the identity prior weight chosen
    on the calibration faces), the fit of other faces is not worse than the mean shape."""
    from pipeline.fit.calibrate import PRIOR_WEIGHTS

    flat = dataclasses.replace(model, id_basis=model.id_basis * 0)

    def detector(seed: int):
        s = synthesize(model, 12, 6, seed=seed, max_roll=0.0)
        posed_mean = synthesize(flat, 12, 6, seed=seed, max_roll=0.0).landmarks  # same poses
        rng = np.random.default_rng(seed + 1000)  # not synthesize's stream: no link to the identities
        return s, posed_mean + rng.normal(size=posed_mean.shape) * 3.0 * s.scale[..., None, None]

    cal, cal_points = detector(5)
    res = face_residuals(
        cal_points.reshape(-1, 68, 2),
        cal.landmarks.reshape(-1, 68, 2),
        cal.scale.ravel(),
        np.zeros(cal.scale.size),
    )
    em = fit_error_model(res, cal.yaw.ravel(), "pure-noise")
    noise = prepare_noise(em, lm.order, anp, np.float64)

    def error(s, points, weight: float) -> float:
        v, w, m = _inputs(points)
        out = fit_subjects(lm, v, w, m, FitOptions(robust_loss="huber", identity_prior_weight=weight), noise)
        return _identity_error(model, out.result.alpha_id, s.alpha_id)

    weight = min(PRIOR_WEIGHTS, key=lambda wt: error(cal, cal_points, wt))
    test, test_points = detector(6)
    mean_shape = _identity_error(model, np.zeros_like(test.alpha_id), test.alpha_id)
    fitted = error(test, test_points, weight)
    assert fitted <= mean_shape


def _biased(s, bias_mm: np.ndarray) -> np.ndarray:
    """s's landmarks with a detector offset (68, 2 face mm, y up) that grows with |yaw|."""
    off = bias_mm[None, None] * (1.0 + np.abs(s.yaw) / 40.0)[..., None, None]
    return s.landmarks + off * np.array([1.0, -1.0]) * s.scale[..., None, None]


def test_a_calibrated_bias_is_not_fitted_as_identity(model, lm):
    rng = np.random.default_rng(2)
    bias = rng.normal(0, 2.5, (N_LANDMARKS, 2))  # the same offsets on every face: not anyone's identity
    s = synthesize(model, 10, 6, noise_px=0.5, seed=8, max_yaw=40, max_roll=0.0)
    v, w, m = _inputs(_biased(s, bias))
    # the error model as calibration would measure it: the offset at each yaw bin centre
    centres = np.arange(-40.0, 41.0, 10.0)
    em = ErrorModel(
        "test",
        "fixed_vertex",
        centres,
        bias[None] * (1.0 + np.abs(centres / 40.0))[:, None, None],
        np.full(N_LANDMARKS, 1.0),
        np.full(len(centres), 10),
        {},
    )
    opt = FitOptions(robust_loss="huber")
    calibrated = fit_subjects(lm, v, w, m, opt, prepare_noise(em, lm.order, anp, np.float64)).result
    naive = fit_subjects(lm, v, w, m, opt, prepare_noise(uniform(1.0), lm.order, anp, np.float64)).result
    v0, w0, m0 = _inputs(s.landmarks)
    clean = fit_subjects(lm, v0, w0, m0, opt, prepare_noise(uniform(1.0), lm.order, anp, np.float64)).result
    err = {
        n: _identity_error(model, r.alpha_id, s.alpha_id)
        for n, r in (("cal", calibrated), ("naive", naive), ("clean", clean))
    }
    assert err["cal"] < 1.1 * err["clean"] + 0.05
    assert err["naive"] > 3 * err["cal"]


def test_calibration_recovers_a_known_bias_and_noise():
    rng = np.random.default_rng(0)
    n = 400
    yaw = rng.uniform(-45, 45, n)
    true_bias = rng.normal(0, 2.0, (N_LANDMARKS, 2))
    # a mirror-symmetric detector: the mirror landmark's offset, x negated, at the negated yaw
    sym = 0.5 * (true_bias + true_bias[MIRROR] * [-1.0, 1.0])
    slope = sym * 0.02  # per degree of yaw; its mirror partner turns the other way
    offset = sym[None] + slope[None] * yaw[:, None, None]
    scale, roll = rng.uniform(0.5, 3.0, n), rng.uniform(-20, 20, n)
    truth = rng.uniform(50, 200, (n, N_LANDMARKS, 2))
    face = offset + rng.normal(0, 0.7, offset.shape)
    # into the image: rotate by roll, scale, y down
    r = np.deg2rad(roll)[:, None]
    img = np.stack(
        [
            np.cos(r) * face[..., 0] - np.sin(r) * face[..., 1],
            np.sin(r) * face[..., 0] + np.cos(r) * face[..., 1],
        ],
        -1,
    )
    detected = truth + img * scale[:, None, None] * [1.0, -1.0]
    res = face_residuals(detected, truth, scale, roll)
    np.testing.assert_allclose(res, face, atol=1e-9)
    em = fit_error_model(res, yaw, "test", mirror=False)
    at = {c: i for i, c in enumerate(em.yaw_bins_deg)}
    for c in (-30.0, 0.0, 20.0):
        np.testing.assert_allclose(em.bias_mm[at[c]], sym + slope * c, atol=0.35)
    np.testing.assert_allclose(em.sigma_mm, 0.7, rtol=0.25)
    assert em.images_per_bin[at[80.0]] == 0  # no faces there: the nearest measured bin is held
    np.testing.assert_allclose(em.bias_mm[at[80.0]], em.bias_mm[at[50.0]])


def test_the_bias_follows_the_pose(model, lm):
    centres = np.array([-20.0, 0.0, 20.0])
    bias = np.zeros((3, N_LANDMARKS, 2))
    bias[0, :, 0], bias[2, :, 0] = -2.0, 2.0  # x offset growing with yaw
    noise = prepare_noise(
        ErrorModel("t", "fixed_vertex", centres, bias, np.ones(68), np.ones(3), {}), lm.order, anp, np.float64
    )
    from pipeline.fit.camera import rotation_from_euler_deg

    R = rotation_from_euler_deg(np.array([10.0, 10.0, 40.0]), np.zeros(3), np.array([0.0, 90.0, 0.0]))
    f = np.array([2.0, 2.0, 1.0])
    b = bias_at(noise, f, R)  # (3, 2, L)
    np.testing.assert_allclose(b[0, 0], 2.0, atol=1e-9)  # half-way to 2 mm, x2 px/mm
    np.testing.assert_allclose(b[0, 1], 0.0, atol=1e-9)
    np.testing.assert_allclose(b[1, 1], 2.0, atol=1e-9)  # rolled 90 deg: the offset turns to +y
    np.testing.assert_allclose(b[2, 0], 2.0, atol=1e-9)  # beyond the last centre: held


def test_error_model_files_are_checked(tmp_path):
    em = uniform(2.0, "dlib")
    good = tmp_path / "em.json"
    good.write_bytes(em.to_json())
    assert load_error_model(good).sigma_mm.tolist() == [2.0] * 68
    doc = json.loads(good.read_text())
    doc["sigma_mm"] = doc["sigma_mm"][:60]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ErrorModelError, match=r"bad.json: sigma_mm must be finite numbers of shape \(68,\)"):
        load_error_model(bad)
    with pytest.raises(ErrorModelError, match="models.landmark_error.dlib.sha256"):
        resolve_error_model({"source": str(good), "sha256": "0" * 64}, "dlib")
    with pytest.raises(ErrorModelError, match="not found"):
        resolve_error_model({"source": str(tmp_path / "nope.json")}, "dlib")
    assert resolve_error_model(None, "fan") == (None, "models.landmark_error.fan is not set")
    from dataclasses import replace

    shrunk = tmp_path / "shrunk.json"
    shrunk.write_bytes(replace(em, identity_shrinkage=(0.3, 0.9)).to_json())
    assert load_error_model(shrunk).identity_shrinkage == (0.3, 0.9)
    doc = json.loads(shrunk.read_text())
    doc["identity_shrinkage"] = {"common": float("nan"), "per_image": 0.9}
    shrunk.write_text(json.dumps(doc))
    with pytest.raises(ErrorModelError, match=r"shrunk.json: identity_shrinkage values must be finite"):
        load_error_model(shrunk)


def test_the_shipped_dlib_model_matches_the_manifest():
    from pipeline.config.manifest import load_manifest

    entry = load_manifest().get("models.landmark_error.dlib")
    path, _ = resolve_error_model(entry, "dlib")  # sha256 checked against the manifest
    em = load_error_model(path)
    assert em.backend == "dlib" and em.convention == "fixed_vertex"
    assert em.sigma_mm[:17].mean() > 2 * em.sigma_mm[36:48].mean()  # the jaw is the noisiest


def test_contour_marching_on_ibug_landmarks_recovers_identity_like_fixed_vertices(default_model):
    """Jaw points on the face outline (iBUG convention), fitted with contour marching, give the
    identity as well (within 10 %) as fixed-vertex points fitted with fixed vertices."""
    noise = uniform(1.0)
    err = {}
    for name, silhouette, contour in (("ibug", True, True), ("fixed", False, False)):
        s = synthesize(default_model, 24, 4, noise_px=1.0, seed=12, silhouette=silhouette, max_yaw=50.0)
        lm_c = prepare_model(default_model, anp, contour=contour)
        v, w, m = _inputs(s.landmarks)
        out = fit_subjects(
            lm_c,
            v,
            w,
            m,
            FitOptions(robust_loss="huber", contour=contour),
            prepare_noise(noise, lm_c.order, anp, np.float64),
        )
        err[name] = _identity_error(default_model, out.result.alpha_id, s.alpha_id)
    assert err["ibug"] <= 1.1 * err["fixed"], err


def test_subject_common_share_separates_shared_from_per_image_error():
    from pipeline.fit.calibration import subject_common_share
    from pipeline.fit.noise import uniform

    rng = np.random.default_rng(3)
    subjects = np.repeat(np.arange(300), 8)
    yaw = rng.uniform(-40, 40, subjects.size)
    rho = np.linspace(0.0, 0.8, N_LANDMARKS)[:, None]  # a different share at every landmark
    shared = rng.normal(size=(300, N_LANDMARKS, 2))[subjects]
    per_image = rng.normal(size=(subjects.size, N_LANDMARKS, 2))
    res = 2.0 * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * per_image)
    share, rms = subject_common_share(res, yaw, subjects, uniform(2.0))
    np.testing.assert_allclose(share, rho[:, 0], atol=0.06)
    np.testing.assert_allclose(rms, 2.0, rtol=0.08)
    # a bias the model knows is not error; one image per subject says nothing about the split
    em = uniform(2.0)
    biased = dataclasses.replace(em, bias_mm=em.bias_mm + 5.0)
    again, _ = subject_common_share(res + 5.0, yaw, subjects, biased)
    np.testing.assert_allclose(again, share, atol=1e-9)
    with pytest.raises(ValueError, match="two images"):
        subject_common_share(res[::8], yaw[::8], subjects[::8], em)


@pytest.mark.slow
def test_calibrate_writes_a_model_the_fit_then_uses(tmp_path, capsys, caplog):
    from pipeline.cli import main
    from pipeline.fit.calibrate import calibrate

    data, out = tmp_path / "faces", tmp_path / "dlib.json"
    assert main(["synth", "--out", str(data), "--subjects", "4", "--images-per-subject", "3", "--seed", "2",
                 "--yaw-range", "-30", "30", "--workers", "1", "--json"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["calibrate", str(data), "--landmarks", "dlib", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    import hashlib

    assert doc["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    em = load_error_model(out)
    assert em.convention == "fixed_vertex" and em.backend == "dlib" and em.identity_prior_weight is not None
    # the shrinkage measured on M-subsets of the same faces (M = 1, 2: three images a subject)
    assert em.identity_shrinkage is not None and min(em.identity_shrinkage) >= 0
    by_m = doc["identity_shrinkage_by_images"]
    assert set(by_m) == {"1", "2"} and all(d["error_mm"] <= d["unshrunk_mm"] for d in by_m.values())
    assert 10 <= doc["images"] <= 12 and set(doc["error_by_group_iod"]) == {
        "jaw",
        "brows",
        "nose",
        "eyes",
        "mouth",
    }
    share = doc["subject_common_share_by_group"]
    assert set(share) == set(doc["error_by_group_iod"]) and all(0 <= v <= 1 for v in share.values())
    run = doc["work_run"]
    use = [
        "--set",
        f"models.landmark_error.dlib.source={out}",
        "--set",
        f"models.landmark_error.dlib.sha256={doc['sha256']}",
    ]
    assert main(["fit", run, "--scheduler", "sync", "--no-progress", *use]) == 0
    from pipeline.storage.run import Run

    fits = Run(run).table("fit", ["failure_reason", "alpha_id"]).to_pylist()
    assert sum(r["alpha_id"] is not None for r in fits) >= 9
    # the same faces as annotated photos: iBUG .pts files (1-based) from the iBUG-convention truth
    import pyarrow.parquet as pq

    from pipeline.fit.calibrate import calibrate_from_annotations

    for r in pq.read_table(data / "ground_truth.parquet").to_pylist():
        pts = np.asarray(r["landmarks_2d_ibug"]).reshape(68, 2) + 1.0
        body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts)
        (data / r["image_id"]).with_suffix(".pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")
    ann = calibrate_from_annotations(data, "dlib", tmp_path / "ann.json", work_run=tmp_path / "ann.run")
    from_ann = load_error_model(ann["path"])
    assert from_ann.convention == "ibug" and ann["images"] == doc["images"]
    summary = calibrate(data, "dlib", tmp_path / "ib.json", work_run=run, convention="ibug")
    from_truth = load_error_model(summary["path"])
    measured = from_truth.images_per_bin > 0
    # poses fitted to the annotations stand in for the true ones: the same offsets, to a millimetre
    assert np.median(np.abs(from_ann.bias_mm[measured] - from_truth.bias_mm[measured])) < 1.0
    np.testing.assert_allclose(from_ann.sigma_mm[17:].mean(), from_truth.sigma_mm[17:].mean(), rtol=0.3)
    # a model that is not the one the manifest vouches for is refused before any work
    wrong = [
        "--set",
        f"models.landmark_error.dlib.source={out}",
        "--set",
        "models.landmark_error.dlib.sha256=" + "f" * 64,
    ]
    assert main(["fit", run, "--scheduler", "sync", "--no-progress", "--mode", "overwrite", *wrong]) != 0
    assert "differs from models.landmark_error.dlib.sha256" in capsys.readouterr().err


def test_a_backend_without_an_error_model_falls_back_to_uniform_noise_and_says_so(caplog):
    from pipeline.config.manifest import load_manifest
    from pipeline.core.registry import config_view
    from pipeline.fit.stage import FitStage, error_model_file

    fan = load_manifest().with_overrides({"stages.landmarks.backend": "fan"})
    assert error_model_file(config_view(fan, "fit")) == (None, "models.landmark_error.fan is not set")
    with caplog.at_level("WARNING"):
        assets = FitStage().resolve_assets(config_view(fan, "fit"))
    assert "landmark_error" not in assets
    assert "models.landmark_error.fan is not set; fitting with uniform landmark noise" in caplog.text
    dlib = load_manifest().with_overrides({"stages.landmarks.backend": "dlib"})
    assert FitStage().resolve_assets(config_view(dlib, "fit"))["landmark_error"].path.endswith("dlib.json")
