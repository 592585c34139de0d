"""Per-stage status of a run: shards done / pending / failed, rows, failures by reason, speed.

Status judges "done" against the manifest the run resolves to (its ``run.json`` and any new
overrides), so it answers "what would a rerun recompute": a shard whose own output or any of whose
inputs (an upstream stage's shard) would be recomputed is *stale*, not done. A stage switched off
(embed on renders) shows ``off`` instead of a rate.
"""

from __future__ import annotations

from collections import Counter

from pipeline.config.manifest import Manifest
from pipeline.core.planner import shard_fingerprint
from pipeline.core.registry import BUILD_ORDER, STAGES, input_tables, stage_dir
from pipeline.storage.run import Run


def stage_status(run: Run, manifest: Manifest, stage: str, upstream_stale: set[int] | None = None) -> dict:
    """``upstream_stale``: shards an input stage would recompute (their output here is stale too)."""
    expected = run.shards()
    store = run.store(stage)
    done, pending, failed, stale = [], [], [], []
    rows = images = 0
    seconds = 0.0
    off = 0
    failures: Counter = Counter()
    for i in expected:
        sc = store.sidecar(i)
        if stage == "ingest":
            current = sc is not None
        else:
            fp = shard_fingerprint(run, manifest, stage, i)
            current = sc is not None and fp is not None and store.is_done(i, fp)
            current = current and i not in (upstream_stale or set())
        if current and sc is not None:
            off += bool(sc.get("off"))
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
        "stale_shards": stale,
        "_done_shards": done,  # popped by run_status
        # switched off on every done shard (embed on renders): its shards record nothing to time
        "off": bool(done) and off == len(done),
        # ingest's per-shard seconds cover only writing (the scan is shared), so no rate for it
        "images_per_second": round(images / seconds, 2)
        if seconds > 0 and stage != "ingest" and not (done and off == len(done))
        else None,
    }


def run_status(run: Run, manifest: Manifest) -> dict:
    out: dict[str, dict] = {}
    not_current: dict[str, set[int]] = {}
    for s in BUILD_ORDER:
        inputs = input_tables(s, manifest).values() if s in STAGES else ()
        upstream = set().union(*(not_current.get(stage_dir(t), set()) for t in inputs))
        st = stage_status(run, manifest, s, upstream)
        done = set(st.pop("_done_shards"))
        out[s] = st
        # what a rerun computes again here: every shard not done (ingest's index is the base)
        not_current[s] = set() if s == "ingest" else set(run.shards()) - done
    return out


def format_status(status: dict) -> str:
    lines = [
        f"{'stage':<10} {'shards':>6} {'done':>5} {'pending':>7} {'stale':>5} {'failed':>6} {'rows':>9} {'img/s':>8}  failures"
    ]
    for stage, st in status.items():
        fails = ", ".join(f"{k}={v}" for k, v in st["failures"].items()) or "-"
        ips = "off" if st.get("off") else f"{st['images_per_second']:.1f}" if st["images_per_second"] else "-"
        lines.append(
            f"{stage:<10} {st['shards']:>6} {st['done']:>5} {st['pending']:>7} {st['stale']:>5} "
            f"{st['failed']:>6} {st['rows']:>9} {ips:>8}  {fails}"
        )
    return "\n".join(lines)
