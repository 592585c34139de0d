"""``morphset ingest``: scan a dataset into index shards."""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.commands._common import add_run_argument, positive_int, print_json, run_location

HELP = "scan a dataset (subject folders or a list file) into index shards"
DESCRIPTION = (
    "Scan datasets.<name> of the manifest into RUN/ingest/part-NNNNN.parquet index shards: one row per file "
    "(unusable files keep their row with a failure reason), stable labels from sorted subject names, whole "
    "subjects per shard. Re-running does no work unless the files or the shard size changed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_argument(p)
    p.add_argument(
        "--dataset", default=None, help="datasets.<name> to ingest (default: stages.ingest.dataset)"
    )
    p.add_argument("--root", default=None, help="override datasets.<name>.root (local path or fsspec URL)")
    p.add_argument("--list-file", default=None, help="CSV path,subject; sets layout list-file")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="target images per shard (stages.ingest.shard_size)",
    )
    p.add_argument(
        "--mode",
        choices=["resume", "overwrite", "extend"],
        default="resume",
        help="resume: rewrite only changed shards; overwrite: rewrite all; extend: new subjects go to new shards",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)"
    )


def run(args: argparse.Namespace) -> int:
    from pipeline import api

    r = api.ingest(
        run_location(args),
        dataset=args.dataset,
        root=args.root,
        list_file=args.list_file,
        shard_size=args.shard_size,
        mode=args.mode,
        overrides=args.overrides,
        manifest=args.manifest,
    )
    if args.json:
        print_json(dataclasses.asdict(r))
        return 0
    print(
        f"ingest: {r.images} files of {r.subjects} subjects; shards written {len(r.shards_written)}, "
        f"unchanged {len(r.shards_skipped)}, removed {len(r.shards_removed)}"
    )
    if r.failures:
        print("  recorded: " + ", ".join(f"{k}={v}" for k, v in r.failures.items()))
    for w in r.warnings:
        print(f"  warning: {w}")
    return 0
