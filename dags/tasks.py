"""The only functions Dask workers execute: thin wrappers around executor-independent steps."""

from __future__ import annotations

from pipeline.config.manifest import Manifest
from pipeline.core.stage import process_shard


def stage_task(
    manifest: Manifest, run_root: str, stage: str, shard: int, storage_options: dict | None, *upstream: object
) -> dict:
    """Process one shard of one stage. ``upstream`` holds the results of the same shard's upstream
    tasks; they are passed only so that Dask orders the tasks."""
    return process_shard(manifest, run_root, stage, shard, storage_options)
