"""Shard store: atomic commits, done-markers, fingerprints, fsspec memory:// and failed markers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.config.schemas import from_rows, load_schema
from pipeline.storage.store import ShardStore

ROWS = [
    {
        "image_id": f"s/{i}.jpg",
        "subject": "s",
        "label": 0,
        "uri": f"/d/s/{i}.jpg",
        "size_bytes": 1,
        "failure_reason": None,
    }
    for i in range(5)
]


def test_sidecar_is_the_done_marker_and_records_the_fingerprint(tmp_path):
    schema = load_schema("index")
    store = ShardStore(str(tmp_path), "ingest")
    assert not store.is_done(3)
    store.write(3, from_rows(ROWS, schema), schema, "fp-1", "ph", 0.5)
    assert store.is_done(3, "fp-1")
    assert not store.is_done(3, "fp-2")  # changed inputs or parameters mean not done
    sc = store.sidecar(3)
    assert sc["rows"] == 5 and sc["schema_version"] == 1 and sc["params_hash"] == "ph"
    assert store.shards_with_sidecar() == [3]


def test_writer_killed_between_data_and_sidecar_leaves_shard_not_done(tmp_path):
    """A real process is SIGKILLed right after the Parquet rename, before the sidecar."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from pipeline.config.schemas import from_rows, load_schema
        from pipeline.storage.store import ShardStore
        schema = load_schema("index")
        store = ShardStore({str(tmp_path)!r}, "ingest")
        real = store._atomic_write
        def killing_write(final, data):
            real(final, data)
            if final.endswith(".parquet"):
                os.kill(os.getpid(), signal.SIGKILL)
        store._atomic_write = killing_write
        store.write(0, from_rows({ROWS!r}, schema), schema, "fp", "ph", 0.1)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    store = ShardStore(str(tmp_path), "ingest")
    assert os.path.exists(store.data_path(0))  # the data file is there ...
    assert not store.is_done(0, "fp")  # ... but without its sidecar the shard is not done
    with pytest.raises(FileNotFoundError, match="not committed"):
        store.read(0, load_schema("index"))
    schema = load_schema("index")
    store.write(0, from_rows(ROWS, schema), schema, "fp", "ph", 0.1)  # the rerun completes it
    assert store.is_done(0, "fp") and store.read(0, schema).num_rows == 5
    leftovers = [n for n in os.listdir(store.dir) if n.startswith("_tmp-")]
    assert leftovers == []


def test_rewriting_a_shard_is_idempotent(tmp_path):
    schema = load_schema("index")
    store = ShardStore(str(tmp_path), "ingest")
    t = from_rows(ROWS, schema)
    store.write(0, t, schema, "fp", "ph", 0.1)
    first = open(store.data_path(0), "rb").read()
    store.write(0, t, schema, "fp", "ph", 0.2)  # e.g. Dask re-ran the task after a worker died
    assert open(store.data_path(0), "rb").read() == first
    assert sorted(os.listdir(store.dir)) == ["part-00000.parquet"]  # the data folder holds data only
    assert sorted(os.listdir(store.meta)) == ["part-00000.json"]


def test_memory_filesystem_and_dataset_reader():
    schema = load_schema("index")
    store = ShardStore("memory://morphset-test-run", "ingest")
    store.clear()
    for i in range(3):
        store.write(i, from_rows(ROWS, schema), schema, f"fp{i}", "ph", 0.1)
    ds = store.dataset(schema)
    assert ds.count_rows() == 15
    assert ds.to_table(columns=["image_id"]).num_columns == 1


def test_failed_marker_is_cleared_by_a_successful_write(tmp_path):
    schema = load_schema("index")
    store = ShardStore(str(tmp_path), "ingest")
    store.mark_failed(1, "fp", "ValueError: boom", "Traceback ...")
    assert store.failure(1)["error"] == "ValueError: boom"
    assert not store.is_done(1)
    store.write(1, from_rows(ROWS, schema), schema, "fp", "ph", 0.1)
    assert store.failure(1) is None and store.is_done(1, "fp")


def test_a_sidecar_naming_a_file_outside_its_shard_counts_as_not_done(tmp_path, caplog):
    """``files[].name`` is joined to the stage folder: a name with a path in it, or another
    shard's file, makes the sidecar malformed (not done, with a warning): no read or hash ever
    leaves the stage folder."""
    import json
    import logging

    schema = load_schema("index")
    store = ShardStore(str(tmp_path), "ingest")
    store.write(2, from_rows(ROWS, schema), schema, "fp", "ph", 0.1)
    good = json.loads(open(store.sidecar_path(2)).read())
    for name in ("../../outside.parquet", "/etc/passwd", "part-00003.parquet", "sub/part-00002.parquet"):
        doc = {**good, "files": [{"name": name, "bytes": 1, "sha256": "0" * 64}]}
        with open(store.sidecar_path(2), "w") as f:
            json.dump(doc, f)
        with caplog.at_level(logging.WARNING, logger="pipeline.storage.store"):
            assert store.sidecar(2) is None and not store.is_done(2), name
    assert "not this shard's in its stage folder" in caplog.text  # warned (once per sidecar)
    with open(store.sidecar_path(2), "w") as f:
        json.dump(good, f)
    assert store.is_done(2, "fp") and store.check(2) is None


def test_the_atomic_write_fsyncs_a_local_file_through_fsspec_before_the_rename(tmp_path, monkeypatch):
    """The store writes local runs through fsspec too: their files are synced before the rename
    (a crash must not leave the final name on an empty file); a memory file system has nothing to sync."""
    import fsspec

    import pipeline.storage.atomic as atomic

    synced, renamed = [], []
    real_fsync, fs = atomic.os.fsync, fsspec.filesystem("file")
    real_mv = fs.mv
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(len(renamed)) or real_fsync(fd))
    monkeypatch.setattr(fs, "mv", lambda a, b, **k: renamed.append(b) or real_mv(a, b, **k))
    target = str(tmp_path / "x" / "part-00000.parquet")
    atomic.atomic_write(target, b"data", fs=fs)
    assert synced == [0] and renamed == [target] and open(target, "rb").read() == b"data"
    atomic.atomic_write("/mem/part-00000.parquet", b"data", fs=fsspec.filesystem("memory"))
    assert synced == [0]
