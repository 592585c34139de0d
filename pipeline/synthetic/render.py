"""Synth's renders of morphable-model faces (``morphset synth``), through the project's one
renderer (:func:`pipeline.render.renderer.render`, float64 on the CPU).

Camera: scaled orthographic, the fit stage's convention. A model point X (mm, y up, z towards the
camera) lands at image pixel ``u_x = t_x + f (R X)_x``, ``u_y = t_y - f (R X)_y`` (image y down);
its depth is ``(R X)_z`` (larger = nearer). Pixel centres are at integer coordinates.

Rasterisation is :mod:`pipeline.render.raster`'s (the nearest fragment per pixel centre,
deterministic); what is synth's own is around it: the head proxy, supersampling with area-averaged
downsampling, the mesh's holes filled, sRGB over the background, landmark visibility from the
depth buffer.

Shading (Genova et al. 2018, §3.2.2): Phong with an ambient term and two point lights at random
positions, in a random colour temperature, on a per-vertex albedo painted from the landmark
vertices (skin, brows, eyes with sclera/iris/lash line, lips, nostrils; see :func:`face_regions`)
and darkened in cavities (:func:`cavity_occlusion`). :func:`head_proxy` adds a hair cap and a
shadowed neck around the model's face-only crop: photos always show them, and detectors use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.sparse as sp
import torch

from pipeline.landmarks.scheme import IBUG68
from pipeline.models.correspondence import Correspondence
from pipeline.models.geometry import vertex_normals
from pipeline.render.renderer import Orthographic, Perspective, PhongLighting, render
from pipeline.render.shadow import light_visibility

# Landmark visibility: a landmark is hidden when the surface at its pixel is this much nearer (mm).
VISIBILITY_TOLERANCE_MM = 4.0
# The inside of the open face mesh, seen through its holes (nostrils, mouth, ears), is this much darker.
BACK_ALBEDO = 0.6


# --- camera --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Camera:
    """Rotation (3, 3) model -> camera, ``scale`` f px/mm, translation t (2,) px, and
    ``distance_mm``: None for a scaled orthographic camera (the fit's model), else a perspective
    camera that far (mm) from the model origin along the camera's +z; its focal length is
    ``scale * distance_mm`` px, so ``scale`` is the magnification at the model origin either way."""

    rotation: np.ndarray
    scale: float
    translation: np.ndarray
    distance_mm: float | None = None

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """Model points (n, 3) mm -> camera frame (n, 3) mm (x right, y up, z towards the camera)."""
        return np.asarray(points, np.float64) @ np.asarray(self.rotation, np.float64).T

    def project(self, points: np.ndarray) -> np.ndarray:
        """Model points (n, 3) mm -> image pixels (n, 2), y down."""
        c = self.to_camera(points)
        t = np.asarray(self.translation, np.float64)
        f = np.full(len(c), float(self.scale))
        if self.distance_mm is not None:
            # pinhole: magnification scale * D / (D - z), the model origin at magnification scale
            d = float(self.distance_mm)
            f = f * d / np.maximum(d - c[:, 2], 1e-6 * d)
        return np.stack([t[0] + f * c[:, 0], t[1] - f * c[:, 1]], axis=1)

    def view_directions(self, camera_points: np.ndarray) -> np.ndarray | None:
        """Unit directions (n, 3) from camera-frame points to the eye; None = +z (orthographic)."""
        if self.distance_mm is None:
            return None
        v = np.array([0.0, 0.0, float(self.distance_mm)]) - np.asarray(camera_points, np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


# --- lighting ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lighting:
    """Phong lighting in the camera frame (mm). Colours are linear RGB."""

    ambient: np.ndarray  # (3,)
    positions: np.ndarray  # (k, 3) point-light positions, camera frame, mm
    colours: np.ndarray  # (k, 3)
    specular: float = 0.12
    shininess: float = 16.0
    exposure: float = 1.0


def colour_temperature_rgb(kelvin: float) -> np.ndarray:
    """Linear RGB of a black body at ``kelvin`` (Tanner Helland's fit), normalised to max 1."""
    t = kelvin / 100.0
    r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
    g = 99.4708025861 * np.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
    bl = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * np.log(t - 10) - 305.0447927307)
    srgb = np.clip(np.array([r, g, bl]) / 255.0, 1e-3, 1.0)
    lin = srgb**2.2
    return lin / lin.max()


def sample_lighting(rng: np.random.Generator, distance_mm: float = 1500.0) -> Lighting:
    """Two point lights in the front hemisphere at random directions, one colour temperature.

    The key light comes from within ~60 degrees of the view direction and the fill light is
    dimmer, so the face is lit well enough for detectors while shading still varies.
    """
    kelvin = float(rng.uniform(3000.0, 8000.0))
    tint = colour_temperature_rgb(kelvin)
    # white balance only partly corrects the illuminant, like a camera's auto white balance
    tint = tint / np.mean(tint) * 0.5 + 0.5
    positions, colours = [], []
    for strength, max_angle in (
        (float(rng.uniform(0.55, 0.8)), 60.0),
        (float(rng.uniform(0.15, 0.35)), 80.0),
    ):
        azimuth = np.deg2rad(rng.uniform(-max_angle, max_angle))
        elevation = np.deg2rad(rng.uniform(-20.0, 50.0))
        d = np.array(
            [np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation)]
        )
        positions.append(d * distance_mm)
        colours.append(tint * strength)
    ambient = tint * float(rng.uniform(0.25, 0.4))
    return Lighting(
        ambient=ambient,
        positions=np.asarray(positions),
        colours=np.asarray(colours),
        specular=float(rng.uniform(0.05, 0.2)),
        shininess=float(rng.uniform(8.0, 30.0)),
        exposure=float(rng.uniform(0.9, 1.15)),
    )


def _t(a: np.ndarray) -> torch.Tensor:
    """A float64 batch of one, for :func:`pipeline.render.renderer.render`."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))[None]


def _torch_camera(camera: Camera, ss: int) -> Orthographic | Perspective:
    """``camera`` at ``ss`` times the resolution, pixel centres kept aligned (x_hi = ss x + (ss - 1) / 2)."""
    rot = _t(camera.rotation)
    centre = _t(np.asarray(camera.translation, np.float64) * ss + (ss - 1) / 2.0)
    if camera.distance_mm is None:
        return Orthographic(rot, torch.tensor([float(camera.scale) * ss], dtype=torch.float64), centre)
    d = float(camera.distance_mm)
    return Perspective(
        rot,
        torch.zeros((1, 3), dtype=torch.float64),
        torch.tensor([d], dtype=torch.float64),
        torch.tensor([float(camera.scale) * ss * d], dtype=torch.float64),
        centre,
    )


def to_srgb8(linear: np.ndarray) -> np.ndarray:
    return np.round(255.0 * np.clip(linear, 0.0, 1.0) ** (1 / 2.2)).astype(np.uint8)


# --- backgrounds ---------------------------------------------------------------------------------
def sample_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An sRGB uint8 background: a plain colour, a smooth gradient, or smooth coloured noise."""
    kind = int(rng.integers(0, 3))
    base = rng.uniform(0.05, 0.95, size=3)
    if kind == 0:
        img = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    elif kind == 1:
        other = rng.uniform(0.05, 0.95, size=3)
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        s = (np.cos(ang) * xx / width + np.sin(ang) * yy / height) * 0.5 + 0.5
        s = (s - s.min()) / max(np.ptp(s), 1e-9)
        img = base[None, None, :] * (1 - s[..., None]) + other[None, None, :] * s[..., None]
    else:
        cells = int(rng.integers(3, 12))
        coarse = rng.uniform(0.0, 1.0, size=(cells, cells, 3)).astype(np.float32)
        img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float64)
        img = 0.5 * img + 0.5 * base[None, None, :]
    img = img + rng.normal(0.0, 0.015, size=(height, width, 1))
    return np.round(255.0 * np.clip(img, 0.0, 1.0)).astype(np.uint8)


# --- albedo ----------------------------------------------------------------------------------------
def _polyline_distance(p: np.ndarray, line: np.ndarray, closed: bool = False) -> np.ndarray:
    """Distance (n,) of 2-D points to a polyline (k, 2)."""
    pts = np.vstack([line, line[:1]]) if closed else line
    a, b = pts[:-1], pts[1:]
    ab = b - a
    t = np.einsum("nkd,kd->nk", p[:, None, :] - a[None], ab) / np.maximum(np.sum(ab * ab, axis=1), 1e-12)
    t = np.clip(t, 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None, :] - closest, axis=2).min(axis=1)


def _inside_polygon(p: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test (n,) for 2-D points against a closed polygon (k, 2)."""
    x, y = p[:, 0:1], p[:, 1:2]
    x1, y1 = poly[None, :, 0], poly[None, :, 1]
    x2, y2 = np.roll(poly[:, 0], -1)[None], np.roll(poly[:, 1], -1)[None]
    crosses = ((y1 > y) != (y2 > y)) & (x < (x2 - x1) * (y - y1) / np.where(y2 != y1, y2 - y1, 1e-12) + x1)
    return (np.sum(crosses, axis=1) % 2).astype(bool)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def trim_face_triangles(vertices: np.ndarray, triangles: np.ndarray, landmarks: Correspondence) -> np.ndarray:
    """The triangles of a (frontal, mean) face mesh in front of the ears and above the neck rim.

    The model's crop ends in ragged ears and a ragged rim under the jaw; the head proxy (hair
    cap and neck) looks more like a photo there, so those triangles are not drawn."""
    v = np.asarray(vertices, np.float64)
    lm = landmarks.locate(v)
    centre_z = v[np.asarray(triangles)].mean(axis=1)[:, 2]
    centre_y = v[np.asarray(triangles)].mean(axis=1)[:, 1]
    # behind the top of the jaw contour (ear level) or below the chin's depth behind the jaw
    jaw_top = [IBUG68.named["right_jaw_top"], IBUG68.named["left_jaw_top"]]
    chin = IBUG68.named["chin"]
    behind = centre_z < lm[jaw_top, 2].min() - 4.0
    under = (centre_y < lm[chin, 1] + 25.0) & (centre_z < lm[chin, 2] - 35.0)
    return np.asarray(triangles)[~(behind | under)]


def cavity_occlusion(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Per-vertex ambient-occlusion factor (n,) in (0, 1]: darker in concave places (eye sockets,
    beside the nose, mouth corners). Concavity is how far the surface lies behind a smoothed copy
    of itself along the normal, at ~5 mm and ~14 mm scales (neighbour averaging on the mesh)."""
    v = np.asarray(vertices, np.float64)
    t = np.asarray(triangles, np.int64)
    n = len(v)
    i = np.concatenate([t[:, 0], t[:, 1], t[:, 2], t[:, 1], t[:, 2], t[:, 0]])
    j = np.concatenate([t[:, 1], t[:, 2], t[:, 0], t[:, 0], t[:, 1], t[:, 2]])
    adj = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    adj.data[:] = 1.0
    deg = np.asarray(adj.sum(axis=1)).ravel()
    walk = sp.diags(1.0 / np.maximum(deg, 1.0)) @ adj
    normals = vertex_normals(v, t, weighting="area")
    smooth = v.copy()
    depth = {}
    for step in range(1, 201):
        smooth = walk @ smooth
        if step in (30, 200):
            depth[step] = np.clip(np.einsum("ij,ij->i", smooth - v, normals), 0.0, None)
    occ = np.exp(-(0.25 * depth[30] + 0.12 * depth[200]))
    occ[deg == 0] = 1.0
    return occ


def face_regions(
    vertices: np.ndarray, landmarks: Correspondence, triangles: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Soft per-vertex weights (n,) in [0, 1] of facial regions, painted from the 68 landmark
    vertices on a (near-frontal, y-up) shape. Computed once per model on its mean shape: the dense
    correspondence of the model carries the paint along with identity and expression. With
    ``triangles`` also an ``occlusion`` factor (see :func:`cavity_occlusion`)."""
    v = np.asarray(vertices, np.float64)
    lm = landmarks.locate(v)
    xy = v[:, :2]
    front = _smoothstep(lm[:, 2].min() - 40.0, lm[:, 2].min() - 15.0, v[:, 2])  # not the sides/ears
    out: dict[str, np.ndarray] = {}

    # brows: iBUG points run along the top edge of the brow, so the band hangs below them
    brow = np.zeros(len(v))
    for part in ("right_brow", "left_brow"):
        line = lm[IBUG68.group(part), :2] - np.array([0.0, 3.2])
        brow = np.maximum(brow, 1.0 - _smoothstep(2.2, 4.2, _polyline_distance(xy, line)))
    out["brow"] = brow * front

    eye = np.zeros(len(v))
    iris = np.zeros(len(v))
    pupil = np.zeros(len(v))
    lash = np.zeros(len(v))
    for part in ("right_eye", "left_eye"):
        idx = IBUG68.group(part)  # outer corner, two upper lid points, inner corner, two lower
        poly = lm[idx, :2]
        inside = _inside_polygon(xy, poly).astype(np.float64)
        edge = _polyline_distance(xy, poly, closed=True)
        eye = np.maximum(eye, np.where(inside > 0, _smoothstep(0.0, 0.8, edge), 0.0))
        centre = poly.mean(axis=0)
        r = np.linalg.norm(xy - centre, axis=1)
        iris = np.maximum(iris, inside * (1.0 - _smoothstep(5.0, 5.8, r)))
        pupil = np.maximum(pupil, inside * (1.0 - _smoothstep(1.8, 2.4, r)))
        upper = lm[[idx[0], idx[1], idx[2], idx[3]], :2]
        lower = lm[[idx[3], idx[4], idx[5], idx[0]], :2]
        lash = np.maximum(lash, 1.0 - _smoothstep(0.8, 1.8, _polyline_distance(xy, upper)))
        lash = np.maximum(lash, 0.5 * (1.0 - _smoothstep(0.3, 0.9, _polyline_distance(xy, lower))))
    out["eye"] = eye
    out["iris"] = iris
    out["pupil"] = pupil
    out["lash"] = lash

    outer = lm[IBUG68.group("outer_lips"), :2]
    inner = lm[IBUG68.group("inner_lips"), :2]
    in_outer = _inside_polygon(xy, outer)
    in_inner = _inside_polygon(xy, inner)
    lip = np.where(in_outer, 1.0, 1.0 - _smoothstep(0.0, 1.2, _polyline_distance(xy, outer, closed=True)))
    out["lip"] = lip * front
    out["mouth"] = in_inner.astype(np.float64) * front

    nostril = np.zeros(len(v))
    named = IBUG68.named
    nostrils = (
        (named["right_nostril_outer"], named["right_nostril_inner"]),
        (named["left_nostril_inner"], named["left_nostril_outer"]),
    )
    for left, right in nostrils:
        centre = 0.5 * (lm[left, :2] + lm[right, :2]) + np.array([0.0, 1.2])
        d = (xy - centre) / np.array([2.2, 1.2])
        nostril = np.maximum(nostril, 1.0 - _smoothstep(0.6, 1.0, np.linalg.norm(d, axis=1)))
    outer_nostrils = [named["right_nostril_outer"], named["left_nostril_outer"]]
    out["nostril"] = nostril * (v[:, 2] > lm[outer_nostrils, 2].min() - 8.0)
    if triangles is not None:
        out["occlusion"] = cavity_occlusion(v, triangles)
    return out


@dataclass(frozen=True)
class Appearance:
    """Per-subject colours (linear RGB)."""

    skin: np.ndarray
    brow: np.ndarray
    lip: np.ndarray
    iris: np.ndarray


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Plausible skin/brow/lip/iris colours across light to dark skin tones."""
    tone = rng.uniform(0.0, 1.0)  # 0 = light, 1 = dark
    skin_srgb = np.array([0.93, 0.76, 0.64]) * (1 - tone) + np.array([0.45, 0.30, 0.22]) * tone
    skin_srgb = np.clip(skin_srgb * rng.uniform(0.95, 1.05, size=3), 0.05, 1.0)
    skin = skin_srgb**2.2
    brow = (np.array([0.22, 0.16, 0.12]) * rng.uniform(0.4, 1.3)) ** 2.2
    lip = (skin_srgb * np.array([0.85, 0.55, 0.55])) ** 2.2
    iris_choices = np.array([[0.30, 0.18, 0.10], [0.20, 0.30, 0.45], [0.25, 0.30, 0.18], [0.12, 0.08, 0.05]])
    iris = iris_choices[int(rng.integers(0, len(iris_choices)))] ** 2.2
    return Appearance(skin, brow, lip, iris)


def paint_albedo(regions: dict[str, np.ndarray], appearance: Appearance) -> np.ndarray:
    """Per-vertex linear RGB albedo (n, 3) from region weights and a subject's colours."""

    def over(base: np.ndarray, colour: np.ndarray, w: np.ndarray) -> np.ndarray:
        return base * (1 - w[:, None]) + colour[None, :] * w[:, None]

    n = len(regions["brow"])
    alb = np.broadcast_to(appearance.skin, (n, 3)).copy()
    alb = over(alb, appearance.lip, regions["lip"] * 0.9)
    alb = over(alb, np.array([0.02, 0.01, 0.01]), regions["mouth"])
    alb = over(alb, appearance.brow, regions["brow"] * 0.85)
    alb = over(alb, np.array([0.03, 0.02, 0.02]), regions["nostril"] * 0.9)
    alb = over(alb, np.array([0.75, 0.72, 0.70]), regions["eye"])
    alb = over(alb, appearance.iris, regions["iris"] * regions["eye"])
    alb = over(alb, np.array([0.01, 0.01, 0.01]), regions["pupil"] * regions["eye"])
    alb = over(alb, np.array([0.02, 0.015, 0.01]), regions["lash"] * 0.9)
    if "occlusion" in regions:
        alb = alb * regions["occlusion"][:, None]
    return alb


# --- the whole render ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderResult:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    landmarks_2d: np.ndarray  # (68, 2) float64 image pixels (x, y down)
    visible: np.ndarray  # (68,) bool: inside the image and not occluded (z-buffer test)
    mask: np.ndarray  # (H, W) bool: pixels covered by the mesh


def render_face(
    vertices: np.ndarray,
    triangles: np.ndarray,
    albedo: np.ndarray,
    landmarks: Correspondence,
    camera: Camera,
    lighting: Lighting,
    background: np.ndarray,
    supersample: int = 2,
    closed_from: int | None = None,
    gloss: np.ndarray | None = None,
    cast_shadows: bool = False,
) -> RenderResult:
    """Render a mesh (model frame, mm) over ``background`` (H, W, 3 uint8).

    ``landmarks``: where the scheme's points lie on the mesh (their projections and visibility are returned). The image is rendered at ``supersample``
    times the resolution and area-averaged down (anti-aliased silhouettes and features).
    Triangles with index >= ``closed_from`` form closed outward-wound surfaces and are back-face
    culled; the others (an open face mesh) are drawn from both sides, the inside darker.
    ``gloss`` (n,) scales the specular highlight per vertex (hair is less shiny than skin).
    ``cast_shadows``: each light is shadowed by the whole mesh (shadow maps sized to the face,
    the vertices before ``closed_from``; :mod:`pipeline.render.shadow`). A perspective ``camera``
    also sets the highlights' view directions.
    """
    bg = np.asarray(background)
    if bg.ndim != 3 or bg.shape[2] != 3 or bg.dtype != np.uint8:
        raise ValueError(f"background must be an (H, W, 3) uint8 image, got {bg.shape} {bg.dtype}")
    h, w = bg.shape[:2]
    ss = int(supersample)
    if ss < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    v = np.asarray(vertices, np.float64)
    cam_pts = camera.to_camera(v)
    uv = camera.project(v)
    # high-resolution pixel centres: x_hi = ss * x + (ss - 1) / 2 keeps pixel centres aligned
    screen = np.c_[uv * ss + (ss - 1) / 2.0, cam_pts[:, 2]]
    # no culling: through holes of the open mesh (nostrils, mouth, ears) one sees its inside,
    # which is drawn darker instead of letting the background show through
    # Triangles from ``closed_from`` on belong to closed surfaces (the head proxy): cull those.
    cull = np.zeros(len(triangles), bool)
    if closed_from is not None:
        cull[closed_from:] = True
    shadows = None
    if cast_shadows:
        face_end = len(v) if closed_from is None else int(np.asarray(triangles)[:closed_from].max()) + 1

        def shadows(points: torch.Tensor) -> torch.Tensor:
            lit = light_visibility(
                cam_pts, triangles, lighting.positions, points[0].numpy(), cam_pts[:face_end]
            )
            return torch.from_numpy(lit)[None]

    with torch.no_grad():
        out = render(
            _t(v),
            torch.from_numpy(np.asarray(triangles, np.int64)),
            _t(albedo),
            _torch_camera(camera, ss),
            PhongLighting(
                _t(lighting.positions),
                _t(np.asarray(lighting.colours) * lighting.exposure),
                _t(np.asarray(lighting.ambient) * lighting.exposure),
                torch.tensor([float(lighting.specular)], dtype=torch.float64),
                float(lighting.shininess),
            ),
            h * ss,
            w * ss,
            cull=torch.from_numpy(cull),
            back_albedo=BACK_ALBEDO,
            gloss=None if gloss is None else _t(gloss),
            shadows=shadows,
            silhouette=False,
        )
    covered = (out.tri_id[0] >= 0).numpy()
    hi = cv2.resize(bg, (w * ss, h * ss), interpolation=cv2.INTER_NEAREST)
    hi[covered] = to_srgb8(out.image[0].numpy()[covered])
    depth = out.depth[0].numpy()
    hi, covered = fill_mesh_holes(hi, covered, kernel=2 * max(1, round(0.012 * h * ss)) + 1)
    image = cv2.resize(hi, (w, h), interpolation=cv2.INTER_AREA) if ss > 1 else hi
    mask_hi = covered.astype(np.float32)
    mask = (cv2.resize(mask_hi, (w, h), interpolation=cv2.INTER_AREA) if ss > 1 else mask_hi) >= 0.5

    lm2d = landmarks.locate(uv)
    visible = landmark_visibility(landmarks.locate(screen), depth, VISIBILITY_TOLERANCE_MM)
    inside = (lm2d[:, 0] >= 0) & (lm2d[:, 0] <= w - 1) & (lm2d[:, 1] >= 0) & (lm2d[:, 1] <= h - 1)
    return RenderResult(np.ascontiguousarray(image), lm2d, visible & inside, mask)


def landmark_visibility(points: np.ndarray, depth: np.ndarray, tolerance: float) -> np.ndarray:
    """(k,) bool: screen points (x, y, depth) not behind the z-buffer by more than ``tolerance``.

    A point whose pixel is empty (it lies on the silhouette) counts as visible; points outside
    the buffer count as not visible.
    """
    h, w = depth.shape
    x = np.round(points[:, 0]).astype(np.int64)
    y = np.round(points[:, 1]).astype(np.int64)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    zb = np.full(len(points), -np.inf)
    zb[inside] = depth[y[inside], x[inside]]
    return inside & (points[:, 2] >= zb - tolerance)


def fill_mesh_holes(image: np.ndarray, mask: np.ndarray, kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint small gaps of the mesh (the model's triangle list leaves holes at the nostrils,
    ears and the neck rim) from the surrounding surface colour; returns (image, covered mask)."""
    m = mask.astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
    closed = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k)
    holes = (closed > 0) & ~mask
    if not holes.any():
        return image, mask
    filled = cv2.inpaint(np.ascontiguousarray(image), holes.astype(np.uint8), 3, cv2.INPAINT_TELEA)
    return filled, closed > 0


# --- head proxy: hair cap and neck ------------------------------------------------------------------
def _grid_mesh(nu: int, nv: int, closed_u: bool) -> np.ndarray:
    """Triangles of an (nv, nu) vertex grid, row-major, wrapping in u when ``closed_u``."""
    cols = nu if closed_u else nu - 1
    i, j = np.meshgrid(np.arange(nv - 1), np.arange(cols), indexing="ij")
    a = i * nu + j
    b = i * nu + (j + 1) % nu
    c = (i + 1) * nu + j
    d = (i + 1) * nu + (j + 1) % nu
    return np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])


def _orient_outward(vertices: np.ndarray, triangles: np.ndarray, centre: np.ndarray) -> np.ndarray:
    v = vertices
    n = np.cross(v[triangles[:, 1]] - v[triangles[:, 0]], v[triangles[:, 2]] - v[triangles[:, 0]])
    out = v[triangles].mean(axis=1) - centre
    flip = np.einsum("ij,ij->i", n, out) < 0
    t = triangles.copy()
    t[flip] = t[flip][:, [0, 2, 1]]
    return t


@dataclass(frozen=True)
class HeadStyle:
    """Per-subject head proxy: hair colour (linear RGB), skull size factors, hairline height (mm)."""

    hair: np.ndarray
    width: float
    height: float
    depth: float
    hairline_mm: float


def luminance(linear_rgb: np.ndarray) -> float:
    """Relative luminance of a linear RGB colour (Rec. 709 weights)."""
    return float(np.dot(np.asarray(linear_rgb, np.float64), [0.2126, 0.7152, 0.0722]))


def sample_head_style(rng: np.random.Generator, skin: np.ndarray | None = None) -> HeadStyle:
    """Hair colour and head size. With ``skin`` (linear RGB), hair colours within a factor 2.5 of
    the skin's luminance are not drawn: a hairline that vanishes into the skin is rare in photos
    and removes the forehead contour detectors rely on."""
    hair_choices = np.array([[0.05, 0.04, 0.035], [0.16, 0.10, 0.06], [0.30, 0.20, 0.12], [0.62, 0.50, 0.32]])
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    if skin is not None:
        ratio = np.array([luminance(h**2.2) for h in hair_choices]) / max(luminance(skin), 1e-6)
        clash = (ratio > 1 / 2.5) & (ratio < 2.5)
        clash[0] = False  # near-black hair is always possible
        weights = np.where(clash, 0.0, weights)
    weights = weights / weights.sum()
    hair = hair_choices[int(rng.choice(len(hair_choices), p=weights))] * rng.uniform(0.8, 1.2)
    return HeadStyle(
        hair=np.clip(hair, 0.0, 1.0) ** 2.2,
        width=float(rng.uniform(0.97, 1.08)),
        height=float(rng.uniform(0.95, 1.1)),
        depth=float(rng.uniform(0.95, 1.05)),
        hairline_mm=float(rng.uniform(-6.0, 6.0)),
    )


def head_proxy(
    face_vertices: np.ndarray, landmarks: Correspondence, style: HeadStyle, skin: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices, triangles, albedo) of a hair cap (an ellipsoid behind and above the face mesh,
    which ends at the forehead and in front of the ears) and a neck (an elliptic cylinder under
    the jaw). Real photos always show these, and detectors trained on photos use the contrast
    of the hairline, temples and jaw/neck shadow. Sizes follow the face's landmarks."""
    v = np.asarray(face_vertices, np.float64)
    lm = landmarks.locate(v)
    named = IBUG68.named
    chin = named["chin"]
    half_width = 0.5 * np.linalg.norm(lm[named["right_jaw_top"]] - lm[named["left_jaw_top"]])  # ~73 mm
    brow_y = lm[IBUG68.group("brows"), 1].max()
    eye_z = lm[IBUG68.group("eyes"), 2].mean()
    # skull ellipsoid: centred behind the eyes at brow height
    centre = np.array([lm[named["nose_bridge_top"], 0], brow_y - 15.0, eye_z - 85.0 * style.depth])
    radii = np.array([1.2 * half_width * style.width, 100.0 * style.height, 92.0 * style.depth])
    nu, nv = 48, 32
    theta = np.linspace(0.0, np.pi, nv)  # from the top down
    phi = np.linspace(0.0, 2 * np.pi, nu, endpoint=False)
    tt, pp = np.meshgrid(theta, phi, indexing="ij")
    unit = np.stack([np.sin(tt) * np.sin(pp), np.cos(tt), np.sin(tt) * np.cos(pp)], axis=-1).reshape(-1, 3)
    cap = centre + unit * radii
    tri = _grid_mesh(nu, nv, closed_u=True)
    # keep the crown and the back; in front the cap stops at the hairline above the brows
    # the hairline dips towards the temples, where the face mesh ends lower
    hairline = brow_y + 28.0 + style.hairline_mm - 30.0 * ((cap[:, 0] - centre[0]) / half_width) ** 2
    keep_v = (cap[:, 1] > hairline) | (cap[:, 2] < eye_z - 20.0)
    keep_v &= cap[:, 1] > lm[chin, 1] + 30.0
    cap_tri = _orient_outward(cap, tri[keep_v[tri].all(axis=1)], centre)

    # neck: elliptic cylinder from inside the head down past the image edge
    ny, nphi = 12, 40
    neck_c = np.array([lm[chin, 0], 0.0, eye_z - 85.0])
    ys = np.linspace(lm[chin, 1] + 40.0, lm[chin, 1] - 260.0, ny)
    phi2 = np.linspace(0.0, 2 * np.pi, nphi, endpoint=False)
    yy, p2 = np.meshgrid(ys, phi2, indexing="ij")
    neck = np.stack(
        [neck_c[0] + 0.68 * half_width * np.sin(p2), yy, neck_c[2] + 55.0 * np.cos(p2)], axis=-1
    ).reshape(-1, 3)
    ntri = _grid_mesh(nphi, ny, closed_u=True)
    axis_pts = np.c_[
        np.full(len(ntri), neck_c[0]), neck[ntri].mean(axis=1)[:, 1], np.full(len(ntri), neck_c[2])
    ]
    nn = np.cross(neck[ntri[:, 1]] - neck[ntri[:, 0]], neck[ntri[:, 2]] - neck[ntri[:, 0]])
    flip = np.einsum("ij,ij->i", nn, neck[ntri].mean(axis=1) - axis_pts) < 0
    ntri[flip] = ntri[flip][:, [0, 2, 1]]

    verts = np.vstack([cap, neck])
    tris = np.vstack([cap_tri, ntri + len(cap)])
    albedo = np.vstack(
        [
            np.broadcast_to(style.hair, (len(cap), 3)),
            # the neck is in the jaw's shadow: darkest just under the jaw, like in photos
            np.asarray(skin)[None, :]
            * np.interp(neck[:, 1], [lm[chin, 1] - 70.0, lm[chin, 1]], [0.75, 0.35])[:, None],
        ]
    )
    return verts, tris, albedo
