"""``morphset embed``: a face-recognition embedding of each image's primary face."""

from __future__ import annotations

import argparse

from pipeline.commands._stage import add_stage_arguments, run_stage_command

HELP = "face-recognition embedding (dlib's ResNet, in torch by default; offline) of each primary face, for identity screening"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p)
    p.add_argument(
        "--enabled",
        choices=["true", "false"],
        default=None,
        help="stages.embed.enabled (default: on, off for synthetic datasets)",
    )


def run(args: argparse.Namespace) -> int:
    extra = {"stages.embed.enabled": args.enabled == "true"} if args.enabled else None
    return run_stage_command(args, ["embed"], extra)
