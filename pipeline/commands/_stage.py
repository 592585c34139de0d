"""The shared body of the per-stage commands (detect, landmarks, fit, export)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.commands._common import (
    add_execution_arguments,
    add_run_argument,
    print_json,
    print_report,
    run_location,
)


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    add_execution_arguments(p)
    p.add_argument("--json", action="store_true", help="print the stage report as JSON")


def run_stage_command(
    args: argparse.Namespace, stages: list[str], extra: dict[str, Any] | None = None
) -> int:
    from pipeline import api

    report = api.run_stages(
        run_location(args),
        stages,
        mode=args.mode,
        overrides=args.overrides,
        flags=extra,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
        manifest=args.manifest,
    )
    if args.json:
        print_json(report)
    else:
        print_report(report)
    return 1 if report["failed_shards"] else 0
