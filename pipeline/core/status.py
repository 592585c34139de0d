"""Per-stage status of a run: shards done / pending / failed, rows, failures by reason, speed.

A run remembers the manifest it was built with (``RUN/run.json``); status judges "done" against
that manifest, so it answers "what would a rerun recompute".
"""

from __future__ import annotations

import json
from collections import Counter

import fsspec

from pipeline.config.manifest import Manifest, validate
from pipeline.core.stage import BUILD_ORDER, STAGES, shard_fingerprint, stage_dir
from pipeline.storage.store import ShardStore

RUN_FILE = "run.json"


def save_run_manifest(manifest: Manifest, run_root: str, storage_options: dict | None = None) -> None:
    """Snapshot the effective manifest into ``RUN/run.json`` (atomic)."""
    fs, root = fsspec.core.url_to_fs(run_root, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    doc = {"manifest_path": manifest.path, "overrides": manifest.overrides, "manifest": manifest.data}
    tmp = f"{root}/_tmp-{RUN_FILE}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(doc, indent=1, ensure_ascii=False, default=str).encode())
    fs.mv(tmp, f"{root}/{RUN_FILE}")


def load_run_manifest(run_root: str, storage_options: dict | None = None) -> Manifest | None:
    fs, root = fsspec.core.url_to_fs(run_root, **(storage_options or {}))
    try:
        with fs.open(f"{root}/{RUN_FILE}", "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    validate(doc["manifest"], f"{run_root}/{RUN_FILE}")
    return Manifest(doc["manifest"], doc.get("manifest_path", "<run>"), doc.get("overrides", {}))


def stage_status(manifest: Manifest, run_root: str, stage: str, storage_options: dict | None = None) -> dict:
    so = storage_options
    index = ShardStore(run_root, stage_dir("index"), so)
    expected = index.shards_with_sidecar()
    store = ShardStore(run_root, stage_dir(stage), so)
    done, pending, failed, stale = [], [], [], []
    rows = images = 0
    seconds = 0.0
    failures: Counter = Counter()
    for i in expected:
        sc = store.sidecar(i)
        if stage == "ingest":
            current = sc is not None
        else:
            fp = shard_fingerprint(manifest, run_root, stage, i, so)
            current = sc is not None and fp is not None and sc.get("fingerprint") == fp
        if current:
            done.append(i)
            rows += sc.get("rows", 0)
            images += sc.get("images", sc.get("rows", 0))
            seconds += sc.get("seconds", 0.0)
            failures.update(sc.get("failures", {}))
        elif store.failure(i) is not None:
            failed.append(i)
        else:
            pending.append(i)
            if sc is not None:
                stale.append(i)
    return {
        "shards": len(expected),
        "done": len(done),
        "pending": len(pending),
        "failed": len(failed),
        "stale": len(stale),
        "failed_shards": failed,
        "rows": rows,
        "failures": dict(sorted(failures.items())),
        "seconds": round(seconds, 3),
        # ingest's per-shard seconds cover only writing (the scan is shared), so no rate for it
        "images_per_second": round(images / seconds, 2) if seconds > 0 and stage != "ingest" else None,
    }


def run_status(manifest: Manifest, run_root: str, storage_options: dict | None = None) -> dict:
    return {
        s: stage_status(manifest, run_root, s, storage_options)
        for s in BUILD_ORDER
        if s == "ingest" or s in STAGES
    }


def format_status(status: dict) -> str:
    lines = [
        f"{'stage':<10} {'shards':>6} {'done':>5} {'pending':>7} {'failed':>6} {'rows':>9} {'img/s':>8}  failures"
    ]
    for stage, st in status.items():
        fails = ", ".join(f"{k}={v}" for k, v in st["failures"].items()) or "-"
        ips = f"{st['images_per_second']:.1f}" if st["images_per_second"] else "-"
        lines.append(
            f"{stage:<10} {st['shards']:>6} {st['done']:>5} {st['pending']:>7} {st['failed']:>6} {st['rows']:>9} {ips:>8}  {fails}"
        )
    return "\n".join(lines)
