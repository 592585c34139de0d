"""The GPU check: every stage that can use a GPU, on CUDA, in one short run; prints JSON.

For a machine with a CUDA device (it prints ``{"cuda": false}`` and exits 0 elsewhere). Fits a
10-minute window on one GPU:

- detect: the torch MTCNN on 250x250 renders, lists of 32 — GPU ms per image, and the same
  rows as on the CPU (box IoU);
- landmarks: FAN (face-alignment's 2DFAN-4, random weights: speed only) on 256x256 crops, batch 32;
- embed: dlib's face network in torch (the embed stage's default backend, the real weights) on
  150x150 chips of renders, batches of 32 — GPU ms per face (network only, and with dlib's chip
  alignment on the CPU), and the cosine to the CPU's embeddings of the same chips;
- fit: the batched fit with CuPy against NumPy on the same landmark problems (identity equal to
  float32 tolerance) and both images/s;
- train: a few steps of the full-width SphereFace-20 encoder and decoders under AMP (float16
  autocast + GradScaler) on random 112x96 batches — images/s.

    python benchmarks/gpu.py [--renders 64] [--train-steps 30]
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


DEVICE = "cuda"


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn, repeat: int = 3) -> float:
    fn()  # warm (kernels, allocator)
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def detect_check(manifest: object, n: int) -> dict:
    from pipeline.detect.mtcnn_torch import TorchMTCNN
    from pipeline.detect.weights import load_npz, weights_npz
    from pipeline.landmarks.accuracy import synthetic_renders

    images = synthetic_renders(manifest, n, seed=3)[0]
    path, _ = weights_npz(manifest.model("mtcnn"), manifest.cache_dir)
    weights = load_npz(path)
    gpu, cpu = TorchMTCNN(weights, DEVICE), TorchMTCNN(weights, "cpu")
    ms = cuda_ms(lambda: [gpu.detect(images[i : i + 32]) for i in range(0, n, 32)])
    a, b = gpu.detect(images[:32]), cpu.detect(images[:32])
    agree = len(a) == len(b) and (not len(a) or float(np.abs(a[:, 1:5] - b[:, 1:5]).max()) < 0.5)
    return {"images": n, "gpu_ms_per_image": round(ms / n, 3), "rows_equal_cpu": bool(agree)}


def fan_check(n: int = 64) -> dict:
    import torch
    from face_alignment.models import FAN

    net = FAN(4).to(DEVICE).eval()
    x = torch.rand(32, 3, 256, 256, device=DEVICE)
    with torch.inference_mode():
        ms = cuda_ms(lambda: [net(x) for _ in range(n // 32)])
    return {"faces": n, "gpu_ms_per_face": round(ms / n, 3), "weights": "random (speed only)"}


def embed_check(manifest: object, n: int) -> dict:
    from pipeline.embed.dlib_resnet_torch import TorchResnetBackend, resolve_model
    from pipeline.landmarks.accuracy import synthetic_renders

    images, truth, _ = synthetic_renders(manifest, n, seed=4)
    path, sha = resolve_model(manifest.model("dlib_embedding"))
    gpu = TorchResnetBackend(path, sha, {"device": DEVICE})
    cpu = TorchResnetBackend(path, sha, {"device": "cpu"})
    chips = [gpu.chip(im, pts) for im, pts in zip(images, truth, strict=True)]
    net_ms = cuda_ms(lambda: [gpu.embed_chips(chips[i : i + 32]) for i in range(0, n, 32)])
    items = list(zip(images, truth, strict=True))
    stage_ms = cuda_ms(lambda: [gpu.embed(items[i : i + 32]) for i in range(0, n, 32)])
    a, b = gpu.embed_chips(chips[:32]), cpu.embed_chips(chips[:32])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {
        "faces": n,
        "gpu_ms_per_face_network": round(net_ms / n, 3),
        "ms_per_face_with_alignment": round(stage_ms / n, 3),
        "cosine_to_cpu_min": round(float(cos.min()), 7),
    }


def fit_check(manifest: object) -> dict:
    from pipeline.config.schemas import from_rows, load_schema
    from pipeline.fit.loop import FitOptions
    from pipeline.fit.stage import fit_landmark_table
    from pipeline.models.assets import resolve_morphable_model
    from pipeline.synthetic.toy import synthesize

    model = resolve_morphable_model(manifest)
    s = synthesize(model, 128, 8, noise_px=1.0, seed=0)
    rows = [
        {
            "image_id": f"p{i}/{j}.jpg",
            "subject": f"p{i}",
            "label": i,
            "landmarks": s.landmarks[i, j].reshape(-1).astype(np.float32).tolist(),
            "confidence": None,
            "backend": "dlib",
            "backend_version": "x",
            "weights_sha256": "0" * 64,
            "align_matrix": None,
            "image_width": 250,
            "image_height": 250,
            "failure_reason": None,
        }
        for i in range(128)
        for j in range(8)
    ]
    table = from_rows(rows, load_schema("landmarks"))
    opt = FitOptions(max_iterations=10)
    out, seconds = {}, {}
    for name, backend in (("numpy", "numpy"), ("cupy", "cupy" if DEVICE == "cuda" else "numpy")):
        fit_landmark_table(table.slice(0, 64), model, opt, backend=backend)  # warm
        t0 = time.perf_counter()
        out[name] = fit_landmark_table(table, model, opt, backend=backend)
        seconds[name] = time.perf_counter() - t0
    a = np.asarray(out["numpy"].column("alpha_id").to_pylist(), dtype=np.float64)
    b = np.asarray(out["cupy"].column("alpha_id").to_pylist(), dtype=np.float64)
    scale = np.abs(a).max()
    return {
        "images": len(rows),
        "numpy_images_per_s": round(len(rows) / seconds["numpy"], 1),
        "cupy_images_per_s": round(len(rows) / seconds["cupy"], 1),
        "max_abs_alpha_id_difference_rel": float(np.abs(a - b).max() / scale),
        "equal_to_float32_tolerance": bool(np.abs(a - b).max() <= 1e-3 * scale),
    }


def train_check(steps: int, batch: int = 128) -> dict:
    import torch

    from pipeline.train.losses import batch_distribution_loss, reconstruction_loss, softmax_loss
    from pipeline.train.network import MorphNet

    net = MorphNet(k_id=40, k_exp=10, n_vertices=5000, num_classes=1000).to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    amp = DEVICE == "cuda"
    scaler = torch.amp.GradScaler(DEVICE, enabled=amp)
    x = torch.randn(batch, 3, 112, 96, device=DEVICE)
    labels = torch.randint(0, 1000, (batch,), device=DEVICE)
    target = torch.randn(batch, 15000, device=DEVICE)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.float16 if amp else torch.bfloat16, enabled=amp):
            c_id, c_exp = net(x)
            _, full = net.shapes(c_id, c_exp)
            loss = softmax_loss(c_id, net.classifier.weight, labels)[0] + reconstruction_loss(full, target)
            loss = loss + batch_distribution_loss(c_id)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    ms = cuda_ms(lambda: [step() for _ in range(steps)], repeat=1)
    return {
        "batch": batch,
        "steps": steps,
        "images_per_s": round(steps * batch / (ms / 1000), 1),
        "amp": amp,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument(
        "--dry-run-on-cpu", action="store_true", help="run every check on the CPU (tests the script)"
    )
    args = ap.parse_args()
    import torch

    global DEVICE
    DEVICE = "cpu" if args.dry_run_on_cpu else "cuda"

    doc: dict = {
        "benchmark": "gpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cuda": torch.cuda.is_available(),
        "device_used": DEVICE,
    }
    if not doc["cuda"] and DEVICE == "cuda":
        print(json.dumps(doc, indent=1))
        return
    from pipeline.config.manifest import load_manifest

    m = load_manifest()
    doc["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run)"
    for name, fn in (
        ("detect", lambda: detect_check(m, args.renders)),
        ("landmarks_fan", fan_check),
        ("embed", lambda: embed_check(m, args.renders)),
        ("fit", lambda: fit_check(m)),
        ("train", lambda: train_check(args.train_steps)),
    ):
        try:
            doc[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            doc[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
