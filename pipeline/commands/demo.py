"""``morphset demo``: the whole system on data it makes itself, on this machine, with no download
beyond the package registry (the default morphable model comes from a PyPI wheel)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "render a synthetic face set, build it on a LocalCluster, train the tiny encoder, evaluate; print the report path"
DESCRIPTION = (
    "The self-contained demo (what `make demo` runs): morphset synth (SUBJECTS x IMAGES faces with known 3D "
    "shape) -> morphset build (MTCNN -> dlib landmarks -> multi-image fit -> export) on a LocalCluster -> "
    "morphset train --tiny -> morphset evaluate against the ground truth. Re-running resumes: finished "
    "stages are not redone."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--subjects", type=int, default=30, help="synthetic subjects")
    p.add_argument("--images-per-subject", type=int, default=8, help="images per synthetic subject")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    p.add_argument(
        "--yaw-range",
        type=float,
        nargs=2,
        default=[-40.0, 40.0],
        metavar=("MIN", "MAX"),
        help="yaw of the renders in degrees (dlib landmarks degrade beyond about 40 degrees)",
    )
    p.add_argument("--epochs", default="6,1,8", help="tiny-trainer epochs of phases I,II,III")
    p.add_argument(
        "--workers", type=int, default=None, help="LocalCluster worker processes (default: one per core)"
    )


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import main

    out = Path(args.out)
    data = out / "synthetic"
    common = (["--manifest", args.manifest] if args.manifest else []) + [
        a for o in args.overrides for a in ("--set", o)
    ]
    t_all = time.perf_counter()

    t = _step(f"1/4 synth: {args.subjects} subjects x {args.images_per_subject} images -> {data}")
    if not (data / "ground_truth.parquet").is_file():
        rc = main(
            [
                "synth",
                "--subjects",
                str(args.subjects),
                "--images-per-subject",
                str(args.images_per_subject),
                "--seed",
                str(args.seed),
                "--yaw-range",
                str(args.yaw_range[0]),
                str(args.yaw_range[1]),
                "--out",
                str(data),
                "--preview",
                *common,
            ]
        )
        if rc:
            return rc
    else:
        print(f"   {data}/ground_truth.parquet exists; reusing it")
    print(f"   {time.perf_counter() - t:.0f} s")

    t = _step("2/4 build: ingest -> detect (MTCNN) -> landmarks (dlib) -> fit -> export, on a LocalCluster")
    build = [
        "build",
        str(out),
        "--dataset",
        "synthetic",
        "--root",
        str(data),
        "--landmarks",
        "dlib",
        "--shard-size",
        "64",
        *common,
    ]
    if args.workers:
        build += ["--workers", str(args.workers)]
    rc = main(build)
    if rc:
        return rc
    print(f"   {time.perf_counter() - t:.0f} s")

    t = _step("3/4 train: the tiny encoder-decoder, phases I-III")
    rc = main(["train", str(out), "--tiny", "--epochs", args.epochs, *common])
    if rc:
        return rc
    print(f"   {time.perf_counter() - t:.0f} s")

    t = _step("4/4 evaluate against the synthetic ground truth")
    ev = [
        "evaluate",
        str(out),
        "--ground-truth",
        str(data / "ground_truth.parquet"),
        "--encoder",
        str(out / "train"),
        *common,
    ]
    rc = main(ev)
    if rc:
        return rc
    print(f"   {time.perf_counter() - t:.0f} s")
    print(f"\ndemo finished in {time.perf_counter() - t_all:.0f} s; report: {out / 'eval' / 'report.html'}")
    return 0
