"""What separates a photograph from the fit's own image model, as ``morphset synth`` settings.

The landmark fit and the refinement assume a scaled-orthographic camera, smooth shading, one
colour per light and a face colour that is the same in every image of a person. Renders made
under those assumptions flatter any method built on them (docs/synth.md). Each effect here breaks
one of them, the way photos of one person in CASIA-WebFace do:

- ``camera``/``camera_distance_mm``: a pinhole camera from arm's length (a phone: ~0.4 m, strong
  perspective) to a portrait lens's 2.5 m (almost orthographic), log-uniform;
- ``cast_shadows``: the nose, brows and hair shadow the face (shadow maps);
- ``light_colours``: each light its own colour temperature (tungsten 2700 K to shade 7500 K), the
  camera balancing for their mix; ``white_balance_std``: its balance then off by a per-image
  log-gain of red and blue;
- ``skin_change_std``: a per-image, low-frequency change of the skin's colour (tan, make-up,
  flush): a quadratic log-gain field over the face, per colour channel;
- ``noise_std``, ``blur``, ``jpeg_quality``: sensor noise (8-bit levels), a Gaussian blur (sigma
  as a fraction of the image side: the same look at any size) and JPEG compression, each drawn
  per image from its range.

Every per-image value is drawn from its own generator, seeded by ``(seed, subject, image, 1)``,
so turning an effect on or off leaves the other draws of a render unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.synthetic.render import Lighting, colour_temperature_rgb

KELVIN_RANGE = (2700.0, 7500.0)


@dataclass(frozen=True)
class Effects:
    """The realism settings of ``stages.synth`` (see the module docstring)."""

    camera: str = "orthographic"
    camera_distance_mm: tuple[float, float] = (400.0, 2500.0)
    cast_shadows: bool = False
    light_colours: bool = False
    white_balance_std: float = 0.0
    skin_change_std: float = 0.0
    noise_std: tuple[float, float] = (2.0, 2.0)
    blur: tuple[float, float] = (0.0, 0.0)
    jpeg_quality: tuple[int, int] = (92, 92)

    @classmethod
    def from_stage(cls, params: dict[str, Any]) -> Effects:
        """From ``stages.synth`` (defaults filled); checks the ranges the JSON schema cannot."""

        def span(key: str, kind: type = float) -> tuple[Any, Any]:
            value = params[key]
            lo, hi = (value, value) if isinstance(value, int | float) else value
            lo, hi = kind(lo), kind(hi)
            if lo > hi:
                raise ValueError(f"stages.synth.{key}: expected [min, max] with min <= max, got {[lo, hi]}")
            return lo, hi

        return cls(
            camera=str(params["camera"]),
            camera_distance_mm=span("camera_distance_mm"),
            cast_shadows=bool(params["cast_shadows"]),
            light_colours=bool(params["light_colours"]),
            white_balance_std=float(params["white_balance_std"]),
            skin_change_std=float(params["skin_change_std"]),
            noise_std=span("noise_std"),
            blur=span("blur"),
            jpeg_quality=span("jpeg_quality", int),
        )

    def describe(self) -> dict[str, Any]:
        """Which effects are on (a row of docs/synth.md's table)."""
        return {
            "perspective": self.camera == "perspective",
            "cast_shadows": self.cast_shadows,
            "light_colours": self.light_colours,
            "white_balance": self.white_balance_std > 0,
            "skin_change": self.skin_change_std > 0,
            "noise": self.noise_std[1] > 0,
            "blur": self.blur[1] > 0,
            "jpeg": self.jpeg_quality[0] < 100,
        }


# The settings that reproduce the renders made before these effects existed (the fit's image model).
NO_EFFECTS: dict[str, Any] = {
    "camera": "orthographic",
    "cast_shadows": False,
    "light_colours": False,
    "white_balance_std": 0.0,
    "skin_change_std": 0.0,
    "noise_std": [2.0, 2.0],
    "blur": [0.0, 0.0],
    "jpeg_quality": 92,
}


@dataclass(frozen=True)
class ImageEffects:
    """One image's draw of the effects."""

    distance_mm: float | None  # None = orthographic
    light_kelvin: np.ndarray | None  # (k,) per light, None = the scene's one colour temperature
    white_balance: np.ndarray  # (3,) linear gains
    skin_field: np.ndarray  # (6, 3) log-gain coefficients of 1, x, y, x^2, xy, y^2
    noise_std: float
    blur_sigma_px: float
    jpeg_quality: int


def sample_image_effects(fx: Effects, rng: np.random.Generator, size: int, n_lights: int) -> ImageEffects:
    """Draw one image's effects (a fixed number of draws, whatever is on)."""
    lo, hi = np.log(fx.camera_distance_mm[0]), np.log(fx.camera_distance_mm[1])
    distance = float(np.exp(rng.uniform(lo, hi)))
    kelvin = rng.uniform(*KELVIN_RANGE, size=n_lights)
    wb = np.exp(rng.normal(0.0, 1.0, size=2) * fx.white_balance_std)
    shared = rng.normal(0.0, 1.0) * fx.skin_change_std
    field = rng.normal(0.0, 1.0, size=(6, 3)) * (0.5 * fx.skin_change_std)
    field[0] += shared
    noise = float(rng.uniform(*fx.noise_std))
    blur = float(rng.uniform(*fx.blur)) * size
    quality = int(rng.integers(fx.jpeg_quality[0], fx.jpeg_quality[1] + 1))
    return ImageEffects(
        distance_mm=distance if fx.camera == "perspective" else None,
        light_kelvin=kelvin if fx.light_colours else None,
        white_balance=np.array([wb[0], 1.0, wb[1]]),
        skin_field=field,
        noise_std=noise,
        blur_sigma_px=blur,
        jpeg_quality=quality,
    )


def recolour_lights(lighting: Lighting, kelvin: np.ndarray) -> Lighting:
    """Each light in its own colour temperature (its strength kept), the ambient in their
    strength-weighted mix; the camera's white balance corrects half of the mix's cast, as the
    single-illuminant lighting does (:func:`pipeline.synthetic.render.sample_lighting`)."""
    strengths = lighting.colours.mean(axis=1)
    tints = np.stack([colour_temperature_rgb(float(k)) for k in kelvin])
    mix = (strengths[:, None] * tints).sum(axis=0) / max(float(strengths.sum()), 1e-12)
    balance = 1.0 / (0.5 * mix / mix.mean() + 0.5)  # half-corrected for the mix
    colours = strengths[:, None] * tints / tints.mean(axis=1, keepdims=True) * balance[None]
    ambient = float(lighting.ambient.mean()) * (mix / mix.mean()) * balance
    return dataclasses.replace(lighting, colours=colours, ambient=ambient)


def skin_gain(vertices: np.ndarray, field: np.ndarray) -> np.ndarray:
    """(n, 3) multiplicative colour gains of a low-frequency field over the face: ``field`` (6, 3)
    log-gain coefficients of 1, x, y, x^2, xy, y^2, with x and y the vertices' frontal
    coordinates scaled to [-1, 1] over the face."""
    v = np.asarray(vertices, np.float64)
    lo, hi = v[:, :2].min(axis=0), v[:, :2].max(axis=0)
    xy = (v[:, :2] - 0.5 * (lo + hi)) / np.maximum(0.5 * (hi - lo), 1e-9)
    x, y = xy[:, 0], xy[:, 1]
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    return np.exp(np.clip(basis @ field, -0.7, 0.7))


def white_balance(image: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """An sRGB uint8 image with linear per-channel ``gains``, luminance kept."""
    g = np.asarray(gains, np.float64)
    g = g / float(np.dot(g, [0.2126, 0.7152, 0.0722]))
    if np.allclose(g, 1.0):
        return image
    lut = np.arange(256, dtype=np.float64) / 255.0
    out = np.empty_like(image)
    for c in range(3):
        mapped = np.clip((lut**2.2) * g[c], 0.0, 1.0) ** (1 / 2.2)
        out[..., c] = np.round(255.0 * mapped).astype(np.uint8)[image[..., c]]
    return out


def blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (sigma in pixels); below 0.2 px the image is returned as is."""
    if sigma_px < 0.2:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigma_px)
