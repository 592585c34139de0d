"""Clean identities: the embed stage, the fit's identity screening, the per-image fit mode, and the
identity overlap of two runs (pure parts here; real photos in the slow test at the end)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core.runner import stage_context
from pipeline.embed import stage as embed_stage
from pipeline.embed.identity import AMBIGUOUS, OUTLIER, ScreenParams, clusters, screen_subject
from pipeline.embed.overlap import SubjectCentres, find_overlap
from pipeline.export.stage import SubjectListError, read_subject_list
from pipeline.fit.loop import FitOptions
from pipeline.fit.stage import fit_landmark_table
from pipeline.ingest.stage import SYNTH_MARKER, is_synthetic
from pipeline.synthetic.synth import GROUND_TRUTH_FILE
from tests.test_fit_stage import landmarks_table, to_table

MODEL = {"k_id": 16, "k_exp": 6, "seed": 2}
P = ScreenParams(outlier_distance=0.54, cluster_distance=0.6, ambiguous_ratio=0.75)
OPT = FitOptions(max_iterations=15)


def _people(n_people: int, dim: int = 128, seed: int = 0) -> np.ndarray:
    """Embedding centres of different people, ~0.8 apart like dlib's (norm ~0.57 each)."""
    c = np.random.default_rng(seed).normal(size=(n_people, dim))
    return 0.57 * c / np.linalg.norm(c, axis=1, keepdims=True)


def _faces(centre: np.ndarray, n: int, rng: np.random.Generator, spread: float = 0.2) -> np.ndarray:
    return centre + spread / np.sqrt(centre.size) * rng.normal(size=(n, centre.size))


# --- screening ---------------------------------------------------------------------------------
def test_a_minority_of_other_people_are_outliers_and_the_centre_ignores_them():
    rng = np.random.default_rng(1)
    who = _people(3)
    e = np.concatenate([_faces(who[0], 5, rng), _faces(who[1], 1, rng), _faces(who[2], 1, rng)])
    reasons, centre = screen_subject(e, P)
    assert reasons == [None] * 5 + [OUTLIER, OUTLIER]
    assert np.linalg.norm(centre - e[:5].mean(axis=0)) < 1e-12  # the largest cluster's mean


def test_two_comparable_people_make_the_subject_ambiguous():
    rng = np.random.default_rng(2)
    who = _people(2)
    two = np.concatenate([_faces(who[0], 3, rng), _faces(who[1], 3, rng)])
    assert screen_subject(two, P) == ([AMBIGUOUS] * 6, None)
    assert screen_subject(two[[0, 3]], P)[0] == [AMBIGUOUS] * 2  # 1 vs 1: no way to tell who
    lopsided = np.concatenate([_faces(who[0], 4, rng), _faces(who[1], 2, rng)])  # 2 < 0.75 x 4
    assert screen_subject(lopsided, P)[0] == [None] * 4 + [OUTLIER] * 2
    assert screen_subject(two[:1], P)[0] == [None]  # one image: nothing to compare
    assert list(clusters(two[[3, 0, 1]], 0.6)) == [1, 0, 0]  # largest cluster first


# --- the fit stage with embeddings -------------------------------------------------------------
def _fit(table, model, **kw):
    return fit_landmark_table(table, model, OPT, backend="numpy", precision="float64", **kw)


def _embeddings_for(rows, rng, plant: dict[str, str] | None = None) -> np.ndarray:
    subjects = sorted({r["subject"] for r in rows} | set((plant or {}).values()))
    who = dict(zip(subjects, _people(len(subjects)), strict=True))
    return np.stack([_faces(who[(plant or {}).get(r["image_id"], r["subject"])], 1, rng)[0] for r in rows])


def test_screened_images_take_no_part_in_the_identity(model):
    rows, _ = landmarks_table(model, n_subjects=3, n_images=4)
    rng = np.random.default_rng(3)
    emb = _embeddings_for(rows, rng, plant={"p0/1.jpg": "someone-else"})
    fits = _fit(to_table(rows), model, embeddings=emb, screening=P).to_pylist()
    by_id = {r["image_id"]: r for r in fits}
    planted = by_id["p0/1.jpg"]
    assert planted["failure_reason"] == OUTLIER and not planted["used"]
    assert [r["image_id"] for r in fits if r["failure_reason"]] == ["p0/1.jpg"]
    assert by_id["p0/0.jpg"]["subject_images_used"] == 3
    # the subject's identity is the fit without that image
    alone = _fit(to_table([r for r in rows if r["image_id"] != "p0/1.jpg"]), model).to_pylist()
    want = next(r["alpha_id"] for r in alone if r["subject"] == "p0")
    np.testing.assert_allclose(by_id["p0/0.jpg"]["alpha_id"], want, atol=1e-5)


def test_an_ambiguous_subject_is_not_fitted_and_others_are_untouched(model):
    rows, _ = landmarks_table(model, n_subjects=3, n_images=4)
    plant = {"p2/0.jpg": "x", "p2/1.jpg": "x"}  # p2: two of its four images are someone else
    emb = _embeddings_for(rows, np.random.default_rng(4), plant)
    screened = _fit(to_table(rows), model, embeddings=emb, screening=P).to_pylist()
    plain = _fit(to_table(rows), model).to_pylist()
    for a, b in zip(screened, plain, strict=True):
        if a["subject"] == "p2":
            assert a["failure_reason"] == AMBIGUOUS and a["alpha_id"] is None and not a["used"]
        else:
            assert a["failure_reason"] is None
            np.testing.assert_allclose(a["alpha_id"], b["alpha_id"], atol=1e-6)


def test_without_embeddings_the_fit_is_unchanged(model):
    rows, _ = landmarks_table(model, n_subjects=3, n_images=3)
    plain = _fit(to_table(rows), model)
    none = _fit(to_table(rows), model, embeddings=np.full((len(rows), 0), np.nan), screening=P)
    assert none.equals(plain)


def test_image_mode_gives_one_identity_per_image(model):
    rows, _ = landmarks_table(model, n_subjects=2, n_images=3)
    emb = _embeddings_for(rows, np.random.default_rng(5), plant={"p0/1.jpg": "x"})
    table = _fit(to_table(rows), model, identity="image", embeddings=emb, screening=P)
    assert table.schema.metadata[b"morphset.fit.identity"] == b"image"
    fits = table.to_pylist()
    assert all(r["failure_reason"] is None and r["subject_images_used"] == 1 for r in fits)  # not screened
    ids = np.array([r["alpha_id"] for r in fits])
    assert len({tuple(np.round(a, 6)) for a in ids}) == len(rows)
    # each equals the subject-mode fit of that image alone
    one = _fit(to_table([rows[0]]), model).to_pylist()[0]
    np.testing.assert_allclose(ids[0], one["alpha_id"], atol=1e-5)
    with pytest.raises(ValueError, match="identity: expected one of"):
        _fit(to_table(rows), model, identity="person")


# --- the embed stage's switch ------------------------------------------------------------------
def _index_and_landmarks(synthetic: str | None):
    rows = [{"image_id": f"s{i}/{j}.jpg", "subject": f"s{i}", "label": i} for i in range(2) for j in range(2)]
    md = {} if synthetic is None else {"morphset.dataset_synthetic": synthetic}
    index = from_rows(
        [{**r, "uri": f"/nowhere/{r['image_id']}", "size_bytes": 1} for r in rows], load_schema("index"), md
    )
    lms = from_rows(
        [{**r, "backend": "dlib", "backend_version": "x", "weights_sha256": "0"} for r in rows],
        load_schema("landmarks"),
    )
    return index, lms


def test_embed_is_off_for_renders_by_default_and_then_reads_nothing():
    index, lms = _index_and_landmarks("true")
    ctx = stage_context(load_manifest(), "embed")
    out = embed_stage.run_shard({"index": index, "landmarks": lms}, ctx)  # no image exists: none is read
    assert out.schema.metadata[b"morphset.embed.enabled"] == b"false"
    assert out.column("embedding").null_count == 4
    assert out.column("image_id").to_pylist() == index.column("image_id").to_pylist()
    real_index, _ = _index_and_landmarks("false")
    assert embed_stage.enabled_for(ctx.params.as_dict(), real_index)
    assert embed_stage.enabled_for(ctx.params.as_dict(), _index_and_landmarks(None)[0])  # older index: real
    forced = stage_context(load_manifest(overrides=["stages.embed.enabled=false"]), "embed")
    assert not embed_stage.enabled_for(forced.params.as_dict(), real_index)


def test_a_root_written_by_synth_is_synthetic(tmp_path):
    assert SYNTH_MARKER == GROUND_TRUTH_FILE
    assert not is_synthetic({"root": str(tmp_path)})
    assert is_synthetic({"root": str(tmp_path), "synthetic": True})
    (tmp_path / SYNTH_MARKER).write_bytes(b"")
    assert is_synthetic({"root": str(tmp_path)})


# --- overlap and exclusion lists ---------------------------------------------------------------
def test_overlap_lists_the_subjects_within_the_threshold():
    who = _people(5)
    train = SubjectCentres("t", ["a", "b", "c"], who[[0, 1, 2]], {"a": 3, "b": 2, "c": 4})
    ev = SubjectCentres("e", ["x", "y"], np.stack([who[2] + 0.01, who[4]]), {"x": 2, "y": 1})
    o = find_overlap(train, ev, 0.5)
    assert [
        (p["train_subject"], p["eval_subject"], p["train_images"], p["eval_images"]) for p in o.pairs
    ] == [("c", "x", 4, 2)]
    assert o.pairs[0]["distance"] == pytest.approx(0.01 * np.sqrt(128), abs=1e-3)
    assert o.train_subjects == ["c"] and o.summary()["shared_train_subjects"] == 1


def test_subject_lists_in_every_accepted_form(tmp_path):
    over = tmp_path / "overlap.csv"
    over.write_text(
        "train_subject,eval_subject,distance,train_images,eval_images\nb,x,0.2,3,2\na,y,0.3,1,1\nb,z,0.4,3,1\n"
    )
    assert read_subject_list(str(over)) == ["a", "b"]
    plain = tmp_path / "names.txt"
    plain.write_text("# people to leave out\nzed\n\nann\n")
    assert read_subject_list(str(plain)) == ["ann", "zed"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,score\nann,1\n")
    with pytest.raises(SubjectListError, match=r"bad.csv: line 1 has columns \['name', 'score'\]"):
        read_subject_list(str(bad))
    empty = tmp_path / "empty.csv"
    empty.write_text("subject\nann\n\n,\n")
    with pytest.raises(SubjectListError, match=r"empty.csv: line \d: empty subject"):
        read_subject_list(str(empty))
    with pytest.raises(SubjectListError, match="cannot read"):
        read_subject_list(str(tmp_path / "missing.txt"))
