"""``morphset evaluate``: verification, 3D reconstruction accuracy, fit quality -> RUN/eval/report.html."""

from __future__ import annotations

import argparse
import logging

HELP = "measure a run (verification, 3D reconstruction error, fit quality) and write RUN/eval/report.html"
DESCRIPTION = (
    "Evaluate a run with the protocols of Liu et al. (CVPR 2018) and Genova et al. (CVPR 2018): face "
    "verification (10-fold accuracy with thresholds from the other folds, 100%-EER, AUC, TAR at FAR 10% "
    "and 1%) on LFW pairs.txt / YouTube Faces splits.txt / CSV pairs (default: balanced pairs generated "
    "from the run's subjects, written to RUN/eval/pairs.csv); 3D reconstruction error against synthetic "
    "ground truth (morphset synth) or scans (Liu: landmark similarity alignment, 95 mm nose-tip crop, "
    "mean per-vertex distance, per yaw bin and expression level; Genova: ICP with scale, symmetric "
    "point-to-plane distance); fit quality. Writes RUN/eval/report.html (self-contained), report.json and "
    "samples.parquet, and prints the report path. Parameters: stages.evaluate in the manifest; the flags "
    "below override them."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (its fit shards are evaluated; the report goes to RUN/eval/)")
    p.add_argument(
        "--ground-truth",
        default=None,
        help="ground_truth.parquet from morphset synth, or a scan directory with scans.csv "
        "(stages.evaluate.ground_truth; default: none, no reconstruction accuracy)",
    )
    p.add_argument(
        "--pairs",
        default=None,
        help="LFW pairs.txt, YouTube Faces splits.txt or CSV a,b,same[,fold] (stages.evaluate.pairs; "
        "default: generate 10 folds of balanced pairs from the run's subjects)",
    )
    p.add_argument(
        "--encoder",
        action="append",
        default=None,
        help="trained encoder from morphset train (stages.evaluate.encoder; default: the run's own "
        "RUN/train if it has one, else the fit only); repeat it to compare encoders side by side "
        "(e.g. one per training objective)",
    )
    p.add_argument(
        "--no-genova",
        action="store_true",
        help="skip the slower ICP point-to-plane error (stages.evaluate.genova=false)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)"
    )


def run(args: argparse.Namespace) -> int:
    from pipeline import api

    logging.getLogger("pipeline.evaluate").setLevel(logging.INFO)
    page = api.evaluate(
        args.run,
        ground_truth=args.ground_truth,
        pairs=args.pairs,
        encoder=args.encoder,
        genova=False if args.no_genova else None,
        overrides=args.overrides,
        manifest=args.manifest,
    )
    if args.json:
        import json

        import fsspec

        report_json = str(page).rsplit("/", 1)[0] + "/report.json"  # a local path or an fsspec URL
        with fsspec.open(report_json, "r", encoding="utf-8") as f:
            doc = json.load(f)
        print(json.dumps({"report_html": str(page), "report_json": report_json, **doc}))
    else:
        print(page)
    return 0
