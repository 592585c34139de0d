"""Measuring a detector's landmark error model (:mod:`pipeline.fit.noise`) from faces with truth.

Input per image: the detector's 68 points and the true ones (pixels, y down), and the true
camera (scale ``f`` px/mm, yaw, roll). Each residual ``detected - true`` is taken into face
units (y up, divided by ``f``, rotated by ``-roll``), so images of any size and in-plane rotation
pool. Per yaw bin centre, the bias of each landmark is a kernel-weighted mean of the residuals of
images within one bin step (triangular weights: what linear interpolation between centres
assumes), after dropping gross detector failures (a residual over 5x that landmark's median).
The noise ``sigma_mm`` is a robust per-axis standard deviation of what is left after the bias is
removed (from the median squared residual length: for isotropic Gaussian noise |r|^2 / sigma^2
is chi-square with 2 degrees of freedom, median 2 ln 2). With ``mirror`` (default) every image
also counts as its mirror image (yaw and roll negated, x negated, left/right landmarks
swapped): a detector trained on mirrored data has mirrored errors, and the bins fill twice as fast.
"""

from __future__ import annotations

import numpy as np

from pipeline.fit.noise import ErrorModel
from pipeline.landmarks.base import N_POINTS as N_LANDMARKS
from pipeline.landmarks.scheme import IBUG68

# the mirror image of landmark i is MIRROR[i] (the scheme's data, pipeline/landmarks/schemes/)
MIRROR = IBUG68.mirror
MIN_BIN_WEIGHT = 3.0  # images (kernel-weighted) a bin needs for its own bias
LANDMARK_GROUPS = {name: list(ids) for name, ids in IBUG68.groups.items()}


def face_residuals(
    detected: np.ndarray, truth: np.ndarray, scale: np.ndarray, roll_deg: np.ndarray
) -> np.ndarray:
    """(N, 68, 2) residuals in face units: y up, divided by the scale, roll removed."""
    d = np.asarray(detected, np.float64) - np.asarray(truth, np.float64)
    d = d * np.array([1.0, -1.0]) / np.asarray(scale, np.float64)[:, None, None]
    r = -np.deg2rad(np.asarray(roll_deg, np.float64))
    c, s = np.cos(r)[:, None], np.sin(r)[:, None]
    return np.stack([c * d[..., 0] - s * d[..., 1], s * d[..., 0] + c * d[..., 1]], axis=-1)


def _bias_at(centres: np.ndarray, bias: np.ndarray, yaw_deg: np.ndarray) -> np.ndarray:
    """(N, 68, 2) a bias table (B, 68, 2) at each yaw: linear between the bin centres, held beyond."""
    yaw = np.asarray(yaw_deg, np.float64)
    b = [np.interp(yaw, centres, bias[:, lm, c]) for lm in range(N_LANDMARKS) for c in (0, 1)]
    return np.stack(b, axis=1).reshape(len(yaw), N_LANDMARKS, 2)


def fit_error_model(
    residuals: np.ndarray,
    yaw_deg: np.ndarray,
    backend: str,
    convention: str = "fixed_vertex",
    bin_step_deg: float = 10.0,
    max_yaw_deg: float = 90.0,
    mirror: bool = True,
    made_by: dict | None = None,
) -> ErrorModel:
    """The error model of residuals (N, 68, 2) face units (see :func:`face_residuals`) at yaws (N,)."""
    res = np.asarray(residuals, np.float64)
    yaw = np.asarray(yaw_deg, np.float64)
    ok = np.all(np.isfinite(res.reshape(len(res), -1)), axis=1) & np.isfinite(yaw)
    res, yaw = res[ok], yaw[ok]
    if len(res) < 2:
        raise ValueError(f"calibration needs at least 2 images with all 68 landmarks, got {len(res)}")
    if mirror:
        flipped = res[:, MIRROR] * np.array([-1.0, 1.0])
        res, yaw = np.concatenate([res, flipped]), np.concatenate([yaw, -yaw])
    norm = np.linalg.norm(res, axis=-1)  # (N, 68)
    inlier = norm <= 5.0 * np.median(norm, axis=0)  # gross failures never shift the bias
    centres = np.arange(-max_yaw_deg, max_yaw_deg + 1e-9, bin_step_deg)
    kernel = np.clip(1.0 - np.abs(yaw[None, :] - centres[:, None]) / bin_step_deg, 0.0, None)  # (B, N)
    weight = kernel[:, :, None] * inlier[None]  # (B, N, 68)
    total = weight.sum(axis=1)  # (B, 68)
    bias = np.einsum("bnl,nlc->blc", weight, res) / np.maximum(total, 1e-12)[..., None]
    images = kernel.sum(axis=1)
    populated = images >= MIN_BIN_WEIGHT
    if not populated.any():
        raise ValueError(
            f"calibration: no yaw bin has {MIN_BIN_WEIGHT:g} images (yaws {yaw.min():.0f}..{yaw.max():.0f})"
        )
    have = np.flatnonzero(populated)
    for b in np.flatnonzero(~populated):  # hold the nearest measured bin
        bias[b] = bias[have[np.argmin(np.abs(have - b))]]
    # what remains after the bias at each image's own yaw
    left = res - _bias_at(centres, bias, yaw)
    sq = np.sum(left * left, axis=-1)
    sigma = np.sqrt(np.median(sq, axis=0) / (2.0 * np.log(2.0)))
    return ErrorModel(
        backend=backend,
        convention=convention,
        yaw_bins_deg=centres,
        bias_mm=bias,
        sigma_mm=np.maximum(sigma, 1e-3),
        images_per_bin=np.round(images / (2 if mirror else 1)).astype(np.int64),
        made_by=dict(made_by or {}, images=int(ok.sum()), mirror=bool(mirror), bin_step_deg=bin_step_deg),
    )


def subject_common_share(
    residuals: np.ndarray, yaw_deg: np.ndarray, subjects: np.ndarray, model: ErrorModel
) -> tuple[np.ndarray, np.ndarray]:
    """How much of a detector's error (after ``model``'s bias) all images of a subject share.

    Per landmark: the between-subject variance of the subject means, less what the per-image
    scatter contributes to a mean of n images (a moment estimate), over the total; (68,) in
    [0, 1]. Independent errors have share 0 and average away over a subject's images; a share
    rho leaves rho x sigma^2 that no number of images removes. Also returned: the plain per-axis
    RMS (68,) of the error, gross failures (over 5x a landmark's median) left out, to set beside
    the robust ``sigma_mm``. Subjects with one image carry no information about the split."""
    left = np.asarray(residuals, np.float64) - _bias_at(model.yaw_bins_deg, model.bias_mm, yaw_deg)
    norm = np.linalg.norm(left, axis=-1)
    left = np.where((norm <= 5.0 * np.nanmedian(norm, axis=0))[..., None], left, np.nan)
    subjects = np.asarray(subjects)
    between, within = [], []
    for s in np.unique(subjects):
        x = left[subjects == s]  # (n, 68, 2)
        n = np.sum(np.isfinite(x[..., 0]), axis=0)  # (68,)
        if np.all(n < 2):
            continue
        with np.errstate(invalid="ignore"):
            m = np.nanmean(x, axis=0)
        var_in = np.nansum((x - m) ** 2, axis=(0, 2)) / np.maximum(n - 1, 1)
        between.append(np.where(n >= 2, np.sum(m**2, axis=-1) - var_in / np.maximum(n, 1), np.nan))
        within.append(np.where(n >= 2, var_in, np.nan))
    if not between:
        raise ValueError("subject_common_share: no subject has two images with landmarks")
    common, scatter = np.nanmean(between, axis=0), np.nanmean(within, axis=0)
    rms = np.sqrt(np.nanmean(np.sum(left**2, axis=-1), axis=0) / 2.0)
    return np.clip(common / np.maximum(common + scatter, 1e-12), 0.0, 1.0), rms


def group_summary(residuals: np.ndarray, iod_mm: float) -> dict[str, float]:
    """Mean residual length per landmark group as a fraction of the outer-eye distance."""
    norm = np.linalg.norm(np.asarray(residuals, np.float64), axis=-1)
    return {g: round(float(np.nanmean(norm[:, list(ix)]) / iod_mm), 4) for g, ix in LANDMARK_GROUPS.items()}
