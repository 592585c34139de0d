"""Small synthetic trainsets and morphable models for the trainer's tests, benchmark and smoke runs.

The crops are drawn, not rendered: each subject has a colour and a face ellipse whose size follows
its identity coefficients, and a mouth bar whose height follows the image's expression
coefficients, so a small network can learn both the label and the coefficients. Shards are written
through :class:`pipeline.storage.store.ShardStore` exactly as the export stage commits them.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.config.schemas import from_rows, load_schema
from pipeline.export.handoff import hf_metadata, split_counts, write_folder
from pipeline.imaging.crops import image_cell
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.morphable_model import MorphableModel
from pipeline.storage.run import Run
from pipeline.storage.store import ShardStore


def draw_crop(
    subject_colour: np.ndarray, a_id_std: np.ndarray, a_exp_std: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A 112x96 RGB uint8 crop whose content encodes the coefficients (in prior std units)."""
    img = np.empty((112, 96, 3), np.float32)
    img[:] = subject_colour
    img += np.linspace(-20, 20, 96, dtype=np.float32)[None, :, None]
    ax = int(np.clip(30 + 6 * a_id_std[0], 12, 46))
    ay = int(np.clip(40 + 6 * a_id_std[1 % len(a_id_std)], 16, 54))
    cv2.ellipse(img, (48, 56), (ax, ay), 0, 0, 360, (230, 200, 170), -1)
    # one bar per expression coefficient along the bottom, its height following the coefficient
    bw = max(2, 80 // max(1, len(a_exp_std)))
    for j, z in enumerate(a_exp_std):
        h = int(np.clip(8 + 4 * z, 1, 16))
        cv2.rectangle(img, (8 + j * bw, 110 - h), (8 + j * bw + bw - 2, 110), (60, 20, 30), -1)
    ex = int(np.clip(4 + 2 * a_id_std[2 % len(a_id_std)], 1, 10))
    cv2.circle(img, (34, 48), ex, (20, 20, 20), -1)
    cv2.circle(img, (62, 48), ex, (20, 20, 20), -1)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_rows(
    model: MorphableModel,
    n_subjects: int,
    images_per_subject: int,
    val_subjects: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Trainset rows (schema ``trainset``) for ``n_subjects`` x ``images_per_subject`` images."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        colour = rng.uniform(40, 215, 3).astype(np.float32)
        z_id = rng.normal(size=model.k_id)
        for i in range(images_per_subject):
            z_exp = rng.normal(size=model.k_exp)
            crop = draw_crop(colour, z_id, z_exp, rng)
            ok, jpeg = cv2.imencode(".jpg", crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError("cv2.imencode failed on a synthetic crop")
            rows.append(
                {
                    "image_id": f"s{s:04d}/{i:04d}.jpg",
                    "subject": f"s{s:04d}",
                    "label": s,
                    "split": "val" if s >= n_subjects - val_subjects else "train",
                    "crop_jpeg": image_cell(jpeg.tobytes()),
                    "landmarks_crop": rng.uniform(0, 96, 2 * IBUG68.points).astype(np.float32).tolist(),
                    "alpha_id": (z_id * model.id_std).astype(np.float32).tolist(),
                    "alpha_exp": (z_exp * model.exp_std).astype(np.float32).tolist(),
                    "yaw": 0.0,
                    "pitch": 0.0,
                    "roll": 0.0,
                    "scale": 1.0,
                    "reproj_rmse_px": 1.0,
                    "reproj_nme": 0.01,
                    "detection_score": 0.99,
                }
            )
    return rows


def model_metadata(model: MorphableModel) -> dict[str, str]:
    return {
        "morphset.model.name": model.name,
        "morphset.model.sha256": model.sha256,
        "morphset.model.k_id": str(model.k_id),
        "morphset.model.k_exp": str(model.k_exp),
    }


def write_synthetic_trainset(
    run_root: str,
    model: MorphableModel,
    n_subjects: int = 8,
    images_per_subject: int = 6,
    n_shards: int = 2,
    val_subjects: int = 0,
    seed: int = 0,
) -> int:
    """Commit ``n_shards`` trainset shards (whole subjects per shard) under ``run_root/export``."""
    rows = synthetic_rows(model, n_subjects, images_per_subject, val_subjects, seed)
    schema = load_schema("trainset")
    store = ShardStore(run_root, "export")
    subjects = sorted({r["subject"] for r in rows})
    groups = np.array_split(np.arange(len(subjects)), n_shards)
    for shard, idx in enumerate(groups):
        mine = {subjects[i] for i in idx}
        part = [r for r in rows if r["subject"] in mine]
        md = model_metadata(model) | {"huggingface": hf_metadata(subjects)}
        table = from_rows(part, schema, md)
        store.write(shard, table, schema, f"synthetic-{seed}", "synthetic", 0.0, md)
    # the folder a real export hands over: the card and the model beside data/
    write_folder(Run(run_root), subjects, split_counts(store), model, {"landmarks": "synthetic"})
    return len(rows)
