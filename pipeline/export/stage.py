"""Export: the training-set shards handed to trainers (schema ``trainset``).

Only images whose detection, landmarks and fit all succeeded; subjects with fewer usable images
than ``min_images_per_subject`` are dropped. Labels are dense over the surviving subjects and the
train/validation split is by subject (a salted hash orders the names), so both are decided once for
the whole run by :func:`prepare_global` (``_meta/export/_labels.json``) before any export shard runs.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config.schemas import from_rows, load_schema
from pipeline.core.stage import (
    DROPPED_ROWS_KEY,
    ConfigView,
    Stage,
    StageContext,
    StageTables,
    UndeclaredConfigRead,
)
from pipeline.export import handoff
from pipeline.imaging.crops import image_cell
from pipeline.storage.run import Run

LABELS_FILE = "_labels.json"
EXCLUDED = "excluded_subject"
TOO_FEW_IMAGES = "too_few_images_in_subject"


class SubjectListError(ValueError):
    """A subject list file (stages.export.exclude_subjects) is missing or malformed."""


def read_subject_list(path: str) -> list[str]:
    """Subject names from ``morphset overlap``'s CSV (``train_subject``), a CSV with a ``subject``
    column, or a plain list (one name per line; blank lines and ``#`` comments skipped)."""
    import csv
    import io

    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SubjectListError(f"stages.export.exclude_subjects: cannot read {path}: {exc}") from None
    lines = text.splitlines()
    header = next((ln for ln in lines if ln.strip() and not ln.startswith("#")), "")
    fields = [h.strip() for h in next(csv.reader([header]), [])] if header else []
    column = next((c for c in ("train_subject", "subject") if c in fields), None)
    if column is None:
        if len(fields) > 1:
            raise SubjectListError(
                f"{path}: line 1 has columns {fields}; expected a train_subject or subject column "
                "(morphset overlap's CSV), or one subject name per line"
            )
        return sorted({ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")})
    names = []
    for i, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        name = (row.get(column) or "").strip()
        if not name:
            raise SubjectListError(f"{path}: line {i}: empty {column}")
        names.append(name)
    return sorted(set(names))


def split_subjects(subjects: list[str], val_fraction: float, salt: str) -> dict[str, str]:
    """Deterministic split by subject: ``round(val_fraction · K)`` of the K subjects (at least one
    when K ≥ 10) go to ``val``, those first in an order given by a salted hash of their names, so
    the same names split the same way on any machine and a set of ≥ 10 subjects always has a
    validation split (below 10, one held-out subject would cost too much of the training set)."""
    k = len(subjects)
    n_val = int(np.floor(val_fraction * k + 0.5))
    if val_fraction > 0 and k >= 10:
        n_val = max(n_val, 1)
    n_val = min(n_val, k - 1) if k > 1 else 0
    order = sorted(subjects, key=lambda s: (hashlib.sha256(f"{salt}:{s}".encode()).digest(), s))
    held_out = set(order[:n_val])
    return {s: "val" if s in held_out else "train" for s in subjects}


def label_map(
    usable_counts: dict[str, int], min_images: int, val_fraction: float, salt: str
) -> dict[str, dict]:
    """Dense labels (sorted subject names) over subjects with enough usable images."""
    keep = sorted(s for s, n in usable_counts.items() if n >= min_images)
    split = split_subjects(keep, val_fraction, salt)
    return {s: {"label": i, "split": split[s], "images": usable_counts[s]} for i, s in enumerate(keep)}


class ExportStage(Stage):
    name = "export"
    inputs = ("index", "detect", "fit", "crop")
    table_settings = {"fit": "fits_table"}
    schema = "trainset"
    global_input = LABELS_FILE
    doc = "aligned crops + fit targets, the hand-off to trainers"

    def prepare(self, tables: StageTables, config: ConfigView) -> dict:
        return prepare_global(tables, config)

    def finish(self, run: Run, config: ConfigView) -> None:
        write_handoff(run, config)

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        return run_shard(inputs, ctx)


def write_handoff(run: Run, config: ConfigView) -> None:
    """``RUN/export/model/`` (the morphable model and its sha256) and the dataset card
    ``RUN/export/README.md`` (:mod:`pipeline.export.handoff`), written atomically after the
    last shard; a card never describes shards that are not committed."""
    from pipeline import __version__
    from pipeline.models.assets import resolve_morphable_model

    store = run.store("export")
    labels = store.read_json(LABELS_FILE) or {"subjects": {}}
    build = {"landmarks": config.stage_params("landmarks")["backend"], "version": __version__}
    model = resolve_morphable_model(config)
    handoff.write_folder(run, _subjects_in_label_order(labels), handoff.split_counts(store), model, build)


def _subjects_in_label_order(labels: dict) -> list[str]:
    subjects = labels.get("subjects", {})
    return [s for s, _ in sorted(subjects.items(), key=lambda kv: kv[1]["label"])]


def prepare_global(tables: StageTables, config: ConfigView) -> dict:
    """Count usable images per subject over all committed fit shards; write ``_meta/export/_labels.json``."""
    params = config.stage_params("export")
    excluded = set(read_subject_list(params["exclude_subjects"])) if params["exclude_subjects"] else set()
    counts: dict[str, int] = {}
    for shard in tables.shards("fit"):
        t = tables.read("fit", shard, columns=["subject", "failure_reason"])
        ok = t.filter(pc.is_null(t.column("failure_reason")))
        for s in ok.column("subject").to_pylist():
            counts[s] = counts.get(s, 0) + 1
    kept = {s: n for s, n in counts.items() if s not in excluded}
    labels = label_map(kept, params["min_images_per_subject"], params["val_fraction"], params["split_salt"])
    doc = {
        "min_images_per_subject": params["min_images_per_subject"],
        "val_fraction": params["val_fraction"],
        "split_salt": params["split_salt"],
        "subjects": labels,
        "dropped_subjects": sorted(s for s in kept if s not in labels),
        # named in the list and present in the run (the list's other names match nothing here)
        "excluded_subjects": sorted(excluded & set(counts)),
    }
    tables.write_json(LABELS_FILE, doc)
    return doc


def _build_metadata(fit_table: pa.Table, manifest: ConfigView) -> dict[str, str]:
    md = {
        k.decode(): v.decode()
        for k, v in (fit_table.schema.metadata or {}).items()
        if k.startswith(b"morphset.model.")
    }
    params = {s: manifest.stage_params(s) for s in ("ingest", "detect", "landmarks", "crop", "fit", "export")}
    try:  # the refinement's, where it supplied the labels (the export reads it, so may read its settings)
        params["refine"] = manifest.stage_params("refine")
    except UndeclaredConfigRead:
        pass
    md["morphset.build.params"] = json.dumps(params, sort_keys=True, default=str)
    return md


def run_shard(inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
    det, fit, crops = inputs["detect"], inputs["fit"], inputs["crop"]
    labels = ctx.run.store("export").read_json(LABELS_FILE)
    if labels is None:
        raise FileNotFoundError(
            f"{ctx.run_root}/export/{LABELS_FILE}: subject-label map missing (run the export stage, which writes it first)"
        )
    subjects = labels["subjects"]
    excluded = set(labels.get("excluded_subjects", []))
    det_by_id = {r["image_id"]: r for r in det.select(["image_id", "primary_score"]).to_pylist()}
    crop_by_id = {r["image_id"]: r for r in crops.to_pylist()}
    rows = []
    dropped: dict[str, str] = {}  # image_id -> why a fitted image is not in the trainset
    for f in fit.to_pylist():
        if f["failure_reason"] is None and f["subject"] in excluded:
            dropped[f["image_id"]] = EXCLUDED  # usable, but its subject is on the exclusion list
            continue
        if f["failure_reason"] is None and f["subject"] not in subjects:
            # usable, but its subject kept fewer than min_images_per_subject usable images
            dropped[f["image_id"]] = TOO_FEW_IMAGES
            continue
        if f["failure_reason"] is not None:
            dropped[f["image_id"]] = f["failure_reason"]  # carried forward, as every stage does
            continue
        image_id = f["image_id"]
        crow, drow = crop_by_id.get(image_id), det_by_id.get(image_id)
        if crow is None or drow is None:
            dropped[image_id] = "inputs_inconsistent"
            continue
        if crow["failure_reason"] is not None or crow["crop_jpeg"] is None:
            # the file changed or went bad after the landmarks were found: recorded
            dropped[image_id] = crow["failure_reason"] or "inputs_inconsistent"
            continue
        info = subjects[f["subject"]]
        rows.append(
            {
                "image_id": image_id,
                "subject": f["subject"],
                "label": info["label"],
                "split": info["split"],
                "crop_jpeg": image_cell(crow["crop_jpeg"]),
                "landmarks_crop": crow["landmarks_crop"],
                "alpha_id": f["alpha_id"],
                "alpha_exp": f["alpha_exp"],
                "yaw": f["yaw"],
                "pitch": f["pitch"],
                "roll": f["roll"],
                "scale": f["scale"],
                "reproj_rmse_px": f["reproj_rmse_px"],
                "reproj_nme": f["reproj_nme"],
                "detection_score": drow["primary_score"],
            }
        )
    table = from_rows(rows, load_schema("trainset"))
    return table.replace_schema_metadata(
        {
            **(table.schema.metadata or {}),
            **{k.encode(): v.encode() for k, v in _build_metadata(fit, ctx.config).items()},
            # rows this shard could not use, by image: the sidecar counts them under "failures"
            DROPPED_ROWS_KEY: json.dumps(dropped, sort_keys=True).encode(),
            # the features Hugging Face datasets reads: crops as Image, label as ClassLabel
            b"huggingface": handoff.hf_metadata(_subjects_in_label_order(labels)).encode(),
        }
    )
