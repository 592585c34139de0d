"""Options and helpers shared by the commands. Commands parse arguments, call :mod:`pipeline.api`
and print; they resolve no manifest and run no stage themselves."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or less is refused, never replaced by a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_run_argument(p: argparse.ArgumentParser, required: bool = False) -> None:
    if required:
        p.add_argument("run", help="run directory or fsspec URL")
    else:
        p.add_argument(
            "run", nargs="?", default=None, help="run directory or fsspec URL (default: manifest output_root)"
        )


def add_execution_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=["resume", "overwrite", "extend"],
        default="resume",
        help="resume: skip shards already done for the current inputs and parameters; overwrite: redo all "
        "(and allow another dataset or root than the run remembers); extend (ingest/build): add shards for "
        "new subjects, leave existing shards untouched",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="tcp://host:8786 joins an existing Dask cluster; 'sync' runs in this process; "
        "default (execution.scheduler = null) starts a LocalCluster",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="LocalCluster worker processes (default: one per core)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_location(args: argparse.Namespace) -> str:
    """The run argument, or the manifest's output_root when it is omitted."""
    if args.run:
        return args.run
    from pipeline.config.manifest import load_manifest

    return load_manifest(args.manifest).data["output_root"]


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=1, ensure_ascii=False, default=str))


def print_report(report: dict) -> None:
    ing = report.get("ingest")
    if ing:
        print(
            f"   ingest: {ing['images']} files of {ing['subjects']} subjects; shards written "
            f"{ing.get('shards_written', 0)}, unchanged {ing.get('shards_unchanged', 0)}"
        )
        for w in ing.get("warnings", []):
            print(f"           warning: {w}")
    for s, st in report["stages"].items():
        ips = st["images_per_second_per_worker"]
        print(
            f"{s:>9}: computed {st['shards_computed']}, already done {st['shards_skipped']}, failed {st['shards_failed']}"
            + (f", blocked {st['shards_blocked']}" if st["shards_blocked"] else "")
            + (f"; {st['images']} images, {ips} images/s per worker" if ips else "")
        )
        fails = report.get("status", {}).get(s, {}).get("failures", {})
        if fails:  # by reason, over the run's committed shards (identity_outlier, no_face, ...)
            print("           images by reason: " + ", ".join(f"{k}={v}" for k, v in fails.items()))
        for e in st["errors"]:
            print(f"           {e}", file=sys.stderr)
    if report.get("images_per_second"):
        print(f"throughput: {report['images_per_second']} images/s over {report['wall_seconds']} s")
    if report["failed_shards"]:
        print(
            f"FAILED shards: {', '.join(report['failed_shards'])} (tracebacks in RUN/_meta/<stage>/part-NNNNN.failed.json)",
            file=sys.stderr,
        )
