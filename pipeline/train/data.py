"""Streaming the export stage's trainset shards into torch.

Only committed shards (those with a ``_meta/export/part-NNNNN.json`` sidecar) are read. The unit of work is one
Parquet row group (at most ``pipeline.storage.store.ROW_GROUP_SIZE`` rows): each epoch the units are
permuted with a seed of (seed, epoch) and dealt round-robin to the DataLoader workers (and DDP
ranks), so every row is yielded exactly once per epoch; rows pass through a bounded shuffle
buffer seeded per (seed, epoch, worker). Only the needed columns are read; Phase II reads no
images at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.config.schemas import SchemaError, check_version
from pipeline.core.tables import RunTables
from pipeline.imaging.crops import CROP_HW, decode_crop
from pipeline.landmarks.scheme import IBUG68
from pipeline.storage.store import CorruptShard, ShardStore

log = logging.getLogger(__name__)

MODEL_META_KEYS = (
    "morphset.model.name",
    "morphset.model.sha256",
    "morphset.model.k_id",
    "morphset.model.k_exp",
)


@dataclass(frozen=True)
class Unit:
    path: str
    row_group: int
    rows: int


@dataclass(frozen=True)
class TrainsetInfo:
    """What the trainer needs to know about a run's committed trainset shards."""

    run_root: str
    storage_options: dict | None
    paths: tuple[str, ...]
    units: tuple[Unit, ...]
    model_name: str
    model_sha256: str
    k_id: int
    k_exp: int
    num_classes: int
    n_train: int
    n_val: int

    def store(self) -> ShardStore:
        return RunTables(self.run_root, None, self.storage_options).store("trainset")


def scan_trainset(run_root: str, storage_options: dict | None = None) -> TrainsetInfo:
    """List the committed shards, check schema version and model metadata agree, count rows."""
    tables = RunTables(run_root, None, storage_options)
    store = tables.store("trainset")
    schema = tables.schema("trainset")
    shards = store.shards_with_sidecar()
    for s in shards:
        # every committed shard whole (size and sha256, once per training run: row groups are
        # streamed later, unhashed): a damaged one is refused, never skipped — training on the
        # rest would train on part of the set without a word
        bad = store.check(s)
        if bad is not None:
            store.invalidate(s)  # the next `morphset build` recomputes it
            raise CorruptShard(*bad)
    # every shard of the run's index exported (where the run has one: a trainset may travel alone)
    index = tables.shards("index")
    missing = sorted(set(index) - set(shards))
    if shards and missing:
        raise FileNotFoundError(
            f"{store.dir}: export shard(s) {', '.join(f'{i:05d}' for i in missing[:10])}"
            f"{' …' if len(missing) > 10 else ''} of {len(index)} not committed (the training set is "
            "incomplete); run `morphset build` on the run first"
        )
    if not shards:
        raise FileNotFoundError(
            f"{store.dir}: no committed trainset shards (part-NNNNN-<split>.parquet with its "
            "_meta/export/part-NNNNN.json); run `morphset export` first"
        )
    paths, units, meta = [], [], None
    max_label, n_train, n_val = -1, 0, 0
    for s in shards:
        for path in store.data_paths(s):
            with store.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                md = pf.schema_arrow.metadata or {}
                check_version(md, schema, path, pf.schema_arrow)
                this = {k: md.get(k.encode(), b"").decode() for k in MODEL_META_KEYS}
                missing = [k for k, v in this.items() if not v]
                if missing:
                    raise SchemaError(f"{path}: trainset shard lacks key-value metadata {missing}")
                if meta is None:
                    meta = this
                elif this != meta:
                    raise SchemaError(
                        f"{path}: morphable model metadata {this} differs from {paths[0]}'s {meta}; "
                        "rebuild the export stage with one model"
                    )
                t = pf.read(columns=["label", "split"])
                for rg in range(pf.metadata.num_row_groups):
                    units.append(Unit(path, rg, pf.metadata.row_group(rg).num_rows))
            paths.append(path)
            if t.num_rows:
                max_label = max(max_label, int(pc.max(t["label"]).as_py()))
                n_train += int(pc.sum(pc.equal(t["split"], "train")).as_py() or 0)
                n_val += int(pc.sum(pc.equal(t["split"], "val")).as_py() or 0)
    assert meta is not None
    try:
        k_id, k_exp = int(meta["morphset.model.k_id"]), int(meta["morphset.model.k_exp"])
    except ValueError:
        raise SchemaError(f"{paths[0]}: morphset.model.k_id/k_exp must be integers, got {meta}") from None
    return TrainsetInfo(
        run_root,
        storage_options,
        tuple(paths),
        tuple(units),
        meta["morphset.model.name"],
        meta["morphset.model.sha256"],
        k_id,
        k_exp,
        max_label + 1,
        n_train,
        n_val,
    )


def _coefficient_matrix(table: pa.Table, column: str, k: int, where: str) -> np.ndarray:
    col = table[column].combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and not np.all(lengths == k):
        bad = int(np.flatnonzero(lengths != k)[0])
        raise SchemaError(f"{where}: {column} of row {bad} has {lengths[bad]} values, metadata says {k}")
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)


def compute_norm_stats(info: TrainsetInfo, mode: str = "minmax") -> dict[str, np.ndarray]:
    """Per-dimension [-1,1] normalisation of alpha_id / alpha_exp from the train split only.

    Returns ``lo_*``, ``hi_*``, ``mid_*`` = (hi+lo)/2 and ``half_*`` = (hi-lo)/2 (float64, a
    constant dimension gets half = 1 so it maps to 0 instead of dividing by zero). ``robust`` uses
    the 1st/99th percentiles, so a few bad fits do not squash everyone else towards 0.
    """
    store = info.store()
    ids, exps = [], []
    for path in info.paths:
        with store.fs.open(path, "rb") as f:
            t = pq.ParquetFile(f).read(columns=["split", "alpha_id", "alpha_exp"])
        t = t.filter(pc.equal(t["split"], "train"))
        ids.append(_coefficient_matrix(t, "alpha_id", info.k_id, path))
        exps.append(_coefficient_matrix(t, "alpha_exp", info.k_exp, path))
    a_id, a_exp = np.concatenate(ids), np.concatenate(exps)
    if not len(a_id):
        raise ValueError(f"{store.dir}: the trainset has no rows with split == 'train'")
    if not (np.all(np.isfinite(a_id)) and np.all(np.isfinite(a_exp))):
        raise ValueError(f"{store.dir}: alpha_id/alpha_exp of the train split contain non-finite values")
    out: dict[str, np.ndarray] = {}
    for key, a in (("id", a_id.astype(np.float64)), ("exp", a_exp.astype(np.float64))):
        if mode == "robust":
            lo, hi = np.percentile(a, 1, axis=0), np.percentile(a, 99, axis=0)
        elif mode == "minmax":
            lo, hi = a.min(axis=0), a.max(axis=0)
        else:
            raise ValueError(f"stages.train.target_norm: expected minmax or robust, got {mode!r}")
        half = (hi - lo) / 2
        half = np.where(half > 1e-12, half, 1.0)
        out.update({f"lo_{key}": lo, f"hi_{key}": hi, f"mid_{key}": (hi + lo) / 2, f"half_{key}": half})
    return out


def normalise(alpha: torch.Tensor, mid: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    return (alpha - mid) / half


def denormalise(c: torch.Tensor, mid: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    return c * half + mid


def to_input_tensor(crops_uint8: np.ndarray) -> torch.Tensor:
    """(N, 112, 96, 3) uint8 RGB -> (N, 3, 112, 96) float32 in [-1, 1]."""
    a = np.asarray(crops_uint8)
    if a.ndim != 4 or a.shape[1:] != (*CROP_HW, 3) or a.dtype != np.uint8:
        raise ValueError(
            f"crops: expected uint8 array (N, {CROP_HW[0]}, {CROP_HW[1]}, 3), got {a.dtype} {a.shape}"
        )
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (DDP), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def assign_units(n_units: int, seed: int, epoch: int, worker: int, n_workers: int) -> list[int]:
    """Indices of the units one global worker reads this epoch (a disjoint cover over workers)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_units)
    return [int(i) for i in order[worker::n_workers]]


class TrainsetStream(IterableDataset):
    """Rows of one split as dicts: ``image`` (3,112,96) in [-1,1] (unless ``images=False``),
    ``label`` int64, ``alpha_id`` (k_id) and ``alpha_exp`` (k_exp) float32 in model units, plus
    any ``extra_columns`` as Python values. Call :meth:`set_epoch` before each epoch."""

    def __init__(
        self,
        info: TrainsetInfo,
        split: str = "train",
        seed: int = 0,
        shuffle_buffer: int = 2048,
        images: bool = True,
        flip_augment: bool = False,
        extra_columns: tuple[str, ...] = (),
        landmarks: bool = False,
    ) -> None:
        super().__init__()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.info = info
        self.split = split
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.images = images
        self.flip_augment = flip_augment
        self.extra_columns = tuple(extra_columns)
        self.landmarks = landmarks
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.info.n_train if self.split == "train" else self.info.n_val

    def _columns(self) -> list[str]:
        cols = ["split", "label", "alpha_id", "alpha_exp", *self.extra_columns]
        cols += ["landmarks_crop"] if self.landmarks and "landmarks_crop" not in cols else []
        return cols + (["crop_jpeg"] if self.images else [])

    def _rows(self, unit: Unit, fs: object) -> Iterator[dict]:
        with fs.open(unit.path, "rb") as f:
            t = pq.ParquetFile(f).read_row_group(unit.row_group, columns=self._columns())
        t = t.filter(pc.equal(t["split"], self.split))
        if not t.num_rows:
            return
        where = f"{unit.path} row group {unit.row_group}"
        a_id = _coefficient_matrix(t, "alpha_id", self.info.k_id, where)
        a_exp = _coefficient_matrix(t, "alpha_exp", self.info.k_exp, where)
        labels = t["label"].to_numpy().astype(np.int64)
        extras = {c: t[c].to_pylist() for c in self.extra_columns}
        if self.landmarks:
            extras["landmarks_crop"] = t["landmarks_crop"].to_pylist()
        jpegs = t["crop_jpeg"].to_pylist() if self.images else None
        for i in range(t.num_rows):
            row = {"label": labels[i], "alpha_id": a_id[i], "alpha_exp": a_exp[i]}
            row.update({c: v[i] for c, v in extras.items()})
            if jpegs is not None:
                row["crop_jpeg"] = jpegs[i]
            yield row

    def _finish(self, row: dict, rng: np.random.Generator, where: str) -> dict | None:
        out = {
            "label": torch.tensor(row["label"]),
            "alpha_id": torch.from_numpy(row["alpha_id"].copy()),
            "alpha_exp": torch.from_numpy(row["alpha_exp"].copy()),
        }
        out.update({c: row[c] for c in self.extra_columns})
        if self.images:
            img = decode_crop(row["crop_jpeg"])
            if img is None:
                # a corrupt crop must not stop a long training run: skip it, say so
                self.skipped += 1
                log.warning("%s: skipping a row whose crop_jpeg is not a %dx%d JPEG", where, *CROP_HW)
                return None
            flipped = bool(self.flip_augment and rng.random() < 0.5)
            if flipped:
                img = img[:, ::-1]
            out["image"] = to_input_tensor(img[None])[0]
            if self.landmarks:
                pts = np.asarray(row["landmarks_crop"], np.float32).reshape(IBUG68.points, 2)
                if flipped:  # the mirror image: x mirrored, left and right points swapped
                    pts = pts[IBUG68.mirror] * np.array([-1.0, 1.0], np.float32) + np.array(
                        [CROP_HW[1] - 1.0, 0.0], np.float32
                    )
                out["landmarks"] = torch.from_numpy(np.ascontiguousarray(pts))
        return out

    def __iter__(self) -> Iterator[dict]:
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        rank, world = distributed_rank_world()
        g, total = rank * nw + wid, world * nw
        fs = self.info.store().fs
        mine = assign_units(len(self.info.units), self.seed, self.epoch, g, total)
        rng = np.random.default_rng([self.seed, self.epoch, g, 1])
        buf: list[dict] = []
        where = f"{self.info.run_root}/export"
        for ui in mine:
            for row in self._rows(self.info.units[ui], fs):
                if len(buf) < self.shuffle_buffer:
                    buf.append(row)
                    continue
                j = int(rng.integers(len(buf)))
                row, buf[j] = buf[j], row
                out = self._finish(row, rng, where)
                if out is not None:
                    yield out
        for j in rng.permutation(len(buf)):
            out = self._finish(buf[int(j)], rng, where)
            if out is not None:
                yield out
