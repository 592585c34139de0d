"""Stage ``crop``: the aligned 112x96 face crop of each image, from the pixels of the pixel pass.

``run(inputs, ctx)``: ``inputs["index"]`` and ``inputs["landmarks"]`` (same shard, same row order)
-> rows of ``schemas/crops.yaml``. The crop is warped by the landmarks stage's ``align_matrix``
(SphereFace's 5-point similarity) and encoded as JPEG; the 68 landmarks are mapped into it. It
runs in the same task as detect, landmarks and embed (``reads_pixels``), so it costs no decode of
its own, and the export copies its crops instead of reading the dataset a second time: the
training set's crops are cut from the very pixels the landmarks were found on.

Per-image problems are failure reasons: the upstream reason carried forward, the decoder's reason,
``image_changed`` (the file's size is not the one landmarked). A read error that may pass
(``unreadable``, ``missing``) of an image the earlier stages read fails the shard instead, so that
it is tried again rather than committed without the image.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa

from pipeline.config.schemas import from_rows, load_schema
from pipeline.core.stage import Stage, StageContext, check_same_rows
from pipeline.imaging.align import transform_points, warp_crop
from pipeline.imaging.decode import dataset_root, max_pixels_from
from pipeline.landmarks.base import N_POINTS


class CropStage(Stage):
    name = "crop"
    inputs = ("index", "landmarks")
    schema = "crops"
    reads_pixels = True
    depends_on = ("stages.decode",)
    doc = "aligned 112x96 face crops, cut in the pixel pass (the export copies them)"

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        return run_shard(inputs, ctx)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def run_shard(inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
    """index + landmarks -> crops table (one row per index row, same order)."""
    index, lms = inputs["index"], inputs["landmarks"]
    check_same_rows(ctx, ("index", index), ("landmarks", lms), "landmarks")
    quality = int(ctx.params.jpeg_quality)
    max_pixels = max_pixels_from(ctx.config)
    root = dataset_root(index)
    rows: list[dict] = []
    for rec, lm in zip(index.to_pylist(), lms.to_pylist(), strict=True):
        row = {"image_id": rec["image_id"], "subject": rec["subject"], "label": rec["label"]}
        rows.append(row)
        reason = lm.get("failure_reason")
        if not reason and (lm.get("landmarks") is None or lm.get("align_matrix") is None):
            reason = "missing_landmarks"
        if reason:
            row["failure_reason"] = reason
            continue
        size = (lm.get("image_width"), lm.get("image_height"))
        decoded = ctx.images.read(rec["uri"], max_pixels, ctx.storage_options, root, size, read_before=True)
        if not decoded.ok:
            row["failure_reason"] = decoded.reason
            continue
        matrix = np.asarray(lm["align_matrix"], dtype=np.float64).reshape(2, 3)
        pts = np.asarray(lm["landmarks"], dtype=np.float64).reshape(N_POINTS, 2)
        row["crop_jpeg"] = encode_jpeg(warp_crop(decoded.image, matrix), quality)
        row["landmarks_crop"] = transform_points(pts, matrix).reshape(-1).astype(np.float32).tolist()
    return from_rows(rows, load_schema("crops"))
