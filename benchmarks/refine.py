"""The refine stage on renders with ground truth: identity error against the landmark fit's; prints JSON.

    .venv/bin/python benchmarks/refine.py RUN [--set stages.refine.KEY=VALUE ...] [--threads 1]

``RUN``: a built run of a ``morphset synth`` folder (``make demo`` leaves one at ``DEMO_OUT``,
default ``runs/demo``), whose root holds ``ground_truth.parquet``. The refinement runs on it
(enabled, with the settings given; it rewrites ``RUN/refine``), then each refined subject's
identity, all of its fitted images at once, is scored as the demo report scores the fit: RMS over
all vertices after a similarity alignment, over the mean shape's. CPU seconds per refined image
come from the stage's sidecars (decoding and windows included). Real photos:
``benchmarks/real_identity.py`` has the refinement's rows.

``--curve 2 4``: also the report's identity curve for the refinement. Random M-subsets of each
subject's images (``--repeats`` per subject, seed 0, the report's draws) are fitted again with the
run's fit, as the report's curve does, and each draw's fit is refined by the stage itself
(in-process, the same settings); both are scored against the truth as above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.models.morphable_model import MorphableModel
    from pipeline.storage.run import Run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--set", action="append", default=[], help="stages.refine.KEY=VALUE (YAML value)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one: the cost target's unit)")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--curve", type=int, nargs="*", default=[], help="M values of the refined curve (2 4)")
    ap.add_argument("--repeats", type=int, default=1, help="M-subsets per subject on the curve")
    args = ap.parse_args()
    import pyarrow.parquet as pq
    import torch
    import yaml

    from pipeline import api
    from pipeline.config.manifest import load_manifest
    from pipeline.core.tables import RunTables
    from pipeline.evaluate.identity_curve import all_vertex_error, identity_shape
    from pipeline.models.assets import resolve_morphable_model
    from pipeline.storage.run import Run

    torch.set_num_threads(args.threads)
    # every refine setting at its default unless given: a run remembers the overrides it was built with
    defaults = load_manifest().stage_params("refine")
    overrides = {f"stages.refine.{k}": v for k, v in defaults.items()}
    overrides["stages.refine.enabled"] = True
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    t0 = time.perf_counter()
    # overwrite: every shard computed here, so its time is this run's
    report = api.run_stages(args.run, ["refine"], "overwrite", overrides, scheduler="sync", progress=False)
    if report.get("failed_shards"):
        sys.exit(f"{args.run}: refine failed: {report['failed_shards']}")
    wall = time.perf_counter() - t0
    run = Run(str(args.run))
    root = Path(json.loads((args.run / "run.json").read_text())["root"])
    truth = {
        r["subject"]: np.asarray(r["alpha_id"])
        for r in pq.read_table(root / "ground_truth.parquet").to_pylist()
    }
    model = resolve_morphable_model(load_manifest())
    tables = RunTables(run)
    fit = {r["image_id"]: r for r in tables.table("fits").to_pylist()}
    refined = run.table("refine").to_pylist()
    mean = identity_shape(model, np.zeros(model.k_id))
    errors: dict[str, tuple[float, float, float]] = {}
    for r in refined:
        if r["refined"] and r["subject"] not in errors:
            gt = identity_shape(model, truth[r["subject"]])
            errors[r["subject"]] = (
                all_vertex_error(mean, gt),
                all_vertex_error(identity_shape(model, np.asarray(fit[r["image_id"]]["alpha_id"])), gt),
                all_vertex_error(identity_shape(model, np.asarray(r["alpha_id"])), gt),
            )
    e = np.array(list(errors.values()))
    ratio = ratios(e, args.boot)

    sidecars = [
        json.loads(p.read_text()) for p in sorted((args.run / "_meta" / "refine").glob("part-*.json"))
    ]
    n_refined = sum(bool(r["refined"]) for r in refined)
    doc = {
        "benchmark": "refine",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_1min": round(os.getloadavg()[0], 2),
        "threads": args.threads,
        "run": str(args.run),
        "settings": {k: v for k, v in overrides.items() if defaults.get(k.rsplit(".", 1)[1]) != v},
        "subjects": len(errors),
        "refined_images": n_refined,
        "mean_shape_mm": round(float(e[:, 0].mean()), 4),
        "landmark_fit_over_mean": ratio(1),
        "refined_over_mean": ratio(2),
        "subjects_better": int((e[:, 2] < e[:, 1]).sum()),
        "median_distance_mm": round(
            float(np.median([r["camera_distance_mm"] for r in refined if r["refined"]])), 1
        ),
        "cpu_s_per_refined_image": round(sum(s["cpu_seconds"] for s in sidecars) / max(n_refined, 1), 3),
        "wall_s": round(wall, 1),
    }
    if args.curve:
        doc["curve"] = refined_curve(run, model, truth, args.curve, args.repeats, args.boot)
    print(json.dumps(doc, indent=1))


def ratios(e: np.ndarray, boot: int) -> Callable[[int], dict]:
    """Column ``col`` of per-subject errors ``e`` (rows: subjects; column 0 the mean shape's) over
    column 0, summed over subjects, with a 95 % bootstrap interval over subjects."""
    draws = np.random.default_rng(0).integers(0, len(e), size=(boot, len(e)))

    def ratio(col: int) -> dict:
        point = e[:, col].sum() / e[:, 0].sum()
        resampled = e[draws, col].sum(1) / e[draws, 0].sum(1)
        return {
            "ratio": round(float(point), 4),
            "ci95": [round(float(q), 4) for q in np.percentile(resampled, [2.5, 97.5])],
        }

    return ratio


def refined_curve(
    run: Run, model: MorphableModel, truth: dict[str, np.ndarray], ms: list[int], repeats: int, boot: int
) -> list[dict]:
    """Per M: the fit of each M-subset draw and its refinement over the mean shape (see the module
    docstring); a draw whose fit fails counts as the mean shape, as in the report."""

    from pipeline.config.resolve import resolve
    from pipeline.core.runner import stage_context
    from pipeline.core.tables import RunTables
    from pipeline.evaluate.identity_curve import (
        all_vertex_error,
        drawn_rows,
        identity_shape,
        subset_draws,
    )
    from pipeline.evaluate.run import run_fit
    from pipeline.refine.stage import RefineStage

    manifest = resolve(run).manifest  # the run's settings, the refinement's as just used
    tables = RunTables(run)
    landmarks, index = tables.table("landmarks"), tables.table("index")
    fit = run_fit(model, manifest)
    subjects = np.asarray(landmarks.column("subject").to_pylist(), dtype=object)
    usable = np.array(
        [
            r is None and s in truth
            for r, s in zip(landmarks.column("failure_reason").to_pylist(), subjects, strict=True)
        ]
    )
    rng = np.random.default_rng(0)
    mean = identity_shape(model, np.zeros(model.k_id))
    points = []
    for m in ms:
        rows, names, draws = subset_draws(subjects, usable, m, repeats, rng)
        fits = fit(drawn_rows(landmarks, rows, names))
        refined = RefineStage().run(
            {"index": drawn_rows(index, rows, names), "fit": fits}, stage_context(manifest, "refine", run)
        )
        first: dict[str, tuple[list, list | None]] = {}
        for f, r in zip(fits.to_pylist(), refined.to_pylist(), strict=True):
            if r["refined"]:
                first.setdefault(r["subject"], (f["alpha_id"], r["alpha_id"]))
        e = []
        for name, s in draws:
            gt = identity_shape(model, truth[s])
            a_fit, a_ref = first.get(name, (None, None))
            shapes = [
                identity_shape(model, np.zeros(model.k_id) if a is None else np.asarray(a))
                for a in (a_fit, a_ref)
            ]
            e.append([all_vertex_error(mean, gt), *(all_vertex_error(x, gt) for x in shapes)])
        ratio = ratios(np.array(e), boot)
        points.append(
            {
                "m": m,
                "draws": len(draws),
                "refined_draws": len(first),
                "landmark_fit_over_mean": ratio(1),
                "refined_over_mean": ratio(2),
                "draws_better": int(sum(x[2] < x[1] for x in e)),
            }
        )
    return points


if __name__ == "__main__":
    main()
