"""Verification metrics against hand-computed values on small constructed score sets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.verification import (
    best_threshold,
    cosine_scores,
    equal_error_rate,
    fold_metrics,
    fuse_scores,
    item_features,
    normalise_per_fold,
    tar_at_far,
    verification_report,
)


def _folded(gen: list[float], imp: list[float], n_folds: int):
    scores = np.array([*gen, *imp] * n_folds, dtype=float)
    same = np.array([True] * len(gen) + [False] * len(imp) * 1)
    same = np.tile(same, n_folds)
    folds = np.repeat(np.arange(n_folds), len(gen) + len(imp))
    return scores, same, folds


def test_perfect_separation():
    scores, same, folds = _folded([0.9, 0.8, 0.7], [0.2, 0.1, 0.0], 10)
    rep = verification_report(scores, same, folds)
    s = rep["summary"]
    assert s["accuracy_pct"] == {"mean": 100.0, "std": 0.0, "n_pairs": 60}
    assert s["100_minus_eer_pct"]["mean"] == 100.0
    assert s["auc"]["mean"] == 1.0
    assert s["tar_at_far_0.1_pct"]["mean"] == 100.0
    assert s["tar_at_far_0.01_pct"]["mean"] == 100.0
    # the threshold learnt on nine folds separates the classes
    assert all(0.2 < f["threshold"] < 0.7 for f in rep["folds"])


def test_known_eer_and_tar():
    # genuine 0.9 0.8 0.7 0.35 vs impostor 0.4 0.3 0.2 0.1: at t=0.4 FAR = FRR = 1/4
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.35, 0.4, 0.3, 0.2, 0.1])
    assert equal_error_rate(same, scores) == pytest.approx(0.25)
    # FAR 0 allows accepting 0.9 0.8 0.7 only (0.4 is an impostor): TAR 3/4
    assert tar_at_far(same, scores, 0.01) == pytest.approx(0.75)
    assert tar_at_far(same, scores, 0.25) == pytest.approx(1.0)
    # best accuracy 7/8: threshold between 0.4 and 0.7 (or between 0.3 and 0.35)
    t = best_threshold(scores, same)
    assert np.mean((scores > t) == same) == pytest.approx(7 / 8)


def test_eer_interpolates_between_roc_points():
    # genuine {0.8, 0.4}, impostor {0.6, 0.2}: ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1); FRR=FAR at 0.5
    same = np.array([1, 1, 0, 0], bool)
    scores = np.array([0.8, 0.4, 0.6, 0.2])
    assert equal_error_rate(same, scores) == pytest.approx(0.5)


def test_accuracy_threshold_comes_from_other_folds():
    # folds 0..8 separate at 0.5; fold 9 is shifted so its own best threshold would be 1.5:
    # evaluated with the threshold of the other nine folds it scores 50 % (all predicted same).
    scores, same, folds = _folded([0.9, 0.8], [0.2, 0.1], 10)
    scores[folds == 9] += 1.0
    per = fold_metrics(scores, same, folds)
    assert per[9].accuracy == pytest.approx(0.5)
    assert per[9].auc == pytest.approx(1.0)  # ranking inside the fold is still perfect
    assert per[0].accuracy == pytest.approx(1.0)


def test_random_scores_are_near_chance():
    rng = np.random.default_rng(0)
    n = 6000
    same = rng.random(n) < 0.5
    scores = rng.random(n)
    folds = np.arange(n) % 10
    s = verification_report(scores, same, folds)["summary"]
    assert 46 < s["accuracy_pct"]["mean"] < 54
    assert 0.47 < s["auc"]["mean"] < 0.53
    assert 46 < s["100_minus_eer_pct"]["mean"] < 54
    assert 7 < s["tar_at_far_0.1_pct"]["mean"] < 13  # a random ROC is the diagonal


def test_fold_metrics_refuses_single_fold_and_nan():
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_metrics(np.array([0.1, 0.9]), np.array([0, 1], bool), np.array([0, 0]))
    with pytest.raises(ValueError, match="NaN"):
        fold_metrics(np.array([np.nan, 0.9]), np.array([0, 1], bool), np.array([0, 1]))


def test_cosine_and_features_by_prefix():
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    y = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    assert cosine_scores(x, y).tolist() == pytest.approx([1.0, -1.0, 0.0])
    ids = ["a/0/1.jpg", "a/0/2.jpg", "a/1/1.jpg", "b.jpg"]
    feats = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 7.0]])
    f, found = item_features(["a/0", "b.jpg", "zz"], ids, feats)
    assert found.tolist() == [True, True, False]
    assert f[0].tolist() == [2.0, 1.0]  # video feature = mean over its frames
    assert f[1].tolist() == [7.0, 7.0]


def test_fusion_is_sum_of_per_fold_zscores():
    folds = np.array([0, 0, 1, 1])
    a = np.array([1.0, 3.0, 10.0, 30.0])
    b = np.array([0.0, 2.0, 0.0, 2.0])
    fused = fuse_scores([a, b], folds)
    assert fused.tolist() == pytest.approx([-2.0, 2.0, -2.0, 2.0])
    assert normalise_per_fold(a, folds).tolist() == pytest.approx([-1, 1, -1, 1])


def test_intervals_resample_subjects():
    """ci95 over subjects: wide with few subjects, narrow with many; covers the estimate."""
    rng = np.random.default_rng(0)

    def run(n_subjects: int) -> dict:
        people = np.arange(n_subjects).repeat(4).astype(str)
        i, j = np.triu_indices(len(people), 1)
        keep = rng.random(len(i)) < min(1.0, 600 / len(i))
        i, j = i[keep], j[keep]
        same = people[i] == people[j]
        scores = np.where(same, 0.6, 0.3) + rng.normal(0, 0.2, len(i))
        folds = np.arange(len(i)) % 5
        return verification_report(scores, same, folds, people[i], people[j], seed=1)["summary"]

    few, many = run(4), run(40)
    for s in (few, many):
        lo, hi = s["auc"]["ci95"]
        assert lo < hi and lo <= s["auc"]["mean"] + 0.05 and s["auc"]["mean"] - 0.05 <= hi
    width = lambda s: s["accuracy_pct"]["ci95"][1] - s["accuracy_pct"]["ci95"][0]  # noqa: E731
    assert width(few) > 2 * width(many)
    assert few["accuracy_pct"]["n_subjects"] == 4 and many["auc"]["n_subjects"] == 40
