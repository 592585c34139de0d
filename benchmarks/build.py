"""End-to-end `morphset build` throughput on a synthetic set, per stage, with the embedding stage
off (the renders' default) and on (the default for real photo sets) in one run, against the warm
one-thread detector measured in the same run, and an on-paper projection for CASIA-WebFace.
Prints JSON.

    .venv/bin/python benchmarks/build.py [--subjects 125] [--images-per-subject 8] [--workers 2] [--embed both]

The synthetic set is rendered once into benchmarks/.cache/ (reused afterwards); each build goes
into a fresh run directory on a LocalCluster with the offline dlib landmark backend.
``rate_over_detector`` is the build's images/s over 1000 / (the warm detector's ms per image): the
share of the detector's own speed the whole build keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASIA_IMAGES = 494_414
CASIA_SUBJECTS = 10_575
HERE = Path(__file__).resolve().parent


def warm_detect_ms(data: Path, result_overrides: list[str], n: int = 64) -> float:
    """CPU ms per image of the configured detector on ``n`` of the set's images: one thread, the
    model loaded and warmed first, lists of the stage's batch size (the build's reference)."""
    from pipeline.config.manifest import load_manifest
    from pipeline.config.resolve import parse_sets
    from pipeline.core.threads import limit_threads
    from pipeline.detect.stage import detect_images, get_detector
    from pipeline.imaging.decode import read_image

    limit_threads(1)
    m = load_manifest().with_overrides(parse_sets(result_overrides))
    params = m.stage_params("detect")
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:n]
    images = [read_image(str(p)).unwrap() for p in files]
    det = get_detector(params)
    detect_images(det, images[:8], params)
    t0 = time.process_time()
    for i in range(0, len(images), params["batch_size"]):
        detect_images(det, images[i : i + params["batch_size"]], params)
    return round(1000 * (time.process_time() - t0) / len(images), 2)


def run_sidecar(run: Path, stage: str, shard: int) -> dict | None:
    path = run / "_meta" / stage / f"part-{shard:05d}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def build_once(data: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    from pipeline import api

    run = HERE / ".cache" / "build-run"
    shutil.rmtree(run, ignore_errors=True)
    load_before = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    result = api.build(
        run,
        dataset="synthetic",
        root=str(data),
        landmarks="dlib",
        shard_size=args.shard_size,
        workers=args.workers,
        progress=False,
        overrides=overrides,
    )
    wall = time.perf_counter() - t0
    if not result.ok:
        sys.exit(f"build failed: {result.failed_shards}")
    report = result.to_dict()
    images = report["ingest"]["images"]
    stages = {}
    for name, st in report["stages"].items():
        per_image_s = st["task_seconds"] / st["images"] if st["images"] else None
        stages[name] = {
            "images": st["images"],
            "task_seconds": st["task_seconds"],
            "task_ms_per_image": round(1000 * per_image_s, 2) if per_image_s else None,
            # user + system CPU of the worker process while it ran the stage's tasks
            "cpu_ms_per_image": st.get("cpu_ms_per_image"),
            "decodes": st.get("decodes"),
            "casia_cpu_core_hours": round(st["cpu_ms_per_image"] * CASIA_IMAGES / 3.6e6, 2)
            if st.get("cpu_ms_per_image")
            else None,
        }
    # detect's CPU per image shard by shard: a worker's first shard also pays its start (imports,
    # model load: ~2 CPU s); the median shard is the steady state a large build runs at
    per_shard = sorted(
        1000 * sc["cpu_seconds"] / sc["images"]
        for sc in (
            run_sidecar(run, "detect", i)
            for i in range(len(list((run / "_meta" / "detect").glob("part-?????.json"))))
        )
        if sc and sc.get("images")
    )
    return {
        "overrides": overrides,
        "detect_cpu_ms_per_image_median_shard": round(per_shard[len(per_shard) // 2], 2)
        if per_shard
        else None,
        "load_1min_before": load_before,
        "images": images,
        "subjects": report["ingest"]["subjects"],
        "build_wall_seconds": round(wall, 1),
        "images_per_s": round(images / wall, 2),
        "decodes_per_image": report.get("decodes_per_image"),
        "stages": stages,
        "cpu_core_hours_casia": round(sum(s["casia_cpu_core_hours"] or 0 for s in stages.values()), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=125)
    ap.add_argument("--images-per-subject", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-size", type=int, default=200)
    ap.add_argument(
        "--embed",
        choices=["both", "off", "on"],
        default="both",
        help="builds with the embed stage off, on, or both",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="manifest override (repeatable), e.g. stages.detect.min_face_size=40",
    )
    args = ap.parse_args()
    from pipeline import api

    data = HERE / ".cache" / f"synth-{args.subjects}x{args.images_per_subject}"
    t0 = time.perf_counter()
    if not (data / "ground_truth.parquet").is_file():
        api.synth(data, subjects=args.subjects, images_per_subject=args.images_per_subject, seed=11)
    synth_seconds = time.perf_counter() - t0
    modes = ["off", "on"] if args.embed == "both" else [args.embed]
    rows = {
        f"embed_{mode}": build_once(data, args, [*args.overrides, f"stages.embed.enabled={mode == 'on'}"])
        for mode in modes
    }
    warm_ms = warm_detect_ms(data, result_overrides=args.overrides)
    detector_rate = 1000 / warm_ms
    for row in rows.values():
        row["rate_over_detector"] = round(row["images_per_s"] / detector_rate, 3)
        detect_cpu = row["stages"]["detect"]["cpu_ms_per_image"]
        row["detect_in_build_over_warm"] = round(detect_cpu / warm_ms, 2) if detect_cpu else None
        median = row["detect_cpu_ms_per_image_median_shard"]
        row["detect_median_shard_over_warm"] = round(median / warm_ms, 2) if median else None
    out = {
        "benchmark": "build",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "workers": args.workers,
        "synth_seconds": round(synth_seconds, 1),
        # the same detector on 64 of the same images, warm, one thread, in this process
        "detect_warm_single_thread_ms_per_image": warm_ms,
        **rows,
    }
    if "embed_on" in rows:
        st = rows["embed_on"]["stages"]
        out["embed_cpu_over_detect_cpu"] = round(
            st["embed"]["cpu_ms_per_image"] / st["detect"]["cpu_ms_per_image"], 3
        )
    if len(rows) == 2:
        out["off_over_on"] = round(rows["embed_off"]["images_per_s"] / rows["embed_on"]["images_per_s"], 3)
    out["casia_projection"] = {
        "images": CASIA_IMAGES,
        "subjects": CASIA_SUBJECTS,
        "note": "cpu_core_hours_casia per row: the stages' CPU per image measured here times CASIA's images "
        "(model loading included once per worker per stage, so a slight overestimate); CASIA photos are "
        "250x250 like the synthetic set",
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
