"""Fit-stage quality: reprojection errors, iterations, convergence, rejections, identity consistency."""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.evaluate.frame import Frame
from pipeline.models.morphable_model import MorphableModel


def distribution(values: np.ndarray) -> dict[str, float]:
    """n, mean, std and the usual percentiles of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0}
    p = np.percentile(v, [10, 50, 90])
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "p10": float(p[0]),
        "median": float(p[1]),
        "p90": float(p[2]),
        "max": float(v.max()),
    }


def fitted_mask(fits: Frame) -> np.ndarray:
    """Rows whose fit succeeded (no failure reason)."""
    return fits.is_null("failure_reason")


def fit_quality(fits: Frame) -> dict:
    """Summary of a run's fit shards (one row per image)."""
    ok = fitted_mask(fits)
    good = fits.take(ok)
    reasons = Counter(str(r) for r in fits["failure_reason"][~ok])
    out = {
        "images": len(fits),
        "fitted": int(ok.sum()),
        "subjects": len(set(fits["subject"])),
        "subjects_fitted": len(set(good["subject"])),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "reproj_rmse_px": distribution(good["reproj_rmse_px"]) if "reproj_rmse_px" in good else {"n": 0},
        "reproj_nme": distribution(good["reproj_nme"]) if "reproj_nme" in good else {"n": 0},
    }
    if "iterations" in good:
        out["iterations"] = distribution(good["iterations"])
    if "converged" in good and len(good):
        # convergence is a per-subject outcome of the alternating fit: count subjects, not images
        subj, inv = np.unique(good["subject"].astype(str), return_inverse=True)
        all_conv = np.ones(len(subj), bool)
        np.logical_and.at(all_conv, inv, good["converged"].astype(bool))
        out["convergence_rate"] = float(all_conv.mean())
    if "used" in fits:
        out["used_in_fit"] = int(np.asarray(fits["used"], bool).sum())
    return out


def vertex_subset(model: MorphableModel, max_vertices: int = 2000) -> np.ndarray:
    """Evenly spaced vertex indices (cheap identity-shape comparisons on dense models)."""
    n = model.n_vertices
    return np.unique(np.linspace(0, n - 1, min(n, max_vertices)).round().astype(np.int64))


def identity_vertices(model: MorphableModel, alpha_id: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Neutral identity shapes (N, len(vertices), 3) restricted to ``vertices``."""
    rows = (vertices[:, None] * 3 + np.arange(3)).reshape(-1)
    s = model.mean[rows].astype(np.float64) + np.asarray(alpha_id, np.float64) @ model.id_basis[
        rows
    ].T.astype(np.float64)
    return s.reshape(len(s), len(vertices), 3)


def identity_consistency(subjects: np.ndarray, shapes: np.ndarray) -> dict[str, float]:
    """How tightly a subject's per-image identity shapes agree, against how far subjects differ.

    within_mm: mean per-vertex distance of each image's shape to its subject's mean shape (subjects
    with >= 2 images); between_mm: mean per-vertex distance of each subject's mean shape to the mean of
    all subjects. A ratio well below 1 means identity is consistent across a subject's images."""
    subjects = np.asarray(subjects)
    shapes = np.asarray(shapes, np.float64)
    within, means = [], []
    for s in np.unique(subjects):
        x = shapes[subjects == s]
        m = x.mean(axis=0)
        means.append(m)
        if len(x) >= 2:
            within.append(np.linalg.norm(x - m, axis=2).mean())
    means = np.asarray(means)
    between = (
        float(np.linalg.norm(means - means.mean(axis=0), axis=2).mean()) if len(means) >= 2 else float("nan")
    )
    w = float(np.mean(within)) if within else float("nan")
    return {
        "subjects": int(len(means)),
        "subjects_with_2plus_images": int(len(within)),
        "within_mm": w,
        "between_mm": between,
        "ratio": float(w / between) if between and np.isfinite(between) and between > 0 else float("nan"),
    }
