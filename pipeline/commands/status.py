"""``morphset status``: per-stage progress of a run."""

from __future__ import annotations

import argparse

from pipeline.commands._common import add_run_argument, print_json, run_location

HELP = "per stage: shards done/pending/failed, rows, failures by reason, images/s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from pipeline import api
    from pipeline.core.status import format_status

    location = run_location(args)
    st = api.status(location, overrides=args.overrides, manifest=args.manifest)
    if args.json:
        print_json(st)
    else:
        print(f"run {location}")
        print(format_status(st))
    return 0
