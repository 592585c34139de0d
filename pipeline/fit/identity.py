"""Identity step: one ridge solve per subject over all its images stacked (eos ``linear_shape_fitting``).

Batched over subjects: the rows of the M (padded) images of a subject are concatenated into one
(M*2L, k_id) system; padded or excluded images carry weight 0, so they add nothing to
``J^T W J``. Cost ~ 2L * k_id^2 multiply-adds per image (the flop bound the benchmark quotes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.fit.camera import project
from pipeline.fit.linear import diagonal_matrix, normal_equations, projected_basis, ridge_solve, rows
from pipeline.fit.xp import namespace_of

Array = Any


def shrinkage(images: Array, common: float, per_image: float) -> Array:
    """The factor a subject's fitted identity is scaled by toward the mean shape, per subject of
    ``images`` (its images in the identity): ``1 / (1 + common + per_image / M)``.

    The prior weight sets two things at once: how the fit spreads its trust over the identity
    components (their pattern) and how far it pulls the whole identity toward the mean (its
    size). Renders want a strong pull (a detector's errors are shaped like faces and do not
    average away); real photos want the pattern of the unshrunk maximum a posteriori weight
    (docs/fit.md). A scale after the fit leaves the pattern — and every cosine between
    identities — as it was and sets the size alone. ``per_image`` is the part that more images
    average away, ``common`` the part they do not."""
    xp = namespace_of(images)
    m = xp.maximum(images * 1.0, 1.0)
    return 1.0 / (1.0 + common + per_image / m)


def identity_prior(id_std: Array, weight: float) -> Array:
    """Ridge precision ``weight / std**2``."""
    return weight / (id_std * id_std)


def solve_identity(
    v: Array, w: Array, f: Array, R: Array, t: Array, no_identity: Array, id_basis: Array, precision: Array
) -> Array:
    """``a_id`` (S, k_id) shared by the images of each subject.

    v (S, M, 2, L); w (S, M, L) weights (0 for images not in the identity solve); f (S, M);
    R (S, M, 3, 3); t (S, M, 2); ``no_identity`` (S, M, 3, L) the landmark shape without the
    identity part (mean + expression); id_basis (3, L, k) or per image (S, M, 3, L, k).
    """
    xp = namespace_of(v, w, no_identity)
    S, M = v.shape[:2]
    r = v - project(no_identity, f, R, t)
    J = projected_basis(f, R, id_basis)  # (S, M, 2, L, k)
    Jr, rr, wr = rows(J, r, w)  # (S, M, 2L, k) ...
    n, k = Jr.shape[-2:]
    A, b = normal_equations(
        xp.reshape(Jr, (S, M * n, k)), xp.reshape(rr, (S, M * n)), xp.reshape(wr, (S, M * n))
    )
    return xp.astype(ridge_solve(A, b, precision), v.dtype)


@dataclass(frozen=True)
class ShapeSystem:
    """Least-squares rows of the shape coefficients ``[a_exp | a_id]`` at a fixed pose.

    ``J`` (S, M, 2L, k_exp + k_id), ``w`` (S, M, 2L) and the per-image Gram ``G = J^T W J``
    (S, M, p, p). It depends on the pose only, so the identity step and the joint
    Gauss-Newton step after it share one Gram (the largest cost of an iteration).
    """

    J: Array
    w: Array
    G: Array
    k_exp: int


def shape_system(
    f: Array, R: Array, w: Array, id_basis: Array, exp_basis: Array, shape_basis: Array | None = None
) -> ShapeSystem:
    """Build the shape rows and their Gram for pose (f, R) and landmark weights w (S, M, L).

    ``shape_basis``: ``concat([exp_basis, id_basis], -1)`` if the caller keeps it (one GEMM
    instead of two plus a copy)."""
    xp = namespace_of(f, R, w)
    if shape_basis is None:
        shape_basis = xp.concat([exp_basis, id_basis], axis=-1)
    J = projected_basis(f, R, shape_basis)
    L, p = J.shape[-2:]
    Jr = xp.reshape(J, J.shape[:-3] + (2 * L, p))
    wr = xp.concat([w, w], axis=-1)
    Q = Jr * xp.sqrt(wr)[..., None]  # weights are >= 0; Q^T Q is ~1.5x faster than (J^T W) J here
    G = xp.matrix_transpose(Q) @ Q
    return ShapeSystem(Jr, wr, G, int(exp_basis.shape[-1]))


def solve_identity_joint(
    v: Array,
    w: Array,
    f: Array,
    R: Array,
    t: Array,
    mean: Array,
    id_basis: Array,
    exp_basis: Array,
    id_precision: Array,
    exp_precision: Array,
    system: ShapeSystem | None = None,
) -> Array:
    """``a_id`` (S, k_id) minimising jointly over the identity and every image's expression.

    The expression blocks are eliminated per image (Schur complement), which leaves one
    (k_id, k_id) system per subject::

        (A - sum_j B_j^T C_j^-1 B_j) a_id = b_id - sum_j B_j^T C_j^-1 b_j

    with C_j = Je^T W Je + P_exp, B_j = Je^T W Jid, b_j = Je^T W r_j. Solving identity and
    expression together removes their coupling, which otherwise makes plain alternation crawl
    (~10x more iterations on synthetic data). The expression is then recovered per image by
    :func:`pipeline.fit.expression.solve_expression` with the new identity. ``system`` may be
    passed in if already built for this pose and ``w``.
    """
    xp = namespace_of(v, w, mean)
    sysm = system if system is not None else shape_system(f, R, w, id_basis, exp_basis)
    r = v - project(mean, f, R, t)
    rr = xp.reshape(r, r.shape[:-2] + (r.shape[-2] * r.shape[-1],))
    k_e = sysm.k_exp
    G = sysm.G
    g = (xp.matrix_transpose(sysm.J) @ (sysm.w * rr)[..., None])[..., 0]  # (S, M, p)
    C = G[..., :k_e, :k_e]
    C = C + diagonal_matrix(exp_precision, C)
    B = G[..., :k_e, k_e:]
    A = xp.sum(G[..., k_e:, k_e:], axis=1)
    b = xp.sum(g[..., k_e:], axis=1)
    # one solve with both right-hand sides [B | b]: batched solves cost per matrix, not per column
    sol = xp.linalg.solve(C, xp.concat([B, g[..., :k_e, None]], axis=-1))
    CinvB, Cinvb = sol[..., :-1], sol[..., -1]
    Bt = xp.matrix_transpose(B)
    A = A - xp.sum(Bt @ CinvB, axis=1)
    b = b - xp.sum((Bt @ Cinvb[..., None])[..., 0], axis=1)
    return xp.astype(ridge_solve(A, b, id_precision), v.dtype)
