"""Face-relative units: every image's landmarks expressed in model millimetres before the fit.

Per image, the mean shape's landmarks are posed onto the observations (closed-form scaled
orthographic camera, :func:`pipeline.fit.camera.estimate_camera`): its scale ``s`` (pixels per mm)
and the observations' weighted centroid ``c`` define ``v_mm = (v_px - c) / s``. The fit then
works in millimetres on the face, so priors, noise levels and robust thresholds mean the same at
any image size: scaling an image's landmarks by ``k`` about any point scales ``s`` by ``k`` and
moves ``c`` with them, leaving ``v_mm`` — and so every fitted shape, pose and expression —
unchanged; only the returned scale and translation change (exactly, up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipeline.fit.camera import estimate_camera, weighted_centroid
from pipeline.fit.xp import namespace_of

Array = Any


@dataclass(frozen=True)
class FaceFrame:
    """Per image: ``centre`` (S, M, 2) y-up px and ``scale`` (S, M) px per mm."""

    centre: Array
    scale: Array


def face_frame(mean: Array, v: Array, w: Array, refine_steps: int = 3) -> FaceFrame:
    """The frame of each image: ``mean`` (3, L) mm, ``v`` (S, M, 2, L) px, ``w`` (S, M, L)."""
    xp = namespace_of(v, w)
    f, _, _ = estimate_camera(mean, v, w, refine_steps)
    c = weighted_centroid(v, w)
    ok = xp.isfinite(f) & (f > 0) & (xp.sum(w, axis=-1) > 0)
    # padded or empty slots get the identity frame (their weights are zero anyway)
    return FaceFrame(xp.where(ok[..., None], c, 0.0), xp.where(ok, f, xp.ones_like(f)))


def to_face(v: Array, frame: FaceFrame) -> Array:
    """Observations (S, M, 2, L) px -> mm on the face."""
    return (v - frame.centre[..., None]) / frame.scale[..., None, None]


def to_image(result: Any, frame: FaceFrame) -> Any:
    """A :class:`pipeline.fit.loop.FitResult` of face-unit observations -> image pixels."""
    return replace(
        result,
        scale=result.scale * frame.scale,
        translation=result.translation * frame.scale[..., None] + frame.centre,
        rmse_px=result.rmse_px * frame.scale,
    )
