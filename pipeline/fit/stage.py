"""The fit stage: landmark table of one shard -> fits table (``schemas/fits.yaml``).

I/O edges only: parse and screen the landmarks, group the shard's images by subject into padded
batches (subjects of similar image count together, at most ``batch_images`` padded slots), run
the batched fit (:mod:`pipeline.fit.loop`) and lay the results out one row per input row.
Per-image problems become a ``failure_reason``; nothing here raises for bad landmark data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import array_api_compat.numpy as anp
import numpy as np
import pyarrow as pa

from pipeline.config.schemas import column_scheme, conform, load_schema
from pipeline.core import workercache
from pipeline.core.stage import Asset, ConfigView, Stage, StageContext, check_same_rows
from pipeline.embed.identity import ScreenParams, embedding_matrix, screen_identities
from pipeline.fit.camera import euler_deg
from pipeline.fit.identity import shrinkage
from pipeline.fit.loop import FitOptions, FitResult, LandmarkModel, SubjectFits, fit_subjects, prepare_model
from pipeline.fit.noise import (
    MANIFEST_KEY,
    ErrorModel,
    ErrorModelError,
    LandmarkNoise,
    load_error_model,
    prepare_noise,
    resolve_error_model,
    uniform,
)
from pipeline.fit.perspective import best_distance, camera_points, to_orthographic
from pipeline.fit.xp import get_namespace, resolve_backend
from pipeline.models.morphable_model import MorphableModel
from pipeline.storage.hashing import sha256_file

TOO_FEW = "too_few_landmarks"
DEGENERATE = "degenerate_geometry"
REJECTED = "rejected_reprojection"
MISSING = "missing_landmarks"
IDENTITY_MODES = ("subject", "image")
log = logging.getLogger(__name__)


def options_from_params(params: dict, error_model: ErrorModel | None = None) -> FitOptions:
    """FitOptions from ``stages.fit`` (defaults already filled by the manifest). An identity prior
    weight of null takes the error model's calibrated one (else 1, the MAP weight); so does an
    identity shrinkage of null (else none)."""
    id_weight = params["identity_prior_weight"]
    if id_weight is None:
        id_weight = error_model.identity_prior_weight if error_model is not None else None
    return FitOptions(
        max_iterations=int(params["max_iterations"]),
        tolerance=float(params["tolerance"]),
        identity_prior_weight=1.0 if id_weight is None else float(id_weight),
        expression_prior_weight=float(params["expression_prior_weight"]),
        robust_loss=str(params["robust_loss"]),
        huber_delta=float(params["huber_delta"]),
        pose_refine_steps=int(params["pose_refine_steps"]),
        contour=contour_on(params["contour"], error_model),
        reject_nme=None if params["reject_nme"] is None else float(params["reject_nme"]),
        shape_step=str(params["shape_step"]),
        gauss_newton=bool(params["gauss_newton"]),
        identity_shrinkage=shrinkage_from_params(params.get("identity_shrinkage"), error_model),
        camera=str(params.get("camera", "orthographic")),
        perspective_rounds=int(params.get("perspective_rounds", 4)),
        perspective_start_mm=float(params.get("perspective_start_mm", 1000.0)),
    )


def shrinkage_from_params(setting: dict | None, error_model: ErrorModel | None) -> tuple[float, float]:
    """``stages.fit.identity_shrinkage``: null = the error model's calibrated values, or none."""
    if setting is None:
        if error_model is None or error_model.identity_shrinkage is None:
            return (0.0, 0.0)
        return error_model.identity_shrinkage
    return (float(setting["common"]), float(setting["per_image"]))


def contour_on(setting: object, error_model: ErrorModel | None) -> bool:
    """``stages.fit.contour``: true/false, or auto = the error model's convention decides."""
    if setting == "auto":
        return error_model is not None and error_model.convention == "ibug"
    return bool(setting)


# --- parsing and screening -------------------------------------------------------------------
def parse_landmarks(table: pa.Table) -> tuple[np.ndarray, list[str | None]]:
    """(N, P, 2) float64 image pixels (NaN where null; P the points of the column's scheme) and
    the upstream failure reasons."""
    col = table.column("landmarks").combine_chunks()
    n, points = len(col), column_scheme(table.schema, "landmarks").points
    pts = np.full((n, points * 2), np.nan)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    if valid.any():
        pts[valid] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, points * 2)
    reasons = table.column("failure_reason").to_pylist()
    reasons = [
        r if r is not None else (None if ok else MISSING) for r, ok in zip(reasons, valid, strict=True)
    ]
    return pts.reshape(n, points, 2), reasons


def screen(
    pts: np.ndarray, reasons: list[str | None], min_landmarks: int, min_spread_px: float
) -> tuple[list[str | None], np.ndarray]:
    """Reasons for images that cannot be fitted, and landmark weights (N, 68) (0 = missing)."""
    finite = np.all(np.isfinite(pts), axis=-1)
    w = finite.astype(np.float64)
    count = finite.sum(axis=1)
    c = np.where(finite[..., None], pts, 0.0)
    mean = c.sum(axis=1) / np.maximum(count, 1)[:, None]
    d = np.where(finite[..., None], pts - mean[:, None, :], 0.0)
    cov = np.einsum("nli,nlj->nij", d, d) / np.maximum(count, 1)[:, None, None]
    ev = np.linalg.eigvalsh(cov)  # ascending: minor, major axis variance
    spread = np.sqrt(np.maximum(ev.sum(axis=1), 0.0))
    flat = np.sqrt(np.maximum(ev[:, 0], 0.0)) < 0.05 * np.sqrt(np.maximum(ev[:, 1], 0.0))
    out = np.asarray(reasons + [None], dtype=object)[:-1]  # object array, even if all None
    fresh = out == None  # noqa: E711  (element-wise None test on an object array)
    out[fresh & (count < min_landmarks)] = TOO_FEW
    degenerate = ~(spread >= min_spread_px) | flat
    out[fresh & (count >= min_landmarks) & degenerate] = DEGENERATE
    return out.tolist(), w


# --- batching --------------------------------------------------------------------------------
def plan_batches(counts: np.ndarray, batch_images: int) -> list[np.ndarray]:
    """Subject indices per batch: sorted by image count, cut so that S * M_max <= batch_images
    (a subject larger than the budget gets a batch of its own)."""
    order = np.argsort(counts, kind="stable")
    c = counts[order]
    batches, i = [], 0
    while i < len(c):
        j = np.arange(i + 1, len(c) + 1)
        fits = (j - i) * c[j - 1] <= batch_images
        end = i + 1 + int(np.flatnonzero(fits)[-1]) if fits.any() else i + 1
        batches.append(order[i:end])
        i = end
    return batches


def padded_slots(codes: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """(S, M) row indices of ``subjects``' rows in ``codes`` (-1 = padding), input order kept."""
    pos = np.full(int(codes.max()) + 1 if codes.size else 1, -1)
    pos[subjects] = np.arange(len(subjects))
    rows = np.flatnonzero((codes >= 0) & (pos[np.maximum(codes, 0)] >= 0))
    s = pos[codes[rows]]
    order = np.argsort(s, kind="stable")
    rows, s = rows[order], s[order]
    start = np.searchsorted(s, np.arange(len(subjects)))
    rank = np.arange(len(rows)) - start[s]
    M = int(rank.max()) + 1 if rows.size else 1
    slots = np.full((len(subjects), M), -1)
    slots[s, rank] = rows
    return slots


# --- the table -------------------------------------------------------------------------------
def _fixed_list(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    v = np.where(valid[:, None], values, 0.0).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), values.shape[1], mask=pa.array(~valid))


def _var_list(values: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> pa.Array:
    lengths = np.where(valid, lengths, 0)
    keep = np.arange(values.shape[1])[None, :] < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = values[keep].astype(np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(~valid))


def _float(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.float32), mask=~valid)


def fit_landmark_table(
    table: pa.Table,
    model: MorphableModel,
    opt: FitOptions,
    lm: LandmarkModel | None = None,
    backend: str = "numpy",
    min_landmarks: int = 34,
    min_spread_px: float = 2.0,
    batch_images: int = 512,
    precision: str = "float32",
    noise: LandmarkNoise | None = None,
    identity: str = "subject",
    embeddings: np.ndarray | None = None,
    screening: ScreenParams | None = None,
) -> pa.Table:
    """Fit every subject of a landmarks table; one conforming ``fits`` row per input row.

    ``lm`` (the prepared landmark model, e.g. from the worker cache) fixes namespace and dtype;
    without it one is built for ``backend`` and ``precision``. ``noise``: the landmark error
    model (:mod:`pipeline.fit.noise`); None = uniform, 1 mm. ``identity``: ``subject`` (one
    shared identity per subject) or ``image`` (every image fitted alone). ``embeddings`` (N, dim),
    NaN rows where missing, with ``screening``: images that are not the subject's person are
    kept out of its identity (:mod:`pipeline.embed.identity`; subject mode only).

    ``opt.camera`` perspective: the scaled-orthographic fit is repeated ``perspective_rounds``
    times on landmarks moved to where that camera would put them (:mod:`pipeline.fit.perspective`),
    the first time for pinholes at ``perspective_start_mm``, then at each image's estimated
    distance, which ``camera_distance_mm`` records.
    """

    def once(t: pa.Table) -> pa.Table:
        return _fit_once(
            t, model, opt, lm, backend, min_landmarks, min_spread_px, batch_images, precision,
            noise, identity, embeddings, screening,
        )  # fmt: skip

    fits = once(table)
    if opt.camera != "perspective":
        return fits
    observed, _ = parse_landmarks(table)
    mean, id_basis, exp_basis = model.landmark_model(column_scheme(table.schema, "landmarks"))
    distance = np.full(table.num_rows, float(opt.perspective_start_mm))
    for rnd in range(opt.perspective_rounds):
        alpha_id = _matrix(fits.column("alpha_id"), model.k_id)
        alpha_exp = _matrix(fits.column("alpha_exp"), model.k_exp)
        rotation = _matrix(fits.column("rotation"), 9).reshape(-1, 3, 3)
        t = _matrix(fits.column("translation"), 2)
        scale = fits.column("scale").to_numpy(zero_copy_only=False).astype(np.float64)
        fitted = (
            np.isfinite(alpha_id).all(1) & np.isfinite(alpha_exp).all(1) & np.isfinite(rotation).all((1, 2))
        ) & np.isfinite(scale)
        cam = camera_points(
            mean, id_basis, exp_basis, *(np.nan_to_num(a) for a in (alpha_id, alpha_exp, rotation))
        )
        t, scale = np.nan_to_num(t), np.nan_to_num(scale)
        if rnd > 0:
            distance = np.where(fitted, best_distance(observed, t, scale, cam), distance)
        moved = to_orthographic(observed, t, cam, np.where(fitted, distance, np.inf))
        fits = once(_with_landmarks(table, moved))
    fitted = fits.column("failure_reason").is_null().to_numpy(zero_copy_only=False)
    recorded = np.where(fitted & np.isfinite(distance), distance, np.nan)
    column = _float(recorded, np.isfinite(recorded))
    return fits.set_column(
        fits.schema.get_field_index("camera_distance_mm"), fits.schema.field("camera_distance_mm"), column
    )


def _matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A list column as an (N, width) float64 array, NaN rows where null."""
    out = np.full((len(column), width), np.nan)
    for i, v in enumerate(column.to_pylist()):
        if v is not None:
            out[i] = v
    return out


def _with_landmarks(table: pa.Table, points: np.ndarray) -> pa.Table:
    """``table`` with its non-null landmarks replaced by ``points`` (N, L, 2; NaN kept as missing)."""
    idx = table.schema.get_field_index("landmarks")
    old = table.column("landmarks").to_pylist()
    new = [
        None if o is None else points[i].reshape(-1).astype(np.float32).tolist() for i, o in enumerate(old)
    ]
    return table.set_column(
        idx, table.schema.field("landmarks"), pa.array(new, type=table.schema.field("landmarks").type)
    )


def _fit_once(
    table: pa.Table,
    model: MorphableModel,
    opt: FitOptions,
    lm: LandmarkModel | None,
    backend: str,
    min_landmarks: int,
    min_spread_px: float,
    batch_images: int,
    precision: str,
    noise: LandmarkNoise | None,
    identity: str,
    embeddings: np.ndarray | None,
    screening: ScreenParams | None,
) -> pa.Table:
    """One scaled-orthographic fit of the table (see :func:`fit_landmark_table`)."""
    if identity not in IDENTITY_MODES:
        raise ValueError(f"identity: expected one of {list(IDENTITY_MODES)}, got {identity!r}")
    xp = get_namespace(backend)
    if lm is None:
        scheme = column_scheme(table.schema, "landmarks")
        lm = prepare_model(model, xp, contour=opt.contour, dtype=getattr(xp, precision), scheme=scheme)
    n = table.num_rows
    pts, upstream = parse_landmarks(table)
    reasons, w_all = screen(pts, upstream, min_landmarks, min_spread_px)
    subjects = np.asarray(table.column("subject").to_pylist(), dtype=object)
    if identity == "subject" and screening is not None and embeddings is not None and embeddings.shape[1]:
        fresh = np.array([r is None for r in reasons], dtype=bool)
        judged = np.where(fresh[:, None], embeddings, np.nan)
        verdicts, _ = screen_identities(subjects, judged, screening)
        reasons = [r or v for r, v in zip(reasons, verdicts, strict=True)]
    ok = np.array([r is None for r in reasons], dtype=bool)
    if identity == "image":  # every image its own identity problem
        subj_names, codes_all = np.arange(n), np.arange(n)
    else:
        subj_names, codes_all = np.unique(subjects, return_inverse=True)
    n_subj = len(subj_names)
    codes = np.where(ok, codes_all, -1)
    counts = np.bincount(codes[ok], minlength=n_subj)
    T = opt.max_iterations
    sub = {
        "alpha_id": np.full((n_subj, lm.k_id), np.nan),
        "iterations": np.zeros(n_subj, np.int64),
        "converged": np.zeros(n_subj, bool),
        "objective": np.full(n_subj, np.nan),
        "history": np.full((n_subj, T), np.nan),
        "fitted": np.zeros(n_subj, bool),
    }
    img = {
        "alpha_exp": np.full((n, lm.k_exp), np.nan),
        "scale": np.full(n, np.nan),
        "rotation": np.full((n, 3, 3), np.nan),
        "translation": np.full((n, 2), np.nan),
        "rmse": np.full(n, np.nan),
        "nme": np.full(n, np.nan),
        "used": np.zeros(n, bool),
        "rejected": np.zeros(n, bool),
    }
    fitted_subjects = np.flatnonzero(counts > 0)
    for batch in plan_batches(counts[fitted_subjects], batch_images):
        sids = fitted_subjects[batch]
        slots = padded_slots(codes, sids)
        present = slots >= 0
        rows = np.where(present, slots, 0)
        v = np.swapaxes(pts[rows], -1, -2).copy()  # (S, M, 2, 68)
        v[..., 1, :] *= -1.0  # image y points down, the model's y up
        w = np.where(present[..., None], w_all[rows], 0.0)
        v = np.nan_to_num(v)  # missing points carry weight 0
        dt = lm.mean.dtype
        try:
            res = fit_subjects(
                lm, xp.asarray(v, dtype=dt), xp.asarray(w, dtype=dt), xp.asarray(present), opt, noise
            )
        except (ArithmeticError, ValueError, RuntimeError) as exc:  # LinAlgError is a ValueError
            res = _fit_alone(lm, xp, v, w, present, opt, exc, noise)
        r = res.result
        sub["alpha_id"][sids] = r.alpha_id
        sub["iterations"][sids] = r.iterations
        sub["converged"][sids] = r.converged
        sub["objective"][sids] = r.objective
        sub["history"][sids] = r.history
        sub["fitted"][sids] = True
        pr = slots[present]
        img["alpha_exp"][pr] = r.alpha_exp[present]
        img["scale"][pr] = r.scale[present]
        img["rotation"][pr] = r.rotation[present]
        t = r.translation[present]
        img["translation"][pr] = np.stack([t[:, 0], -t[:, 1]], axis=-1)
        img["rmse"][pr] = r.rmse_px[present]
        img["nme"][pr] = res.nme[present]
        img["used"][pr] = r.identity_mask[present]
        img["rejected"][pr] = res.rejected[present]

    # the identity's size, set after the fit (pipeline.fit.identity.shrinkage): the pattern stays
    in_identity = np.bincount(codes_all[img["used"]], minlength=n_subj).astype(np.float64)
    sub["alpha_id"] = sub["alpha_id"] * shrinkage(in_identity, *opt.identity_shrinkage)[:, None]

    # Per-image outcome after the fit.
    finite = (
        np.isfinite(img["scale"])
        & np.all(np.isfinite(img["rotation"].reshape(n, 9)), axis=1)
        & np.all(np.isfinite(img["alpha_exp"]), axis=1)
        & (img["scale"] > 0)
    )
    reasons_arr = np.asarray(reasons + [None], dtype=object)[:-1]
    reasons_arr[ok & ~finite] = DEGENERATE
    reasons_arr[ok & finite & img["rejected"]] = REJECTED
    reasons = reasons_arr.tolist()
    good = reasons_arr == None  # noqa: E711
    used = img["used"] & good
    images_used = np.bincount(codes_all[used], minlength=n_subj)
    sub_ok = sub["fitted"] & np.all(np.isfinite(sub["alpha_id"]), axis=1)
    row_sub_ok = sub_ok[codes_all]
    fitted_img = ok & finite  # pose/expression exist (also for rejected images)
    yaw, pitch, roll = (np.asarray(a) for a in euler_deg(anp.asarray(np.nan_to_num(img["rotation"]))))
    iters = sub["iterations"][codes_all]
    hist_valid = row_sub_ok & (iters > 0)
    k_id = lm.k_id
    cols = {
        "image_id": table.column("image_id"),
        "subject": table.column("subject"),
        "label": table.column("label"),
        "alpha_id": _var_list(sub["alpha_id"][codes_all], np.full(n, k_id), row_sub_ok),
        "alpha_exp": _var_list(img["alpha_exp"], np.full(n, lm.k_exp), fitted_img),
        "scale": _float(img["scale"], fitted_img),
        "rotation": _fixed_list(img["rotation"].reshape(n, 9), fitted_img),
        "yaw": _float(yaw, fitted_img),
        "pitch": _float(pitch, fitted_img),
        "roll": _float(roll, fitted_img),
        "translation": _fixed_list(img["translation"], fitted_img),
        "reproj_rmse_px": _float(img["rmse"], fitted_img),
        "reproj_nme": _float(img["nme"], fitted_img & np.isfinite(img["nme"])),
        "used": pa.array(used),
        "subject_images_used": pa.array(images_used[codes_all].astype(np.int32)),
        "iterations": pa.array(np.where(row_sub_ok, iters, 0).astype(np.int32)),
        "converged": pa.array(row_sub_ok & sub["converged"][codes_all]),
        "objective": _float(
            sub["objective"][codes_all], row_sub_ok & np.isfinite(sub["objective"][codes_all])
        ),
        "objective_history": _var_list(sub["history"][codes_all], iters, hist_valid),
        "failure_reason": pa.array(reasons, type=pa.string()),
        "camera_distance_mm": pa.nulls(n, pa.float32()),
    }
    out = pa.table(cols)
    meta = {
        "morphset.model.name": model.name,
        "morphset.model.sha256": model.sha256,
        "morphset.model.k_id": str(model.k_id),
        "morphset.model.k_exp": str(model.k_exp),
        "morphset.fit.array_backend": backend,
        "morphset.fit.identity": identity,
    }
    return conform(out, load_schema("fits"), meta)


def _fit_alone(
    lm: LandmarkModel,
    xp: Any,
    v: np.ndarray,
    w: np.ndarray,
    present: np.ndarray,
    opt: FitOptions,
    exc: Exception,
    noise: LandmarkNoise | None = None,
) -> SubjectFits:
    """A batched solve raised (a numerically singular system somewhere in the batch): fit the
    subjects one by one so one bad subject cannot sink the others; a subject that still fails
    gets NaN results, which the caller records as degenerate_geometry."""
    log.warning("fit: batched solve failed (%s); refitting %d subjects one by one", exc, v.shape[0])
    parts = []
    for i in range(v.shape[0]):  # error path only
        sl = slice(i, i + 1)
        try:
            dt = lm.mean.dtype
            parts.append(
                fit_subjects(
                    lm,
                    xp.asarray(v[sl], dtype=dt),
                    xp.asarray(w[sl], dtype=dt),
                    xp.asarray(present[sl]),
                    opt,
                    noise,
                )
            )
        except (ArithmeticError, ValueError, RuntimeError):
            parts.append(_nan_fits(lm, present[sl], opt))
    return _concat_fits(parts)


def _nan_fits(lm: LandmarkModel, present: np.ndarray, opt: FitOptions) -> SubjectFits:
    S, M = present.shape
    nan = np.nan
    r = FitResult(
        alpha_id=np.full((S, lm.k_id), nan),
        alpha_exp=np.full((S, M, lm.k_exp), nan),
        scale=np.full((S, M), nan),
        rotation=np.full((S, M, 3, 3), nan),
        translation=np.full((S, M, 2), nan),
        rmse_px=np.full((S, M), nan),
        objective=np.full(S, nan),
        history=np.full((S, opt.max_iterations), nan),
        iterations=np.zeros(S, np.int32),
        converged=np.zeros(S, bool),
        identity_mask=np.zeros((S, M), bool),
    )
    return SubjectFits(r, np.full((S, M), nan), np.zeros((S, M), bool))


def _concat_fits(parts: list[SubjectFits]) -> SubjectFits:
    fields = FitResult.__dataclass_fields__
    r = FitResult(**{k: np.concatenate([np.asarray(getattr(p.result, k)) for p in parts]) for k in fields})
    return SubjectFits(r, np.concatenate([p.nme for p in parts]), np.concatenate([p.rejected for p in parts]))


# --- the stage entry point -------------------------------------------------------------------
class FitStage(Stage):
    name = "fit"
    inputs = ("landmarks", "embed")
    table_settings = {"landmarks": "landmarks_table"}
    schema = "fits"
    depends_on = ("models.morphable_model", "models.landmark_error")
    # How, not what: NumPy and CuPy fits agree to float tolerance; the cache only holds the model.
    runtime = ("execution.array_backend", "cache_dir")
    doc = "alternating multi-image 3DMM fit per subject"

    def resources_for(self, config: ConfigView) -> dict[str, float]:
        backend = str(config.get("execution.array_backend", "auto") or "auto")
        return {} if backend == "numpy" else {"GPU": 1}

    def resolve_assets(self, config: ConfigView) -> dict[str, Asset]:
        from pipeline.models.assets import morphable_model_asset

        assets = {"morphable_model": morphable_model_asset(config)}
        path, why = error_model_file(config)
        if path is not None:
            assets["landmark_error"] = Asset(str(path), sha256_file(path), why)
        else:
            log.warning("fit: %s; fitting with uniform landmark noise (stages.fit.landmark_sigma_mm)", why)
        return assets

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        return run_shard(inputs, ctx)


def load_stage_model(ctx: StageContext) -> MorphableModel:
    """The driver's verified model file; resolved here only where that file is not visible (a worker
    on another machine without the shared cache)."""
    from pipeline.models.assets import load_model_asset, resolve_morphable_model

    asset = ctx.assets.get("morphable_model")
    if asset is not None and Path(asset.path).is_file():
        return load_model_asset(asset)
    return resolve_morphable_model(ctx.config)


def error_model_file(config: ConfigView) -> tuple[Path | None, str]:
    """The verified error model of this run's landmark backend, or (None, why not)."""
    if not config.stage_params("fit")["error_model"]:
        return None, "stages.fit.error_model is false"
    backend = str(config.stage_params("landmarks")["backend"])
    return resolve_error_model(config.get(f"{MANIFEST_KEY}.{backend}"), backend)


def error_model_for(ctx: StageContext) -> ErrorModel:
    """The task's error model: the driver's verified file (re-checked once per process), else
    uniform ``landmark_sigma_mm``."""
    asset = ctx.assets.get("landmark_error")
    sigma = float(ctx.params.as_dict()["landmark_sigma_mm"])

    def load() -> ErrorModel:
        if asset is None:
            return uniform(sigma)
        return load_error_model(asset.recheck(ErrorModelError))

    return workercache.get_or_create(
        ("fit.landmark_error", None if asset is None else asset.sha256, sigma), load
    )


def screening_from_params(params: dict) -> ScreenParams:
    return ScreenParams(
        outlier_distance=float(params["identity_outlier_distance"]),
        cluster_distance=float(params["identity_cluster_distance"]),
        ambiguous_ratio=float(params["identity_ambiguous_ratio"]),
    )


def _embeddings(inputs: dict[str, pa.Table], ctx: StageContext) -> np.ndarray | None:
    emb = inputs.get("embed")
    if emb is None:
        return None
    lms = inputs["landmarks"]
    check_same_rows(ctx, ("landmarks", lms), ("embed", emb), "embed")
    return embedding_matrix(emb.column("embedding"), emb.num_rows)


def run_shard(inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
    """Stage function: ``inputs["landmarks"]`` (and ``inputs["embed"]`` for the identity
    screening) -> fits table (see :func:`fit_landmark_table`)."""
    params = ctx.params.as_dict()
    error_model = error_model_for(ctx)
    opt = options_from_params(params, error_model)
    backend = resolve_backend(str(ctx.config.get("execution.array_backend", "auto") or "auto"))
    model = load_stage_model(ctx)
    precision = str(params["precision"])
    xp = get_namespace(backend)
    # the points of the scheme the landmarks table's column records, where the model's map of
    # that scheme puts them
    scheme = column_scheme(inputs["landmarks"].schema, "landmarks")
    lm = workercache.get_or_create(
        ("fit.landmark_model", model.sha256, backend, opt.contour, precision, scheme.name),
        lambda: prepare_model(model, xp, contour=opt.contour, dtype=getattr(xp, precision), scheme=scheme),
    )
    return fit_landmark_table(
        inputs["landmarks"],
        model,
        opt,
        lm=lm,
        backend=backend,
        min_landmarks=int(params["min_landmarks"]),
        min_spread_px=float(params["min_spread_px"]),
        batch_images=int(params["batch_images"]),
        noise=prepare_noise(error_model, lm.order, xp, lm.mean.dtype),
        identity=str(params["identity"]),
        embeddings=_embeddings(inputs, ctx),
        screening=screening_from_params(params),
    )
