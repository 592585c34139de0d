"""The one decoder of the aligned training crops (``trainset.crop_jpeg``): training, evaluation and
inference see the same pixels for the same bytes."""

from __future__ import annotations

import cv2
import numpy as np

CROP_HW = (112, 96)  # SphereFace crop: height, width


def image_cell(jpeg: bytes) -> dict:
    """A crop as the training set stores it: the Hugging Face Image struct ``{bytes, path}``."""
    return {"bytes": jpeg, "path": None}


def decode_crop(jpeg: bytes | dict | None) -> np.ndarray | None:
    """JPEG bytes (or an Image cell ``{bytes, path}``) -> (112, 96, 3) uint8 RGB, or None if
    undecodable or of the wrong size."""
    if isinstance(jpeg, dict):
        jpeg = jpeg.get("bytes")
    if not jpeg:
        return None
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.shape[:2] != CROP_HW:
        return None
    return np.ascontiguousarray(img[:, :, ::-1])
