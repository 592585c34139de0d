"""Face verification metrics as commonly reported on LFW / YouTube Faces (Liu et al. 2018, Table 3).

Scores are cosine similarities of two feature vectors. Metrics per fold, then mean ± std over folds
(``np.std``, ddof=0, as the usual LFW evaluation scripts compute it):

- accuracy: the threshold is chosen on the other folds (maximum training accuracy), applied to this one;
- 100 % − EER, ROC AUC, TAR at FAR = 10 % and 1 %: on the fold's own scores (no threshold learned).

ROC points come from :func:`sklearn.metrics.roc_curve`; AUC from :func:`sklearn.metrics.roc_auc_score`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline.evaluate.bootstrap import bootstrap_pairs

FARS = (0.10, 0.01)


def item_features(items: list[str], ids: list[str], feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features of pair items: an exact image id, or a directory prefix whose images' features are
    averaged (a YouTube Faces video). Returns (features (n, d) float64, found (n,) bool); rows of
    items without any feature are NaN."""
    feats = np.asarray(feats, dtype=np.float64)
    exact = {k: i for i, k in enumerate(ids)}
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    sorted_ids = [ids[i] for i in order]
    out = np.full((len(items), feats.shape[1] if feats.ndim == 2 else 0), np.nan)
    found = np.zeros(len(items), bool)
    for n, item in enumerate(items):
        if item in exact:
            out[n] = feats[exact[item]]
            found[n] = True
            continue
        prefix = item.rstrip("/") + "/"
        lo = bisect.bisect_left(sorted_ids, prefix)
        hi = bisect.bisect_left(sorted_ids, prefix + "\U0010ffff")
        if hi > lo:
            out[n] = feats[[order[k] for k in range(lo, hi)]].mean(axis=0)
            found[n] = True
    return out, found


def cosine_scores(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (n, d) arrays; a zero vector scores 0."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    denom = nx * ny
    dots = np.einsum("ij,ij->i", x, y)
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def normalise_per_fold(scores: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """z-score each fold's scores with that fold's own mean and std (labels are not used)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.empty_like(scores)
    for k in np.unique(folds):
        m = folds == k
        sd = scores[m].std()
        out[m] = (scores[m] - scores[m].mean()) / (sd if sd > 0 else 1.0)
    return out


def fuse_scores(score_sets: list[np.ndarray], folds: np.ndarray) -> np.ndarray:
    """Score-level fusion: the sum of the per-fold normalised scores of each source."""
    if not score_sets:
        raise ValueError("fuse_scores: no score sets given")
    return np.sum([normalise_per_fold(s, folds) for s in score_sets], axis=0)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Threshold t maximising the accuracy of 'same iff score > t' on these scores.

    Candidates are the midpoints between consecutive distinct scores and one value beyond each end;
    ties go to the smallest threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, bool)
    u = np.unique(scores)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])
    gen = np.sort(scores[same])
    imp = np.sort(scores[~same])
    tp = len(gen) - np.searchsorted(gen, cands, side="right")  # genuine above t
    tn = np.searchsorted(imp, cands, side="right")  # impostors at or below t
    return float(cands[int(np.argmax(tp + tn))])


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(np.mean((np.asarray(scores) > threshold) == np.asarray(same, bool)))


def equal_error_rate(same: np.ndarray, scores: np.ndarray) -> float:
    """EER: where the ROC's false-accept and false-reject rates cross (linear interpolation
    between the two ROC points that bracket the crossing)."""
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (threshold above every score), decreases to -1
    i = int(np.argmax(diff <= 0))
    if i == 0 or diff[i] == 0:
        return float((fpr[i] + fnr[i]) / 2.0)
    d0, d1 = diff[i - 1], diff[i]
    t = d0 / (d0 - d1)
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def tar_at_far(same: np.ndarray, scores: np.ndarray, far: float) -> float:
    """Highest true-accept rate over thresholds whose false-accept rate is at most ``far``."""
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    ok = fpr <= far + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass(frozen=True)
class FoldMetrics:
    fold: int
    n_pairs: int
    threshold: float
    accuracy: float
    eer: float
    auc: float
    tar: dict[float, float]


def fold_metrics(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> list[FoldMetrics]:
    """Per-fold metrics; accuracy uses the threshold chosen on all other folds."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, bool)
    folds = np.asarray(folds)
    ks = np.unique(folds)
    if len(ks) < 2:
        raise ValueError(f"verification needs at least 2 folds to choose thresholds, got {len(ks)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("verification scores contain NaN/inf (missing features?)")
    out = []
    for k in ks:
        test = folds == k
        train = ~test
        thr = best_threshold(scores[train], same[train])
        both = 0 < same[test].sum() < test.sum()  # ROC metrics need both classes
        out.append(
            FoldMetrics(
                fold=int(k),
                n_pairs=int(test.sum()),
                threshold=thr,
                accuracy=accuracy_at(scores[test], same[test], thr),
                eer=equal_error_rate(same[test], scores[test]) if both else float("nan"),
                auc=float(roc_auc_score(same[test], scores[test])) if both else float("nan"),
                tar={f: (tar_at_far(same[test], scores[test], f) if both else float("nan")) for f in FARS},
            )
        )
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std())}


def summarise(per_fold: list[FoldMetrics]) -> dict[str, dict[str, float]]:
    """Mean ± std over folds, in percent (AUC as a fraction, as it is usually printed)."""
    out = {
        "accuracy_pct": _mean_std([100 * m.accuracy for m in per_fold]),
        "100_minus_eer_pct": _mean_std([100 * (1 - m.eer) for m in per_fold]),
        "auc": _mean_std([m.auc for m in per_fold]),
    }
    for f in FARS:
        out[f"tar_at_far_{f:g}_pct"] = _mean_std([100 * m.tar[f] for m in per_fold])
    return out


def _weighted_auc(same: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float | None:
    if same.all() or not same.any():
        return None
    return float(roc_auc_score(same, scores, sample_weight=weights))


def verification_report(
    scores: np.ndarray,
    same: np.ndarray,
    folds: np.ndarray,
    people_a: np.ndarray | None = None,
    people_b: np.ndarray | None = None,
    seed: int = 0,
) -> dict:
    """Summary, per-fold rows and the pooled ROC curve (for plotting) of one score set.

    With the person of each pair's two items (``people_a``, ``people_b``), the accuracy and the AUC
    also get a 95 % interval over people drawn with replacement (``ci95``; accuracy of each pair
    judged with the threshold its fold took from the other folds, AUC of the pooled scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, bool)
    folds = np.asarray(folds)
    per = fold_metrics(scores, same, folds)
    fpr, tpr, _ = roc_curve(same, scores)
    summary = summarise(per)
    if people_a is not None and people_b is not None:
        thr = {m.fold: m.threshold for m in per}
        correct = (scores > np.array([thr[int(k)] for k in folds])) == same
        rng = np.random.default_rng(seed)
        acc = bootstrap_pairs(
            people_a, people_b, lambda i, w: 100 * float(np.average(correct[i], weights=w)), rng
        )
        auc = bootstrap_pairs(people_a, people_b, lambda i, w: _weighted_auc(same[i], scores[i], w), rng)
        n_people = len(set(np.asarray(people_a).astype(str)) | set(np.asarray(people_b).astype(str)))
        summary["accuracy_pct"]["ci95"] = None if acc is None else list(acc)
        summary["auc"]["ci95"] = None if auc is None else list(auc)
        summary["accuracy_pct"]["n_subjects"] = summary["auc"]["n_subjects"] = n_people
    for entry in summary.values():
        entry["n_pairs"] = int(len(scores))
    return {
        "n_pairs": int(len(scores)),
        "n_same": int(np.sum(same)),
        "n_folds": len(per),
        "summary": summary,
        "folds": [
            {
                "fold": m.fold,
                "n_pairs": m.n_pairs,
                "threshold": m.threshold,
                "accuracy": m.accuracy,
                "eer": m.eer,
                "auc": m.auc,
                **{f"tar_at_far_{f:g}": m.tar[f] for f in FARS},
            }
            for m in per
        ],
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }
