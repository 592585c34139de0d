"""``morphset demo``: the whole system on data it makes itself, on this machine, with no download
beyond the package registry (the default morphable model comes from a PyPI wheel)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.commands._common import positive_int

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
        "--objectives",
        type=_objectives,
        default=["liu"],
        help="training objectives, comma separated (liu, genova, liu+genova): one tiny encoder each, "
        "compared side by side in the report (genova ones train at about 3 images/s on 2 cores); "
        "default: liu",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="LocalCluster worker processes (default: one per core)",
    )


def _objectives(text: str) -> list[str]:
    known = ("liu", "genova", "liu+genova")
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct objectives among {', '.join(known)}, got {text!r}"
        )
    return names


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from pipeline import api
    from pipeline.commands._common import print_report

    out = Path(args.out)
    data = out / "synthetic"
    common = {"overrides": args.overrides, "manifest": args.manifest}
    t_all = time.perf_counter()

    t = _step(f"1/4 synth: {args.subjects} subjects x {args.images_per_subject} images -> {data}")
    if not (data / "ground_truth.parquet").is_file():
        summary = api.synth(
            data,
            subjects=args.subjects,
            images_per_subject=args.images_per_subject,
            seed=args.seed,
            yaw_range=list(args.yaw_range),
            preview=True,
            **common,
        )
        print(
            f"   {summary['images']} images of {summary['subjects']} subjects; preview {data / 'preview.png'}"
        )
    else:
        print(f"   {data}/ground_truth.parquet exists; reusing it")
    print(f"   {time.perf_counter() - t:.0f} s")

    t = _step(
        "2/4 build: ingest -> detect (MTCNN, torch) -> landmarks (dlib) -> embed (off for renders) -> fit -> "
        "export, on a LocalCluster"
    )
    report = api.build(
        out,
        dataset="synthetic",
        root=str(data),
        landmarks="dlib",
        shard_size=64,
        workers=args.workers,
        **common,
    )
    print_report(report.to_dict())
    if not report.ok:
        return 1
    print(f"   {time.perf_counter() - t:.0f} s")

    encoders = []
    for objective in args.objectives:
        # the liu encoder where `morphset evaluate RUN` finds it by itself; others beside it
        where = out / ("train" if objective == "liu" else f"train-{objective.replace('+', '-')}")
        t = _step(f"3/4 train: the tiny encoder-decoder, objective {objective}")
        result = api.train(out, where, tiny=True, epochs=args.epochs, objective=objective, **common)
        print(f"   {result.epochs_completed} epochs; encoder exported to {result.export_dir}")
        print(f"   {time.perf_counter() - t:.0f} s")
        encoders.append(str(where))

    t = _step("4/4 evaluate against the synthetic ground truth")
    page = api.evaluate(out, ground_truth=str(data / "ground_truth.parquet"), encoder=encoders, **common)
    print(f"   {page}")
    print(f"   {time.perf_counter() - t:.0f} s")
    print(f"\ndemo finished in {time.perf_counter() - t_all:.0f} s; report: {out / 'eval' / 'report.html'}")
    return 0
