"""A run: one build's folder (or object-store prefix) and everything in it.

:class:`Run` owns the run's location — made absolute (or kept as a full fsspec URL) before anything
reaches a worker, so a worker started in another directory reads and writes the same files — the
record of the run's inputs (``RUN/run.json``), one :class:`~pipeline.storage.store.ShardStore` per
stage, typed readers, run-level files written through the one atomic write, and the planner that
decides which shards of which stages are pending. It knows nothing of executors.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from pipeline import __version__
from pipeline.config.manifest import ManifestError, validate
from pipeline.config.schemas import StageSchema, load_schema
from pipeline.storage.atomic import atomic_write
from pipeline.storage.store import ShardStore

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
RUN_FORMAT = 2


class RunError(ValueError):
    """The run folder or its record is unusable, or a request contradicts what the run remembers."""


class RunLocked(RunError):
    """Another command is writing this run (its lock file names it)."""


LOCK_FILE = "_lock.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def require_local(value: str | os.PathLike, what: str) -> str:
    """``value`` when it is a local path; a URL (``s3://…``) is refused in one line naming ``what``
    (what writes or reads files there with local-only libraries), never a local folder named after it."""
    text = os.fspath(value)
    if "://" in text:
        raise RunError(
            f"{what}: {text} is a URL, and this takes a local path (write locally, then copy it to the "
            "object store; build, status, verify, evaluate and train read runs at URLs)"
        )
    return text


def absolute_location(location: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded); an fsspec URL (``s3://…``, ``file://…``) unchanged."""
    text = os.fspath(location)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


# the table a stage reads by name -> the folder that holds it (ingest writes the ``index``)
TABLE_DIRS = {"index": "ingest"}


def committed_schema(store: ShardStore, shard: int) -> StageSchema:
    """The schema a committed shard's sidecar names (written by :meth:`ShardStore.write`)."""
    sc = store.sidecar(shard)
    if sc is None:
        raise FileNotFoundError(f"{store.data_path(shard)}: shard not committed (no sidecar)")
    name = sc.get("schema")
    if not isinstance(name, str):
        raise RunError(f"{store.sidecar_path(shard)}: the sidecar names no schema; rebuild the stage")
    return load_schema(name)


@dataclass
class RunRecord:
    """What ``RUN/run.json`` remembers: the run's inputs and the overrides it was built with."""

    dataset: str | None = None
    root: str | None = None
    list_file: str | None = None
    layout: str | None = None
    landmarks: str | None = None
    manifest_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    morphset_version: str = __version__
    manifest: dict | None = None  # the effective manifest of the last build (for reference)

    @classmethod
    def from_json(cls, doc: Any, where: str) -> RunRecord:
        if not isinstance(doc, dict):
            raise RunError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        if doc.get("format") is None and "manifest" in doc:  # format 1: a manifest snapshot
            manifest = doc.get("manifest") or {}
            over = doc.get("overrides") or {}
            stages = manifest.get("stages") or {}
            return cls(
                dataset=over.get("stages.ingest.dataset") or (stages.get("ingest") or {}).get("dataset"),
                manifest_path=doc.get("manifest_path"),
                overrides=dict(over),
                manifest=manifest,
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(doc) - known - {"format"})
        if unknown:
            raise RunError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        if not isinstance(doc.get("overrides", {}), dict):
            raise RunError(f"{where}: overrides: expected an object")
        return cls(**{k: v for k, v in doc.items() if k in known})

    def to_json(self) -> dict:
        return {"format": RUN_FORMAT, **asdict(self)}


class Run:
    """One run's location and files."""

    def __init__(self, location: str | os.PathLike, storage_options: dict | None = None) -> None:
        if "::" in os.fspath(location):
            # fsspec reads "a::b" as a chain of file systems and would write into "a"
            raise ValueError(
                f"run location {os.fspath(location)!r}: '::' chains fsspec URLs (e.g. simplecache::s3://…), "
                "which a run cannot be written through; name the run without '::'"
            )
        self.url = absolute_location(location)
        self.storage_options = storage_options
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"Run({self.url!r})"

    def __reduce__(self) -> tuple:  # travels to workers as its URL (filesystems are rebuilt there)
        return (Run, (self.url, self.storage_options))

    # --- files ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def write_file(self, relpath: str, content: bytes | str) -> str:
        """A run-level file (``report.json`` …), written atomically; returns its full path."""
        target = self.path(relpath)
        atomic_write(target, content, self.fs)
        return target

    def write_json(self, relpath: str, doc: Any) -> str:
        return self.write_file(relpath, json.dumps(doc, indent=1, ensure_ascii=False, default=str))

    def read_json(self, relpath: str) -> Any:
        """The parsed file, or None if it does not exist; a file that is not JSON is an error."""
        target = self.path(relpath)
        try:
            with self.fs.open(target, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{target}: not valid JSON ({exc})") from None

    # --- the run lock -----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[dict]:
        """Hold ``RUN/_lock.json`` (host, pid, start time, command) while ``command`` writes the run.

        On a local disk the file is created exclusively (``O_EXCL``): of two builds started at once
        exactly one gets it, the other raises :class:`RunLocked` naming the holder. A lock left by a
        process of this host that no longer runs is taken over with a warning. On object stores
        there is no exclusive create: the check is best effort (exists, then write), so do not
        start two builds of one object-store run at once.
        """
        doc = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
        }
        path = self.path(LOCK_FILE)
        self._acquire(path, doc, retry=True)
        try:
            yield doc
        finally:
            try:
                if self.read_json(LOCK_FILE) == doc:
                    self.fs.rm(path)
            except (OSError, RunError):  # a vanished or unreadable lock is nobody's to remove
                pass

    def _acquire(self, path: str, doc: dict, retry: bool) -> None:
        data = json.dumps(doc, indent=1).encode()
        local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        try:
            if local:
                os.makedirs(self.root, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return
            if not self.fs.exists(path):
                self.fs.makedirs(self.root, exist_ok=True)
                atomic_write(path, data, self.fs)
                return
        except FileExistsError:
            pass
        try:
            holder = self.read_json(LOCK_FILE) or {}
        except RunError:
            holder = {}
        who = (
            f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('started_at', '?')})"
        )
        stale = (
            holder.get("host") == doc["host"]
            and isinstance(holder.get("pid"), int)
            and not _pid_alive(holder["pid"])
        )
        if (stale or not holder) and retry:
            log.warning(
                "%s: taking over a stale lock left by %s", path, who if holder else "an unreadable lock file"
            )
            self.fs.rm(path)
            self._acquire(path, doc, retry=False)
            return
        raise RunLocked(
            f"{self.url}: in use by {who}; wait for it to finish, or remove {path} if that process is gone"
        )

    # --- the run record ---------------------------------------------------------------------
    def read_record(self) -> RunRecord | None:
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise RunError(f"{self.url}: is a file, not a run directory")
        doc = self.read_json(RUN_FILE)
        if doc is None:
            return None
        record = RunRecord.from_json(doc, self.path(RUN_FILE))
        if record.manifest is not None:
            try:
                validate(record.manifest, self.path(RUN_FILE))
            except ManifestError as exc:
                raise RunError(str(exc)) from None
        return record

    def write_record(self, record: RunRecord) -> None:
        self.write_json(RUN_FILE, record.to_json())

    # --- shards ------------------------------------------------------------------------------
    def store(self, stage_or_table: str) -> ShardStore:
        return ShardStore(self.url, TABLE_DIRS.get(stage_or_table, stage_or_table), self.storage_options)

    def check_committed(self, stages: list[str], invalidate: bool = True) -> dict:
        """Every committed shard of ``stages`` hashed against its sidecar (a flipped byte keeps the
        size a plan's ``stat`` compares). A shard that no longer matches is invalidated (unless
        ``invalidate`` is false: a read-only run), so the next build recomputes it. Returns per
        stage the shards verified and corrupt, every corrupt file with why, and the bytes read.
        Malformed sidecars are skipped: such a shard is not done already."""
        out: dict = {"stages": {}, "corrupt": [], "bytes": 0}
        for stage in stages:
            store = self.store(stage)
            verified, corrupt = 0, []
            for shard in store.shards_with_sidecar():
                if store.sidecar(shard) is None:
                    continue
                out["bytes"] += store.data_bytes(shard)
                bad = store.check(shard)
                if bad is None:
                    verified += 1
                    continue
                corrupt.append(shard)
                out["corrupt"].append({"stage": stage, "shard": shard, "path": bad[0], "why": bad[1]})
                if invalidate:
                    store.invalidate(shard)
            out["stages"][stage] = {"verified": verified, "corrupt": corrupt}
        return out

    def shards(self) -> list[int]:
        """The committed index shards: the unit of work of every stage."""
        return self.store("index").shards_with_sidecar()

    def read_shard(self, stage_or_table: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        store = self.store(stage_or_table)
        return store.read(shard, committed_schema(store, shard), columns)

    def table(self, stage_or_table: str, columns: list[str] | None = None) -> pa.Table:
        """All committed shards of a stage as one table (small runs, evaluation, tests); the schema
        is the one its sidecars name. A stage with no committed shard is an error naming it."""
        store = self.store(stage_or_table)
        shards = store.shards_with_sidecar()
        if not shards:
            raise FileNotFoundError(f"{store.dir}: no committed shards")
        return store.dataset(committed_schema(store, shards[0]), shards).to_table(columns=columns)

    def migrate_layout(self, stages: list[str]) -> None:
        """Move sidecars of runs written before ``_meta/`` existed out of the stage folders (and
        the export's data into ``export/data/``)."""
        moved = sum(self.store(s).migrate() for s in stages) if self.fs.exists(self.root) else 0
        if moved:
            log.warning(
                "%s: moved %d file(s) into the current layout (sidecars under %s/_meta/, the export's "
                "data under export/data/)",
                self.url,
                moved,
                self.url,
            )

    def remove_temporaries(self, stages: list[str]) -> int:
        return sum(self.store(s).remove_temporaries() for s in stages)
