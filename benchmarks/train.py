"""Trainer throughput on this machine: training images/s and inference ms/image; prints JSON.

For the full (width 1.0, 512-d) and the tiny (width 0.25, 128-d) SphereFace-20 encoder:
- Phase I training step (encoder forward + backward + Adam) on a batch of random crops;
- Phase III training step (adds the decoders of a real-sized 53,215-vertex, 40+10 coefficient
  model, the reconstruction loss on a 2,000-vertex subsample and the softmax head);
- inference (``no_grad``, eval mode) at batch 1 and batch 32, in ms per image;
plus the streaming dataset's rows/s (JPEG decode included) over a synthetic trainset.
The paper's reference: 4.79 ms/image inference on a GTX 1080 (Liu et al. CVPR 2018).
Figures vary with other load on the machine: each is the median of ``--repeat`` timed runs, and
``*_best`` the fastest of them (closest to an otherwise idle machine); the load average is reported.

    .venv/bin/python benchmarks/train.py [--repeat 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.synthetic.toy import toy_model  # noqa: E402
from pipeline.synthetic.trainset import write_synthetic_trainset  # noqa: E402
from pipeline.train.config import validate_params  # noqa: E402
from pipeline.train.data import TrainsetStream, compute_norm_stats, scan_trainset  # noqa: E402
from pipeline.train.loop import ShapeTargets, StepModule, build_optimizer, vertex_rows  # noqa: E402
from pipeline.train.network import MorphNet, count_parameters, encoder_flops, init_decoders_from_model  # noqa: E402

CONFIGS = {"full": (1.0, 512), "tiny": (0.25, 128)}


def _times(fn, repeat: int) -> tuple[float, float]:
    """(median, best) seconds of ``repeat`` runs after a warm-up; best = least disturbed by other load."""
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def bench_config(name: str, model, norm, batch: int, repeat: int) -> dict:
    width, emb = CONFIGS[name]
    params = validate_params(
        {"width_multiplier": width, "embedding_dim": emb, "recon_vertices": 2000, "weight_decay": 0.0005}
    )
    torch.manual_seed(0)
    net = MorphNet(model.k_id, model.k_exp, model.n_vertices, 1000, width, emb)
    init_decoders_from_model(net, model, norm)
    rows = vertex_rows(model.n_vertices, params["recon_vertices"], 0)
    buffers = {k: torch.from_numpy(norm[k]) for k in ("mid_id", "half_id", "mid_exp", "half_exp")}
    buffers["std_id"] = torch.from_numpy(model.id_std.astype(np.float64))
    buffers["std_exp"] = torch.from_numpy(model.exp_std.astype(np.float64))
    step = StepModule(net, ShapeTargets(model, rows), buffers, rows, params)
    rng = np.random.default_rng(0)
    b = {
        "image": torch.rand(batch, 3, 112, 96) * 2 - 1,
        "alpha_id": torch.from_numpy(
            (rng.normal(size=(batch, model.k_id)) * model.id_std).astype(np.float32)
        ),
        "alpha_exp": torch.from_numpy(
            (rng.normal(size=(batch, model.k_exp)) * model.exp_std).astype(np.float32)
        ),
        "label": torch.from_numpy(rng.integers(0, 1000, batch)),
    }
    out = {
        "width_multiplier": width,
        "embedding_dim": emb,
        "encoder_parameters": count_parameters(net.encoder),
        "encoder_gmac_per_image": round(encoder_flops(width, emb) / 1e9, 3),
    }
    for phase in (1, 3):
        opt, _ = build_optimizer(net, phase, params)

        def train_step(phase: int = phase, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            step(b, phase, 0.5, 5.0)["loss"].backward()
            opt.step()

        med, best = _times(train_step, repeat)
        out[f"train_phase{phase}_images_per_s"] = round(batch / med, 2)
        out[f"train_phase{phase}_images_per_s_best"] = round(batch / best, 2)
    net.eval()
    for bs in (1, 32):
        x = torch.rand(bs, 3, 112, 96) * 2 - 1

        def infer(x: torch.Tensor = x) -> None:
            with torch.no_grad():
                net.encoder(x)

        med, best = _times(infer, repeat)
        out[f"inference_ms_per_image_batch{bs}"] = round(1000 * med / bs, 3)
        out[f"inference_ms_per_image_batch{bs}_best"] = round(1000 * best / bs, 3)
    return out


def bench_data(tmp: str, model) -> dict:
    n = write_synthetic_trainset(tmp, model, n_subjects=32, images_per_subject=16, n_shards=4)
    ds = TrainsetStream(scan_trainset(tmp), "train", shuffle_buffer=512)
    t = time.perf_counter()
    rows = sum(1 for _ in ds)
    secs = time.perf_counter() - t
    assert rows == n
    return {"rows": rows, "rows_per_s_with_jpeg_decode": round(rows / secs, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per figure (median reported)")
    ap.add_argument("--batch", type=int, default=16, help="training batch size")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    load_before = os.getloadavg()[0]
    model = toy_model(k_id=40, k_exp=10, seed=0, spacing_mm=0.66)
    with tempfile.TemporaryDirectory() as tmp:
        data = bench_data(tmp, model)
        norm = compute_norm_stats(scan_trainset(tmp))
    encoders = {name: bench_config(name, model, norm, args.batch, args.repeat) for name in CONFIGS}
    doc = {
        "benchmark": "train",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            # other processes on the machine slow every figure down: report the load they ran under
            "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
        },
        "batch": args.batch,
        "repeat": args.repeat,
        "model_vertices": model.n_vertices,
        "data": data,
        "encoders": encoders,
        "paper_inference_ms_per_image_gtx1080": 4.79,
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
