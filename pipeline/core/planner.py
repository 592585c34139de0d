"""Planning: which stages of a segment each shard needs, judged by fingerprints.

A shard of a stage is *done* when its sidecar records the fingerprint of its current inputs (the
upstream shards' fingerprints, and the stage's global input when it has one) and parameters. The
planner knows the stages (:mod:`pipeline.core.registry`); storage only stores.
"""

from __future__ import annotations

from pipeline.config.manifest import Manifest
from pipeline.core.registry import get_stage, input_tables
from pipeline.storage.run import Run
from pipeline.storage.store import fingerprint


def shard_fingerprint(run: Run, manifest: Manifest, stage: str, shard: int) -> str | None:
    """Fingerprint of ``stage``'s shard: upstream fingerprints (+ the global input) + the stage's
    declared parameters. None while an input is not done."""
    spec = get_stage(stage)
    ups = []
    for inp in input_tables(stage, manifest).values():
        sc = run.store(inp).sidecar(shard)
        if sc is None:
            return None
        ups.append(sc["fingerprint"])
    if spec.global_input:
        doc = run.store(stage).read_json(spec.global_input)
        if doc is None:
            return None
        ups.append(fingerprint(doc))
    return fingerprint(ups, spec.params_hash(manifest))


def is_done(run: Run, manifest: Manifest, stage: str, shard: int) -> bool:
    fp = shard_fingerprint(run, manifest, stage, shard)
    return fp is not None and run.store(stage).is_done(shard, fp)


def plan(run: Run, manifest: Manifest, segment: list[str], shards: list[int]) -> dict[int, list[str]]:
    """Per shard, the stages of ``segment`` that must run: a stage runs when it is not done for
    the current inputs and parameters, or when anything upstream of it in the segment runs."""
    out: dict[int, list[str]] = {}
    for i in shards:
        todo: list[str] = []
        for s in segment:
            if todo or not is_done(run, manifest, s, i):
                todo.append(s)
        if todo:
            out[i] = todo
    return out
