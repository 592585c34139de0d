"""The build graph: one Dask task per shard per stage, chained per shard, only pending work submitted.

Shard ``i`` of ``landmarks`` depends on shard ``i`` of ``detect`` only, so shards flow through
detect → landmarks → fit independently. A stage with a global input (export's subject-label map)
waits for every shard of the stages before it; its ``prepare`` step runs on the driver.
Failures: Dask retries a task ``execution.retries`` times; a shard that still fails is marked
failed (traceback in ``part-NNNNN.failed.json``), its downstream shards stay pending, and all
other shards go on.
"""

from __future__ import annotations

import time
import traceback as tb_mod
import uuid
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from dags.tasks import stage_task
from pipeline.config.manifest import Manifest
from pipeline.core.stage import STAGES, shard_fingerprint, stage_dir
from pipeline.storage.store import ShardStore


@dataclass
class StageStats:
    submitted: int = 0
    computed: int = 0
    skipped: int = 0
    failed: int = 0
    blocked: int = 0  # not run because an upstream shard failed
    images: int = 0
    task_seconds: float = 0.0
    first_start: float | None = None
    last_end: float | None = None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        wall = (self.last_end - self.first_start) if self.first_start and self.last_end else 0.0
        return {
            "shards_submitted": self.submitted,
            "shards_computed": self.computed,
            "shards_skipped": self.skipped,
            "shards_failed": self.failed,
            "shards_blocked": self.blocked,
            "images": self.images,
            "task_seconds": round(self.task_seconds, 3),
            "wall_seconds": round(wall, 3),
            "images_per_second_per_worker": round(self.images / self.task_seconds, 2)
            if self.task_seconds
            else None,
            "errors": self.errors[:20],
        }


def _segments(stages: list[str]) -> list[list[str]]:
    """Split the stage list before every stage that needs all shards of the previous ones."""
    segs: list[list[str]] = []
    for s in stages:
        if not segs or STAGES[s].global_input:
            segs.append([s])
        else:
            segs[-1].append(s)
    return segs


def _is_done(manifest: Manifest, run_root: str, stage: str, shard: int, so: dict | None) -> bool:
    fp = shard_fingerprint(manifest, run_root, stage, shard, so)
    return fp is not None and ShardStore(run_root, stage, so).is_done(shard, fp)


def _prepare(manifest: Manifest, run_root: str, stage: str, so: dict | None) -> None:
    import importlib

    spec = STAGES[stage]
    mod, fn = spec.func.split(":")[0], "prepare_global"
    getattr(importlib.import_module(mod), fn)(manifest, run_root, so)


def run_stages(
    manifest: Manifest,
    run_root: str,
    stages: list[str],
    client: object | None,
    mode: str = "resume",
    storage_options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run ``stages`` (data-flow order, ingest excluded) over all committed index shards."""
    so = storage_options
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    shards = ShardStore(run_root, stage_dir("index"), so).shards_with_sidecar()
    if not shards:
        raise FileNotFoundError(f"{run_root}: no index shards; run `morphset ingest` first")
    for s in ["ingest", *stages]:
        ShardStore(run_root, s, so).remove_temporaries()  # left by a killed run; nothing writes now
    if mode == "overwrite":
        for s in stages:
            ShardStore(run_root, s, so).clear()
    retries = int(manifest.get("execution.retries", 2))
    gpu_stages = set(manifest.get("execution.gpu_stages", []) or [])
    stats = {s: StageStats() for s in stages}
    failed: set[tuple[str, int]] = set()
    t_build = time.perf_counter()
    for segment in _segments(stages):
        if STAGES[segment[0]].global_input:
            _prepare(manifest, run_root, segment[0], so)
        _run_segment(
            manifest, run_root, segment, shards, client, so, retries, gpu_stages, stats, failed, progress
        )
    wall = time.perf_counter() - t_build
    images = max((st.images for st in stats.values()), default=0)
    return {
        "run": run_root,
        "stages": {s: st.as_dict() for s, st in stats.items()},
        "wall_seconds": round(wall, 3),
        "images_per_second": round(images / wall, 2) if wall and images else None,
        "failed_shards": sorted(f"{s}/{i:05d}" for s, i in failed),
    }


def _run_segment(
    manifest: Manifest,
    run_root: str,
    segment: list[str],
    shards: list[int],
    client: object | None,
    so: dict | None,
    retries: int,
    gpu_stages: set[str],
    stats: dict[str, StageStats],
    failed: set[tuple[str, int]],
    progress: bool,
) -> None:
    # Decide, per shard, which stages must run: a stage runs if it is not done or anything upstream runs.
    plan: dict[int, list[str]] = {}
    for i in shards:
        todo: list[str] = []
        for s in segment:
            if todo or not _is_done(manifest, run_root, s, i, so):
                todo.append(s)
            else:
                stats[s].skipped += 1
        if todo:
            plan[i] = todo
    bars = {
        s: tqdm(
            total=sum(s in t for t in plan.values()),
            desc=f"{s:>9}",
            unit="shard",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
        )
        for s in segment
    }
    try:
        if client is None:
            _run_sync(manifest, run_root, plan, so, stats, failed, bars)
        else:
            _run_dask(manifest, run_root, plan, client, so, retries, gpu_stages, stats, failed, bars)
    finally:
        for b in bars.values():
            b.close()


def _record(stats: StageStats, result: dict, bar: tqdm) -> None:
    stats.images += int(result.get("images", result.get("rows", 0)))
    if result.get("skipped"):
        stats.skipped += 1
    else:
        stats.computed += 1
        stats.task_seconds += float(result.get("seconds", 0.0))
    bar.update(1)
    bar.set_postfix(images=stats.images, refresh=False)


def _fail(
    manifest: Manifest,
    run_root: str,
    stage: str,
    shard: int,
    so: dict | None,
    exc: BaseException,
    tb: str,
    stats: StageStats,
    failed: set,
) -> None:
    fp = shard_fingerprint(manifest, run_root, stage, shard, so) or ""
    ShardStore(run_root, stage, so).mark_failed(shard, fp, f"{type(exc).__name__}: {exc}", tb)
    stats.failed += 1
    stats.errors.append(f"{stage}/{shard:05d}: {type(exc).__name__}: {exc}")
    failed.add((stage, shard))


def _run_sync(manifest, run_root, plan, so, stats, failed, bars) -> None:  # noqa: ANN001
    for i, todo in plan.items():
        for k, s in enumerate(todo):
            now = time.perf_counter()
            stats[s].first_start = stats[s].first_start or now
            try:
                res = stage_task(manifest, run_root, s, i, so)
            except Exception as exc:  # recorded, and the shard's downstream stages are blocked
                _fail(manifest, run_root, s, i, so, exc, tb_mod.format_exc(), stats[s], failed)
                for d in todo[k + 1 :]:
                    stats[d].blocked += 1
                break
            stats[s].last_end = time.perf_counter()
            _record(stats[s], res, bars[s])


def _run_dask(manifest, run_root, plan, client, so, retries, gpu_stages, stats, failed, bars) -> None:  # noqa: ANN001
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    meta: dict[str, tuple[str, int]] = {}
    futures = []
    prev_of: dict[str, object] = {}
    # The manifest travels inside each task (a few kB). Scattering it once would be cheaper, but
    # scattered data dies with the worker holding it and takes every dependent task with it.
    for i, todo in plan.items():
        prev = None
        for s in todo:
            kwargs = {"retries": retries, "key": f"{s}-{i:05d}-{token}", "pure": False}
            if s in gpu_stages:
                kwargs["resources"] = {"GPU": 1}
            args = (manifest, run_root, s, i, so) + ((prev,) if prev is not None else ())
            fut = client.submit(stage_task, *args, **kwargs)
            meta[fut.key] = (s, i)
            futures.append(fut)
            prev_of[fut.key] = prev
            prev = fut
    t0 = time.perf_counter()
    for s in {s for todo in plan.values() for s in todo}:
        stats[s].first_start = t0
        stats[s].submitted = sum(s in todo for todo in plan.values())
    try:
        for fut in as_completed(futures):
            s, i = meta[fut.key]
            if fut.status == "error":
                exc = fut.exception()
                # A downstream task errors with its upstream's exception: count it as blocked.
                up = prev_of.get(fut.key)
                if up is not None and up.status in ("error", "cancelled"):
                    stats[s].blocked += 1
                    continue
                tb = "".join(tb_mod.format_exception(type(exc), exc, fut.traceback()))
                _fail(manifest, run_root, s, i, so, exc, tb, stats[s], failed)
                continue
            if fut.status == "cancelled":
                # Not cancelled by us (that only happens on Ctrl-C, below): the scheduler gave up on
                # it, e.g. lost inputs. The shard is not done; say so and exit non-zero.
                up = prev_of.get(fut.key)
                if up is not None and up.status in ("error", "cancelled"):
                    stats[s].blocked += 1
                    continue
                exc = RuntimeError("task cancelled by the Dask scheduler (lost worker or data)")
                _fail(manifest, run_root, s, i, so, exc, "", stats[s], failed)
                continue
            stats[s].last_end = time.perf_counter()
            _record(stats[s], fut.result(), bars[s])
    except KeyboardInterrupt:
        client.cancel(futures)
        raise
