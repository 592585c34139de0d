"""The one manifest resolver every command and API call uses.

Precedence, lowest first: the schema defaults < the manifest file < what the run remembers
(``RUN/run.json``: its dataset, root or list file, landmark backend and every override it was
built with) < this call's flags and ``--set`` values (flags win over ``--set``).

A run is tied to its inputs: a call that names another dataset, root or list file than the run
remembers is refused with both values named, unless ``mode`` is ``overwrite`` (rebuild from the
new inputs) or, for a root or list file, ``extend`` (add the new subjects found there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config.manifest import DEFAULT_MANIFEST, Manifest, load_manifest, parse_override
from pipeline.storage.run import Run, RunError, RunRecord, absolute_location


@dataclass
class DatasetChoice:
    """The shorthands that choose a run's input (``--dataset``, ``--root``, ``--list-file`` …)."""

    dataset: str | None = None
    root: str | None = None
    list_file: str | None = None
    landmarks: str | None = None
    shard_size: int | None = None


@dataclass
class Resolved:
    manifest: Manifest
    record: RunRecord  # what RUN/run.json says once this call has run
    dataset: str
    new_overrides: dict[str, Any] = field(default_factory=dict)  # this call's --set and flags, parsed once


def parse_sets(sets: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not sets:
        return {}
    if isinstance(sets, dict):
        return dict(sets)
    return dict(parse_override(s) for s in sets)


def _manifest_path(given: str | None, record: RunRecord | None) -> Path:
    if given:
        return Path(given)
    remembered = record.manifest_path if record else None
    if remembered and remembered != "<defaults>" and Path(remembered).is_file():
        return Path(remembered)
    return DEFAULT_MANIFEST


def _local_absolute(value: str | None) -> str | None:
    if not value or "://" in value or os.path.isabs(value):
        return value
    return absolute_location(value)


def resolve(
    run: Run | None = None,
    manifest_path: str | None = None,
    sets: list[str] | dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    inputs: DatasetChoice | None = None,
    mode: str = "resume",
) -> Resolved:
    """The effective manifest for a command on ``run`` (see the module docstring)."""
    record = run.read_record() if run is not None else None
    path = _manifest_path(manifest_path, record)
    base = load_manifest(path)
    remembered = dict(record.overrides) if record else {}
    new = parse_sets(sets)
    new.update(flags or {})
    inputs = inputs or DatasetChoice()

    dataset = (
        inputs.dataset
        or new.get("stages.ingest.dataset")
        or (record.dataset if record else None)
        or remembered.get("stages.ingest.dataset")
        or base.stage_params("ingest")["dataset"]
    )
    if record and record.dataset and dataset != record.dataset and mode != "overwrite":
        raise RunError(
            f"{run.url if run else 'run'}: built from dataset {record.dataset!r}, not {dataset!r}; "
            "use another run directory, or --mode overwrite to rebuild it"
        )
    chosen: dict[str, Any] = {"stages.ingest.dataset": dataset}
    known = dataset in base.data["datasets"] or f"datasets.{dataset}" in remembered
    if inputs.root:
        given = absolute_location(inputs.root)
        if known:
            chosen[f"datasets.{dataset}.root"] = given
        else:
            chosen[f"datasets.{dataset}"] = {"root": given, "layout": "subject-folders"}
            known = True
    if inputs.list_file:
        chosen[f"datasets.{dataset}.list_file"] = _local_absolute(inputs.list_file)
        chosen[f"datasets.{dataset}.layout"] = "list-file"
    if inputs.shard_size is not None:
        chosen["stages.ingest.shard_size"] = inputs.shard_size
    if inputs.landmarks:
        chosen["stages.landmarks.backend"] = inputs.landmarks
    overrides = {**remembered, **new, **chosen}
    m = base.with_overrides(overrides)

    root: str | None = None
    list_file: str | None = None
    layout: str | None = None
    if dataset in m.data["datasets"]:
        ds = m.dataset(dataset)
        # local relative paths made absolute once, here: workers may run in other directories
        for key in ("root", "list_file"):
            absolute = _local_absolute(ds.get(key))
            if absolute != ds.get(key):
                overrides[f"datasets.{dataset}.{key}"] = absolute
        m = base.with_overrides(overrides)
        ds = m.dataset(dataset)
        root, list_file, layout = ds.get("root"), ds.get("list_file"), ds.get("layout")
        if record is not None and mode not in ("overwrite", "extend"):
            for what, old, now in (("root", record.root, root), ("list file", record.list_file, list_file)):
                if old is not None and old != now:
                    raise RunError(
                        f"{run.url if run else 'run'}: built from {what} {old}, not {now}; use another run "
                        f"directory, or --mode overwrite to rebuild it from {now} (--mode extend adds the new "
                        "subjects)"
                    )
    new_record = RunRecord(
        dataset=dataset,
        root=root,
        list_file=list_file,
        layout=layout,
        landmarks=m.stage_params("landmarks")["backend"],
        manifest_path=str(path.resolve()) if path != DEFAULT_MANIFEST else None,
        # how a build ran (scheduler, workers) is this call's choice, not the run's
        overrides={k: v for k, v in overrides.items() if not k.startswith("execution.")},
        morphset_version=__version__,
        manifest=m.data,
    )
    return Resolved(m, new_record, dataset, new)
