"""``morphset crop``: the aligned 112x96 face crop of each image (what the export copies)."""

from __future__ import annotations

import argparse

from pipeline.commands._stage import add_stage_arguments, run_stage_command

HELP = "cut the aligned 112x96 face crop of each landmarked image (in the pixel pass; the export copies them)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p)


def run(args: argparse.Namespace) -> int:
    return run_stage_command(args, ["crop"])
