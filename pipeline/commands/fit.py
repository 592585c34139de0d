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

    p.add_argument("--precision", choices=["float32", "float64"], default=None, help="stages.fit.precision")
    p.add_argument(
        "--contour", action="store_true", default=None, help="jaw contour correspondence (stages.fit.contour)"
    )
    p.add_argument("--max-iterations", type=int, default=None, help="stages.fit.max_iterations")
    p.add_argument(
        "--identity",
        choices=["subject", "image"],
        default=None,
        help="one identity per subject, or per image for evaluation sets (stages.fit.identity)",
    )


def run(args: argparse.Namespace) -> int:
    extra = {}
    if args.backend:
        extra["execution.array_backend"] = args.backend
    if args.precision:
        extra["stages.fit.precision"] = args.precision
    if args.contour:
        extra["stages.fit.contour"] = True
    if args.max_iterations:
        extra["stages.fit.max_iterations"] = args.max_iterations
    if args.identity:
        extra["stages.fit.identity"] = args.identity
    return run_stage_command(args, ["fit"], extra or None)
