"""The landmark error model of a detector: per-landmark bias as a function of yaw, and noise.

A detector's 68 points are not the model's landmark vertices plus white noise: dlib's jaw sits
0.17 eye-distances off on renders, its brows 0.07, largely the same way every time. Fitting that
as identity is what ruins shape labels; subtracting it and weighting each landmark by its own
noise is what this model is for. Units are the fit's face units (:mod:`pipeline.fit.normalize`):
millimetres at the fitted scale, y up, in the head's roll-free frame (the image rotated by
``-roll``), so the model holds at any image size and in-plane rotation.

File: a JSON document (``morphset calibrate`` writes it; the manifest names it with its sha256
under ``models.landmark_error.<backend>``)::

    {"format": "morphset.landmark_error", "format_version": 1, "backend": "dlib",
     "convention": "fixed_vertex", "yaw_bins_deg": [B centres, ascending],
     "bias_mm": [B][68][2], "sigma_mm": [68], "images_per_bin": [B],
     "identity_prior_weight": w | null, "identity_shrinkage": {"common": a, "per_image": b} | null,
     "made_by": {...}}

Between bin centres the bias is interpolated linearly in yaw; beyond the outer centres it is
held. ``sigma_mm`` is the per-landmark noise left after the bias is removed (per axis).
``identity_prior_weight`` is the weight of the identity prior that fitted the calibration faces
best with this model (a detector's errors are correlated across landmarks, so the independent
noise model alone trusts them too much); the fit uses it unless ``stages.fit`` sets one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fit.camera import euler_deg
from pipeline.fit.xp import namespace_of
from pipeline.landmarks.base import N_POINTS as N_LANDMARKS

Array = Any
FORMAT = "morphset.landmark_error"
FORMAT_VERSION = 1
CONVENTIONS = ("fixed_vertex", "ibug")


class ErrorModelError(ValueError):
    """A landmark error model file is missing or malformed (the message names file and key)."""


@dataclass(frozen=True)
class ErrorModel:
    """Host (NumPy) form of a landmark error model; landmarks in 0..67 order."""

    backend: str
    convention: str
    yaw_bins_deg: np.ndarray  # (B,)
    bias_mm: np.ndarray  # (B, 68, 2)
    sigma_mm: np.ndarray  # (68,)
    images_per_bin: np.ndarray  # (B,)
    made_by: dict
    # the identity prior weight measured best with this model (None: 1, the MAP weight)
    identity_prior_weight: float | None = None
    # the identity's shrinkage toward the mean shape measured with it: (common, per_image), the
    # factor 1 / (1 + common + per_image / M) for a subject of M images (None: no shrinkage)
    identity_shrinkage: tuple[float, float] | None = None

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "convention": self.convention,
            "yaw_bins_deg": [round(float(x), 3) for x in self.yaw_bins_deg],
            "bias_mm": np.round(self.bias_mm.astype(np.float64), 4).tolist(),
            "sigma_mm": np.round(self.sigma_mm.astype(np.float64), 4).tolist(),
            "images_per_bin": [int(x) for x in self.images_per_bin],
            "identity_prior_weight": self.identity_prior_weight,
            "identity_shrinkage": None
            if self.identity_shrinkage is None
            else {"common": self.identity_shrinkage[0], "per_image": self.identity_shrinkage[1]},
            "made_by": self.made_by,
        }
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()


def uniform(sigma_mm: float, backend: str = "uniform", points: int = N_LANDMARKS) -> ErrorModel:
    """No bias, the same noise for every one of ``points`` landmarks: the fallback without a
    calibrated model, and the model of any scheme that has none."""
    return ErrorModel(
        backend,
        "fixed_vertex",
        np.zeros(1),
        np.zeros((1, points, 2)),
        np.full(points, float(sigma_mm)),
        np.zeros(1, np.int64),
        {"uniform": True},
    )


def load_error_model(path: str | Path) -> ErrorModel:
    """Read and validate an error-model JSON file; errors name the file and the key."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ErrorModelError(f"{path}: landmark error model not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ErrorModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ErrorModelError(f"{path}: expected a JSON object with format {FORMAT!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ErrorModelError(
            f"{path}: format_version {doc.get('format_version')!r}, this morphset reads {FORMAT_VERSION}"
        )
    if doc.get("convention") not in CONVENTIONS:
        raise ErrorModelError(
            f"{path}: convention must be one of {list(CONVENTIONS)}, got {doc.get('convention')!r}"
        )

    def arr(key: str, shape: tuple) -> np.ndarray:
        try:
            a = np.asarray(doc[key], dtype=np.float64)
        except KeyError:
            raise ErrorModelError(f"{path}: missing key {key!r}") from None
        except (TypeError, ValueError):
            raise ErrorModelError(f"{path}: {key} must be numbers") from None
        if a.shape != shape or not np.all(np.isfinite(a)):
            raise ErrorModelError(f"{path}: {key} must be finite numbers of shape {shape}, got {a.shape}")
        return a

    bins = np.asarray(doc.get("yaw_bins_deg", []), dtype=np.float64)
    if bins.ndim != 1 or not len(bins) or np.any(np.diff(bins) <= 0):
        raise ErrorModelError(f"{path}: yaw_bins_deg must be a non-empty ascending list of degrees")
    b = len(bins)
    sigma = arr("sigma_mm", (N_LANDMARKS,))
    if np.any(sigma <= 0):
        raise ErrorModelError(f"{path}: sigma_mm must be positive")
    weight = doc.get("identity_prior_weight")
    if weight is not None and (not isinstance(weight, (int, float)) or not weight >= 0):
        raise ErrorModelError(f"{path}: identity_prior_weight must be a number >= 0 or null, got {weight!r}")
    shrink = doc.get("identity_shrinkage")
    if shrink is not None:
        try:
            shrink = (float(shrink["common"]), float(shrink["per_image"]))
        except (TypeError, KeyError, ValueError):
            raise ErrorModelError(
                f"{path}: identity_shrinkage must be null or {{common: number, per_image: number}}, got {shrink!r}"
            ) from None
        if not all(np.isfinite(v) and v >= 0 for v in shrink):
            raise ErrorModelError(f"{path}: identity_shrinkage values must be finite and >= 0, got {shrink}")
    return ErrorModel(
        str(doc.get("backend", "")),
        doc["convention"],
        bins,
        arr("bias_mm", (b, N_LANDMARKS, 2)),
        sigma,
        arr("images_per_bin", (b,)).astype(np.int64),
        dict(doc.get("made_by") or {}),
        None if weight is None else float(weight),
        shrink,
    )


@dataclass(frozen=True)
class LandmarkNoise:
    """An :class:`ErrorModel` in the fitting namespace and the fit's internal landmark order.

    ``inv_var`` (L,) the landmark weights 1/sigma^2; ``sigma`` (L,); ``bias`` (B, 2, L) or None
    when the model has none; ``yaw_bins`` (B,)."""

    inv_var: Array
    sigma: Array
    bias: Array | None
    yaw_bins: np.ndarray


def prepare_noise(model: ErrorModel, order: np.ndarray, xp: Any, dtype: Any) -> LandmarkNoise:
    sigma = model.sigma_mm[order]
    has_bias = bool(np.any(model.bias_mm != 0))
    bias = np.moveaxis(model.bias_mm[:, order, :], -1, 1) if has_bias else None  # (B, 2, L)
    return LandmarkNoise(
        inv_var=xp.asarray(1.0 / (sigma * sigma), dtype=dtype),
        sigma=xp.asarray(sigma, dtype=dtype),
        bias=None if bias is None else xp.asarray(np.ascontiguousarray(bias), dtype=dtype),
        yaw_bins=model.yaw_bins_deg,
    )


def bias_at(noise: LandmarkNoise, f: Array, R: Array) -> Array | None:
    """The detector's expected offset (..., 2, L) in the units of the observations, for images
    of scale ``f`` (...) and rotation ``R`` (..., 3, 3): the model's bias at the image's yaw,
    rotated by its roll and scaled by ``f``. None when the model has no bias."""
    if noise.bias is None:
        return None
    xp = namespace_of(f, R)
    yaw, _, roll = euler_deg(R)
    bins = noise.yaw_bins
    if len(bins) == 1:
        b = xp.broadcast_to(noise.bias[0], tuple(yaw.shape) + tuple(noise.bias.shape[1:]))
    else:
        centres = xp.asarray(bins, dtype=f.dtype)
        x = xp.clip(yaw, float(bins[0]), float(bins[-1]))
        i0 = xp.clip(xp.searchsorted(centres, xp.reshape(x, (-1,)), side="right") - 1, 0, len(bins) - 2)
        lo, hi = xp.take(centres, i0), xp.take(centres, i0 + 1)
        frac = xp.reshape((xp.reshape(x, (-1,)) - lo) / (hi - lo), tuple(x.shape) + (1, 1))
        shape = tuple(x.shape) + tuple(noise.bias.shape[1:])
        b0 = xp.reshape(xp.take(noise.bias, i0, axis=0), shape)
        b1 = xp.reshape(xp.take(noise.bias, i0 + 1, axis=0), shape)
        b = b0 * (1.0 - frac) + b1 * frac
    r = roll * (math.pi / 180.0)
    c, s = xp.cos(r)[..., None], xp.sin(r)[..., None]
    bx, by = b[..., 0, :], b[..., 1, :]
    rotated = xp.stack([c * bx - s * by, s * bx + c * by], axis=-2)
    return rotated * f[..., None, None]


# --- the manifest's error models (resolved on the driver) -------------------------------------
BUILTIN_DIR = Path(__file__).resolve().parent / "error_models"  # shipped with morphset (and its wheel)
MANIFEST_KEY = "models.landmark_error"


def error_model_path(source: str) -> Path:
    """``builtin:NAME`` (a model shipped with morphset) or a path."""
    if source.startswith("builtin:"):
        return BUILTIN_DIR / source.split(":", 1)[1]
    return Path(source).expanduser()


def resolve_error_model(entry: dict | None, backend: str) -> tuple[Path | None, str]:
    """(verified file, what was used) for ``models.landmark_error.<backend>``; (None, why) when the
    manifest names none. A named file that is missing or whose sha256 differs is an error."""
    from pipeline.storage.hashing import sha256_file

    where = f"{MANIFEST_KEY}.{backend}"
    if not entry:
        return None, f"{where} is not set"
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
        raise ErrorModelError(
            f"{where}: expected a mapping with 'source' (builtin:NAME or a path) and 'sha256'"
        )
    path = error_model_path(entry["source"])
    if not path.is_file():
        raise ErrorModelError(f"{where}.source: {path}: landmark error model not found")
    want = entry.get("sha256")
    if want:
        sha = sha256_file(path)
        if sha != want:
            raise ErrorModelError(f"{path}: sha256 {sha} differs from {where}.sha256 {want}")
    return path, f"{where}: {path}"
