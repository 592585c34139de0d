"""Fit-quality summary and identity consistency on hand-made fit tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluate.fit_quality import distribution, fit_quality, identity_consistency
from pipeline.evaluate.frame import Frame


def test_fit_quality_counts_and_distributions():
    t = pa.table(
        {
            "image_id": ["a/1", "a/2", "b/1", "b/2", "c/1"],
            "subject": ["a", "a", "b", "b", "c"],
            "alpha_id": [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], None, None],
            "reproj_rmse_px": [1.0, 2.0, 3.0, None, None],
            "reproj_nme": [0.1, 0.2, 0.3, None, None],
            "iterations": pa.array([4, 4, 10, 10, 0], pa.int32()),
            "converged": [True, True, False, False, False],
            "used": [True, True, True, False, False],
            "failure_reason": [None, None, None, "no_face", "too_few_landmarks"],
        }
    )
    fq = fit_quality(Frame.from_arrow(t))
    assert fq["images"] == 5 and fq["fitted"] == 3
    assert fq["subjects"] == 3 and fq["subjects_fitted"] == 2
    assert fq["rejected_by_reason"] == {"no_face": 1, "too_few_landmarks": 1}
    assert fq["convergence_rate"] == pytest.approx(0.5)  # a converged, b did not
    assert fq["reproj_rmse_px"]["mean"] == pytest.approx(2.0)
    assert fq["reproj_rmse_px"]["median"] == pytest.approx(2.0)
    assert fq["iterations"]["max"] == 10 and fq["used_in_fit"] == 3
    assert distribution(np.array([np.nan])) == {"n": 0}


def test_identity_consistency_within_and_between():
    base = np.zeros((4, 3))
    # subject s1 images at +-1 mm (x) around 0; subject s2 images at 10 +- 1 mm
    shapes = np.stack([base + [1, 0, 0], base - [1, 0, 0], base + [11, 0, 0], base + [9, 0, 0]])
    ic = identity_consistency(np.array(["s1", "s1", "s2", "s2"]), shapes)
    assert ic["within_mm"] == pytest.approx(1.0)
    assert ic["between_mm"] == pytest.approx(5.0)  # means 0 and 10, grand mean 5
    assert ic["ratio"] == pytest.approx(0.2)
    single = identity_consistency(np.array(["s1"]), shapes[:1])
    assert np.isnan(single["within_mm"]) and np.isnan(single["between_mm"])
