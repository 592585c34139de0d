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
from pipeline.storage.run import TABLE_DIRS

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        DetectStage(),
        LandmarksStage(),
        EmbedStage(),
        CropStage(),
        FitStage(),
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


def readable_keys(stage: str) -> tuple[str, ...]:
    """The manifest keys ``stage`` may read: its own declarations and, transitively, those of its
    upstream stages (they are in its fingerprint through the upstream fingerprints)."""
    if stage in ("index", "ingest"):
        return INGEST_KEYS
    s = STAGES[stage]
    keys = [*s.own_keys(), *s.runtime]
    for up in s.inputs:
        keys.extend(readable_keys(stage_dir(up)))
    return tuple(dict.fromkeys(keys))


def config_view(manifest: Manifest, stage: str) -> ConfigView:
    return ConfigView(manifest, readable_keys(stage), stage)
