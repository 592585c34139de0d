"""The real-photo identity measures (pipeline/evaluate/photo_identity.py) and their use by
`morphset calibrate --real-photos`: a prior weight that loses on real photos is never chosen."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluate.photo_identity import (
    all_pairs,
    auc_with_interval,
    bootstrap_people,
    halves,
    split_half_consistency,
)
from pipeline.fit.calibrate import weights_photos_allow


def _people(
    n_people: int, per: int, spread: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(n_people, 16))
    feats = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(n_people * per, 16))
    return np.repeat(np.arange(n_people).astype(str), per), feats


def test_auc_tells_separable_people_from_noise_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    people, clear = _people(8, 5, 0.1, rng)
    _, noise = _people(8, 5, 50.0, rng)
    good = auc_with_interval(people, clear, np.random.default_rng(1), 300)
    bad = auc_with_interval(people, noise, np.random.default_rng(1), 300)
    assert good["auc"] > 0.99 and 0.35 < bad["auc"] < 0.65
    assert good["same_pairs"] == 8 * 10 and good["different_pairs"] == 780 - 80
    lo, hi = bad["ci95"]
    assert lo <= bad["auc"] <= hi and hi - lo > 0.02  # the interval is over people, not pairs


def test_the_bootstrap_never_pairs_a_photo_with_itself():
    """Two draws of one person must not add its photos paired with themselves as same-person
    pairs (they would score 1 and inflate the AUC)."""
    people = np.array(["a", "a", "b", "b"])
    pairs = all_pairs(people)
    seen = []

    def stat(idx, w):
        seen.append((idx.copy(), w.copy()))
        return 0.0

    bootstrap_people(people, pairs, stat, np.random.default_rng(0), 50)
    for idx, w in seen:
        same = pairs.same[idx]
        # a same-person pair counts once per draw of its person, never squared
        assert np.all(w[same] <= 2) and np.all(w[~same] <= 4)


def test_split_half_distances_are_smaller_for_one_person(default_model):
    rng = np.random.default_rng(2)
    k = default_model.k_id
    truth = rng.normal(size=(6, k)) * default_model.id_std
    a = truth + 0.1 * rng.normal(size=(6, k)) * default_model.id_std
    b = truth + 0.1 * rng.normal(size=(6, k)) * default_model.id_std
    people = np.array([f"p{i}" for i in range(6)] * 2)
    out = split_half_consistency(
        people, np.vstack([a, b]), default_model.id_std, lambda x: default_model.shape(x.astype(np.float32)),
        np.random.default_rng(0), 200,
    )  # fmt: skip
    assert out["auc"] == 1.0
    assert out["same_person_mm"]["mean"] < 0.5 * out["different_person_mm"]["mean"]


def test_halves_split_each_person_and_skip_a_single_photo():
    got = halves({"x": ["5", "1", "3", "2", "4"], "y": ["a", "b"], "z": ["only"]})
    assert got == {"x": (["1", "2", "3"], ["4", "5"]), "y": (["a"], ["b"])}


def test_photos_allow_only_weights_at_least_as_good_as_the_map_weight():
    photo = {
        "1": {"per_image": {"auc": 0.73}, "split_half": {"auc": 0.81}},
        "3": {"per_image": {"auc": 0.71}, "split_half": {"auc": 0.79}},
        "10": {"per_image": {"auc": 0.70}, "split_half": {"auc": 0.82}},
        "30": {"per_image": {"auc": 0.75}, "split_half": {"auc": 0.85}},
    }
    assert weights_photos_allow(photo) == ["1", "30"]


@pytest.mark.slow
def test_calibrate_with_real_photos_chooses_a_weight_the_photos_allow(faces_dir, tmp_path, capsys):
    from pipeline.cli import main

    data, out = tmp_path / "faces", tmp_path / "dlib.json"
    assert main(["synth", "--out", str(data), "--subjects", "4", "--images-per-subject", "3", "--seed", "2",
                 "--yaw-range", "-30", "30", "--workers", "1", "--json"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["calibrate", str(data), "--landmarks", "dlib", "-o", str(out), "--real-photos", str(faces_dir),
                 "--json"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    photo = doc["real_photo_auc_by_prior_weight"]
    assert set(photo) == set(doc["identity_error_mm_by_prior_weight"])
    chosen = f"{doc['identity_prior_weight']:g}"
    assert chosen in doc["weights_real_photos_allow"]
    for key in ("per_image", "split_half"):
        assert photo[chosen][key] >= photo["1"][key]
        assert 0.5 < photo["1"][key] <= 1.0  # 8 people the fits tell apart better than chance
    made_by = json.loads(out.read_text())["made_by"]
    assert made_by["real_photo_auc_by_prior_weight"] == photo
    assert not (tmp_path / "dlib.run" / "photos").exists()  # the photo runs sit beside, not inside
