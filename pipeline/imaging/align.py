"""SphereFace-style face alignment: 5 MTCNN points -> the standard 96x112 (W x H) crop.

The similarity transform (rotation, uniform scale, translation) that best maps the five points
(left eye, right eye, nose, mouth left, mouth right; left/right as seen in the image) onto
:data:`REFERENCE_POINTS` in the least-squares sense (Umeyama 1991, via
``skimage.transform.SimilarityTransform``). Matrices are 2x3, row-major, mapping image pixels to
crop pixels (OpenCV convention: pixel centres at integer coordinates).
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

CROP_WIDTH = 96
CROP_HEIGHT = 112
# SphereFace (Liu et al. 2017) reference positions in the 96x112 crop.
REFERENCE_POINTS = np.array(
    [
        [30.2946, 51.6963],
        [65.5318, 51.5014],
        [48.0252, 71.7366],
        [33.5493, 92.3655],
        [62.7299, 92.2041],
    ],
    dtype=np.float64,
)


class AlignError(ValueError):
    """The five points do not define a usable similarity transform."""


def five_points(flat: np.ndarray | list[float]) -> np.ndarray:
    """``[x0, y0, ..., x4, y4]`` (the detections schema's layout) -> (5, 2) float64."""
    pts = np.asarray(flat, dtype=np.float64).reshape(-1)
    if pts.shape != (10,) or not np.all(np.isfinite(pts)):
        raise AlignError(f"expected 10 finite numbers (5 points x/y), got shape {pts.shape}")
    return pts.reshape(5, 2)


def similarity_matrix(points: np.ndarray, reference: np.ndarray = REFERENCE_POINTS) -> np.ndarray:
    """Least-squares similarity transform (2, 3) mapping ``points`` (5, 2) onto ``reference``."""
    src = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(reference, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise AlignError(f"points {src.shape} and reference {dst.shape} must be matching (n>=2, 2) arrays")
    if not np.all(np.isfinite(src)):
        raise AlignError("points contain NaN or infinity")
    if np.ptp(src, axis=0).max() < 1e-6:
        raise AlignError("points are all at the same place; no transform")
    tform = SimilarityTransform.from_estimate(src, dst)
    if not tform:  # a failed estimate is a falsy object carrying the reason
        raise AlignError(f"similarity estimation failed: {tform}")
    m = np.asarray(tform.params, dtype=np.float64)[:2, :]
    if not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:, :2])) < 1e-12:
        raise AlignError("similarity estimation gave a degenerate matrix")
    return m


def align_matrix_from_points(flat_points: np.ndarray | list[float]) -> np.ndarray:
    """The detections schema's 10 numbers -> (2, 3) image->crop matrix."""
    return similarity_matrix(five_points(flat_points))


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map (n, 2) points through a (2, 3) affine matrix (accepts the flat 6-vector too)."""
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return p @ m[:, :2].T + m[:, 2]


def invert_matrix(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix (crop -> image)."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64).reshape(2, 3))


def warp_crop(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The aligned (112, 96, 3) uint8 crop of ``rgb`` under the image->crop ``matrix``."""
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise AlignError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    return cv2.warpAffine(
        img,
        m,
        (CROP_WIDTH, CROP_HEIGHT),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
