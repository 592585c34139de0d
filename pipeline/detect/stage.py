"""Stage ``detect``: MTCNN on every usable index row.

Output rows follow the index rows one-to-one (schema ``schemas/detections.yaml``). Per-image
problems become a ``failure_reason`` (index reason carried forward, decode reasons from
:mod:`pipeline.imaging.decode`, ``no_face``, ``no_central_face``, ``detector_error``); nothing raises out
of :func:`run_shard` for a bad image.

Two backends give the same faces (``stages.detect.backend``): ``torch`` (the default,
:mod:`pipeline.detect.mtcnn_torch`, on the mtcnn 1.0.0 weights read by
:mod:`pipeline.detect.weights`; CPU or CUDA) and ``mtcnn-tf``, the ``mtcnn`` package itself on
TensorFlow (an extra; the reference). Both take lists of images and return the package's rows.

Why the detector is driven the way it is:
- lists are several times faster per image than single calls; lists are padded to the largest
  height/width, so :func:`plan_batches` groups images of similar size.
- the package's post-processing maps padded coordinates back with a per-position loop that
  misassigns offsets when an image in the list has no face; we pad at the bottom/right only
  (``batch_stack_justification="topleft"``: zero offsets) and clip boxes ourselves
  (``postprocess=False``); the torch backend pads the same way.
- MTCNN misses faces that fill the whole frame (tight crops); images without a face are tried
  once more inside a black border (``retry_pad``), which costs only for those images.
- ``min_face_size`` other than 20 makes mtcnn 1.0.0 find nothing, so that backend refuses other
  values; the torch backend builds its pyramid from any value. Small boxes are dropped afterwards
  (``min_face_px``).
- TensorFlow is imported lazily (seconds) and each detector is created once per process through
  :mod:`pipeline.core.workercache`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from pipeline.config.schemas import from_rows, load_schema
from pipeline.core import workercache
from pipeline.core.backends import lookup
from pipeline.core.stage import Asset, ConfigView, Stage, StageContext
from pipeline.detect.base import FaceDetector
from pipeline.imaging.decode import dataset_root, max_pixels_from

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 20  # no face of >= 20 px fits in a smaller image; MTCNN's pyramid is empty there
# Upper bound on padded pixels per MTCNN call: the float32 batch and its pyramid stay a few
# hundred MB, well inside a worker's memory limit, whatever batch_size says.
MAX_BATCH_PIXELS = 16_000_000


@dataclass(frozen=True)
class Faces:
    """Detections of one image in its own pixel coordinates."""

    boxes: np.ndarray  # (k, 4) float32 x0 y0 x1 y1
    scores: np.ndarray  # (k,) float32
    points: np.ndarray  # (k, 10) float32 x0 y0 ... x4 y4 (left eye, right eye, nose, mouth l, mouth r)

    @staticmethod
    def empty() -> Faces:
        return Faces(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 10), np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def subset(self, keep: np.ndarray) -> Faces:
        return Faces(self.boxes[keep], self.scores[keep], self.points[keep])


# name -> the module of a detector backend (pipeline/detect/base.py says what it provides)
BACKENDS = {
    "torch": "pipeline.detect.mtcnn_torch",
    "mtcnn-tf": "pipeline.detect.mtcnn_tf",
}


def backend_module(name: str) -> Any:
    """The module of the detector backend called ``name``; an unknown name lists the known ones."""
    return lookup("detect", BACKENDS, name)


def get_detector(params: dict | None = None, weights: Asset | None = None) -> FaceDetector:
    """The per-process detector for these parameters (created on first use, then reused by every
    task), on the driver's verified weights. Without ``params``, the default manifest's; without
    ``weights``, resolved here."""
    if params is None or weights is None:
        from pipeline.config.manifest import load_manifest

        config = DetectStage().own_view(load_manifest())
        params = {**config.stage_params("detect"), **(params or {})}
        if weights is None:
            weights = backend_module(params["backend"]).resolve_assets(config).get("weights")
    mod = backend_module(params["backend"])
    key = ("detector", params["backend"], None if weights is None else weights.sha256, *mod.cache_key(params))
    return workercache.get_or_create(key, lambda: mod.create(params, weights))


# --- pure helpers -----------------------------------------------------------------------------
def detection_scale(height: int, width: int, max_side: int | None) -> float:
    """Factor (<= 1) that brings the longer side down to ``max_side``."""
    if not max_side or max(height, width) <= max_side:
        return 1.0
    return float(max_side) / float(max(height, width))


def plan_batches(
    shapes: list[tuple[int, int]],
    batch_size: int,
    max_pad_ratio: float,
    max_batch_pixels: int = MAX_BATCH_PIXELS,
) -> list[list[int]]:
    """Group image indices into MTCNN calls.

    Images are visited in order of size; a batch is closed when it is full, when padding every
    member to the batch's largest height and width would exceed ``max_pad_ratio`` times the
    smallest member's pixels, or when the padded batch would exceed ``max_batch_pixels``.
    """
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] * shapes[i][1], shapes[i]))
    batches: list[list[int]] = []
    cur: list[int] = []
    hmax = wmax = 0
    amin = 0
    for i in order:
        h, w = shapes[i]
        nh, nw = max(hmax, h), max(wmax, w)
        na = min(amin, h * w) if cur else h * w
        fits = (
            cur
            and len(cur) < batch_size
            and nh * nw <= max_pad_ratio * na
            and nh * nw * (len(cur) + 1) <= max_batch_pixels
        )
        if cur and not fits:
            batches.append(cur)
            cur, nh, nw, na = [], h, w, h * w
        cur.append(i)
        hmax, wmax, amin = nh, nw, na
    if cur:
        batches.append(cur)
    return batches


def parse_mtcnn_output(
    rows: np.ndarray,
    n_images: int,
    shapes: list[tuple[int, int]],
    scales: list[float],
    offsets: list[int] | None = None,
) -> list[Faces]:
    """Split mtcnn's numpy output ``[image, x0, y0, x1, y1, score, lx0..lx4, ly0..ly4]`` per image.

    ``shapes`` are the (detection-size) images' heights and widths without any border; ``offsets``
    the border added on every side (0 without). Boxes are clipped to the image, the border is
    subtracted, and all coordinates are divided by the image's detection scale so that they are
    in full-resolution pixels.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 16) if np.size(rows) else np.zeros((0, 16))
    offsets = offsets or [0] * n_images
    out = []
    for k in range(n_images):
        r = rows[rows[:, 0] == k]
        if not len(r):
            out.append(Faces.empty())
            continue
        h, w = shapes[k]
        o = offsets[k]
        boxes = r[:, 1:5] - o
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w - 1)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h - 1)
        pts = np.empty((len(r), 10))
        pts[:, 0::2] = r[:, 6:11] - o
        pts[:, 1::2] = r[:, 11:16] - o
        s = scales[k]
        out.append(
            Faces(
                (boxes / s).astype(np.float32),
                r[:, 5].astype(np.float32),
                (pts / s).astype(np.float32),
            )
        )
    return out


def filter_faces(faces: Faces, min_face_px: float, min_score: float) -> Faces:
    """Drop boxes smaller than ``min_face_px`` on their shorter side or scoring below ``min_score``."""
    if not len(faces):
        return faces
    side = np.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
    keep = (side >= min_face_px) & (faces.scores >= min_score) & np.all(np.isfinite(faces.boxes), axis=1)
    return faces.subset(keep)


def choose_primary(
    boxes: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    rule: str,
    center_weight: float = 0.5,
    max_center_distance: float = 1.0,
) -> int | None:
    """Index of the primary face under ``rule`` (see stage.detect.schema.json), or None.

    Distances are from the box centre to the image centre in units of half the image diagonal.
    Faces farther than ``max_center_distance`` are not eligible.
    """
    if len(scores) == 0:
        return None
    b = np.asarray(boxes, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    half_diag = max(np.hypot(width - 1, height - 1) / 2, 1e-9)
    dist = np.hypot(cx - (width - 1) / 2, cy - (height - 1) / 2) / half_diag
    eligible = np.flatnonzero(dist <= max_center_distance + 1e-9)
    if not len(eligible):
        return None
    if rule == "center_score":
        key = s[eligible] - center_weight * dist[eligible]
    elif rule == "score":
        key = s[eligible]
    elif rule == "largest":
        key = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[eligible]
    elif rule == "center":
        key = -dist[eligible]
    else:
        raise ValueError(f"stages.detect.primary_rule: unknown rule {rule!r}")
    # ties (scores often saturate at 1.0) go to the face nearer the centre
    return int(eligible[np.lexsort((dist[eligible], -key))[0]])


# --- running the detector ---------------------------------------------------------------------
def _mtcnn_call(detector: FaceDetector, images: list[np.ndarray], params: dict) -> np.ndarray:
    return detector.raw(images, params)


def prepare_for_detection(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most ``max_side``; returns (image, scale)."""
    s = detection_scale(image.shape[0], image.shape[1], max_side)
    if s == 1.0:
        return image, s
    size = (max(1, round(image.shape[1] * s)), max(1, round(image.shape[0] * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), s


def _run_groups(
    detector: object,
    images: list[np.ndarray],
    shapes: list[tuple[int, int]],
    scales: list[float],
    offsets: list[int],
    params: dict,
) -> list[Faces | str]:
    results: list[Faces | str] = [Faces.empty() for _ in images]
    dims = [(im.shape[0], im.shape[1]) for im in images]
    runnable = [i for i, (h, w) in enumerate(shapes) if min(h, w) >= MIN_IMAGE_SIDE]
    plan = plan_batches([dims[i] for i in runnable], params["batch_size"], params["max_pad_ratio"])
    for group in plan:
        idx = [runnable[j] for j in group]
        try:
            rows = _mtcnn_call(detector, [images[i] for i in idx], params)
            faces = parse_mtcnn_output(
                rows, len(idx), [shapes[i] for i in idx], [scales[i] for i in idx], [offsets[i] for i in idx]
            )
            for i, f in zip(idx, faces, strict=True):
                results[i] = f
        except Exception as exc:  # noqa: BLE001 - isolate the failing image below
            log.debug("MTCNN batch of %d failed (%s); retrying one by one", len(idx), exc)
            for i in idx:
                try:
                    rows = _mtcnn_call(detector, [images[i]], params)
                    results[i] = parse_mtcnn_output(rows, 1, [shapes[i]], [scales[i]], [offsets[i]])[0]
                except Exception as exc1:  # noqa: BLE001 - recorded as this image's failure
                    results[i] = f"{type(exc1).__name__}: {exc1}"
    return results


def detect_prepared(
    detector: object, small: list[np.ndarray], scales: list[float], params: dict
) -> list[Faces | str]:
    """MTCNN on already downscaled images; per image :class:`Faces` in full-resolution pixels
    (unfiltered) or an error text.

    Images are grouped by :func:`plan_batches`; if a batched call fails its images are retried one
    by one, so one odd image cannot fail its neighbours. Images without a usable face are tried
    once more inside a black border (``retry_pad``).
    """
    shapes = [(im.shape[0], im.shape[1]) for im in small]
    results = _run_groups(detector, small, shapes, scales, [0] * len(small), params)
    pad = params.get("retry_pad")
    if not pad:
        return results
    retry = [
        i
        for i, r in enumerate(results)
        if isinstance(r, Faces) and not len(filter_faces(r, params["min_face_px"], params["min_score"]))
    ]
    if not retry:
        return results
    bordered, offs = [], []
    for i in retry:
        o = max(1, round(pad * max(shapes[i])))
        bordered.append(cv2.copyMakeBorder(small[i], o, o, o, o, cv2.BORDER_CONSTANT, value=(0, 0, 0)))
        offs.append(o)
    again = _run_groups(
        detector, bordered, [shapes[i] for i in retry], [scales[i] for i in retry], offs, params
    )
    for i, r in zip(retry, again, strict=True):
        if isinstance(r, Faces) and len(r):
            results[i] = r
    return results


def detect_images(detector: object, images: list[np.ndarray], params: dict) -> list[Faces | str]:
    """MTCNN on full-resolution RGB images (downscaled to ``params["max_side"]`` for detection)."""
    prepared = [prepare_for_detection(im, params.get("max_side")) for im in images]
    return detect_prepared(detector, [p[0] for p in prepared], [p[1] for p in prepared], params)


def detection_row(base: dict, width: int, height: int, faces: Faces, params: dict) -> dict:
    """One output row from the (unfiltered) faces of a decoded image."""
    kept = filter_faces(faces, params["min_face_px"], params["min_score"])
    row = {**base, "width": width, "height": height, "face_count": len(kept)}
    row["boxes"] = kept.boxes.tolist()
    row["scores"] = kept.scores.tolist()
    row["points"] = kept.points.tolist()
    if not len(kept):
        row["failure_reason"] = "no_face"
        return row
    p = choose_primary(
        kept.boxes,
        kept.scores,
        width,
        height,
        params["primary_rule"],
        params["center_weight"],
        params["max_center_distance"],
    )
    if p is None:
        row["failure_reason"] = "no_central_face"
        return row
    row.update(
        primary=p,
        primary_box=kept.boxes[p].tolist(),
        primary_points=kept.points[p].tolist(),
        primary_score=float(kept.scores[p]),
        failure_reason=None,
    )
    return row


class DetectStage(Stage):
    name = "detect"
    inputs = ("index",)
    schema = "detections"
    reads_pixels = True
    depends_on = ("stages.decode", "models.mtcnn")
    runtime = ("cache_dir",)  # where the converted weights are kept
    doc = "MTCNN face detection"

    def resources_for(self, config: ConfigView) -> dict[str, float]:
        p = config.stage_params("detect")
        return backend_module(p["backend"]).resources(p)

    def resolve_assets(self, config: ConfigView) -> dict[str, Asset]:
        return backend_module(config.stage_params("detect")["backend"]).resolve_assets(config)

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        return run_shard(inputs, ctx)


def run_shard(inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
    """``inputs["index"]`` -> detections table (one row per index row, same order)."""
    params = ctx.params.as_dict()
    # without the driver's assets (a tool, a test), resolved and checked here from this task's manifest
    weights = ctx.assets.get("weights") or DetectStage().resolve_assets(ctx.config).get("weights")
    detector = get_detector(params, weights)
    max_pixels = max_pixels_from(ctx.config)
    storage_options = ctx.storage_options
    root = dataset_root(inputs["index"])
    rows: list[dict] = []
    # (row number, detection-size image, scale, full width, full height)
    pending: list[tuple[int, np.ndarray, float, int, int]] = []
    pending_px = 0

    reported = 0

    def flush() -> None:
        nonlocal pending, pending_px, reported
        if not pending:
            return
        found = detect_prepared(detector, [p[1] for p in pending], [p[2] for p in pending], params)
        for (r, _, _, w, h), faces in zip(pending, found, strict=True):
            if isinstance(faces, str):
                log.warning("%s: MTCNN failed: %s", rows[r]["image_id"], faces)
                rows[r].update(width=w, height=h, failure_reason="detector_error")
            else:
                rows[r] = detection_row(rows[r], w, h, faces, params)
        pending, pending_px = [], 0
        ctx.progress(len(rows) - reported)  # every row so far is decided
        reported = len(rows)

    for rec in inputs["index"].to_pylist():
        base = {
            "image_id": rec["image_id"],
            "subject": rec["subject"],
            "label": rec["label"],
            "face_count": 0,
        }
        if rec.get("failure_reason"):
            rows.append({**base, "failure_reason": rec["failure_reason"]})
            continue
        res = ctx.images.read(rec["uri"], max_pixels, storage_options, root)
        if not res.ok:
            log.debug("%s: %s (%s)", rec["uri"], res.reason, res.detail)
            rows.append({**base, "failure_reason": res.reason})
            continue
        h, w = res.image.shape[:2]
        small, scale = prepare_for_detection(res.image, params["max_side"])
        rows.append(base)
        pending.append((len(rows) - 1, small, scale, w, h))
        pending_px += small.shape[0] * small.shape[1]
        # Several batches' worth at a time keeps MTCNN's lists full and memory bounded.
        if len(pending) >= 4 * params["batch_size"] or pending_px >= 4 * MAX_BATCH_PIXELS:
            flush()
    flush()
    return from_rows(rows, load_schema("detections"))
