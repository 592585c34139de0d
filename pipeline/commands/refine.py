"""``morphset refine``: the photometric refinement of the landmark fit (docs/refine.md)."""

from __future__ import annotations

import argparse

from pipeline.commands._stage import add_stage_arguments, run_stage_command

HELP = "refine each subject's fit so its images agree on the face's colours (off unless enabled)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p)
    p.add_argument(
        "--enable",
        action="store_true",
        default=None,
        help="run the refinement (stages.refine.enabled; the export then takes its labels from it)",
    )
    p.add_argument(
        "--device", default=None, help="torch device: auto, cpu, cuda, cuda:N (stages.refine.device)"
    )


def run(args: argparse.Namespace) -> int:
    extra: dict = {}
    if args.enable:
        extra["stages.refine.enabled"] = True
    if args.device:
        extra["stages.refine.device"] = args.device
    return run_stage_command(args, ["refine"], extra or None)
