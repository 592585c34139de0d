"""``morphset detect``: MTCNN face detection over the index shards."""

from __future__ import annotations

import argparse

from pipeline.commands._stage import add_stage_arguments, run_stage_command

HELP = "MTCNN face detection: boxes, scores, 5 points and the primary face per image"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stage_arguments(p)


def run(args: argparse.Namespace) -> int:
    return run_stage_command(args, ["detect"])
