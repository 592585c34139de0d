"""Does Genova et al.'s multi-view identity loss see a face's shape? Prints JSON.

On a built synthetic run (``morphset demo``'s, say: its export and its renders' ground truth),
``multiview_identity`` (pipeline/train/genova.py) is computed per training crop for the true shape
and for wrong ones — another person's true identity, a random identity from the prior, the mean
shape — each with the image's true expression, under two appearances of the render: colours
sampled from the input crop (what training uses) and one flat colour (the input's mean). A loss
that sees shape scores the true shape lowest.

    .venv/bin/python benchmarks/genova_identity.py RUN [--images 24] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config.manifest import load_manifest  # noqa: E402
from pipeline.embed.dlib_resnet import resolve_model as resolve_identity  # noqa: E402
from pipeline.embed.resnet_torch import load as load_identity_net  # noqa: E402
from pipeline.models.assets import resolve_morphable_model  # noqa: E402
from pipeline.storage.run import Run  # noqa: E402
from pipeline.train.data import TrainsetStream, scan_trainset  # noqa: E402
from pipeline.train.genova import GenovaLosses, GenovaSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a built synthetic run with an export (e.g. runs/demo)")
    ap.add_argument("--images", type=int, default=24, help="training crops measured")
    ap.add_argument("--seed", type=int, default=0, help="random identities and the other person's pick")
    args = ap.parse_args()

    record = Run(args.run).read_record()
    truth_path = Path(record.root) / "ground_truth.parquet"
    if not truth_path.is_file():
        raise SystemExit(f"{truth_path}: no ground truth (the run must be built from `morphset synth`)")
    m = load_manifest()
    model = resolve_morphable_model(m)
    net = load_identity_net(resolve_identity(m.get("models.dlib_embedding") or {})[0])
    losses = GenovaLosses(model, net, GenovaSettings.from_params(m.stage_params("train")))
    stream = TrainsetStream(
        scan_trainset(args.run), "train", args.seed, 4096, True, False, ("image_id",), True
    )
    rows = []
    for row in stream:
        rows.append(row)
        if len(rows) == args.images:
            break
    truth = {r["image_id"]: r for r in pq.read_table(truth_path).to_pylist()}
    ids = [r["image_id"] for r in rows]
    image = torch.stack([r["image"] for r in rows]).float()
    points = torch.stack([r["landmarks"] for r in rows]).float()
    true_id = torch.tensor(np.array([truth[i]["alpha_id"] for i in ids]), dtype=torch.float32)
    true_exp = torch.tensor(np.array([truth[i]["alpha_exp"] for i in ids]), dtype=torch.float32)
    gen = torch.Generator().manual_seed(args.seed)
    subjects = [truth[i]["subject"] for i in ids]
    other = [
        next(j for j in range(k + 1, k + len(ids)) if subjects[j % len(ids)] != subjects[k]) % len(ids)
        for k in range(len(ids))
    ]
    shapes = {
        "true": true_id,
        "another person": true_id[other],
        "random": torch.randn(true_id.shape, generator=gen)
        * torch.from_numpy(model.id_std.astype(np.float32)),
        "mean shape": torch.zeros_like(true_id),
    }
    out: dict = {}
    for appearance in ("sampled", "flat"):
        per: dict[str, np.ndarray] = {}
        for name, alpha in shapes.items():
            with torch.no_grad():
                v = losses.shapes(alpha, true_exp)
                c = losses.input_colours(image, points, v)
                if appearance == "flat":
                    c = c.mean(1, keepdim=True).expand_as(c)
                per[name] = np.array(
                    [
                        float(
                            losses.multiview_identity(
                                v[k : k + 1], c[k : k + 1], image[k : k + 1], points[k : k + 1]
                            )
                        )
                        for k in range(len(ids))
                    ]
                )
        out[appearance] = {
            "mean_loss": {k: round(float(x.mean()), 5) for k, x in per.items()},
            "share_true_lower_than_another_person": round(
                float(np.mean(per["true"] < per["another person"])), 3
            ),
            "share_true_lower_than_random": round(float(np.mean(per["true"] < per["random"])), 3),
        }
    print(
        json.dumps(
            {
                "benchmark": "genova_identity",
                "run": str(args.run),
                "images": len(ids),
                "subjects": len(set(subjects)),
                "machine": platform.machine(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **out,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
