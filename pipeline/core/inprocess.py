"""The build's stages in this process, for tools inside the product (synth's face textures,
calibration work runs): no cluster, no command-line resolution, no borrowed dataset entry.

The caller names a dataset of its own (a folder or a list file); it is added to the manifest
under ``datasets.<name>``, ingested into ``run_dir`` and built up to ``until`` with the
:class:`~pipeline.core.runner.SyncExecutor`, one shard after another. Returns the run and the
build's report (``failed_shards`` lists what failed; the caller decides what that means).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.manifest import DEFAULT_MANIFEST, Manifest
from pipeline.core.registry import BUILD_ORDER
from pipeline.core.runner import SyncExecutor, run_stages
from pipeline.ingest.stage import run_ingest
from pipeline.storage.run import Run, RunRecord


def build_in_process(
    run_dir: str | Path,
    manifest: Manifest,
    name: str,
    dataset: dict[str, Any],
    until: str,
    overrides: dict[str, Any] | None = None,
) -> tuple[Run, dict]:
    """Ingest ``dataset`` (a ``datasets.<name>`` entry: ``root``, ``layout``, optionally
    ``list_file``) into ``run_dir`` and run the stages after ingest up to ``until``."""
    if until not in BUILD_ORDER[1:]:
        raise ValueError(f"until: expected one of {BUILD_ORDER[1:]}, got {until!r}")
    m = manifest.with_overrides(
        {f"datasets.{name}": dict(dataset), "stages.ingest.dataset": name, **(overrides or {})}
    )
    run = Run(run_dir)
    with run.lock("build"):
        run_ingest(m, run.url, name, progress=False)
        # the run remembers what it is, as a build's does: `morphset fit RUN` etc. work on it later
        run.write_record(
            RunRecord(
                dataset=name,
                root=dataset.get("root"),
                list_file=dataset.get("list_file"),
                layout=dataset.get("layout"),
                landmarks=m.stage_params("landmarks")["backend"],
                manifest_path=None if m.path in ("<defaults>", str(DEFAULT_MANIFEST)) else m.path,
                overrides={k: v for k, v in m.overrides.items() if not k.startswith("execution.")},
                manifest=m.data,
            )
        )
        stages = BUILD_ORDER[1 : BUILD_ORDER.index(until) + 1]
        report = run_stages(run, m, stages, SyncExecutor(), progress=False)
    return run, report
