"""The report's first table: refits on random M-subsets against the mean shape."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluate.identity_curve import identity_curve, subset_draws, verdict
from pipeline.synthetic.toy import toy_model

MODEL = toy_model(k_id=6, k_exp=3)


def landmarks_table(subjects: int, per_subject: int, failed: set[int] = frozenset()) -> pa.Table:
    rows = []
    for s in range(subjects):
        for i in range(per_subject):
            k = s * per_subject + i
            rows.append(
                {
                    "image_id": f"p{s}/{i}.jpg",
                    "subject": f"p{s}",
                    "failure_reason": "no_face" if k in failed else None,
                }
            )
    return pa.Table.from_pylist(rows)


def test_subset_draws_take_m_distinct_images_of_one_subject():
    t = landmarks_table(3, 5, failed={0, 1})  # p0 keeps 3 usable images
    subjects = np.array(t.column("subject").to_pylist(), dtype=object)
    usable = np.array([r is None for r in t.column("failure_reason").to_pylist()])
    rows, names, draws = subset_draws(subjects, usable, 4, 3, np.random.default_rng(0))
    assert [s for _, s in draws] == ["p1"] * 3 + ["p2"] * 3  # p0 has too few
    for name, s in draws:
        picked = rows[np.array(names) == name]
        assert len(set(picked.tolist())) == 4 and set(subjects[picked]) == {s} and usable[picked].all()
    rows, names, draws = subset_draws(subjects, usable, 5, 3, np.random.default_rng(0))
    assert len(draws) == 2  # all of a subject's images: one draw, not three copies


def fake_fit(true_alpha: dict, noise: float, rng: np.random.Generator):
    """A fit whose identity error shrinks like 1/sqrt(M): truth plus noise/sqrt(images)."""

    def fit(table: pa.Table) -> pa.Table:
        subj = table.column("subject").to_pylist()
        out = []
        for name in subj:
            m = subj.count(name)
            a = true_alpha[name.split("#")[0]] + rng.normal(size=MODEL.k_id) * noise / np.sqrt(m)
            out.append({"subject": name, "alpha_id": a.tolist()})
        return pa.Table.from_pylist(out)

    return fit


def test_the_curve_falls_with_m_and_the_verdict_says_where_it_stands():
    rng = np.random.default_rng(1)
    true_alpha = {f"p{s}": rng.normal(size=MODEL.k_id) * MODEL.id_std for s in range(12)}
    t = landmarks_table(12, 8)
    points = identity_curve(t, true_alpha, MODEL, fake_fit(true_alpha, 2.0 * MODEL.id_std, rng), repeats=4)
    assert [p.m for p in points] == [1, 2, 4, 8]
    ratios = [p.ratio_all for p in points]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < ratios[0] / 1.8
    assert all(p.subjects == 12 for p in points) and points[0].draws == 48 and points[-1].draws == 12
    assert len({round(p.mean_all_mm, 9) for p in points}) == 1  # the same subjects' baseline
    text = verdict(points)
    assert ("lose to the mean shape" in text) == (ratios[-1] >= 1 or points[-1].ratio_liu >= 1)
    assert "falls" in text

    # a fit that carries no identity (pure noise around the mean) loses, and the report says so
    loud = identity_curve(t, true_alpha, MODEL, fake_fit({k: 0 * v for k, v in true_alpha.items()}, 0.0, rng))
    assert all(p.ratio_all == pytest.approx(1.0) for p in loud)
    assert "lose to the mean shape" in verdict(loud) and "does not fall" in verdict(loud)


def test_a_failed_draw_counts_as_the_mean_shape():
    rng = np.random.default_rng(2)
    true_alpha = {f"p{s}": rng.normal(size=MODEL.k_id) * MODEL.id_std for s in range(4)}

    def never(table: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(
            [{"subject": s, "alpha_id": None} for s in table.column("subject").to_pylist()]
        )

    points = identity_curve(landmarks_table(4, 2), true_alpha, MODEL, never, ms=(1, 2, 4))
    assert [p.m for p in points] == [1, 2]  # nobody has 4 images
    assert all(p.ratio_all == pytest.approx(1.0) and p.ratio_liu == pytest.approx(1.0) for p in points)
