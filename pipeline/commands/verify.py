"""``morphset verify``: check every committed shard of a run against its sidecar."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands._common import add_run_argument, print_json, run_location

HELP = "check every committed shard's size and sha256 against its sidecar; corrupt shards are recomputed by the next build"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from pipeline import api

    result = api.verify(run_location(args))
    if args.json:
        print_json(result)
    else:
        for stage, st in result["stages"].items():
            print(f"{stage:>9}: {st['verified']} shard(s) verified, {len(st['corrupt'])} corrupt")
        done = (
            "read-only run: not invalidated; a build on writable storage recomputes it"
            if result["read_only"]
            else "invalidated: the next build recomputes it"
        )
        for c in result["corrupt"]:
            print(f"corrupt: {c['path']}: {c['why']} ({done})", file=sys.stderr)
    return 1 if result["corrupt"] else 0
