"""``morphset build``: ingest -> detect -> landmarks -> fit -> export as Dask task graphs."""

from __future__ import annotations

import argparse

from pipeline.commands._common import (
    add_execution_arguments,
    add_run_argument,
    positive_int,
    print_json,
    print_report,
    run_location,
)
from pipeline.core.registry import BUILD_ORDER

HELP = "the main job: ingest -> detect -> landmarks -> fit -> export over shards on Dask (resumable)"
DESCRIPTION = (
    "Build a training set from datasets.<name>: one Dask task per shard per stage on a LocalCluster sized to "
    "this machine (or --scheduler tcp://host:8786). Only pending shards are computed; a killed build resumes "
    "where it stopped. The run remembers its dataset, root, landmark backend and overrides (RUN/run.json): "
    "`morphset build RUN` alone continues it; another dataset or root is refused unless --mode overwrite. "
    "Writes RUN/report.json; exits non-zero if any shard failed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    p.add_argument(
        "--dataset", default=None, help="datasets.<name> to build (default: stages.ingest.dataset)"
    )
    p.add_argument("--root", default=None, help="override the dataset root (local path or fsspec URL)")
    p.add_argument("--list-file", default=None, help="CSV path,subject; sets layout list-file")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="target images per shard (stages.ingest.shard_size)",
    )
    p.add_argument(
        "--landmarks",
        choices=["fan", "dlib"],
        default=None,
        help="landmark backend (stages.landmarks.backend)",
    )
    p.add_argument("--until", choices=BUILD_ORDER[1:], default="export", help="last stage to run")
    add_execution_arguments(p)
    p.add_argument("--json", action="store_true", help="print the build report as JSON")


def run(args: argparse.Namespace) -> int:
    from pipeline import api

    report = api.build(
        run_location(args),
        dataset=args.dataset,
        root=args.root,
        list_file=args.list_file,
        until=args.until,
        overrides=args.overrides,
        scheduler=args.scheduler,
        progress=not args.no_progress,
        landmarks=args.landmarks,
        shard_size=args.shard_size,
        mode=args.mode,
        workers=args.workers,
        manifest=args.manifest,
    )
    doc = report.to_dict()
    if args.json:
        print_json(doc)
    else:
        print_report(doc)
        print(f"report: {report.run}/report.json")
    return 0 if report.ok else 1
