"""Reliability of `morphset build` with real processes: kill and resume, worker death, a real
multi-process Dask cluster, parameter changes, extend, and bad images inside the dataset.

The dataset is rendered by `morphset synth` (no download, no ../shared). Builds use the offline
dlib landmark backend. Every build's export is compared with an uninterrupted reference build.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

pytestmark = pytest.mark.slow

SUBJECTS, IMAGES = 6, 3
SHARD = 6  # images per shard -> 3 shards
BASE_ARGS = ["--dataset", "synthset", "--shard-size", str(SHARD), "--landmarks", "dlib", "--no-progress"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "faces"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "synth",
            "--subjects",
            str(SUBJECTS),
            "--images-per-subject",
            str(IMAGES),
            "--seed",
            "3",
            "--yaw-range",
            "-30",
            "30",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _cmd(run: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "build", str(run), "--root", str(root), *BASE_ARGS, *extra]


def build(run: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(run, root, "--workers", "2", *extra), capture_output=True, text=True, env=ENV, timeout=600
    )


def export_rows(run: Path) -> list[tuple]:
    files = sorted(glob.glob(str(run / "export" / "data" / "*.parquet")))
    t = pads.dataset(files).to_table(
        columns=["image_id", "label", "split", "crop_jpeg", "alpha_id", "alpha_exp", "yaw"]
    )
    rows = [
        (
            r["image_id"],
            r["label"],
            r["split"],
            r["crop_jpeg"],
            tuple(round(a, 3) for a in r["alpha_id"]),
            tuple(round(a, 3) for a in r["alpha_exp"]),
            round(r["yaw"], 3),
        )
        for r in t.to_pylist()
    ]
    return sorted(rows)


def visible_temporaries(run: Path) -> list[str]:
    return [p for p in glob.glob(str(run / "**" / "_tmp-*"), recursive=True)]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> tuple[Path, list[tuple]]:
    """The uninterrupted build, its stderr going to a file as in a batch job (progress on)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    log = run.parent / "build.log"
    cmd = [c for c in _cmd(run, dataset, "--workers", "2") if c != "--no-progress"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        # a shard's line is in the log while the build still runs (not all at the end)
        seen_while_running = False
        while proc.poll() is None:
            if re.search(r"detect: 1/\d+ shards, part-\d{5} committed", log.read_text()):
                seen_while_running = proc.poll() is None
                break
            time.sleep(0.05)
        assert proc.wait(timeout=600) == 0, log.read_text()
    (run.parent / "seen_while_running").write_text(str(seen_while_running))
    rows = export_rows(run)
    assert len(rows) >= SUBJECTS * IMAGES * 0.8  # most renders are detected, landmarked and fitted
    assert len({r[0] for r in rows}) == len(rows)
    return run, rows


def test_reference_build_reports_and_status(reference):
    run, rows = reference
    report = json.loads((run / "report.json").read_text())
    assert report["failed_shards"] == []
    for stage in ("detect", "landmarks", "fit", "export"):
        st = report["status"][stage]
        assert st["done"] == st["shards"] == SUBJECTS * IMAGES // SHARD
    assert report["images_per_second"] > 0


def test_a_batch_job_log_has_a_line_per_committed_shard_while_it_runs(reference):
    run, _ = reference
    text = (run.parent / "build.log").read_text()
    assert (run.parent / "seen_while_running").read_text() == "True", text
    shards = SUBJECTS * IMAGES // SHARD
    # images and failures are counted over the stage so far
    assert re.search(
        rf"ingest: {shards}/{shards} shards, part-\d{{5}} written, {SUBJECTS * IMAGES} images, 0 failed", text
    )
    for stage in ("detect", "landmarks", "crop", "fit", "export"):
        lines = re.findall(rf"^\S+Z {stage}: (\d+)/{shards} shards, part-\d{{5}} committed.*$", text, re.M)
        assert [int(k) for k in lines] == list(range(1, shards + 1)), (stage, text)
    last = re.findall(r"^\S+Z detect: .*$", text, re.M)[-1]
    assert "img/s" in last and "ETA 0:00:00" in last
    assert "\r" not in text  # no bar redrawn into the file


def test_rerun_does_no_work(reference, dataset):
    run, rows = reference
    before = {p: os.path.getmtime(p) for p in glob.glob(str(run / "_meta" / "*" / "part-*.json"))}
    proc = build(run, dataset, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert all(st["shards_computed"] == 0 for st in report["stages"].values())
    assert {p: os.path.getmtime(p) for p in glob.glob(str(run / "_meta" / "*" / "part-*.json"))} == before


def _wait_for(pattern: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> bool:
    """Poll until a file matching ``pattern`` exists (False if ``proc`` ended first or on timeout)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if glob.glob(pattern):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    "kill_when",
    ["_meta/detect/part-00000.json", "_meta/fit/part-00000.json", "_meta/export/_labels.json"],
    ids=["during-detect", "during-fit", "between-fit-and-export"],
)
def test_sigkill_then_resume_gives_the_uninterrupted_export(kill_when, reference, dataset, tmp_path):
    _, want = reference
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(run, dataset, "--workers", "2"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        reached = _wait_for(str(run / kill_when), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its LocalCluster workers
        proc.wait()
    assert reached, f"the build ended before {kill_when} appeared"
    done = glob.glob(str(run / "_meta" / "export" / "part-?????.json"))
    assert len(done) < SUBJECTS * IMAGES // SHARD  # it really was interrupted
    resumed = build(run, dataset)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert export_rows(run) == want
    assert visible_temporaries(run) == []


def test_a_worker_killed_mid_run_does_not_change_the_result(reference, dataset, tmp_path):
    from distributed import Client, LocalCluster

    from dags.build import DaskExecutor
    from dags.cluster import register_thread_budget
    from pipeline.config.manifest import load_manifest
    from pipeline.core.registry import STAGES
    from pipeline.core.runner import run_stages
    from pipeline.ingest.stage import run_ingest
    from pipeline.storage.run import Run

    _, want = reference
    run = tmp_path / "run"
    m = load_manifest(
        overrides={
            "datasets.synthset": {"root": str(dataset), "layout": "subject-folders"},
            "stages.ingest.shard_size": SHARD,
            "stages.landmarks.backend": "dlib",
        }
    )
    run_ingest(m, str(run), "synthset")
    killed = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        register_thread_budget(client)  # as every cluster the commands open (dags/cluster.py)

        def killer():
            if _wait_for(str(run / "_meta" / "detect" / "part-00000.json")):
                pids = client.run(os.getpid)
                victim = sorted(pids.values())[0]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        report = run_stages(Run(run), m, list(STAGES), DaskExecutor(client), progress=False)
        t.join(timeout=5)
    assert killed, "no worker was killed"
    assert report["failed_shards"] == []
    assert export_rows(run) == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_multi_process_cluster_gives_the_same_export(reference, dataset, tmp_path):
    """``dask scheduler`` + ``dask worker`` processes started in another directory than the driver,
    and the run given as a relative path: the driver makes it absolute before any task is sent."""
    _, want = reference
    port = _free_port()
    elsewhere = tmp_path / "workers-cwd"
    elsewhere.mkdir()
    driver_cwd = tmp_path / "driver-cwd"
    driver_cwd.mkdir()
    py = [sys.executable, "-m"]
    procs = [
        subprocess.Popen(
            py
            + [
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        time.sleep(2)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    py
                    + [
                        "distributed.cli.dask_worker",
                        f"tcp://127.0.0.1:{port}",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                    ],
                    env=ENV,
                    cwd=str(elsewhere),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        proc = subprocess.run(
            _cmd(Path("run"), dataset, "--scheduler", f"tcp://127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            env=ENV,
            cwd=str(driver_cwd),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"joined Dask cluster tcp://127.0.0.1:{port}" in proc.stderr
        assert export_rows(driver_cwd / "run") == want
        assert not (elsewhere / "run").exists()
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _sidecar_times(run: Path, stage: str) -> dict[str, str]:
    return {
        p: json.loads(Path(p).read_text())["written_at"] + Path(p).read_text()
        for p in sorted(glob.glob(str(run / "_meta" / stage / "part-?????.json")))
    }


def test_fit_parameter_change_reruns_fit_and_export_only(reference, dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    before = {s: _sidecar_times(run, s) for s in ("ingest", "detect", "landmarks", "fit", "export")}
    proc = build(run, dataset, "--scheduler", "sync", "--set", "stages.fit.max_iterations=7", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["stages"]["detect"]["shards_computed"] == 0
    assert report["stages"]["landmarks"]["shards_computed"] == 0
    assert report["stages"]["fit"]["shards_computed"] == 3
    assert report["stages"]["export"]["shards_computed"] == 3
    after = {s: _sidecar_times(run, s) for s in before}
    for s in ("ingest", "detect", "landmarks"):
        assert after[s] == before[s]
    for s in ("fit", "export"):
        assert after[s] != before[s]


def test_extend_adds_shards_for_new_subjects_only(reference, dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    before = {s: _sidecar_times(run, s) for s in ("ingest", "detect", "fit")}
    new = data / "zz_new_subject"
    shutil.copytree(data / sorted(p.name for p in data.iterdir() if p.is_dir())[0], new)
    proc = build(run, data, "--scheduler", "sync", "--mode", "extend", "--json")
    assert proc.returncode == 0, proc.stderr
    after = {s: _sidecar_times(run, s) for s in before}
    for s in before:
        assert len(after[s]) == len(before[s]) + 1
        assert {k: v for k, v in after[s].items() if k in before[s]} == before[s]
    rows = export_rows(run)
    assert any(r[0].startswith("zz_new_subject/") for r in rows)


def test_bad_images_are_recorded_and_the_build_succeeds(reference, dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    subj = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (subj / "zero.jpg").write_bytes(b"")
    (subj / "text.jpg").write_text("not an image at all")
    good = next(subj.glob("*.jpg")).read_bytes()
    (subj / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (subj / "notes.txt").write_text("readme")
    run = tmp_path / "run"
    proc = build(run, data, "--scheduler", "sync")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", str(run), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    status = json.loads(st.stdout)
    assert status["ingest"]["failures"] == {"empty_file": 1, "not_an_image": 1}
    det = status["detect"]["failures"]
    assert sum(det.values()) >= 4  # the two ingest reasons carried forward + two undecodable files
    assert status["export"]["done"] == status["export"]["shards"]
    assert len(export_rows(run)) >= len(reference[1])  # the good images are all there


@pytest.mark.parametrize("to", ["driver", "process-group"])
def test_ctrl_c_stops_cleanly_and_the_rerun_completes(reference, dataset, tmp_path, to):
    """Ctrl-C in a terminal signals the whole process group (driver, nannies, workers): one line,
    no traceback from any of them."""
    _, want = reference
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(run, dataset, "--workers", "2"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a test run started in the background inherits an ignored SIGINT (a shell's `cmd &`),
        # which Python would keep: give the build a terminal's default, as Ctrl-C assumes
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert _wait_for(str(run / "_meta" / "detect" / "part-00000.json"), proc)
        if to == "driver":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted; committed shards are kept" in err
    assert "Traceback" not in err
    resumed = build(run, dataset)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert export_rows(run) == want
    assert visible_temporaries(run) == []
