"""How well fitted identities tell real people apart: the measures a fit setting is checked on photos.

Renders have ground truth but flatter a fit (two skins, one camera model); real photographs have no
3D truth but do have people. Two measures on a set of real photos of several people each:

- **per-image identity AUC**: every photo fitted alone (``stages.fit.identity: image``); the ROC
  AUC of the cosine of α_id / σ_id over every pair of photos, same person against different;
- **split-half consistency**: each person's photos split into two halves, each half fitted as one
  subject (the multi-image fit); the ROC AUC of the halves' α_id across people (a person's two
  halves are the same-person pairs), and the 3D distance between halves' identity shapes in mm
  (RMS over the model's vertices), for the same person and for different people.

Each figure comes with a 95 % bootstrap interval over people (people drawn with replacement;
pairs between two draws of one person are left out, since they would pair a photo with itself).
Pure functions: the photos are fitted by the caller (``benchmarks/real_identity.py``,
``morphset calibrate --real-photos``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline.evaluate.bootstrap import BOOTSTRAP, bootstrap_pairs


@dataclass(frozen=True)
class Pairs:
    """All pairs (i < j) of items with their people: ``i``, ``j`` indices, ``same`` labels."""

    i: np.ndarray
    j: np.ndarray
    same: np.ndarray


def all_pairs(people: np.ndarray) -> Pairs:
    i, j = np.triu_indices(len(people), k=1)
    return Pairs(i, j, people[i] == people[j])


def cosine_scores(features: np.ndarray, pairs: Pairs) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return np.sum(f[pairs.i] * f[pairs.j], axis=1)


def _auc(same: np.ndarray, scores: np.ndarray) -> float | None:
    if same.all() or not same.any():
        return None
    return float(roc_auc_score(same, scores))


def bootstrap_people(
    people: np.ndarray,
    pairs: Pairs,
    statistic: Callable[[np.ndarray, np.ndarray], float | None],
    rng: np.random.Generator,
    n: int = BOOTSTRAP,
) -> tuple[float, float] | None:
    """95 % interval of ``statistic(pair indices, pair weights)`` over people drawn with
    replacement (:func:`pipeline.evaluate.bootstrap.bootstrap_pairs`)."""
    people = np.asarray(people)
    return bootstrap_pairs(people[pairs.i], people[pairs.j], statistic, rng, n)


def _weighted_auc(same: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float | None:
    if same.all() or not same.any():
        return None
    return float(roc_auc_score(same, scores, sample_weight=weights))


def auc_with_interval(
    people: np.ndarray, features: np.ndarray, rng: np.random.Generator, n_boot: int = BOOTSTRAP
) -> dict:
    """ROC AUC of cosine scores over all pairs, with its bootstrap interval over people."""
    people = np.asarray(people)
    pairs = all_pairs(people)
    scores = cosine_scores(features, pairs)
    ci = bootstrap_people(
        people, pairs, lambda idx, w: _weighted_auc(pairs.same[idx], scores[idx], w), rng, n_boot
    )
    return {
        "auc": _auc(pairs.same, scores),
        "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
        "people": int(len(np.unique(people))),
        "items": int(len(people)),
        "same_pairs": int(pairs.same.sum()),
        "different_pairs": int((~pairs.same).sum()),
    }


def shape_distances(
    alpha_id: np.ndarray, shape: Callable[[np.ndarray], np.ndarray], pairs: Pairs
) -> np.ndarray:
    """RMS vertex distance (mm) between the identity shapes of each pair."""
    verts = np.stack([np.asarray(shape(a), dtype=np.float64).reshape(-1, 3) for a in alpha_id])
    d = verts[pairs.i] - verts[pairs.j]
    return np.sqrt(np.mean(np.sum(d * d, axis=2), axis=1))


def split_half_consistency(
    people: np.ndarray,
    alpha_id: np.ndarray,
    id_std: np.ndarray,
    shape: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
    n_boot: int = BOOTSTRAP,
) -> dict:
    """``people`` (H,) the person of each half, ``alpha_id`` (H, k) each half's identity. The AUC
    of the halves' α_id / σ_id across people and the same- / different-person distances in mm."""
    people = np.asarray(people)
    feats = np.asarray(alpha_id, dtype=np.float64) / np.asarray(id_std, dtype=np.float64)
    out = auc_with_interval(people, feats, rng, n_boot)
    pairs = all_pairs(people)
    dist = shape_distances(np.asarray(alpha_id, dtype=np.float64), shape, pairs)
    for key, mask in (("same_person_mm", pairs.same), ("different_person_mm", ~pairs.same)):

        def mean_of(idx: np.ndarray, w: np.ndarray, mask: np.ndarray = mask) -> float | None:
            m = mask[idx]
            return float(np.average(dist[idx][m], weights=w[m])) if m.any() else None

        ci = bootstrap_people(people, pairs, mean_of, rng, n_boot)
        out[key] = {
            "mean": round(float(dist[mask].mean()), 4) if mask.any() else None,
            "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
        }
    return out


def halves(photos_by_person: dict[str, list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """Each person's photos (sorted) split into two halves, the first taking the extra one (5 ->
    3 + 2); people with fewer than two photos are left out."""
    out = {}
    for person, photos in sorted(photos_by_person.items()):
        ps = sorted(photos)
        if len(ps) >= 2:
            k = (len(ps) + 1) // 2
            out[person] = (ps[:k], ps[k:])
    return out
