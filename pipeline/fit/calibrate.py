"""``morphset calibrate``: a landmark backend's error model measured on rendered faces with truth.

I/O around :mod:`pipeline.fit.calibration`: a ``morphset synth`` folder (its images and
``ground_truth.parquet``) is built up to the landmarks stage in a work run with the chosen backend;
the detector's points are compared with the true landmark projections and the true camera; the
bias/noise model is fitted; then the identity prior weight is chosen on the same faces (the weight
among :data:`PRIOR_WEIGHTS` whose multi-image fits land nearest the true identities — the noise
model treats landmarks as independent, a detector's errors are not, and this measures by how much
to trust them instead of assuming it). With real photographs (``real_photos``: subject folders,
several photos per person) the choice is also held to them: only weights whose fits tell the
people apart at least as well as weight 1 (the maximum a posteriori weight, the untuned reference)
— per-image identity AUC and split-half consistency AUC, :mod:`pipeline.evaluate.photo_identity` —
may be chosen, because renders share two skins and one image model and flatter a fit. Last, the
identity shrinkage for that weight is measured on the renders (:func:`measure_shrinkage`: the
scale toward the mean shape that brings fits of M-image subsets nearest the truth, per M). The
result is written atomically as JSON; its sha256 goes into the manifest (``models.landmark_error.<backend>``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fit.calibration import (
    LANDMARK_GROUPS,
    face_residuals,
    fit_error_model,
    group_summary,
    subject_common_share,
)
from pipeline.fit.noise import ErrorModel
from pipeline.landmarks.base import N_POINTS as N_LANDMARKS
from pipeline.landmarks.scheme import IBUG68

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
    have = set(pq.read_schema(path).names)
    cols += [c for c in ("landmarks_2d_ibug",) if c in have]
    return {r["image_id"]: r for r in pq.read_table(path, columns=cols).to_pylist()}


TRUTH_COLUMN = {"fixed_vertex": "landmarks_2d", "ibug": "landmarks_2d_ibug"}


def paired_landmarks(
    landmarks: pa.Table, truth: dict[str, dict], convention: str = "fixed_vertex"
) -> dict[str, np.ndarray]:
    """Detected and true points (of ``convention``) of the images where the detector found all 68."""
    column = TRUTH_COLUMN[convention]
    if truth and column not in next(iter(truth.values())):
        raise ValueError(
            f"ground truth has no {column} column (written by morphset synth since ground_truth v2)"
        )
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
        "subject": np.array([x["subject"] for x in g]),
        "detected": np.array([r["landmarks"] for r in rows], np.float64).reshape(-1, N_LANDMARKS, 2),
        "true": np.array([x[column] for x in g], np.float64).reshape(-1, N_LANDMARKS, 2),
        "scale": np.array([x["scale"] for x in g], np.float64),
        "yaw": np.array([x["yaw"] for x in g], np.float64),
        "roll": np.array([x["roll"] for x in g], np.float64),
    }


def identity_error_mm(model: Any, alpha_est: np.ndarray, alpha_true: np.ndarray) -> float:
    """RMS distance (mm) over all vertices between two identity shapes after similarity alignment."""
    from pipeline.evaluate.identity_curve import all_vertex_error, identity_shape

    return all_vertex_error(identity_shape(model, alpha_est), identity_shape(model, alpha_true))


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
    contour = bool(options_from_params(fit_params).contour)
    lm = prepare_model(model, anp, contour=contour, dtype=np.float32)
    noise = prepare_noise(error_model, lm.order, anp, np.float32)
    for weight in PRIOR_WEIGHTS:
        opt = options_from_params(fit_params | {"identity_prior_weight": weight})
        fits = fit_landmark_table(landmarks, model, opt, lm=lm, noise=noise)
        per = {}
        for r in fits.select(["subject", "alpha_id"]).to_pylist():
            s = r["subject"]
            if r["alpha_id"] is not None and s in base and s not in per:
                per[s] = identity_error_mm(model, r["alpha_id"], subjects[s]["alpha_id"])
        errors[f"{weight:g}"] = round(float(np.mean(list(per.values()))), 4) if per else float("nan")
    best = min(errors, key=lambda k: (errors[k], float(k)))
    return float(best), errors, round(float(np.mean(list(base.values()))), 4)


SHRINK_GRID = tuple(np.round(np.arange(0.05, 1.0001, 0.05), 2))


def measure_shrinkage(
    landmarks: pa.Table,
    truth: dict[str, dict],
    model: Any,
    fit_params: dict,
    error_model: ErrorModel,
    ms: tuple[int, ...] = (1, 2, 4, 8),
    repeats: int = 3,
    seed: int = 0,
) -> tuple[tuple[float, float], dict[str, Any]]:
    """The identity shrinkage (``common``, ``per_image``) that brings the fits of random M-subsets of
    each subject's images nearest the true identities (all-vertex error, as the report's first
    table): the best factor per M on :data:`SHRINK_GRID`, then ``1/c - 1 = common + per_image/M``
    by non-negative least squares. Also returns the per-M factors and errors."""
    import array_api_compat.numpy as anp
    from scipy.optimize import nnls

    from pipeline.evaluate.identity_curve import all_vertex_error, identity_shape, subset_draws
    from pipeline.fit.loop import prepare_model
    from pipeline.fit.noise import prepare_noise
    from pipeline.fit.stage import fit_landmark_table, options_from_params

    subjects_true = _by_subject(truth)
    opt = options_from_params(
        fit_params | {"identity_shrinkage": {"common": 0.0, "per_image": 0.0}}, error_model
    )
    lm = prepare_model(model, anp, contour=opt.contour, dtype=np.float32)
    noise = prepare_noise(error_model, lm.order, anp, np.float32)
    subjects = np.asarray(landmarks.column("subject").to_pylist(), dtype=object)
    usable = np.array([r is None for r in landmarks.column("failure_reason").to_pylist()], bool)
    usable &= np.array([s in subjects_true for s in subjects], bool)
    rng = np.random.default_rng(seed)
    gt = {s: identity_shape(model, r["alpha_id"]) for s, r in subjects_true.items()}
    per_m: dict[str, dict] = {}
    for m in ms:
        rows, names, draws = subset_draws(subjects, usable, m, repeats, rng)
        if not draws:
            continue
        table = landmarks.take(pa.array(rows)).set_column(
            landmarks.schema.get_field_index("subject"), "subject", pa.array(names, pa.string())
        )
        fitted: dict[str, np.ndarray] = {}
        for r in (
            fit_landmark_table(table, model, opt, lm=lm, noise=noise)
            .select(["subject", "alpha_id"])
            .to_pylist()
        ):
            if r["alpha_id"] is not None:
                fitted.setdefault(r["subject"], np.asarray(r["alpha_id"], np.float64))
        pairs = [(fitted[name], gt[s]) for name, s in draws if name in fitted]
        if not pairs:
            continue
        errors = {
            c: float(np.mean([all_vertex_error(identity_shape(model, c * a), g) for a, g in pairs]))
            for c in SHRINK_GRID
        }
        best = min(errors, key=lambda c: (errors[c], -c))
        per_m[str(m)] = {
            "factor": float(best),
            "error_mm": round(errors[best], 4),
            "unshrunk_mm": round(errors[1.0], 4),
            "draws": len(pairs),
        }
    if not per_m:
        raise ValueError("no subject has images enough to measure the identity shrinkage")
    m_arr = np.array([float(k) for k in per_m])
    y = np.array([1.0 / d["factor"] - 1.0 for d in per_m.values()])
    design = np.stack([np.ones_like(m_arr), 1.0 / m_arr], axis=1)
    if len(m_arr) == 1:  # one M: all of it is common
        coef = np.array([max(y[0], 0.0), 0.0])
    else:
        coef, _ = nnls(design, y)
    return (round(float(coef[0]), 4), round(float(coef[1]), 4)), per_m


def write_halves(photos: Path, out: Path) -> None:
    """Each person's photos (subject folders under ``photos``) split into two subjects
    ``<person>__a`` and ``<person>__b`` under ``out`` (:func:`photo_identity.halves`)."""
    import shutil

    from pipeline.evaluate.photo_identity import halves

    if not photos.is_dir():
        raise FileNotFoundError(f"{photos}: real photos must be a folder of subject folders")
    by_person = {
        d.name: sorted(str(p) for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(photos.iterdir())
        if d.is_dir()
    }
    split = halves(by_person)
    if len(split) < 2:
        raise ValueError(f"{photos}: real photos need at least two people with two photos or more each")
    shutil.rmtree(out, ignore_errors=True)
    for person, parts in split.items():
        for tag, files in zip("ab", parts, strict=True):
            (out / f"{person}__{tag}").mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, out / f"{person}__{tag}" / Path(f).name)


def photo_landmarks(
    photos: str | Path,
    backend: str,
    work: Path,
    manifest: str | None,
    overrides: list[str] | None,
) -> tuple[pa.Table, pa.Table]:
    """Landmarks of real photos in subject folders: the photos as they are, and each person's photos
    split into two halves (``<person>__a``, ``<person>__b``; :func:`write_halves`)."""
    root = Path(photos).resolve()
    # beside the render run, not inside it: each is a run of its own
    halves_root = work.with_name(f"{work.name}-halves-photos")
    write_halves(root, halves_root)
    tables = []
    for name, tree in (("photos", root), ("halves", halves_root)):
        _, _, lms = _build_landmarks(
            work.with_name(f"{work.name}-{name}"),
            backend,
            manifest,
            overrides,
            f"calibration-{name}",
            {"root": str(tree), "layout": "subject-folders"},
        )
        tables.append(lms)
    return tables[0], tables[1]


def photo_measures(
    per_image: pa.Table,
    halves: pa.Table,
    model: Any,
    fit_params: dict,
    error_model: ErrorModel,
    weights: tuple[float, ...] = PRIOR_WEIGHTS,
    boot: int = 1000,
) -> dict[str, dict]:
    """Per prior weight: the per-image identity AUC and the split-half consistency of the photos."""
    import array_api_compat.numpy as anp

    from pipeline.evaluate.photo_identity import auc_with_interval, split_half_consistency
    from pipeline.fit.loop import prepare_model
    from pipeline.fit.noise import prepare_noise
    from pipeline.fit.stage import fit_landmark_table, options_from_params

    contour = bool(options_from_params(fit_params).contour)
    lm = prepare_model(model, anp, contour=contour, dtype=np.float32)
    noise = prepare_noise(error_model, lm.order, anp, np.float32)
    out = {}
    for weight in weights:
        opt = options_from_params(fit_params | {"identity_prior_weight": weight})
        rows = _usable(fit_landmark_table(per_image, model, opt, lm=lm, noise=noise, identity="image"))
        alpha = np.array([r["alpha_id"] for r in rows], np.float64)
        people = np.array([r["subject"] for r in rows])
        first: dict[str, list] = {}
        for r in _usable(fit_landmark_table(halves, model, opt, lm=lm, noise=noise, identity="subject")):
            first.setdefault(r["subject"], r["alpha_id"])
        out[f"{weight:g}"] = {
            "per_image": auc_with_interval(people, alpha / model.id_std, np.random.default_rng(0), boot),
            "split_half": split_half_consistency(
                np.array([s.rsplit("__", 1)[0] for s in first]),
                np.array(list(first.values()), np.float64),
                model.id_std,
                lambda a: model.shape(a.astype(np.float32)),
                np.random.default_rng(0),
                boot,
            ),
        }
    return out


def _usable(fits: pa.Table) -> list[dict]:
    return [
        r
        for r in fits.select(["subject", "alpha_id", "failure_reason"]).to_pylist()
        if r["failure_reason"] is None and r["alpha_id"] is not None
    ]


def weights_photos_allow(photo: dict[str, dict], reference: str = "1") -> list[str]:
    """The weights whose per-image and split-half AUCs on the photos are at least weight 1's."""
    ref = photo[reference]

    def auc(d: dict, key: str) -> float:
        v = d[key]["auc"]
        return -np.inf if v is None else v

    return [
        w
        for w, d in photo.items()
        if auc(d, "per_image") >= auc(ref, "per_image") and auc(d, "split_half") >= auc(ref, "split_half")
    ]


def _by_subject(truth: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in truth.values():
        out.setdefault(r["subject"], r)
    return out


def _build_landmarks(
    work: Path,
    backend: str,
    manifest: str | None,
    overrides: list[str] | None,
    name: str,
    dataset: dict[str, Any],
) -> tuple[Any, Any, pa.Table]:
    """Build a work run up to the embed stage in this process (:mod:`pipeline.core.inprocess`) on
    a dataset entry of its own; (its manifest, the morphable model, its landmarks). The work run
    remembers what it is: ``morphset fit WORK`` fits it later."""
    from pipeline.config.manifest import load_manifest
    from pipeline.core.inprocess import build_in_process
    from pipeline.core.tables import RunTables
    from pipeline.models.assets import resolve_morphable_model

    m = load_manifest(manifest, overrides).with_overrides({"stages.landmarks.backend": backend})
    # until embed (off for renders, so free): the work run is then ready for `morphset fit`
    run, _ = build_in_process(work, m, name, dataset, until="embed")
    return m, resolve_morphable_model(m), RunTables(run, m).table("landmarks")


def _write(em: ErrorModel, out: str | Path, work: Path, images: int, **extra: Any) -> dict[str, Any]:
    """Write the model atomically; the summary every calibration returns."""
    from pipeline.storage.atomic import atomic_write

    data = em.to_json()
    atomic_write(Path(out), data)
    return {
        "path": str(Path(out).resolve()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "backend": em.backend,
        "convention": em.convention,
        "images": int(images),
        **extra,
        "sigma_mm_by_group": {
            g: round(float(np.mean(em.sigma_mm[list(ix)])), 3) for g, ix in LANDMARK_GROUPS.items()
        },
        "identity_prior_weight": em.identity_prior_weight,
        "identity_shrinkage": None
        if em.identity_shrinkage is None
        else {"common": em.identity_shrinkage[0], "per_image": em.identity_shrinkage[1]},
        "work_run": str(work),
    }


def calibrate(
    synth_dir: str | Path,
    backend: str,
    out: str | Path,
    work_run: str | Path | None = None,
    ground_truth: str | Path | None = None,
    manifest: str | None = None,
    overrides: list[str] | None = None,
    convention: str = "fixed_vertex",
    real_photos: str | Path | None = None,
) -> dict[str, Any]:
    """Measure ``backend``'s error model on a synth folder; write it to ``out``; return a summary.

    ``convention``: the true landmarks the detector is compared with — ``ibug`` (jaw on the face
    outline, what dlib and FAN are trained to mark; the fit then matches the jaw to the outline
    by contour marching) or ``fixed_vertex`` (the model's landmark vertices)."""
    if convention not in TRUTH_COLUMN:
        raise ValueError(f"convention: expected one of {list(TRUTH_COLUMN)}, got {convention!r}")
    from pipeline.fit.loop import OUTER_EYE_CORNERS

    synth_dir = Path(synth_dir).resolve()
    truth_path = Path(ground_truth or synth_dir / "ground_truth.parquet")
    truth = read_truth(truth_path)
    truth_md = pq.read_schema(truth_path).metadata or {}
    work = Path(work_run) if work_run is not None else Path(out).with_suffix(".run")
    m, model, landmarks = _build_landmarks(
        work,
        backend,
        manifest,
        overrides,
        "calibration-renders",
        {"root": str(synth_dir), "layout": "subject-folders", "synthetic": True},
    )
    pairs = paired_landmarks(landmarks, truth, convention)
    res = face_residuals(pairs["detected"], pairs["true"], pairs["scale"], pairs["roll"])
    meta = {
        "synth_dir": str(synth_dir),
        # what made the faces: `morphset synth` records its parameters and seed in the ground truth
        "synth_params": json.loads(truth_md.get(b"morphset.synth.params", b"null").decode()),
        "convention": convention,
        "synth_images": len(truth),
        "images_with_landmarks": int(len(res)),
        "model": model.name,
        "model_sha256": model.sha256,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    em = fit_error_model(res, pairs["yaw"], backend, convention=convention, made_by=meta)
    fit_params = m.stage_params("fit") | {"contour": convention == "ibug"}
    weight, by_weight, mean_shape = choose_prior_weight(landmarks, truth, model, fit_params, em)
    chosen_by: dict[str, Any] = {
        "identity_error_mm_by_prior_weight": by_weight,
        "mean_shape_error_mm": mean_shape,
    }
    if real_photos is not None:
        photos, halves = photo_landmarks(real_photos, backend, work, manifest, overrides)
        photo = photo_measures(photos, halves, model, fit_params, em)
        allowed = weights_photos_allow(photo)
        weight = float(min(allowed, key=lambda k: (by_weight[k], float(k))))
        chosen_by |= {
            "real_photos": str(Path(real_photos).resolve()),
            "real_photo_auc_by_prior_weight": {
                w: {"per_image": d["per_image"]["auc"], "split_half": d["split_half"]["auc"]}
                for w, d in photo.items()
            },
            "weights_real_photos_allow": allowed,
        }
    else:
        log.warning(
            "calibrate: the identity prior weight (%g) was chosen on renders alone; renders share two "
            "skins and one image model and flatter a fit: pass --real-photos to hold it to real "
            "photographs (docs/fit.md)",
            weight,
        )
    em = replace(em, identity_prior_weight=weight)
    shrink, shrink_by_m = measure_shrinkage(
        landmarks, truth, model, fit_params | {"identity_prior_weight": weight}, em
    )
    chosen_by |= {"identity_shrinkage_by_images": shrink_by_m}
    em = replace(em, identity_shrinkage=shrink, made_by=em.made_by | chosen_by)
    a, b = OUTER_EYE_CORNERS
    lm3 = model.landmarks_of(IBUG68).locate(model.mean.reshape(-1, 3))
    iod = float(np.linalg.norm(lm3[a] - lm3[b]))
    extra: dict[str, Any] = {}
    try:  # what more images per subject cannot average away (needs subjects with 2+ images)
        share, _ = subject_common_share(res, pairs["yaw"], pairs["subject"], em)
        extra["subject_common_share_by_group"] = {
            g: round(float(np.mean(share[list(ix)])), 3) for g, ix in LANDMARK_GROUPS.items()
        }
    except ValueError as exc:
        log.info("calibration: %s", exc)
    return _write(
        em,
        out,
        work,
        len(res),
        error_by_group_iod=group_summary(res, iod),
        **chosen_by,
        **extra,
    )


# --- from annotated photos: iBUG .pts files beside the images -----------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def read_pts(path: str | Path) -> np.ndarray:
    """The 68 points (pixels, x y) of an iBUG ``.pts`` file (``version: 1``, ``n_points: 68``,
    ``{`` one ``x y`` per line ``}``). 300-W's files are 1-based (the first pixel's centre is 1.0);
    the result is 0-based like every landmark in morphset."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "{") + 1
        end = next(i for i, ln in enumerate(lines) if ln.strip() == "}")
    except StopIteration:
        raise ValueError(f"{path}: not an iBUG .pts file (no '{{' ... '}}' block)") from None
    pts = []
    for n, ln in enumerate(lines[start:end], start + 1):
        try:
            x, y = (float(v) for v in ln.split())
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'x y', got {ln.strip()!r}") from None
        pts.append((x - 1.0, y - 1.0))
    if len(pts) != N_LANDMARKS:
        raise ValueError(f"{path}: {len(pts)} points, expected {N_LANDMARKS}")
    return np.asarray(pts, np.float64)


def calibrate_from_annotations(
    image_dir: str | Path,
    backend: str,
    out: str | Path,
    work_run: str | Path | None = None,
    manifest: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """An ``ibug``-convention error model from photos with hand-made 68-point annotations.

    Every image under ``image_dir`` with a ``.pts`` file of the same stem is detected and
    landmarked with ``backend``; its pose and scale come from fitting the model to the annotation
    alone (no 3D truth here), and the detector's offsets from the annotation, in those face units,
    make the model. Without true shapes the identity prior weight cannot be measured: the file has
    none (the fit then uses ``stages.fit.identity_prior_weight``, or 1)."""
    import array_api_compat.numpy as anp

    from pipeline.fit.camera import euler_deg
    from pipeline.fit.loop import prepare_model
    from pipeline.fit.noise import prepare_noise, uniform
    from pipeline.fit.stage import fit_landmark_table, options_from_params
    from pipeline.storage.atomic import atomic_write

    root = Path(image_dir).resolve()
    images = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".pts").is_file()
    )
    if not images:
        raise FileNotFoundError(f"{root}: no image with a .pts annotation beside it")
    work = Path(work_run) if work_run is not None else Path(out).with_suffix(".run")
    work.mkdir(parents=True, exist_ok=True)
    list_file = work / "annotated.csv"
    rel = [p.relative_to(root).as_posix() for p in images]
    # every image is its own subject: the annotation fixes its pose, no identity is shared
    atomic_write(list_file, "".join(f"{r},{r}\n" for r in rel).encode())
    m, model, detected = _build_landmarks(
        work, backend, manifest, overrides, "calibration-annotated",
        {"root": str(root), "layout": "list-file", "list_file": str(list_file)},
    )  # fmt: skip
    annotated = {r: read_pts(p.with_suffix(".pts")) for r, p in zip(rel, images, strict=True)}
    # pose and scale from the annotations (contour marching: they are iBUG-convention)
    truth_table = detected.set_column(
        detected.schema.get_field_index("landmarks"),
        "landmarks",
        pa.array(
            [
                annotated[i].reshape(-1).astype(np.float32).tolist()
                for i in detected.column("image_id").to_pylist()
            ],
            detected.schema.field("landmarks").type,
        ),
    ).set_column(
        detected.schema.get_field_index("failure_reason"),
        "failure_reason",
        pa.nulls(detected.num_rows, pa.string()),
    )
    opt = options_from_params(m.stage_params("fit") | {"contour": True, "identity_prior_weight": 1.0})
    lm = prepare_model(model, anp, contour=True, dtype=np.float64)
    fits = fit_landmark_table(
        truth_table, model, opt, lm=lm, noise=prepare_noise(uniform(2.0), lm.order, anp, np.float64)
    )
    fit_rows = {
        r["image_id"]: r for r in fits.select(["image_id", "scale", "rotation", "failure_reason"]).to_pylist()
    }
    keep = [
        r
        for r in detected.select(["image_id", "landmarks", "failure_reason"]).to_pylist()
        if r["landmarks"] is not None
        and r["failure_reason"] is None
        and fit_rows[r["image_id"]]["failure_reason"] is None
    ]
    if len(keep) < 2:
        raise ValueError(
            f"{root}: only {len(keep)} annotated image(s) were detected and fitted; calibration needs more"
        )
    R = np.array([fit_rows[r["image_id"]]["rotation"] for r in keep], np.float64).reshape(-1, 3, 3)
    yaw, _, roll = (np.asarray(a) for a in euler_deg(anp.asarray(R)))
    scale = np.array([fit_rows[r["image_id"]]["scale"] for r in keep], np.float64)
    det = np.array([r["landmarks"] for r in keep], np.float64).reshape(-1, N_LANDMARKS, 2)
    ann = np.array([annotated[r["image_id"]] for r in keep])
    res = face_residuals(det, ann, scale, roll)
    meta = {"annotated_dir": str(root), "annotated_images": len(images), "images_with_landmarks": len(keep),
            "model": model.name, "model_sha256": model.sha256, "pose_from": "the fit to each annotation alone",
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    em = fit_error_model(res, yaw, backend, convention="ibug", made_by=meta)
    return _write(em, out, work, len(keep))
