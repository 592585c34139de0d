"""Backend ``dlib``: the 68-point shape predictor of ``face-recognition-models`` on the MTCNN box.

Works offline (the ``.dat`` ships in the wheel). The file is located by path: importing
``face_recognition_models`` would run its ``__init__``, which needs ``pkg_resources``.
dlib gives no per-point confidence, so confidences are NaN.

Optionally (``stages.landmarks.dlib_face_px``, ``dlib_jitter``; off by default for the build's
speed) the face is resampled to a fixed box size and the points are the mean of predictions on
slightly moved boxes: dlib's trees compare single pixels, so one prediction jumps with the photo's
size and pixel grid, and its points are whole pixels. docs/fit.md has the figures.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from pipeline.landmarks.base import (
    N_POINTS,
    LandmarkBackend,
    LandmarkResult,
    WeightsError,
    check_box,
    verify_sha256,
)

PACKAGE = "face_recognition_models"
MODEL_KEY = "dlib_landmarks"
DEFAULT_RELATIVE = "face_recognition_models/models/shape_predictor_68_face_landmarks.dat"


def package_parent() -> Path | None:
    """The directory holding the ``face_recognition_models`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def resolve_packaged(model: dict, key: str, default_relative: str, what: str) -> tuple[Path, str]:
    """Path and verified sha256 of a model file of ``face-recognition-models`` described by
    ``models.<key>``: ``file`` absolute, or relative to the directory holding the package."""
    rel = model.get("file") or default_relative
    path = Path(rel).expanduser()
    if not path.is_absolute():
        parent = package_parent()
        if parent is None:
            raise WeightsError(
                f"models.{key}: package {PACKAGE} is not installed; "
                f"pip install 'face-recognition-models==0.3.0' dlib-bin (or set models.{key}.file to the .dat path)"
            )
        path = parent / rel
    if not path.is_file():
        raise WeightsError(f"models.{key}: {what} not found at {path}")
    return path, verify_sha256(path, model.get("sha256"), f"models.{key}")


def resolve_model(model: dict) -> tuple[Path, str]:
    """The shape predictor described by ``models.dlib_landmarks`` (see :func:`resolve_packaged`)."""
    return resolve_packaged(model, MODEL_KEY, DEFAULT_RELATIVE, "shape predictor")


def jitter_pattern(count: int) -> np.ndarray:
    """(count, 3) box changes (dx, dy in box sides, log scale), the first none; the rest an
    unscrambled Halton sequence over +-``JITTER_SHIFT`` and +-``JITTER_LOG_SCALE`` (fixed, so the
    points are deterministic)."""
    from scipy.stats import qmc

    u = qmc.Halton(d=3, scramble=False).random(count)  # its first point is (0, 0, 0)
    out = (2 * u - 1) * [JITTER_SHIFT, JITTER_SHIFT, JITTER_LOG_SCALE]
    out[0] = 0.0
    return out


# dlib's regression trees compare single pixels, so its points jump with a pixel's change (0.6-1.8 %
# of the outer-eye distance between copies of one photo at x0.5 / x1 / x2; docs/fit.md). Averaging
# predictions on slightly moved boxes averages the jumps out; on a face resampled to a fixed size
# the points mean the same at any image size and are not rounded to the photo's pixels.
JITTER_SHIFT = 0.03  # of the box side
JITTER_LOG_SCALE = 0.04
CROP_MARGIN = 0.6  # of the box side around the box: the jittered boxes and dlib's features beyond them


class DlibBackend(LandmarkBackend):
    name = "dlib"

    def __init__(self, path: Path, sha256: str, face_px: int | None = None, jitter: int = 1) -> None:
        import dlib  # lazy: optional dependency

        self.version = str(dlib.__version__)
        self.weights_sha256 = sha256
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(path))
        self.face_px = face_px
        self._jitter = jitter_pattern(jitter)

    def _points(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """dlib's 68 points (float64, pixel centres at integers) for one box in ``image``'s pixels."""
        rect = self._dlib.rectangle(*(int(round(v)) for v in box))
        shape = self._predictor(image, rect)
        if shape.num_parts != N_POINTS:
            raise ValueError(f"shape predictor returned {shape.num_parts} points, expected {N_POINTS}")
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(N_POINTS)], dtype=np.float64)

    def _face_crop(self, image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The box and ``CROP_MARGIN`` around it resampled so the box's longer side is ``face_px``:
        (crop, origin, scale) with crop x = (image x - origin x + 0.5) scale x - 0.5 (cv2's pixel-
        centre convention), and y alike. Only the part inside the image is resampled (a large face
        is never copied at full size); the rest of the crop is 0, which is what dlib reads beyond
        an image's edge."""
        import cv2

        side = max(box[2] - box[0], box[3] - box[1])
        k = float(self.face_px) / side  # type: ignore[arg-type]
        x0, y0 = np.floor(box[:2] - CROP_MARGIN * side).astype(int)
        x1, y1 = np.ceil(box[2:] + CROP_MARGIN * side).astype(int) + 1
        h, w = image.shape[:2]
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        size = (max(1, round((sx1 - sx0) * k)), max(1, round((sy1 - sy0) * k)))
        inside = cv2.resize(
            image[sy0:sy1, sx0:sx1], size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
        )
        scale = np.array([size[0] / (sx1 - sx0), size[1] / (sy1 - sy0)])
        ox, oy = round((sx0 - x0) * k), round((sy0 - y0) * k)  # where the inside lands in the crop
        crop = np.zeros(
            (max(1, round((y1 - y0) * k)), max(1, round((x1 - x0) * k)), *image.shape[2:]), image.dtype
        )
        part = inside[: crop.shape[0] - oy, : crop.shape[1] - ox]
        crop[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
        return crop, np.array([sx0 - ox / scale[0], sy0 - oy / scale[1]]), scale

    def predict_one(self, image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        b = check_box(box, w, h)
        if self.face_px is None:  # the photo's own pixels
            img, origin, scale = np.ascontiguousarray(image), np.zeros(2), np.ones(2)
        else:
            img, origin, scale = self._face_crop(image, b)
        # the box in the predictor's image (cv2's pixel-centre convention: x' = (x + 0.5) k - 0.5)
        lo = (b[:2] - origin + 0.5) * scale - 0.5
        hi = (b[2:] - origin + 0.5) * scale - 0.5
        centre, extent = (lo + hi) / 2, hi - lo
        pts = np.zeros((N_POINTS, 2))
        for dx, dy, ds in self._jitter:
            c = centre + np.array([dx, dy]) * extent
            pts += self._points(img, np.r_[c - extent * np.exp(ds) / 2, c + extent * np.exp(ds) / 2])
        pts = (pts / len(self._jitter) + 0.5) / scale - 0.5 + origin
        return pts.astype(np.float32), np.full(N_POINTS, np.nan, dtype=np.float32)

    def predict(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[LandmarkResult]:
        out: list[LandmarkResult] = []
        for image, box in items:
            try:
                out.append(self.predict_one(image, box))
            except (ValueError, RuntimeError) as exc:
                out.append(f"{type(exc).__name__}: {exc}")
        return out


# --- the backend's entry points (pipeline/landmarks/stage.py looks them up by name) -------------
USES_GPU = False


def resolve_weights(model: dict, params: dict) -> tuple[Path, str]:
    return resolve_model(model)


def create(path: str, sha256: str, params: dict) -> LandmarkBackend:
    face_px = params.get("dlib_face_px")
    return DlibBackend(
        Path(path), sha256, None if face_px is None else int(face_px), int(params.get("dlib_jitter", 1))
    )


def cache_key(params: dict) -> tuple:
    return (params.get("dlib_face_px"), params.get("dlib_jitter", 1))
