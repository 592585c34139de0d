"""Ingest: scan a dataset into index shards.

Layouts: ``subject-folders`` (``<root>/<subject>/<file>``, CASIA-WebFace and LFW) or ``list-file``
(CSV ``path,subject``, paths relative to the root). Every candidate file becomes an index row; a
file that cannot be used keeps its row with a ``failure_reason`` so nothing disappears silently.
Subjects are packed whole into shards (the multi-image fit needs all of a subject's images
together), in sorted order, deterministically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import time
import unicodedata
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa

from pipeline.config.manifest import Manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core.progress import ProgressLog, is_batch
from pipeline.imaging.decode import inside_root
from pipeline.storage.store import ShardStore, fingerprint

MODES = ("resume", "overwrite", "extend")


class IngestError(ValueError):
    """The dataset root or list file cannot be ingested at all (not a per-file problem)."""


@dataclass
class Entry:
    image_id: str  # relative, '/'-separated, NFC
    subject: str
    uri: str
    size: int | None
    mtime: str | None
    reason: str | None = None


@dataclass
class Scan:
    entries: list[Entry]
    empty_subjects: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)  # files directly under the root


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _classify(
    fs: fsspec.AbstractFileSystem, path: str, root: str, info: dict, extensions: set[str]
) -> str | None:
    if info.get("type") == "directory":
        return "not_a_file"
    name = path.rsplit("/", 1)[-1]
    if _is_local(fs):
        # every component resolved: a symlinked directory anywhere on the path counts, not only
        # a symlinked file
        if not inside_root(path, root):
            return "symlink_escapes_root"
        if os.path.islink(path) and not os.path.exists(os.path.realpath(path)):
            return "missing"
    ext = posixpath.splitext(name)[1].lower()
    if ext not in extensions:
        return "not_an_image"
    size = info.get("size")
    if size == 0:
        return "empty_file"
    if _is_local(fs) and not os.access(path, os.R_OK):
        return "unreadable"
    return None


def _mtime(info: dict) -> str | None:
    for k in ("mtime", "LastModified", "last_modified", "updated"):
        if info.get(k) is not None:
            return str(info[k])
    return None


def scan_subject_folders(root: str, extensions: list[str], storage_options: dict | None = None) -> Scan:
    fs, rpath = fsspec.core.url_to_fs(root, **(storage_options or {}))
    rpath = rpath.rstrip("/")
    if not fs.isdir(rpath):
        raise IngestError(
            f"{root}: dataset root is not a directory (layout subject-folders expects <root>/<subject>/<image>)"
        )
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    scan = Scan(entries=[])
    for item in sorted(fs.ls(rpath, detail=True), key=lambda d: d["name"]):
        name = item["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue  # hidden folders/files (.DS_Store, .cache) are not subjects
        if item["type"] != "directory":
            scan.stray_files.append(_nfc(name))
            continue
        subject = _nfc(name)
        found = fs.find(item["name"], detail=True, withdirs=True)
        # a directory only counts when it is named like an image (photo.jpg/): it is recorded as
        # not_a_file rather than passed over without a word; other folders just hold files
        files = sorted(
            (p, i)
            for p, i in found.items()
            if not p.rsplit("/", 1)[-1].startswith(".")
            and p.rstrip("/") != item["name"].rstrip("/")
            and (i.get("type") != "directory" or posixpath.splitext(p.rstrip("/"))[1].lower() in exts)
        )
        if not files:
            scan.empty_subjects.append(subject)
            continue
        for path, info in files:
            rel = _nfc(path[len(rpath) + 1 :])
            reason = _classify(fs, path, rpath, info, exts)
            uri = path if _is_local(fs) else fs.unstrip_protocol(path)
            scan.entries.append(Entry(rel, subject, uri, info.get("size"), _mtime(info), reason))
    return _one_subject_per_file(scan, fs)


def _one_subject_per_file(scan: Scan, fs: fsspec.AbstractFileSystem) -> Scan:
    """A file reached under two subjects (a symlinked folder or file inside the root) would put one
    photo into two people: it stays with the first subject (sorted order) and its other entries get
    the reason ``linked_from_another_subject``. Local file systems only (object stores have no links)."""
    if not _is_local(fs):
        return scan
    owner: dict[str, str] = {}
    for e in scan.entries:
        if e.reason is not None:
            continue
        real = os.path.realpath(e.uri)
        first = owner.setdefault(real, e.subject)
        if first != e.subject:
            e.reason = "linked_from_another_subject"
    return scan


def scan_list_file(
    root: str, list_file: str, extensions: list[str], storage_options: dict | None = None
) -> Scan:
    """CSV ``path,subject`` (an optional header line ``path,subject``); paths relative to ``root``."""
    fs, rpath = fsspec.core.url_to_fs(root, **(storage_options or {}))
    rpath = rpath.rstrip("/")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    try:
        with fsspec.open(list_file, "rb", **(storage_options or {})) as f:
            text = f.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise IngestError(f"{list_file}: list file not found") from None
    except UnicodeDecodeError as exc:
        raise IngestError(f"{list_file}: not UTF-8 text ({exc})") from None
    scan = Scan(entries=[])
    seen: set[str] = set()
    reader = csv.reader(io.StringIO(text))
    end = 0
    for row in reader:
        # the physical line the record starts on (a quoted field may span lines)
        lineno, end = end + 1, reader.line_num
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if lineno == 1 and [c.strip().lower() for c in row] == ["path", "subject"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise IngestError(f"{list_file}:{lineno}: expected 'path,subject', got {','.join(row)!r}")
        rel_raw, subject = row[0].strip(), _nfc(row[1].strip())
        norm = posixpath.normpath(rel_raw.replace("\\", "/"))
        rel = _nfc(norm)
        if rel in seen:
            raise IngestError(f"{list_file}:{lineno}: path {rel_raw!r} listed twice")
        seen.add(rel)
        if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
            scan.entries.append(Entry(rel, subject, rel_raw, None, None, "escapes_root"))
            continue
        path = f"{rpath}/{norm}"
        try:
            info = fs.info(path)
        except FileNotFoundError:
            scan.entries.append(Entry(rel, subject, path, None, None, "missing"))
            continue
        except (PermissionError, OSError):
            scan.entries.append(Entry(rel, subject, path, None, None, "unreadable"))
            continue
        reason = _classify(fs, path, rpath, info, exts)
        uri = path if _is_local(fs) else fs.unstrip_protocol(path)
        scan.entries.append(Entry(rel, subject, uri, info.get("size"), _mtime(info), reason))
    return _one_subject_per_file(scan, fs)


def assign_labels(subjects: list[str], existing: dict[str, int] | None = None) -> dict[str, int]:
    """Stable labels: rank among sorted names; with ``existing`` (extend mode) new subjects follow the max."""
    if not existing:
        return {s: i for i, s in enumerate(sorted(set(subjects)))}
    labels = dict(existing)
    nxt = max(labels.values(), default=-1) + 1
    for s in sorted(set(subjects) - set(labels)):
        labels[s] = nxt
        nxt += 1
    return labels


def partition(subject_sizes: list[tuple[str, int]], shard_size: int) -> list[list[str]]:
    """Pack whole subjects, in the given order, into shards of about ``shard_size`` rows."""
    shards: list[list[str]] = []
    cur: list[str] = []
    rows = 0
    for subject, n in subject_sizes:
        if cur and rows + n > shard_size:
            shards.append(cur)
            cur, rows = [], 0
        cur.append(subject)
        rows += n
    if cur:
        shards.append(cur)
    return shards


def _rows_for(entries: list[Entry], labels: dict[str, int]) -> list[dict]:
    return [
        {
            "image_id": e.image_id,
            "subject": e.subject,
            "label": labels[e.subject],
            "uri": e.uri,
            "size_bytes": e.size,
            "failure_reason": e.reason,
        }
        for e in entries
    ]


@dataclass
class IngestResult:
    shards_written: list[int]
    shards_skipped: list[int]
    shards_removed: list[int]
    images: int
    subjects: int
    failures: dict[str, int]
    empty_subjects: list[str]
    stray_files: list[str]
    warnings: list[str]


# what `morphset synth` writes at the root of its output (pipeline.synthetic.synth.GROUND_TRUTH_FILE)
SYNTH_MARKER = "ground_truth.parquet"


def is_synthetic(ds: dict, storage_options: dict | None = None) -> bool:
    """A dataset rendered from a model: flagged ``synthetic`` in the manifest, or a root that
    ``morphset synth`` wrote. Recorded in the index metadata (``morphset.dataset_synthetic``) so
    that stages whose default differs for renders (embed) can tell."""
    if ds.get("synthetic"):
        return True
    fs, rpath = fsspec.core.url_to_fs(ds["root"], **(storage_options or {}))
    try:
        return bool(fs.exists(rpath.rstrip("/") + "/" + SYNTH_MARKER))
    except OSError:
        return False


def ingest_params_hash(params: dict, dataset: dict) -> str:
    keys = {k: dataset.get(k) for k in ("root", "layout", "list_file")}
    # fingerprint=stat is what ingest always did: left out, so existing runs keep their shards
    hashed = {k: v for k, v in params.items() if not (k == "fingerprint" and v == "stat")}
    return fingerprint("ingest", hashed, keys, load_schema("index").version)


def run_ingest(
    manifest: Manifest,
    run_root: str,
    dataset_name: str,
    mode: str = "resume",
    storage_options: dict | None = None,
    progress: bool = True,
) -> IngestResult:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ds = manifest.dataset(dataset_name)
    params = manifest.stage_params("ingest")
    exts = params["image_extensions"]
    if ds["layout"] == "subject-folders":
        scan = scan_subject_folders(ds["root"], exts, storage_options)
    else:
        if not ds.get("list_file"):
            raise IngestError(
                f"{manifest.path}: datasets.{dataset_name}.list_file is required for layout list-file"
            )
        scan = scan_list_file(ds["root"], ds["list_file"], exts, storage_options)
    synthetic = is_synthetic(ds, storage_options)
    usable = [e for e in scan.entries if e.reason is None]
    if not usable:
        where = ds.get("list_file") if ds["layout"] == "list-file" else ds["root"]
        if not scan.entries:
            found = "nothing" + (
                f" but {len(scan.stray_files)} file(s) outside subject folders" if scan.stray_files else ""
            )
            if scan.empty_subjects:
                found += f" and {len(scan.empty_subjects)} empty subject folder(s)"
        else:
            counts: dict[str, int] = {}
            for e in scan.entries:
                counts[e.reason] = counts.get(e.reason, 0) + 1
            found = (
                f"{len(scan.entries)} file(s), none usable ("
                + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                + ")"
            )
        layout = "path,subject rows" if ds["layout"] == "list-file" else "<root>/<subject>/<image> files"
        raise IngestError(
            f"{where}: no images to build (datasets.{dataset_name}, {ds['layout']}: expected {layout} with "
            f"extensions {', '.join(exts)}); found {found}"
        )
    store = ShardStore(run_root, "ingest", storage_options)
    store.remove_temporaries()  # left by a killed run
    schema = load_schema("index")
    phash = ingest_params_hash(params, ds)
    by_subject: dict[str, list[Entry]] = {}
    for e in scan.entries:
        by_subject.setdefault(e.subject, []).append(e)

    by_content = params.get("fingerprint", "stat") == "content"

    def version(e: Entry) -> object:
        """What says a file changed: its mtime (stat), or the sha256 of its bytes (content)."""
        if not by_content or e.reason is not None:
            return e.mtime
        h = hashlib.sha256()
        with fsspec.open(e.uri, "rb", **(storage_options or {})) as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    existing_shards = store.shards_with_sidecar()
    written, skipped, removed = [], [], []
    if mode == "overwrite":
        store.clear()
        existing_shards = []
    if mode == "extend" and existing_shards:
        known: dict[str, int] = {}
        for s in existing_shards:
            t = store.read(s, schema, columns=["subject", "label"])
            known.update(zip(t.column("subject").to_pylist(), t.column("label").to_pylist(), strict=True))
        labels = assign_labels(list(by_subject), known)
        new_subjects = sorted(set(by_subject) - set(known))
        groups = partition([(s, len(by_subject[s])) for s in new_subjects], params["shard_size"])
        first = max(existing_shards) + 1
        numbered = list(enumerate(groups, start=first))
        skipped = list(existing_shards)
    else:
        labels = assign_labels(list(by_subject))
        groups = partition([(s, len(by_subject[s])) for s in sorted(by_subject)], params["shard_size"])
        numbered = list(enumerate(groups))
        for s in existing_shards:
            if s >= len(groups):
                store.remove(s)  # obsolete after a re-partition
                removed.append(s)

    lines = ProgressLog("ingest", len(numbered), enabled=progress and is_batch())
    lines.update(0, what=f"{len(scan.entries)} files found in {len(by_subject)} subjects")
    for shard, subjects in numbered:
        entries = [e for s in subjects for e in by_subject[s]]
        rows = _rows_for(entries, labels)
        fp = fingerprint(
            [
                (r["image_id"], r["uri"], r["size_bytes"], version(e), r["label"], r["failure_reason"])
                for r, e in zip(rows, entries, strict=True)
            ],
            phash,
        )
        if store.is_done(shard, fp):
            skipped.append(shard)
            lines.update(what=f"part-{shard:05d} unchanged")
            continue
        t0 = time.perf_counter()
        table = from_rows(rows, schema)
        store.write(
            shard,
            table,
            schema,
            fp,
            phash,
            time.perf_counter() - t0,
            extra_metadata={
                "morphset.dataset": dataset_name,
                "morphset.dataset_root": ds["root"],
                "morphset.dataset_synthetic": "true" if synthetic else "false",
            },
            extra_sidecar={"images": len(rows), "subjects": len(subjects), "dataset": dataset_name},
        )
        written.append(shard)
        bad = sum(r["failure_reason"] is not None for r in rows)
        lines.update(images=len(rows), failures=bad, what=f"part-{shard:05d} written")

    failures: dict[str, int] = {}
    for e in scan.entries:
        if e.reason:
            failures[e.reason] = failures.get(e.reason, 0) + 1
    warnings = []
    n_img = sum(1 for e in scan.entries if e.reason is None)
    for key, have in (("expected_images", n_img), ("expected_subjects", len(by_subject))):
        want = ds.get(key)
        if want is not None and want != have:
            warnings.append(f"datasets.{dataset_name}.{key} is {want}, found {have}")
    if scan.empty_subjects:
        warnings.append(
            f"{len(scan.empty_subjects)} empty subject folder(s) skipped: {scan.empty_subjects[:5]}"
        )
    if scan.stray_files:
        warnings.append(
            f"{len(scan.stray_files)} file(s) directly under the root ignored (not in a subject folder): {scan.stray_files[:5]}"
        )
    result = IngestResult(
        written,
        sorted(skipped),
        removed,
        len(scan.entries),
        len(by_subject),
        dict(sorted(failures.items())),
        scan.empty_subjects,
        scan.stray_files,
        warnings,
    )
    _write_summary(store, dataset_name, ds, result)
    return result


def _write_summary(store: ShardStore, dataset_name: str, ds: dict, r: IngestResult) -> None:
    store.write_json(
        "_summary.json",
        {
            "dataset": dataset_name,
            "root": ds["root"],
            "layout": ds["layout"],
            "images": r.images,
            "subjects": r.subjects,
            "failures": r.failures,
            "empty_subjects": r.empty_subjects,
            "stray_files": r.stray_files,
            "warnings": r.warnings,
        },
    )


def index_table(run_root: str, storage_options: dict | None = None) -> pa.Table:
    """All committed index shards concatenated (for small runs and tests)."""
    store = ShardStore(run_root, "ingest", storage_options)
    schema = load_schema("index")
    return store.dataset(schema).to_table()
