"""Stage ``embed``: a face-recognition embedding of each image's primary face.

``run(inputs, ctx)``: ``inputs["index"]`` and ``inputs["landmarks"]`` (same shard, same row order)
-> rows of ``schemas/embeddings.yaml``, one per index row. The face is aligned from its 68
landmarks by the backend; images are read again (decoding costs ~1 % of an embedding). The
network is resolved and verified on the driver and loaded once per worker. Per-image problems
are failure reasons: upstream reasons carried forward, ``image_changed``, ``embedding_failed``.

Disabled (``stages.embed.enabled: false``, or null on a synthetic dataset) the stage reads no
image and writes null embeddings: the fit then screens nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config.schemas import conform, from_rows, load_schema
from pipeline.core import workercache
from pipeline.core.backends import lookup
from pipeline.core.stage import STAGE_OFF_KEY, Asset, ConfigView, Stage, StageContext, check_same_rows
from pipeline.embed.base import EmbeddingBackend, EmbeddingResult
from pipeline.imaging.decode import dataset_root, max_pixels_from

log = logging.getLogger(__name__)

FAILED = "embedding_failed"
# name -> module: ``MODEL_KEY`` (its ``models.`` entry), ``resolve_model`` (entry -> verified path,
# sha256) and ``Backend`` (an :class:`EmbeddingBackend`, built from path, sha256 and the stage's
# parameters). Adding a backend is one module and one line here (and its name in the stage schema).
BACKENDS = {
    "dlib-resnet-torch": "pipeline.embed.dlib_resnet_torch",
    "dlib-resnet": "pipeline.embed.dlib_resnet",
}
ENABLED_KEY = "morphset.embed.enabled"


def enabled_for(params: dict, index: pa.Table) -> bool:
    """``stages.embed.enabled``, with null decided by the dataset ingest recorded (off for renders)."""
    if params["enabled"] is not None:
        return bool(params["enabled"])
    md = index.schema.metadata or {}
    return md.get(b"morphset.dataset_synthetic", b"false") != b"true"


def backend_module(name: str) -> Any:
    """The module of the embedding backend called ``name``; an unknown name lists the known ones."""
    return lookup("embed", BACKENDS, name)


def _resolve(config: ConfigView) -> tuple[str, Path, str]:
    name = config.stage_params("embed")["backend"]
    mod = backend_module(name)
    path, sha = mod.resolve_model(config.model(mod.MODEL_KEY))
    return name, path, sha


def get_backend(params: dict, weights: Asset) -> EmbeddingBackend:
    """The per-process backend for the driver's verified weights (sha256 re-checked once here)."""

    def load() -> EmbeddingBackend:
        return backend_module(params["backend"]).Backend(Path(weights.recheck()), weights.sha256, params)

    key = ("embed", params["backend"], params.get("device"), weights.path, weights.sha256)
    return workercache.get_or_create(key, load)


class EmbedStage(Stage):
    name = "embed"
    inputs = ("index", "landmarks")
    schema = "embeddings"
    reads_pixels = True
    depends_on = ("stages.decode", "models.dlib_embedding")
    doc = "face-recognition embedding of the primary face (identity screening, overlap)"

    def resources_for(self, config: ConfigView) -> dict[str, float]:
        p = config.stage_params("embed")
        gpu = p["enabled"] is not False and p["backend"] == "dlib-resnet-torch" and p["device"] != "cpu"
        return {"GPU": 1} if gpu else {}

    def resolve_assets(self, config: ConfigView) -> dict[str, Asset]:
        if config.stage_params("embed")["enabled"] is False:
            return {}
        backend, path, sha = _resolve(config)
        return {"weights": Asset(str(path), sha, f"embedding backend {backend}: {path}")}

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        return run_shard(inputs, ctx)


def run_shard(inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
    """index + landmarks -> embeddings table (one row per index row, same order)."""
    params = ctx.params.as_dict()
    index, lms = inputs["index"], inputs["landmarks"]
    check_same_rows(ctx, ("index", index), ("landmarks", lms), "landmarks")
    schema = load_schema("embeddings")
    enabled = enabled_for(params, index)
    base = {
        "image_id": index.column("image_id"),
        "subject": index.column("subject"),
        "label": index.column("label"),
    }
    if not enabled:
        n = index.num_rows
        table = pa.table(
            {
                **base,
                "embedding": pa.nulls(n, pa.list_(pa.float32())),
                "backend": pa.nulls(n, pa.string()),
                "backend_version": pa.nulls(n, pa.string()),
                "weights_sha256": pa.nulls(n, pa.string()),
                "failure_reason": lms.column("failure_reason"),
            }
        )
        return conform(table, schema, {ENABLED_KEY: "false", STAGE_OFF_KEY.decode(): "true"})

    weights = ctx.assets.get("weights")
    if weights is None:  # called without the driver's assets (a tool, a test)
        _, path, sha = _resolve(ctx.config)
        weights = Asset(str(path), sha)
    backend = get_backend(params, weights)
    max_pixels = max_pixels_from(ctx.config)
    root = dataset_root(index)
    rows: list[dict] = []
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []
    common = {
        "backend": backend.name,
        "backend_version": backend.version,
        "weights_sha256": backend.weights_sha256,
    }

    reported = 0

    def flush() -> None:
        nonlocal reported
        if pending:
            results = backend.embed([(im, pts) for _, im, pts in pending])
            for (r, _, _), res in zip(pending, results, strict=True):
                _apply(rows[r], res)
            pending.clear()
        ctx.progress(len(rows) - reported)  # every row so far is decided
        reported = len(rows)

    for rec, lm in zip(index.to_pylist(), lms.to_pylist(), strict=True):
        row = {"image_id": rec["image_id"], "subject": rec["subject"], "label": rec["label"], **common}
        rows.append(row)
        reason = lm.get("failure_reason") or (
            None if lm.get("landmarks") is not None else "missing_landmarks"
        )
        if reason:
            row["failure_reason"] = reason
            continue
        size = (lm.get("image_width"), lm.get("image_height"))
        res = ctx.images.read(rec["uri"], max_pixels, ctx.storage_options, root, size)
        if not res.ok:
            row["failure_reason"] = res.reason
            continue
        pts = np.asarray(lm["landmarks"], dtype=np.float64).reshape(-1, 2)
        pending.append((len(rows) - 1, res.image, pts))
        if len(pending) >= int(params["batch_size"]):
            flush()
    flush()
    return from_rows(rows, schema, {ENABLED_KEY: "true"})


def _apply(row: dict, result: EmbeddingResult) -> None:
    if isinstance(result, str):
        log.debug("%s: embedding failed: %s", row["image_id"], result)
        row["failure_reason"] = FAILED
        return
    row["embedding"] = result.astype(np.float32).tolist()
    row["failure_reason"] = None
