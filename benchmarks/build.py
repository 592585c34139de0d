"""End-to-end `morphset build` throughput on a synthetic set, per stage, and an on-paper projection
for CASIA-WebFace. Prints JSON.

    .venv/bin/python benchmarks/build.py [--subjects 250] [--images-per-subject 8] [--workers 2]

The synthetic set is rendered once into benchmarks/.cache/ (reused afterwards); each run builds
into a fresh run directory on a LocalCluster with the offline dlib landmark backend.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=250)
    ap.add_argument("--images-per-subject", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-size", type=int, default=200)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="manifest override (repeatable), e.g. stages.embed.enabled=true",
    )
    args = ap.parse_args()
    from pipeline import api

    data = HERE / ".cache" / f"synth-{args.subjects}x{args.images_per_subject}"
    t0 = time.perf_counter()
    if not (data / "ground_truth.parquet").is_file():
        api.synth(data, subjects=args.subjects, images_per_subject=args.images_per_subject, seed=11)
    synth_seconds = time.perf_counter() - t0
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
        overrides=args.overrides,
    )
    wall = time.perf_counter() - t0
    if not result.ok:
        sys.exit(f"build failed: {result.failed_shards}")
    report = result.to_dict()
    images = report["ingest"]["images"]
    stages = {}
    for name, st in report["stages"].items():
        per_image_cpu_s = st["task_seconds"] / st["images"] if st["images"] else None
        stages[name] = {
            "images": st["images"],
            "task_seconds": st["task_seconds"],
            "images_per_second_per_worker": st["images_per_second_per_worker"],
            "task_ms_per_image": round(1000 * per_image_cpu_s, 2) if per_image_cpu_s else None,
            # user + system CPU of the worker process while it ran the stage's tasks
            "cpu_ms_per_image": st.get("cpu_ms_per_image"),
            "casia_cpu_core_hours": round(per_image_cpu_s * CASIA_IMAGES / 3600, 1)
            if per_image_cpu_s
            else None,
        }
    total_cpu = sum(s["casia_cpu_core_hours"] or 0 for s in stages.values())
    warm_ms = warm_detect_ms(data, result_overrides=args.overrides)
    detect_cpu = stages.get("detect", {}).get("cpu_ms_per_image")
    print(
        json.dumps(
            {
                "benchmark": "build",
                "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
                "date": time.strftime("%Y-%m-%d"),
                "images": images,
                "subjects": report["ingest"]["subjects"],
                "workers": args.workers,
                "synth_seconds": round(synth_seconds, 1),
                "build_wall_seconds": round(wall, 1),
                "overrides": args.overrides,
                "load_1min_before": load_before,
                "images_per_s": round(images / wall, 2),
                "stages": stages,
                # the same detector on 64 of the same images, warm, one thread, in this process
                "detect_warm_single_thread_ms_per_image": warm_ms,
                "detect_in_build_over_warm": round(detect_cpu / warm_ms, 2)
                if detect_cpu and warm_ms
                else None,
                "casia_projection": {
                    "images": CASIA_IMAGES,
                    "subjects": CASIA_SUBJECTS,
                    "cpu_core_hours_total": round(total_cpu, 1),
                    "wall_hours_on_this_machine": round(total_cpu / args.workers, 1),
                    "wall_hours_on_64_cores": round(total_cpu / 64, 1),
                    "note": "CPU costs measured here per image (task seconds / images, model loading included once per worker "
                    "per stage, so a slight overestimate). CASIA photos are 250x250 like the synthetic set.",
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
