"""Stage ``landmarks``: 68 iBUG points on the primary MTCNN face, plus the SphereFace align matrix.

``run_shard(inputs, ctx)``: ``inputs["index"]`` and ``inputs["detect"]`` (same shard, same row
order) -> rows of ``schemas/landmarks.yaml``, one per index row. The backend's weights are resolved
and verified before any image is read (:func:`preflight` lets a driver do it before scheduling):
a missing FAN checkpoint is a configuration error that stops the stage with a message naming
the file, where to put it and the dlib alternative. Per-image problems are failure reasons:
upstream reasons are carried forward; ``image_changed`` (the file no longer decodes to the size
detect saw), ``align_failed`` (degenerate 5 points), ``landmarks_failed``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config.manifest import Manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core import workercache
from pipeline.core.backends import lookup
from pipeline.core.stage import Asset, ConfigView, Stage, StageContext
from pipeline.imaging.align import AlignError, align_matrix_from_points
from pipeline.imaging.decode import dataset_root, max_pixels_from
from pipeline.landmarks.base import LandmarkBackend, LandmarkResult

log = logging.getLogger(__name__)

# name -> the module of a landmark backend: MODEL_KEY, USES_GPU, resolve_weights(model entry,
# params) -> (path, sha256), create(path, sha256, params) -> LandmarkBackend, cache_key(params)
BACKENDS = {
    "fan": "pipeline.landmarks.fan",
    "dlib": "pipeline.landmarks.dlib_backend",
}


def backend_module(name: str) -> Any:
    """The module of the landmark backend called ``name``; an unknown name lists the known ones."""
    return lookup("landmarks", BACKENDS, name)


def _resolve_uncached(config: ConfigView, params: dict) -> tuple[str, str, str]:
    backend = params["backend"]
    mod = backend_module(backend)
    path, sha = mod.resolve_weights(config.model(mod.MODEL_KEY), params)
    return backend, str(path), sha


# (backend, model entry, TORCH_HOME) -> (backend, path, sha256, (size, mtime_ns)) in this process:
# hashing a ~100 MB weights file for every shard would cost more than landmarking a small shard.
_VERIFIED: dict[tuple, tuple[str, str, str, tuple[int, int]]] = {}


def resolve_weights(config: ConfigView, params: dict) -> tuple[str, str, str]:
    """(backend, weights path, sha256) after locating and verifying (FAN: maybe downloading).

    Verified once per process; re-verified if the file's size or modification time changes.
    """
    backend = params["backend"]
    model = config.get(f"models.{backend_module(backend).MODEL_KEY}")
    key = (backend, json.dumps(model, sort_keys=True, default=str), os.environ.get("TORCH_HOME"))
    hit = _VERIFIED.get(key)
    if hit is not None:
        try:
            st = os.stat(hit[1])
            if (st.st_size, st.st_mtime_ns) == hit[3]:
                return hit[0], hit[1], hit[2]
        except OSError:
            pass
    backend, path, sha = _resolve_uncached(config, params)
    st = os.stat(path)
    _VERIFIED[key] = (backend, path, sha, (st.st_size, st.st_mtime_ns))
    return backend, path, sha


class LandmarksStage(Stage):
    name = "landmarks"
    inputs = ("index", "detect")
    schema = "landmarks"
    reads_pixels = True
    depends_on = ("stages.decode", "models.fan", "models.dlib_landmarks")
    doc = "68 iBUG landmarks (FAN or dlib) on the primary MTCNN face"

    def resources_for(self, config: ConfigView) -> dict[str, float]:
        return {"GPU": 1} if backend_module(config.stage_params("landmarks")["backend"]).USES_GPU else {}

    def resolve_assets(self, config: ConfigView) -> dict[str, Asset]:
        backend, path, sha = resolve_weights(config, config.stage_params("landmarks"))
        return {"weights": Asset(path, sha, f"landmarks backend {backend}: {path}")}

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        return run_shard(inputs, ctx)


def preflight(manifest: Manifest) -> str:
    """Check the configured backend's weights before any work; returns a one-line description."""
    assets = LandmarksStage().resolve_assets(LandmarksStage().own_view(manifest))
    w = assets["weights"]
    return f"{w.description} (sha256 {w.sha256[:12]}…)"


def get_backend(config: ConfigView, params: dict, weights: Asset | None = None) -> LandmarkBackend:
    """The per-process backend instance for these parameters. ``weights``: the file the driver
    verified (checked again here once per process); without it the weights are resolved here."""
    if weights is not None and os.path.isfile(weights.path):
        backend, path, sha = params["backend"], weights.path, weights.sha256
        _verify_once(path, sha)
    else:
        backend, path, sha = resolve_weights(config, params)
    mod = backend_module(backend)
    key = ("landmarks", backend, path, sha, *mod.cache_key(params))
    return workercache.get_or_create(key, lambda: mod.create(path, sha, params))


def _verify_once(path: str, sha: str) -> None:
    from pipeline.storage.hashing import sha256_file

    st = os.stat(path)
    key = ("asset", path, sha)
    hit = _VERIFIED.get(key)
    if hit is not None and hit[3] == (st.st_size, st.st_mtime_ns):
        return
    got = sha256_file(path)
    if got != sha:
        raise ValueError(f"{path}: sha256 {got} differs from the {sha} verified by the driver")
    _VERIFIED[key] = ("", path, sha, (st.st_size, st.st_mtime_ns))


def _apply(row: dict, result: LandmarkResult) -> None:
    if isinstance(result, str):
        log.debug("%s: landmarks failed: %s", row["image_id"], result)
        row["failure_reason"] = "landmarks_failed"
        return
    pts, conf = result
    if pts.shape != (68, 2) or not np.all(np.isfinite(pts)):
        row["failure_reason"] = "landmarks_failed"
        return
    row["landmarks"] = pts.astype(np.float32).reshape(-1).tolist()
    row["confidence"] = np.asarray(conf, dtype=np.float32).reshape(-1).tolist()
    row["failure_reason"] = None


def run_shard(inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
    """index + detections -> landmarks table (one row per index row, same order)."""
    params = ctx.params.as_dict()
    # before any image: a missing checkpoint stops here
    backend = get_backend(ctx.config, params, ctx.assets.get("weights"))
    max_pixels = max_pixels_from(ctx.config)
    storage_options = ctx.storage_options
    root = dataset_root(inputs["index"])
    index = inputs["index"].to_pylist()
    det = inputs["detect"].to_pylist()
    if len(index) != len(det) or any(a["image_id"] != b["image_id"] for a, b in zip(index, det, strict=True)):
        raise ValueError(
            f"landmarks shard {ctx.shard}: index and detect tables do not match row for row "
            f"({len(index)} vs {len(det)} rows); rebuild detect for this shard"
        )
    common = {
        "backend": backend.name,
        "backend_version": backend.version,
        "weights_sha256": backend.weights_sha256,
    }
    rows: list[dict] = []
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    chunk = max(2 * int(params["batch_size"]), 8)
    reported = 0

    def flush() -> None:
        nonlocal reported
        if pending:
            results = backend.predict([(im, box) for _, im, box in pending])
            for (r, _, _), res in zip(pending, results, strict=True):
                _apply(rows[r], res)
            pending.clear()
        ctx.progress(len(rows) - reported)  # every row so far is decided
        reported = len(rows)

    for rec, d in zip(index, det, strict=True):
        row = {
            "image_id": rec["image_id"],
            "subject": rec["subject"],
            "label": rec["label"],
            **common,
            "image_width": d.get("width"),
            "image_height": d.get("height"),
        }
        rows.append(row)
        reason = rec.get("failure_reason") or d.get("failure_reason")
        if reason or d.get("primary_box") is None or d.get("primary_points") is None:
            row["failure_reason"] = reason or "no_face"
            continue
        try:
            row["align_matrix"] = align_matrix_from_points(d["primary_points"]).reshape(-1).tolist()
        except AlignError as exc:
            log.debug("%s: %s", rec["image_id"], exc)
            row["failure_reason"] = "align_failed"
            continue
        res = ctx.images.read(
            rec["uri"], max_pixels, storage_options, root, (d.get("width"), d.get("height"))
        )
        if not res.ok:
            row["failure_reason"] = res.reason
            continue
        pending.append((len(rows) - 1, res.image, np.asarray(d["primary_box"], dtype=np.float64)))
        if len(pending) >= chunk:
            flush()
    flush()
    return from_rows(rows, load_schema("landmarks"))
