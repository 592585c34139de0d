"""Executor-independent stage steps: one call processes one shard of one stage.

A stage is a pure function ``run_shard(inputs, ctx) -> pa.Table`` (no Dask, no file paths of its
own): ``inputs`` maps each upstream stage name to that stage's table for the same shard number.
This module reads the inputs from the shard store, computes the fingerprint (upstream
fingerprints + this stage's parameters + schema version), skips a shard that is already done, and
commits the output. Local loops, Dask graphs (``dags/``) and any other executor call
:func:`process_shard` and nothing else.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.config.manifest import Manifest
from pipeline.config.schemas import StageSchema, load_schema
from pipeline.storage.store import ShardStore, fingerprint


@dataclass(frozen=True)
class StageSpec:
    name: str
    schema: str
    inputs: tuple[str, ...]
    func: str  # "module:function", imported lazily (TensorFlow and torch stay out of the driver)
    resources: dict = field(default_factory=dict)  # Dask worker resources, e.g. {"GPU": 1}
    doc: str = ""
    # A stage-level JSON file (in this stage's directory) computed from all shards before this
    # stage runs, e.g. export's subject-label map; its content is part of every shard fingerprint.
    global_input: str | None = None
    # Other manifest values the output depends on (dotted keys), hashed with stages.<name>.
    extra_keys: tuple[str, ...] = ()

    def function(self) -> Callable[[dict[str, pa.Table], ShardContext], pa.Table]:
        mod, fn = self.func.split(":")
        return getattr(importlib.import_module(mod), fn)


# The build's stages in data-flow order (ingest is special: it creates the shards).
STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            "detect",
            "detections",
            ("index",),
            "pipeline.detect.stage:run_shard",
            doc="MTCNN face detection",
            extra_keys=("stages.decode", "models.mtcnn"),
        ),
        StageSpec(
            "landmarks",
            "landmarks",
            ("index", "detect"),
            "pipeline.landmarks.stage:run_shard",
            doc="68 iBUG landmarks (FAN or dlib) on the primary MTCNN face",
            extra_keys=("stages.decode", "models.fan", "models.dlib_landmarks"),
        ),
        StageSpec(
            "fit",
            "fits",
            ("landmarks",),
            "pipeline.fit.stage:run_shard",
            doc="alternating multi-image 3DMM fit per subject",
            extra_keys=("models.morphable_model",),
        ),
        StageSpec(
            "export",
            "trainset",
            ("index", "detect", "landmarks", "fit"),
            "pipeline.export.stage:run_shard",
            doc="aligned crops + fit targets, the hand-off to trainers",
            global_input="_labels.json",
            extra_keys=("stages.decode",),
        ),
    )
}
INPUT_STAGE_NAMES = {"index": "ingest"}  # table name -> stage directory
BUILD_ORDER = ["ingest", "detect", "landmarks", "fit", "export"]


def stage_dir(name: str) -> str:
    return INPUT_STAGE_NAMES.get(name, name)


def schema_for(stage_or_table: str) -> StageSchema:
    if stage_or_table in ("index", "ingest"):
        return load_schema("index")
    return load_schema(STAGES[stage_or_table].schema)


@dataclass
class ShardContext:
    """What a stage function may know about where it runs."""

    shard: int
    stage: str
    params: dict
    manifest: Manifest
    run_root: str
    storage_options: dict | None = None


def stage_params_hash(manifest: Manifest, stage: str) -> str:
    spec = STAGES[stage]
    extra = {
        k: (manifest.stage_params(k.split(".", 1)[1]) if k.startswith("stages.") else manifest.get(k))
        for k in spec.extra_keys
    }
    return fingerprint(stage, manifest.stage_params(stage), extra, load_schema(spec.schema).version)


def shard_fingerprint(
    manifest: Manifest, run_root: str, stage: str, shard: int, storage_options: dict | None = None
) -> str | None:
    """Fingerprint of the inputs + params of ``stage``'s shard; None if an input is not done."""
    spec = STAGES[stage]
    ups = []
    for inp in spec.inputs:
        sc = ShardStore(run_root, stage_dir(inp), storage_options).sidecar(shard)
        if sc is None:
            return None
        ups.append(sc["fingerprint"])
    if spec.global_input:
        doc = ShardStore(run_root, stage, storage_options).read_json(spec.global_input)
        if doc is None:
            return None
        ups.append(fingerprint(doc))
    return fingerprint(ups, stage_params_hash(manifest, stage))


def process_shard(
    manifest: Manifest,
    run_root: str,
    stage: str,
    shard: int,
    storage_options: dict | None = None,
    force: bool = False,
) -> dict:
    """Run one stage on one shard if it is not already done; return its sidecar."""
    spec = STAGES[stage]
    out = ShardStore(run_root, stage, storage_options)
    fp = shard_fingerprint(manifest, run_root, stage, shard, storage_options)
    if fp is None:
        raise RuntimeError(f"{stage} shard {shard}: an input ({', '.join(spec.inputs)}) is not done")
    if not force and out.is_done(shard, fp):
        return {**out.sidecar(shard), "skipped": True}
    t0 = time.perf_counter()
    inputs = {
        inp: ShardStore(run_root, stage_dir(inp), storage_options).read(shard, schema_for(inp))
        for inp in spec.inputs
    }
    ctx = ShardContext(shard, stage, manifest.stage_params(stage), manifest, run_root, storage_options)
    table = spec.function()(inputs, ctx)
    images = inputs[spec.inputs[0]].num_rows
    extra_md = {"morphset.stage_params_hash": stage_params_hash(manifest, stage)}
    extra_md.update(
        {
            k.decode(): v.decode()
            for k, v in (table.schema.metadata or {}).items()
            if k.startswith(b"morphset.") and not k.startswith(b"morphset.schema")
        }
    )
    return out.write(
        shard,
        table,
        load_schema(spec.schema),
        fp,
        stage_params_hash(manifest, stage),
        time.perf_counter() - t0,
        extra_metadata=extra_md,
        extra_sidecar={"images": images},
    )
