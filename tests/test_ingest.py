"""Ingest on real folders and on generated bad trees; resume, re-partition and extend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.manifest import load_manifest
from pipeline.config.schemas import load_schema
from pipeline.ingest.stage import IngestError, assign_labels, index_table, partition, run_ingest
from pipeline.storage.store import ShardStore


def _manifest(
    root: Path, shard_size: int = 10, layout: str = "subject-folders", list_file: str | None = None
):
    ds = {"root": str(root), "layout": layout}
    if list_file:
        ds["list_file"] = list_file
    return load_manifest(
        overrides={"datasets.t": ds, "stages.ingest.shard_size": shard_size, "stages.ingest.dataset": "t"}
    )


def _tree(root: Path, spec: dict[str, int]) -> None:
    for subject, n in spec.items():
        d = root / subject
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"{i:03d}.jpg").write_bytes(b"\xff\xd8\xff" + bytes([i]) * 10)


def test_ingest_real_fixture_faces(tmp_path, faces_dir):
    run = str(tmp_path / "run")
    r = run_ingest(_manifest(faces_dir, shard_size=12), run, "t")
    t = index_table(run)
    assert t.num_rows == 40 and r.subjects == 8
    assert t.column("failure_reason").null_count == 40
    labels = dict(zip(t.column("subject").to_pylist(), t.column("label").to_pylist(), strict=True))
    assert [s for s, _ in sorted(labels.items(), key=lambda kv: kv[1])] == sorted(labels)
    # whole subjects per shard
    store = ShardStore(run, "ingest")
    seen = {}
    for s in store.shards_with_sidecar():
        for subj in set(store.read(s, load_schema("index")).column("subject").to_pylist()):
            assert subj not in seen
            seen[subj] = s
    assert len(seen) == 8


def test_bad_tree_is_recorded_not_crashed(tmp_path):
    root = tmp_path / "data"
    _tree(root, {"alice": 2, "Zoë_Ünïcode": 1})
    (root / "alice" / "notes.txt").write_text("hello")
    (root / "alice" / "empty.jpg").write_bytes(b"")
    (root / "empty_subject").mkdir()
    (root / "stray.jpg").write_bytes(b"x")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"\xff\xd8\xff")
    os.symlink(outside, root / "alice" / "link.jpg")
    os.symlink(root / "alice" / "000.jpg", root / "alice" / "inside_link.jpg")
    (root / "alice" / ".DS_Store").write_bytes(b"junk")
    (root / "alice" / "folder.jpg").mkdir()  # a directory named like an image: recorded, not skipped
    (root / "alice" / "more").mkdir()  # a plain sub-folder holds files; it is no entry itself
    (root / "bob").mkdir()
    os.symlink(root / "alice" / "001.jpg", root / "bob" / "borrowed.jpg")  # alice's photo, another person
    _tree(root / "alice" / "more", {"nested": 1})
    run = str(tmp_path / "run")
    r = run_ingest(_manifest(root), run, "t")
    t = index_table(run)
    reasons = dict(zip(t.column("image_id").to_pylist(), t.column("failure_reason").to_pylist(), strict=True))
    assert reasons["alice/notes.txt"] == "not_an_image"
    assert reasons["alice/empty.jpg"] == "empty_file"
    assert reasons["alice/link.jpg"] == "symlink_escapes_root"
    assert reasons["alice/inside_link.jpg"] is None
    assert reasons["alice/000.jpg"] is None
    assert "Zoë_Ünïcode/000.jpg" in reasons
    assert "alice/.DS_Store" not in reasons
    assert reasons["alice/folder.jpg"] == "not_a_file"
    assert reasons["alice/more/nested/000.jpg"] is None and "alice/more" not in reasons
    assert reasons["bob/borrowed.jpg"] == "linked_from_another_subject"  # never two people's
    assert reasons["alice/001.jpg"] is None
    assert r.empty_subjects == ["empty_subject"] and r.stray_files == ["stray.jpg"]
    assert r.failures == {
        "empty_file": 1,
        "linked_from_another_subject": 1,
        "not_an_image": 1,
        "not_a_file": 1,
        "symlink_escapes_root": 1,
    }


def test_list_file_layout(tmp_path):
    root = tmp_path / "data"
    _tree(root, {"a": 2, "b": 1})
    lf = tmp_path / "list.csv"
    lf.write_text(
        "path,subject\na/000.jpg,alice\na/001.jpg,alice\nb/000.jpg,bob\n../outside.jpg,bob\nb/none.jpg,bob\n/etc/passwd,bob\n"
    )
    run = str(tmp_path / "run")
    run_ingest(_manifest(root, layout="list-file", list_file=str(lf)), run, "t")
    t = index_table(run)
    reasons = dict(zip(t.column("image_id").to_pylist(), t.column("failure_reason").to_pylist(), strict=True))
    assert reasons == {
        "a/000.jpg": None,
        "a/001.jpg": None,
        "b/000.jpg": None,
        "../outside.jpg": "escapes_root",
        "b/none.jpg": "missing",
        "/etc/passwd": "escapes_root",
    }
    bad = tmp_path / "bad.csv"
    bad.write_text("a/000.jpg,alice\na/001.jpg\n")
    with pytest.raises(IngestError, match=r"bad\.csv:2: expected 'path,subject'"):
        run_ingest(_manifest(root, layout="list-file", list_file=str(bad)), run, "t")
    # a quoted path spanning two lines: errors after it name the physical line, not the record
    spans = tmp_path / "spans.csv"
    spans.write_text('"a/000.jpg",alice\n"odd\nname.jpg",bob\n\na/001.jpg\n')
    with pytest.raises(IngestError, match=r"spans\.csv:5: expected 'path,subject'"):
        run_ingest(_manifest(root, layout="list-file", list_file=str(spans)), run, "t")


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="dataset root is not a directory"):
        run_ingest(_manifest(tmp_path / "nope"), str(tmp_path / "run"), "t")


def test_rerun_does_no_work_and_shard_size_change_redoes_it(tmp_path):
    root = tmp_path / "data"
    _tree(root, {f"s{i:02d}": 3 for i in range(10)})
    run = str(tmp_path / "run")
    r1 = run_ingest(_manifest(root, shard_size=6), run, "t")
    assert len(r1.shards_written) == 5
    r2 = run_ingest(_manifest(root, shard_size=6), run, "t")
    assert r2.shards_written == [] and len(r2.shards_skipped) == 5
    r3 = run_ingest(_manifest(root, shard_size=9), run, "t")
    assert len(r3.shards_written) == 4 and r3.shards_removed == [4]
    assert ShardStore(run, "ingest").shards_with_sidecar() == [0, 1, 2, 3]
    # a changed file (size) re-does only its shard
    (root / "s00" / "000.jpg").write_bytes(b"\xff\xd8\xff" + b"longer content")
    r4 = run_ingest(_manifest(root, shard_size=9), run, "t")
    assert r4.shards_written == [0]


def test_extend_adds_shards_for_new_subjects_only(tmp_path):
    root = tmp_path / "data"
    _tree(root, {"b": 3, "d": 3})
    run = str(tmp_path / "run")
    run_ingest(_manifest(root, shard_size=3), run, "t")
    store = ShardStore(run, "ingest")
    before = {
        s: store.sidecar(s)["written_at"] + open(store.data_path(s), "rb").read().hex()
        for s in store.shards_with_sidecar()
    }
    _tree(root, {"a": 2, "e": 4})
    r = run_ingest(_manifest(root, shard_size=3), run, "t", mode="extend")
    assert r.shards_written == [2, 3]
    after = {s: store.sidecar(s)["written_at"] + open(store.data_path(s), "rb").read().hex() for s in (0, 1)}
    assert after == before
    t = index_table(run)
    labels = dict(zip(t.column("subject").to_pylist(), t.column("label").to_pylist(), strict=True))
    assert labels == {"b": 0, "d": 1, "a": 2, "e": 3}  # existing labels kept, new ones follow


def test_partition_and_labels_are_deterministic():
    assert partition([("a", 5), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a", "b"], ["c"], ["d"]]
    assert assign_labels(["c", "a", "b", "a"]) == {"a": 0, "b": 1, "c": 2}


def test_cli_ingest_and_status(tmp_path):
    root = tmp_path / "data"
    _tree(root, {"a": 2, "b": 2})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli"]
    out = subprocess.run(
        cmd + ["ingest", str(run), "--dataset", "mine", "--root", str(root)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "4 files of 2 subjects" in out.stdout
    st = subprocess.run(cmd + ["status", str(run), "--json"], capture_output=True, text=True)
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["ingest"]["done"] == 1 and doc["detect"]["pending"] == 1
    bad = subprocess.run(
        cmd + ["ingest", str(run), "--set", "stages.ingest.shard_size=x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "stages.ingest.shard_size: expected integer" in bad.stderr
    shutil.rmtree(run)
