"""Face textures taken from real photos, for ``morphset synth`` (the "face profiling" idea of
300W-LP, on which 3DDFA trained).

Each photo is detected, landmarked and fitted alone by the project's own stages (a throw-away run:
MTCNN, dlib by default, the fit in ``identity: image`` mode). Its pixels are then sampled onto the
model's vertices where the fitted face sees them (:func:`extract_texture`): the dense
correspondence of the morphable model carries that texture onto any new identity and expression.
The photo's own shading is divided out with a first-order lighting fit (luminance linear in the
normal), vertices the photo does not see take their mirror partner's colour (:func:`mirror_vertices`)
or the face's median skin colour. Around the rendered face, the head (hair, ears, neck) comes from
the source photo itself, warped with the face onto the new framing (:func:`head_fill`).

The default set (``textures: builtin``) is the two real face photographs that ship inside wheels
the project already installs: scikit-image's ``data/astronaut.png`` and matplotlib's
``sample_data/grace_hopper.jpg``, located through the installed packages at run time.

Fitting photos costs a detector and landmark run: textures are cached in ``cache_dir/textures/``
as ``.npz`` (read with ``allow_pickle=False``), keyed by the photos' sha256, the model's and the
parameters of the stages that fitted them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy.spatial import cKDTree

from pipeline.landmarks.scheme import IBUG68
from pipeline.models.geometry import vertex_normals
from pipeline.models.morphable_model import MorphableModel
from pipeline.render.raster import rasterize
from pipeline.synthetic.render import Camera, landmark_visibility

log = logging.getLogger(__name__)

# bump when extraction changes what a cached texture holds
TEXTURE_FORMAT = 2
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# the fitted face is rasterised with its landmark box at most this tall (px): large photos are
# sampled from a resized copy (texture detail beyond a 250-px render is wasted)
MAX_FACE_PX = 320.0


class TextureError(ValueError):
    """No usable texture: no photo, or none that could be detected, landmarked and fitted."""


@dataclass(frozen=True)
class FaceTexture:
    """One photo's face texture on the model's vertices, and its head without the face."""

    name: str  # the photo's file name (relative to its folder)
    albedo: np.ndarray  # (n_vertices, 3) float32, linear RGB, shading divided out
    coverage: np.ndarray  # (n_vertices,) float32 in [0, 1]: weight of the vertex's own pixel
    skin: np.ndarray  # (3,) linear RGB: median colour of the well-seen face
    plate: np.ndarray  # (H, W, 3) uint8 RGB: the photo with its fitted face filled in (hair, ears, neck stay)
    head_centre: np.ndarray  # (2,) px: where the skull centre (:func:`skull_centre`) projects in the photo
    head_scale: float  # px per mm of the photo's fit
    head_up: float  # radians: image direction of the head's up axis in the photo


# --- which photos -----------------------------------------------------------------------------------
def builtin_photos() -> list[Path]:
    """The real face photos inside installed wheels (scikit-image, matplotlib), never copied here."""
    out = []
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.origin:
        out.append(Path(spec.origin).parent / "data" / "astronaut.png")
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        out.append(Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    found = [p for p in out if p.is_file()]
    if not found:
        raise TextureError(
            "textures: builtin: neither skimage/data/astronaut.png nor "
            "matplotlib/mpl-data/sample_data/grace_hopper.jpg is installed; pass a folder of face photos"
        )
    return found


def find_photos(source: str | Path) -> list[Path]:
    """``builtin`` or every image file under a folder (any layout), sorted."""
    if str(source) == "builtin":
        return builtin_photos()
    root = Path(source).expanduser()
    if not root.is_dir():
        raise TextureError(f"{root}: textures must be 'builtin', 'painted' or a folder of face photos")
    photos = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise TextureError(f"{root}: no image files ({', '.join(PHOTO_SUFFIXES)}) under this folder")
    return photos


# --- pure geometry ------------------------------------------------------------------------------------
def _nose_line() -> list[int]:
    """The nose's midline points: the bridge's top, the tip, the base."""
    return [IBUG68.named[k] for k in ("nose_bridge_top", "nose_tip", "nose_base")]


def mirror_vertices(model: MorphableModel, tolerance_mm: float = 3.0) -> np.ndarray:
    """(n,) index of each vertex's mirror partner across the face's midline, or -1 (none within
    ``tolerance_mm``). The midline is the x of the nose landmarks of the mean shape."""
    v = model.shape()
    mid = float(np.mean(model.landmarks_of(IBUG68).locate(v)[IBUG68.group("nose"), 0]))
    reflected = v * np.array([-1.0, 1.0, 1.0]) + np.array([2.0 * mid, 0.0, 0.0])
    dist, idx = cKDTree(v).query(reflected)
    return np.where(dist <= tolerance_mm, idx, -1).astype(np.int64)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def delight(colour: np.ndarray, normals: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Divide out the photo's low-frequency shading: luminance ~ a + b . n (weighted least squares
    on the well-seen vertices, then once more without the worst-fitting 10 %: eyes, brows and
    lips are not shading). Returns the per-vertex shading factor (n,), mean 1 over those vertices."""
    y = colour @ np.array([0.2126, 0.7152, 0.0722])
    use = weight > 0.5
    design = np.c_[np.ones(len(normals)), normals]
    keep = use.copy()
    coef = np.zeros(4)
    for _ in range(2):
        if keep.sum() < 8:
            return np.ones(len(colour))
        coef, *_ = np.linalg.lstsq(design[keep], y[keep], rcond=None)
        resid = np.abs(design @ coef - y)
        keep = use & (resid <= np.quantile(resid[use], 0.9))
    shading = design @ coef
    level = float(np.mean(shading[use]))
    if not np.isfinite(level) or level <= 1e-6:
        return np.ones(len(colour))
    return np.clip(shading / level, 0.35, 2.0)


def sample_bilinear(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(n, C) float32 bilinear samples of ``image`` at pixel positions (n, 2) (x, y; edges replicated)."""
    n = len(points)
    cols = 1024  # cv2.remap wants maps under 32767 on a side: lay the points out as rows of 1024
    rows = -(-n // cols)
    maps = np.zeros((rows * cols, 2), np.float32)
    maps[:n] = points
    maps = maps.reshape(rows, cols, 2)
    out = cv2.remap(image, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * cols, -1)[:n].astype(np.float32)


def inside_face(points: np.ndarray, landmarks_2d: np.ndarray) -> np.ndarray:
    """(n,) float in [0, 1]: how far inside the photographed face each point is. The face is the
    jaw line (0-16) closed over the forehead (the brows raised by half the brow-to-chin height);
    the fitted mesh reaches beyond the face (neck, collar, background at the cheeks' edge), whose
    pixels must not become skin. Soft over the outer 8 % towards the nose."""
    import matplotlib.path as mpath

    lm = np.asarray(landmarks_2d, np.float64)
    brow_ids = IBUG68.group("brows")
    lift = 0.5 * (lm[IBUG68.named["chin"], 1] - lm[brow_ids, 1].min())
    brows = lm[brow_ids[::-1]] - np.array([0.0, lift])  # jaw end to jaw end, then back over the brows
    outline = np.vstack([lm[IBUG68.group("jaw")], brows])
    centre = lm[_nose_line()].mean(axis=0)
    out = np.zeros(len(points))
    # nested outlines shrunk towards the nose: a point inside more of them is deeper in the face
    for k in np.linspace(1.0, 0.92, 5):
        ring = centre + (outline - centre) * k
        out += mpath.Path(ring).contains_points(np.asarray(points, np.float64))
    return out / 5.0


def landmark_warp(fitted: np.ndarray, detected: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(n, 2) px displacements at ``points``: the smoothed thin-plate spline through the inner
    landmarks' residuals (detected - fitted, all but the jaw), each bounded by the largest of them."""
    from scipy.interpolate import RBFInterpolator

    src = np.asarray(fitted, np.float64)[IBUG68.inner]
    d = np.asarray(detected, np.float64)[IBUG68.inner] - src
    ok = np.all(np.isfinite(d), axis=1)
    if ok.sum() < 10:
        return np.zeros((len(points), 2))
    scale = float(np.ptp(src[ok], axis=0).max()) or 1.0
    spline = RBFInterpolator(src[ok] / scale, d[ok], kernel="thin_plate_spline", smoothing=1e-3)
    out = spline(np.asarray(points, np.float64) / scale)
    cap = float(np.linalg.norm(d[ok], axis=1).max())
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > cap, out * cap / np.maximum(norm, 1e-12), out)


def extract_texture(
    model: MorphableModel,
    triangles: np.ndarray,
    photo: np.ndarray,
    vertices: np.ndarray,
    camera: Camera,
    mirror: np.ndarray,
    detected: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(albedo (n, 3) linear RGB, coverage (n,), skin (3,), face mask (H, W) bool) of a fitted
    face in ``photo``.

    ``vertices`` (n, 3) mm and ``camera`` are the photo's fit. A vertex takes its pixel's colour
    where the fitted surface is the nearest one there and faces the camera (the weight falls off
    towards grazing angles); otherwise its mirror partner's, otherwise the median skin colour.

    ``detected`` (68, 2): the landmark detector's points on the photo. The fit leaves residuals
    between its landmark vertices and the photo's features; uncorrected they would stay in the
    texture as a fixed offset of every face rendered with it (an error no number of images of a
    subject averages away). Sampling positions are moved by the thin-plate spline that takes the
    fitted inner landmarks (17-67) onto the detected ones, and the face outline is the detected jaw."""
    h, w = photo.shape[:2]
    cam = camera.to_camera(vertices)
    uv = camera.project(vertices)
    screen = np.c_[uv, cam[:, 2]]
    frags = rasterize(screen, triangles, h, w, cull_backfaces=False)
    drawn = np.zeros(len(vertices), bool)
    drawn[np.unique(np.asarray(triangles))] = True
    visible = landmark_visibility(screen, frags.depth_buffer(), tolerance=2.0) & drawn
    normals = vertex_normals(vertices, triangles, weighting="area") @ np.asarray(camera.rotation).T
    # outward normals point towards the camera (+z) on the seen side
    facing = _smoothstep(0.25, 0.6, normals[:, 2])
    fitted = model.landmarks_of(IBUG68).locate(uv)
    at = uv if detected is None else uv + landmark_warp(fitted, detected, uv)
    outline = fitted if detected is None else np.asarray(detected, np.float64)
    own = (visible * facing * inside_face(at, outline)).astype(np.float64)
    linear = (sample_bilinear(photo, at).astype(np.float64) / 255.0) ** 2.2
    linear = linear / delight(linear, normals, own)[:, None]
    seen = own > 0.5
    if seen.sum() < 50:
        raise TextureError(f"the fitted face covers only {int(seen.sum())} visible vertices")
    skin = np.median(linear[seen], axis=0)
    partner = np.where(mirror >= 0, mirror, np.arange(len(mirror)))
    mirrored_w = np.where(mirror >= 0, own[partner], 0.0)
    fallback = mirrored_w[:, None] * linear[partner] + (1.0 - mirrored_w[:, None]) * skin[None, :]
    albedo = own[:, None] * linear + (1.0 - own[:, None]) * fallback
    albedo = np.clip(albedo, 0.0, 1.0).astype(np.float32)
    return albedo, own.astype(np.float32), skin.astype(np.float32), frags.mask()


def head_mask(landmarks_2d: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: where a head (hair, ears, neck) surrounds a face with these 68
    points — an ellipse over the skull and a column under the chin, with soft edges."""
    lm = np.asarray(landmarks_2d, np.float64)
    half_w = 0.5 * np.linalg.norm(lm[IBUG68.named["left_jaw_top"]] - lm[IBUG68.named["right_jaw_top"]])
    brow = lm[IBUG68.group("brows"), 1].min()
    chin = lm[IBUG68.named["chin"], 1]
    face_h = max(chin - brow, 1.0)
    cx = float(np.mean(lm[_nose_line(), 0]))
    mask = np.zeros((height, width), np.float32)
    centre = (round(cx), round(brow + 0.15 * face_h))
    axes = (max(1, round(1.3 * half_w)), max(1, round(1.05 * face_h)))
    cv2.ellipse(mask, centre, axes, 0.0, 0.0, 360.0, 1.0, thickness=-1)
    neck = np.array(
        [[cx - 0.75 * half_w, chin - 0.4 * face_h], [cx + 0.75 * half_w, chin - 0.4 * face_h]]
        + [[cx + 1.1 * half_w, height + face_h], [cx - 1.1 * half_w, height + face_h]]
    )
    cv2.fillPoly(mask, [np.round(neck).astype(np.int32)], 1.0)
    k = 2 * max(1, round(0.12 * half_w)) + 1
    return cv2.GaussianBlur(mask, (k, k), 0)


def skull_centre(landmarks_3d: np.ndarray) -> np.ndarray:
    """(3,) mm: a point near the skull's centre, behind the eyes at brow height (the head
    proxy's centre). Under yaw a head turns about it, not about the face in front."""
    lm = np.asarray(landmarks_3d, np.float64)
    brows, eyes = IBUG68.group("brows"), IBUG68.group("eyes")
    bridge = IBUG68.named["nose_bridge_top"]
    return np.array([lm[bridge, 0], lm[brows, 1].max() - 15.0, lm[eyes, 2].mean() - 85.0])


def up_angle(rotation: np.ndarray) -> float:
    """Radians: the image direction (x right, y down) of the model's up axis under ``rotation``."""
    r = np.asarray(rotation, np.float64)
    return float(np.arctan2(-r[1, 1], r[0, 1]))


def head_transform(texture: FaceTexture, camera: Camera, landmarks_3d: np.ndarray) -> np.ndarray:
    """2x3 similarity taking the texture's photo onto a render with ``camera`` of a face with
    these landmark vertices: the skull centres coincide, the scale is the cameras' ratio and the
    in-plane turn their roll difference."""
    centre = camera.project(skull_centre(landmarks_3d)[None, :])[0]
    k = camera.scale / texture.head_scale
    a = up_angle(camera.rotation) - texture.head_up
    m = k * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.c_[m, centre - m @ texture.head_centre]


def head_fill(
    texture: FaceTexture, camera: Camera, landmarks_3d: np.ndarray, background: np.ndarray
) -> np.ndarray:
    """``background`` (H, W, 3 uint8) with the texture's head (its photo without the face: hair,
    ears, neck) moved onto a face rendered with ``camera``, inside a soft head-and-neck mask."""
    h, w = background.shape[:2]
    m = head_transform(texture, camera, landmarks_3d)
    warped = cv2.warpAffine(texture.plate, m, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    alpha = head_mask(camera.project(landmarks_3d), h, w)[..., None]
    out = alpha * warped.astype(np.float32) + (1.0 - alpha) * background.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def head_plate(photo: np.ndarray, face_mask: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """The photo with the fitted face region filled from its surroundings and the skin colour, so
    a new face rendered over it shows no second face where the two outlines differ."""
    hole = cv2.dilate(face_mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    h, w = photo.shape[:2]
    k = min(1.0, 160.0 / max(h, w))  # inpaint a small copy: the fill is smooth anyway
    size = (max(1, round(w * k)), max(1, round(h * k)))
    small = cv2.resize(photo, size, interpolation=cv2.INTER_AREA)
    small_hole = cv2.resize(hole, size, interpolation=cv2.INTER_NEAREST)
    filled = cv2.inpaint(small, small_hole, 5, cv2.INPAINT_TELEA)
    skin8 = np.round(255.0 * np.clip(skin, 0.0, 1.0) ** (1 / 2.2)).astype(np.float32)
    # towards the hole's middle the inpainting is a guess: lean it towards the skin colour
    dist = cv2.distanceTransform(small_hole, cv2.DIST_L2, 3)
    lean = np.clip(dist / max(float(dist.max()), 1e-6), 0.0, 1.0)[..., None] * 0.6
    filled = (1.0 - lean) * filled.astype(np.float32) + lean * skin8[None, None, :]
    big = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)
    soft = cv2.GaussianBlur(hole.astype(np.float32), (0, 0), max(1.0, 0.004 * max(h, w)))[..., None]
    out = soft * big + (1.0 - soft) * photo.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --- fitting the photos (I/O) --------------------------------------------------------------------------
def _cache_key(
    photos: list[Path], names: list[str], model: MorphableModel, manifest: Any, landmarks: str
) -> str:
    parts = {
        "format": TEXTURE_FORMAT,
        "photos": [hashlib.sha256(p.read_bytes()).hexdigest() for p in photos],
        "names": names,
        "model": model.sha256,
        "landmarks": landmarks,
        "stages": {s: manifest.stage_params(s) for s in ("detect", "landmarks", "fit")},
        "error_model": manifest.get(f"models.landmark_error.{landmarks}"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


_ARRAYS = ("albedo", "coverage", "skin", "head_centre", "head_scale", "head_up")


def _save(path: Path, textures: list[FaceTexture], failures: dict[str, str]) -> None:
    from pipeline.storage.atomic import atomic_write

    arrays = {
        f"{k:04d}_{key}": np.asarray(getattr(t, key)) for k, t in enumerate(textures) for key in _ARRAYS
    }
    arrays |= {f"{k:04d}_plate": t.plate for k, t in enumerate(textures)}
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        names=np.array([t.name for t in textures], dtype=str),
        failures=np.array([json.dumps(failures, sort_keys=True)], dtype=str),
        **arrays,
    )
    atomic_write(path, buf.getvalue())


def _load(path: Path) -> tuple[list[FaceTexture], dict[str, str]]:
    with np.load(path, allow_pickle=False) as z:
        out = []
        for k, name in enumerate(z["names"]):
            a = {key: z[f"{k:04d}_{key}"] for key in (*_ARRAYS, "plate")}
            out.append(
                FaceTexture(
                    name=str(name),
                    albedo=a["albedo"].astype(np.float32),
                    coverage=a["coverage"].astype(np.float32),
                    skin=a["skin"].astype(np.float32),
                    plate=a["plate"].astype(np.uint8),
                    head_centre=a["head_centre"].astype(np.float64),
                    head_scale=float(a["head_scale"]),
                    head_up=float(a["head_up"]),
                )
            )
        failures = json.loads(str(z["failures"][0]))
    return out, failures


def read_photo(path: Path) -> np.ndarray:
    from pipeline.imaging.decode import decode_image

    res = decode_image(path.read_bytes())
    if res.image is None:
        raise TextureError(f"{path}: cannot decode ({res.reason}: {res.detail})")
    return res.image


def _names(photos: list[Path], source: str | Path) -> list[str]:
    if str(source) == "builtin":
        return [p.name for p in photos]
    root = Path(source).expanduser()
    return [p.relative_to(root).as_posix() for p in photos]


def load_textures(
    source: str | Path,
    model: MorphableModel,
    manifest: Any,
    triangles: np.ndarray,
    landmarks: str = "dlib",
    cache_dir: str | Path | None = None,
) -> tuple[list[FaceTexture], dict[str, str]]:
    """(textures, failures by photo name) of every photo of ``source`` (``builtin`` or a folder).

    A photo whose face is not found, landmarked or fitted is left out with its reason (the
    stages' failure reasons); none usable raises :class:`TextureError`."""
    photos = find_photos(source)
    names = _names(photos, source)
    cache = Path(cache_dir).expanduser() if cache_dir else None
    key = _cache_key(photos, names, model, manifest, landmarks)
    cached = cache / "textures" / f"{key}.npz" if cache else None
    if cached is not None and cached.is_file():
        try:
            return _load(cached)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("%s: unreadable texture cache (%s); fitting the photos again", cached, exc)
    try:
        textures, failures = _fit_photos(names, photos, model, manifest, triangles, landmarks)
    except (ImportError, FileNotFoundError) as exc:  # the landmark backend is not installed
        raise TextureError(
            f"textures {source}: fitting the photos needs the {landmarks} landmark backend ({exc}); "
            "install it (pip install 'morphset[dlib]') or render with --textures painted"
        ) from exc
    if not textures:
        detail = "; ".join(f"{n}: {r}" for n, r in sorted(failures.items())[:5])
        raise TextureError(f"{source}: no photo gave a usable face texture ({detail})")
    if cached is not None:
        _save(cached, textures, failures)
    return textures, failures


def _fit_photos(
    names: list[str],
    photos: list[Path],
    model: MorphableModel,
    manifest: Any,
    triangles: np.ndarray,
    landmarks: str,
) -> tuple[list[FaceTexture], dict[str, str]]:
    """Detect, landmark and fit every photo alone in a throw-away run; extract the textures."""
    from pipeline.core.inprocess import build_in_process
    from pipeline.core.tables import RunTables
    from pipeline.storage.atomic import atomic_write

    mirror = mirror_vertices(model)
    textures: list[FaceTexture] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="morphset-textures-") as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        # one flat folder (any source layout); every photo is its own subject
        flat = [f"{k:05d}{p.suffix.lower()}" for k, p in enumerate(photos)]
        for f, p in zip(flat, photos, strict=True):
            shutil.copyfile(p, root / f)
        list_file = Path(tmp) / "photos.csv"
        atomic_write(list_file, "".join(f"{f},{f}\n" for f in flat).encode())
        run, _ = build_in_process(
            Path(tmp) / "run",
            manifest,
            "texture-photos",
            {
                "description": "photos a synthetic set takes its face textures from",
                "root": str(root),
                "layout": "list-file",
                "list_file": str(list_file),
            },
            until="fit",
            overrides={
                "stages.landmarks.backend": landmarks,
                "stages.embed.enabled": False,
                "stages.fit.identity": "image",
            },
        )
        tables = RunTables(run)
        fits = tables.table("fits")
        points = {
            r["image_id"]: np.asarray(r["landmarks"], np.float64).reshape(IBUG68.points, 2)
            for r in tables.table("landmarks", columns=["image_id", "landmarks"]).to_pylist()
            if r["landmarks"] is not None
        }
        back = dict(zip(flat, names, strict=True))
        for r in fits.to_pylist():
            name = back[r["image_id"]]
            if r["failure_reason"] is not None or r["alpha_id"] is None:
                failures[name] = r["failure_reason"] or "not fitted"
                continue
            try:
                textures.append(
                    _texture_from_fit(
                        name, root / r["image_id"], r, points[r["image_id"]], model, triangles, mirror
                    )
                )
            except TextureError as exc:
                failures[name] = f"texture: {exc}"
    textures.sort(key=lambda t: t.name)
    return textures, failures


def _texture_from_fit(
    name: str,
    path: Path,
    fit: dict,
    detected: np.ndarray,
    model: MorphableModel,
    triangles: np.ndarray,
    mirror: np.ndarray,
) -> FaceTexture:
    photo = read_photo(path)
    vertices = model.shape(np.asarray(fit["alpha_id"]), np.asarray(fit["alpha_exp"]))
    rotation = np.asarray(fit["rotation"], np.float64).reshape(3, 3)
    camera = Camera(rotation, float(fit["scale"]), np.asarray(fit["translation"], np.float64))
    lm3d = model.landmarks_of(IBUG68).locate(vertices)
    face_h = float(np.ptp(camera.project(lm3d)[:, 1]))
    k = min(1.0, MAX_FACE_PX / max(face_h, 1.0))
    if k < 1.0:  # work on a smaller copy: texture detail beyond a 250-px render is wasted
        size = (max(1, round(photo.shape[1] * k)), max(1, round(photo.shape[0] * k)))
        photo = cv2.resize(photo, size, interpolation=cv2.INTER_AREA)
        # pixel centres at integers: x' = (x + 0.5) k - 0.5
        camera = Camera(rotation, camera.scale * k, (camera.translation + 0.5) * k - 0.5)
        detected = (detected + 0.5) * k - 0.5
    albedo, coverage, skin, face = extract_texture(
        model, triangles, photo, vertices, camera, mirror, detected
    )
    return FaceTexture(
        name=name,
        albedo=albedo,
        coverage=coverage,
        skin=skin,
        plate=head_plate(photo, face, skin),
        head_centre=camera.project(skull_centre(lm3d)[None, :])[0],
        head_scale=camera.scale,
        head_up=up_angle(rotation),
    )
