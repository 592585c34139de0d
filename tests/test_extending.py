"""Adding a stage: one module (the Stage subclass below), one output schema, one parameter schema
and one registry line. The toy stage builds after the others, resumes without redoing its work
and shows in status, with no change to the runner, storage or any command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipeline import api
from pipeline.config import manifest as manifest_mod
from pipeline.config import schemas as schemas_mod
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core import registry
from pipeline.core import stage as stage_mod
from pipeline.core.stage import Stage, StageContext
from pipeline.storage.run import Run

pytestmark = pytest.mark.slow

TOY_SCHEMA = """\
name: toy
version: 1
doc: the identity's size per fitted image (a stage added by a test)
columns:
  - {name: image_id, type: string, nullable: false, doc: image path relative to the dataset root}
  - {name: alpha_norm, type: float32, nullable: true, doc: "|alpha_id / id_std|", unit: "1"}
  - {name: failure_reason, type: string, nullable: true, doc: null if computed}
"""
TOY_PARAMS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"scale": {"type": "number", "default": 1.0, "description": "multiplies the norm"}},
}


class ToyStage(Stage):
    """The one module: reads the fit table, writes one number per image."""

    name = "toy"
    inputs = ("fit",)
    schema = "toy"
    doc = "the identity's size per image"

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        scale = float(ctx.params.as_dict()["scale"])
        rows = []
        for r in inputs["fit"].select(["image_id", "alpha_id", "failure_reason"]).to_pylist():
            norm = None if r["alpha_id"] is None else scale * float(np.linalg.norm(r["alpha_id"]))
            rows.append(
                {"image_id": r["image_id"], "alpha_norm": norm, "failure_reason": r["failure_reason"]}
            )
        return from_rows(rows, load_schema("toy"))


CACHES = (manifest_mod.manifest_json_schema, schemas_mod.load_schema, stage_mod.params_class)


def add_parameter_schemas(tmp_path, monkeypatch, blocks: dict[str, dict]) -> None:
    """``stages.<name>`` parameter schemas as files beside copies of the project's own."""
    manifest_dir = tmp_path / "manifest-schemas"
    shutil.copytree(manifest_mod.MANIFEST_SCHEMA_DIR, manifest_dir)
    for name, block in blocks.items():
        (manifest_dir / f"stage.{name}.schema.json").write_text(json.dumps(block))
    monkeypatch.setattr(manifest_mod, "MANIFEST_SCHEMA_DIR", manifest_dir)
    for cached in CACHES:
        cached.cache_clear()


@pytest.fixture()
def toy_stage(tmp_path, monkeypatch):
    # the output schema and the parameter schema, as files beside the project's own
    out_dir = tmp_path / "schemas"
    out_dir.mkdir()
    (out_dir / "toy.yaml").write_text(TOY_SCHEMA)
    real = schemas_mod._schema_path
    monkeypatch.setattr(
        schemas_mod, "_schema_path", lambda n: out_dir / "toy.yaml" if n == "toy" else real(n)
    )
    add_parameter_schemas(tmp_path, monkeypatch, {"toy": TOY_PARAMS})
    # the one registry line
    registry.STAGES["toy"] = ToyStage()
    registry.BUILD_ORDER.append("toy")
    yield
    registry.BUILD_ORDER.remove("toy")
    del registry.STAGES["toy"]
    monkeypatch.undo()
    for cached in CACHES:
        cached.cache_clear()


def test_a_toy_stage_builds_resumes_and_shows_in_status(toy_stage, tmp_path):
    faces = tmp_path / "faces"
    api.synth(faces, subjects=3, images_per_subject=2, seed=2, workers=1, textures="painted")
    run = tmp_path / "run"
    common = {"scheduler": "sync", "progress": False, "landmarks": "dlib", "shard_size": 4}
    first = api.build(run, "synthetic", root=str(faces), until="toy", **common)
    assert first.ok and first.stages["toy"].computed == first.stages["fit"].computed == 2
    rows = Run(run).table("toy").to_pylist()
    assert len(rows) == 6 and all(r["alpha_norm"] is None or r["alpha_norm"] >= 0 for r in rows)
    assert any(r["alpha_norm"] for r in rows)

    again = api.build(run, until="toy", **common)  # resumes: nothing to do
    assert again.stages["toy"].computed == 0 and again.stages["toy"].skipped == 2
    st = api.status(run)
    assert st["toy"]["done"] == st["toy"]["shards"] == 2

    # its parameter is part of its fingerprint: a new value recomputes it (and only it)
    third = api.build(run, until="toy", overrides={"stages.toy.scale": 2.0}, **common)
    assert third.stages["toy"].computed == 2 and third.stages["fit"].computed == 0
    doubled = Run(run).table("toy").to_pylist()
    for a, b in zip(rows, doubled, strict=True):
        assert (a["alpha_norm"] is None) == (b["alpha_norm"] is None)
        if a["alpha_norm"] is not None:
            assert b["alpha_norm"] == pytest.approx(2 * a["alpha_norm"], rel=1e-5)


def _metadata(table: pa.Table) -> dict[str, str]:
    """An input table's key-value metadata (the model's sha256, ...), passed on."""
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}


class HalfLandmarks(Stage):
    """A stage that rewrites the detector's points (as a refinement would): it keeps the points of
    every other image and records the rest as failed; the fit reads it when configured to."""

    name = "half_landmarks"
    inputs = ("landmarks",)
    schema = "landmarks"

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        rows = inputs["landmarks"].to_pylist()
        for i, r in enumerate(rows):
            if i % 2 and r["failure_reason"] is None:
                r.update(landmarks=None, confidence=None, failure_reason="dropped_by_half")
        return from_rows(rows, load_schema("landmarks"), _metadata(inputs["landmarks"]))


class HalvedFits(Stage):
    """A stage with the fits' schema between the fit and the export (where a refinement goes):
    every identity halved."""

    name = "halved_fits"
    inputs = ("fit",)
    schema = "fits"

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        rows = inputs["fit"].to_pylist()
        for r in rows:
            if r["alpha_id"] is not None:
                r["alpha_id"] = [0.5 * a for a in r["alpha_id"]]
        return from_rows(rows, load_schema("fits"), _metadata(inputs["fit"]))


@pytest.fixture()
def table_stages(tmp_path, monkeypatch):
    """Two stages registered where they belong in the data flow (no parameter schema of their own)."""
    empty = {"type": "object", "additionalProperties": False, "properties": {}}
    add_parameter_schemas(tmp_path, monkeypatch, {"half_landmarks": empty, "halved_fits": empty})
    saved_stages, saved_order = dict(registry.STAGES), list(registry.BUILD_ORDER)
    order = []
    for name, st in saved_stages.items():
        order += [("half_landmarks", HalfLandmarks())] if name == "fit" else []
        order += [("halved_fits", HalvedFits())] if name == "export" else []
        order.append((name, st))
    registry.STAGES.clear()
    registry.STAGES.update(order)
    registry.BUILD_ORDER[:] = ["ingest", *registry.STAGES]
    yield
    registry.STAGES.clear()
    registry.STAGES.update(saved_stages)
    registry.BUILD_ORDER[:] = saved_order
    monkeypatch.undo()
    for cached in CACHES:
        cached.cache_clear()


def test_the_fit_and_export_read_the_tables_their_settings_name(table_stages, tmp_path):
    from pipeline.config.manifest import load_manifest
    from pipeline.core.registry import InputTableError
    from pipeline.core.tables import RunTables
    from pipeline.evaluate.inputs import load_fits

    faces = tmp_path / "faces"
    api.synth(faces, subjects=3, images_per_subject=4, seed=3, workers=1, textures="painted")
    run = tmp_path / "run"
    common = {"scheduler": "sync", "progress": False, "landmarks": "dlib", "shard_size": 8}
    chosen = {"stages.fit.landmarks_table": "half_landmarks", "stages.export.fits_table": "halved_fits"}
    built = api.build(run, "synthetic", root=str(faces), overrides=chosen, **common)
    assert built.ok
    fits = Run(run).table("fit").to_pylist()
    # the fit read the rewritten points
    assert sum(r["failure_reason"] == "dropped_by_half" for r in fits) == 6
    halved = {r["image_id"]: r["alpha_id"] for r in Run(run).table("halved_fits").to_pylist()}
    exported = Run(run).table("export").to_pylist()
    assert exported and all(
        np.allclose(r["alpha_id"], halved[r["image_id"]], atol=1e-6) for r in exported
    )  # the labels came from the configured table
    # evaluation reads the fits the labels came from
    m = load_manifest(None, chosen)
    assert RunTables(run, m).name("fits") == "halved_fits"
    assert len(load_fits(RunTables(run, m))) == len(halved)

    # the detector's points again (the run remembers its settings): the fit and what reads it
    # are recomputed, nothing upstream
    again = api.build(run, overrides={"stages.fit.landmarks_table": "landmarks"}, **common)
    assert again.stages["fit"].computed == 2 and again.stages["landmarks"].computed == 0
    assert not any(r["failure_reason"] == "dropped_by_half" for r in Run(run).table("fit").to_pylist())

    # a table of another schema, or one built after the stage, is refused before any work
    for key, table in (("stages.fit.landmarks_table", "crop"), ("stages.fit.landmarks_table", "halved_fits")):
        with pytest.raises(InputTableError, match=rf"{key}: '{table}' is not a table the fit stage can read"):
            api.build(run, overrides={key: table}, **common)
