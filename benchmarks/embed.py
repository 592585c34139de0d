"""Cost of the face-embedding stage per face, one thread, both backends; prints JSON.

Faces: the real-photo fixtures (../shared/fixtures/faces, 150x150 crops) when present, else
250x250 renders of the default morphable model; landmarks from the dlib predictor on a box around
each face (as the landmarks stage gives them). Measures the alignment (``get_face_chip``) and the
network separately for dlib's own (``dlib-resnet``) and the torch one (``dlib-resnet-torch``, the
default) at batch sizes 1 and 32, best of ``--repeat``, their agreement (cosine per face), and
projects the stage's cost on CASIA-WebFace (494,414 images).

    .venv/bin/python benchmarks/embed.py [--repeat 3] [--faces 40]
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

from timing import best_of  # noqa: E402  (benchmarks/timing.py, beside this script)

from pipeline.core.threads import limit_threads  # noqa: E402

CASIA_IMAGES = 494_414


def faces(n: int) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
    from pipeline.config.manifest import load_manifest
    from pipeline.imaging.decode import read_image
    from pipeline.landmarks.dlib_backend import DlibBackend, resolve_model

    m = load_manifest()
    fixtures = REPO.parent / "shared" / "fixtures" / "faces"
    if fixtures.is_dir():
        source = "fixtures/faces"
        images = [read_image(str(p)).unwrap() for p in sorted(fixtures.rglob("*.png"))][:n]
        boxes = [np.array([8.0, 8.0, im.shape[1] - 8.0, im.shape[0] - 8.0]) for im in images]
    else:
        from pipeline.landmarks.accuracy import synthetic_renders

        source = "renders"
        images, truth, _ = synthetic_renders(m, n)
        boxes = []
        for pts in truth:
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            pad = 0.1 * (hi - lo)
            boxes.append(np.concatenate([lo - pad, hi + pad]))
    path, sha = resolve_model(m.model("dlib_landmarks"))
    predictor = DlibBackend(path, sha)
    landmarks = [predictor.predict_one(im, b)[0] for im, b in zip(images, boxes, strict=True)]
    return source, images, landmarks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--faces", type=int, default=40)
    args = ap.parse_args()
    limit_threads(1)
    from pipeline.config.manifest import load_manifest
    from pipeline.embed.dlib_resnet import DlibResnetBackend, resolve_model
    from pipeline.embed.dlib_resnet_torch import TorchResnetBackend

    source, images, landmarks = faces(args.faces)
    path, sha = resolve_model(load_manifest().model("dlib_embedding"))
    n = len(images)
    out: dict = {}
    vectors = {}
    for backend_cls in (DlibResnetBackend, TorchResnetBackend):
        t0 = time.perf_counter()
        backend = backend_cls(path, sha, {"device": "cpu"})
        load_s = time.perf_counter() - t0
        chips = [backend.chip(im, lm) for im, lm in zip(images, landmarks, strict=True)]
        chip_s = best_of(
            lambda b=backend: [b.chip(im, lm) for im, lm in zip(images, landmarks, strict=True)], args.repeat
        )
        batch1_s = best_of(lambda b=backend, cs=chips: [b.embed_chips([c]) for c in cs], args.repeat)
        batch32_s = best_of(
            lambda b=backend, cs=chips: [b.embed_chips(cs[i : i + 32]) for i in range(0, n, 32)], args.repeat
        )
        stage_s = best_of(
            lambda b=backend: [
                b.embed(list(zip(images[i : i + 32], landmarks[i : i + 32], strict=True)))
                for i in range(0, n, 32)
            ],
            args.repeat,
        )
        vectors[backend.name] = backend.embed_chips(chips)
        per_face_ms = 1000 * stage_s / n
        out[backend.name] = {
            "model_load_s": round(load_s, 3),
            "align_ms_per_face": round(1000 * chip_s / n, 2),
            "network_ms_per_face_batch1": round(1000 * batch1_s / n, 2),
            "network_ms_per_face_batch32": round(1000 * batch32_s / n, 2),
            "embed_ms_per_face": round(per_face_ms, 2),
            "faces_per_s_per_core": round(n / stage_s, 2),
            "casia_webface_core_hours": round(CASIA_IMAGES * per_face_ms / 1000 / 3600, 2),
        }
    a, b = vectors["dlib-resnet"], vectors["dlib-resnet-torch"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(
        json.dumps(
            {
                "benchmark": "embed",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
                "load_1min": round(os.getloadavg()[0], 2),
                "threads": 1,
                "faces": n,
                "source": source,
                "backends": out,
                "torch_speedup": round(
                    out["dlib-resnet"]["embed_ms_per_face"] / out["dlib-resnet-torch"]["embed_ms_per_face"], 1
                ),
                "cosine_min": round(float(cos.min()), 7),
                "max_abs_diff": float(np.abs(a - b).max()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
