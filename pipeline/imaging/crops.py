"""The one decoder of the aligned training crops (``trainset.crop_jpeg``): training, evaluation and
inference see the same pixels for the same bytes."""

from __future__ import annotations

import cv2
import numpy as np

CROP_HW = (112, 96)  # SphereFace crop: height, width


def decode_crop(jpeg: bytes) -> np.ndarray | None:
    """JPEG bytes -> (112, 96, 3) uint8 RGB, or None if undecodable or of the wrong size."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.shape[:2] != CROP_HW:
        return None
    return np.ascontiguousarray(img[:, :, ::-1])
