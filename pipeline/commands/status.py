"""``morphset status``: per-stage progress of a run."""

from __future__ import annotations

import argparse

from pipeline.commands._common import add_run_argument, print_json
from pipeline.config.manifest import load_manifest, parse_override
from pipeline.core.status import format_status, load_run_manifest, run_status

HELP = "per stage: shards done/pending/failed, rows, failures by reason, images/s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    m = load_run_manifest(args.run) if args.run and not args.manifest else None
    if m is None:
        m = load_manifest(args.manifest, args.overrides)
    elif args.overrides:
        m = m.with_overrides(dict(parse_override(o) for o in args.overrides))
    root = args.run or m.data["output_root"]
    st = run_status(m, root)
    if args.json:
        print_json(st)
    else:
        print(f"run {root}")
        print(format_status(st))
    return 0
