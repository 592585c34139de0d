"""Expression step: per-image ridge solve for ``a_exp`` with pose and identity fixed (eos ``blendshape_fitting``)."""

from __future__ import annotations

from typing import Any

from pipeline.fit.camera import project
from pipeline.fit.linear import normal_equations, projected_basis, ridge_solve, rows
from pipeline.fit.xp import namespace_of

Array = Any


def expression_prior(exp_std: Array, weight: float) -> Array:
    """Ridge precision ``weight / std**2`` (the prior N(0, std^2) scaled by the manifest weight)."""
    return weight / (exp_std * exp_std)


def solve_expression(
    v: Array,
    w: Array,
    f: Array,
    R: Array,
    t: Array,
    neutral: Array,
    exp_basis: Array,
    precision: Array,
    jacobian_rows: Array | None = None,
) -> Array:
    """``a_exp`` (..., k_exp) of every image at once.

    v (..., 2, L) y-up px; w (..., L) landmark weights; f, R, t the pose; ``neutral`` (..., 3, L)
    the landmark shape without expression (mean + identity); exp_basis (..., 3, L, k_exp).
    ``jacobian_rows`` (..., 2L, k_exp): ``f R12 exp_basis`` as rows, if already computed for
    this pose (the identity step's shape system holds it).
    """
    xp = namespace_of(v, w, neutral)
    r = v - project(neutral, f, R, t)
    if jacobian_rows is None:
        Jr, rr, wr = rows(projected_basis(f, R, exp_basis), r, w)
    else:
        Jr = jacobian_rows
        rr = xp.reshape(r, r.shape[:-2] + (2 * r.shape[-1],))
        wr = xp.concat([w, w], axis=-1)
    A, b = normal_equations(Jr, rr, wr)
    return xp.astype(ridge_solve(A, b, precision), v.dtype)
