"""Aggregations of per-sample reconstruction errors: overall, per yaw bin, per expression level."""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.evaluate.bootstrap import ci95_mean
from pipeline.evaluate.reconstruction import (
    YAW_BINS,
    expression_bin_label,
    expression_bin_labels,
    yaw_bin_label,
)

METRICS = ("liu_mean_mm", "liu_rms_mm", "genova_mm")


def _stats(values: list, people: list | None = None) -> dict:
    x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    ok = np.isfinite(x)
    if not ok.any():
        return {"n": 0, "mean": float("nan"), "std": float("nan")}
    out = {"n": int(ok.sum()), "mean": float(x[ok].mean()), "std": float(x[ok].std())}
    if people is not None:
        kept = np.asarray(people, dtype=object)[ok]
        out["subjects"] = len(set(kept.tolist()))
        out["ci95"] = ci95_mean(x[ok], kept)
    return out


def group_stats(rows: list[dict], intervals: bool = False) -> dict[str, dict]:
    """Per metric: n, mean, std, and with ``intervals`` the subjects and the 95 % interval of the
    mean over subjects drawn with replacement."""
    people = [r.get("subject") for r in rows] if intervals else None
    return {m: _stats([r.get(m) for r in rows], people) for m in METRICS}


def summarise_errors(samples: list[dict], expression_edges_mm: list[float]) -> dict[str, dict]:
    """For each ``source/target``: overall stats, the per-yaw table (Liu et al. Table 1 shape:
    ±90° … 0°) and the per-expression-level table; failures counted by reason. ``samples`` are rows
    of the ``evaluation`` schema."""
    groups: dict[str, list[dict]] = {}
    for r in samples:
        groups.setdefault(f"{r['source']}/{r['target']}", []).append(r)
    out: dict[str, dict] = {}
    for name in sorted(groups):
        rows = groups[name]
        ok = [r for r in rows if r.get("failure_reason") is None]
        entry: dict = {
            "samples": len(rows),
            "measured": len(ok),
            "failures": dict(
                sorted(Counter(r["failure_reason"] for r in rows if r.get("failure_reason")).items())
            ),
            "overall": group_stats(ok, intervals=True),
        }
        if any(r.get("yaw_bin") is not None for r in ok):
            entry["per_yaw"] = [
                {"yaw": yaw_bin_label(b), "bin": b, **group_stats([r for r in ok if r.get("yaw_bin") == b])}
                for b in YAW_BINS
            ]
        levelled = [r for r in ok if r.get("expression_level_mm") is not None]
        if levelled:
            labels = [
                expression_bin_label(float(r["expression_level_mm"]), expression_edges_mm) for r in levelled
            ]
            entry["per_expression"] = [
                {
                    "expression": lab,
                    **group_stats([r for r, x in zip(levelled, labels, strict=True) if x == lab]),
                }
                for lab in expression_bin_labels(expression_edges_mm)
            ]
        out[name] = entry
    return out
