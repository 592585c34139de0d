"""Running stages over shards, independent of any executor.

- :func:`process_shard`: one stage on one shard (read inputs, skip if done, run, commit).
- :class:`ShardTask`: the picklable callable every executor runs (a Dask worker, this process):
  one task per group of a shard's stages (:func:`fuse`: consecutive pixel stages share a task
  and its decoded images), one result entry per stage.
- :func:`resolve_assets`: model files located and verified once on the driver.
- :func:`run_stages`: plans pending shards per segment, hands chains of (shard, stages) to an
  :class:`Executor`, records what comes back (stats, failure markers, progress) and reports.

An executor only runs chains: for each shard, its groups of pending stages in order, each after
the one before it; it yields one :class:`Outcome` per stage. :class:`SyncExecutor` (in this process) is
here; the Dask executor is in ``dags/``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import sys
import threading
import time
import traceback as tb_mod
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from pipeline.config.manifest import Manifest
from pipeline.core import planner
from pipeline.core.planner import shard_fingerprint
from pipeline.core.progress import ProgressLog, is_batch
from pipeline.core.registry import STAGES, config_view, get_stage, input_tables, schema_for
from pipeline.core.stage import (
    DROPPED_ROWS_KEY,
    STAGE_OFF_KEY,
    Asset,
    StageContext,
    StageTables,
    stage_parameters,
)
from pipeline.imaging.decode import DecodedImages
from pipeline.storage.run import Run
from pipeline.storage.store import CorruptShard, failure_counts

log = logging.getLogger(__name__)


def resolve_assets(manifest: Manifest, stages: list[str]) -> dict[str, dict[str, Asset]]:
    """Every stage's model files, located and verified here (the driver) before any work."""
    return {s: get_stage(s).resolve_assets(config_view(manifest, s)) for s in stages}


def stage_context(
    manifest: Manifest,
    stage: str,
    run: Run | str = "memory://morphset-unused",
    shard: int = 0,
    assets: dict[str, Asset] | None = None,
) -> StageContext:
    """The context a stage's ``run`` gets, for calling a stage directly (tools, tests)."""
    run = run if isinstance(run, Run) else Run(run)
    return StageContext(
        shard, stage, stage_parameters(manifest, stage), config_view(manifest, stage), run, assets or {}
    )


def process_shard(
    run: Run,
    manifest: Manifest,
    stage: str,
    shard: int,
    assets: dict[str, Asset] | None = None,
    force: bool = False,
    images: DecodedImages | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Run one stage on one shard if it is not already done; return its sidecar.

    ``assets``: what :func:`resolve_assets` gave for this stage (resolved here when omitted);
    ``images``: decoded images shared with the shard's other pixel stages in this task."""
    spec = get_stage(stage)
    out = run.store(stage)
    fp = shard_fingerprint(run, manifest, stage, shard)
    tables = input_tables(stage, manifest)
    if fp is None:
        from pipeline.core.registry import stage_dir

        missing = [t for t in tables.values() if run.store(t).sidecar(shard) is None]
        commands = " and ".join(f"`morphset {stage_dir(i)}`" for i in missing) or "the upstream stages"
        raise RuntimeError(
            f"{stage} shard {shard}: its input {', '.join(missing) or ', '.join(tables.values())} is not done "
            f"in {run.url}; run {commands} on it first (or `morphset build`, which runs every stage)"
        )
    done = out.sidecar(shard) if not force and out.is_done(shard, fp) else None
    if done is not None:
        return {**done, "skipped": True}
    t0 = time.perf_counter()
    cpu0 = time.process_time()  # user + system CPU of this process (all its threads)
    inputs = {}
    for slot, table in tables.items():
        try:
            inputs[slot] = run.read_shard(table, shard)
        except CorruptShard:
            run.store(table).invalidate(shard)  # never served again; the next build recomputes it
            raise
    if assets is None:
        assets = spec.resolve_assets(config_view(manifest, stage))
    ctx = stage_context(manifest, stage, run, shard, assets)
    if images is not None:
        ctx.images = images
    if progress is not None:
        ctx.progress = progress
    decodes_before = ctx.images.decodes
    table = spec.run(inputs, ctx)
    n_images = inputs[spec.inputs[0]].num_rows
    params_hash = spec.params_hash(manifest)
    table_md = dict(table.schema.metadata or {})
    # Input rows a stage could not use and has no failure_reason column for (export): kept in the
    # sidecar, counted with the failures, never silently lost.
    dropped = json.loads(table_md.pop(DROPPED_ROWS_KEY, b"{}"))
    off = table_md.pop(STAGE_OFF_KEY, None) == b"true"  # switched off for this shard: no work to time
    extra_md = {"morphset.stage_params_hash": params_hash}
    extra_md.update(
        {
            k.decode(): v.decode()
            for k, v in table_md.items()
            if (k.startswith(b"morphset.") and not k.startswith(b"morphset.schema"))
            or k == b"huggingface"  # the features Hugging Face datasets reads (the export's)
        }
    )
    extra_sidecar: dict = {"images": n_images, "cpu_seconds": round(time.process_time() - cpu0, 4)}
    if off:
        extra_sidecar["off"] = True
    if spec.reads_pixels:
        extra_sidecar["decodes"] = ctx.images.decodes - decodes_before
    if dropped:
        failures = Counter(failure_counts(table))
        failures.update(dropped.values())
        extra_sidecar.update(failures=dict(sorted(failures.items())), dropped_rows=dropped)
    return out.write(
        shard,
        table,
        schema_for(stage),
        fp,
        params_hash,
        time.perf_counter() - t0,
        extra_metadata=extra_md,
        extra_sidecar=extra_sidecar,
    )


def fuse(todo: list[str]) -> list[tuple[str, ...]]:
    """A shard's pending stages as the tasks that run them: consecutive stages that read pixels
    (detect → landmarks → embed) form one task, which decodes each image once for all of them."""
    groups: list[tuple[str, ...]] = []
    for s in todo:
        if groups and STAGES[s].reads_pixels and STAGES[groups[-1][-1]].reads_pixels:
            groups[-1] = (*groups[-1], s)
        else:
            groups.append((s,))
    return groups


# Faults a second try cannot mend: retried, they only repeat their error (or hide it behind a
# later one, as a corrupt input does once it is invalidated).
def _deterministic(exc: BaseException) -> bool:
    return storage_fault(exc) is not None or isinstance(exc, CorruptShard)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling (it travels back from a worker), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # an exception class that cannot be rebuilt from its arguments
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _stopped(entries: object) -> bool:
    """Whether an upstream task's entries hold a failed or blocked stage."""
    return isinstance(entries, list) and any("result" not in e for e in entries if isinstance(e, dict))


@dataclass(frozen=True)
class ShardTask:
    """What a worker runs: ``task(stages, shard, *upstream)`` for a group of one shard's stages
    (:func:`fuse`), returning one entry per stage: ``{"stage", "result"}`` (its sidecar),
    ``{"stage", "error", "traceback"}`` or ``{"stage", "blocked": True}``. A stage's exception is
    tried again up to ``retries`` times in the task unless it is deterministic (a storage fault,
    a corrupt input); after a failure the group's later stages are blocked, and so is every task
    whose ``upstream`` (the results of the same shard's earlier tasks) holds a failure. The
    manifest travels inside (a few kB): scattered data would die with the worker holding it."""

    manifest: Manifest
    run_url: str
    storage_options: dict | None
    assets: dict[str, dict[str, Asset]]
    retries: int = 0

    def __call__(self, stages: tuple[str, ...], shard: int, *upstream: object) -> list[dict]:
        if any(_stopped(u) for u in upstream):
            return [{"stage": s, "blocked": True} for s in stages]
        run = Run(self.run_url, self.storage_options)
        budget = float(self.manifest.get("execution.decoded_images_mib", 512) or 0)
        images = DecodedImages(int(budget * 2**20)) if len(stages) > 1 else None
        entries: list[dict] = []
        for k, s in enumerate(stages):
            try:
                entries.append({"stage": s, "result": self._attempts(run, s, shard, images)})
            except Exception as exc:  # recorded by the runner; the group's later stages are blocked
                entries.append({"stage": s, "error": _portable(exc), "traceback": tb_mod.format_exc()})
                entries.extend({"stage": d, "blocked": True} for d in stages[k + 1 :])
                break
        return entries

    def _attempts(self, run: Run, stage: str, shard: int, images: DecodedImages | None) -> dict:
        for attempt in range(self.retries + 1):
            try:
                return process_shard(
                    run,
                    self.manifest,
                    stage,
                    shard,
                    self.assets.get(stage, {}),
                    images=images,
                    progress=ProgressSender(stage, shard, PROGRESS_EVERY_S),
                )
            except Exception as exc:
                if attempt == self.retries or _deterministic(exc):
                    raise
                log.warning("%s/%05d: %s: %s; trying again", stage, shard, type(exc).__name__, exc)
        raise AssertionError("unreachable")


@dataclass
class Outcome:
    """One finished stage: a result, an error, or blocked (an upstream stage of its shard failed)."""

    stage: str
    shard: int
    result: dict | None = None
    error: BaseException | None = None
    traceback: str = ""
    blocked: bool = False
    started: float | None = None
    ended: float | None = None


def outcomes(entries: list[dict], shard: int, started: float, ended: float) -> Iterator[Outcome]:
    """A task's entries (:class:`ShardTask`) as one outcome per stage."""
    for e in entries:
        if "result" in e:
            yield Outcome(e["stage"], shard, result=e["result"], started=started, ended=ended)
        elif "error" in e:
            yield Outcome(
                e["stage"], shard, error=e["error"], traceback=e.get("traceback", ""), started=started
            )
        else:
            yield Outcome(e["stage"], shard, blocked=True)


class Executor(Protocol):
    retries: int  # how often a task tries a failing stage again (in the task; see ShardTask)

    def execute(self, task: ShardTask, chains: dict[int, list[tuple[str, ...]]]) -> Generator[Outcome]:
        """Run every chain (shard -> its groups of stages in order, :func:`fuse`), one task per
        group after the one before it, and yield one outcome per stage."""
        ...


PROGRESS_TOPIC = "morphset-progress"
PROGRESS_EVERY_S = 0.5  # at most one progress message per stage and shard this often
# the driver's receiver of in-shard progress when tasks run in its own process (SyncExecutor)
_local_progress: Callable[[str, int, int], None] | None = None


@dataclass
class ProgressSender:
    """``ctx.progress`` of one stage on one shard: to the driver's receiver in this process, or as
    a Dask worker event (topic ``morphset-progress``) the driver subscribes to; batched to one
    message per ``every_s`` seconds. Progress is advisory: a lost message costs a bar's smoothness."""

    stage: str
    shard: int
    every_s: float = 0.5
    _pending: int = 0
    _last: float = 0.0

    def __call__(self, n: int) -> None:
        self._pending += int(n)
        now = time.perf_counter()
        if now - self._last < self.every_s:
            return
        self._last, n, self._pending = now, self._pending, 0
        if _local_progress is not None:
            _local_progress(self.stage, self.shard, n)
            return
        try:
            from distributed import get_worker

            get_worker().log_event(PROGRESS_TOPIC, (self.stage, self.shard, n))
        except (ImportError, ValueError):  # not inside a Dask worker: nobody to tell
            pass


class SyncExecutor:
    """Every task in this process, one after another (``--scheduler sync``, tests, debugging)."""

    retries = 0  # a stage that fails here fails at once (the Dask executor's tasks try again)

    def on_progress(self, receiver: Callable[[str, int, int], None] | None) -> None:
        """Receive ``(stage, shard, rows)`` as stages progress within a shard (None: stop)."""
        global _local_progress
        _local_progress = receiver

    def execute(self, task: ShardTask, chains: dict[int, list[tuple[str, ...]]]) -> Generator[Outcome]:
        for i, groups in chains.items():
            stopped = False
            for g in groups:
                if stopped:
                    yield from (Outcome(s, i, blocked=True) for s in g)
                    continue
                t0 = time.perf_counter()
                entries = task(g, i)
                yield from outcomes(entries, i, t0, time.perf_counter())
                stopped = _stopped(entries)


@dataclass
class StageStats:
    submitted: int = 0
    computed: int = 0
    skipped: int = 0
    failed: int = 0
    blocked: int = 0  # not run because an upstream shard failed
    images: int = 0
    task_seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system CPU of the worker processes while they ran the tasks
    computed_images: int = 0  # images of the shards computed (not skipped) in this build
    decodes: int | None = None  # images this stage decoded itself (None: a stage that reads no pixels)
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
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_ms_per_image": round(1000 * self.cpu_seconds / self.computed_images, 2)
            if self.computed_images
            else None,
            "wall_seconds": round(wall, 3),
            **({"decodes": self.decodes} if self.decodes is not None else {}),
            "images_per_second_per_worker": round(self.images / self.task_seconds, 2)
            if self.task_seconds
            else None,
            "errors": self.errors[:20],
        }


def segments(stages: list[str]) -> list[list[str]]:
    """Split the stage list before every stage that needs all shards of the previous ones."""
    segs: list[list[str]] = []
    for s in stages:
        if not segs or STAGES[s].global_input:
            segs.append([s])
        else:
            segs[-1].append(s)
    return segs


# Errors of the output's file system: nothing else can be written either, so the build stops.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM})


class StorageFault(OSError):
    """The run's storage refused a write (full, read-only, no permission): the build stops."""


def storage_fault(exc: BaseException) -> StorageFault | None:
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return StorageFault(exc.errno, exc.strerror or os.strerror(exc.errno), exc.filename)
    return None


def record_failure(run: Run, manifest: Manifest, outcome: Outcome, stats: StageStats) -> None:
    """Mark the shard failed (traceback kept in ``_meta/<stage>/part-NNNNN.failed.json``); it stays not done."""
    exc = outcome.error
    try:
        fp = shard_fingerprint(run, manifest, outcome.stage, outcome.shard) or ""
        run.store(outcome.stage).mark_failed(
            outcome.shard, fp, f"{type(exc).__name__}: {exc}", outcome.traceback
        )
    except OSError as marker_exc:  # e.g. a full disk: the failure is still reported below
        log.warning(
            "%s/%05d: could not write its failure marker (%s)", outcome.stage, outcome.shard, marker_exc
        )
    stats.failed += 1
    stats.errors.append(f"{outcome.stage}/{outcome.shard:05d}: {type(exc).__name__}: {exc}")


def run_stages(
    run: Run,
    manifest: Manifest,
    stages: list[str],
    executor: Executor,
    mode: str = "resume",
    progress: bool = True,
    assets: dict[str, dict[str, Asset]] | None = None,
) -> dict:
    """Run ``stages`` (data-flow order, ingest excluded) over all committed index shards."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    for s in stages:  # a setting naming a table a stage cannot read fails before any work
        input_tables(s, manifest)
    shards = run.shards()
    if not shards:
        raise FileNotFoundError(f"{run.url}: no index shards; run `morphset ingest` first")
    run.remove_temporaries(["ingest", *stages])  # left by a killed run; nothing writes now
    if mode == "overwrite":
        for s in stages:
            run.store(s).clear()
    verified = verify_committed(run, stages) if manifest.get("execution.verify_committed", True) else None
    if assets is None:
        assets = resolve_assets(manifest, stages)
    task = ShardTask(manifest, run.url, run.storage_options, assets, int(getattr(executor, "retries", 0)))
    stats = {s: StageStats() for s in stages}
    failed: set[tuple[str, int]] = set()
    t_build = time.perf_counter()
    for segment in segments(stages):
        head = STAGES[segment[0]]
        if head.global_input:
            head.prepare(
                StageTables(run, head.name, input_tables(head.name, manifest)),
                config_view(manifest, head.name),
            )
        plan = planner.plan(run, manifest, segment, shards)
        for s in segment:
            stats[s].skipped += sum(1 for i in shards if i not in plan or s not in plan[i])
            stats[s].submitted = sum(s in todo for todo in plan.values())
        _run_plan(run, manifest, segment, plan, executor, task, stats, failed, progress)
        for s in segment:
            if not any(stage == s for stage, _ in failed):
                STAGES[s].finish(run, config_view(manifest, s))
    wall = time.perf_counter() - t_build
    images = max((st.images for st in stats.values()), default=0)
    return {
        "run": run.url,
        "stages": {s: st.as_dict() for s, st in stats.items()},
        "wall_seconds": round(wall, 3),
        "images_per_second": round(images / wall, 2) if wall and images else None,
        "decodes_per_image": decodes_per_image(stats),
        "verified": verified,
        "failed_shards": sorted(f"{s}/{i:05d}" for s, i in failed),
    }


def verify_committed(run: Run, stages: list[str]) -> dict:
    """Hash every committed shard of ``stages`` against its sidecar before planning: a shard that
    no longer matches (a flipped byte keeps the size a plan's ``stat`` compares) is named,
    invalidated and so recomputed by this build, never declared done. Costs one read of the
    stages' files (docs/reliability.md: ~1 s per GB of sha256 on one core, plus the reading);
    ``execution.verify_committed: false`` skips it (then only a size change is caught here)."""
    t0 = time.perf_counter()
    result = run.check_committed(stages)
    for c in result["corrupt"]:
        log.warning("%s: %s; invalidated, this build recomputes it", c["path"], c["why"])
    return {
        "shards": sum(st["verified"] + len(st["corrupt"]) for st in result["stages"].values()),
        "bytes": result["bytes"],
        "seconds": round(time.perf_counter() - t0, 3),
        "invalidated": [f"{c['stage']}/{c['shard']:05d}" for c in result["corrupt"]],
    }


def decodes_per_image(stats: dict[str, StageStats]) -> float | None:
    """Decodes this build did per image it computed, over the stages that read pixels (1.0 when
    detect, landmarks, embed and crop share one decode per image; None if none of them ran)."""
    pixel = [st for st in stats.values() if st.decodes is not None]
    images = max((st.computed_images for st in pixel), default=0)
    return round(sum(st.decodes or 0 for st in pixel) / images, 3) if images else None


def _run_plan(
    run: Run,
    manifest: Manifest,
    segment: list[str],
    plan: dict[int, list[str]],
    executor: Executor,
    task: ShardTask,
    stats: dict[str, StageStats],
    failed: set[tuple[str, int]],
    progress: bool,
) -> None:
    tty = progress and sys.stderr.isatty()
    # bars count images and move within a shard (stages report rows as they finish them)
    shard_images = _shard_images(run, plan) if tty else {}
    bars = {
        s: tqdm(
            total=sum(shard_images.get(i, 0) for i, todo in plan.items() if s in todo),
            desc=f"{s:>9}",
            unit="img",
            disable=not tty,
            leave=True,
            dynamic_ncols=True,
        )
        for s in segment
    }
    counted: dict[tuple[str, int], int] = {}
    lock = threading.Lock()

    def advance(stage: str, shard: int, n: int | None) -> None:
        """Move ``stage``'s bar by ``n`` rows of ``shard`` (None: the rest of it), never past it."""
        with lock:
            have = counted.get((stage, shard), 0)
            total = shard_images.get(shard, 0)
            step = max(min(total - have if n is None else n, total - have), 0)
            counted[(stage, shard)] = have + step
            if stage in bars and step:
                bars[stage].update(step)

    receiver = getattr(executor, "on_progress", None)
    if tty and receiver is not None:
        receiver(advance)
    # stderr not a terminal (Slurm, nohup, CI): a line per shard instead of bars
    lines = {s: ProgressLog(s, stats[s].submitted, enabled=progress and is_batch()) for s in segment}
    stream = executor.execute(task, {i: fuse(todo) for i, todo in plan.items()})
    try:
        for out in stream:
            st = stats[out.stage]
            shard = f"part-{out.shard:05d}"
            if out.started is not None:
                st.first_start = min(st.first_start or out.started, out.started)
            if out.blocked:
                st.blocked += 1
                advance(out.stage, out.shard, None)
                lines[out.stage].update(what=f"{shard} not run (an earlier stage failed)")
            elif out.error is not None:
                fault = storage_fault(out.error)
                if fault is not None:
                    raise fault from out.error  # stops the executor (Dask futures are cancelled)
                committed = _committed(run, manifest, out)
                if committed is not None:  # the work was done and committed; only its report was lost
                    st.last_end = time.perf_counter()
                    _record(st, {**committed, "skipped": True}, bars[out.stage])
                    advance(out.stage, out.shard, None)
                    lines[out.stage].update(what=f"{shard} committed")
                    continue
                record_failure(run, manifest, out, st)
                failed.add((out.stage, out.shard))
                advance(out.stage, out.shard, None)
                lines[out.stage].update(what=f"{shard} FAILED: {type(out.error).__name__}")
            else:
                st.last_end = out.ended or time.perf_counter()
                result = out.result or {}
                _record(st, result, bars[out.stage])
                advance(out.stage, out.shard, None)
                lines[out.stage].update(
                    images=int(result.get("images", result.get("rows", 0))),
                    failures=sum((result.get("failures") or {}).values()),
                    what=f"{shard} committed",
                )
    finally:
        stream.close()  # an executor cancels what is still running (Ctrl-C, a storage fault)
        if tty and receiver is not None:
            receiver(None)
        for b in bars.values():
            b.close()


def _shard_images(run: Run, plan: dict[int, list[str]]) -> dict[int, int]:
    """Images per planned shard, from the index sidecars (what the bars count)."""
    store = run.store("ingest")
    out = {}
    for i in plan:
        sc = store.sidecar(i) or {}
        out[i] = int(sc.get("images", sc.get("rows", 0)))
    return out


def _committed(run: Run, manifest: Manifest, out: Outcome) -> dict | None:
    """The sidecar of a shard a failed task had committed after all for its current inputs and
    parameters (a worker or the scheduler lost after the commit), else None."""
    try:
        fp = shard_fingerprint(run, manifest, out.stage, out.shard)
        store = run.store(out.stage)
        return store.sidecar(out.shard) if fp is not None and store.is_done(out.shard, fp) else None
    except (OSError, ValueError):
        return None


def _record(stats: StageStats, result: dict, bar: Any) -> None:
    stats.images += int(result.get("images", result.get("rows", 0)))
    if result.get("skipped"):
        stats.skipped += 1
    else:
        stats.computed += 1
        stats.task_seconds += float(result.get("seconds", 0.0))
        stats.cpu_seconds += float(result.get("cpu_seconds", 0.0))
        stats.computed_images += int(result.get("images", result.get("rows", 0)))
        if "decodes" in result:
            stats.decodes = (stats.decodes or 0) + int(result["decodes"])
    bar.set_postfix(shards=stats.computed + stats.skipped, refresh=False)
