"""``morphset overlap``: identities a training run shares with an evaluation run."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands._common import print_json

HELP = "list training subjects whose face-embedding centre is within a threshold of an evaluation subject's (CSV for export --exclude-subjects)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "train_run", help="the training run (directory or fsspec URL), built with the embed stage on"
    )
    p.add_argument("eval_run", help="the evaluation run, built with the embed stage on")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="largest distance between two subjects' embedding centres that counts as one person "
        "(dlib-resnet units; on ../shared/fixtures: same person <= 0.44, different >= 0.60, docs/identity.md)",
    )
    p.add_argument(
        "-o",
        "--out",
        default=None,
        help="CSV to write (default: TRAIN_RUN/overlap.csv, only with a local run)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable summary")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline import api

    out = args.out
    if out is None:
        if "://" in args.train_run:
            print("morphset overlap: --out is required for a remote training run", file=sys.stderr)
            return 2
        out = str(Path(args.train_run) / "overlap.csv")
    result = api.overlap(args.train_run, args.eval_run, args.threshold, out)
    summary = {**result.summary(), "csv": out, "shared": result.train_subjects}
    if args.json:
        print_json(summary)
        return 0
    print(
        f"{summary['shared_train_subjects']} of {summary['train_subjects']} training subjects are within "
        f"{args.threshold} of one of {summary['eval_subjects']} evaluation subjects"
    )
    for p in result.pairs:
        print(f"  {p['train_subject']} ~ {p['eval_subject']} ({p['distance']:.3f})")
    for what, n in (
        ("training", summary["train_subjects_without_centre"]),
        ("evaluation", summary["eval_subjects_without_centre"]),
    ):
        if n:
            print(
                f"  {n} {what} subject(s) have no centre (no embedding, or identity_ambiguous): not compared"
            )
    print(f"list: {out}  (morphset export RUN --exclude-subjects {out})")
    return 0
