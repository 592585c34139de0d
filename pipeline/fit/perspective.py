"""A pinhole camera around the scaled-orthographic fit: landmarks moved to where an orthographic
camera would have put them, and each image's camera distance estimated.

A pinhole ``D`` mm in front of the model's origin (on the camera's +z axis, as ``morphset synth``
renders) sees a camera-frame point ``c`` at ``u = t + f c_xy D / (D - c_z)`` (image y down: the
y offset negated), where ``t`` is the origin's image position and ``f`` the magnification there.
The scaled-orthographic fit models ``u = t + f c_xy``. Given the fitted shape's camera-frame
landmark points, a photo's landmarks become the orthographic ones by moving each towards ``t`` by
``(D - c_z) / D``; the fit is then run again on those. ``D`` per image is the distance on a grid
(log-spaced, 250 mm to 8 m, and infinity = orthographic) whose pinhole puts the fitted shape's
landmarks closest to the observed ones. Alternating the two from a common start distance is what
:func:`pipeline.fit.stage.fit_landmark_table` does with ``stages.fit.camera: perspective``
(docs/fit.md: the fit's identity absorbs the distortion otherwise). All NumPy, float64.
"""

from __future__ import annotations

import numpy as np

DISTANCE_GRID_MM = np.geomspace(250.0, 8000.0, 60)


def camera_points(
    mean: np.ndarray,
    id_basis: np.ndarray,
    exp_basis: np.ndarray,
    alpha_id: np.ndarray,
    alpha_exp: np.ndarray,
    rotation: np.ndarray,
) -> np.ndarray:
    """(N, L, 3) camera-frame landmark points: the landmark model ``mean`` (L, 3), ``id_basis``
    (L, 3, k_id), ``exp_basis`` (L, 3, k_exp) at coefficients (N, k) rotated by (N, 3, 3)."""
    shape = (
        mean[None]
        + np.einsum("lck,nk->nlc", id_basis, alpha_id)
        + np.einsum("lck,nk->nlc", exp_basis, alpha_exp)
    )
    return np.einsum("nlc,nrc->nlr", shape, rotation)


def pinhole_offsets(camera: np.ndarray, scale: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(N, L, 2) image offsets from the origin's position ``t`` of camera-frame points (N, L, 3)
    under magnification ``scale`` (N,) px/mm and pinholes ``distance`` (N,) mm (inf: orthographic)."""
    finite = np.isfinite(distance)[:, None]
    d = np.where(finite, distance[:, None], 1.0)
    gain = np.where(finite, d / np.maximum(d - camera[..., 2], 1e-6 * d), 1.0)
    return scale[:, None, None] * np.stack([camera[..., 0], -camera[..., 1]], -1) * gain[..., None]


def best_distance(
    observed: np.ndarray,
    translation: np.ndarray,
    scale: np.ndarray,
    camera: np.ndarray,
    grid: np.ndarray = DISTANCE_GRID_MM,
) -> np.ndarray:
    """(N,) the grid distance (inf = orthographic) whose pinhole puts the camera-frame points
    (N, L, 3) closest, in squared pixels, to the ``observed`` landmarks (N, L, 2; NaN = missing),
    with the fitted origin ``translation`` (N, 2) px and magnification ``scale`` (N,)."""
    n = len(observed)
    ok = np.isfinite(observed).all(-1)
    rel = np.where(ok[..., None], observed - translation[:, None], 0.0)
    candidates = np.concatenate([grid, [np.inf]])
    errors = np.empty((len(candidates), n))
    for k, d in enumerate(candidates):
        pred = pinhole_offsets(camera, scale, np.full(n, d))
        errors[k] = np.sum(np.where(ok[..., None], rel - pred, 0.0) ** 2, axis=(1, 2))
    return candidates[np.argmin(errors, axis=0)]


def to_orthographic(
    observed: np.ndarray, translation: np.ndarray, camera: np.ndarray, distance: np.ndarray
) -> np.ndarray:
    """(N, L, 2) landmarks moved to where the scaled-orthographic camera puts points seen by
    pinholes ``distance`` (N,) mm (inf: unchanged): towards the origin's position by
    ``(D - c_z) / D``, ``c_z`` the points' camera-frame depth (N, L)."""
    finite = np.isfinite(distance)[:, None]
    d = np.where(finite, distance[:, None], 1.0)
    factor = np.where(finite, (d - camera[..., 2]) / d, 1.0)
    t = translation[:, None]
    return t + (observed - t) * factor[..., None]
