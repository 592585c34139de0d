"""The shared body of the per-stage commands (detect, landmarks, fit, export)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.commands._common import (
    add_execution_arguments,
    add_run_argument,
    manifest_from_args,
    print_json,
    run_root,
)
from pipeline.core.stage import STAGES
from pipeline.core.status import load_run_manifest, save_run_manifest


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    add_execution_arguments(p)
    p.add_argument("--json", action="store_true", help="print the stage report as JSON")


def stage_manifest(args: argparse.Namespace, extra: dict[str, Any] | None = None):  # noqa: ANN201
    """The run's remembered manifest (RUN/run.json) unless --manifest is given, plus overrides."""
    if args.run and not args.manifest:
        remembered = load_run_manifest(args.run)
        if remembered is not None:
            from pipeline.config.manifest import parse_override

            over = dict(parse_override(o) for o in args.overrides)
            if args.scheduler:
                over["execution.scheduler"] = args.scheduler
            if args.workers:
                over["execution.n_workers"] = args.workers
            over.update(extra or {})
            return remembered.with_overrides(over) if over else remembered
    return manifest_from_args(args, extra)


def run_stage_command(
    args: argparse.Namespace, stages: list[str], extra: dict[str, Any] | None = None
) -> int:
    from dags.build import run_stages
    from dags.cluster import open_client

    for s in stages:
        STAGES[s].function  # noqa: B018  (fail early on an unknown stage)
    m = stage_manifest(args, extra)
    root = run_root(args, m)
    preflight(m, stages)
    save_run_manifest(m, root)
    with open_client(m) as client:
        report = run_stages(m, root, stages, client, mode=args.mode, progress=not args.no_progress)
    if args.json:
        print_json(report)
    else:
        print_report(report)
    return 1 if report["failed_shards"] else 0


def preflight(manifest: Any, stages: list[str]) -> None:
    """Fail before any work when a stage's assets are missing (e.g. FAN weights)."""
    import importlib

    for s in stages:
        mod = importlib.import_module(STAGES[s].func.split(":")[0])
        check = getattr(mod, "preflight", None)
        if check is not None:
            check(manifest)


def print_report(report: dict) -> None:
    for s, st in report["stages"].items():
        ips = st["images_per_second_per_worker"]
        print(
            f"{s:>9}: computed {st['shards_computed']}, already done {st['shards_skipped']}, failed {st['shards_failed']}"
            + (f", blocked {st['shards_blocked']}" if st["shards_blocked"] else "")
            + (f"; {st['images']} images, {ips} images/s per worker" if ips else "")
        )
        for e in st["errors"]:
            print(f"           {e}", file=sys.stderr)
    if report.get("images_per_second"):
        print(f"throughput: {report['images_per_second']} images/s over {report['wall_seconds']} s")
    if report["failed_shards"]:
        print(
            f"FAILED shards: {', '.join(report['failed_shards'])} (tracebacks in <stage>/part-NNNNN.failed.json)",
            file=sys.stderr,
        )
