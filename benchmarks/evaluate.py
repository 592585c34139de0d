"""Cost of the evaluation measures on the default morphable model (53k vertices, 101k triangles).

Prints JSON: milliseconds per sample for Liu et al.'s error, Genova et al.'s ICP error, the shaded
render, and for the verification metrics on LFW-sized score sets (6000 pairs, 10 folds).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial.transform import Rotation

from pipeline.evaluate.reconstruction import NOSE_TIP, Similarity, genova_error, liu_error
from pipeline.evaluate.shading import render_shaded
from pipeline.evaluate.verification import verification_report
from pipeline.landmarks.scheme import IBUG68


def face_grid(n: int = 230) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = np.linspace(-80, 80, n)
    x, y = np.meshgrid(xs, xs)
    z = 50 * np.exp(-(x**2 + y**2) / (2 * 45**2)) + 6 * np.sin(x / 12) * np.cos(y / 17)
    v = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tri = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    lm = np.random.default_rng(0).choice(len(v), IBUG68.points, replace=False)
    lm[NOSE_TIP] = int(np.argmax(v[:, 2]))
    return v, tri, lm


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (imports, caches)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1000 * (time.perf_counter() - t) / repeat


def default_model_mesh() -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """The manifest's morphable model (mean shape) when it resolves, else a face-sized grid."""
    try:
        from pipeline.config.manifest import load_manifest
        from pipeline.models.assets import resolve_morphable_model

        m = resolve_morphable_model(load_manifest())
        return m.name, m.shape(), m.triangles, m.landmarks_of(IBUG68).nearest
    except Exception as exc:  # offline machine without the converted model: measure on the grid
        print(f"(default model unavailable: {exc}; using a 230x230 grid)", file=sys.stderr)
        return ("grid-230x230", *face_grid())


def demo_sized_run(root: Path, model, subjects: int = 30, per_subject: int = 8, noise: float = 0.3) -> Path:
    """Fit shards + ground truth like the demo's (fitted = truth + noise x prior std)."""
    from pipeline.config.schemas import from_rows, load_schema
    from pipeline.storage.store import ShardStore

    rng = np.random.default_rng(0)
    fit_rows, gt_rows = [], []
    for s in range(subjects):
        a_id = rng.normal(size=model.k_id) * model.id_std
        fit_id = a_id + noise * rng.normal(size=model.k_id) * model.id_std
        for i in range(per_subject):
            a_exp = rng.normal(size=model.k_exp) * model.exp_std
            yaw = float(rng.uniform(-80, 80))
            common = {"image_id": f"p{s:02d}/{i:03d}.png", "subject": f"p{s:02d}"}
            fit_rows.append(
                {
                    **common,
                    "label": s,
                    "alpha_id": fit_id.tolist(),
                    "alpha_exp": (a_exp + noise * rng.normal(size=model.k_exp) * model.exp_std).tolist(),
                    "rotation": Rotation.from_euler("y", yaw, degrees=True).as_matrix().ravel().tolist(),
                    "yaw": yaw,
                    "reproj_rmse_px": float(rng.uniform(0.5, 3)),
                    "used": True,
                    "subject_images_used": per_subject,
                    "iterations": 5,
                    "converged": True,
                }
            )
            gt_rows.append({**common, "alpha_id": a_id.tolist(), "alpha_exp": a_exp.tolist(), "yaw": yaw})
    schema = load_schema("fits")
    ShardStore(str(root / "run"), "fit").write(
        0,
        from_rows(fit_rows, schema),
        schema,
        "fp",
        "ph",
        0.0,
        extra_metadata={"morphset.model.sha256": model.sha256},
    )
    gt = pa.Table.from_pylist(gt_rows).replace_schema_metadata({"morphset.model.sha256": model.sha256})
    pq.write_table(gt, root / "ground_truth.parquet")
    return root / "ground_truth.parquet"


def evaluate_seconds(model) -> dict:
    """Wall time of the evaluation of a demo-sized run (240 images) with the default parameters."""
    from pipeline.config.manifest import load_manifest
    from pipeline.evaluate import run as evrun

    m = load_manifest()
    with tempfile.TemporaryDirectory() as d:
        gt = demo_sized_run(Path(d), model)
        out = {}
        for genova in (True, False):
            params = m.stage_params("evaluate") | {"ground_truth": str(gt), "genova": genova}
            t = time.perf_counter()
            evrun.evaluate_run(str(Path(d) / "run"), m, params, progress=lambda _: None)
            out[f"evaluate_240_images_s{'' if genova else '_no_genova'}"] = round(time.perf_counter() - t, 1)
    return out


def main() -> None:
    name, v, tri, lm = default_model_mesh()
    rng = np.random.default_rng(1)
    gt = v + rng.normal(scale=0.5, size=v.shape)
    tf = Similarity(
        1.1, Rotation.from_euler("xyz", [5, -10, 3], degrees=True).as_matrix(), np.array([3.0, 1.0, -2.0])
    )
    pred = tf.apply(v)
    n = 6000
    same = np.arange(n) % 2 == 0
    scores = rng.normal(size=n) + 1.5 * same
    folds = np.arange(n) % 10
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, no GPU",
        "mesh": name,
        "vertices": len(v),
        "triangles": len(tri),
        "liu_ms_per_sample": round(timed(lambda: liu_error(pred, gt, pred[lm], gt[lm]), 10), 1),
        "genova_ms_per_sample_3000_points": round(
            timed(lambda: genova_error(pred, tri, gt, tri, pred[lm], gt[lm], max_points=3000), 3), 1
        ),
        "render_ms_160px": round(timed(lambda: render_shaded(v, tri, 160), 3), 1),
        "verification_ms_6000_pairs_10_folds": round(
            timed(lambda: verification_report(scores, same, folds), 3), 1
        ),
        "genova_mm_on_0.5mm_noise": round(genova_error(pred, tri, gt, tri, pred[lm], gt[lm]).mean_mm, 3),
        "liu_mm_on_0.5mm_noise": round(liu_error(pred, gt, pred[lm], gt[lm]).mean_mm, 3),
    }
    if name != "grid-230x230":
        from pipeline.config.manifest import load_manifest
        from pipeline.models.assets import resolve_morphable_model

        out.update(evaluate_seconds(resolve_morphable_model(load_manifest())))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
