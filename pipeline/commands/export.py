"""``morphset export``: the training-set shards handed to trainers."""

from __future__ import annotations

import argparse

from pipeline.commands._stage import add_stage_arguments, run_stage_command

HELP = "write training-set shards: aligned 112x96 crops, landmarks, identity/expression targets, pose, fit quality"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p)
    p.add_argument(
        "--min-images",
        type=int,
        default=None,
        help="drop subjects with fewer usable images (stages.export.min_images_per_subject)",
    )
    p.add_argument(
        "--exclude-subjects",
        default=None,
        metavar="FILE",
        help="leave these subjects out (morphset overlap's CSV, or one name per line; stages.export.exclude_subjects)",
    )


def run(args: argparse.Namespace) -> int:
    extra: dict = {}
    if args.min_images:
        extra["stages.export.min_images_per_subject"] = args.min_images
    if args.exclude_subjects:
        from pipeline.storage.run import absolute_location

        extra["stages.export.exclude_subjects"] = absolute_location(args.exclude_subjects)
    return run_stage_command(args, ["export"], extra or None)
