"""MTCNN in torch against the mtcnn package (TensorFlow) on the same images, one thread each,
interleaved; prints JSON.

Images: 250x250 renders of the default morphable model (CASIA-WebFace's size), and the real-photo
fixtures when present (../shared/fixtures). Per backend: images/s on lists of ``--batch``
(best of ``--repeat`` rounds, the two backends alternating within each round), detection rate;
between them: the primary face's box IoU (median, and the fraction >= 0.9). The torch backend
also at other ``min_face_size`` and ``scale_factor`` values (the package finds nothing there).
Needs the ``tensorflow`` extra for the reference columns (skipped without it).

    .venv/bin/python benchmarks/detect.py [--renders 64] [--batch 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.threads import limit_threads  # noqa: E402


def primaries(det: object, images: list[np.ndarray], params: dict, batch: int) -> tuple[list, float]:
    from pipeline.detect.stage import choose_primary, detect_images, filter_faces

    t0 = time.perf_counter()
    out = []
    for i in range(0, len(images), batch):
        out.extend(
            detect_images(det, images[i : i + batch], {**params, "batch_size": batch, "retry_pad": None})
        )
    seconds = time.perf_counter() - t0
    boxes = []
    for im, faces in zip(images, out, strict=True):
        f = (
            filter_faces(faces, params["min_face_px"], params["min_score"])
            if not isinstance(faces, str)
            else None
        )
        p = (
            None
            if f is None
            else choose_primary(f.boxes, f.scores, im.shape[1], im.shape[0], params["primary_rule"])
        )
        boxes.append(None if p is None else f.boxes[p])
    return boxes, seconds


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    limit_threads(1)
    from pipeline.config.manifest import load_manifest
    from pipeline.detect.stage import get_detector
    from pipeline.imaging.decode import read_image
    from pipeline.landmarks.accuracy import synthetic_renders

    m = load_manifest()
    params = m.stage_params("detect")
    sets = {"renders_250": synthetic_renders(m, args.renders, seed=3)[0]}
    fixtures = REPO.parent / "shared" / "fixtures"
    if fixtures.is_dir():
        sets["fixture_faces_150"] = [
            read_image(str(p)).unwrap() for p in sorted((fixtures / "faces").rglob("*.png"))
        ]
    torch_det = get_detector(params)
    try:
        import tensorflow  # noqa: F401

        tf_det = get_detector({**params, "backend": "mtcnn-tf"})
    except ImportError:
        tf_det = None
    result: dict = {
        "benchmark": "detect",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_1min": round(os.getloadavg()[0], 2),
        "threads": 1,
        "batch": args.batch,
        "sets": {},
    }
    for name, images in sets.items():
        primaries(torch_det, images[:4], params, args.batch)  # warm
        if tf_det is not None:
            primaries(tf_det, images[:4], params, args.batch)
        best = {"torch": float("inf"), "tf": float("inf")}
        boxes: dict = {}
        for _ in range(args.repeat):
            for backend, det in (("torch", torch_det), ("tf", tf_det)):
                if det is None:
                    continue
                boxes[backend], s = primaries(det, images, params, args.batch)
                best[backend] = min(best[backend], s)
        n = len(images)
        entry: dict = {
            "images": n,
            "torch_images_per_s": round(n / best["torch"], 2),
            "torch_detection_rate": round(np.mean([b is not None for b in boxes["torch"]]), 3),
        }
        if tf_det is not None:
            ious = [
                iou(a, b)
                for a, b in zip(boxes["torch"], boxes["tf"], strict=True)
                if a is not None and b is not None
            ]
            entry.update(
                tf_images_per_s=round(n / best["tf"], 2),
                tf_detection_rate=round(np.mean([b is not None for b in boxes["tf"]]), 3),
                torch_over_tf_speed=round(best["tf"] / best["torch"], 3),
                median_iou=round(float(np.median(ious)), 4) if ious else None,
                iou_at_least_0_9=round(float(np.mean(np.asarray(ious) >= 0.9)), 3) if ious else None,
            )
        sweep = []
        for mfs, sf in ((20, 0.709), (40, 0.709), (60, 0.709), (20, 0.6), (40, 0.6)):
            p = {**params, "min_face_size": mfs, "scale_factor": sf}
            t = float("inf")
            for _ in range(args.repeat):
                bx, s = primaries(torch_det, images, p, args.batch)
                t = min(t, s)
            same = [
                iou(a, b) for a, b in zip(boxes["torch"], bx, strict=True) if a is not None and b is not None
            ]
            sweep.append(
                {
                    "min_face_size": mfs,
                    "scale_factor": sf,
                    "images_per_s": round(n / t, 2),
                    "detection_rate": round(np.mean([b is not None for b in bx]), 3),
                    "median_iou_vs_default": round(float(np.median(same)), 4) if same else None,
                }
            )
        entry["torch_sweep"] = sweep
        result["sets"][name] = entry
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
