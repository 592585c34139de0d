"""A damped Gauss-Newton (Levenberg-Marquardt) step on all parameters of each subject at once.

Plain alternation converges linearly and slowly along directions where a pose change and a shape
change explain the landmarks almost equally well (rotation in depth versus depth of the face,
scale versus face size). One joint step after each alternation sweep removes that coupling: the
per-image blocks (rotation increment, scale, translation, expression) are eliminated with a
Schur complement, leaving one (k_id, k_id) system per subject, the same size as the identity step::

    (A - sum_j B_j^T C_j^-1 B_j) d_id = g_id - sum_j B_j^T C_j^-1 g_j,   d_j = C_j^-1 (g_j - B_j d_id)

Marquardt damping scales the diagonals by (1 + mu); the caller keeps a step only where it lowers
the subject's objective, so the loop stays monotone. Images outside the identity solve are not
moved here (their objective term is not the subject's).
"""

from __future__ import annotations

from typing import Any

from pipeline.fit.camera import project, rodrigues
from pipeline.fit.identity import ShapeSystem, shape_system
from pipeline.fit.xp import namespace_of

Array = Any


def _damped(M: Array, mu: Array) -> Array:
    xp = namespace_of(M, mu)
    k = M.shape[-1]
    eye = xp.eye(k, dtype=M.dtype)
    diag = M * eye
    # relative damping plus a tiny absolute floor so images without weight stay solvable
    # The floor must stay far below every real diagonal entry (it is not a damping): it only
    # turns the exactly-zero blocks of padded images into solvable ones.
    return M + mu * diag + (1e-12 * xp.max(xp.abs(diag), axis=(-2, -1))[..., None, None] + 1e-30) * eye


def lm_step(
    v: Array,
    w: Array,
    in_identity: Array,
    f: Array,
    R: Array,
    t: Array,
    a_id: Array,
    a_exp: Array,
    mean: Array,
    id_basis: Array,
    exp_basis: Array,
    id_precision: Array,
    exp_precision: Array,
    mu: Array,
    system: ShapeSystem | None = None,
) -> tuple[Array, Array, Array, Array, Array]:
    """One damped joint step; ``mu`` (S,) per subject. Returns updated (f, R, t, a_id, a_exp).

    ``system``: the :class:`ShapeSystem` of this pose with weights ``w * in_identity``, if built.
    """
    xp = namespace_of(v, w, f)
    dt = v.dtype
    S, M = v.shape[:2]
    mask = xp.astype(in_identity, dt)
    X = (
        mean
        + (id_basis @ a_id[:, None, None, :, None])[..., 0]
        + (exp_basis @ a_exp[..., None, :, None])[..., 0]
    )
    r = v - project(X, f, R, t)
    R12 = R[..., :2, :]
    zero = xp.zeros_like(X[..., 0, :])
    x, y, z = X[..., 0, :], X[..., 1, :], X[..., 2, :]
    # d/d omega_i of f R exp([omega]x) X at 0 is f R12 (e_i x X)
    cross = [
        xp.stack([zero, -z, y], axis=-2),
        xp.stack([z, zero, -x], axis=-2),
        xp.stack([-y, x, zero], axis=-2),
    ]
    J_rot = xp.stack([f[..., None, None] * (R12 @ c) for c in cross], axis=-1)  # (S, M, 2, L, 3)
    J_f = (R12 @ X)[..., None]
    L = X.shape[-1]
    ex = xp.reshape(xp.asarray([1.0, 0.0, 0.0, 1.0], dtype=dt), (2, 1, 2))
    J_t = xp.broadcast_to(ex, (S, M, 2, L, 2))
    # The shape columns [J_exp | J_id] and their Gram depend on the pose only: reuse the
    # identity step's; only the 6 pose columns are new (6 x p per landmark row).
    sysm = system if system is not None else shape_system(f, R, w * mask[..., None], id_basis, exp_basis)
    J_pose = xp.concat([J_rot, J_f, J_t], axis=-1)
    J_pose = xp.reshape(J_pose, (S, M, 2 * L, 6))
    rr = xp.reshape(r, (S, M, 2 * L))
    JpW = xp.matrix_transpose(J_pose * sysm.w[..., None])  # (S, M, 6, 2L)
    top = xp.concat([JpW @ J_pose, JpW @ sysm.J], axis=-1)  # (S, M, 6, 6 + p_shape), no big copy
    G = xp.concat([top, xp.concat([xp.matrix_transpose(top[..., 6:]), sysm.G], axis=-1)], axis=-2)
    g = xp.concat(
        [(JpW @ rr[..., None])[..., 0], (xp.matrix_transpose(sysm.J) @ (sysm.w * rr)[..., None])[..., 0]],
        axis=-1,
    )
    p = 6 + a_exp.shape[-1]
    prec_p = xp.concat([xp.zeros((6,), dtype=dt), exp_precision])
    C = G[..., :p, :p] + xp.eye(p, dtype=dt) * prec_p
    B = G[..., :p, p:]  # (S, M, p, k_id)
    g_p = g[..., :p] - prec_p * xp.concat([xp.zeros((S, M, 6), dtype=dt), a_exp], axis=-1)
    A = xp.sum(G[..., p:, p:], axis=1) + xp.eye(a_id.shape[-1], dtype=dt) * id_precision
    g_i = xp.sum(g[..., p:], axis=1) - id_precision * a_id
    Cd = _damped(C, mu[:, None, None, None])
    sol = xp.linalg.solve(Cd, xp.concat([B, g_p[..., None]], axis=-1))  # one solve, both RHS
    CinvB, Cinvg = sol[..., :-1], sol[..., -1]
    Bt = xp.matrix_transpose(B)
    A_red = _damped(A, mu[:, None, None]) - xp.sum(Bt @ CinvB, axis=1)
    g_red = g_i - xp.sum((Bt @ Cinvg[..., None])[..., 0], axis=1)
    d_id = xp.linalg.solve(A_red, g_red[..., None])[..., 0]
    d_p = (Cinvg - (CinvB @ d_id[:, None, :, None])[..., 0]) * mask[..., None]
    R_new = R @ rodrigues(d_p[..., 0:3])
    return f + d_p[..., 3], R_new, t + d_p[..., 4:6], a_id + d_id, a_exp + d_p[..., 6:]
