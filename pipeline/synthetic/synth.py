"""``morphset synth``: faces rendered from the morphable model, with their true shape and pose.

Per subject ``s`` (folder ``s0000`` ...): alpha_id ~ N(0, (identity_scale * id_std)^2) and an
appearance (skin, brow, lip, iris colours; hair colour and head size of the hair/neck proxy). Per image ``i`` (``000.jpg`` ...): alpha_exp ~
N(0, (expression_scale * exp_std)^2), yaw uniform in ``yaw_range``, small pitch and roll, two
point lights, a background, and a CASIA-WebFace-like framing. Every draw comes from a NumPy
Generator seeded by ``(seed, s)`` or ``(seed, s, i)``, so output does not depend on the order or
the number of worker processes, and the same seed gives byte-identical files.

Output: ``DIR/<subject>/<nnn>.jpg`` and ``DIR/ground_truth.parquet`` (``schemas/ground_truth.yaml``),
optionally ``DIR/preview.png`` (a contact sheet).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipeline.config.manifest import Manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core.processes import refuse_unguarded_main
from pipeline.core.progress import ProgressLog
from pipeline.core.threads import limit_threads
from pipeline.core.workercache import get_or_create
from pipeline.fit.camera import rotation_from_euler_deg
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.assets import resolve_morphable_model
from pipeline.models.morphable_model import MorphableModel
from pipeline.storage.atomic import atomic_write
from pipeline.storage.run import require_local
from pipeline.synthetic.effects import (
    Effects,
    blur,
    recolour_lights,
    sample_image_effects,
    skin_gain,
    white_balance,
)
from pipeline.synthetic.render import (
    Appearance,
    Camera,
    HeadStyle,
    Lighting,
    RenderResult,
    face_regions,
    head_proxy,
    luminance,
    paint_albedo,
    render_face,
    sample_appearance,
    sample_background,
    sample_head_style,
    sample_lighting,
    trim_face_triangles,
)
from pipeline.synthetic.texture import FaceTexture, head_fill, load_textures

GROUND_TRUTH_FILE = "ground_truth.parquet"
PREVIEW_FILE = "preview.png"


@dataclass(frozen=True)
class SynthParams:
    subjects: int
    images_per_subject: int
    seed: int
    yaw_range: tuple[float, float]
    pitch_std: float
    roll_std: float
    expression_scale: float
    identity_scale: float
    size: int
    face_fraction: tuple[float, float]
    supersample: int
    textures: str = "painted"
    texture_landmarks: str = "dlib"
    effects: Effects = Effects()

    @classmethod
    def from_stage(cls, params: dict) -> SynthParams:
        """From ``stages.synth`` (defaults filled); checks what the JSON schema cannot."""
        lo, hi = (float(x) for x in params["yaw_range"])
        if lo > hi:
            raise ValueError(f"stages.synth.yaw_range: expected [min, max] with min <= max, got {[lo, hi]}")
        f0, f1 = (float(x) for x in params["face_fraction"])
        if f0 > f1:
            raise ValueError(
                f"stages.synth.face_fraction: expected [min, max] with min <= max, got {[f0, f1]}"
            )
        return cls(
            subjects=int(params["subjects"]),
            images_per_subject=int(params["images_per_subject"]),
            seed=int(params["seed"]),
            yaw_range=(lo, hi),
            pitch_std=float(params["pitch_std"]),
            roll_std=float(params["roll_std"]),
            expression_scale=float(params["expression_scale"]),
            identity_scale=float(params["identity_scale"]),
            size=int(params["size"]),
            face_fraction=(f0, f1),
            supersample=int(params["supersample"]),
            textures=str(params.get("textures") or "painted"),
            texture_landmarks=str(params.get("texture_landmarks") or "dlib"),
            effects=Effects.from_stage(params),
        )


def subject_name(s: int) -> str:
    return f"s{s:04d}"


def image_name(i: int) -> str:
    return f"{i:03d}.jpg"


# --- sampling (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectDraw:
    alpha_id: np.ndarray  # (k_id,) float32
    appearance: Appearance
    style: HeadStyle
    texture: int | None  # index into the texture list, or None (painted)
    brightness: float  # the texture's albedo gain for this subject


def sample_subject(model: MorphableModel, p: SynthParams, s: int, n_textures: int = 0) -> SubjectDraw:
    rng = np.random.default_rng([p.seed, s])
    alpha_id = rng.standard_normal(model.k_id) * model.id_std.astype(np.float64) * p.identity_scale
    appearance = sample_appearance(rng)
    style = sample_head_style(rng, appearance.skin)
    # drawn after the painted subject's values, so painted output is the same with or without
    texture = int(rng.integers(n_textures)) if n_textures else None
    brightness = float(rng.uniform(0.85, 1.15)) if n_textures else 1.0
    return SubjectDraw(alpha_id.astype(np.float32), appearance, style, texture, brightness)


def frame_camera(
    landmarks_3d: np.ndarray,
    rotation: np.ndarray,
    size: int,
    fraction: float,
    jitter: np.ndarray,
    distance_mm: float | None = None,
) -> Camera:
    """Scale so the landmarks' brow-to-chin height (of the unrotated shape) fills ``fraction`` of
    the image, and centre the projected landmark box (plus ``jitter`` px) in the image. Scaling
    from the unrotated shape keeps the face size independent of the pose, as in photo crops.
    ``distance_mm``: a perspective camera that far from the model origin (None: orthographic)."""
    # the unrotated landmarks' projected height at magnification 1 (a near perspective camera
    # magnifies the face, which lies in front of the model origin, by more than 1)
    height = float(np.ptp(Camera(np.eye(3), 1.0, np.zeros(2), distance_mm).project(landmarks_3d)[:, 1]))
    f = size * fraction / height
    uv = Camera(rotation, f, np.zeros(2), distance_mm).project(landmarks_3d)
    centre = 0.5 * (uv.min(axis=0) + uv.max(axis=0))
    # the forehead is above the landmarks: move the landmark box a little below the centre
    target = np.array([(size - 1) / 2.0, (size - 1) / 2.0 + 0.04 * size]) + jitter
    return Camera(rotation, f, target - centre, distance_mm)


def render_sample(
    model: MorphableModel,
    regions: dict[str, np.ndarray],
    p: SynthParams,
    s: int,
    i: int,
    model_sha256: str | None = None,
    textures: list[FaceTexture] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """(JPEG bytes, ground-truth row) of image ``i`` of subject ``s``. ``model_sha256``: the
    model's hash if already known (hashing the model costs more than a render). ``textures``:
    face textures from photos (:mod:`pipeline.synthetic.texture`); None or empty = painted."""
    draw = sample_subject(model, p, s, len(textures or ()))
    alpha_id, appearance = draw.alpha_id, draw.appearance
    texture = textures[draw.texture] if textures and draw.texture is not None else None
    rng = np.random.default_rng([p.seed, s, i])
    alpha_exp = (rng.standard_normal(model.k_exp) * model.exp_std * p.expression_scale).astype(np.float32)
    yaw = float(rng.uniform(*p.yaw_range))
    pitch = float(np.clip(rng.normal(0.0, p.pitch_std), -2.5 * p.pitch_std, 2.5 * p.pitch_std))
    roll = float(np.clip(rng.normal(0.0, p.roll_std), -2.5 * p.roll_std, 2.5 * p.roll_std))
    # the stored float32 values are the truth: render from exactly those
    yaw, pitch, roll = (float(np.float32(a)) for a in (yaw, pitch, roll))
    rotation = rotation_from_euler_deg(yaw, pitch, roll).astype(np.float32).astype(np.float64)
    # float32 bases times float32 coefficients: ~10x faster than MorphableModel.shape's float64
    # copy of the bases, and exact to ~1e-4 mm
    flat = model.mean + model.id_basis @ alpha_id + model.exp_basis @ alpha_exp
    vertices = flat.astype(np.float64).reshape(-1, 3)
    lm3d = model.landmarks_of(IBUG68).locate(vertices)
    # the realism effects come from their own generator: on or off, the draws above stay put
    fx = sample_image_effects(p.effects, np.random.default_rng([p.seed, s, i, 1]), p.size, n_lights=2)
    distance = None if fx.distance_mm is None else float(np.float32(fx.distance_mm))
    camera = frame_camera(
        lm3d,
        rotation,
        p.size,
        float(rng.uniform(*p.face_fraction)),
        rng.normal(0.0, 0.015 * p.size, 2),
        distance,
    )
    camera = Camera(
        rotation, float(np.float32(camera.scale)), camera.translation.astype(np.float32), distance
    )
    lighting = sample_lighting(rng)
    if fx.light_kelvin is not None:
        lighting = recolour_lights(lighting, fx.light_kelvin)
    # a camera's auto-exposure brightens dark skin: aim the skin at a mid-tone
    skin = appearance.skin if texture is None else texture.skin * draw.brightness
    gain = float(np.clip(0.3 / luminance(skin), 1.0, 2.5))
    lighting = dataclasses.replace(lighting, exposure=lighting.exposure * gain)
    background = sample_background(rng, p.size, p.size)
    face_t = model_face_triangles(model)
    # tan, make-up, flush: this image's low-frequency change of the face's colour
    gain = skin_gain(model.mean.reshape(-1, 3), fx.skin_field) if p.effects.skin_change_std > 0 else None
    if texture is not None:
        out = _render_textured(model, vertices, face_t, camera, lighting, background, texture, draw, p, gain)
    else:
        out = _render_painted(model, regions, vertices, face_t, camera, lighting, background, draw, p, gain)
    image = blur(white_balance(out.image, fx.white_balance), fx.blur_sigma_px)
    # sensor noise so JPEG and detectors see camera-like texture, not flat CG colour
    noisy = image.astype(np.float32) + rng.normal(0.0, fx.noise_std, image.shape).astype(np.float32)
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, fx.jpeg_quality]
    )
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {subject_name(s)}/{image_name(i)}")
    row = {
        "image_id": f"{subject_name(s)}/{image_name(i)}",
        "subject": subject_name(s),
        "alpha_id": alpha_id.tolist(),
        "alpha_exp": alpha_exp.tolist(),
        "yaw": yaw,
        "pitch": pitch,
        "roll": roll,
        "rotation": rotation.reshape(-1).tolist(),
        "scale": camera.scale,
        "translation": camera.translation.astype(np.float64).tolist(),
        "camera_distance_mm": distance,
        "landmarks_2d": out.landmarks_2d.reshape(-1).tolist(),
        "landmarks_2d_ibug": ibug_landmarks(model, vertices, camera, out.landmarks_2d).reshape(-1).tolist(),
        "visible": out.visible.tolist(),
        "landmarks_3d": lm3d.reshape(-1).tolist(),
        "width": p.size,
        "height": p.size,
        "model_name": model.name,
        "model_sha256": model_sha256 or model.sha256,
        "texture": None if texture is None else texture.name,
    }
    return jpeg.tobytes(), row


def _render_painted(
    model: MorphableModel,
    regions: dict[str, np.ndarray],
    vertices: np.ndarray,
    face_t: np.ndarray,
    camera: Camera,
    lighting: Lighting,
    background: np.ndarray,
    draw: SubjectDraw,
    p: SynthParams,
    gain: np.ndarray | None = None,
) -> RenderResult:
    """Painted albedo on the face (times ``gain`` (n, 3) where given), a hair cap and a neck."""
    # face vertices first, so the model's landmark indices stay valid in the combined mesh
    head_v, head_t, head_a = head_proxy(
        vertices, model.landmarks_of(IBUG68), draw.style, draw.appearance.skin
    )
    # hair (the darker-than-skin part of the proxy) is matte; the neck is skin
    head_gloss = np.where(np.all(head_a == draw.style.hair, axis=1), 0.3, 1.0)
    return render_face(
        np.vstack([vertices, head_v]),
        np.vstack([face_t, head_t + len(vertices)]),
        np.vstack([paint_albedo(regions, draw.appearance) * (1.0 if gain is None else gain), head_a]),
        model.landmarks_of(IBUG68),
        camera,
        lighting,
        background,
        supersample=p.supersample,
        closed_from=len(face_t),
        gloss=np.r_[np.ones(len(vertices)), head_gloss],
        cast_shadows=p.effects.cast_shadows,
    )


def _render_textured(
    model: MorphableModel,
    vertices: np.ndarray,
    face_t: np.ndarray,
    camera: Camera,
    lighting: Lighting,
    background: np.ndarray,
    texture: FaceTexture,
    draw: SubjectDraw,
    p: SynthParams,
    gain: np.ndarray | None = None,
) -> RenderResult:
    """A photo's texture (times ``gain`` (n, 3) where given) on the face, over that photo's head moved with the face; the face's
    outline fades into the head over a pixel or two, like a photographed edge."""
    plate = head_fill(texture, camera, model.landmarks_of(IBUG68).locate(vertices), background)
    out = render_face(
        vertices,
        face_t,
        np.clip(texture.albedo * draw.brightness * (1.0 if gain is None else gain), 0.0, 1.0),
        model.landmarks_of(IBUG68),
        camera,
        lighting,
        plate,
        supersample=p.supersample,
        cast_shadows=p.effects.cast_shadows,
    )
    soft = cv2.GaussianBlur(out.mask.astype(np.float32), (0, 0), max(0.6, 0.004 * p.size))
    alpha = np.minimum(soft, out.mask.astype(np.float32))[..., None]
    image = alpha * out.image.astype(np.float32) + (1.0 - alpha) * plate.astype(np.float32)
    return dataclasses.replace(out, image=np.clip(np.round(image), 0, 255).astype(np.uint8))


_CONTOUR_CANDIDATES: dict[int, Any] = {}


def ibug_landmarks(
    model: MorphableModel, vertices: np.ndarray, camera: Camera, fixed: np.ndarray
) -> np.ndarray:
    """(68, 2) px, iBUG convention: the jaw points (0-6, 10-16) on the rendered face's outline —
    of each jaw landmark's horizontal band of candidate vertices (:mod:`pipeline.fit.contour`, all
    of them), the one outermost in the image — and every other point at its landmark vertex
    (``fixed``, the projections of ``landmarks_2d``)."""
    from pipeline.fit.contour import build_candidates

    cand = _CONTOUR_CANDIDATES.get(id(model))
    if cand is None:
        cand = _CONTOUR_CANDIDATES[id(model)] = (model, build_candidates(model, max_candidates=None))
    cand = cand[1]
    uv = camera.project(vertices[cand.vertices.reshape(-1)]).reshape(*cand.vertices.shape, 2)
    pick = np.argmax(cand.side[:, None] * uv[..., 0], axis=1)
    out = np.array(fixed, dtype=np.float64, copy=True)
    out[cand.landmark_ids] = uv[np.arange(len(pick)), pick]
    return out


# --- I/O and orchestration -----------------------------------------------------------------------
def model_face_triangles(model: MorphableModel) -> np.ndarray:
    """The face triangles drawn (ears and neck rim left to the head proxy), once per process."""
    return get_or_create(
        ("face_triangles", model.sha256),
        lambda: trim_face_triangles(model.shape(), model.triangles, model.landmarks_of(IBUG68)),
    )


def model_regions(model: MorphableModel) -> dict[str, np.ndarray]:
    """Region weights of the model's mean shape, computed once per process and model."""
    return get_or_create(
        ("face_regions", model.sha256),
        lambda: face_regions(model.shape(), model.landmarks_of(IBUG68), model.triangles),
    )


def _render_subject(
    model: MorphableModel, p: SynthParams, s: int, out_dir: Path, textures: list[FaceTexture] | None = None
) -> list[dict]:
    regions = model_regions(model)
    sha = model.sha256
    rows = []
    for i in range(p.images_per_subject):
        jpeg, row = render_sample(model, regions, p, s, i, sha, textures)
        atomic_write(out_dir / row["image_id"], jpeg)
        rows.append(row)
    return rows


_WORKER: dict[str, Any] = {}


def _worker_init(manifest: Manifest, textures: list[FaceTexture] | None) -> None:
    # the pool is the parallelism: one thread per worker (torch's renderer would otherwise start a
    # pool per process and the workers contend: the demo's synth ran at 1.4 images/s without this, 3.1 with)
    limit_threads(1)
    _WORKER["model"] = resolve_morphable_model(manifest)
    _WORKER["textures"] = textures


def _worker_subject(p: SynthParams, s: int, out_dir: str) -> list[dict]:
    return _render_subject(_WORKER["model"], p, s, Path(out_dir), _WORKER["textures"])


def contact_sheet(images: list[np.ndarray], columns: int = 8, thumb: int = 125) -> np.ndarray:
    """RGB uint8 grid of thumbnails (row-major)."""
    if not images:
        raise ValueError("contact sheet needs at least one image")
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    sheet = np.full((rows * thumb, cols * thumb, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        sheet[r * thumb : (r + 1) * thumb, c * thumb : (c + 1) * thumb] = cv2.resize(
            im, (thumb, thumb), interpolation=cv2.INTER_AREA
        )
    return sheet


def write_preview(out_dir: Path, image_ids: list[str], limit: int = 32) -> Path:
    images = []
    for rel in image_ids[:limit]:
        bgr = cv2.imread(str(out_dir / rel), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"{out_dir / rel}: cannot read rendered image for the preview")
        images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    ok, png = cv2.imencode(".png", cv2.cvtColor(contact_sheet(images), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding of the preview failed")
    path = out_dir / PREVIEW_FILE
    atomic_write(path, png.tobytes())
    return path


_SUBJECT_RE = re.compile(r"^s\d{4,}$")
_IMAGE_RE = re.compile(r"^\d{3,}\.jpg$")


def prepare_output(out: Path, p: SynthParams) -> None:
    """Make ``out`` ready: an empty or missing directory, or an earlier synth output, whose
    images that this run will not rewrite are removed (so the folder tree and ground_truth.parquet
    always agree). Any other non-empty directory is refused: nothing of the user's is deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: synth output must be a directory")
    entries = list(out.iterdir())
    if not entries:
        return
    if not (out / GROUND_TRUTH_FILE).is_file():
        raise ValueError(
            f"{out}: directory is not empty and holds no {GROUND_TRUTH_FILE} (not a synth output); "
            "choose a new or empty --out"
        )
    keep_subjects = {subject_name(s) for s in range(p.subjects)}
    keep_images = {image_name(i) for i in range(p.images_per_subject)}
    for d in entries:
        if d.is_dir() and _SUBJECT_RE.match(d.name):
            stale = [f for f in d.iterdir() if _IMAGE_RE.match(f.name)]
            if d.name in keep_subjects:
                stale = [f for f in stale if f.name not in keep_images]
            for f in stale:
                f.unlink()
            if not any(d.iterdir()):
                d.rmdir()


def synthesize(
    manifest: Manifest,
    out_dir: str | Path | None = None,
    subjects: int | None = None,
    images_per_subject: int | None = None,
    seed: int | None = None,
    workers: int | None = None,
    preview: bool | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Render a synthetic dataset; returns a summary dict (out, images, subjects, seconds, ...).

    Arguments left as None take ``stages.synth`` of the manifest; ``params`` override other keys
    of that block (``yaw_range=(-30, 30)``, ``size=250`` ...).
    """
    stage = manifest.stage_params("synth")
    for key, value in (
        ("subjects", subjects),
        ("images_per_subject", images_per_subject),
        ("seed", seed),
        ("workers", workers),
        ("preview", preview),
        *params.items(),
    ):
        if key not in stage:
            raise ValueError(f"synthesize: unknown parameter {key!r} (stages.synth has {sorted(stage)})")
        if value is not None:
            stage[key] = value
    p = SynthParams.from_stage(stage)
    out = Path(
        require_local(
            out_dir or stage["out"] or manifest.dataset("synthetic")["root"], "morphset synth output"
        )
    ).expanduser()
    prepare_output(out, p)
    t0 = time.perf_counter()
    model = resolve_morphable_model(manifest)
    textures, texture_failures = None, {}
    if p.textures != "painted":
        textures, texture_failures = load_textures(
            p.textures,
            model,
            manifest,
            model_face_triangles(model),
            landmarks=p.texture_landmarks,
            cache_dir=manifest.cache_dir,
        )
    n_workers = min(int(stage["workers"] or os.cpu_count() or 1), p.subjects)
    # stderr not a terminal: a line every 10 s (and at the end) while subjects render
    lines = ProgressLog("synth", p.subjects, unit="subject", every_s=10.0)

    def rendered(rows: list[dict]) -> list[dict]:
        lines.update(images=len(rows))
        return rows

    if n_workers <= 1:
        per_subject = [rendered(_render_subject(model, p, s, out, textures)) for s in range(p.subjects)]
    else:
        # spawn: safe even when the caller has threads (Dask, TensorFlow); each worker loads the
        # cached model once
        refuse_unguarded_main("morphset synth (a process pool)")
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(
            n_workers, mp_context=ctx, initializer=_worker_init, initargs=(manifest, textures)
        ) as ex:
            per_subject = [
                rendered(rows)
                for rows in ex.map(
                    _worker_subject, [p] * p.subjects, range(p.subjects), [str(out)] * p.subjects
                )
            ]
    rows = [r for subject_rows in per_subject for r in subject_rows]
    schema = load_schema("ground_truth")
    table = from_rows(
        rows,
        schema,
        {
            "morphset.model.name": model.name,
            "morphset.model.sha256": model.sha256,
            "morphset.synth.seed": str(p.seed),
            "morphset.synth.params": json.dumps(
                {k: stage[k] for k in sorted(stage) if k not in ("out", "workers", "preview")}, sort_keys=True
            ),
        },
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write(out / GROUND_TRUTH_FILE, buf.getvalue())
    summary: dict[str, Any] = {
        "out": str(out),
        "subjects": p.subjects,
        "images": len(rows),
        "ground_truth": str(out / GROUND_TRUTH_FILE),
        "model": model.name,
        "model_sha256": model.sha256,
        "seed": p.seed,
        "workers": n_workers,
        "textures": p.textures,
    }
    if textures is not None:
        summary["texture_photos"] = [t.name for t in textures]
        summary["texture_failures"] = texture_failures
    if stage["preview"]:
        summary["preview"] = str(write_preview(out, [r["image_id"] for r in rows]))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
