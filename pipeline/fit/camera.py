"""Scaled-orthographic camera from weighted 2D-3D correspondences, with a proper rotation.

Layout used throughout :mod:`pipeline.fit`: points are component-major, ``(..., 3, L)`` for 3D
model points (mm, y up, z towards the camera) and ``(..., 2, L)`` for 2D observations in
**y-up** pixels (the stage negates image y before fitting; see :func:`to_image`). Leading
dimensions are batch dimensions (subjects, images) and broadcast.

Projection: ``u = f * R[:2] @ X + t`` with ``f`` pixels per mm, ``R`` a rotation (det +1).

Estimation (the eos ``orthographic_camera_estimation_linear`` idea, then made exact):
1. a weighted least-squares affine camera ``A`` (2x3) on centred points;
2. the nearest matrix with orthonormal rows, ``U @ Vh`` from the SVD of ``A``; third row
   ``r1 x r2`` so ``R`` is a proper rotation; ``f`` the mean singular value;
3. a few refinement steps that minimise the true scaled-orthographic residual: fill in each
   point's depth from the current pose and solve the 3D similarity Procrustes problem in closed
   form (Umeyama, reflection-corrected). Each step cannot increase the 2D residual (the filled-in
   depth makes the 3D residual equal the 2D one at the current pose), so this is a monotone
   majorise-minimise scheme. Then ``f`` and ``t`` are set to their exact optimum for that ``R``.
"""

from __future__ import annotations

from typing import Any

from pipeline.fit.xp import get_namespace, namespace_of

Array = Any
_TINY = 1e-12


def weighted_centroid(P: Array, w: Array) -> Array:
    """Weighted mean over the last axis: ``P`` (..., C, L), ``w`` (..., L) -> (..., C)."""
    xp = namespace_of(P, w)
    sw = xp.sum(w, axis=-1)
    return xp.sum(P * w[..., None, :], axis=-1) / xp.maximum(sw, _TINY)[..., None]


def _cross(a: Array, b: Array) -> Array:
    xp = namespace_of(a, b)
    return xp.stack(
        [
            a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1],
            a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
            a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0],
        ],
        axis=-1,
    )


def affine_camera(Xc: Array, vc: Array, w: Array) -> Array:
    """Weighted least-squares 2x3 affine map of centred points: ``vc ~ A @ Xc``."""
    xp = namespace_of(Xc, vc, w)
    XcT = xp.matrix_transpose(Xc)
    C = (Xc * w[..., None, :]) @ XcT  # (..., 3, 3)
    B = (vc * w[..., None, :]) @ XcT  # (..., 2, 3)
    # A tiny relative ridge keeps padded / degenerate images (zero weights) solvable; real
    # images are unaffected at that level and the refinement below removes the bias.
    tr = C[..., 0, 0] + C[..., 1, 1] + C[..., 2, 2]
    eye = xp.eye(3, dtype=C.dtype)
    rel = max(1e-10, 100 * float(xp.finfo(C.dtype).eps))
    C = C + (rel * tr + _TINY)[..., None, None] * eye
    return xp.matrix_transpose(xp.linalg.solve(C, xp.matrix_transpose(B)))


def orthonormalise(A: Array) -> tuple[Array, Array]:
    """Nearest scaled rotation to an affine camera: ``A`` (..., 2, 3) -> ``f`` (...), ``R`` (..., 3, 3)."""
    xp = namespace_of(A)
    U, s, Vh = xp.linalg.svd(A, full_matrices=False)  # (...,2,2) (...,2) (...,2,3)
    R12 = U @ Vh
    r3 = _cross(R12[..., 0, :], R12[..., 1, :])
    R = xp.concat([R12, r3[..., None, :]], axis=-2)
    return xp.mean(s, axis=-1), R


def optimal_scale(Xc: Array, vc: Array, w: Array, R: Array) -> Array:
    """Exact least-squares ``f`` for a fixed rotation (centred points)."""
    xp = namespace_of(Xc, vc, w, R)
    P = R[..., :2, :] @ Xc
    num = xp.sum(w * xp.sum(vc * P, axis=-2), axis=-1)
    den = xp.sum(w * xp.sum(P * P, axis=-2), axis=-1)
    return num / xp.maximum(den, _TINY)


def refine_pose(Xc: Array, vc: Array, w: Array, f: Array, R: Array, steps: int) -> tuple[Array, Array]:
    """Majorise-minimise steps on the scaled-orthographic residual (see module doc)."""
    xp = namespace_of(Xc, vc, w, f, R)
    XcT = xp.matrix_transpose(Xc)
    ones = xp.ones(R.shape[:-2] + (2,), dtype=R.dtype)
    for _ in range(steps):
        z = f[..., None, None] * (R[..., 2:3, :] @ Xc)  # current depth of every point, (..., 1, L)
        Y = xp.concat([vc, z], axis=-2)
        H = (Y * w[..., None, :]) @ XcT  # (..., 3, 3)
        U, _, Vh = xp.linalg.svd(H)
        d = xp.sign(xp.linalg.det(U @ Vh))
        d = xp.where(d == 0, xp.ones_like(d), d)
        D = xp.concat([ones, d[..., None]], axis=-1)  # diag(1, 1, det) forbids reflections
        R = (U * D[..., None, :]) @ Vh
        f = optimal_scale(Xc, vc, w, R)
    return f, R


def estimate_camera(
    X: Array, v: Array, w: Array, refine_steps: int = 3, init: tuple[Array, Array] | None = None
) -> tuple[Array, Array, Array]:
    """Scaled-orthographic pose from ``X`` (..., 3, L) mm, ``v`` (..., 2, L) y-up px, ``w`` (..., L).

    ``init = (f, R)`` warm-starts the refinement from a known pose instead of the linear
    estimate; the refinement never increases the residual, so a warm start keeps the
    alternation monotone. Returns ``f`` (...), ``R`` (..., 3, 3) with det +1, ``t`` (..., 2).
    """
    Xm = weighted_centroid(X, w)
    vm = weighted_centroid(v, w)
    Xc = X - Xm[..., None]
    vc = v - vm[..., None]
    if init is None:
        f, R = orthonormalise(affine_camera(Xc, vc, w))
    else:
        R = init[1]
    f = optimal_scale(Xc, vc, w, R)
    f, R = refine_pose(Xc, vc, w, f, R, refine_steps)
    t = vm - f[..., None] * (R[..., :2, :] @ Xm[..., None])[..., 0]
    return f, R, t


def project(X: Array, f: Array, R: Array, t: Array) -> Array:
    """``f * R[:2] @ X + t``: (..., 3, L) mm -> (..., 2, L) y-up pixels."""
    return f[..., None, None] * (R[..., :2, :] @ X) + t[..., :, None]


def rodrigues(omega: Array) -> Array:
    """Rotation matrices ``exp([omega]_x)`` for axis-angle vectors (..., 3)."""
    xp = namespace_of(omega)
    theta = xp.sqrt(xp.sum(omega * omega, axis=-1))
    small = theta < 1e-8
    safe = xp.where(small, xp.ones_like(theta), theta)
    # sin(t)/t and (1-cos(t))/t^2 with their series limits for tiny angles
    a = xp.where(small, 1.0 - theta**2 / 6.0, xp.sin(safe) / safe)
    b = xp.where(small, 0.5 - theta**2 / 24.0, (1.0 - xp.cos(safe)) / (safe * safe))
    zero = xp.zeros_like(theta)
    wx, wy, wz = omega[..., 0], omega[..., 1], omega[..., 2]
    K = xp.stack(
        [
            xp.stack([zero, -wz, wy], axis=-1),
            xp.stack([wz, zero, -wx], axis=-1),
            xp.stack([-wy, wx, zero], axis=-1),
        ],
        axis=-2,
    )
    eye = xp.eye(3, dtype=omega.dtype)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def to_image(v: Array) -> Array:
    """Between y-up fitting coordinates and image pixels (y down): negate y. Its own inverse."""
    xp = namespace_of(v)
    return xp.concat([v[..., 0:1, :], -v[..., 1:2, :]], axis=-2)


def euler_deg(R: Array) -> tuple[Array, Array, Array]:
    """(yaw, pitch, roll) in degrees for ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``.

    Right-handed rotations about the model axes (x right, y up, z towards the camera): positive
    yaw turns the nose towards image right, positive pitch turns the nose down, positive roll
    turns the face counter-clockwise as seen on the image.
    """
    xp = namespace_of(R)
    deg = 180.0 / 3.141592653589793
    yaw = xp.atan2(-R[..., 2, 0], xp.sqrt(R[..., 2, 1] ** 2 + R[..., 2, 2] ** 2))
    pitch = xp.atan2(R[..., 2, 1], R[..., 2, 2])
    roll = xp.atan2(R[..., 1, 0], R[..., 0, 0])
    return yaw * deg, pitch * deg, roll * deg


def rotation_from_euler_deg(yaw: Array, pitch: Array, roll: Array) -> Array:
    """Inverse of :func:`euler_deg`: (...) degrees -> (..., 3, 3). Plain numbers are taken as NumPy
    float64 (the renderer's single poses); arrays keep their library (NumPy or CuPy)."""
    if all(isinstance(a, (int, float)) for a in (yaw, pitch, roll)):  # NumPy scalars are floats too
        xp = get_namespace("numpy")
        yaw, pitch, roll = (xp.asarray(float(a), dtype=xp.float64) for a in (yaw, pitch, roll))
    xp = namespace_of(yaw, pitch, roll)
    rad = 3.141592653589793 / 180.0
    y, p, r = yaw * rad, pitch * rad, roll * rad
    cy, sy, cp, sp, cr, sr = xp.cos(y), xp.sin(y), xp.cos(p), xp.sin(p), xp.cos(r), xp.sin(r)
    zero, one = xp.zeros_like(y), xp.ones_like(y)

    def mat(rows: list[list[Array]]) -> Array:
        return xp.stack([xp.stack(row, axis=-1) for row in rows], axis=-2)

    Rx = mat([[one, zero, zero], [zero, cp, -sp], [zero, sp, cp]])
    Ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    Rz = mat([[cr, -sr, zero], [sr, cr, zero], [zero, zero, one]])
    return Rz @ Ry @ Rx
