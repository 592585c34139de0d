"""Shard store: stage outputs as ``<run>/<stage>/part-NNNNN.parquet`` plus a JSON sidecar
``<run>/_meta/<stage>/part-NNNNN.json``.

A schema that declares ``files_by: COLUMN`` (the trainset's ``split``) has one file per value of
that column in each shard, ``part-NNNNN-<value>.parquet``: Hugging Face ``datasets`` reads the
value from the file name (``train``, ``val`` → its ``train`` / ``validation`` splits) while every
other reader still sees one plain folder of Parquet files. The sidecar lists a shard's files.

A stage folder holds Parquet files and nothing else, so every reader takes the bare folder
(pyarrow, pandas, polars, duckdb, Hugging Face ``datasets``); sidecars, failure markers and
stage-level files (export's ``_labels.json``, ingest's ``_summary.json``) live under ``_meta/``.

Commit protocol (what makes resume and re-executed Dask tasks safe):
1. the Parquet file(s) are written under a hidden temporary name in the same directory, then renamed;
2. the sidecar ``_meta/<stage>/part-NNNNN.json`` is written the same way, last. It is the done-marker.
A shard is *done* only if its sidecar exists and records the fingerprint of the current inputs and
parameters. A writer killed between 1 and 2 leaves a shard that is not done; the rerun rewrites it.
A task that runs twice writes identical content twice. Readers only ever open Parquet files whose
sidecar exists, and hidden names (``_tmp-…``) are ignored by ``pyarrow.dataset``.

Everything goes through fsspec, so ``file://``, ``memory://`` and object stores share this code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.config.schemas import StageSchema, check_version, conform
from pipeline.storage.atomic import atomic_write, remove_temporaries

log = logging.getLogger(__name__)
META_DIR = "_meta"
PART_RE = re.compile(r"part-(\d{5})\.json$")
# what a sidecar may name as a data file of its shard: a bare name in the stage folder
DATA_NAME_RE = re.compile(r"part-(\d{5})(-[A-Za-z0-9_]+)?\.parquet")
# stages whose folder is more than its data: RUN/export is a Hugging Face dataset repository
# (README.md card and model/ beside data/), so its Parquet files live one level down
DATA_SUBDIR = {"export": "data"}
ROW_GROUP_SIZE = 2048  # bounded row groups: column selection never reads more than this many rows of bytes


class CorruptShard(OSError):
    """A committed data file does not match the size or sha256 its sidecar recorded."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}; the shard is not used and the next build recomputes it")
        self.path = path


SIDECAR_KEYS = ("fingerprint", "rows")


def fingerprint(*parts: Any) -> str:
    """Stable sha256 of JSON-serialisable parts (dict keys sorted)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str, separators=(",", ":")).encode())
        h.update(b"\x00")
    return h.hexdigest()


def failure_counts(table: pa.Table, column: str = "failure_reason") -> dict[str, int]:
    if column not in table.column_names:
        return {}
    counts = Counter(r for r in table.column(column).to_pylist() if r is not None)
    return dict(sorted(counts.items()))


@dataclass
class ShardStore:
    """The shards of one stage of one run."""

    run_root: str
    stage: str
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        self.fs, root = fsspec.core.url_to_fs(self.run_root, **(self.storage_options or {}))
        self.root = root.rstrip("/")
        self.folder = f"{self.root}/{self.stage}"  # what the stage hands over
        sub = DATA_SUBDIR.get(self.stage)
        self.dir = f"{self.folder}/{sub}" if sub else self.folder  # the data: Parquet only
        self.meta = f"{self.root}/{META_DIR}/{self.stage}"  # sidecars, markers, stage-level files

    # --- paths ---------------------------------------------------------------------------
    def data_path(self, shard: int, value: str | None = None) -> str:
        """The shard's data file (``value``: the ``files_by`` column's value of a split shard)."""
        return f"{self.dir}/part-{shard:05d}{'' if value is None else '-' + value}.parquet"

    def data_paths(self, shard: int, sidecar: dict | None = None) -> list[str]:
        """Every data file of a committed shard, in the order its rows were written."""
        sc = self.sidecar(shard) if sidecar is None else sidecar
        return [path for path, _ in self._file_records(shard, sc or {})]

    def _file_records(self, shard: int, sidecar: dict) -> list[tuple[str, dict]]:
        """(path, what the sidecar recorded for it) per data file of the shard."""
        if isinstance(sidecar.get("files"), list):
            return [(f"{self.dir}/{f['name']}", f) for f in sidecar["files"]]
        return [(self.data_path(shard), sidecar)]  # one file, recorded at the top level

    def sidecar_path(self, shard: int) -> str:
        return f"{self.meta}/part-{shard:05d}.json"

    def failed_path(self, shard: int) -> str:
        return f"{self.meta}/part-{shard:05d}.failed.json"

    def _atomic_write(self, final: str, data: bytes) -> None:
        atomic_write(final, data, self.fs)

    # --- writing -------------------------------------------------------------------------
    def write(
        self,
        shard: int,
        table: pa.Table,
        schema: StageSchema,
        fingerprint: str,
        params_hash: str,
        seconds: float,
        extra_metadata: dict[str, str] | None = None,
        extra_sidecar: dict | None = None,
    ) -> dict:
        """Validate ``table`` against ``schema`` and commit the shard (data, then sidecar)."""
        table = conform(table, schema, extra_metadata)
        files = []
        for value, part in _split_by(table, schema):
            buf = io.BytesIO()
            pq.write_table(part, buf, row_group_size=ROW_GROUP_SIZE, compression="zstd")
            data = buf.getvalue()
            path = self.data_path(shard, value)
            self._atomic_write(path, data)
            files.append(
                {
                    # what readers verify: a truncated or altered data file is never served
                    "name": path.rsplit("/", 1)[-1],
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "rows": part.num_rows,
                }
            )
        # files of this shard from an earlier commit that this one does not have (a split value gone)
        for stale in set(self._shard_files(shard)) - {f"{self.dir}/{f['name']}" for f in files}:
            self.fs.rm(stale)
        sidecar = {
            "files": files,
            "stage": self.stage,
            "shard": shard,
            "rows": table.num_rows,
            "failures": failure_counts(table),
            "seconds": round(float(seconds), 4),
            "fingerprint": fingerprint,
            "params_hash": params_hash,
            "schema": schema.name,
            "schema_version": schema.version,
            "morphset_version": __version__,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        sidecar.update(extra_sidecar or {})
        self._atomic_write(self.sidecar_path(shard), json.dumps(sidecar, indent=1, sort_keys=True).encode())
        if self.fs.exists(self.failed_path(shard)):
            self.fs.rm(self.failed_path(shard))
        return sidecar

    def write_json(self, name: str, doc: dict) -> None:
        """An auxiliary stage-level JSON file (``_summary.json`` ...), written atomically."""
        self._atomic_write(
            f"{self.meta}/{name}", json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=True).encode()
        )

    def read_json(self, name: str) -> dict | None:
        try:
            with self.fs.open(f"{self.meta}/{name}", "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def mark_failed(self, shard: int, fingerprint: str, error: str, traceback: str) -> None:
        """Record a shard whose task raised (after retries); the shard stays not-done."""
        doc = {
            "stage": self.stage,
            "shard": shard,
            "fingerprint": fingerprint,
            "error": error,
            "traceback": traceback,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self._atomic_write(self.failed_path(shard), json.dumps(doc, indent=1).encode())

    def _shard_files(self, shard: int) -> list[str]:
        """Data files of ``shard`` present in the folder, committed or not."""
        if not self.fs.exists(self.dir):
            return []
        pat = re.compile(rf"part-{shard:05d}(-[A-Za-z0-9_]+)?\.parquet$")
        return [p for p in self.fs.ls(self.dir, detail=False) if pat.fullmatch(p.rsplit("/", 1)[-1])]

    def remove(self, shard: int) -> None:
        for p in (self.sidecar_path(shard), *self._shard_files(shard), self.failed_path(shard)):
            if self.fs.exists(p):
                self.fs.rm(p)

    def remove_temporaries(self) -> int:
        """Delete ``_tmp-*`` files a killed writer left behind. Call only when no writer of this
        run is active (the build driver does, before submitting work)."""
        return remove_temporaries(self.dir, self.fs) + remove_temporaries(self.meta, self.fs)

    def clear(self) -> None:
        for d in (self.dir, self.meta):
            if self.fs.exists(d):
                self.fs.rm(d, recursive=True)

    def migrate(self) -> int:
        """Move the JSON files of the layout before ``_meta/`` (sidecars beside the data) into
        ``_meta/<stage>/``, and data files of a stage that now keeps them in a subfolder into it;
        returns how many moved. Idempotent."""
        if not self.fs.exists(self.folder):
            return 0
        names = [p for p in self.fs.ls(self.folder, detail=False) if self.fs.isfile(p)]
        legacy = [p for p in names if p.rsplit("/", 1)[-1].endswith(".json")]
        if legacy:
            self.fs.makedirs(self.meta, exist_ok=True)
        for p in legacy:
            self.fs.mv(p, f"{self.meta}/{p.rsplit('/', 1)[-1]}")
        data = [p for p in names if self.dir != self.folder and DATA_NAME_RE.fullmatch(p.rsplit("/", 1)[-1])]
        if data:
            self.fs.makedirs(self.dir, exist_ok=True)
        for p in data:
            self.fs.mv(p, f"{self.dir}/{p.rsplit('/', 1)[-1]}")
        return len(legacy) + len(data)

    # --- reading -------------------------------------------------------------------------
    def sidecar(self, shard: int) -> dict | None:
        """The shard's sidecar, or None when the shard is not committed. A malformed sidecar (not a
        JSON object with a fingerprint and a row count) counts as not done, with a warning."""
        path = self.sidecar_path(shard)
        try:
            with self.fs.open(path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            _warn_once(path, f"not valid JSON ({exc})")
            return None
        if not isinstance(doc, dict) or any(k not in doc for k in SIDECAR_KEYS):
            _warn_once(path, f"malformed sidecar (expected an object with {', '.join(SIDECAR_KEYS)})")
            return None
        files = doc.get("files")
        if files is not None:
            names = (
                [f.get("name") if isinstance(f, dict) else None for f in files]
                if isinstance(files, list)
                else [None]
            )
            bad = [n for n in names if not isinstance(n, str) or not _own_data_file(n, shard)]
            if bad:
                _warn_once(path, f"names data files {bad[:3]} that are not this shard's in its stage folder")
                return None
        return doc

    def failure(self, shard: int) -> dict | None:
        try:
            with self.fs.open(self.failed_path(shard), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_done(self, shard: int, fingerprint: str | None = None) -> bool:
        """Committed for ``fingerprint``, and its data file has the size its sidecar recorded (a cheap
        check that catches truncation; :meth:`read` and :meth:`verify` also check the sha256)."""
        sc = self.sidecar(shard)
        if sc is None or (fingerprint is not None and sc.get("fingerprint") != fingerprint):
            return False
        for path, rec in self._file_records(shard, sc):
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                return False
            if "bytes" in rec and size != rec["bytes"]:
                _warn_once(path, f"{size} bytes, its sidecar recorded {rec['bytes']}: recomputing")
                return False
        return True

    def verify(self, shard: int) -> str | None:
        """None if the committed shard's data files match its sidecar, else why not."""
        bad = self.check(shard)
        return None if bad is None else bad[1]

    def check(self, shard: int) -> tuple[str, str] | None:
        """None if the committed shard's data files match its sidecar, else (the file, why not)."""
        sc = self.sidecar(shard)
        if sc is None:
            return self.sidecar_path(shard), "not committed"
        for path, rec in self._file_records(shard, sc):
            try:
                with self.fs.open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return path, "data file missing"
            why = _mismatch(rec, data)
            if why:
                return path, why
        return None

    def data_bytes(self, shard: int) -> int:
        """The committed shard's data size as its sidecar recorded it (0 if not committed)."""
        sc = self.sidecar(shard)
        return 0 if sc is None else sum(int(r.get("bytes", 0)) for _, r in self._file_records(shard, sc))

    def invalidate(self, shard: int) -> None:
        """Make a committed shard not done (its sidecar goes; the data file is rewritten later)."""
        if self.fs.exists(self.sidecar_path(shard)):
            self.fs.rm(self.sidecar_path(shard))

    def shards_with_sidecar(self) -> list[int]:
        if not self.fs.exists(self.meta):
            return []
        out = []
        for p in self.fs.ls(self.meta, detail=False):
            m = PART_RE.search(p.rsplit("/", 1)[-1])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def read(self, shard: int, schema: StageSchema, columns: list[str] | None = None) -> pa.Table:
        """Read one committed shard (all its files, in order), refusing a schema-version mismatch."""
        sc = self.sidecar(shard)
        if sc is None:
            raise FileNotFoundError(f"{self.data_path(shard)}: shard not committed (no sidecar)")
        parts = []
        for path, rec in self._file_records(shard, sc):
            with self.fs.open(path, "rb") as f:
                data = f.read()
            why = _mismatch(rec, data)
            if why:
                raise CorruptShard(path, why)
            try:
                pf = pq.ParquetFile(io.BytesIO(data))
            except pa.ArrowInvalid as exc:  # a shard written before checksums existed
                raise CorruptShard(path, f"not a readable Parquet file ({exc})") from None
            check_version(pf.schema_arrow.metadata, schema, path, pf.schema_arrow)
            parts.append(pf.read(columns=columns))
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def dataset(self, schema: StageSchema, shards: list[int] | None = None) -> pads.Dataset:
        """A pyarrow dataset over committed shards (column selection reads only those columns)."""
        shards = self.shards_with_sidecar() if shards is None else shards
        paths = []
        for s in shards:
            sc = self.sidecar(s)
            if sc is None:
                continue
            if not self.is_done(s):  # truncated since it was committed: say so, never serve it
                raise CorruptShard(self.data_paths(s, sc)[0], "size differs from its sidecar")
            paths.extend(self.data_paths(s, sc))
        for p in paths[:1]:
            with self.fs.open(p, "rb") as f:
                arrow = pq.ParquetFile(f).schema_arrow
                check_version(arrow.metadata, schema, p, arrow)
        return pads.dataset(paths, schema=schema.arrow, format="parquet", filesystem=self.fs)


def _split_by(table: pa.Table, schema: StageSchema) -> list[tuple[str | None, pa.Table]]:
    """(value, rows) per data file of a shard: one file, or one per value of the schema's
    ``files_by`` column present in the shard, in declared order (an empty shard writes one empty
    file under the first value, so its schema stays readable)."""
    if schema.files_by is None:
        return [(None, table)]
    values = set(table.column(schema.files_by).to_pylist())
    undeclared = sorted(values - set(schema.file_values))
    if undeclared:
        raise ValueError(
            f"schema {schema.name!r}: {schema.files_by} values {undeclared} are not among the declared "
            f"{list(schema.file_values)}"
        )
    column = table.column(schema.files_by)
    parts: list[tuple[str | None, pa.Table]] = [
        (v, table.filter(pc.equal(column, v))) for v in schema.file_values if v in values
    ]
    return parts or [(schema.file_values[0], table)]


def _mismatch(sidecar: dict, data: bytes) -> str | None:
    if "bytes" in sidecar and len(data) != sidecar["bytes"]:
        return f"{len(data)} bytes, its sidecar recorded {sidecar['bytes']}"
    if "sha256" in sidecar and hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
        return "sha256 differs from its sidecar (the file was altered after it was committed)"
    return None


_WARNED: set[str] = set()


def _own_data_file(name: str, shard: int) -> bool:
    m = DATA_NAME_RE.fullmatch(name)
    return m is not None and int(m.group(1)) == shard


def _warn_once(path: str, why: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning("%s: %s", path, why)
