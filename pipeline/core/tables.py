"""What commands read from a run, asked for by what a table holds rather than by the stage that wrote it.

Commands and API calls that read a built run (evaluate, train, overlap, export-mesh) are consumers:
they ask for a table by its role and this module, the one place that knows which stage writes
what, opens it. The ``fits`` role follows the configuration: it is the table the export takes
its labels from (``stages.export.fits_table``: the landmark fit, or a refinement stage's table),
so evaluation measures the shapes the training set carries.

Stages get their inputs from the runner instead (:func:`pipeline.core.registry.input_tables`).
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.config.manifest import Manifest
from pipeline.config.schemas import StageSchema
from pipeline.core.registry import input_tables, schema_for
from pipeline.storage.run import Run
from pipeline.storage.store import ShardStore

# role -> the table that holds it when the configuration has no say
ROLES = {
    "index": "index",  # one row per image of the dataset (ingest)
    "embeddings": "embed",  # face-recognition embeddings
    "landmarks": "landmarks",  # the points the fit reads (stages.fit.landmarks_table)
    "fits": "fit",  # fitted shapes and poses: the labels (stages.export.fits_table)
    "trainset": "export",  # the exported training set
}


def table_for(role: str, manifest: Manifest | None = None) -> str:
    """The table that holds ``role`` under ``manifest``'s configuration (None: the defaults)."""
    if role not in ROLES:
        raise ValueError(f"unknown table role {role!r}; known: {sorted(ROLES)}")
    if role == "fits":
        return input_tables("export", manifest)["fit"]
    if role == "landmarks":
        return input_tables("fit", manifest)["landmarks"]
    return ROLES[role]


class RunTables:
    """A built run's tables for a consumer: ``RunTables(run, manifest).store("fits")``."""

    def __init__(self, run: Run | str, manifest: Manifest | None = None, storage_options: dict | None = None):
        self.run = run if isinstance(run, Run) else Run(run, storage_options)
        self.manifest = manifest

    def name(self, role: str) -> str:
        return table_for(role, self.manifest)

    def store(self, role: str) -> ShardStore:
        """The shard store of the table holding ``role`` (read it; never write it)."""
        return self.run.store(self.name(role))

    def schema(self, role: str) -> StageSchema:
        return schema_for(self.name(role))

    def shards(self, role: str) -> list[int]:
        """The committed shards of the table holding ``role``."""
        return self.store(role).shards_with_sidecar()

    def read(self, role: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        """One committed shard of the table holding ``role`` (its sidecar verified)."""
        return self.run.read_shard(self.name(role), shard, columns)

    def table(self, role: str, columns: list[str] | None = None) -> pa.Table:
        """Every committed shard of the table holding ``role``, concatenated (sidecars verified)."""
        return self.run.table(self.name(role), columns=columns)
