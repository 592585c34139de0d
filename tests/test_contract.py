"""The stage contract: declared reads, fingerprints from declarations, typed parameters, the run
object and its memory, the one resolver, the Python API, and concurrent first use of a model cache."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config.manifest import load_manifest, manifest_json_schema
from pipeline.config.resolve import DatasetChoice, resolve
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core import registry
from pipeline.core.registry import STAGES, config_view, readable_keys
from pipeline.core.runner import process_shard, stage_context
from pipeline.core.stage import Stage, StageContext, UndeclaredConfigRead, params_class, stage_parameters
from pipeline.storage.run import Run, RunError


# --- declared reads ---------------------------------------------------------------------------
class _ReadsRetries(Stage):
    """A stage that reads a manifest value it never declared."""

    name = "detect"  # borrows detect's schema block and output schema
    inputs = ("index",)
    schema = "detections"
    depends_on: ClassVar[tuple[str, ...]] = ("stages.decode",)

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        ctx.config.get("execution.retries")  # undeclared: must raise
        return from_rows([], load_schema("detections"))


def _index_shard(tmp_path: Path) -> Run:
    run = Run(tmp_path / "run")
    rows = [
        {
            "image_id": "a/0.jpg",
            "subject": "a",
            "label": 0,
            "uri": str(tmp_path / "a" / "0.jpg"),
            "size_bytes": 0,
            "failure_reason": "empty_file",
        }
    ]
    schema = load_schema("index")
    run.store("index").write(0, from_rows(rows, schema), schema, "fp-index", "p", 0.0)
    return run


def test_a_stage_reading_an_undeclared_key_fails(tmp_path, monkeypatch):
    run = _index_shard(tmp_path)
    monkeypatch.setitem(registry.STAGES, "detect", _ReadsRetries())
    with pytest.raises(UndeclaredConfigRead, match="execution.retries"):
        process_shard(run, load_manifest(), "detect", 0)
    assert not run.store("detect").is_done(0)  # nothing committed


def test_the_real_detect_stage_reads_only_what_it_declares(tmp_path):
    """The same shard through the registered detect stage: every read is declared."""
    run = _index_shard(tmp_path)
    sidecar = process_shard(run, load_manifest(), "detect", 0)
    assert sidecar["rows"] == 1 and sidecar["failures"] == {"empty_file": 1}


def test_a_view_answers_declared_and_upstream_keys_only():
    m = load_manifest()
    fit = config_view(m, "fit")
    assert fit.stage_params("fit")["max_iterations"] >= 1
    assert fit.get("models.morphable_model.source").startswith("pypi:")
    assert fit.stage_params("landmarks")["backend"] in ("fan", "dlib")  # upstream: in the fingerprint chain
    with pytest.raises(UndeclaredConfigRead):
        fit.stage_params("export")  # downstream
    with pytest.raises(UndeclaredConfigRead):
        config_view(m, "detect").model("morphable_model")
    assert "stages.fit" not in readable_keys("landmarks")


def test_fingerprints_follow_declarations_and_nothing_else():
    base = load_manifest()
    for name, stage in STAGES.items():
        for key in stage.depends_on:
            if key == "models.landmark_error":  # one entry per landmark backend
                changed = base.with_overrides({f"{key}.dlib.description": "changed"})
            elif key.startswith("models."):
                changed = base.with_overrides({f"{key}.description": "changed"})
            else:
                continue
            assert stage.params_hash(changed) != stage.params_hash(base), (name, key)
        for key in stage.runtime:
            if key == "execution.array_backend":
                changed = base.with_overrides({key: "numpy"})
                assert stage.params_hash(changed) == stage.params_hash(base), (name, key)


# --- typed parameters -------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [*STAGES, "ingest", "decode", "synth", "train", "evaluate"])
def test_parameter_classes_have_one_typed_field_per_schema_key(stage):
    schema = manifest_json_schema()["properties"]["stages"]["properties"][stage]
    cls = params_class(stage)
    assert dataclasses.is_dataclass(cls)
    assert [f.name for f in dataclasses.fields(cls)] == list(schema["properties"])
    params = stage_parameters(load_manifest(), stage)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.__setattr__(next(iter(schema["properties"])), 1)
    assert params.as_dict() == load_manifest().stage_params(stage)


def test_stage_context_gives_typed_parameters():
    ctx = stage_context(load_manifest(overrides={"stages.fit.max_iterations": 7}), "fit")
    assert ctx.params.max_iterations == 7
    assert isinstance(ctx.params.tolerance, float)


# --- the run object and the resolver ---------------------------------------------------------
def test_a_run_location_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Run("rel/run").url == str(tmp_path / "rel" / "run")
    assert Run("memory://bucket/run").url == "memory://bucket/run"


def test_precedence_defaults_file_run_flags(tmp_path):
    manifest = tmp_path / "m.yaml"
    text = (Path(__file__).resolve().parents[1] / "data_manifest.yaml").read_text()
    manifest.write_text(text.replace("stages: {}", "stages:\n  fit:\n    max_iterations: 11\n"))
    run = Run(tmp_path / "run")
    # defaults < file
    assert resolve(run, str(manifest)).manifest.stage_params("fit")["max_iterations"] == 11
    assert resolve(run, str(manifest)).manifest.stage_params("fit")["tolerance"] > 0  # a schema default
    # file < run.json
    res = resolve(
        run, str(manifest), ["stages.fit.max_iterations=12"], inputs=DatasetChoice(root=str(tmp_path))
    )
    run.write_record(res.record)
    later = resolve(run)  # no manifest argument: the remembered file, then the remembered overrides
    assert later.manifest.stage_params("fit")["max_iterations"] == 12
    assert later.manifest.dataset(later.dataset)["root"] == str(tmp_path)
    # run.json < flags (flags win over --set)
    top = resolve(run, None, ["stages.fit.max_iterations=13"], {"stages.fit.max_iterations": 14})
    assert top.manifest.stage_params("fit")["max_iterations"] == 14
    # another root is refused naming both, unless overwrite
    with pytest.raises(RunError) as ei:
        resolve(run, inputs=DatasetChoice(root=str(tmp_path / "other")))
    assert str(tmp_path) in str(ei.value) and str(tmp_path / "other") in str(ei.value)
    assert resolve(run, inputs=DatasetChoice(root=str(tmp_path / "other")), mode="overwrite")
    # execution choices are not remembered
    res = resolve(run, flags={"execution.scheduler": "sync"})
    assert "execution.scheduler" not in res.record.overrides


def test_a_broken_run_record_is_an_error_naming_the_file(tmp_path):
    run = Run(tmp_path / "run")
    Path(run.url).mkdir()
    (Path(run.url) / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="run.json"):
        resolve(run)
    (Path(run.url) / "run.json").write_text(json.dumps({"format": 2, "bogus": 1}))
    with pytest.raises(RunError, match="bogus"):
        resolve(run)


# --- the Python API ---------------------------------------------------------------------------
def test_api_imports_without_heavy_libraries():
    code = "import sys; from pipeline.api import build, status; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_api_build_on_a_synth_folder_and_the_run_remembers_it(tmp_path):
    from pipeline import api

    data = tmp_path / "faces"
    api.synth(data, subjects=3, images_per_subject=2, seed=5, workers=1, yaw_range=[-20, 20])
    report = api.build(
        tmp_path / "run",
        dataset="synthetic",
        root=str(data),
        landmarks="dlib",
        scheduler="sync",
        progress=False,
    )
    assert isinstance(report, api.BuildReport) and report.ok
    assert set(report.stages) == {"detect", "landmarks", "embed", "crop", "fit", "refine", "export"}
    assert report.stages["detect"].computed == report.stages["export"].computed >= 1
    assert report.ingest["images"] == 6
    st = api.status(tmp_path / "run")
    assert st["export"]["done"] == st["export"]["shards"]
    # no flags: what run.json remembers, and no work
    again = api.build(tmp_path / "run", scheduler="sync", progress=False)
    assert all(s.computed == 0 for s in again.stages.values())
    # the command: no flags exits 0 and does nothing; another root exits 2 naming both
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "build",
        str(tmp_path / "run"),
        "--scheduler",
        "sync",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert all(s["shards_computed"] == 0 for s in doc["stages"].values())
    proc = subprocess.run([*cmd, "--root", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert str(data) in proc.stderr and str(tmp_path) in proc.stderr


# --- concurrent first use of a model cache ----------------------------------------------------
def _save_and_load(args: tuple) -> str:
    path, barrier = args
    from pipeline.models.morphable_model import load_npz
    from pipeline.synthetic.toy import toy_model

    model = toy_model(k_id=4, k_exp=2, seed=1)
    barrier.wait()
    try:
        model.save_npz(path)
        load_npz(path)
    except Exception as exc:  # reported to the parent, which fails the test
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_four_processes_writing_an_empty_model_cache_never_collide(tmp_path):
    ctx = mp.get_context("spawn")
    results = []
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        for trial in range(4):
            barrier = manager.Barrier(4)
            path = str(tmp_path / f"trial{trial}" / "model.npz")
            results += pool.map(_save_and_load, [(path, barrier)] * 4)
    assert results == ["ok"] * 16
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("_tmp-")]
    assert np.load(tmp_path / "trial0" / "model.npz", allow_pickle=False)["mean"].size > 0


# --- resources as Dask annotations --------------------------------------------------------------
def _restrictions(stages: tuple[str, ...], shard: int, *upstream: object) -> list[dict]:
    from distributed import get_worker

    w = get_worker()
    ts = w.state.tasks[w.get_current_task()]
    got = dict(ts.resource_restrictions or {})
    return [{"stage": s, "result": {"stage": s, "shard": shard, "resources": got}} for s in stages]


@pytest.mark.parametrize("declared", [{"GPU": 1}, None], ids=["gpu-worker", "cpu-only-cluster"])
def test_declared_resources_become_annotations_only_where_workers_have_them(declared):
    from distributed import Client, LocalCluster

    from dags.build import DaskExecutor

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None, resources=declared
        ) as cluster,
        Client(cluster) as client,
    ):
        ex = DaskExecutor(client, retries=0, resources={"fit": {"GPU": 1}, "landmarks": {}})
        outs = list(ex.execute(_restrictions, {0: [("landmarks",), ("fit",)], 1: [("fit",)]}))
    assert all(o.error is None and not o.blocked for o in outs)
    got = {(o.result["stage"], o.result["shard"]): o.result["resources"] for o in outs}
    want_fit = {"GPU": 1} if declared else {}
    assert got == {("landmarks", 0): {}, ("fit", 0): want_fit, ("fit", 1): want_fit}


def test_stages_declare_gpu_only_when_their_configuration_uses_one():
    cpu = {
        "stages.landmarks.backend": "dlib",
        "execution.array_backend": "numpy",
        "stages.detect.device": "cpu",
        "stages.embed.device": "cpu",
    }
    m = load_manifest(overrides=cpu)
    assert all(STAGES[s].resources_for(config_view(m, s)) == {} for s in STAGES)
    m = load_manifest(overrides={**cpu, "stages.detect.backend": "mtcnn-tf", "stages.detect.device": "auto"})
    assert STAGES["detect"].resources_for(config_view(m, "detect")) == {}  # TensorFlow: CPU only
    m = load_manifest(overrides={"stages.landmarks.backend": "fan", "execution.array_backend": "auto"})
    assert STAGES["detect"].resources_for(config_view(m, "detect")) == {"GPU": 1}  # torch, device auto
    assert STAGES["landmarks"].resources_for(config_view(m, "landmarks")) == {"GPU": 1}
    assert STAGES["fit"].resources_for(config_view(m, "fit")) == {"GPU": 1}
    assert STAGES["embed"].resources_for(config_view(m, "embed")) == {"GPU": 1}  # torch, device auto
    m = load_manifest(overrides={**cpu, "stages.embed.device": "auto", "stages.embed.backend": "dlib-resnet"})
    assert STAGES["embed"].resources_for(config_view(m, "embed")) == {}  # dlib's own network: CPU only


def _slow(stages: tuple[str, ...], shard: int, *upstream: object) -> list[dict]:
    import time

    time.sleep(4)
    return [{"stage": s, "result": {"stage": s, "shard": shard}} for s in stages]


def test_a_cluster_left_without_workers_stops_with_one_error_instead_of_waiting():
    import threading
    import time

    from distributed import Client, LocalCluster

    from dags.build import DaskExecutor
    from pipeline.errors import ClusterLost

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        threading.Timer(0.5, lambda: cluster.scale(0)).start()
        t0 = time.monotonic()
        with pytest.raises(ClusterLost, match=r"no Dask worker for 1 s"):
            list(
                DaskExecutor(client, retries=0, no_worker_timeout_s=1).execute(
                    _slow, {0: [("fit",)], 1: [("fit",)]}
                )
            )
        assert time.monotonic() - t0 < 30


def test_a_lost_scheduler_is_one_error_not_a_failure_per_shard():
    import threading

    from distributed import Client, LocalCluster

    from dags.build import DaskExecutor
    from pipeline.errors import ClusterLost

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    client = Client(cluster)
    try:
        threading.Timer(0.5, lambda: cluster.loop.add_callback(cluster.scheduler.close)).start()
        ex = DaskExecutor(client, retries=0, no_worker_timeout_s=60)
        with pytest.raises(ClusterLost, match="lost the Dask scheduler"):
            list(ex.execute(_slow, {0: [("fit",)], 1: [("fit",)], 2: [("fit",)]}))
    finally:
        try:
            client.close(timeout=5)
            cluster.close(timeout=5)
        except Exception:  # the scheduler is already gone: closing what is left may complain
            pass


@pytest.mark.parametrize("stage", ["detect", "landmarks", "embed"])
def test_an_unknown_backend_is_an_error_that_lists_the_known_ones(stage):
    """Backends are found by one lookup per stage (a third name once fell into dlib's path)."""
    import importlib

    mod = importlib.import_module(f"pipeline.{stage}.stage")
    with pytest.raises(ValueError, match=rf"stages\.{stage}\.backend: expected one of \[.*\], got 'nope'"):
        mod.backend_module("nope")
    for name in mod.BACKENDS:  # every registered name resolves to a module with the entry points
        backend = mod.backend_module(name)
        assert hasattr(backend, "MODEL_KEY") or hasattr(backend, "resolve_assets"), name


def test_a_stage_reads_only_the_tables_it_declares(tmp_path):
    """The runner hands a stage's driver step its declared inputs (StageTables); another table
    is an error naming both, never a store opened by name."""
    from pipeline.core.stage import StageTables, UndeclaredInput
    from pipeline.storage.run import Run

    tables = StageTables(Run(tmp_path / "run"), "export", {t: t for t in ("index", "detect", "fit", "crop")})
    assert tables.shards("fit") == []
    with pytest.raises(
        UndeclaredInput, match=r"stage 'export' read table 'landmarks', which it does not declare"
    ):
        tables.shards("landmarks")


def test_the_architecture_diagram_is_the_registered_stage_graph():
    """docs/ARCHITECTURE.md's stage graph has exactly the edges the stages declare."""
    import re
    from pathlib import Path

    from pipeline.core.registry import STAGES

    text = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```mermaid\ngraph LR\n(.*?)```", text, re.S).group(1)
    drawn = {tuple(line.split(" --> ")) for line in block.strip().splitlines()}
    drawn = {(a.strip(), b.strip()) for a, b in drawn}
    declared = {(inp, name) for name, st in STAGES.items() for inp in st.inputs}
    assert drawn == declared


def test_the_typed_parameter_classes_are_generated_from_the_schemas():
    """pipeline/config/params.py is what the schemas give (python -m pipeline.config.paramgen), with
    real field types: a stage schema changed without regenerating it fails here."""
    import typing

    from pipeline.config import paramgen
    from pipeline.config.params import PARAMS, DetectParams, FitParams

    assert paramgen.TARGET.read_text(encoding="utf-8") == paramgen.render_module()
    assert set(PARAMS) == set(manifest_json_schema()["properties"]["stages"]["properties"])
    hints = typing.get_type_hints(DetectParams)
    assert hints["batch_size"] is int and hints["max_side"] == int | None
    assert typing.get_args(hints["backend"]) == ("torch", "mtcnn-tf")
    assert typing.get_type_hints(FitParams)["identity_shrinkage"] == dict[str, typing.Any] | None
    params = stage_parameters(load_manifest(), "detect")
    assert isinstance(params, DetectParams) and isinstance(params.thresholds, tuple)
