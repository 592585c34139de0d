"""``morphset synth``: layout, ground-truth consistency, byte-identical output, CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config.manifest import load_manifest
from pipeline.config.schemas import check_version, load_schema
from pipeline.landmarks.scheme import IBUG68
from pipeline.synthetic.synth import synthesize


def _digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(load_manifest(), out, subjects=3, images_per_subject=4, seed=7, workers=1)
    return out, summary


def test_layout_is_casia_like(synth_dir):
    out, summary = synth_dir
    assert summary["images"] == 12 and summary["subjects"] == 3
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["s0000", "s0001", "s0002"]
    for s in ("s0000", "s0001", "s0002"):
        assert sorted(p.name for p in (out / s).iterdir()) == ["000.jpg", "001.jpg", "002.jpg", "003.jpg"]
    import cv2

    img = cv2.imread(str(out / "s0001" / "002.jpg"))
    assert img.shape == (250, 250, 3)


def test_ground_truth_is_consistent_with_the_camera(synth_dir):
    out, _ = synth_dir
    pf = pq.ParquetFile(out / "ground_truth.parquet")
    schema = load_schema("ground_truth")
    check_version(pf.schema_arrow.metadata, schema, "gt")
    t = pf.read()
    assert t.schema.equals(schema.arrow, check_metadata=False)
    assert t.column("image_id").to_pylist()[:2] == ["s0000/000.jpg", "s0000/001.jpg"]
    md = pf.schema_arrow.metadata
    model_sha = md[b"morphset.model.sha256"].decode()
    assert set(t.column("model_sha256").to_pylist()) == {model_sha}
    rows = t.to_pylist()
    for r in rows:
        R = np.asarray(r["rotation"], np.float64).reshape(3, 3)
        X = np.asarray(r["landmarks_3d"], np.float64).reshape(68, 3)
        f, (tx, ty), d = r["scale"], r["translation"], r["camera_distance_mm"]
        c = X @ R.T
        # the schema's camera formula: a pinhole at distance D (the default), magnification f at the origin
        assert d is not None and 400 <= d <= 2500
        m = f * d / (d - c[:, 2])
        uv = np.stack([tx + m * c[:, 0], ty - m * c[:, 1]], axis=1)
        assert np.abs(uv - np.asarray(r["landmarks_2d"]).reshape(68, 2)).max() < 1e-3
        # and it is a perspective: the orthographic projection misses by pixels where the face is near
        ortho = np.stack([tx + f * c[:, 0], ty - f * c[:, 1]], axis=1)
        assert np.abs(ortho - uv).max() > (0.5 if d < 1000 else 0.05)
        # the stored Euler angles describe the stored rotation (fit convention)
        from pipeline.fit.camera import rotation_from_euler_deg

        assert np.allclose(rotation_from_euler_deg(r["yaw"], r["pitch"], r["roll"]), R, atol=1e-5)
        assert -60 <= r["yaw"] <= 60
        # iBUG convention: the jaw on the face outline, the rest at the landmark vertices
        ibug = np.asarray(r["landmarks_2d_ibug"]).reshape(68, 2)
        fixed = np.asarray(r["landmarks_2d"]).reshape(68, 2)
        assert np.allclose(ibug[17:], fixed[17:]) and np.allclose(ibug[7:10], fixed[7:10])
        side = np.sign(ibug[[0, 16], 0] - fixed[27, 0])  # image-left / image-right of the nose
        assert np.all(side * (ibug[[0, 16], 0] - fixed[[0, 16], 0]) >= -1e-6)  # never inside the vertex
        # framed like a CASIA crop: landmarks in the central part of the image
        lm = uv
        assert lm.min() > 0.1 * 250 and lm.max() < 0.92 * 250
    # identity per subject, expression per image
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    for rs in by_subject.values():
        assert all(x["alpha_id"] == rs[0]["alpha_id"] for x in rs)
        assert len({tuple(x["alpha_exp"]) for x in rs}) == len(rs)
    assert len({tuple(rs[0]["alpha_id"]) for rs in by_subject.values()}) == 3


def test_landmarks_3d_are_the_model_shape(synth_dir):
    from pipeline.models.assets import resolve_morphable_model

    out, _ = synth_dir
    model = resolve_morphable_model(load_manifest())
    r = pq.read_table(out / "ground_truth.parquet").slice(5, 1).to_pylist()[0]
    shape = model.shape(np.asarray(r["alpha_id"]), np.asarray(r["alpha_exp"]))
    assert np.allclose(model.landmarks_of(IBUG68).locate(shape).reshape(-1), r["landmarks_3d"], atol=1e-3)


@pytest.mark.slow
def test_same_seed_gives_byte_identical_output_whatever_the_worker_count(synth_dir, tmp_path):
    out, _ = synth_dir
    again = tmp_path / "again"
    synthesize(load_manifest(), again, subjects=3, images_per_subject=4, seed=7, workers=2)
    assert _digests(out) == _digests(again)
    other = tmp_path / "other"
    synthesize(load_manifest(), other, subjects=1, images_per_subject=1, seed=8, workers=1)
    assert _digests(other)["s0000/000.jpg"] != _digests(out)["s0000/000.jpg"]


def test_cli_flags_override_the_manifest_and_preview_is_written(tmp_path, capsys):
    rc = main(
        [
            "synth",
            "--subjects",
            "2",
            "--images-per-subject",
            "2",
            "--seed",
            "1",
            "--out",
            str(tmp_path),
            "--yaw-range",
            "-10",
            "10",
            "--size",
            "128",
            "--workers",
            "1",
            "--preview",
        ]
    )
    assert rc == 0
    assert '"images": 4' in capsys.readouterr().out
    t = pq.read_table(tmp_path / "ground_truth.parquet")
    assert all(-10 <= y <= 10 for y in t.column("yaw").to_pylist())
    # near-frontal: every inner landmark (brows, eyes, nose, mouth) is visible, none under the hair
    assert all(all(v[17:]) for v in t.column("visible").to_pylist())
    assert set(t.column("width").to_pylist()) == {128}
    import cv2

    sheet = cv2.imread(str(tmp_path / "preview.png"))
    assert sheet is not None and sheet.shape[0] >= 125


def test_bad_parameters_are_named(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--yaw-range", "30", "-30"]) == 2
    assert "stages.synth.yaw_range" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path), "--subjects", "0"]) == 2
    assert "stages.synth.subjects" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown parameter 'colour'"):
        synthesize(load_manifest(), tmp_path, colour="red")


def test_help_describes_the_command_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    assert "ground_truth.parquet" in text and "default 20" in text and "-60 60" in text


def test_rerun_into_the_same_directory_leaves_no_stale_images(tmp_path):
    synthesize(load_manifest(), tmp_path, subjects=2, images_per_subject=3, seed=0, workers=1, size=96)
    synthesize(load_manifest(), tmp_path, subjects=1, images_per_subject=2, seed=0, workers=1, size=96)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jpg"))
    assert files == ["s0000/000.jpg", "s0000/001.jpg"]
    assert pq.read_table(tmp_path / "ground_truth.parquet").num_rows == 2


def test_a_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synth output"):
        synthesize(load_manifest(), tmp_path, subjects=1, images_per_subject=1, workers=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_no_effects_renders_with_the_fits_own_camera(tmp_path, capsys):
    args = ["synth", "--subjects", "1", "--images-per-subject", "2", "--seed", "2", "--size", "128"]
    args += ["--workers", "1", "--textures", "painted", "--no-effects", "--out", str(tmp_path)]
    assert main(args) == 0
    capsys.readouterr()
    t = pq.read_table(tmp_path / "ground_truth.parquet")
    assert t.column("camera_distance_mm").null_count == 2  # orthographic
    params = json.loads(
        pq.read_metadata(tmp_path / "ground_truth.parquet").metadata[b"morphset.synth.params"]
    )
    assert params["cast_shadows"] is False and params["jpeg_quality"] == 92 and params["subjects"] == 1
