"""``morphset train RUN``: train the compact encoder-decoder on RUN's export shards."""

from __future__ import annotations

import argparse
import json
import logging

HELP = "train the Liu et al. encoder-decoder (phases I-III) on RUN/export; writes RUN/train/"
DESCRIPTION = """\
Train the compact torch encoder-decoder of Liu et al. (CVPR 2018) on the committed trainset shards
RUN/export/part-NNNNN.parquet: Phase I (encoder -> normalised alpha_id/alpha_exp), Phase II
(decoders, initialised from the morphable model's bases), Phase III (end to end, lambda_R * L_R + L_C,
lambda_R 0.5 -> 1.0 at the loss plateau). Writes OUT/checkpoints/epoch-NNNN.pt (every epoch),
OUT/metrics.jsonl (per step and per epoch), OUT/config.json, and OUT/export/ (encoder.pt +
encoder.json + encoder.torchscript.pt, read by pipeline.train.inference.load_encoder).

Configuration is stages.train of the manifest (defaults in schemas/manifest/stage.train.schema.json:
width_multiplier 1.0, embedding_dim 512, epochs 10/1/20, batch_size 64, adam lr 1e-3, softmax
identification, all vertices in L_R). Precedence, lowest first: manifest < the run's run.json < --tiny <
--config FILE.yaml < --set stages.train.KEY=VALUE < --epochs. --tiny is the CPU demo: width 0.25, embedding 128,
epochs 4/1/4, batch 32, 2000-vertex L_R subsample (a few minutes for ~240 images on 2 cores)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        nargs="?",
        default=None,
        help="run directory holding export/part-NNNNN.parquet (+ .json sidecars); default: the manifest's output_root",
    )
    p.add_argument("--out", default=None, help="output directory (default: RUN/train)")
    p.add_argument(
        "--tiny", action="store_true", help="the small CPU configuration (pipeline.train.config.TINY)"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="YAML mapping of stages.train keys merged over the manifest",
    )
    p.add_argument(
        "--epochs",
        default=None,
        metavar="N|I,II,III",
        help="epochs of every phase, or of phases I, II, III (shorthand for stages.train.epochs_phase1..3)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints"
    )
    p.add_argument(
        "--objective",
        choices=("liu", "genova", "liu+genova"),
        default=None,
        help="liu: Liu et al.'s phases on the fit's labels (the default); genova: Genova et al.'s "
        "unsupervised losses alone (loopback, multi-view identity, batch distribution; phase III only); "
        "liu+genova: both (stages.train.objective; docs/render.md)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the effective stages.train parameters and exit"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)"
    )


def run(args: argparse.Namespace) -> int:
    from pipeline import api
    from pipeline.commands._common import run_location

    result = api.train(
        run_location(args),
        out=args.out,
        tiny=args.tiny,
        config=args.config,
        epochs=args.epochs,
        resume=args.resume,
        overrides=args.overrides,
        manifest=args.manifest,
        print_config=args.print_config,
        objective=args.objective,
    )
    if args.print_config:  # the effective stages.train parameters
        print(json.dumps(result, indent=1, sort_keys=True))
        return 0
    last = result.epoch_records[-1] if result.epoch_records else {}
    logging.getLogger("morphset.train").info(
        "%d/%d epochs; metrics %s; export %s%s",
        result.epochs_completed,
        result.total_epochs,
        result.metrics_path,
        result.export_dir,
        f"; last epoch loss {last['loss']:.4g}" if last else "",
    )
    doc = {"out": str(result.out_dir), "epochs": result.epochs_completed, "export": str(result.export_dir)}
    if args.json:  # everything a script may want, as one document
        doc.update(
            total_epochs=result.total_epochs, metrics=str(result.metrics_path), last_epoch=last or None
        )
    print(json.dumps(doc, default=str))
    return 0
