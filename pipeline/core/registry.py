"""The build's stages in data-flow order: adding a stage is one module, one schema and one line here.

``ingest`` is not a :class:`~pipeline.core.stage.Stage`: it creates the shards every other stage
works on (``pipeline/ingest/``); its output table is called ``index``.
"""

from __future__ import annotations

from pipeline.config.manifest import Manifest
from pipeline.config.schemas import StageSchema, load_schema
from pipeline.core.stage import ConfigView, Stage
from pipeline.crop.stage import CropStage
from pipeline.detect.stage import DetectStage
from pipeline.embed.stage import EmbedStage
from pipeline.export.stage import ExportStage
from pipeline.fit.stage import FitStage
from pipeline.landmarks.stage import LandmarksStage
from pipeline.refine.stage import RefineStage
from pipeline.storage.run import TABLE_DIRS

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        DetectStage(),
        LandmarksStage(),
        EmbedStage(),
        CropStage(),
        FitStage(),
        RefineStage(),
        ExportStage(),
    )
}
INPUT_STAGE_NAMES = TABLE_DIRS  # table name -> stage directory (storage's naming)
BUILD_ORDER = ["ingest", *STAGES]
# What ingest's output depends on (its own fingerprint is computed by pipeline/ingest/).
INGEST_KEYS = ("stages.ingest",)


def stage_dir(name: str) -> str:
    return INPUT_STAGE_NAMES.get(name, name)


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {list(STAGES)}") from None


def schema_for(stage_or_table: str) -> StageSchema:
    if stage_or_table in ("index", "ingest"):
        return load_schema("index")
    return STAGES[stage_or_table].output_schema()


class InputTableError(ValueError):
    """A stage's input setting names a table it cannot read (the key and the tables it can in the message)."""


def input_tables(stage: str, manifest: Manifest | None = None) -> dict[str, str]:
    """``stage``'s input slots -> the tables the runner reads for them: each slot's own table, or
    for a slot in ``table_settings`` the table ``stages.<stage>.<key>`` names (the fit reading a
    refined landmarks table, the export another fits table). Such a table must have the slot's
    schema and be built before ``stage``. ``manifest`` None: the defaults."""
    spec = get_stage(stage)
    out = {slot: slot for slot in spec.inputs}
    if manifest is None or not spec.table_settings:
        return out
    params = manifest.stage_params(stage)
    before = BUILD_ORDER[: BUILD_ORDER.index(stage)]
    for slot, key in spec.table_settings.items():
        table = params.get(key) or standing_in(slot, before, manifest)
        if table == slot:
            continue
        want = schema_for(slot).name
        fits = [t for t in ("index", *before[1:]) if t != stage and schema_for(t).is_a(want)]
        if table not in fits:
            raise InputTableError(
                f"stages.{stage}.{key}: {table!r} is not a table the {stage} stage can read as its {slot} "
                f"input; tables with the {want!r} schema built before {stage}: {fits}"
            )
        out[slot] = table
    return out


def standing_in(slot: str, before: list[str], manifest: Manifest) -> str:
    """The table a slot whose setting is null reads: the last stage before it that stands in for
    the slot's table and is switched on (the refinement for the fit), else the slot's own."""
    for name in reversed(before):
        s = STAGES.get(name)
        if s is not None and s.stands_in_for == slot and s.enabled(manifest):
            return name
    return slot


def readable_keys(stage: str, manifest: Manifest | None = None) -> tuple[str, ...]:
    """The manifest keys ``stage`` may read: its own declarations and, transitively, those of the
    stages whose tables it reads (they are in its fingerprint through the upstream fingerprints)."""
    if stage in ("index", "ingest"):
        return INGEST_KEYS
    s = STAGES[stage]
    keys = [*s.own_keys(), *s.runtime]
    for up in input_tables(stage, manifest).values():
        keys.extend(readable_keys(stage_dir(up), manifest))
    return tuple(dict.fromkeys(keys))


def config_view(manifest: Manifest, stage: str) -> ConfigView:
    return ConfigView(manifest, readable_keys(stage, manifest), stage)
