"""The stage contract: what a stage of the build is, what it may read, and what its output depends on.

A stage is a small class (one per stage package, registered in :mod:`pipeline.core.registry`) with

- ``name``, ``inputs`` (upstream tables, data-flow order), ``schema`` (its output, ``schemas/``);
- ``table_settings``: input slots whose table is a setting (slot -> a key of ``stages.<name>``):
  the fit's landmarks, the export's fits. The runner resolves each to the table the configuration
  names (:func:`pipeline.core.registry.input_tables`: a table of the slot's schema built earlier)
  and hands it in under the slot's name, so the stage's code does not change;
- ``depends_on``: the manifest values besides ``stages.<name>`` that its output depends on (dotted
  keys; a key covers everything under it). They are hashed into every shard's fingerprint;
- ``runtime``: manifest values that choose *how* it runs but not *what* it writes (the array
  backend, the model cache's location): readable, never fingerprinted;
- ``resources``: what a task needs from a worker (``{"GPU": 1}``), used as Dask resource
  annotations when the cluster's workers declare them;
- ``resolve_assets(config)``: model files located and verified once, on the driver, handed to
  every task as :class:`Asset` (path + sha256);
- ``prepare(tables, config)``: an optional driver step over all shards before the stage runs (export's
  subject-label map), whose result file is part of every shard's fingerprint (``global_input``);
  ``tables`` (:class:`StageTables`) reads the stage's declared inputs over all committed shards
  and writes the stage's own stage-level files: a stage never opens another stage's store;
- ``finish(run, config)``: an optional driver step once every shard of the stage is committed
  (export's dataset card and model files);
- ``stands_in_for`` and ``enabled(manifest)``: a stage whose table, when it is on, replaces an
  earlier one for the later stages whose setting for that input is null (``stages.refine`` for
  the export's fits);
- ``reads_pixels``: the stage decodes the shard's images. Consecutive such stages of one shard
  run as one task sharing ``ctx.images`` (:class:`pipeline.imaging.decode.DecodedImages`), so
  each image is decoded once for all of them; each still commits its own shard;
- ``run(inputs, ctx) -> pa.Table``: pure work on one shard's input tables.

A stage never sees the manifest itself: ``ctx.config`` is a :class:`ConfigView` that answers only
the keys the stage declared (plus those its upstream stages declared, which reach its fingerprint
through theirs) and raises :class:`UndeclaredConfigRead` for anything else. So the fingerprint is
derived from exactly what a stage can read, and a stage that starts reading a new key without
declaring it fails at once instead of serving stale shards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from pipeline.config.manifest import Manifest, manifest_json_schema
from pipeline.config.params import PARAMS, StageParams
from pipeline.config.schemas import StageSchema, load_schema
from pipeline.imaging.decode import DecodedImages
from pipeline.storage.store import fingerprint

# Table metadata under which a stage lists input rows it could not use and has no failure_reason
# column for ({image_id: reason}); the runner moves it into the sidecar's failures.
DROPPED_ROWS_KEY = b"morphset.dropped_rows"
# Table metadata of a stage that was switched off for this shard (embed on renders): the runner
# marks the sidecar ``off`` so status shows no rate for work that was not done.
STAGE_OFF_KEY = b"morphset.stage_off"


class UndeclaredConfigRead(KeyError):
    """A stage read a manifest value it did not declare (``depends_on`` / ``runtime``)."""

    def __str__(self) -> str:  # KeyError quotes its argument; this message is a sentence
        return str(self.args[0])


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


class ConfigView:
    """The part of a manifest one stage declared: ``get``, ``stage_params``, ``model``, ``cache_dir``."""

    def __init__(self, manifest: Manifest, readable: tuple[str, ...], stage: str) -> None:
        self._manifest = manifest
        self.readable = readable
        self.stage = stage

    def _check(self, key: str) -> None:
        if not _covered(key, self.readable):
            raise UndeclaredConfigRead(
                f"stage {self.stage!r} read manifest key {key!r}, which it does not declare "
                f"(declared: {', '.join(self.readable)}); add it to the stage's depends_on (it changes "
                "the output) or runtime (it does not)"
            )

    def get(self, dotted: str, default: Any = None) -> Any:
        self._check(dotted)
        return self._manifest.get(dotted, default)

    def stage_params(self, stage: str) -> dict:
        self._check(f"stages.{stage}")
        return self._manifest.stage_params(stage)

    def model(self, name: str) -> dict:
        self._check(f"models.{name}")
        return self._manifest.model(name)

    @property
    def cache_dir(self) -> Any:
        self._check("cache_dir")
        return self._manifest.cache_dir

    @property
    def path(self) -> str:
        """Where the manifest came from (for messages)."""
        return self._manifest.path


@dataclass(frozen=True)
class Asset:
    """A model file resolved and verified on the driver; tasks re-check the sha256 once per process."""

    path: str
    sha256: str
    description: str = ""

    def recheck(self, error: type[Exception] = ValueError) -> str:
        """The file's path after checking it still has the sha256 the driver verified (a worker
        calls this once per process before loading it); ``error`` otherwise."""
        from pipeline.storage.hashing import sha256_file

        got = sha256_file(self.path)
        if got != self.sha256:
            raise error(f"{self.path}: sha256 {got} differs from the {self.sha256} verified by the driver")
        return self.path


_JSON_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str, "array": list, "object": dict}


def _python_type(prop: dict) -> Any:
    t = prop.get("type")
    if isinstance(t, list):
        types = [_JSON_TYPES.get(str(x)) for x in t if x != "null"]
        base = types[0] if len(types) == 1 and types[0] is not None else Any
        return base | None if "null" in t and base is not Any else base
    return _JSON_TYPES.get(str(t), Any)


@functools.cache
def params_class(stage: str) -> type:
    """A frozen dataclass with one typed field per key of ``schemas/manifest/stage.<stage>.schema.json``:
    the one generated ahead of time in :mod:`pipeline.config.params` (real types a type checker
    sees), or, for a stage that has none there (a stage being added), one made from its schema now."""
    if stage in PARAMS:
        return PARAMS[stage]
    schema = manifest_json_schema()["properties"]["stages"]["properties"].get(stage, {})
    fields = [
        (key, _python_type(prop), field(default=None, metadata={"doc": prop.get("description", "")}))
        for key, prop in (schema.get("properties") or {}).items()
    ]
    cls = dataclasses.make_dataclass(
        f"{stage.title().replace('_', '')}Params",
        fields,
        bases=(StageParams,),
        frozen=True,
        namespace={"__doc__": f"stages.{stage} of the manifest (defaults from its schema)."},
    )
    cls.__module__ = __name__
    return cls


def stage_parameters(manifest: Manifest, stage: str) -> Any:
    """``stages.<stage>`` (schema defaults filled in) as an instance of :func:`params_class`
    (arrays as tuples: the instance is frozen all the way down)."""
    values = manifest.stage_params(stage)
    return params_class(stage)(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class UndeclaredInput(KeyError):
    """A stage asked for a table it did not declare in ``inputs``."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class StageTables:
    """What the runner hands a stage's driver steps: its declared input tables over every
    committed shard (read-only), by slot name (``inputs``: slot -> the table the configuration
    resolved it to), and its own stage-level files (``_meta/<stage>/``)."""

    run: Any  # pipeline.storage.run.Run
    stage: str
    inputs: dict[str, str]

    def _declared(self, name: str) -> str:
        if name not in self.inputs:
            raise UndeclaredInput(
                f"stage {self.stage!r} read table {name!r}, which it does not declare in inputs {list(self.inputs)}"
            )
        return self.inputs[name]

    def shards(self, name: str) -> list[int]:
        """The committed shards of input ``name``."""
        return self.run.store(self._declared(name)).shards_with_sidecar()

    def read(self, name: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        return self.run.read_shard(self._declared(name), shard, columns)

    def write_json(self, file: str, doc: dict) -> None:
        """A stage-level file of this stage (its ``global_input``), written atomically."""
        self.run.store(self.stage).write_json(file, doc)


def check_same_rows(
    ctx: StageContext, first: tuple[str, pa.Table], second: tuple[str, pa.Table], rebuild: str
) -> None:
    """Two input tables of one shard hold the same images in the same order, else a ValueError
    naming the stage, the shard, both tables and what to rebuild."""
    (a_name, a), (b_name, b) = first, second
    if a.column("image_id").to_pylist() != b.column("image_id").to_pylist():
        raise ValueError(
            f"{ctx.stage} shard {ctx.shard}: {a_name} and {b_name} tables do not match row for row "
            f"({a.num_rows} vs {b.num_rows} rows); rebuild {rebuild} for this shard"
        )


@dataclass
class StageContext:
    """What a stage's ``run`` may know about where it runs."""

    shard: int
    stage: str
    params: Any  # the stage's params_class instance
    config: ConfigView
    run: Any  # pipeline.storage.run.Run
    assets: dict[str, Asset] = field(default_factory=dict)
    # decoded images shared with the shard's other pixel stages of the same task (one decode each)
    images: DecodedImages = field(default_factory=DecodedImages)
    # a stage calls progress(n) as it finishes n more of the shard's rows: progress bars move
    # within a shard (the runner sends it to the driver; nothing is promised about delivery)
    progress: Callable[[int], None] = field(default=lambda n: None, repr=False)

    @property
    def run_root(self) -> str:
        return self.run.url

    @property
    def storage_options(self) -> dict | None:
        return self.run.storage_options


class Stage:
    """Base class of the build's stages (see the module docstring)."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    table_settings: ClassVar[dict[str, str]] = {}
    schema: ClassVar[str]
    depends_on: ClassVar[tuple[str, ...]] = ()
    runtime: ClassVar[tuple[str, ...]] = ()
    resources: ClassVar[dict[str, float]] = {}
    global_input: ClassVar[str | None] = None
    reads_pixels: ClassVar[bool] = False
    # a table this stage's output replaces, when it is on, for later stages whose setting for
    # that input is null (the refinement for the fit: the export takes the refined labels)
    stands_in_for: ClassVar[str | None] = None
    doc: ClassVar[str] = ""

    def enabled(self, manifest: Manifest) -> bool:
        """Whether the stage does its work under ``manifest`` (a stage switched off still commits
        its shards, marked off)."""
        return True

    def output_schema(self) -> StageSchema:
        return load_schema(self.schema)

    def own_keys(self) -> tuple[str, ...]:
        return (f"stages.{self.name}", *self.depends_on)

    def own_view(self, manifest: Manifest) -> ConfigView:
        """The manifest as this stage's own code may read it outside a build (tools, preflight
        checks): its declared keys and runtime values, none of its upstream stages'."""
        return ConfigView(manifest, (*self.own_keys(), *self.runtime), self.name)

    def params_hash(self, manifest: Manifest) -> str:
        """Hash of ``stages.<name>``, the declared ``depends_on`` values and the output schema version."""
        extra = {
            k: (manifest.stage_params(k.split(".", 1)[1]) if k.startswith("stages.") else manifest.get(k))
            for k in self.depends_on
        }
        return fingerprint(self.name, manifest.stage_params(self.name), extra, self.output_schema().version)

    def resources_for(self, config: ConfigView) -> dict[str, float]:
        """Worker resources a task of this stage needs under this configuration."""
        return dict(self.resources)

    def resolve_assets(self, config: ConfigView) -> dict[str, Asset]:
        """Locate and verify model files on the driver (before any task is submitted)."""
        return {}

    def describe_assets(self, assets: dict[str, Asset]) -> list[str]:
        return [f"{self.name}: {a.description or a.path} (sha256 {a.sha256[:12]}…)" for a in assets.values()]

    def prepare(self, tables: StageTables, config: ConfigView) -> dict | None:
        """Driver step before the stage's shards run; writes ``global_input`` when the stage has one."""
        return None

    def finish(self, run: Any, config: ConfigView) -> None:
        """Driver step after every shard of the stage is committed (export's dataset card)."""

    def run(self, inputs: dict[str, pa.Table], ctx: StageContext) -> pa.Table:
        raise NotImplementedError
