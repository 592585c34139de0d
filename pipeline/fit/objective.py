"""The fitting objective of one subject (Liu et al. 2018, Eq. 7, with priors and a robust loss)::

    E = sum_j sum_l w_jl rho(|u_jl - f_j R12_j X_jl - t_j|) + lam_id |a_id / s_id|^2
        + lam_exp sum_j |a_exp_j / s_exp|^2

over the images j in the identity solve; pixels^2, so ``lam`` reads as a landmark noise variance.
"""

from __future__ import annotations

from typing import Any

from pipeline.fit import robust
from pipeline.fit.camera import project
from pipeline.fit.xp import namespace_of

Array = Any


def residuals(v: Array, X: Array, f: Array, R: Array, t: Array) -> Array:
    """Observed minus projected, (..., 2, L) y-up pixels."""
    return v - project(X, f, R, t)


def data_term(res: Array, w: Array, kind: str = "none", delta: float = 1.0) -> Array:
    """Per-image weighted robust loss: (..., 2, L), (..., L) -> (...)."""
    xp = namespace_of(res, w)
    return xp.sum(w * robust.loss(robust.residual_norm(res), kind, delta), axis=-1)


def prior_term(coeffs: Array, precision: Array) -> Array:
    """``sum precision * a^2`` over the last axis."""
    xp = namespace_of(coeffs, precision)
    return xp.sum(precision * coeffs * coeffs, axis=-1)


def subject_objective(
    res: Array,
    w: Array,
    in_identity: Array,
    alpha_id: Array,
    alpha_exp: Array,
    id_precision: Array,
    exp_precision: Array,
    kind: str = "none",
    delta: float = 1.0,
) -> Array:
    """E per subject: res (S, M, 2, L), w (S, M, L), in_identity (S, M) bool -> (S,)."""
    xp = namespace_of(res, w, alpha_id)
    mask = xp.astype(in_identity, res.dtype)
    per_image = data_term(res, w, kind, delta) + prior_term(alpha_exp, exp_precision)
    return xp.sum(mask * per_image, axis=-1) + prior_term(alpha_id, id_precision)


def rmse_px(res: Array, w: Array) -> Array:
    """Per-image landmark RMSE in pixels over landmarks with weight > 0: -> (...)."""
    xp = namespace_of(res, w)
    present = xp.astype(w > 0, res.dtype)
    e2 = xp.sum(res * res, axis=-2)
    n = xp.sum(present, axis=-1)
    return xp.sqrt(xp.sum(present * e2, axis=-1) / xp.maximum(n, 1.0))
