"""Landmark schemes as data (pipeline/landmarks/scheme.py): the packaged iBUG-68 file and its checks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config.manifest import load_manifest
from pipeline.landmarks.scheme import IBUG68, SchemeError, load_scheme

FIVE = """
name: five
points: 5
groups: {eyes: [0, 1], nose: [2, 2], mouth: [3, 4]}
parts: {right_eye: [0, 0], left_eye: [1, 1]}
named: {right_eye_outer: 0, left_eye_outer: 1, nose_tip: 2}
mirror: [1, 0, 2, 4, 3]
"""


def test_the_packaged_ibug68_scheme_is_what_the_detectors_mark():
    assert IBUG68.points == 68 and list(IBUG68.groups) == ["jaw", "brows", "nose", "eyes", "mouth"]
    assert IBUG68.outer_eye_corners == (36, 45) and IBUG68.named["nose_tip"] == 30
    assert IBUG68.group("left_eye") == [42, 43, 44, 45, 46, 47] and len(IBUG68.inner) == 51
    assert np.array_equal(IBUG68.mirror[IBUG68.mirror], np.arange(68))
    assert IBUG68.mirror[36] == 45 and IBUG68.mirror[30] == 30  # eye corners swap, the nose tip stays
    assert 7 not in IBUG68.contour and 8 not in IBUG68.contour and len(IBUG68.contour) == 14
    with pytest.raises(KeyError, match="has no group or part 'ears'"):
        IBUG68.group("ears")


def test_a_scheme_of_another_size_loads_from_a_file(tmp_path):
    path = tmp_path / "five.yaml"
    path.write_text(FIVE)
    five = load_scheme(path)
    assert five.points == 5 and five.outer_eye_corners == (0, 1) and five.inner == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("mirror: [1, 0, 2, 4, 3]", "mirror: [1, 1, 2, 4, 3]"),
            "mirror: expected 5 point numbers that map back",
        ),
        (("nose: [2, 2]", "nose: [2, 3]"), "groups must hold every point 0..4 exactly once"),
        (("nose_tip: 2", "nose_tip: 7"), r"named.nose_tip: point numbers \[7\] are outside 0..4"),
        (("mouth: [3, 4]", "mouth: [4, 3]"), r"groups.mouth: expected an inclusive range \[first, last\]"),
        (("points: 5", "points: -1"), "points: expected a positive integer"),
    ],
)
def test_a_malformed_scheme_is_refused_with_its_file_and_key(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(FIVE.replace(*change))
    with pytest.raises(SchemeError, match=f"bad.yaml: {message}"):
        load_scheme(path)


def test_an_unknown_scheme_name_lists_the_packaged_ones():
    with pytest.raises(
        SchemeError, match=r"wflw98: no such landmark scheme file \(packaged schemes: \['ibug68'\]\)"
    ):
        load_scheme("wflw98")


def five_point_map(tmp_path, model):
    """An eos-format mapping of FIVE onto ``model``: the eye centres halfway between iBUG's eye
    corners (barycentric points, between vertices), the nose tip and mouth corners on vertices."""
    ibug = model.landmarks_of(IBUG68).nearest
    lines = ["[landmark_mappings]  # five points, 1-based, as eos writes them"]
    for k, (a, b) in enumerate(((36, 39), (42, 45)), 1):
        lines.append(f"{k} = {ibug[a]}:0.5 {ibug[b]}:0.5 {ibug[b]}:0.0  # an eye centre")
    lines += [f"3 = {ibug[30]}", f"4 = {ibug[48]}", f"5 = {ibug[54]}  # a mouth corner"]
    path = tmp_path / "five_to_model.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_five_point_scheme_from_a_file_fits_renders_end_to_end(tmp_path):
    """A scheme the project does not ship (5 points: eye centres, nose tip, mouth corners) and its
    map onto the default model (two points between vertices) from data files, added through the
    manifest, fitted by the same solver to renders' true 5 points: the pose comes back."""
    import array_api_compat.numpy as anp
    import pyarrow.parquet as pq
    import yaml

    from pipeline.fit.loop import FitOptions, fit_subjects, prepare_model
    from pipeline.fit.noise import prepare_noise, uniform
    from pipeline.models.assets import resolve_morphable_model
    from pipeline.models.morphable_model import ModelError
    from pipeline.synthetic.synth import synthesize

    path = tmp_path / "five.yaml"
    path.write_text(FIVE)
    five = load_scheme(path)
    out = tmp_path / "renders"
    manifest = load_manifest()
    synthesize(
        manifest,
        out,
        subjects=1,
        images_per_subject=4,
        seed=3,
        workers=1,
        textures="painted",
        yaw_range=[-30, 30],
    )
    rows = pq.read_table(out / "ground_truth.parquet").to_pylist()
    plain = resolve_morphable_model(manifest)
    with pytest.raises(ModelError, match=r"has no landmark map of scheme 'five' \(it has \['ibug68'\]\)"):
        prepare_model(plain, anp, scheme=five)
    user = tmp_path / "manifest.yaml"
    entry = {"scheme": str(path), "file": str(five_point_map(tmp_path, plain))}
    user.write_text(yaml.safe_dump({"models": {"morphable_model": {"landmark_maps": {"five": entry}}}}))
    model = resolve_morphable_model(load_manifest(user))
    assert sorted(model.landmark_maps) == ["five", "ibug68"] and model.sha256 != plain.sha256
    lm = prepare_model(model, anp, scheme=five)
    ibug = [[36, 39], [42, 45], [30], [48], [54]]  # the iBUG points each of the five stands for
    pts = np.array(
        [[np.reshape(r["landmarks_2d"], (68, 2))[i].mean(0) for i in ibug] for r in rows]
    )  # (M, 5, 2) px
    v = np.swapaxes(pts, -1, -2)[None].copy()  # (1, M, 2, 5)
    v[..., 1, :] *= -1.0  # y up
    w = np.ones((1, len(rows), 5))
    noise = prepare_noise(uniform(2.0, points=five.points), lm.order, anp, np.float64)
    fits = fit_subjects(lm, v, w, np.ones((1, len(rows)), bool), FitOptions(), noise)
    from pipeline.fit.camera import euler_deg

    yaw = np.asarray(euler_deg(fits.result.rotation[0])[0])
    true_yaw = np.array([r["yaw"] for r in rows])
    assert np.all(np.abs(yaw - true_yaw) < 8.0), (yaw, true_yaw)
    # the renders' pinhole magnifies the face (in front of the model origin) by D / (D - z); five
    # points tell a larger face from a nearer one only through the identity prior: within 12 %
    depth = [
        np.mean(
            (
                np.reshape(r["landmarks_3d"], (68, 3))[[36, 39, 42, 45, 30, 48, 54]]
                @ np.reshape(r["rotation"], (3, 3)).T
            )[:, 2]
        )
        for r in rows
    ]
    true_scale = np.array(
        [
            r["scale"] * r["camera_distance_mm"] / (r["camera_distance_mm"] - z)
            for r, z in zip(rows, depth, strict=True)
        ]
    )
    assert np.all(np.abs(fits.result.scale[0] / true_scale - 1) < 0.12), (fits.result.scale[0], true_scale)
    assert np.all(fits.nme[0] < 0.05)  # the five points reprojected within 5 % of the eye distance
    with pytest.raises(ValueError, match="contour marching is defined for iBUG-68 only"):
        prepare_model(model, anp, contour=True, scheme=five)


def test_a_barycentric_map_interpolates_the_model_linearly(tmp_path):
    """A point between vertices is the weighted mean of its corners on every shape, so the model
    restricted to it (mean and bases) is the same weighted mean: the linear solver stays exact."""
    from pipeline.models.correspondence import read_mapping
    from pipeline.synthetic.toy import toy_model

    path = tmp_path / "five.yaml"
    path.write_text(FIVE)
    five = load_scheme(path)
    model = toy_model(k_id=6, k_exp=3)
    model = model.with_landmarks(read_mapping(five_point_map(tmp_path, model), five))
    c = model.landmarks_of(five)
    assert not c.on_vertices and c.points == 5
    a_id, a_exp = np.linspace(-1, 1, model.k_id), np.linspace(1, -1, model.k_exp)
    mean, idb, expb = model.landmark_model(five)
    direct = mean + idb @ a_id + expb @ a_exp
    np.testing.assert_allclose(direct, c.locate(model.shape(a_id, a_exp)), atol=1e-4)
    ibug = model.landmarks_of(IBUG68).locate(model.shape(a_id, a_exp))
    np.testing.assert_allclose(direct[0], ibug[[36, 39]].mean(0), atol=1e-4)
