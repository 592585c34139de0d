"""``morphset build``: ingest -> detect -> landmarks -> fit -> export as Dask task graphs."""

from __future__ import annotations

import argparse
import json

import fsspec

from pipeline.commands._common import add_execution_arguments, add_run_argument, manifest_from_args, run_root
from pipeline.commands._stage import preflight, print_report
from pipeline.commands.ingest import ingest_overrides
from pipeline.core.stage import BUILD_ORDER
from pipeline.core.status import run_status, save_run_manifest
from pipeline.ingest.stage import run_ingest

HELP = "the main job: ingest -> detect -> landmarks -> fit -> export over shards on Dask (resumable)"
DESCRIPTION = (
    "Build a training set from datasets.<name>: one Dask task per shard per stage on a LocalCluster sized to "
    "this machine (or --scheduler tcp://host:8786). Only pending shards are computed; a killed build resumes "
    "where it stopped. Writes RUN/report.json; exits non-zero if any shard failed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    p.add_argument(
        "--dataset", default=None, help="datasets.<name> to build (default: stages.ingest.dataset)"
    )
    p.add_argument("--root", default=None, help="override the dataset root (local path or fsspec URL)")
    p.add_argument("--list-file", default=None, help="CSV path,subject; sets layout list-file")
    p.add_argument(
        "--shard-size", type=int, default=None, help="target images per shard (stages.ingest.shard_size)"
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
    from dags.build import run_stages
    from dags.cluster import open_client

    base = manifest_from_args(args)
    dataset = args.dataset or base.stage_params("ingest")["dataset"]
    if args.root and dataset not in base.data["datasets"]:
        base = base.with_overrides({f"datasets.{dataset}": {"root": args.root, "layout": "subject-folders"}})
    extra = ingest_overrides(args, dataset)
    if args.landmarks:
        extra["stages.landmarks.backend"] = args.landmarks
    m = base.with_overrides(extra) if extra else base
    root = run_root(args, m)
    stages = BUILD_ORDER[1 : BUILD_ORDER.index(args.until) + 1]
    preflight(m, stages)
    ing = run_ingest(m, root, dataset, mode=args.mode)
    save_run_manifest(m, root)
    print(
        f"   ingest: {ing.images} files of {ing.subjects} subjects; shards written {len(ing.shards_written)}, unchanged {len(ing.shards_skipped)}"
    )
    for w in ing.warnings:
        print(f"           warning: {w}")
    stage_mode = "resume" if args.mode == "extend" else args.mode
    with open_client(m) as client:
        report = run_stages(m, root, stages, client, mode=stage_mode, progress=not args.no_progress)
    report["ingest"] = {
        "images": ing.images,
        "subjects": ing.subjects,
        "failures": ing.failures,
        "warnings": ing.warnings,
    }
    report["status"] = run_status(m, root)
    fs, path = fsspec.core.url_to_fs(root)
    with fs.open(f"{path}/report.json", "w") as f:
        f.write(json.dumps(report, indent=1, default=str))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print_report(report)
        print(f"report: {root}/report.json")
    return 1 if report["failed_shards"] else 0
