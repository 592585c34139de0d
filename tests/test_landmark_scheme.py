"""Landmark schemes as data (pipeline/landmarks/scheme.py): the packaged iBUG-68 file and its checks."""

from __future__ import annotations

import numpy as np
import pytest

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
