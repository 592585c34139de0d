"""``morphset landmarks``: 68 iBUG landmarks on the primary face."""

from __future__ import annotations

import argparse

from pipeline.commands._stage import add_stage_arguments, run_stage_command

HELP = "68 iBUG landmarks (FAN, or the offline dlib backend) on each image's primary MTCNN face"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p)
    p.add_argument(
        "--landmarks",
        choices=["fan", "dlib"],
        default=None,
        help="backend (stages.landmarks.backend; default fan as in the paper; dlib works offline)",
    )


def run(args: argparse.Namespace) -> int:
    extra = {"stages.landmarks.backend": args.landmarks} if args.landmarks else None
    return run_stage_command(args, ["landmarks"], extra)
