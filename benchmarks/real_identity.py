"""Fit settings on real photographs: per-image identity AUC and split-half consistency; prints JSON.

    .venv/bin/python benchmarks/real_identity.py [--photos DIR] [--weights 1 3 10] [--boot 1000]
    .venv/bin/python benchmarks/real_identity.py --parts scale [--scale-photos DIR]

``--photos``: real photos in subject folders, several per person (default: ../shared/fixtures/faces,
8 people x 5 crops). Built with the product's own stages (MTCNN, dlib landmarks, the embed stage
as for any real photo set) twice: every photo fitted alone (``stages.fit.identity: image``) and
each person's photos split into two halves fitted as two subjects. Then only the fit is rerun per
setting: the shipped default (the error model's calibrated weight and identity shrinkage), the
identity prior weights given without shrinkage, the error model off, the perspective camera, and
the photometric refinement after the default fit (``stages.refine``, its identity weights given). A shrinkage scales each
identity, so it leaves the AUCs (cosines) as they are and shortens the distances in mm. The measures and their 95 % bootstrap intervals over people are
:mod:`pipeline.evaluate.photo_identity`'s.

``--parts scale``: the same photos resized ×0.5 / ×1 / ×2 (Lanczos, saved losslessly; default
../shared/fixtures/people, whose photos are large enough that ×0.5 is still a face dlib sees
well), each size built as subjects of all their photos: the RMS distance (mm) between one person's
identity shapes at two sizes, over the size pairs of the people with two photos or more (a
refinement needs two), for the default fit and the default fit + refine. A setting that means
the same at any image size keeps these small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.models.morphable_model import MorphableModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fit_rows(run: Path, table: str = "fit") -> list[dict]:
    import pyarrow.dataset as pads

    t = pads.dataset(str(run / table), format="parquet").to_table(
        columns=["subject", "alpha_id", "failure_reason"]
    )
    return [r for r in t.to_pylist() if r["failure_reason"] is None and r["alpha_id"] is not None]


def measure(runs: dict[str, Path], model: MorphableModel, boot: int, seed: int, table: str = "fit") -> dict:
    from pipeline.evaluate.photo_identity import auc_with_interval, split_half_consistency

    rows = fit_rows(runs["per_image"], table)
    alpha = np.array([r["alpha_id"] for r in rows], dtype=np.float64)
    per_image = auc_with_interval(
        np.array([r["subject"] for r in rows]), alpha / model.id_std, np.random.default_rng(seed), boot
    )
    first: dict[str, list[float]] = {}
    for r in fit_rows(runs["halves"], table):
        first.setdefault(r["subject"], r["alpha_id"])
    people = np.array([s.rsplit("__", 1)[0] for s in first])
    split = split_half_consistency(
        people,
        np.array(list(first.values()), dtype=np.float64),
        model.id_std,
        lambda a: model.shape(a.astype(np.float32)),
        np.random.default_rng(seed),
        boot,
    )
    return {"per_image": per_image, "split_half": split}


def resized_copies(photos: Path, out: Path, factor: float) -> None:
    """``photos``' subject folders at ``factor`` × their size in ``out`` (PNG: no new JPEG loss)."""
    from PIL import Image

    from pipeline.fit.calibrate import IMAGE_SUFFIXES

    for person in sorted(p for p in photos.iterdir() if p.is_dir()):
        (out / person.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(person.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    rgb = im.convert("RGB")
            except OSError as exc:
                sys.exit(f"{f}: not a readable image ({exc})")
            size = (max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor)))
            rgb.resize(size, Image.Resampling.LANCZOS).save(out / person.name / f"{f.stem}.png")


def scale_test(photos: Path, work: Path, model: MorphableModel, scales: list[float]) -> dict:
    """The RMS distance (mm) between each person's identity shapes at two image sizes, for the
    default fit and with the refinement after it (see the module docstring)."""
    from itertools import combinations

    from pipeline import api
    from pipeline.evaluate.photo_identity import Pairs, shape_distances
    from pipeline.fit.calibrate import IMAGE_SUFFIXES

    base = {"stages.fit.identity": "subject", "stages.refine.enabled": False}  # a run remembers overrides
    runs = {}
    for f in scales:
        tag = f"x{f:g}".replace(".", "p")  # a dataset name is a manifest key: no dots
        root, run = work / f"photos-{tag}", work / f"scale-{tag}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        resized_copies(photos, root, f)
        report = api.build(
            run,
            dataset=f"real-photos-{tag}",
            root=str(root),
            landmarks="dlib",
            until="landmarks",
            scheduler="sync",
            progress=False,
            overrides=base,
        )
        if not report.ok:
            sys.exit(f"{run}: build failed: {report.failed_shards}")
        runs[f] = run
    several = {
        p.name
        for p in photos.iterdir()
        if p.is_dir() and sum(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()) >= 2
    }
    rows: dict[str, dict] = {}
    for name, refine in (("default fit", False), ("default fit + refine", True)):
        alpha: dict[float, dict[str, np.ndarray]] = {}
        for f, run in runs.items():
            overrides = {**base, "stages.refine.enabled": refine}
            stages = ["embed", "fit", *(["refine"] if refine else [])]
            ran = api.run_stages(run, stages, overrides=overrides, scheduler="sync", progress=False)
            if ran.get("failed_shards"):
                sys.exit(f"{run}: {name} failed: {ran['failed_shards']}")
            alpha[f] = {}
            for r in fit_rows(run, "refine" if refine else "fit"):
                alpha[f].setdefault(r["subject"], np.asarray(r["alpha_id"], np.float64))
        people = sorted(several.intersection(*(a.keys() for a in alpha.values())))
        n = len(people)
        same_person = Pairs(i=np.arange(n), j=np.arange(n) + n, same=np.ones(n, bool))
        by_pair = {
            f"x{a:g} vs x{b:g}": shape_distances(
                np.array([alpha[a][p] for p in people] + [alpha[b][p] for p in people]),
                lambda x: model.shape(x.astype(np.float32)),
                same_person,
            ).tolist()
            for a, b in combinations(scales, 2)
        }
        dist = [d for ds in by_pair.values() for d in ds]
        rows[name] = {
            "people": people,
            "size_pairs": len(dist),
            "mean_mm": round(float(np.mean(dist)), 3) if dist else None,
            "max_mm": round(float(np.max(dist)), 3) if dist else None,
            "mean_mm_by_sizes": {k: round(float(np.mean(v)), 3) for k, v in by_pair.items()},
        }
    return {"photos": str(photos), "scales": scales, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "fixtures" / "faces")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.3, 1, 3, 10, 30])
    ap.add_argument(
        "--refine-weights",
        type=float,
        nargs="*",
        default=[1, 10],
        help="stages.refine.identity_prior_weight rows",
    )
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument(
        "--parts", nargs="+", choices=["settings", "scale"], default=["settings"], help="what to measure"
    )
    ap.add_argument("--scale-photos", type=Path, default=REPO.parent / "shared" / "fixtures" / "people")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    args = ap.parse_args()
    for folder in (args.photos, *([args.scale_photos] if "scale" in args.parts else [])):
        if not folder.is_dir():
            sys.exit(f"{folder}: not a folder of subject folders of real photos")
    from pipeline.config.manifest import load_manifest
    from pipeline.models.assets import resolve_morphable_model

    model = resolve_morphable_model(load_manifest())
    work = args.work or Path(tempfile.mkdtemp(prefix="real-identity-"))
    t0 = time.perf_counter()
    doc = {
        "benchmark": "real_identity",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_1min": round(os.getloadavg()[0], 2),
        "photos": str(args.photos),
    }
    if "settings" in args.parts:
        doc["settings"] = settings_table(args, work, model)
    if "scale" in args.parts:
        doc["scale_test"] = scale_test(args.scale_photos, work, model, args.scales)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(doc, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def settings_table(args: argparse.Namespace, work: Path, model: MorphableModel) -> dict:
    """Every setting's per-image AUC and split-half consistency (see the module docstring)."""
    from pipeline import api
    from pipeline.config.manifest import load_manifest
    from pipeline.fit.calibrate import write_halves

    halves_root = work / "halves-photos"
    write_halves(args.photos.resolve(), halves_root)
    runs = {"per_image": work / "per-image", "halves": work / "halves"}
    roots = {"per_image": args.photos, "halves": halves_root}
    modes = {"per_image": "image", "halves": "subject"}
    for key, run in runs.items():
        shutil.rmtree(run, ignore_errors=True)
        report = api.build(
            run,
            dataset=f"real-photos-{key}",  # a dataset entry of its own (made from the root)
            root=str(roots[key]),
            landmarks="dlib",
            until="landmarks",
            scheduler="sync",
            progress=False,
            overrides={"stages.fit.identity": modes[key]},
        )
        if not report.ok:
            sys.exit(f"{run}: build failed: {report.failed_shards}")
    settings: dict[str, dict] = {"default": {}}
    no_shrink = {"common": 0.0, "per_image": 0.0}
    settings.update(
        {
            f"weight {w:g}, no shrinkage": {
                "stages.fit.identity_prior_weight": w,
                "stages.fit.identity_shrinkage": no_shrink,
            }
            for w in args.weights
        }
    )
    settings["error model off"] = {"stages.fit.error_model": False}
    # the fit's camera: a pinhole per image around the orthographic fit (docs/fit.md)
    settings["default, perspective camera"] = {"stages.fit.camera": "perspective"}
    # the photometric refinement after the default fit (docs/refine.md): its own defaults, then
    # each identity weight given; a subject of one image (every per-image fit) keeps its fit
    settings["default + refine"] = {"stages.refine.enabled": True}
    for w in args.refine_weights:
        settings[f"default + refine, identity weight {w:g}"] = {
            "stages.refine.enabled": True,
            "stages.refine.identity_prior_weight": w,
        }
    refine_default = load_manifest().stage_params("refine")["identity_prior_weight"]
    results = {}
    for name, extra in settings.items():
        for key, run in runs.items():
            overrides = {  # every key a setting changes, at its default (a run remembers overrides)
                "stages.fit.identity": modes[key],
                "stages.fit.identity_prior_weight": None,
                "stages.fit.identity_shrinkage": None,
                "stages.fit.error_model": True,
                "stages.fit.camera": "orthographic",
                "stages.refine.enabled": False,
                "stages.refine.identity_prior_weight": refine_default,
                **extra,
            }
            refine = bool(extra.get("stages.refine.enabled"))
            stages = ["embed", "fit", *(["refine"] if refine else [])]
            ran = api.run_stages(run, stages, overrides=overrides, scheduler="sync", progress=False)
            if ran.get("failed_shards"):
                sys.exit(f"{run}: fit failed for {name}: {ran['failed_shards']}")
        results[name] = measure(runs, model, args.boot, args.seed, "refine" if refine else "fit")
    return results


if __name__ == "__main__":
    main()
