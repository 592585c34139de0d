"""95 % bootstrap intervals over people (subjects drawn with replacement), for every headline figure.

Images of one subject are not independent samples: a subject's images share its shape, its
labels and its lighting draws, so intervals resample whole subjects (a cluster bootstrap). Two
forms:

- per-sample statistics (an error per image, a ratio of two errors' means): each sample weighs as
  often as its subject was drawn (:func:`bootstrap_samples`, :func:`ci95_mean`, :func:`ci95_ratio`);
- per-pair statistics (verification): :func:`bootstrap_pairs`, where a pair of two different people
  counts once per (draw of the one, draw of the other), a pair within one person once per draw
  of that person, and pairs between two draws of one person are left out (they would pair an
  image with itself).

Percentile intervals; ``None`` when fewer than half of the draws give a finite value (e.g. one
subject, or draws with one class only).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BOOTSTRAP = 1000


def _interval(values: list[float], n: int) -> tuple[float, float] | None:
    if len(values) < max(1, n // 2):
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_samples(
    people: np.ndarray,
    statistic: Callable[[np.ndarray], float | None],
    rng: np.random.Generator,
    n: int = BOOTSTRAP,
) -> tuple[float, float] | None:
    """95 % interval of ``statistic(weights)`` (one weight per sample: how often its person was
    drawn) over people drawn with replacement."""
    names, code = np.unique(np.asarray(people).astype(str), return_inverse=True)
    if len(names) < 2:
        return None
    values = []
    for _ in range(n):
        counts = np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))
        v = statistic(counts[code].astype(np.float64))
        if v is not None and np.isfinite(v):
            values.append(float(v))
    return _interval(values, n)


def bootstrap_pairs(
    people_a: np.ndarray,
    people_b: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float | None],
    rng: np.random.Generator,
    n: int = BOOTSTRAP,
) -> tuple[float, float] | None:
    """95 % interval of ``statistic(pair indices, pair weights)`` over people drawn with
    replacement; ``people_a``/``people_b`` name the person of each pair's two items."""
    a = np.asarray(people_a).astype(str)
    b = np.asarray(people_b).astype(str)
    names, code = np.unique(np.concatenate([a, b]), return_inverse=True)
    if len(names) < 2:
        return None
    pa, pb = code[: len(a)], code[len(a) :]
    values = []
    for _ in range(n):
        counts = np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names))
        w = np.where(pa == pb, counts[pa], counts[pa] * counts[pb]).astype(np.float64)
        keep = w > 0
        if not keep.any():
            continue
        v = statistic(np.flatnonzero(keep), w[keep])
        if v is not None and np.isfinite(v):
            values.append(float(v))
    return _interval(values, n)


def ci95_mean(
    values: np.ndarray, people: np.ndarray, seed: int = 0, n: int = BOOTSTRAP
) -> list[float] | None:
    """The interval of the mean of per-sample ``values`` (non-finite ones left out)."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    x, p = x[ok], np.asarray(people)[ok]
    ci = bootstrap_samples(p, lambda w: float(np.average(x, weights=w)), np.random.default_rng(seed), n)
    return None if ci is None else [ci[0], ci[1]]


def ci95_ratio(
    numerator: np.ndarray, denominator: np.ndarray, people: np.ndarray, seed: int = 0, n: int = BOOTSTRAP
) -> list[float] | None:
    """The interval of mean(numerator) / mean(denominator) over the same samples."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)

    def ratio(w: np.ndarray) -> float | None:
        d = float(np.sum(w * den))
        return float(np.sum(w * num)) / d if d > 0 else None

    ci = bootstrap_samples(people, ratio, np.random.default_rng(seed), n)
    return None if ci is None else [ci[0], ci[1]]
