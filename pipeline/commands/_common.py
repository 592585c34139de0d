"""Options and helpers shared by the run-level commands (ingest, stages, build, status)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.config.manifest import Manifest, load_manifest


def add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", nargs="?", default=None, help="run directory or fsspec URL (default: manifest output_root)"
    )


def add_execution_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=["resume", "overwrite", "extend"],
        default="resume",
        help="resume: skip shards already done for the current inputs and parameters; overwrite: redo all; "
        "extend (ingest/build): add shards for new subjects, leave existing shards untouched",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="tcp://host:8786 joins an existing Dask cluster; 'sync' runs in this process; "
        "default (execution.scheduler = null) starts a LocalCluster",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="LocalCluster worker processes (default: one per core)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def manifest_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Manifest:
    """The manifest with --set overrides, then command-specific shorthands (which win)."""
    m = load_manifest(args.manifest, args.overrides)
    shorthands = dict(extra or {})
    if getattr(args, "scheduler", None):
        shorthands["execution.scheduler"] = args.scheduler
    if getattr(args, "workers", None):
        shorthands["execution.n_workers"] = args.workers
    return m.with_overrides(shorthands) if shorthands else m


def run_root(args: argparse.Namespace, manifest: Manifest) -> str:
    return args.run or manifest.data["output_root"]


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=1, ensure_ascii=False, default=str))
