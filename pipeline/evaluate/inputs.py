"""Reading what evaluation measures: fit shards, ground truth (synthetic or scans), export crops, images.

All I/O of the evaluation stage lives here; the measures themselves are pure functions elsewhere.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config.schemas import META_SCHEMA_NAME, check_version, load_schema
from pipeline.core.tables import RunTables
from pipeline.evaluate.frame import Frame
from pipeline.imaging.crops import decode_crop
from pipeline.landmarks.base import N_POINTS as N_LANDMARKS

GT_REQUIRED = ("image_id", "subject", "alpha_id", "alpha_exp", "yaw")
GT_MODEL_SHA_KEYS = (b"morphset.model.sha256", b"morphset.model_sha256")


FIT_COLUMNS = (
    "image_id",
    "subject",
    "alpha_id",
    "alpha_exp",
    "rotation",
    "yaw",
    "reproj_rmse_px",
    "reproj_nme",
    "used",
    "iterations",
    "converged",
    "failure_reason",
)


def load_fits(tables: RunTables) -> Frame:
    """The columns evaluation needs from every committed shard of the run's fits (the table the
    labels come from, ``stages.export.fits_table``), one row per image."""
    store = tables.store("fits")
    shards = store.shards_with_sidecar()
    if not shards:
        raise FileNotFoundError(
            f"{store.folder}: no committed {tables.name('fits')} shards (run `morphset build` or "
            f"`morphset {tables.name('fits')}` first)"
        )
    table = store.dataset(tables.schema("fits"), shards).to_table(columns=list(FIT_COLUMNS))
    return Frame.from_arrow(table)


def fits_model_sha256(tables: RunTables) -> str | None:
    """The morphable-model sha256 the run's fit shards record in their metadata (if any)."""
    store = tables.store("fits")
    for s in store.shards_with_sidecar()[:1]:
        with store.fs.open(store.data_paths(s)[0], "rb") as f:
            md = pq.ParquetFile(f).schema_arrow.metadata or {}
        for key in GT_MODEL_SHA_KEYS:
            if key in md:
                return md[key].decode()
    return None


@dataclass
class SyntheticTruth:
    table: Frame  # one row per rendered image
    model_sha256: str | None
    path: str


def load_synthetic_truth(path: str | Path) -> SyntheticTruth:
    """``ground_truth.parquet`` written by ``morphset synth`` (or any table with the required columns)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: ground-truth file not found")
    try:
        pf = pq.ParquetFile(p)
    except Exception as exc:
        raise ValueError(f"{p}: not a Parquet file ({exc})") from exc
    md = pf.schema_arrow.metadata or {}
    # files written by morphset synth carry a schema name/version: refuse another version; a table
    # made by other tools (no morphset metadata) is accepted if it has the required columns
    if META_SCHEMA_NAME in md:
        check_version(md, load_schema("ground_truth"), str(p), pf.schema_arrow)
    names = pf.schema_arrow.names
    missing = [c for c in GT_REQUIRED if c not in names]
    if missing:
        raise ValueError(f"{p}: ground-truth table lacks columns {missing} (expected {list(GT_REQUIRED)})")
    cols = list(GT_REQUIRED) + (["model_sha256"] if "model_sha256" in names else [])
    table = Frame.from_arrow(pf.read(columns=cols))
    sha = next((md[k].decode() for k in GT_MODEL_SHA_KEYS if k in md), None)
    if sha is None and "model_sha256" in table and len(table):
        sha = str(table["model_sha256"][0])
    return SyntheticTruth(table, sha, str(p))


@dataclass
class ScanTruth:
    rows: list[dict]  # kind (image_id | subject), key, mesh, landmarks, yaw, expression_level_mm
    path: str


def read_landmarks_3d(path: str | Path) -> np.ndarray:
    """68 rows of ``x y z`` (mm, iBUG order) from a text file (whitespace or comma separated) or .npy."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: landmark file not found")
    try:
        if p.suffix.lower() == ".npy":
            lm = np.load(p, allow_pickle=False)
        else:
            lm = np.loadtxt(p, delimiter="," if "," in p.read_text(encoding="utf-8")[:200] else None, ndmin=2)
    except Exception as exc:
        raise ValueError(f"{p}: cannot read 3D landmarks ({exc})") from exc
    lm = np.asarray(lm, np.float64)
    if lm.shape != (N_LANDMARKS, 3) or not np.all(np.isfinite(lm)):
        raise ValueError(f"{p}: expected {N_LANDMARKS} finite rows of x y z, got shape {lm.shape}")
    return lm


def load_scan_truth(directory: str | Path) -> ScanTruth:
    """A scan directory with ``scans.csv`` (see docs/evaluation.md): columns ``mesh``, ``landmarks``
    and one of ``image_id`` (a scan per image, BU-3DFE style) or ``subject`` (a neutral scan per
    subject, MICC style); optional ``yaw`` (degrees) and ``expression_level_mm``."""
    d = Path(directory)
    index = d / "scans.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: scan directory must contain scans.csv (see docs/evaluation.md)")
    with open(index, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{index}: no scans listed")
    cols = set(rows[0])
    for need in ("mesh", "landmarks"):
        if need not in cols:
            raise ValueError(
                f"{index}:1: missing column {need!r} (need mesh, landmarks and image_id or subject)"
            )
    if not ({"image_id", "subject"} & cols):
        raise ValueError(f"{index}:1: need an image_id or a subject column")
    out = []
    for n, r in enumerate(rows, start=2):
        image_id = (r.get("image_id") or "").strip()
        subject = (r.get("subject") or "").strip()
        if not image_id and not subject:
            raise ValueError(f"{index}:{n}: neither image_id nor subject given")
        for key in ("mesh", "landmarks"):
            if not (d / r[key].strip()).is_file():
                raise FileNotFoundError(f"{index}:{n}: {key} file {r[key]!r} not found under {d}")

        def _num(key: str, row: dict = r, line: int = n) -> float | None:
            v = (row.get(key) or "").strip()
            if not v:
                return None
            try:
                return float(v)
            except ValueError:
                raise ValueError(f"{index}:{line}: {key} must be a number, got {v!r}") from None

        out.append(
            {
                "kind": "image_id" if image_id else "subject",
                "key": image_id or subject,
                "mesh": str(d / r["mesh"].strip()),
                "landmarks": str(d / r["landmarks"].strip()),
                "yaw": _num("yaw"),
                "expression_level_mm": _num("expression_level_mm"),
            }
        )
    return ScanTruth(out, str(d))


def load_truth(path: str | Path) -> SyntheticTruth | ScanTruth:
    p = Path(path)
    if p.is_dir():
        if (p / "ground_truth.parquet").is_file():
            return load_synthetic_truth(p / "ground_truth.parquet")
        return load_scan_truth(p)
    return load_synthetic_truth(p)


def load_export_items(tables: RunTables, splits: set[str] | None = None) -> tuple[list[str], list[str]]:
    """(image ids, subjects) of the run's training set, optionally only rows of ``splits``; no
    crop is read."""
    store = tables.store("trainset")
    shards = store.shards_with_sidecar()
    if not shards:
        return [], []
    flt = pc.field("split").isin(sorted(splits)) if splits is not None else None
    t = store.dataset(tables.schema("trainset"), shards).to_table(columns=["image_id", "subject"], filter=flt)
    return t.column("image_id").to_pylist(), t.column("subject").to_pylist()


def load_export_crops(
    tables: RunTables, image_ids: set[str] | None = None, splits: set[str] | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """(image ids, subjects, crops (N,112,96,3) uint8) of the run's training set, optionally only
    the given images (only those are decoded: a full CASIA export does not fit in memory) and only
    rows of the given ``splits`` (``{"val"}``: the subjects the encoder was not trained on)."""
    store = tables.store("trainset")
    shards = store.shards_with_sidecar()
    if not shards:
        return [], [], np.zeros((0, 112, 96, 3), np.uint8)
    ds = store.dataset(tables.schema("trainset"), shards)
    flt = pc.field("image_id").isin(sorted(image_ids)) if image_ids is not None else None
    if splits is not None:
        in_split = pc.field("split").isin(sorted(splits))
        flt = in_split if flt is None else flt & in_split
    t = ds.to_table(columns=["image_id", "subject", "crop_jpeg"], filter=flt)
    crops = []
    for image_id, data in zip(
        t.column("image_id").to_pylist(), t.column("crop_jpeg").to_pylist(), strict=True
    ):
        crop = decode_crop(data)
        if crop is None:
            raise ValueError(f"{store.folder}: crop of {image_id} is not a 112x96 JPEG")
        crops.append(crop)
    arr = np.stack(crops) if crops else np.zeros((0, 112, 96, 3), np.uint8)
    return t.column("image_id").to_pylist(), t.column("subject").to_pylist(), arr


def load_index_uris(tables: RunTables, image_ids: set[str]) -> dict[str, str]:
    """image_id -> uri from the run's index shards."""
    store = tables.store("index")
    shards = store.shards_with_sidecar()
    if not shards or not image_ids:
        return {}
    t = store.dataset(tables.schema("index"), shards).to_table(
        columns=["image_id", "uri"], filter=pc.field("image_id").isin(sorted(image_ids))
    )
    return dict(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist(), strict=True))


def load_thumbnail(uri: str, size: int = 160) -> np.ndarray | None:
    """An input photo, shrunk for the picture sheet; None if it cannot be read."""
    try:
        with fsspec.open(uri, "rb") as f, Image.open(f) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            return np.asarray(im)
    except Exception:  # a picture-sheet thumbnail is optional; the report notes the gap
        return None
