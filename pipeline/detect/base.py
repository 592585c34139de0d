"""The one base class of face detectors (looked up by name in :mod:`pipeline.detect.stage`).

A detector module provides, besides its :class:`FaceDetector` subclass: ``resources(params)``
(the worker resources a task needs), ``resolve_assets(config)`` (its weights, located and
verified on the driver), ``create(params, weights)`` (the per-process instance) and
``cache_key(params)`` (what makes one instance differ from another).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class FaceDetector(ABC):
    """MTCNN's output for a list of RGB images (float or uint8, any sizes)."""

    @abstractmethod
    def raw(self, images: list[np.ndarray], params: dict) -> np.ndarray:
        """Rows ``[image index, x0, y0, x1, y1, score, lx0..lx4, ly0..ly4]`` in the images' pixels,
        as :func:`pipeline.detect.stage.parse_mtcnn_output` reads them."""
