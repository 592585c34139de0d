"""Throughput of MTCNN detection (batch 1, 8, 32) and of each landmark backend; prints JSON.

Image sets: the real-photo fixtures (../shared/fixtures/faces, 150x150 crops; skipped if absent)
and generated CASIA-like 250x250 images (fixture faces pasted at random places and sizes on
blurred colour backgrounds; without fixtures, backgrounds with no face). FAN runs with randomly
initialised weights (speed only; the real checkpoint cannot be downloaded here).

    .venv/bin/python benchmarks/detect_landmarks.py [--repeat 5] [--fan-faces 8] [--synthetic 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config.manifest import load_manifest  # noqa: E402
from pipeline.detect.stage import detect_images, filter_faces, get_detector  # noqa: E402
from pipeline.imaging.decode import read_image  # noqa: E402
from pipeline.landmarks.accuracy import landmark_errors, synthetic_renders  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures" / "faces"


def fixture_images() -> list[np.ndarray]:
    if not FIXTURES.is_dir():
        return []
    return [read_image(str(p)).unwrap() for p in sorted(FIXTURES.rglob("*.png"))]


def generated_images(
    faces: list[np.ndarray], n: int = 64, size: int = 250, seed: int = 0
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        # out-of-focus background: a coarse random colour field, smoothly upsampled
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = cv2.GaussianBlur(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR), (0, 0), 8)
        if faces:
            f = faces[i % len(faces)]
            s = int(rng.integers(110, 170))
            f = cv2.resize(f, (s, s), interpolation=cv2.INTER_AREA)
            x, y = (int(v) for v in rng.integers(0, size - s, 2))
            img[y : y + s, x : x + s] = f
        out.append(np.ascontiguousarray(img))
    return out


def time_detection(detector: object, images: list[np.ndarray], params: dict, repeat: int) -> list[dict]:
    """Best-of-``repeat`` rate per batch size; the batch sizes are interleaved within each round so
    that load from other processes on the machine affects them alike."""
    batches = (1, 8, 32)
    best = dict.fromkeys(batches, float("inf"))
    found = dict.fromkeys(batches, 0)
    for b in batches:  # warm every batch shape once
        detect_images(detector, images[:b], {**params, "batch_size": b})
    for _ in range(repeat):
        for b in batches:
            p = {**params, "batch_size": b}
            t0 = time.perf_counter()
            res = detect_images(detector, images, p)
            best[b] = min(best[b], time.perf_counter() - t0)
            found[b] = sum(
                1
                for r in res
                if not isinstance(r, str) and len(filter_faces(r, p["min_face_px"], p["min_score"]))
            )
    return [
        {
            "batch": b,
            "images": len(images),
            "images_per_s": round(len(images) / best[b], 2),
            "found": found[b],
        }
        for b in batches
    ]


def time_backend(backend: object, items: list, repeat: int) -> float:
    backend.predict(items[:1])  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        backend.predict(items)
        best = min(best, time.perf_counter() - t0)
    return round(len(items) / best, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best round counts")
    ap.add_argument("--fan-faces", type=int, default=8, help="faces timed for FAN (slow on CPU)")
    ap.add_argument("--synthetic", type=int, default=32, help="renders for the synthetic set (0 = skip)")
    args = ap.parse_args()

    manifest = load_manifest()
    params = manifest.stage_params("detect")
    t0 = time.perf_counter()
    detector = get_detector()
    report: dict = {
        "benchmark": "detect_landmarks",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, no GPU",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "detector_startup_s": round(time.perf_counter() - t0, 2),
        # other processes share the 2 cores on the development machines: record the load
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "detection": {},
        "landmarks": {},
    }
    faces = fixture_images()
    sets = {"generated_250px": generated_images(faces)}
    if faces:
        sets = {"fixtures_150px": faces, **sets}
    synth = None
    if args.synthetic:
        try:
            synth = synthetic_renders(manifest, args.synthetic)
            sets["synthetic_renders_250px"] = synth[0]
        except (ImportError, OSError, ValueError) as exc:  # renderer or model asset unavailable
            report["synthetic_skipped"] = f"{type(exc).__name__}: {exc}"
    for name, images in sets.items():
        rows = time_detection(detector, images, params, args.repeat)
        report["detection"][name] = {
            "runs": rows,
            "speedup_32_vs_1": round(rows[2]["images_per_s"] / rows[0]["images_per_s"], 2),
        }

    # landmark backends on the primary boxes of the first image set
    images = next(iter(sets.values()))
    found = detect_images(detector, images, params)
    items = [(im, f.boxes[int(np.argmax(f.scores))]) for im, f in zip(images, found, strict=True) if len(f)]
    if not items:  # no fixture faces: time on centred boxes of the generated images
        items = [(im, np.array([60.0, 60.0, 190.0, 190.0])) for im in images]

    from pipeline.landmarks.stage import get_backend

    # dlib with the manifest's settings, and with its points steadied (the face resampled, 8 boxes averaged)
    for name, extra in (
        ("dlib", {}),
        ("dlib_steadied", {"dlib_face_px": 300, "dlib_jitter": 8}),
    ):
        m_dlib = load_manifest(
            overrides={
                "stages.landmarks.backend": "dlib",
                **{f"stages.landmarks.{k}": v for k, v in extra.items()},
            }
        )
        lm_params = m_dlib.stage_params("landmarks")
        dl = get_backend(m_dlib, lm_params)
        report["landmarks"][name] = {
            "dlib_face_px": lm_params["dlib_face_px"],
            "dlib_jitter": lm_params["dlib_jitter"],
            "faces": len(items),
            "faces_per_s": time_backend(dl, items, args.repeat),
        }
        if synth is not None:
            report["landmarks"][name]["accuracy_on_synthetic_renders"] = landmark_errors(
                *synth, detector, params, dl
            )

    import torch
    from face_alignment.models import FAN

    from pipeline.landmarks.base import sha256_file
    from pipeline.landmarks.fan import FanBackend

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "random-2dfan4.pth.tar"
        torch.manual_seed(0)
        torch.save(FAN(4).state_dict(), ckpt)
        fan_items = items[: args.fan_faces]
        fan_report = {"faces": len(fan_items), "torch_threads": torch.get_num_threads(), "weights": "random"}
        backends = {bs: FanBackend(ckpt, sha256_file(ckpt), batch_size=bs) for bs in (1, 8)}
        best = dict.fromkeys(backends, float("inf"))
        for fb in backends.values():
            fb.predict(fan_items[:1])  # warm-up
        for _ in range(2):  # interleaved rounds, best counts (the machine is shared)
            for bs, fb in backends.items():
                t1 = time.perf_counter()
                fb.predict(fan_items)
                best[bs] = min(best[bs], time.perf_counter() - t1)
        for bs in backends:
            fan_report[f"faces_per_s_batch{bs}"] = round(len(fan_items) / best[bs], 2)
        report["landmarks"]["fan"] = fan_report
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
