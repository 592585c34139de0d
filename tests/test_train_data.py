"""The streaming trainset: committed shards only, each row once per epoch across workers."""

from __future__ import annotations

import collections

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config.schemas import SchemaError, from_rows, load_schema
from pipeline.storage.store import ShardStore
from pipeline.synthetic.toy import toy_model
from pipeline.synthetic.trainset import model_metadata, synthetic_rows, write_synthetic_trainset
from pipeline.train.data import (
    TrainsetStream,
    assign_units,
    compute_norm_stats,
    scan_trainset,
    to_input_tensor,
)

MODEL = {"k_id": 6, "k_exp": 3, "seed": 1, "spacing_mm": 7.0}  # the model fixture (conftest.py)


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("run")
    write_synthetic_trainset(
        str(root), model, n_subjects=10, images_per_subject=5, n_shards=5, val_subjects=2, seed=2
    )
    return str(root)


def _ids(ds, num_workers=0, batch_size=4):
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    return [i for b in dl for i in b["image_id"]]


def test_scan_reads_model_metadata_and_counts(run, model):
    info = scan_trainset(run)
    assert (info.model_sha256, info.k_id, info.k_exp) == (model.sha256, 6, 3)
    assert (info.n_train, info.n_val, info.num_classes) == (40, 10, 10)
    assert len(info.units) == 5


def test_each_row_exactly_once_per_epoch_across_two_workers(run):
    ds = TrainsetStream(scan_trainset(run), "train", seed=5, shuffle_buffer=7, extra_columns=("image_id",))
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        ids = _ids(ds, num_workers=2)
        counts = collections.Counter(ids)
        assert len(ids) == 40 and set(counts.values()) == {1}
        assert all(
            i.startswith(("s0000", "s0001", "s0002", "s0003", "s0004", "s0005", "s0006", "s0007"))
            for i in ids
        )
        orders.append(ids)
    assert orders[0] != orders[1]  # the epoch reseeds the order
    ds.set_epoch(1)
    assert _ids(ds, num_workers=2) == orders[1]  # and the same epoch replays identically


def test_assign_units_is_a_disjoint_cover():
    for n_units, n_workers in [(1, 2), (5, 2), (7, 3), (10, 4)]:
        for epoch in range(3):
            parts = [assign_units(n_units, 0, epoch, w, n_workers) for w in range(n_workers)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n_units))


def test_val_split_and_images_and_pixel_range(run):
    info = scan_trainset(run)
    val = list(TrainsetStream(info, "val", extra_columns=("image_id",)))
    assert len(val) == 10 and {r["image_id"][:5] for r in val} == {"s0008", "s0009"}
    img = val[0]["image"]
    assert img.shape == (3, 112, 96) and img.dtype == torch.float32
    assert -1.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.max()) > 0.5
    coefs = list(TrainsetStream(info, "train", images=False))
    assert len(coefs) == 40 and "image" not in coefs[0]
    assert coefs[0]["alpha_id"].shape == (6,) and coefs[0]["alpha_exp"].shape == (3,)


def test_to_input_tensor_maps_uint8_to_unit_range_and_checks_shape():
    x = np.zeros((2, 112, 96, 3), np.uint8)
    x[1] = 255
    t = to_input_tensor(x)
    assert t.shape == (2, 3, 112, 96) and float(t[0].max()) == -1.0 and float(t[1].min()) == 1.0
    with pytest.raises(ValueError, match=r"\(N, 112, 96, 3\)"):
        to_input_tensor(np.zeros((2, 96, 112, 3), np.uint8))


def test_norm_stats_come_from_the_train_split_only(tmp_path, model):
    rows = synthetic_rows(model, 4, 3, val_subjects=1, seed=0)
    for r in rows:
        if r["split"] == "val":
            r["alpha_id"] = [1000.0] * 6  # absurd values on val must not stretch the normalisation
    schema = load_schema("trainset")
    ShardStore(str(tmp_path), "export").write(
        0, from_rows(rows, schema), schema, "f", "p", 0, model_metadata(model)
    )
    stats = compute_norm_stats(scan_trainset(str(tmp_path)))
    train_ids = np.array([r["alpha_id"] for r in rows if r["split"] == "train"])
    assert np.allclose(stats["hi_id"], train_ids.max(0)) and np.allclose(stats["lo_id"], train_ids.min(0))
    robust = compute_norm_stats(scan_trainset(str(tmp_path)), "robust")
    assert np.all(robust["half_id"] <= stats["half_id"] + 1e-9)


def test_uncommitted_shards_are_ignored(tmp_path, model):
    write_synthetic_trainset(str(tmp_path), model, n_subjects=4, images_per_subject=2, n_shards=2)
    store = ShardStore(str(tmp_path), "export")
    store.fs.rm(store.sidecar_path(1))  # a writer died between data and sidecar
    info = scan_trainset(str(tmp_path))
    assert len(info.paths) == 1 and info.n_train == 4


def test_corrupt_crop_is_skipped_not_fatal(tmp_path, model):
    rows = synthetic_rows(model, 2, 3, seed=0)
    rows[2]["crop_jpeg"] = {"bytes": b"not a jpeg", "path": None}
    ok, small = cv2.imencode(".jpg", np.zeros((50, 50, 3), np.uint8))
    rows[4]["crop_jpeg"] = {"bytes": small.tobytes(), "path": None}  # decodable, wrong size
    schema = load_schema("trainset")
    ShardStore(str(tmp_path), "export").write(
        0, from_rows(rows, schema), schema, "f", "p", 0, model_metadata(model)
    )
    ds = TrainsetStream(scan_trainset(str(tmp_path)), "train")
    assert len(list(ds)) == 4 and ds.skipped == 2


def test_missing_export_and_mixed_models_are_refused(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="no committed trainset shards"):
        scan_trainset(str(tmp_path))
    write_synthetic_trainset(str(tmp_path), model, n_subjects=2, images_per_subject=2, n_shards=1)
    other = toy_model(k_id=6, k_exp=3, seed=99, spacing_mm=7.0)
    schema = load_schema("trainset")
    table = from_rows(synthetic_rows(other, 1, 2, seed=1), schema)
    ShardStore(str(tmp_path), "export").write(1, table, schema, "f", "p", 0, model_metadata(other))
    with pytest.raises(SchemaError, match="part-00001-train.parquet: morphable model metadata"):
        scan_trainset(str(tmp_path))


def test_flip_augment_mirrors_some_crops_and_nothing_else(run):
    info = scan_trainset(run)
    plain = {r["image_id"]: r["image"] for r in TrainsetStream(info, "train", extra_columns=("image_id",))}
    flipped = list(TrainsetStream(info, "train", flip_augment=True, extra_columns=("image_id",)))
    n_flipped = 0
    for r in flipped:
        orig = plain[r["image_id"]]
        if torch.equal(r["image"], orig):
            continue
        assert torch.equal(r["image"], orig.flip(-1))
        n_flipped += 1
    assert 0 < n_flipped < len(flipped)
