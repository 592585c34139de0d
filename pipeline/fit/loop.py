"""The alternating multi-image fit, batched over subjects.

One iteration (:func:`_sweep`) for every active subject at once:
(1) pose of every image (closed-form scaled-orthographic camera, then warm-started refinement),
(2)+(3) identity of every subject from all its images stacked, with each image's expression
eliminated (Schur complement), then each image's expression given that identity
(``shape_step="alternating"`` solves expression then identity instead, as in eos),
(4) optionally one damped Gauss-Newton step on all parameters, kept only where it lowers the
objective (removes the slow pose/shape coupling of plain alternation: ~4 instead of ~25 iterations).

Inputs are stacked and padded: ``v`` (S, M, 2, L) observations, y up, ``w`` (S, M, L) landmark
weights (0 for a missing landmark, a padded image slot or an image not fitted).
:func:`fit_subjects` takes image pixels and fits in face units (millimetres on the face,
:mod:`pipeline.fit.normalize`) with each landmark weighted by its inverse noise variance and its
detector's bias subtracted at the current pose (:mod:`pipeline.fit.noise`): the objective is then
dimensionless (squared residuals over the noise variance; priors on whitened coefficients), and
nothing the user sets depends on the image size. A subject
stops when its relative objective change falls to the tolerance; later iterations gather only the
still-active subjects, so a subject's result does not depend on which others share its batch.

:func:`fit_batch` is one alternating run; :func:`fit_subjects` adds the reprojection-error
rejection pass and returns host (NumPy) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.fit import contour as contour_mod
from pipeline.fit import robust
from pipeline.fit.camera import estimate_camera
from pipeline.fit.expression import expression_prior, solve_expression
from pipeline.fit.identity import identity_prior, shape_system, solve_identity, solve_identity_joint
from pipeline.fit.joint import lm_step
from pipeline.fit.linear import shape_points
from pipeline.fit.noise import LandmarkNoise, bias_at
from pipeline.fit.normalize import face_frame, to_face, to_image
from pipeline.fit.objective import residuals, rmse_px, subject_objective
from pipeline.fit.xp import namespace_of, to_numpy
from pipeline.landmarks.scheme import IBUG68, LandmarkScheme
from pipeline.models.morphable_model import MorphableModel

Array = Any
OUTER_EYE_CORNERS = IBUG68.outer_eye_corners
SHAPE_STEPS = ("joint", "alternating")
# The detector bias is looked up at the pose of the first BIAS_UPDATES sweeps, then held: the pose
# is settled by then (the lookup is at 10-degree resolution), and a fixed target lets the objective
# converge as fast as without a bias model.
BIAS_UPDATES = 2
# Contour marching re-picks the outline vertices in the first CONTOUR_UPDATES sweeps, then holds
# them: each re-pick changes the objective discretely, and re-picking to the end took ~15 instead
# of ~4 iterations for the same identity.
CONTOUR_UPDATES = 4


@dataclass(frozen=True)
class FitOptions:
    """Fit parameters; the stage fills them from ``stages.fit`` (see stage.fit.schema.json)."""

    max_iterations: int = 20
    tolerance: float = 1e-4
    identity_prior_weight: float = 1.0
    expression_prior_weight: float = 1.0
    robust_loss: str = "none"
    huber_delta: float = 3.0  # in units of each landmark's noise sigma
    pose_refine_steps: int = 3
    contour: bool = False
    reject_nme: float | None = None
    shape_step: str = "joint"
    gauss_newton: bool = True
    # (common, per_image): a subject's identity scaled by 1 / (1 + common + per_image / M) after
    # the fit (M its images in the identity); (0, 0) = none. See pipeline.fit.identity.shrinkage
    identity_shrinkage: tuple[float, float] = (0.0, 0.0)
    # orthographic, or perspective: pinholes estimated per image around the orthographic fit
    # (pipeline.fit.perspective; the stage's fit_landmark_table runs the rounds)
    camera: str = "orthographic"
    perspective_rounds: int = 4
    perspective_start_mm: float = 1000.0

    def __post_init__(self) -> None:
        if self.camera not in ("orthographic", "perspective"):
            raise ValueError(f"camera: expected orthographic or perspective, got {self.camera!r}")
        if self.perspective_rounds < 1 or not self.perspective_start_mm > 0:
            raise ValueError("perspective_rounds must be >= 1 and perspective_start_mm > 0")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if self.robust_loss not in robust.LOSSES:
            raise ValueError(f"robust_loss: expected one of {list(robust.LOSSES)}, got {self.robust_loss!r}")
        if self.shape_step not in SHAPE_STEPS:
            raise ValueError(f"shape_step: expected one of {list(SHAPE_STEPS)}, got {self.shape_step!r}")
        if self.identity_prior_weight < 0 or self.expression_prior_weight < 0:
            raise ValueError("prior weights must be >= 0")
        if not self.huber_delta > 0:
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")
        if len(self.identity_shrinkage) != 2 or not all(v >= 0 for v in self.identity_shrinkage):
            raise ValueError(f"identity_shrinkage must be two numbers >= 0, got {self.identity_shrinkage}")


@dataclass(frozen=True)
class LandmarkModel:
    """The model restricted to the landmarks, component-major, in the fitting namespace.

    Coefficients are solved in whitened units (alpha / std): the prior becomes lam * I and the
    normal matrices are far better conditioned, which is what lets float32 converge as fast as
    float64. :func:`fit_batch` returns coefficients in model units.

    With contour correspondence the landmarks are reordered so the re-picked contour landmarks
    come first (``order``); observations are permuted the same way inside :func:`fit_batch`.
    """

    mean: Array  # (3, L)
    id_basis: Array  # (3, L, k_id), whitened: columns scaled by the model's id_std
    exp_basis: Array  # (3, L, k_exp), whitened
    id_std: Array  # std of the internal (whitened) coefficients: ones
    exp_std: Array
    id_scale: Array  # model id_std: alpha_id = internal coefficients * id_scale
    exp_scale: Array
    shape_basis: Array  # concat([exp_basis, id_basis], -1), the shape step's columns
    order: np.ndarray  # (L,) landmark order used internally
    iod_mm: float  # mean-shape outer-eye-corner distance, for pose-independent NME
    contour: contour_mod.ContourBasis | None = None
    eye_corners: tuple[int, int] = OUTER_EYE_CORNERS  # the scheme's outer eye corners (input order)

    @property
    def k_id(self) -> int:
        return int(self.id_basis.shape[-1])

    @property
    def k_exp(self) -> int:
        return int(self.exp_basis.shape[-1])


def prepare_model(
    model: MorphableModel,
    xp: Any,
    contour: bool = False,
    dtype: Any = None,
    scheme: LandmarkScheme = IBUG68,
) -> LandmarkModel:
    """Move the landmark part of ``model`` to the namespace ``xp`` (float64 unless ``dtype``):
    the points of ``scheme`` where the model's map of that scheme puts them (a vertex or a
    barycentric point each; a model without such a map is refused). Contour marching is defined
    for iBUG-68 only."""
    dtype = dtype if dtype is not None else xp.float64
    if contour and scheme is not IBUG68:
        raise ValueError(f"contour marching is defined for iBUG-68 only, not for {scheme.name!r}")
    mean, idb, expb = model.landmark_model(scheme)
    cb = None
    order = np.arange(scheme.points)
    if contour:
        cand = contour_mod.build_candidates(model)
        cb = contour_mod.contour_basis(model, cand, xp, dtype, whiten=True)
        rest = np.setdiff1d(order, cand.landmark_ids)
        order = np.concatenate([cand.landmark_ids, rest])
    a, b = scheme.outer_eye_corners
    iod_mm = float(np.linalg.norm(mean[a] - mean[b]))
    mean, idb, expb = mean[order], idb[order] * model.id_std, expb[order] * model.exp_std
    return LandmarkModel(
        mean=xp.asarray(np.ascontiguousarray(mean.T), dtype=dtype),
        id_basis=xp.asarray(np.ascontiguousarray(np.moveaxis(idb, 1, 0)), dtype=dtype),
        exp_basis=xp.asarray(np.ascontiguousarray(np.moveaxis(expb, 1, 0)), dtype=dtype),
        id_std=xp.ones((model.k_id,), dtype=dtype),
        exp_std=xp.ones((model.k_exp,), dtype=dtype),
        id_scale=xp.asarray(model.id_std, dtype=dtype),
        exp_scale=xp.asarray(model.exp_std, dtype=dtype),
        shape_basis=xp.asarray(
            np.ascontiguousarray(np.moveaxis(np.concatenate([expb, idb], -1), 1, 0)), dtype=dtype
        ),
        order=order,
        iod_mm=iod_mm,
        contour=cb,
        eye_corners=scheme.outer_eye_corners,
    )


@dataclass
class FitResult:
    """Per-subject and per-image results (arrays of the fitting namespace or NumPy)."""

    alpha_id: Array  # (S, k_id)
    alpha_exp: Array  # (S, M, k_exp)
    scale: Array  # (S, M) px per mm
    rotation: Array  # (S, M, 3, 3)
    translation: Array  # (S, M, 2) y-up pixels
    rmse_px: Array  # (S, M)
    objective: Array  # (S,)
    history: Array  # (S, T) NaN after the subject stopped
    iterations: Array  # (S,)
    converged: Array  # (S,)
    identity_mask: Array  # (S, M) images in the identity solve


def _bases(lm: LandmarkModel, choice: Array | None) -> tuple[Array, Array, Array]:
    """Shared (3, L, k) bases, or per-image ones with the current contour vertices swapped in."""
    if lm.contour is None or choice is None:
        return lm.mean, lm.id_basis, lm.exp_basis
    xp = namespace_of(choice)
    n_c = lm.contour.n_contour
    cm, ci, ce = contour_mod.gather(lm.contour, choice)
    lead = tuple(choice.shape[:2])

    def join(c: Array, fixed: Array) -> Array:
        rest = xp.broadcast_to(fixed[:, n_c:, ...], lead + tuple(fixed[:, n_c:, ...].shape))
        return xp.concat([c, rest], axis=3)

    return join(cm, lm.mean), join(ci, lm.id_basis), join(ce, lm.exp_basis)


def _sweep(
    lm: LandmarkModel,
    first: bool,
    v: Array,
    w: Array,
    w_rob: Array,
    in_id: Array,
    st: dict[str, Array],
    mu: Array,
    opt: FitOptions,
    id_prec: Array,
    exp_prec: Array,
    delta: Array | float,
    reselect_contour: bool = True,
) -> tuple[dict[str, Array], Array, Array, Array]:
    """One iteration for a set of subjects: returns (new state, objective (S,), residuals, mu)."""
    xp = namespace_of(v, w)
    a_id, a_exp, choice = st["a_id"], st["a_exp"], st.get("choice")
    w_id = w_rob * xp.astype(in_id, v.dtype)[..., None]
    mean_i, idb_i, expb_i = _bases(lm, choice)
    # (1) pose of every image from the current shape; closed form on the first sweep, then
    # warm-started (the refinement never increases the residual, so a sweep never undoes progress)
    neutral = shape_points(mean_i, idb_i, a_id[:, None, :])
    X = neutral + (expb_i @ a_exp[..., None, :, None])[..., 0]
    init = None if first else (st["f"], st["R"])
    f, R, t = estimate_camera(X, v, w_rob, opt.pose_refine_steps, init)
    if lm.contour is not None and reselect_contour:
        choice = contour_mod.select_silhouette(lm.contour, a_id, a_exp, f, R, t)
        mean_i, idb_i, expb_i = _bases(lm, choice)
        neutral = shape_points(mean_i, idb_i, a_id[:, None, :])
    system = None
    if opt.shape_step == "alternating":
        # (2) expression of every image, (3) identity of every subject from its stacked images
        a_exp = solve_expression(v, w_rob, f, R, t, neutral, expb_i, exp_prec)
        no_id = mean_i + (expb_i @ a_exp[..., None, :, None])[..., 0]
        a_id = solve_identity(v, w_id, f, R, t, no_id, idb_i, id_prec)
    else:
        # (3) identity with every expression eliminated, then (2) expression given it
        shared = lm.contour is None  # one basis for all images: keep the pre-joined columns
        system = shape_system(f, R, w_id, idb_i, expb_i, lm.shape_basis if shared else None)
        a_id = solve_identity_joint(v, w_id, f, R, t, mean_i, idb_i, expb_i, id_prec, exp_prec, system)
        neutral = shape_points(mean_i, idb_i, a_id[:, None, :])
        exp_rows = system.J[..., : lm.k_exp]  # same pose: reuse the expression columns
        a_exp = solve_expression(v, w_rob, f, R, t, neutral, expb_i, exp_prec, exp_rows)

    def evaluate(f: Array, R: Array, t: Array, a_id: Array, a_exp: Array) -> tuple[Array, Array]:
        X = shape_points(mean_i, idb_i, a_id[:, None, :]) + (expb_i @ a_exp[..., None, :, None])[..., 0]
        res = residuals(v, X, f, R, t)
        E = subject_objective(res, w, in_id, a_id, a_exp, id_prec, exp_prec, opt.robust_loss, delta)
        return E, res

    E, res = evaluate(f, R, t, a_id, a_exp)
    if opt.gauss_newton:
        # (4) one damped joint step on everything; kept only where it lowers the objective
        cand = lm_step(
            v, w_rob, in_id, f, R, t, a_id, a_exp, mean_i, idb_i, expb_i, id_prec, exp_prec, mu, system
        )
        E_c, res_c = evaluate(*cand)
        ok = E_c < E  # NaN (a failed solve) is never accepted
        o1, o2, o3 = ok[:, None], ok[:, None, None], ok[:, None, None, None]
        f, R, t = xp.where(o1, cand[0], f), xp.where(o3, cand[1], R), xp.where(o2, cand[2], t)
        a_id, a_exp = xp.where(o1, cand[3], a_id), xp.where(o2, cand[4], a_exp)
        res, E = xp.where(o3, res_c, res), xp.where(ok, E_c, E)
        mu = xp.where(ok, xp.maximum(mu / 3.0, 1e-9), xp.minimum(mu * 4.0, 1e9))
    new = {"a_id": a_id, "a_exp": a_exp, "f": f, "R": R, "t": t}
    if choice is not None:
        new["choice"] = choice
    return new, E, res, mu


def fit_batch(
    lm: LandmarkModel,
    v: Array,
    w: Array,
    fit_mask: Array,
    identity_mask: Array,
    opt: FitOptions,
    noise: LandmarkNoise | None = None,
) -> FitResult:
    """One alternating run over a padded batch (all arrays in one namespace, landmarks in 0..67 order).

    v (S, M, 2, 68) y up, in the units of ``noise`` (face millimetres; :func:`fit_subjects`
    converts pixels); w (S, M, 68) weights; fit_mask (S, M) images to fit; identity_mask (S, M)
    images whose landmarks enter the identity solve (subset of fit_mask). ``noise``: landmark
    weights 1/sigma^2, Huber thresholds ``huber_delta * sigma`` and the bias subtracted at each
    iteration's pose; None = unit noise, no bias (the threshold in the units of ``v``).

    Each iteration works only on the subjects still active (gathered, solved, scattered back),
    so a batch costs what its subjects need, not max(iterations) for everyone, and a subject's
    result does not depend on which other subjects share its batch.
    """
    xp = namespace_of(v, w, fit_mask)
    dt = v.dtype
    S, M = v.shape[:2]
    order = xp.asarray(lm.order)
    v = xp.take(v, order, axis=-1)
    w = xp.take(w, order, axis=-1) * xp.astype(fit_mask, dt)[..., None]
    delta: Array | float = opt.huber_delta
    if noise is not None:
        w = w * noise.inv_var
        delta = opt.huber_delta * noise.sigma
    in_id = identity_mask & fit_mask
    id_prec = identity_prior(lm.id_std, opt.identity_prior_weight)
    exp_prec = expression_prior(lm.exp_std, opt.expression_prior_weight)

    state = {
        "a_id": xp.zeros((S, lm.k_id), dtype=dt),
        "a_exp": xp.zeros((S, M, lm.k_exp), dtype=dt),
        "f": xp.ones((S, M), dtype=dt),
        "R": xp.zeros((S, M, 3, 3), dtype=dt) + xp.eye(3, dtype=dt),
        "t": xp.zeros((S, M, 2), dtype=dt),
    }
    if lm.contour is not None:  # start from the model's own vertices (candidate 0)
        state["choice"] = xp.zeros((S, M, lm.contour.n_contour), dtype=xp.int64)
    w_rob = xp.asarray(w, copy=True)  # IRLS-weighted copy, updated in place per subject
    mu = xp.full((S,), 1e-3, dtype=dt)  # Levenberg-Marquardt damping per subject
    T = opt.max_iterations
    history = xp.full((S, T), xp.nan, dtype=dt)
    active = to_numpy(xp.any(fit_mask, axis=1)).astype(bool)
    iterations = np.zeros(S, dtype=np.int32)
    converged = np.zeros(S, dtype=bool)
    E_prev = xp.zeros((S,), dtype=dt)
    E_last = xp.full((S,), xp.nan, dtype=dt)
    v_obs = v  # the detector's points; v: what the sweeps fit (less the detector's expected offset)
    biased = noise is not None and noise.bias is not None
    if biased:
        # the detector's offset at each image's pose; the first pose comes from the mean shape
        f0, R0, _ = estimate_camera(lm.mean, v, w, opt.pose_refine_steps)
        v = v_obs - bias_at(noise, f0, R0)

    for it in range(T):
        idx_h = np.flatnonzero(active)
        if idx_h.size == 0:
            break
        full = idx_h.size == S
        idx = xp.asarray(idx_h)

        def sub(a: Array, full: bool = full, idx: Array = idx) -> Array:
            return a if full else xp.take(a, idx, axis=0)

        new, E, res, mu_n = _sweep(
            lm,
            it == 0,
            sub(v),
            sub(w),
            sub(w_rob),
            sub(in_id),
            {k: sub(a) for k, a in state.items()},
            sub(mu),
            opt,
            id_prec,
            exp_prec,
            delta,
            it < CONTOUR_UPDATES,
        )
        iw = robust.weights(robust.residual_norm(res), opt.robust_loss, delta)
        if full:
            state, mu, w_rob = new, mu_n, w * iw
        else:
            for k, a in new.items():
                state[k][idx] = a
            mu[idx] = mu_n
            w_rob[idx] = sub(w) * iw
        history[idx, it] = E
        E_last[idx] = E
        if biased and it < BIAS_UPDATES:  # the bias at the new pose for the next sweep
            offset = bias_at(noise, new["f"], new["R"])
            if full:
                v = v_obs - offset
            else:
                v[idx] = sub(v_obs) - offset
        iterations[idx_h] += 1
        if it > 0:
            rel = xp.abs(sub(E_prev) - E) / xp.maximum(xp.abs(sub(E_prev)), xp.finfo(dt).tiny)
            done = to_numpy(rel <= opt.tolerance).astype(bool)
            converged[idx_h[done]] = True
            active[idx_h[done]] = False
        E_prev[idx] = E

    mean_i, idb_i, expb_i = _bases(lm, state.get("choice"))
    X = shape_points(mean_i, idb_i, state["a_id"][:, None, :])
    X = X + (expb_i @ state["a_exp"][..., None, :, None])[..., 0]
    res = residuals(v, X, state["f"], state["R"], state["t"])
    return FitResult(
        alpha_id=state["a_id"] * lm.id_scale,
        alpha_exp=state["a_exp"] * lm.exp_scale,
        scale=state["f"],
        rotation=state["R"],
        translation=state["t"],
        rmse_px=rmse_px(res, w),
        objective=E_last,
        history=history,
        iterations=xp.asarray(iterations),
        converged=xp.asarray(converged),
        identity_mask=in_id,
    )


def _host(r: FitResult) -> FitResult:
    return FitResult(**{k: to_numpy(getattr(r, k)) for k in r.__dataclass_fields__})


def inter_ocular_px(v: np.ndarray, w: np.ndarray, corners: tuple[int, int] = OUTER_EYE_CORNERS) -> np.ndarray:
    """Observed outer-eye-corner distance (S, M); NaN where a corner is missing."""
    a, b = corners
    d = np.sqrt(np.sum((v[..., :, a] - v[..., :, b]) ** 2, axis=-1))
    return np.where((w[..., a] > 0) & (w[..., b] > 0), d, np.nan)


@dataclass
class SubjectFits:
    """Host-side result of :func:`fit_subjects`."""

    result: FitResult
    nme: np.ndarray  # (S, M) rmse / observed outer-eye-corner distance in the image
    rejected: np.ndarray  # (S, M) bool, rmse / frontal eye distance above the threshold


def frontal_nme(result: FitResult, iod_mm: float) -> np.ndarray:
    """RMSE over the eye distance the face would have frontally (scale x model eye distance).

    The observed 2D eye distance shrinks with yaw (half at 60 deg), so an NME over it rejects
    turned faces for the same pixel error; this one does not depend on the pose.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # padded slots: 0 / 0 -> NaN, never rejected
        return result.rmse_px / (np.abs(result.scale) * iod_mm)


def fit_subjects(
    lm: LandmarkModel,
    v: Array,
    w: Array,
    fit_mask: Array,
    opt: FitOptions,
    noise: LandmarkNoise | None = None,
) -> SubjectFits:
    """Fit landmarks in image pixels (y up) in face units, then reject images whose NME exceeds
    ``opt.reject_nme`` and refit those subjects without them. Results are in pixels again.

    One rejection round. A subject whose images are all above the threshold keeps its first fit
    and has every image marked rejected.
    """
    xp = namespace_of(v, w, fit_mask)
    frame = face_frame(
        lm.mean, xp.take(v, xp.asarray(lm.order), axis=-1), xp.take(w, xp.asarray(lm.order), axis=-1)
    )
    v_face = to_face(v, frame)
    first = _host(to_image(fit_batch(lm, v_face, w, fit_mask, fit_mask, opt, noise), frame))
    v_h, w_h, fit_h = to_numpy(v), to_numpy(w), to_numpy(fit_mask).astype(bool)
    iod = inter_ocular_px(v_h, w_h, lm.eye_corners)
    nme = first.rmse_px / iod
    if opt.reject_nme is None:
        return SubjectFits(first, nme, np.zeros_like(fit_h))
    score = frontal_nme(first, lm.iod_mm)
    rejected = fit_h & np.isfinite(score) & (score > opt.reject_nme)
    keep = fit_h & ~rejected
    redo = np.flatnonzero(rejected.any(axis=1) & keep.any(axis=1))
    if redo.size:
        idx = xp.asarray(redo)

        def take(a: Array) -> Array:
            return xp.take(a, idx, axis=0)

        sub_frame = type(frame)(take(frame.centre), take(frame.scale))
        second = fit_batch(lm, take(v_face), take(w), take(fit_mask), xp.asarray(keep[redo]), opt, noise)
        second = _host(to_image(second, sub_frame))
        merged = {}
        for k in first.__dataclass_fields__:
            out = getattr(first, k).copy()
            out[redo] = getattr(second, k)
            merged[k] = out
        first = replace(first, **merged)
        nme = first.rmse_px / iod
    all_rejected = fit_h.any(axis=1) & ~keep.any(axis=1)
    first.identity_mask = first.identity_mask & ~rejected
    first.identity_mask[all_rejected] = False
    return SubjectFits(first, nme, rejected)
