"""morphset's Python API: what every command does, callable from Python.

The commands (``pipeline/commands/``) are argparse wrappers around these functions; the demo,
the benchmarks and the tests call them too. Every function resolves its manifest through
:func:`pipeline.config.resolve.resolve` (schema defaults < manifest file < ``RUN/run.json`` <
arguments), so a later call on a run needs no arguments beyond the run.

>>> from pipeline.api import build, status
>>> report = build("runs/demo", dataset="synthetic", root="runs/demo/synthetic", landmarks="dlib")
>>> report.stages["fit"].computed, report.ok
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.manifest import Manifest
from pipeline.config.resolve import DatasetChoice, Resolved, resolve
from pipeline.storage.run import Run, RunError, require_local

__all__ = [
    "BuildReport",
    "StageReport",
    "build",
    "evaluate",
    "ingest",
    "run_stages",
    "status",
    "synth",
    "train",
]


@dataclass
class StageReport:
    """Per-stage counts of one build."""

    submitted: int
    computed: int
    skipped: int
    failed: int
    blocked: int
    images: int
    task_seconds: float
    wall_seconds: float
    images_per_second_per_worker: float | None
    errors: list[str]
    cpu_ms_per_image: float | None = None  # user + system CPU of the workers per computed image
    decodes: int | None = None  # images this stage decoded itself (None: it reads no pixels)

    @classmethod
    def from_dict(cls, d: dict) -> StageReport:
        return cls(
            d["shards_submitted"],
            d["shards_computed"],
            d["shards_skipped"],
            d["shards_failed"],
            d["shards_blocked"],
            d["images"],
            d["task_seconds"],
            d["wall_seconds"],
            d["images_per_second_per_worker"],
            list(d["errors"]),
            d.get("cpu_ms_per_image"),
            d.get("decodes"),
        )


@dataclass
class BuildReport:
    """What a build did: per-stage counts, ingest's scan, throughput, failures, and the run's status."""

    run: str
    stages: dict[str, StageReport]
    wall_seconds: float
    images_per_second: float | None
    failed_shards: list[str]
    ingest: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the report.json document
    # decodes per computed image over the stages that read pixels (1.0 = one decode per image)
    decodes_per_image: float | None = None

    @property
    def ok(self) -> bool:
        return not self.failed_shards

    def to_dict(self) -> dict[str, Any]:
        return self.raw

    @classmethod
    def from_dict(cls, d: dict) -> BuildReport:
        return cls(
            d["run"],
            {s: StageReport.from_dict(v) for s, v in d["stages"].items()},
            d["wall_seconds"],
            d["images_per_second"],
            list(d["failed_shards"]),
            d.get("ingest", {}),
            d.get("status", {}),
            d,
            d.get("decodes_per_image"),
        )


def _migrate(r: Run) -> None:
    """Move a run of an older layout into the current one (every stage folder)."""
    from pipeline.core.registry import BUILD_ORDER

    r.migrate_layout(BUILD_ORDER)


def _execution_flags(scheduler: str | None, workers: int | None) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    if scheduler:
        flags["execution.scheduler"] = scheduler
    if workers is not None:
        flags["execution.n_workers"] = workers
    return flags


def _resolve_build(
    run: Run,
    manifest: str | None,
    overrides: list[str] | dict[str, Any] | None,
    flags: dict[str, Any],
    choice: DatasetChoice,
    mode: str,
) -> Resolved:
    if mode not in ("resume", "overwrite", "extend"):
        raise ValueError(f"mode: expected resume, overwrite or extend, got {mode!r}")
    return resolve(run, manifest, overrides, flags, choice, mode)


def ingest(
    run: str | os.PathLike,
    dataset: str | None = None,
    root: str | None = None,
    list_file: str | None = None,
    shard_size: int | None = None,
    mode: str = "resume",
    overrides: list[str] | dict[str, Any] | None = None,
    manifest: str | None = None,
    storage_options: dict | None = None,
) -> Any:
    """Scan a dataset into ``RUN/ingest`` index shards; returns :class:`pipeline.ingest.stage.IngestResult`."""
    from pipeline.ingest.stage import run_ingest

    r = Run(run, storage_options)
    _migrate(r)
    res = _resolve_build(
        r, manifest, overrides, {}, DatasetChoice(dataset, root, list_file, None, shard_size), mode
    )
    with r.lock("ingest"):
        result = run_ingest(res.manifest, r.url, res.dataset, mode=mode, storage_options=storage_options)
        r.write_record(res.record)
    return result


@contextlib.contextmanager
def _executor(m: Manifest, stages: list[str], assets: dict | None = None) -> Iterator[tuple[Any, dict]]:
    """(executor, verified assets): model files resolved on the driver (unless ``assets`` already
    are), then the cluster opened — both before any work, so a missing model or an unreachable
    scheduler costs nothing."""
    from dags.build import DaskExecutor
    from dags.cluster import open_client
    from pipeline.core.registry import config_view, get_stage
    from pipeline.core.runner import SyncExecutor, resolve_assets

    assets = resolve_assets(m, stages) if assets is None else assets
    gpu_stages = set(m.get("execution.gpu_stages", []) or [])
    resources = {
        s: ({"GPU": 1} if s in gpu_stages else get_stage(s).resources_for(config_view(m, s))) for s in stages
    }
    with open_client(m) as client:
        if client is None:
            yield SyncExecutor(), assets
        else:
            wait = float(m.get("execution.no_worker_timeout_s", 120) or 120)
            yield DaskExecutor(client, int(m.get("execution.retries", 2)), resources, wait), assets


def _run_with_executor(r: Run, m: Manifest, stages: list[str], mode: str, progress: bool) -> dict:
    from pipeline.core.runner import run_stages as run_planned

    with _executor(m, stages) as (executor, assets):
        return run_planned(r, m, stages, executor, mode=mode, progress=progress, assets=assets)


def run_stages(
    run: str | os.PathLike,
    stages: list[str],
    mode: str = "resume",
    overrides: list[str] | dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    manifest: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Run some stages (after ingest) over a run's shards; returns the report dict."""
    r = Run(run, storage_options)
    _migrate(r)
    if r.read_record() is None and not r.shards():
        raise FileNotFoundError(f"{r.url}: no index shards; run `morphset ingest` first")
    res = resolve(r, manifest, overrides, {**(flags or {}), **_execution_flags(scheduler, workers)})
    stage_mode = "resume" if mode == "extend" else mode
    with r.lock(f"{'+'.join(stages)}"):
        r.write_record(res.record)
        return _run_with_executor(r, res.manifest, stages, stage_mode, progress)


def build(
    run: str | os.PathLike,
    dataset: str | None = None,
    root: str | None = None,
    list_file: str | None = None,
    until: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    *,
    landmarks: str | None = None,
    shard_size: int | None = None,
    mode: str = "resume",
    workers: int | None = None,
    manifest: str | None = None,
    storage_options: dict | None = None,
) -> BuildReport:
    """ingest -> detect -> landmarks -> embed -> fit -> export over a run (resumable); writes ``RUN/report.json``.

    A later ``build(run)`` uses what the run remembers (``run.json``); another dataset, root or
    list file is refused (:class:`pipeline.storage.run.RunError`) unless ``mode="overwrite"``."""
    from pipeline.core.registry import BUILD_ORDER
    from pipeline.ingest.stage import run_ingest

    until = until or BUILD_ORDER[-1]
    if until not in BUILD_ORDER[1:]:
        raise ValueError(f"until: expected one of {BUILD_ORDER[1:]}, got {until!r}")
    r = Run(run, storage_options)
    _migrate(r)
    res = _resolve_build(
        r,
        manifest,
        overrides,
        _execution_flags(scheduler, workers),
        DatasetChoice(dataset, root, list_file, landmarks, shard_size),
        mode,
    )
    m = res.manifest
    stages = BUILD_ORDER[1 : BUILD_ORDER.index(until) + 1]
    from pipeline.core.runner import resolve_assets, verify_committed
    from pipeline.core.runner import run_stages as run_planned

    # the models first: a build refused over a model leaves no run folder behind
    verified_assets = resolve_assets(m, stages)
    with r.lock("build"), _executor(m, stages, verified_assets) as (executor, assets):
        if mode != "overwrite" and m.get("execution.verify_committed", True):
            verify_committed(r, ["ingest"])  # a damaged index shard is written again by the ingest below
        ing = run_ingest(m, r.url, res.dataset, mode=mode, storage_options=storage_options, progress=progress)
        r.write_record(res.record)
        stage_mode = "resume" if mode == "extend" else mode
        report = run_planned(r, m, stages, executor, mode=stage_mode, progress=progress, assets=assets)
        report = _finish_report(r, m, ing, report)
    return BuildReport.from_dict(report)


def _finish_report(r: Run, m: Manifest, ing: Any, report: dict) -> dict:
    from pipeline.core.status import run_status

    report["ingest"] = {
        "images": ing.images,
        "subjects": ing.subjects,
        "shards_written": len(ing.shards_written),
        "shards_unchanged": len(ing.shards_skipped),
        "failures": ing.failures,
        "warnings": ing.warnings,
    }
    report["status"] = run_status(r, m)
    r.write_json("report.json", report)
    return report


def status(
    run: str | os.PathLike,
    overrides: list[str] | dict[str, Any] | None = None,
    manifest: str | None = None,
    storage_options: dict | None = None,
) -> dict[str, dict]:
    """Per stage: shards done / pending / failed, rows, failures by reason, images/s."""
    from pipeline.core.status import run_status

    r = Run(run, storage_options)
    _migrate(r)
    if not r.exists():
        raise FileNotFoundError(f"{r.url}: no such run")
    return run_status(r, resolve(r, manifest, overrides).manifest)


def overlap(
    train_run: str | os.PathLike,
    eval_run: str | os.PathLike,
    threshold: float = 0.5,
    out: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> Any:
    """Training subjects whose face-embedding centre lies within ``threshold`` of an evaluation
    subject's (:mod:`pipeline.embed.overlap`); with ``out``, the list is written there as CSV
    (``morphset export --exclude-subjects`` takes it). Returns an ``Overlap``."""
    from pipeline.core.tables import RunTables
    from pipeline.embed.overlap import find_overlap, subject_centres, write_csv
    from pipeline.fit.stage import screening_from_params

    centres = []
    for where in (train_run, eval_run):
        r = Run(where, storage_options)
        if not r.exists():
            raise FileNotFoundError(f"{r.url}: no such run")
        m = resolve(r).manifest
        centres.append(subject_centres(RunTables(r, m), screening_from_params(m.stage_params("fit"))))
    result = find_overlap(centres[0], centres[1], float(threshold))
    if out is not None:
        write_csv(result, str(out))
    return result


def verify(run: str | os.PathLike, storage_options: dict | None = None) -> dict[str, Any]:
    """Check every committed shard's data file against the size and sha256 in its sidecar. A
    corrupt shard is invalidated (its sidecar removed), so the next build recomputes it. A run on
    read-only storage is checked all the same, and reported (``read_only``) without invalidating."""
    import contextlib
    import errno

    from pipeline.core.registry import BUILD_ORDER

    r = Run(run, storage_options)
    if not r.exists():
        raise FileNotFoundError(f"{r.url}: no such run")
    out: dict[str, Any] = {"run": r.url, "stages": {}, "corrupt": [], "read_only": False}
    with contextlib.ExitStack() as stack:
        try:
            _migrate(r)
            stack.enter_context(r.lock("verify"))
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            out["read_only"] = True  # nothing can be invalidated: checked and reported only
        checked = r.check_committed(BUILD_ORDER, invalidate=not out["read_only"])
        out["stages"], out["corrupt"] = checked["stages"], checked["corrupt"]
    return out


def synth(
    out: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    manifest: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Render a synthetic dataset (``stages.synth`` keys as keyword arguments); returns its summary."""
    from pipeline.synthetic.synth import synthesize

    flags = {f"stages.synth.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    if out is not None:
        flags["stages.synth.out"] = require_local(out, "morphset synth --out")
    m = resolve(None, manifest, overrides, flags).manifest
    return synthesize(m)


def train(
    run: str | os.PathLike,
    out: str | os.PathLike | None = None,
    tiny: bool = False,
    config: str | None = None,
    epochs: str | dict[str, int] | None = None,
    resume: bool = False,
    overrides: list[str] | dict[str, Any] | None = None,
    manifest: str | None = None,
    print_config: bool = False,
    objective: str | None = None,
) -> Any:
    """Train the encoder-decoder on ``RUN/export``; returns :class:`pipeline.train.loop.TrainResult`
    (or, with ``print_config``, the effective ``stages.train`` parameters). ``objective``: liu,
    genova or liu+genova (``stages.train.objective``).

    Precedence: manifest < ``tiny`` < ``config`` file < ``overrides`` (``stages.train.*``) < ``epochs``."""
    from pipeline.train.config import parse_epochs, resolve_params

    r = Run(run)
    if "://" in r.url and out is None:
        # checkpoints are written with torch to a local folder; never one named after the URL
        raise RunError(
            f"{r.url}: train reads the export through fsspec but writes its checkpoints to a local "
            "folder: give --out DIR"
        )
    _migrate(r)
    res = resolve(r, manifest, overrides)
    flags = parse_epochs(epochs) if isinstance(epochs, str) else dict(epochs or {})
    if objective is not None:
        flags["objective"] = objective
    train_sets = {k: v for k, v in res.new_overrides.items() if k.startswith("stages.train.")}
    out_dir = Path(require_local(out, "morphset train --out")) if out else Path(r.url) / "train"
    saved = out_dir / "config.json"
    if resume and not (tiny or config or train_sets or flags) and saved.is_file():
        # a resumed run continues with the settings it started with (--tiny and all): nothing to repeat
        params = json.loads(saved.read_text(encoding="utf-8"))
    else:
        params = resolve_params(res.manifest, tiny, config, train_sets, flags)
    if print_config:
        return params
    if not r.exists():
        raise FileNotFoundError(f"{r.url}: run directory not found")
    from pipeline.train.loop import resolve_model
    from pipeline.train.loop import train as train_loop

    identity = None
    if params.get("objective", "liu") != "liu":  # Genova's identity loss: dlib's face network, verified
        from pipeline.embed.dlib_resnet import resolve_model as resolve_identity_net

        identity = resolve_identity_net(res.manifest.get("models.dlib_embedding") or {})[0]
    return train_loop(
        r.url, params, resolve_model(res.manifest), out_dir, resume=resume, identity_weights=identity
    )


def config(
    run: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    manifest: str | None = None,
    key: str | None = None,
) -> Any:
    """The effective manifest (or one dotted ``key`` of it) as commands resolve it: the packaged
    defaults < ``manifest`` < what ``run`` remembers < ``overrides``."""
    from pipeline.config.manifest import ManifestError

    r = Run(run) if run is not None else None
    if r is not None and not r.exists():
        raise FileNotFoundError(f"{r.url}: run directory not found")
    data = resolve(r, manifest, overrides).manifest.data
    if key is None:
        return data
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ManifestError(f"{key}: no such key in the effective manifest (at {part!r})")
        node = node[part]
    return node


def evaluate(
    run: str | os.PathLike,
    ground_truth: str | None = None,
    pairs: str | None = None,
    encoder: str | list[str] | None = None,
    genova: bool | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    manifest: str | None = None,
) -> Path | str:
    """Measure a run (verification, 3D error, fit quality); returns the path of ``RUN/eval/report.html``
    (its URL for a run at an fsspec URL). ``encoder``: a trained encoder, or a list of them (the
    report compares them side by side)."""
    from pipeline.evaluate.run import evaluate_run

    flags: dict[str, Any] = {}
    for key, value in (("ground_truth", ground_truth), ("pairs", pairs)):
        if value is not None:
            flags[f"stages.evaluate.{key}"] = require_local(
                value, f"morphset evaluate --{key.replace('_', '-')}"
            )
    if encoder is not None:
        given = [encoder] if isinstance(encoder, (str, os.PathLike)) else list(encoder)
        paths = [require_local(str(e), "morphset evaluate --encoder") for e in given]
        flags["stages.evaluate.encoder"] = paths[0] if len(paths) == 1 else paths
    if genova is not None:
        flags["stages.evaluate.genova"] = bool(genova)
    r = Run(run)
    _migrate(r)
    res = resolve(r, manifest, overrides, flags)
    m = res.manifest
    params = m.stage_params("evaluate")
    if not params.get("pairs") and res.dataset in m.data["datasets"]:
        # the dataset's own protocol (LFW pairs.txt) rather than generated pairs
        params["pairs"] = m.dataset(res.dataset).get("pairs") or None
    trained = Path(r.url) / "train"
    if "://" not in r.url and not params.get("encoder") and (trained / "export" / "encoder.json").is_file():
        params["encoder"] = str(trained)  # the run's own trained encoder
    if not params.get("ground_truth") and res.dataset in m.data["datasets"]:
        # a synthetic dataset's truth lies under its own root: nothing to repeat on the command line
        root = m.dataset(res.dataset).get("root")
        if root and "://" not in str(root) and (Path(root) / "ground_truth.parquet").is_file():
            params["ground_truth"] = str(Path(root) / "ground_truth.parquet")
    return evaluate_run(r.url, m, params, r.storage_options)
