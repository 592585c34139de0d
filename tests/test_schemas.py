"""Arrow schemas as data: round trip, refusal of mismatching tables and of other versions."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schemas import SchemaError, all_schema_names, conform, from_rows, load_schema, parse_type
from pipeline.storage.store import ShardStore


def test_every_schema_file_loads_and_has_a_version():
    names = all_schema_names()
    for required in ("index", "detections", "landmarks", "trainset"):
        assert required in names
    for n in names:
        s = load_schema(n)
        assert s.version >= 1 and s.columns


def test_type_grammar():
    assert parse_type("list<float32>[136]") == pa.list_(pa.float32(), 136)
    assert parse_type("list<list<float32>[4]>") == pa.list_(pa.list_(pa.float32(), 4))
    with pytest.raises(SchemaError, match="unknown column type"):
        parse_type("complex128")


def _index_rows():
    return [
        {
            "image_id": "a/1.jpg",
            "subject": "a",
            "label": 0,
            "uri": "/x/a/1.jpg",
            "size_bytes": 10,
            "failure_reason": None,
        },
        {
            "image_id": "b/1.txt",
            "subject": "b",
            "label": 1,
            "uri": "/x/b/1.txt",
            "size_bytes": 3,
            "failure_reason": "not_an_image",
        },
    ]


def test_round_trip_through_the_store(tmp_path):
    schema = load_schema("index")
    store = ShardStore(str(tmp_path), "ingest")
    store.write(0, from_rows(_index_rows(), schema), schema, "fp", "ph", 0.1)
    back = store.read(0, schema)
    assert back.to_pylist() == _index_rows()
    assert store.sidecar(0)["failures"] == {"not_an_image": 1}
    # column selection reads only what is asked
    assert store.read(0, schema, columns=["image_id"]).column_names == ["image_id"]


def test_writer_refuses_tables_that_do_not_match():
    schema = load_schema("index")
    good = from_rows(_index_rows(), schema)
    with pytest.raises(SchemaError, match=r"missing columns \['uri'\]"):
        conform(good.drop(["uri"]), schema)
    with pytest.raises(SchemaError, match=r"unexpected columns \['extra'\]"):
        conform(good.append_column("extra", pa.array([1, 2])), schema)
    wrong = good.set_column(2, "label", pa.array(["0", "1"]))
    with pytest.raises(SchemaError, match="column 'label' has type string, declared int32"):
        conform(wrong, schema)
    nulls = good.set_column(0, "image_id", pa.array([None, "x"], pa.string()))
    with pytest.raises(SchemaError, match="'image_id' is not nullable but has 1 nulls"):
        conform(nulls, schema)


def test_reader_refuses_another_schema_version(tmp_path):
    schema = load_schema("index")
    store = ShardStore(str(tmp_path), "ingest")
    store.write(0, from_rows(_index_rows(), schema), schema, "fp", "ph", 0.1)
    path = store.data_path(0)
    t = pq.read_table(path)
    md = dict(t.schema.metadata)
    md[b"morphset.schema_version"] = b"99"
    pq.write_table(t.replace_schema_metadata(md), path)
    # as another morphset version would have committed it: a sidecar that matches the file
    import hashlib
    import json

    sc = store.sidecar(0)
    data = Path(path).read_bytes()
    sc["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    Path(store.sidecar_path(0)).write_text(json.dumps(sc))
    with pytest.raises(SchemaError, match=r"written with schema index v99, this morphset reads index v1"):
        store.read(0, schema)


def test_landmark_columns_name_their_scheme_and_a_run_does_not_mix_schemes(tmp_path):
    import hashlib
    import json

    schema = load_schema("landmarks")
    assert schema.arrow.field("landmarks").metadata[b"morphset.landmark_scheme"] == b"ibug68"
    store = ShardStore(str(tmp_path), "landmarks")
    row = {"image_id": "a/1.jpg", "subject": "a", "label": 0, "backend": "dlib", "backend_version": "1"}
    row |= {"weights_sha256": "x", "landmarks": [1.0] * 136, "failure_reason": None}
    store.write(0, from_rows([row], schema), schema, "fp", "ph", 0.1)
    assert store.read(0, schema).column("landmarks").to_pylist() == [[1.0] * 136]
    # as a build with a 68-value scheme of another name would have committed it
    path = store.data_path(0)
    t = pq.read_table(path)
    i = t.schema.get_field_index("landmarks")
    field = t.schema.field(i)
    other = field.with_metadata({**field.metadata, b"morphset.landmark_scheme": b"wflw98"})
    pq.write_table(t.cast(t.schema.set(i, other)), path)
    sc = store.sidecar(0)
    data = Path(path).read_bytes()
    sc["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    Path(store.sidecar_path(0)).write_text(json.dumps(sc))
    with pytest.raises(
        SchemaError, match="column 'landmarks' holds landmarks of scheme 'wflw98'; this run reads"
    ):
        store.read(0, schema)


def test_a_landmark_column_must_hold_whole_points_of_its_scheme(tmp_path, monkeypatch):
    import pipeline.config.schemas as schemas

    monkeypatch.setattr(schemas, "SCHEMA_DIR", tmp_path)
    col = '{name: pts, type: "list<float32>[100]", scheme: ibug68}'
    (tmp_path / "odd.yaml").write_text(f"name: odd\nversion: 1\ncolumns:\n  - {col}\n")
    with pytest.raises(
        SchemaError, match=r"odd.yaml: columns\[0\] \(pts\): a column of landmark scheme 'ibug68'"
    ):
        schemas.load_schema.__wrapped__("odd")
    (tmp_path / "unknown.yaml").write_text(
        f"name: unknown\nversion: 1\ncolumns:\n  - {col.replace('ibug68', 'five')}\n"
    )
    with pytest.raises(
        SchemaError, match="unknown.yaml: columns.0. .pts.: five: no such landmark scheme file"
    ):
        schemas.load_schema.__wrapped__("unknown")
