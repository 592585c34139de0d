"""Nothing lost, nothing stale, no one in: the fault cases of docs/reliability.md, one test each.

Builds run in this process (``--scheduler sync``) on a small rendered set with dlib landmarks.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline import api
from pipeline.cli import main
from pipeline.storage.run import Run

pytestmark = pytest.mark.slow
SYNC = ["--scheduler", "sync", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "faces"
    api.synth(out, subjects=3, images_per_subject=3, seed=2, workers=1, yaw_range=[-20, 20])
    (out / "ground_truth.parquet").rename(out.parent / "ground_truth.parquet")  # keep the root images only
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rel-ref") / "run"
    rc = main(["build", str(run), "--dataset", "synthetic", "--root", str(data), "--landmarks", "dlib",
               "--shard-size", "3", *SYNC])  # fmt: skip
    assert rc == 0
    return run


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def export_rows(run: Path) -> list[tuple]:
    t = pads.dataset(sorted(glob.glob(str(run / "export" / "data" / "*.parquet")))).to_table(
        columns=["image_id", "crop_jpeg", "alpha_id"]
    )
    return sorted(
        (r["image_id"], r["crop_jpeg"], tuple(round(a, 4) for a in r["alpha_id"])) for r in t.to_pylist()
    )


def flip_byte(path: Path, offset: int, mask: int) -> None:
    """Alter one byte in place: same size, other content."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def temporaries(run: Path) -> list[str]:
    return glob.glob(str(run / "**" / "_tmp-*"), recursive=True)


# 1 -------------------------------------------------------------------------------------------
def test_a_list_file_cannot_escape_the_root_through_a_directory_symlink(tmp_path, data):
    root = tmp_path / "root"
    shutil.copytree(data, root)
    secret = tmp_path / "elsewhere" / "secret_dir"
    secret.mkdir(parents=True)
    shutil.copy(next((root / sorted(os.listdir(root))[0]).glob("*.jpg")), secret / "leak.jpg")
    subject = sorted(os.listdir(root))[0]
    (root / subject / "subdir_link").symlink_to(secret, target_is_directory=True)
    good = sorted((root / subject).glob("*.jpg"))[0].relative_to(root)
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,subject\n{good},{subject}\n{subject}/subdir_link/leak.jpg,mallory\n")
    result = api.ingest(tmp_path / "run", dataset="listed", root=str(root), list_file=str(lst))
    assert result.failures == {"symlink_escapes_root": 1}
    index = Run(tmp_path / "run").table("index").to_pylist()
    assert {r["subject"]: r["failure_reason"] for r in index} == {
        subject: None,
        "mallory": "symlink_escapes_root",
    }
    # and again when a file is opened: the stage refuses what resolves outside the root
    from pipeline.imaging.decode import read_image

    res = read_image(str(root / subject / "subdir_link" / "leak.jpg"), root=str(root))
    assert res.reason == "symlink_escapes_root"
    # the subject-folders layout resolves every component too
    result = api.ingest(tmp_path / "run2", dataset="foldered", root=str(root))
    assert result.failures.get("symlink_escapes_root") == 1


# 2 -------------------------------------------------------------------------------------------
def test_a_truncated_committed_shard_is_not_done_and_is_recomputed(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    want = export_rows(reference)
    fit = run / "fit" / "part-00001.parquet"
    fit.write_bytes(fit.read_bytes()[:100])
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["fit"]["done"] == status["fit"]["shards"] - 1
    assert main(["build", str(run), *SYNC, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"]["fit"]["shards_computed"] == 1
    assert export_rows(run) == want


def test_a_truncated_export_shard_is_recomputed_not_reported_done(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    want = export_rows(reference)
    p = run / "export" / "data" / "part-00000-train.parquet"
    p.write_bytes(p.read_bytes()[:-50])
    assert main(["build", str(run), *SYNC, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["export"]["shards_computed"] == 1
    assert export_rows(run) == want


@pytest.mark.parametrize(
    "stage, part",
    [
        ("ingest", "part-00001.parquet"),
        ("landmarks", "part-00000.parquet"),
        ("fit", "part-00002.parquet"),
        ("export", "data/part-00001-train.parquet"),
    ],
)
def test_a_flipped_byte_is_caught_by_the_next_build_and_redone(
    reference, tmp_path, capsys, caplog, stage, part
):
    """A flipped byte keeps the size (what a plan's stat compares): every build hashes the committed
    shards first, names and invalidates the damaged one and recomputes it; the run ends as a clean
    build's, and nothing reads the damaged bytes."""
    run = copy_run(reference, tmp_path)
    p = run / stage / part
    flip_byte(p, len(p.read_bytes()) // 2, 0x40)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.runner"):
        assert main(["build", str(run), *SYNC, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert str(p) in caplog.text and "sha256" in caplog.text
    if stage == "ingest":  # hashed before the ingest step, which writes the shard again
        assert report["ingest"]["shards_written"] == 1
    else:
        assert report["verified"]["invalidated"] == [f"{stage}/{part.rsplit('/', 1)[-1][5:10]}"]
        assert report["verified"]["shards"] >= 3 * 6 and report["verified"]["bytes"] > 0
        assert report["stages"][stage]["shards_computed"] == 1
    for s in ("ingest", "detect", "landmarks", "embed", "crop", "fit", "export"):
        for f in sorted((reference / s).glob("**/*.parquet")):
            rel = f.relative_to(reference)
            assert (run / rel).read_bytes() == f.read_bytes(), rel
    assert main(["verify", str(run)]) == 0


def test_verify_finds_a_corrupt_shard_and_the_next_build_repairs_it(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    p = run / "detect" / "part-00002.parquet"
    flip_byte(p, -40, 0x01)
    assert main(["verify", str(run), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert [c["path"] for c in result["corrupt"]] == [str(p)]
    assert main(["build", str(run), *SYNC, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["detect"]["shards_computed"] == 1
    assert main(["verify", str(run)]) == 0
    assert export_rows(run) == export_rows(reference)


# 3 -------------------------------------------------------------------------------------------
def test_crop_fails_the_shard_rather_than_dropping_an_unreadable_image(data, tmp_path, capsys):
    """The crop stage is the last to read the dataset: a file gone after the landmarks read it fails
    the shard (tried again next time), and the export, which copies the crops, never reads it."""
    root = tmp_path / "root"
    shutil.copytree(data, root)
    run = tmp_path / "run"
    assert main(["build", str(run), "--dataset", "synthetic", "--root", str(root), "--landmarks", "dlib",
                 "--shard-size", "3", "--until", "embed", *SYNC]) == 0  # fmt: skip
    victim = sorted(root.glob("*/*.jpg"))[0]
    kept = victim.read_bytes()
    victim.unlink()  # gone after the earlier stages read it (a flaky mount, say)
    rc = main(["crop", str(run), *SYNC])
    err = capsys.readouterr().err
    assert rc == 1 and str(victim) in err
    assert len(glob.glob(str(run / "_meta" / "crop" / "part-?????.json"))) == 2  # that shard is not committed
    victim.write_bytes(kept)
    assert main(["build", str(run), *SYNC, "--until", "fit"]) == 0
    shutil.rmtree(root)  # the export reads no image: the crops are in the run
    assert main(["export", str(run), *SYNC]) == 0
    ids = {r[0] for r in export_rows(run)}
    assert str(victim.relative_to(root)) in ids


# 4 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_a_storage_fault_is_one_line_exit_1_and_the_rerun_completes(
    reference, tmp_path, capsys, monkeypatch, code
):
    import pipeline.storage.atomic as atomic

    run = copy_run(reference, tmp_path)
    real = atomic._write_to

    def failing(f, content):
        name = str(getattr(f, "path", getattr(f, "name", "")))
        if f"{os.sep}fit{os.sep}" in name:
            f.write(b"partial")
            raise OSError(code, os.strerror(code))
        return real(f, content)

    monkeypatch.setattr(atomic, "_write_to", failing)
    rc = main(["build", str(run), *SYNC, "--set", "stages.fit.max_iterations=8"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert any(
        os.strerror(code) in line and errno.errorcode[code] in line and str(run / "fit") in line
        for line in lines
    )
    assert "Traceback" not in err
    assert temporaries(run) == []
    monkeypatch.setattr(atomic, "_write_to", real)
    assert main(["build", str(run), *SYNC, "--set", "stages.fit.max_iterations=8"]) == 0
    assert temporaries(run) == []


# 5 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["[]", "{}", "{not json"])
def test_a_malformed_sidecar_counts_as_not_done(reference, tmp_path, capsys, content, caplog):
    run = copy_run(reference, tmp_path)
    (run / "_meta" / "fit" / "part-00000.json").write_text(content)
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["fit"]["pending"] == 1
    assert "part-00000.json" in caplog.text
    assert main(["build", str(run), *SYNC, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["fit"]["shards_computed"] == 1


# 6 -------------------------------------------------------------------------------------------
def test_content_fingerprints_catch_an_edit_that_keeps_size_and_mtime(data, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(data, root)
    images = sorted(root.glob("*/*.jpg"))
    a, b = images[0], images[1]
    for mode in ("stat", "content"):
        run = tmp_path / f"run-{mode}"
        over = [f"stages.ingest.fingerprint={mode}"]
        api.ingest(run, dataset="d", root=str(root), shard_size=100, overrides=over)
        st = os.stat(a)
        flip_byte(a, -3, 0xFF)  # same size, other content
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
        again = api.ingest(run, dataset="d", root=str(root), shard_size=100, overrides=over)
        assert again.shards_written == ([] if mode == "stat" else [0])  # stat: the documented blind spot
        shutil.copy(b, a)
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
        shutil.copytree(data, root, dirs_exist_ok=True)


# 7 -------------------------------------------------------------------------------------------
def test_a_second_build_of_a_run_is_refused_naming_the_holder(reference, tmp_path, capsys, caplog):
    import socket

    run = copy_run(reference, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "started_at": "x", "command": "build"}
        (run / "_lock.json").write_text(json.dumps(lock))
        assert main(["build", str(run), *SYNC]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["build", str(run), *SYNC]) == 0  # the holder is gone: the stale lock is taken over
    assert "stale lock" in caplog.text
    assert not (run / "_lock.json").exists()


def test_two_concurrent_builds_one_wins(reference, tmp_path):
    run = copy_run(reference, tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "build",
        str(run),
        *SYNC,
        "--set",
        "stages.fit.max_iterations=6",
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2]
    assert "in use by build" in results[1][1]


# 8 -------------------------------------------------------------------------------------------
def test_the_dashboard_listens_on_localhost_only():
    from dags.cluster import open_client
    from pipeline.config.manifest import load_manifest

    m = load_manifest(overrides={"execution.n_workers": 1})
    with open_client(m, echo=False) as client:
        socks = client.run_on_scheduler(
            lambda dask_scheduler: [s.getsockname()[0] for s in dask_scheduler.http_server._sockets.values()]
        )
    assert socks and set(socks) <= {"127.0.0.1"}


def test_a_tampered_model_cache_is_not_accepted(tmp_path, caplog):
    import numpy as np

    from pipeline.config.manifest import load_manifest
    from pipeline.models import assets
    from pipeline.models.morphable_model import load_npz

    m = load_manifest(overrides={"cache_dir": str(tmp_path)})
    entry, cache = m.model("morphable_model"), m.cache_dir
    good = assets.load_model_entry(entry, cache)  # converts into the empty cache
    path = assets.cache_path(entry, cache)
    bad = load_npz(path)
    bad.id_basis[:, 0] *= 2.0  # the recorded source hash stays the same
    bad.save_npz(path)
    again = assets.load_model_entry(entry, cache)
    assert again.sha256 == good.sha256 == entry["content_sha256"]
    assert "does not match the manifest" in caplog.text
    assert np.allclose(load_npz(path).id_basis, good.id_basis)  # the cache was replaced


# 9 -------------------------------------------------------------------------------------------
def test_bad_values_and_bad_places_are_refused_up_front(data, tmp_path, capsys):
    base = [
        "build",
        str(tmp_path / "r"),
        "--dataset",
        "synthetic",
        "--root",
        str(data),
        "--landmarks",
        "dlib",
    ]
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error
        main([*base, "--shard-size", "0", *SYNC])
    assert exit_info.value.code == 2
    assert "--shard-size: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--workers", "0"])
    assert exit_info.value.code == 2
    assert "--workers: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert api_refuses_zero_workers(tmp_path, data)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_from(empty, tmp_path / "r2") == 2
    assert f"{empty}: no images to build" in capsys.readouterr().err
    (empty / "alice").mkdir()
    (empty / "alice" / "notes.txt").write_text("x")
    assert build_from(empty, tmp_path / "r3") == 2
    assert "none usable (not_an_image=1)" in capsys.readouterr().err
    # a missing model file is found before any image is read (not after detect and landmarks)
    nomodel = [*base[:2], *base[2:], "--set", f"models.morphable_model.source={tmp_path / 'none.npz'}", *SYNC]
    nomodel[1] = str(tmp_path / "r5")
    assert main(nomodel) == 2
    assert "none.npz" in capsys.readouterr().err
    assert not (tmp_path / "r5" / "ingest").exists() and not (tmp_path / "r5" / "detect").exists()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert main(["status", str(afile)]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text("{")
    assert main(["build", str(broken), *SYNC]) == 2
    assert "run.json: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*/part-*.parquet"))


def build_from(root: Path, run: Path) -> int:
    return main(
        ["build", str(run), "--dataset", "synthetic", "--root", str(root), "--landmarks", "dlib", *SYNC]
    )


def api_refuses_zero_workers(tmp_path: Path, data: Path) -> bool:
    """The API refuses it too, naming the manifest key."""
    from pipeline.config.manifest import ManifestError

    with pytest.raises(ManifestError, match="execution.n_workers"):
        api.build(tmp_path / "r4", dataset="synthetic", root=str(data), landmarks="dlib", workers=0)
    return True


def test_train_refuses_an_altered_export_shard_naming_it(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    p = run / "export" / "data" / "part-00001-train.parquet"
    flip_byte(p, len(p.read_bytes()) // 3, 0x10)
    assert main(["train", str(run), "--tiny", "--epochs", "1,0,0"]) == 1
    err = capsys.readouterr().err
    assert str(p) in err and "sha256 differs" in err and "Traceback" not in err
    assert main(["build", str(run), *SYNC]) == 0  # invalidated by train: export recomputes it
    assert export_rows(run) == export_rows(reference)


def test_train_refuses_a_damaged_or_missing_export_shard_and_never_trains_on_part(
    reference, tmp_path, capsys
):
    """A cut-short export shard: `train` exits non-zero naming it (and it is invalidated); asked
    again, it names the shard now missing; after `build` redoes it, training runs."""
    run = copy_run(reference, tmp_path)
    victim = sorted((run / "export" / "data").glob("part-00001-*.parquet"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 3 // 4])
    assert main(["train", str(run), "--tiny", "--epochs", "1"]) != 0
    assert str(victim) in capsys.readouterr().err
    assert main(["train", str(run), "--tiny", "--epochs", "1"]) != 0
    assert "export shard(s) 00001 of 3 not committed" in capsys.readouterr().err
    assert not (run / "train").exists() or not any((run / "train").rglob("*.pt"))
    assert main(["build", str(run), *SYNC]) == 0
    assert export_rows(run) == export_rows(reference)
    assert main(["train", str(run), "--tiny", "--epochs", "1"]) == 0


def test_one_oversized_file_is_its_own_reason_and_the_shard_goes_on(data, tmp_path):
    """A 1.5 GB sparse .jpg among a subject's photos is never read into a worker: it is recorded as
    file_too_large and every other image of its shard is processed."""
    import pyarrow.dataset as pads

    root = tmp_path / "root"
    shutil.copytree(data, root)
    subject = sorted(p for p in root.iterdir() if p.is_dir())[0]
    with open(subject / "huge.jpg", "wb") as f:
        f.truncate(1536 << 20)
    run = tmp_path / "run"
    assert main(["build", str(run), "--dataset", "synthetic", "--root", str(root), "--landmarks", "dlib",
                 "--until", "detect", *SYNC]) == 0  # fmt: skip
    rows = pads.dataset(str(run / "detect"), format="parquet").to_table().to_pylist()
    reasons = {r["image_id"]: r["failure_reason"] for r in rows}
    assert reasons.pop(f"{subject.name}/huge.jpg") == "file_too_large"
    assert reasons and sum(v is None for v in reasons.values()) >= len(reasons) - 1


def test_a_run_location_with_a_url_chain_is_refused_and_nothing_written(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "run::x", "--root", str(data)]) == 2
    assert "'::' chains fsspec URLs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_status_adds_up_for_every_stage_and_dropped_subjects_have_a_reason(data, tmp_path, capsys):
    """Per stage: input images = output rows without a reason + recorded failures. A subject left
    with fewer usable images than min_images_per_subject has its images recorded, not lost."""
    run = tmp_path / "run"
    # every subject of the rendered set has 3 images: asking for 4 drops them all from the export
    assert main(["build", str(run), "--dataset", "synthetic", "--root", str(data), "--landmarks", "dlib",
                 "--shard-size", "3", "--set", "stages.export.min_images_per_subject=3", *SYNC]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    images = status["ingest"]["rows"]
    for stage in ("detect", "landmarks", "embed", "crop", "fit"):
        st = status[stage]
        ok = st["rows"] - sum(st["failures"].values())  # these stages keep a row per image
        assert st["rows"] == images and ok >= 0, stage
    exp = status["export"]
    assert exp["rows"] + sum(exp["failures"].values()) == images
    # now a minimum no subject reaches: every usable image is recorded as such
    assert main(["build", str(run), "--set", "stages.export.min_images_per_subject=4", *SYNC]) == 0
    capsys.readouterr()
    assert main(["status", str(run), "--json"]) == 0
    exp = json.loads(capsys.readouterr().out)["export"]
    assert exp["rows"] == 0 and sum(exp["failures"].values()) == images
    assert exp["failures"].get("too_few_images_in_subject", 0) > 0


def test_verify_checks_a_read_only_run_and_reports_without_writing(reference, tmp_path, capsys, monkeypatch):
    import errno as _errno

    from pipeline.storage.run import Run

    run = copy_run(reference, tmp_path)
    p = run / "fit" / "part-00001.parquet"
    flip_byte(p, len(p.read_bytes()) // 2, 0x08)

    def refused(self, *a, **k):
        raise OSError(_errno.EROFS, "Read-only file system", str(run))

    monkeypatch.setattr(Run, "lock", refused)
    monkeypatch.setattr(Run, "migrate_layout", lambda self, stages: 0)
    before = sorted(str(q) for q in run.rglob("*"))
    assert main(["verify", str(run)]) == 1
    err = capsys.readouterr().err
    assert str(p) in err and "read-only run: not invalidated" in err
    assert sorted(str(q) for q in run.rglob("*")) == before  # nothing written, nothing removed


def test_a_build_refused_over_a_model_hash_leaves_no_run_folder(data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["build", str(run), "--dataset", "synthetic", "--root", str(data), "--landmarks", "dlib",
               "--set", "models.dlib_landmarks.sha256=" + "a" * 64, *SYNC])  # fmt: skip
    assert rc == 2 and "models.dlib_landmarks" in capsys.readouterr().err
    assert not run.exists()


def test_a_storage_fault_on_a_dask_cluster_is_tried_once_and_logs_no_failed_task(
    reference, tmp_path, monkeypatch, caplog
):
    """A full disk is not a passing fault: on a Dask cluster (threads of this process, so the
    fault can be injected) each shard meets it once — no retry — and no worker logs a failed
    task; the build stops with the one StorageFault."""
    import errno
    import logging

    from distributed import Client, LocalCluster

    import pipeline.storage.atomic as atomic
    from dags.build import DaskExecutor
    from pipeline.config.manifest import load_manifest
    from pipeline.core.runner import StorageFault, run_stages
    from pipeline.storage.run import Run

    run = copy_run(reference, tmp_path)
    real, attempts = atomic._write_to, []

    def full(f, content):
        name = str(getattr(f, "path", getattr(f, "name", "")))
        if f"{os.sep}fit{os.sep}" in name and "_meta" not in name:
            attempts.append(name.rsplit("-", 1)[-1])  # the shard's file name (temporaries are unique)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, content)

    monkeypatch.setattr(atomic, "_write_to", full)
    m = load_manifest(overrides={"stages.landmarks.backend": "dlib", "stages.fit.max_iterations": 7})
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
        caplog.at_level(logging.ERROR, logger="distributed"),
        pytest.raises(StorageFault, match="No space left"),
    ):
        run_stages(Run(run), m, ["fit"], DaskExecutor(client, retries=2), progress=False)
    assert 1 <= len(attempts) <= 3 and len(set(attempts)) == len(attempts)  # one try per shard, never again
    assert "Compute Failed" not in caplog.text and "Traceback" not in caplog.text


def test_a_shard_committed_before_its_task_was_lost_is_not_reported_failed(reference, tmp_path):
    """The scheduler or a worker lost after a task committed its shard: the task comes back
    cancelled, but the shard is done for its inputs and parameters — counted done, not failed."""
    from pipeline.config.manifest import load_manifest
    from pipeline.core.runner import Outcome, SyncExecutor, run_stages
    from pipeline.storage.run import Run

    class LosesReports(SyncExecutor):
        def execute(self, task, chains):
            for out in super().execute(task, chains):
                if out.result is not None and out.shard == 0:
                    out = Outcome(
                        out.stage, out.shard, error=RuntimeError("task cancelled by the Dask scheduler")
                    )
                yield out

    run = copy_run(reference, tmp_path)
    m = load_manifest(overrides={"stages.landmarks.backend": "dlib", "stages.fit.max_iterations": 8})
    report = run_stages(Run(run), m, ["fit"], LosesReports(), progress=False)
    fit = report["stages"]["fit"]
    assert fit["shards_failed"] == 0 and report["failed_shards"] == []
    assert fit["shards_computed"] == 2 and fit["shards_skipped"] == 1
    assert not list((run / "_meta" / "fit").glob("*.failed.json"))


def test_a_corrupt_input_keeps_its_own_message_and_blocks_what_follows_on_a_cluster(reference, tmp_path):
    """With the build's up-front hashing off, a stage meets the corrupt input itself: on a Dask
    cluster with retries the error stays the sha256 one (a second try would only say "not done"),
    and the shard's later stage is not reported failed."""
    from distributed import Client, LocalCluster

    from dags.build import DaskExecutor
    from pipeline.config.manifest import load_manifest
    from pipeline.core.runner import run_stages
    from pipeline.storage.run import Run

    run = copy_run(reference, tmp_path)
    p = run / "landmarks" / "part-00001.parquet"
    flip_byte(p, len(p.read_bytes()) // 2, 0x20)
    m = load_manifest(
        overrides={
            "stages.landmarks.backend": "dlib",
            "stages.fit.max_iterations": 6,  # the fit and the export must run again
            "execution.verify_committed": False,
        }
    )
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        report = run_stages(Run(run), m, ["fit", "export"], DaskExecutor(client, retries=2), progress=False)
    assert report["failed_shards"] == ["fit/00001"]
    (err,) = report["stages"]["fit"]["errors"]
    assert str(p) in err and "sha256 differs" in err and "not done" not in err
    assert report["stages"]["export"]["shards_failed"] == 0
    assert not (run / "_meta" / "export" / "part-00001.failed.json").exists()
