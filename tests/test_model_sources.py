"""Loaders for the user-supplied paper models (BFM 2009 + 3DDFA expressions, BFM 2017), on small
files written here in the real formats, and their errors on bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.io

from pipeline.config.manifest import load_manifest
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.assets import load_model_entry
from pipeline.models.morphable_model import ModelError, load_npz, sha256_file
from pipeline.models.sources import (
    load_bfm2009,
    load_bfm2017,
    load_landmark_indices,
    load_user_model,
    read_mat,
)
from pipeline.models.triangulation import face_normals

N_SIDE = 14  # 196 vertices


def grid_face(n: int = N_SIDE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small face-like height field in mm (y up, z towards the camera), outward triangles, 68 landmarks."""
    xs = np.linspace(-75, 75, n)
    ys = np.linspace(-100, 90, n)
    x, y = np.meshgrid(xs, ys)
    z = 90 - x**2 / 150 - y**2 / 400 + 25 * np.exp(-(x**2 + y**2) / 300)  # a nose bump at the origin
    v = np.c_[x.ravel(), y.ravel(), z.ravel()]
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tri = np.r_[np.c_[a, b, c], np.c_[b, d, c]]  # counter-clockwise seen from +z
    rng = np.random.default_rng(0)
    near = lambda p: int(np.argmin(np.linalg.norm(v[:, :2] - p, axis=1)))  # noqa: E731
    lm = np.array([near(p) for p in rng.uniform([-60, -90], [60, 60], size=(68, 2))])
    lm[36], lm[45], lm[30], lm[8], lm[27] = (
        near((-43, 26)),
        near((43, 26)),
        near((0, 0)),
        near((0, -100)),
        near((0, 33)),
    )
    return v, tri, lm


def basis(n3: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n3, k)))
    return q


@pytest.fixture()
def bfm2009(tmp_path):
    """01_MorphableModel.mat (micrometres, 1-based tl) + Model_Expression.mat + landmarks.txt."""
    v, tri, lm = grid_face()
    n3 = v.size
    pc = basis(n3, 5, 1)
    ev = np.array([5e4, 3e4, 2e4, 1e4, 5e3])  # std in micrometres of displacement norm
    w_exp = basis(n3, 3, 2) * np.array([2000.0, 1500.0, 1000.0])  # micrometres per unit, not unit-norm
    sigma_exp = np.array([1.5, 0.8, 0.3])
    mu_exp = np.random.default_rng(3).normal(scale=200.0, size=n3)
    files = {
        "shape": tmp_path / "01_MorphableModel.mat",
        "exp": tmp_path / "Model_Expression.mat",
        "lm": tmp_path / "landmarks.txt",
    }
    mu_shape = v.reshape(-1) * 1000 - mu_exp  # so that mean + mean expression is the grid face
    scipy.io.savemat(
        files["shape"],
        {"shapeMU": mu_shape[:, None], "shapePC": pc, "shapeEV": ev[:, None], "tl": (tri + 1).astype(float)},
    )
    scipy.io.savemat(
        files["exp"], {"mu_exp": mu_exp[:, None], "w_exp": w_exp, "sigma_exp": sigma_exp[:, None]}
    )
    files["lm"].write_text("\n".join(map(str, lm)))
    return files, dict(v=v, tri=tri, lm=lm, pc=pc, ev=ev, w_exp=w_exp, sigma_exp=sigma_exp)


def test_bfm2009_units_bases_and_priors(bfm2009):
    files, raw = bfm2009
    m = load_bfm2009(files["shape"], files["exp"], files["lm"])
    assert (m.n_vertices, m.k_id, m.k_exp) == (N_SIDE**2, 5, 3)
    np.testing.assert_allclose(m.shape(), raw["v"], atol=1e-3)  # micrometres -> mm, mean expression folded in
    np.testing.assert_array_equal(m.landmarks_of(IBUG68).nearest, raw["lm"])
    np.testing.assert_allclose(np.linalg.norm(m.id_basis, axis=0), 1.0, rtol=1e-5)
    # a one-standard-deviation sample is the same shape as in the file's own parametrisation
    for k in range(5):
        a = np.zeros(5)
        a[k] = m.id_std[k]
        want = raw["v"] + (raw["pc"][:, k] * raw["ev"][k] / 1000).reshape(-1, 3)
        np.testing.assert_allclose(m.shape(a_id=a), want, atol=1e-3)
    for k in range(3):
        e = np.zeros(3)
        e[k] = m.exp_std[k]
        want = raw["v"] + (raw["w_exp"][:, k] * raw["sigma_exp"][k] / 1000).reshape(-1, 3)
        np.testing.assert_allclose(m.shape(a_exp=e), want, atol=1e-3)
    np.testing.assert_array_equal(np.sort(m.triangles, axis=1), np.sort(raw["tri"], axis=1))  # 1-based tl
    assert m.licence.startswith("Basel Face Model 2009")


def test_bfm2009_with_3ddfa_crop_and_exp_pca_bin(bfm2009, tmp_path):
    files, raw = bfm2009
    n = N_SIDE**2
    keep = np.arange(n)[(raw["v"][:, 0] > -70)]  # crop away the left column of vertices
    trim = tmp_path / "BFM_exp_idx.mat"
    scipy.io.savemat(trim, {"trimIndex": (keep + 1)[:, None].astype(float)})
    k = 4
    n3c = 3 * keep.size
    e_mean = np.zeros(n3c, np.float32)
    e_basis = (basis(n3c, k, 5) * 900).astype(np.float32)
    binp = tmp_path / "Exp_Pca.bin"
    binp.write_bytes(np.int32(k).tobytes() + e_mean.tobytes() + np.ascontiguousarray(e_basis.T).tobytes())
    (tmp_path / "std_exp.txt").write_text(" ".join(["2.0", "1.0", "0.5", "0.25"]))
    remap = np.full(n, -1)
    remap[keep] = np.arange(keep.size)
    lm_c = remap[raw["lm"]]
    assert (lm_c >= 0).all()
    lmf = tmp_path / "lm_crop.npy"
    np.save(lmf, lm_c)
    # the uncropped shape does not match the cropped expression basis: the error says what is needed
    with pytest.raises(ModelError, match="vertex_subset"):
        load_bfm2009(files["shape"], binp, lmf)
    m = load_bfm2009(files["shape"], binp, lmf, vertex_subset_path=trim)
    assert (m.n_vertices, m.k_exp) == (keep.size, k)
    rows = (keep[:, None] * 3 + np.arange(3)).ravel()
    shape_mu = scipy.io.loadmat(files["shape"])["shapeMU"].ravel()
    np.testing.assert_allclose(m.mean, shape_mu[rows] / 1000, atol=1e-3)
    # triangles were re-indexed into the crop and only those fully inside survive
    assert m.triangles.max() < keep.size
    assert len(m.triangles) == ((raw["v"][raw["tri"], 0] > -70).all(axis=1)).sum()
    np.testing.assert_allclose(m.exp_std, np.array([2.0, 1.0, 0.5, 0.25]) * 900 / 1000, rtol=1e-4)


def test_bfm2017_h5_in_millimetres_with_inward_cells_is_wound_outward(tmp_path):
    v, tri, lm = grid_face()
    n3 = v.size
    path = tmp_path / "model2017-1_face12_nomouth.h5"
    with h5py.File(path, "w") as f:
        f["shape/model/mean"] = v.reshape(-1).astype(np.float32)
        f["shape/model/pcaBasis"] = basis(n3, 6, 7).astype(np.float32)
        f["shape/model/pcaVariance"] = np.array([400, 200, 100, 50, 20, 10], np.float32)
        f["shape/representer/cells"] = tri[:, [0, 2, 1]].T.astype(np.uint32)  # stored (3, t), wound inward
        f["expression/model/mean"] = np.zeros(n3, np.float32)
        f["expression/model/pcaBasis"] = basis(n3, 2, 8).astype(np.float32)
        f["expression/model/pcaVariance"] = np.array([9.0, 4.0], np.float32)
    lmf = tmp_path / "lm.txt"
    lmf.write_text(",".join(map(str, lm)))
    m = load_bfm2017(path, lmf)
    np.testing.assert_allclose(m.shape(), v, atol=1e-3)  # already millimetres: not rescaled
    np.testing.assert_allclose(m.id_std, np.sqrt([400, 200, 100, 50, 20, 10]), rtol=1e-4)
    np.testing.assert_allclose(m.exp_std, [3.0, 2.0], rtol=1e-4)
    n = face_normals(m.shape(), m.triangles)
    assert (n[:, 2] > 0).mean() > 0.95
    assert m.source_sha256 != sha256_file(path)  # provenance covers the landmark file too


def test_landmark_file_formats(tmp_path):
    lm = np.arange(68) * 2
    flat = tmp_path / "keypoints.mat"
    kp = (lm[:, None] * 3 + np.arange(3)).ravel() + 1  # 3DDFA keypoints: flattened, 1-based
    scipy.io.savemat(flat, {"keypoints": kp[None, :].astype(float)})
    np.testing.assert_array_equal(load_landmark_indices(flat), lm)
    one = tmp_path / "lm.mat"
    scipy.io.savemat(one, {"landmarks": (lm + 1).astype(float)})
    np.testing.assert_array_equal(load_landmark_indices(one), lm)
    short = tmp_path / "short.txt"
    short.write_text(" ".join(map(str, lm[:60])))
    with pytest.raises(ModelError, match=r"short\.txt: expected 68 landmark vertex indices, got 60"):
        load_landmark_indices(short)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 x")
    with pytest.raises(ModelError, match="bad.txt: expected whitespace/comma-separated integers"):
        load_landmark_indices(bad)
    with pytest.raises(ModelError, match="missing.txt: landmark indices file not found"):
        load_landmark_indices(tmp_path / "missing.txt")


def test_wrong_landmarks_are_refused_not_silently_used(bfm2009, tmp_path):
    files, raw = bfm2009
    swapped = raw["lm"].copy()
    swapped[[36, 45]] = swapped[[45, 36]]
    p = tmp_path / "swapped.txt"
    p.write_text(" ".join(map(str, swapped)))
    with pytest.raises(ModelError, match="swapped.txt: landmarks 36/45"):
        load_bfm2009(files["shape"], files["exp"], p)
    out = tmp_path / "range.txt"
    out.write_text(" ".join(map(str, np.r_[raw["lm"][:67], 10_000])))
    with pytest.raises(ModelError, match="range.txt: landmark vertex index 10000 out of range"):
        load_bfm2009(files["shape"], files["exp"], out)


def test_bad_model_files_name_the_file_and_problem(bfm2009, tmp_path):
    files, raw = bfm2009
    with pytest.raises(ModelError, match="nowhere.mat: file not found"):
        load_bfm2009(tmp_path / "nowhere.mat", files["exp"], files["lm"])
    corrupt = tmp_path / "corrupt.mat"
    corrupt.write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 20)
    with pytest.raises(ModelError, match="corrupt.mat: not a readable MATLAB"):
        read_mat(corrupt)
    m = scipy.io.loadmat(files["shape"])
    wrong = tmp_path / "wrong.mat"
    scipy.io.savemat(
        wrong,
        {"shapeMU": m["shapeMU"], "shapePC": m["shapePC"][:, :3], "shapeEV": m["shapeEV"], "tl": m["tl"]},
    )
    with pytest.raises(ModelError, match=r"wrong.mat: shapePC must be \(588, 5\)"):
        load_bfm2009(wrong, files["exp"], files["lm"])
    nomu = tmp_path / "nomu.mat"
    scipy.io.savemat(nomu, {"shapePC": m["shapePC"]})
    with pytest.raises(ModelError, match="nomu.mat: missing variable shapeMU"):
        load_bfm2009(nomu, files["exp"], files["lm"])
    binp = tmp_path / "Exp_Pca.bin"
    binp.write_bytes(np.int32(3).tobytes() + np.zeros(10, np.float32).tobytes())
    with pytest.raises(ModelError, match="Exp_Pca.bin: size 44 bytes does not fit"):
        load_bfm2009(files["shape"], binp, files["lm"])
    binp.write_bytes(np.int32(1).tobytes() + np.zeros(2 * 588, np.float32).tobytes())
    with pytest.raises(ModelError, match="std_exp.txt: not found"):
        load_bfm2009(files["shape"], binp, files["lm"])


def test_matlab_v73_files_are_read_as_hdf5(tmp_path):
    p = tmp_path / "v73.mat"
    a = np.arange(12.0).reshape(3, 4)
    with h5py.File(p, "w") as f:
        f["trimIndex"] = a.T  # MATLAB writes column-major: the HDF5 dataset is the transpose
    np.testing.assert_array_equal(read_mat(p)["trimIndex"], a)


def test_manifest_entry_converts_once_into_the_cache_and_checks_sha(bfm2009, tmp_path, caplog):
    files, raw = bfm2009
    cache = tmp_path / "cache"
    entry = {
        "name": "bfm2009-test",
        "source": str(files["shape"]),
        "expression": str(files["exp"]),
        "landmarks": str(files["lm"]),
    }
    # the manifest accepts the entry (schema keys expression/landmarks/vertex_subset)
    man = load_manifest(
        overrides={f"models.morphable_model.{k}": v for k, v in entry.items()} | {"cache_dir": str(cache)}
    )
    entry = man.model("morphable_model")
    entry.pop("members", None)
    entry["sha256"] = None
    import logging

    with caplog.at_level(logging.WARNING, logger="pipeline.models.sources"):
        m1 = load_model_entry(entry, cache)
    assert "sha256 is not set: used unchecked" in caplog.text  # allowed, never without a word
    cached = cache / "bfm2009-test.npz"
    assert cached.is_file()
    assert load_npz(cached).source_sha256 == m1.source_sha256
    stamp = cached.stat().st_mtime_ns
    m2 = load_model_entry(entry, cache)
    assert cached.stat().st_mtime_ns == stamp and m2.sha256 == m1.sha256  # reused, not rebuilt
    # a different landmark file is a different model: the cache is rebuilt
    lm2 = raw["lm"].copy()
    lm2[0] = (lm2[0] + 1) % (N_SIDE**2)
    files["lm"].write_text(" ".join(map(str, lm2)))
    m3 = load_model_entry(entry, cache)
    assert m3.landmarks_of(IBUG68).nearest[0] == lm2[0] and m3.source_sha256 != m1.source_sha256
    with pytest.raises(ModelError, match="01_MorphableModel.mat: sha256 .* does not match"):
        load_user_model({**entry, "sha256": "0" * 64})
    with pytest.raises(ModelError, match="models.morphable_model.expression: required for BFM 2009"):
        load_user_model({**entry, "expression": None})
    with pytest.raises(ModelError, match="models.morphable_model.landmarks: required"):
        load_user_model({**entry, "landmarks": None})


def test_eos_style_mapping_files(tmp_path):
    lm = np.arange(68) * 5 + 7
    p = tmp_path / "ibug_to_bfm2017.txt"
    lines = ["# iBUG -> vertex", "[landmark_mappings]"] + [
        f"{i + 1} = {v}  # point {i + 1}" for i, v in enumerate(lm)
    ]
    p.write_text("\n".join(lines[::-1]))  # order of lines does not matter
    np.testing.assert_array_equal(load_landmark_indices(p), lm)
    p.write_text("\n".join(f"{i + 1} = {v}" for i, v in enumerate(lm) if i >= 17))
    # the jaw but the chin may be left out (eos leaves it to its contour files); the chin may not
    with pytest.raises(ModelError, match=r"lacks points \[9\] \(1-based\) of scheme 'ibug68'"):
        load_landmark_indices(p)


def test_an_eos_mapping_file_without_contour_points_is_read_and_the_jaw_placed_on_the_outline(bfm2009):
    files, truth = bfm2009
    lm = truth["lm"]
    contour = {0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16}  # eos maps the chin (9) only
    lines = ["[landmark_mappings] # ibug (lhs) to model vertex (rhs), as eos's share/ibug_to_bfm2009.txt"]
    lines += ["# 1 to 8 are the right contour landmarks", "#1 = "]
    lines += [f"{i + 1} = {lm[i]}  # point {i + 1}" for i in range(68) if i not in contour]
    files["lm"].write_text("\n".join(lines) + "\n")
    m = load_bfm2009(files["shape"], files["exp"], files["lm"])
    keep = [i for i in range(68) if i not in contour]
    np.testing.assert_array_equal(
        m.landmarks_of(IBUG68).nearest[keep], lm[keep]
    )  # the mapped points as given
    v = m.shape().reshape(-1, 3)
    placed = v[m.landmarks_of(IBUG68).nearest]
    right, left = placed[:8], placed[9:17][::-1]  # each from the top of the jaw towards the chin
    # on the outline: the outermost vertex in front of the ears at its height, mirrored on the two sides
    assert np.all(right[:, 0] < -60) and np.all(left[:, 0] > 60)
    np.testing.assert_allclose(right[:, 0], -left[:, 0])
    eye_z = v[m.landmarks_of(IBUG68).nearest[[36, 45]], 2].mean()
    for p in right:
        level = (np.abs(v[:, 1] - p[1]) < 1e-6) & (v[:, 2] > eye_z - 35.0)
        assert p[0] == v[level, 0].min()
    # descending towards the chin (the 14-row test grid repeats heights at its bottom)
    assert np.all(np.diff(right[:, 1]) <= 0) and right[0, 1] - right[-1, 1] > 80
    assert (
        right[0, 1] < v[m.landmarks_of(IBUG68).nearest[36], 1]
        and right[-1, 1] > v[m.landmarks_of(IBUG68).nearest[8], 1]
    )


def test_an_eos_mapping_missing_a_non_contour_point_names_it(bfm2009):
    files, truth = bfm2009
    lm = truth["lm"]
    files["lm"].write_text("\n".join(f"{i + 1} = {lm[i]}" for i in range(68) if i not in (0, 30)) + "\n")
    with pytest.raises(ModelError, match=r"landmarks\.txt: the mapping lacks points \[31\] \(1-based\)"):
        load_bfm2009(files["shape"], files["exp"], files["lm"])
