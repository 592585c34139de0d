"""``morphset calibrate``: a landmark backend's error model measured on rendered faces with truth.

I/O around :mod:`pipeline.fit.calibration`: a ``morphset synth`` folder (its images and
``ground_truth.parquet``) is built up to the landmarks stage in a work run with the chosen backend;
the detector's points are compared with the true landmark projections and the true camera; the
bias/noise model is fitted; then the identity prior weight is chosen on the same faces (the weight
among :data:`PRIOR_WEIGHTS` whose multi-image fits land nearest the true identities — the noise
model treats landmarks as independent, a detector's errors are not, and this measures by how much
to trust them instead of assuming it). The result is written atomically as JSON; its sha256 goes
into the manifest (``models.landmark_error.<backend>``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fit.calibration import LANDMARK_GROUPS, face_residuals, fit_error_model, group_summary
from pipeline.fit.noise import ErrorModel

log = logging.getLogger(__name__)
# up to weights that all but give the mean shape: a detector that carries no identity gets it
PRIOR_WEIGHTS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 10000.0)


def read_truth(path: str | Path) -> dict[str, dict]:
    """``ground_truth.parquet`` rows by image_id (the columns calibration needs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: ground truth not found (morphset synth writes DIR/ground_truth.parquet)"
        )
    cols = ["image_id", "subject", "alpha_id", "yaw", "roll", "scale", "landmarks_2d"]
    return {r["image_id"]: r for r in pq.read_table(path, columns=cols).to_pylist()}


def paired_landmarks(landmarks: pa.Table, truth: dict[str, dict]) -> dict[str, np.ndarray]:
    """Detected and true points of the images where the detector found all 68."""
    rows = [
        r
        for r in landmarks.select(["image_id", "landmarks", "failure_reason"]).to_pylist()
        if r["landmarks"] is not None and r["failure_reason"] is None and r["image_id"] in truth
    ]
    if not rows:
        raise ValueError("calibration: no image has both detected landmarks and ground truth")
    g = [truth[r["image_id"]] for r in rows]
    return {
        "image_id": np.array([r["image_id"] for r in rows]),
        "detected": np.array([r["landmarks"] for r in rows], np.float64).reshape(-1, 68, 2),
        "true": np.array([x["landmarks_2d"] for x in g], np.float64).reshape(-1, 68, 2),
        "scale": np.array([x["scale"] for x in g], np.float64),
        "yaw": np.array([x["yaw"] for x in g], np.float64),
        "roll": np.array([x["roll"] for x in g], np.float64),
    }


def identity_error_mm(model: Any, alpha_est: np.ndarray, alpha_true: np.ndarray) -> float:
    """RMS distance (mm) over all vertices between two identity shapes after similarity alignment."""
    from pipeline.evaluate.reconstruction import similarity_transform

    a = (model.mean + model.id_basis @ np.asarray(alpha_est, np.float32)).reshape(-1, 3).astype(np.float64)
    b = (model.mean + model.id_basis @ np.asarray(alpha_true, np.float32)).reshape(-1, 3).astype(np.float64)
    sim = similarity_transform(a, b)
    moved = sim.scale * a @ sim.rotation.T + sim.translation
    return float(np.sqrt(np.mean(np.sum((moved - b) ** 2, axis=1))))


def choose_prior_weight(
    landmarks: pa.Table, truth: dict[str, dict], model: Any, fit_params: dict, error_model: ErrorModel
) -> tuple[float, dict[str, float], float]:
    """(best identity prior weight, mean identity error per weight, the mean shape's error)."""
    import array_api_compat.numpy as anp

    from pipeline.fit.loop import prepare_model
    from pipeline.fit.noise import prepare_noise
    from pipeline.fit.stage import fit_landmark_table, options_from_params

    subjects = _by_subject(truth)
    base = {s: identity_error_mm(model, np.zeros(model.k_id), r["alpha_id"]) for s, r in subjects.items()}
    errors: dict[str, float] = {}
    for weight in PRIOR_WEIGHTS:
        opt = options_from_params(fit_params | {"identity_prior_weight": weight})
        lm = prepare_model(model, anp, contour=opt.contour, dtype=np.float32)
        fits = fit_landmark_table(
            landmarks, model, opt, lm=lm, noise=prepare_noise(error_model, lm.order, anp, np.float32)
        )
        per = {}
        for r in fits.select(["subject", "alpha_id"]).to_pylist():
            s = r["subject"]
            if r["alpha_id"] is not None and s in base and s not in per:
                per[s] = identity_error_mm(model, r["alpha_id"], subjects[s]["alpha_id"])
        errors[f"{weight:g}"] = round(float(np.mean(list(per.values()))), 4) if per else float("nan")
    best = min(errors, key=lambda k: (errors[k], float(k)))
    return float(best), errors, round(float(np.mean(list(base.values()))), 4)


def _by_subject(truth: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in truth.values():
        out.setdefault(r["subject"], r)
    return out


def calibrate(
    synth_dir: str | Path,
    backend: str,
    out: str | Path,
    work_run: str | Path | None = None,
    ground_truth: str | Path | None = None,
    manifest: str | None = None,
    overrides: list[str] | None = None,
    scheduler: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure ``backend``'s error model on a synth folder; write it to ``out``; return a summary."""
    from pipeline import api
    from pipeline.config.resolve import resolve
    from pipeline.fit.loop import OUTER_EYE_CORNERS
    from pipeline.models.assets import resolve_morphable_model
    from pipeline.storage.atomic import atomic_write
    from pipeline.storage.run import Run

    synth_dir = Path(synth_dir).resolve()
    truth = read_truth(ground_truth or synth_dir / "ground_truth.parquet")
    work = Path(work_run) if work_run is not None else Path(out).with_suffix(".run")
    api.build(
        work,
        dataset="synthetic",
        root=str(synth_dir),
        landmarks=backend,
        until="landmarks",
        overrides=overrides,
        scheduler=scheduler,
        progress=progress,
        manifest=manifest,
    )
    run = Run(work)
    m = resolve(run, manifest, overrides).manifest
    model = resolve_morphable_model(m)
    landmarks = run.table("landmarks")
    pairs = paired_landmarks(landmarks, truth)
    res = face_residuals(pairs["detected"], pairs["true"], pairs["scale"], pairs["roll"])
    meta = {
        "synth_dir": str(synth_dir),
        "synth_images": len(truth),
        "images_with_landmarks": int(len(res)),
        "model": model.name,
        "model_sha256": model.sha256,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    em = fit_error_model(res, pairs["yaw"], backend, made_by=meta)
    weight, by_weight, mean_shape = choose_prior_weight(landmarks, truth, model, m.stage_params("fit"), em)
    em = replace(
        em,
        identity_prior_weight=weight,
        made_by=em.made_by
        | {"identity_error_mm_by_prior_weight": by_weight, "mean_shape_error_mm": mean_shape},
    )
    data = em.to_json()
    atomic_write(Path(out), data)
    a, b = OUTER_EYE_CORNERS
    lm3 = model.mean.reshape(-1, 3)[model.landmarks]
    iod = float(np.linalg.norm(lm3[a] - lm3[b]))
    return {
        "path": str(Path(out).resolve()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "backend": backend,
        "images": int(len(res)),
        "error_by_group_iod": group_summary(res, iod),
        "sigma_mm_by_group": {
            g: round(float(np.mean(em.sigma_mm[list(ix)])), 3) for g, ix in LANDMARK_GROUPS.items()
        },
        "identity_prior_weight": weight,
        "identity_error_mm_by_prior_weight": by_weight,
        "mean_shape_error_mm": mean_shape,
        "work_run": str(work),
    }
