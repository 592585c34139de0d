"""The fit stage end to end: a hand-made landmarks table -> a conforming fits table / shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.manifest import ManifestError, load_manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.core.runner import process_shard
from pipeline.fit import stage as fit_stage
from pipeline.fit.loop import FitOptions
from pipeline.landmarks.scheme import IBUG68
from pipeline.storage.run import Run
from pipeline.storage.store import ShardStore
from pipeline.synthetic.toy import synthesize

MODEL = {"k_id": 16, "k_exp": 6, "seed": 2}  # the model fixture (conftest.py)


def landmarks_table(model, n_subjects=3, n_images=3, noise=1.0, seed=0):
    """A landmarks table (schemas/landmarks.yaml) with a few broken rows, subjects interleaved."""
    s = synthesize(model, n_subjects, n_images, noise_px=noise, seed=seed)
    rows = []
    for j in range(n_images):  # interleave subjects: the stage must regroup them
        for i in range(n_subjects):
            rows.append(
                {
                    "image_id": f"p{i}/{j}.jpg",
                    "subject": f"p{i}",
                    "label": i,
                    "landmarks": s.landmarks[i, j].reshape(-1).astype(np.float32).tolist(),
                    "confidence": None,
                    "backend": "fan",
                    "backend_version": "1.5.0",
                    "weights_sha256": "0" * 64,
                    "align_matrix": None,
                    "image_width": 250,
                    "image_height": 250,
                    "failure_reason": None,
                }
            )
    return rows, s


def to_table(rows):
    from pipeline.config.schemas import from_rows

    return from_rows(rows, load_schema("landmarks"))


def test_fits_table_conforms_and_records_every_outcome(model):
    rows, s = landmarks_table(model, n_subjects=4, n_images=3)
    rows[0]["landmarks"], rows[0]["failure_reason"] = None, "no_face"  # p0/0
    lm = list(rows[1]["landmarks"])  # p1/0: only 20 landmarks present
    rows[1]["landmarks"] = [float("nan")] * 96 + lm[96:]
    rows[2]["landmarks"] = [10.0, 10.0] * 68  # p2/0: all points on one spot
    rows[3]["landmarks"] = [float(x) for x in np.linspace(0, 200, 136)]  # p3/0: a straight line
    bad = np.asarray(rows[7]["landmarks"]) + np.random.default_rng(1).normal(0, 35, 136)  # p3/1
    rows[7]["landmarks"] = bad.tolist()
    table = to_table(rows)
    opt = FitOptions(reject_nme=0.1)
    out = fit_stage.fit_landmark_table(table, model, opt, batch_images=4)
    assert out.schema.equals(load_schema("fits").arrow, check_metadata=False)
    assert out.column("image_id").to_pylist() == table.column("image_id").to_pylist()
    r = out.to_pylist()
    reasons = [x["failure_reason"] for x in r]
    assert reasons[:4] == ["no_face", "too_few_landmarks", "degenerate_geometry", "degenerate_geometry"]
    assert reasons[7] == "rejected_reprojection"
    assert all(x is None for i, x in enumerate(reasons) if i not in (0, 1, 2, 3, 7))
    md = out.schema.metadata
    assert md[b"morphset.model.name"] == model.name.encode()
    assert md[b"morphset.model.sha256"] == model.sha256.encode()
    assert md[b"morphset.model.k_id"] == b"16" and md[b"morphset.model.k_exp"] == b"6"
    by_subject = {}
    for x in r:
        by_subject.setdefault(x["subject"], []).append(x)
    for xs in by_subject.values():
        ids = {tuple(x["alpha_id"]) for x in xs}
        assert len(ids) == 1 and len(next(iter(ids))) == 16  # one identity per subject
        assert all(x["subject_images_used"] == sum(y["used"] for y in xs) for x in xs)
        assert all(x["iterations"] >= 1 and len(x["objective_history"]) == x["iterations"] for x in xs)
    assert by_subject["p0"][0]["subject_images_used"] == 2
    assert by_subject["p3"][0]["subject_images_used"] == 1  # straight line + rejected image left out
    failed = r[0]
    assert failed["alpha_exp"] is None and failed["rotation"] is None and not failed["used"]
    rejected = r[7]
    assert rejected["rotation"] is not None and not rejected["used"] and rejected["reproj_nme"] > 0.1
    good = r[4]  # p0/1 -> row order: j=1, i=0
    assert good["image_id"] == "p0/1.jpg" and good["used"]
    R = np.asarray(good["rotation"]).reshape(3, 3)
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-5) and np.isclose(np.linalg.det(R), 1.0, atol=1e-5)
    truth_yaw = s.yaw[0, 1]
    assert abs(good["yaw"] - truth_yaw) < 3.0
    assert good["reproj_rmse_px"] < 3.0 and good["reproj_nme"] < 0.05
    assert len(good["alpha_exp"]) == 6 and len(good["translation"]) == 2


def test_translation_and_rotation_reproduce_the_landmarks_in_image_pixels(model):
    rows, _ = landmarks_table(model, n_subjects=1, n_images=2, noise=0.0)
    out = fit_stage.fit_landmark_table(to_table(rows), model, FitOptions(robust_loss="none")).to_pylist()
    mean, idb, expb = (a.astype(np.float64) for a in model.landmark_model(IBUG68))
    for row, src in zip(out, rows, strict=True):
        X = mean + idb @ np.asarray(row["alpha_id"]) + expb @ np.asarray(row["alpha_exp"])
        R = np.asarray(row["rotation"]).reshape(3, 3)
        P = row["scale"] * X @ R[:2].T
        u = np.stack([row["translation"][0] + P[:, 0], row["translation"][1] - P[:, 1]], axis=1)
        rmse = np.sqrt(np.mean(np.sum((u - np.asarray(src["landmarks"]).reshape(68, 2)) ** 2, axis=1)))
        # the stored columns reproduce the stored error (float32 rounding aside), and it is small
        assert abs(rmse - row["reproj_rmse_px"]) < 2e-3 and rmse < 0.5


def test_empty_and_all_failed_tables(model):
    empty = load_schema("landmarks").empty_table()
    out = fit_stage.fit_landmark_table(empty, model, FitOptions())
    assert out.num_rows == 0 and out.schema.equals(load_schema("fits").arrow, check_metadata=False)
    rows, _ = landmarks_table(model, n_subjects=2, n_images=1)
    for r in rows:
        r["landmarks"], r["failure_reason"] = None, "decode_error"
    out = fit_stage.fit_landmark_table(to_table(rows), model, FitOptions()).to_pylist()
    assert [r["failure_reason"] for r in out] == ["decode_error", "decode_error"]
    assert all(r["alpha_id"] is None and r["iterations"] == 0 and not r["converged"] for r in out)


def test_batching_does_not_change_results(model):
    rows, _ = landmarks_table(model, n_subjects=5, n_images=3, seed=3)
    rows = rows[:-2]  # ragged: two subjects with two images
    table = to_table(rows)
    a = fit_stage.fit_landmark_table(table, model, FitOptions(), batch_images=3)
    b = fit_stage.fit_landmark_table(table, model, FitOptions(), batch_images=1000)
    for col in ("alpha_id", "rotation", "alpha_exp"):
        x = np.asarray(a.column(col).to_pylist(), dtype=float)
        y = np.asarray(b.column(col).to_pylist(), dtype=float)
        assert np.allclose(x, y, atol=1e-5)


def test_plan_batches_respects_budget():
    counts = np.array([5, 1, 1, 2, 40, 3, 3])
    batches = fit_stage.plan_batches(counts, 8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    for b in batches:
        assert len(b) * counts[b].max() <= 8 or len(b) == 1


def test_manifest_block_defaults_and_validation():
    m = load_manifest()
    p = m.stage_params("fit")
    assert p["max_iterations"] >= 1 and p["robust_loss"] in ("none", "huber")
    opt = fit_stage.options_from_params(p)
    assert opt.reject_nme == p["reject_nme"]
    with pytest.raises(ManifestError, match="stages.fit.robust_loss"):
        load_manifest(overrides=["stages.fit.robust_loss=cauchy"])
    with pytest.raises(ManifestError, match="stages.fit"):
        load_manifest(overrides=["stages.fit.iterations=3"])


def test_run_shard_through_the_store(tmp_path, model, monkeypatch):
    """process_shard -> run_shard -> committed shard whose file carries the model metadata."""
    monkeypatch.setattr(fit_stage, "load_stage_model", lambda ctx: model)
    from pipeline.core import workercache

    workercache.clear()
    rows, _ = landmarks_table(model, n_subjects=2, n_images=2)
    root = str(tmp_path / "run")
    ShardStore(root, "landmarks").write(0, to_table(rows), load_schema("landmarks"), "fp-landmarks", "p", 0.1)
    emb = from_rows(
        [{k: r[k] for k in ("image_id", "subject", "label")} for r in rows], load_schema("embeddings")
    )
    ShardStore(root, "embed").write(0, emb, load_schema("embeddings"), "fp-embed", "p", 0.1)
    manifest = load_manifest(overrides=["execution.array_backend=numpy", "stages.fit.max_iterations=15"])
    sidecar = process_shard(Run(root), manifest, "fit", 0, assets={})
    assert sidecar["rows"] == 4 and sidecar["failures"] == {}
    path = ShardStore(root, "fit").data_path(0)
    md = pq.read_schema(path).metadata
    assert md[b"morphset.model.sha256"] == model.sha256.encode()
    assert md[b"morphset.fit.array_backend"] == b"numpy"
    table = pq.read_table(path)
    assert table.num_rows == 4 and all(table.column("used").to_pylist())
    assert max(table.column("iterations").to_pylist()) <= 15
    workercache.clear()


def test_parse_landmarks_handles_nulls_in_the_middle(model):
    rows, _ = landmarks_table(model, n_subjects=3, n_images=1)
    rows[1]["landmarks"], rows[1]["failure_reason"] = None, "no_face"
    table = to_table(rows)
    pts, reasons = fit_stage.parse_landmarks(pa.concat_tables([table.slice(0, 2), table.slice(2)]))
    assert reasons == [None, "no_face", None]
    assert np.isnan(pts[1]).all()
    assert np.allclose(pts[2].reshape(-1), np.asarray(rows[2]["landmarks"], dtype=np.float32))


def test_a_failing_batched_solve_does_not_sink_the_shard(model, monkeypatch):
    rows, _ = landmarks_table(model, n_subjects=3, n_images=2)
    poison = rows[1]["landmarks"][0]  # subject p1's first image, landmark 0 x
    real = fit_stage.fit_subjects

    def flaky(lm, v, w, present, opt, noise=None):
        if v.shape[0] > 1 or float(v[0, 0, 0, 0]) == poison:
            raise np.linalg.LinAlgError("Singular matrix")
        return real(lm, v, w, present, opt, noise)

    monkeypatch.setattr(fit_stage, "fit_subjects", flaky)
    out = fit_stage.fit_landmark_table(to_table(rows), model, FitOptions(), batch_images=100).to_pylist()
    reasons = {r["image_id"]: r["failure_reason"] for r in out}
    assert reasons["p1/0.jpg"] == reasons["p1/1.jpg"] == "degenerate_geometry"
    assert all(reasons[f"p{i}/{j}.jpg"] is None for i in (0, 2) for j in (0, 1))
    assert all(r["alpha_id"] is None for r in out if r["subject"] == "p1")


def test_float32_and_float64_fits_agree(model):
    rows, _ = landmarks_table(model, n_subjects=3, n_images=3, noise=2.0, seed=9)
    table = to_table(rows)
    a = fit_stage.fit_landmark_table(table, model, FitOptions(), precision="float32")
    b = fit_stage.fit_landmark_table(table, model, FitOptions(), precision="float64")
    for col, tol in (("rotation", 1e-3), ("alpha_id", 1e-2), ("reproj_rmse_px", 1e-3)):
        x = np.asarray(a.column(col).to_pylist(), dtype=float)
        y = np.asarray(b.column(col).to_pylist(), dtype=float)
        assert np.allclose(x, y, atol=tol), col


def test_identity_shrinkage_scales_each_identity_by_its_image_count_and_keeps_the_rest(model):
    """1 / (1 + common + per_image / M): the identity's size changes, its direction (every cosine
    between identities), the poses and the expressions do not."""
    rows, _ = landmarks_table(model, n_subjects=3, n_images=3, seed=5)
    rows = rows[:-1]  # p2 has two images, the others three
    table = to_table(rows)
    plain = fit_stage.fit_landmark_table(table, model, FitOptions())
    shrunk = fit_stage.fit_landmark_table(table, model, FitOptions(identity_shrinkage=(0.5, 1.5)))
    a = np.asarray(plain.column("alpha_id").to_pylist(), float)
    b = np.asarray(shrunk.column("alpha_id").to_pylist(), float)
    m = np.asarray(plain.column("subject_images_used").to_pylist(), float)
    assert set(m) == {2.0, 3.0}
    assert np.allclose(b, a / (1 + 0.5 + 1.5 / m)[:, None], rtol=1e-6)
    for col in ("rotation", "alpha_exp", "scale"):
        assert plain.column(col).equals(shrunk.column(col))
    # per-image fits: M = 1
    one = fit_stage.fit_landmark_table(
        table, model, FitOptions(identity_shrinkage=(0.5, 1.5)), identity="image"
    )
    ref = fit_stage.fit_landmark_table(table, model, FitOptions(), identity="image")
    x, y = (np.asarray(t.column("alpha_id").to_pylist(), float) for t in (one, ref))
    assert np.allclose(x, y / 3.0, rtol=1e-6)
    # none: the very same bytes as before the setting existed
    zero = fit_stage.fit_landmark_table(table, model, FitOptions(identity_shrinkage=(0.0, 0.0)))
    assert zero.column("alpha_id").equals(plain.column("alpha_id"))


def test_identity_shrinkage_comes_from_the_setting_or_the_error_model():
    from dataclasses import replace

    from pipeline.fit.noise import uniform

    params = load_manifest().stage_params("fit")
    em = replace(uniform(1.0), identity_shrinkage=(0.2, 0.7))
    assert fit_stage.options_from_params(params).identity_shrinkage == (0.0, 0.0)
    assert fit_stage.options_from_params(params, em).identity_shrinkage == (0.2, 0.7)
    mine = params | {"identity_shrinkage": {"common": 0.0, "per_image": 0.0}}
    assert fit_stage.options_from_params(mine, em).identity_shrinkage == (0.0, 0.0)
    with pytest.raises(ManifestError, match="identity_shrinkage"):
        load_manifest(overrides={"stages.fit.identity_shrinkage": {"common": -1, "per_image": 0}})
