"""Cut each image to a square window around its fitted face, at one size (I/O edge, NumPy/PIL).

A window is a similarity of the image: window pixel ``w = k (u − o)``, so a scaled-orthographic
camera ``u = t + f (R X)`` becomes ``w = k (t − o) + k f (R X)`` and back. Resampling every face
to the same size makes the refinement's settings (blur, sample spacing) mean the same at any
image size; PIL's filters widen their support when they shrink, so a large photo is averaged, not
aliased."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Window:
    scale: float  # k: window pixels per image pixel
    offset: tuple[float, float]  # o: image pixels (window pixel centres at integers, as the image's)

    def to_window(self, f: float, t: np.ndarray) -> tuple[float, np.ndarray]:
        return self.scale * f, self.scale * (np.asarray(t, np.float64) - np.asarray(self.offset))

    def to_image(self, f: float, t: np.ndarray) -> tuple[float, np.ndarray]:
        return f / self.scale, np.asarray(t, np.float64) / self.scale + np.asarray(self.offset)


def srgb_to_linear(rgb8: np.ndarray) -> np.ndarray:
    c = rgb8.astype(np.float32) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


@dataclass(frozen=True)
class FaceWindow:
    pixels: np.ndarray  # (size, size, 3) linear RGB float32
    inside: np.ndarray  # (size, size) bool: the pixel comes from the image, not from its padded border
    window: Window


INSIDE_BORDER_PX = 2.0  # window pixels next to the image's edge count as outside (the bilinear tap, a blur)


def face_window(image: np.ndarray, points: np.ndarray, size: int, margin: float) -> FaceWindow:
    """The square around ``points`` (n, 2) image pixels, its side (1 + 2·margin) × their larger
    extent, resampled to ``size`` pixels. Where the square leaves the image its pixels repeat the
    border, so that filters are defined, and ``inside`` is false there: a face cut by the photo's
    edge (a tight crop) must not be explained by the border's streaks."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre = (lo + hi) / 2
    side = float(max(hi - lo)) * (1 + 2 * margin)
    x0, y0 = centre - side / 2
    box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    # outside the image PIL repeats nothing: pad with the border first so the window is defined
    pad = int(np.ceil(max(0.0, -box[0], -box[1], box[2] - image.shape[1], box[3] - image.shape[0]))) + 1
    if pad > 1:
        pil = Image.fromarray(np.pad(np.asarray(pil), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
        box = (box[0] + pad, box[1] + pad, box[2] + pad, box[3] + pad)
    out = pil.resize((size, size), Image.Resampling.BILINEAR, box=box)
    k = size / side
    # pixel centres at integers on both sides: image u ↔ PIL's u + 0.5, window j ↔ x0 + (j + 0.5) / k
    offset = (float(x0) - 0.5 + 0.5 / k, float(y0) - 0.5 + 0.5 / k)
    window = Window(scale=k, offset=offset)
    j = np.arange(size, dtype=np.float64)
    edge = INSIDE_BORDER_PX / k  # image pixels
    u = offset[0] + j / k
    v = offset[1] + j / k
    in_u = (u >= edge) & (u <= image.shape[1] - 1 - edge)
    in_v = (v >= edge) & (v <= image.shape[0] - 1 - edge)
    return FaceWindow(srgb_to_linear(np.asarray(out)), in_v[:, None] & in_u[None, :], window)
