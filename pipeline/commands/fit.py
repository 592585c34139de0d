"""``morphset fit``: the alternating multi-image 3DMM fit per subject."""

from __future__ import annotations

import argparse

from pipeline.commands._stage import add_stage_arguments, run_stage_command

HELP = "fit one identity per subject and pose/expression per image (batched; NumPy or CuPy)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p)
    p.add_argument(
        "--backend",
        choices=["auto", "numpy", "cupy"],
        default=None,
        help="array backend (execution.array_backend; auto = CuPy when a GPU is available)",
    )


def run(args: argparse.Namespace) -> int:
    extra = {"execution.array_backend": args.backend} if args.backend else None
    return run_stage_command(args, ["fit"], extra)
