"""Shared linear algebra of the expression and identity steps: Jacobians, normal equations, ridge.

With the pose fixed, the projected landmarks are linear in each coefficient block::

    u = f R12 (mean + B_id a_id + B_exp a_exp) + t

so each step is a weighted ridge (Tikhonov) least-squares problem ``min_a ||J a - r||_W^2 +
lam ||a / std||^2``, solved through its normal equations with a batched ``linalg.solve``.
Bases are component-major ``(..., 3, L, k)`` so ``f R12 @ B`` is one broadcast ``matmul``.
"""

from __future__ import annotations

from typing import Any

from pipeline.fit.xp import namespace_of

Array = Any


def shape_points(mean: Array, basis: Array, coeffs: Array) -> Array:
    """``mean + basis @ coeffs``: mean (..., 3, L), basis (..., 3, L, k), coeffs (..., k) -> (..., 3, L)."""
    return mean + (basis @ coeffs[..., None, :, None])[..., 0]


def projected_basis(f: Array, R: Array, basis: Array) -> Array:
    """Jacobian of the projection w.r.t. coefficients: ``f R12 @ B`` -> (..., 2, L, k)."""
    xp = namespace_of(f, R, basis)
    _, L, k = basis.shape[-3:]
    P = f[..., None, None] * R[..., :2, :]  # (..., 2, 3)
    if basis.ndim == 3:
        # One basis for every image: a single (N*2, 3) x (3, L*k) GEMM instead of N small ones.
        lead = P.shape[:-2]
        J = xp.reshape(P, (-1, 3)) @ xp.reshape(basis, (3, L * k))
        return xp.reshape(J, lead + (2, L, k))
    J = P @ xp.reshape(basis, basis.shape[:-3] + (3, L * k))
    return xp.reshape(J, J.shape[:-2] + (2, L, k))


def rows(J: Array, r: Array, w: Array) -> tuple[Array, Array, Array]:
    """Flatten (..., 2, L, k), (..., 2, L), (..., L) into least-squares rows (..., 2L, k), (..., 2L), (..., 2L)."""
    xp = namespace_of(J, r, w)
    L, k = J.shape[-2:]
    return (
        xp.reshape(J, J.shape[:-3] + (2 * L, k)),
        xp.reshape(r, r.shape[:-2] + (2 * L,)),
        xp.concat([w, w], axis=-1),  # the same weight for x and y of a landmark
    )


def normal_equations(J: Array, r: Array, w: Array) -> tuple[Array, Array]:
    """``(J^T W J, J^T W r)`` for rows J (..., n, k), r (..., n), w (..., n)."""
    xp = namespace_of(J, r, w)
    JtW = xp.matrix_transpose(J * w[..., None])
    return JtW @ J, (JtW @ r[..., None])[..., 0]


def ridge_solve(A: Array, b: Array, precision: Array) -> Array:
    """Solve ``(A + diag(precision)) a = b`` batched; ``b[..., None]`` because numpy 2 reads a
    trailing-(k,) right-hand side of a stacked solve as a matrix, not as one vector per system."""
    xp = namespace_of(A, b, precision)
    return xp.linalg.solve(A + diagonal_matrix(precision, A), b[..., None])[..., 0]


def diagonal_matrix(precision: Array, A: Array) -> Array:
    """``diag(precision)`` plus a tiny jitter relative to ``A``'s diagonal.

    The jitter (1e-12 relative) keeps a system solvable when a prior weight is 0 and an image
    carries no landmark weight; a singular matrix would make the whole batched solve raise.
    """
    xp = namespace_of(precision, A)
    k = A.shape[-1]
    eye = xp.eye(k, dtype=A.dtype)
    scale = xp.max(xp.abs(A * eye), axis=(-2, -1))
    return eye * precision + (1e-12 * scale + 1e-30)[..., None, None] * eye
