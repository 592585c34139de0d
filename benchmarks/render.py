"""Cost of the differentiable renderer (pipeline/render) on the default morphable model; prints JSON.

A batch of 32 faces (random identities, expressions and yaws within +-40 deg, SH lighting), each
of the model's full mesh, at 112x96 (the training crop) and 224x224: the z-buffer alone (torch,
no gradient), the whole forward pass, and forward + backward (gradients for the vertices, the
albedo and the lighting). Best of ``--repeat``; CPU threads as given, and CUDA when present.

    .venv/bin/python benchmarks/render.py [--repeat 3] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timing import best_of  # noqa: E402  (benchmarks/timing.py, beside this script)

from pipeline.core.threads import limit_threads  # noqa: E402

SIZES = ((112, 96), (224, 224))


def scene(batch: int, height: int, width: int, device: str, seed: int = 0) -> dict:
    import torch

    from pipeline.config.manifest import load_manifest
    from pipeline.fit.camera import rotation_from_euler_deg
    from pipeline.models.assets import resolve_morphable_model
    from pipeline.render.renderer import Orthographic, SHLighting

    model = resolve_morphable_model(load_manifest())
    rng = np.random.default_rng(seed)
    shapes, rots = [], []
    for _ in range(batch):
        a_id = rng.normal(size=model.k_id) * model.id_std
        a_exp = rng.normal(size=model.k_exp) * model.exp_std * 0.5
        shapes.append(model.shape(a_id, a_exp).reshape(-1, 3))
        rots.append(np.asarray(rotation_from_euler_deg(rng.uniform(-40, 40), rng.uniform(-10, 10), 0.0)))
    verts = torch.tensor(np.stack(shapes), dtype=torch.float32, device=device)
    ext = float(np.ptp(shapes[0][:, :2], axis=0).max())
    scale = 0.9 * min(height, width) / ext
    camera = Orthographic(
        torch.tensor(np.stack(rots), dtype=torch.float32, device=device),
        torch.full((batch,), scale, device=device),
        torch.tensor([[width / 2.0, height / 2.0]] * batch, device=device),
    )
    coeffs = torch.zeros(batch, 9, 3, device=device)
    coeffs[:, 0], coeffs[:, 2] = 0.8, 0.3
    return {
        "vertices": verts,
        "triangles": torch.tensor(np.asarray(model.triangles, np.int64), device=device),
        "albedo": torch.full((batch, verts.shape[1], 3), 0.6, device=device),
        "camera": camera,
        "lighting": SHLighting(coeffs),
        "n_vertices": int(verts.shape[1]),
        "n_triangles": len(model.triangles),
    }


def measure_size(batch: int, h: int, w: int, device: str, repeat: int) -> dict:
    import torch

    from pipeline.render.interpolate import triangle_ids
    from pipeline.render.renderer import SHLighting, render

    s = scene(batch, h, w, device)

    def zbuffer() -> None:
        screen, _ = s["camera"].project(s["vertices"])
        triangle_ids(screen, s["triangles"], h, w)

    def forward() -> None:
        with torch.no_grad():
            render(s["vertices"], s["triangles"], s["albedo"], s["camera"], s["lighting"], h, w)

    def backward() -> None:
        v = s["vertices"].clone().requires_grad_(True)
        a = s["albedo"].clone().requires_grad_(True)
        c = s["lighting"].coefficients.clone().requires_grad_(True)
        out = render(v, s["triangles"], a, s["camera"], SHLighting(c), h, w)
        (out.image.mean() + out.alpha.mean()).backward()

    def timed(fn: object) -> float:
        def run() -> None:
            fn()  # type: ignore[operator]
            if device == "cuda":
                torch.cuda.synchronize()

        run()  # warm-up
        return best_of(run, repeat)

    times = {"zbuffer": timed(zbuffer), "forward": timed(forward), "forward_backward": timed(backward)}
    return {
        "device": device,
        "height": h,
        "width": w,
        "batch": batch,
        "vertices": s["n_vertices"],
        "triangles": s["n_triangles"],
        **{f"{k}_ms_per_batch": round(1000 * v, 1) for k, v in times.items()},
        "forward_backward_ms_per_image": round(1000 * times["forward_backward"] / batch, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    limit_threads(args.threads)
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = [measure_size(args.batch, h, w, d, args.repeat) for d in devices for h, w in SIZES]
    print(
        json.dumps(
            {
                "benchmark": "render",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or ''}".strip(),
                "load": round(os.getloadavg()[0], 2),
                "threads": args.threads,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
