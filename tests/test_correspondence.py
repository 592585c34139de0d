"""Landmark maps as data (pipeline/models/correspondence.py): eos's mapping format, barycentric
points, models carrying the maps of several schemes, and the model files that store them."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.landmarks.scheme import IBUG68, load_scheme
from pipeline.models.correspondence import Correspondence, CorrespondenceError, read_mapping
from pipeline.models.morphable_model import ModelError, load_npz
from pipeline.synthetic.toy import toy_model

FIVE = """
name: five
points: 5
groups: {eyes: [0, 1], nose: [2, 2], mouth: [3, 4]}
named: {right_eye_outer: 0, left_eye_outer: 1, nose_tip: 2}
mirror: [1, 0, 2, 4, 3]
unmapped_ok: [3, 4]
"""


@pytest.fixture
def five(tmp_path):
    path = tmp_path / "five.yaml"
    path.write_text(FIVE)
    return load_scheme(path)


def write(tmp_path, text: str):
    path = tmp_path / "five_to_model.txt"
    path.write_text(text)
    return path


def test_eos_format_with_points_between_vertices(tmp_path, five):
    path = write(
        tmp_path,
        "[landmark_mappings] # five -> vertex\n"
        "1 = 10  # right eye\n"
        '"2" = 20\n'
        "3 = 30:0.25 31:0.25 32:0.5  # between three vertices\n"
        "4 = 40\n5 = 50\n",
    )
    c = read_mapping(path, five)
    assert c.scheme == "five" and c.points == 5 and not c.on_vertices
    np.testing.assert_array_equal(c.nearest, [10, 20, 32, 40, 50])
    shape = np.arange(60 * 3, dtype=np.float64).reshape(60, 3)
    np.testing.assert_allclose(c.locate(shape)[2], 0.25 * shape[30] + 0.25 * shape[31] + 0.5 * shape[32])
    np.testing.assert_array_equal(c.locate(shape)[[0, 1, 3, 4]], shape[[10, 20, 40, 50]])


def test_points_a_scheme_lets_a_mapping_leave_out_come_back_unplaced(tmp_path, five):
    c = read_mapping(write(tmp_path, "1 = 10\n2 = 20\n3 = 30\n"), five)
    np.testing.assert_array_equal(c.vertices[:, 0], [10, 20, 30, -1, -1])


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "1 = 10\n2 = 20\n",
            r": the mapping lacks points \[3\] \(1-based\) of scheme 'five'; only \[4, 5\] may be left out",
        ),
        ("1 = 10\n2 = 20\n3 = 30\n6 = 60\n", r":4: point 6 is outside scheme 'five' \(1..5, 1-based\)"),
        ("1 = 10\n1 = 11\n2 = 20\n3 = 30\n", r":2: point 1 is mapped twice"),
        ("1 = 10\n2 = 20\n3 = -4\n", r":3: negative vertex index for point 3"),
        ("1 = 10\n2 = 20\n3 = 30:0.5 31:0.6 32:0\n", r":3: the weights of point 3 must be >= 0 and sum to 1"),
        ("1 = 10\n2 = 20\n3 = 30 31\n", r":3: expected a vertex index or three vertex:weight pairs"),
        ("1 = ten\n", r":1: cannot read '1 = ten'"),
        ("1 10\n", r":1: expected 'N = vertex' \(eos's mapping format\)"),
    ],
)
def test_a_bad_mapping_is_refused_with_its_file_and_line(tmp_path, five, text, message):
    with pytest.raises(CorrespondenceError, match=f"five_to_model.txt{message}"):
        read_mapping(write(tmp_path, text), five)


def test_a_model_carries_maps_of_several_schemes_and_its_file_keeps_them(tmp_path, five):
    model = toy_model(k_id=4, k_exp=2)
    plain_sha = model.sha256
    ids = model.landmarks_of(IBUG68).nearest
    text = f"1 = {ids[36]}\n2 = {ids[45]}\n3 = {ids[30]}:0.5 {ids[33]}:0.5 {ids[33]}:0\n4 = {ids[48]}\n5 = {ids[54]}\n"
    both = model.with_landmarks(read_mapping(write(tmp_path, text), five))
    assert sorted(both.landmark_maps) == ["five", "ibug68"] and both.sha256 != plain_sha
    path = tmp_path / "both.npz"
    both.save_npz(path)
    again = load_npz(path)
    assert again.sha256 == both.sha256
    np.testing.assert_array_equal(again.landmarks_of(five).weights, both.landmarks_of(five).weights)
    with pytest.raises(ModelError, match=r"has no landmark map of scheme 'wflw98' \(it has \['ibug68'\]\)"):
        model.landmarks_of("wflw98")
    with pytest.raises(ModelError, match="its map of 'ibug68' has 68 points, the scheme 5"):
        model.landmarks_of(IBUG68.__class__(**{**IBUG68.__dict__, "points": 5}))


def test_model_files_of_format_2_are_read_with_their_ibug_vertices_and_hash(tmp_path):
    """Files written before maps were data held one (68,) ``landmarks`` array: read as the iBUG
    map, with the content hash they had (the manifest's content_sha256 still holds)."""
    model = toy_model(k_id=4, k_exp=2)
    with np.load(io.BytesIO(model.to_npz_bytes()), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("landmarks__")}
    arrays["format_version"] = np.int64(2)
    arrays["landmarks"] = model.landmarks_of(IBUG68).nearest
    path = tmp_path / "old.npz"
    np.savez(path, **arrays)
    old = load_npz(path)
    assert old.sha256 == model.sha256 and list(old.landmark_maps) == ["ibug68"]
    del arrays["landmarks"]
    np.savez(path, **arrays)
    with pytest.raises(
        ModelError, match=r"old.npz: not a morphset model .npz, missing arrays \['landmarks'\]"
    ):
        load_npz(path)


def test_the_packaged_ibug_map_is_the_default_models(tmp_path):
    """The default model's iBUG-68 map is the packaged data file (its conversion checks the wheel
    agrees), and models.morphable_model.landmark_maps refuses what it cannot use, naming the key."""
    import yaml

    from pipeline.config.manifest import load_manifest
    from pipeline.models.assets import IBUG68_MAP, resolve_morphable_model

    model = resolve_morphable_model(load_manifest())
    packaged = read_mapping(IBUG68_MAP, IBUG68)
    assert packaged.on_vertices
    np.testing.assert_array_equal(model.landmarks_of(IBUG68).vertices, packaged.vertices)
    user = tmp_path / "manifest.yaml"
    user.write_text(yaml.safe_dump({"models": {"morphable_model": {"landmark_maps": {"wflw98": "x.txt"}}}}))
    with pytest.raises(ModelError, match=r"landmark_maps.wflw98: wflw98: no such landmark scheme file"):
        resolve_morphable_model(load_manifest(user))
    assert Correspondence.at_vertices("x", np.array([3, 4])).on_vertices
