"""Pairs-file parsing: LFW pairs.txt, YouTube Faces splits.txt, CSV, generated pairs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.pairs import (
    PairsError,
    generate_pairs,
    parse_csv_pairs,
    parse_lfw_pairs,
    parse_ytf_splits,
    read_pairs,
    write_csv_pairs,
)

LFW = """2\t2
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Abdel_Madi_Shabneh\t1\tDean_Barker\t1
Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1
Alan_Ball\t1\t2
Alan_Ball\t2\t3
Ana_Palacio\t1\tAndy_Roddick\t14
Ana_Palacio\t2\tJorge_Moreno\t1
"""


def test_lfw_both_line_types_and_folds():
    p = parse_lfw_pairs(LFW)
    assert len(p) == 8 and p.n_folds == 2
    assert p.a[0] == "Abel_Pacheco/Abel_Pacheco_0001.jpg"
    assert p.b[0] == "Abel_Pacheco/Abel_Pacheco_0004.jpg"
    assert p.a[2] == "Abdel_Madi_Shabneh/Abdel_Madi_Shabneh_0001.jpg"
    assert p.b[2] == "Dean_Barker/Dean_Barker_0001.jpg"
    assert p.b[6] == "Andy_Roddick/Andy_Roddick_0014.jpg"
    assert p.same.tolist() == [True, True, False, False] * 2
    assert p.fold.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_lfw_malformed_line_names_line_number():
    bad = LFW.replace("Akhmed_Zakayev\t1\t3", "Akhmed_Zakayev\t1\tthree")
    with pytest.raises(PairsError, match=r"pairs.txt:3: j must be an integer"):
        parse_lfw_pairs(bad)
    # a mismatched line where a matched one is expected
    bad2 = LFW.replace("Alan_Ball\t1\t2", "Alan_Ball\t1\tBob\t2")
    with pytest.raises(PairsError, match=r":6: set 2 expects a matched pair"):
        parse_lfw_pairs(bad2)
    with pytest.raises(PairsError, match="header announces"):
        parse_lfw_pairs(LFW + "Extra\t1\t2\n")
    with pytest.raises(PairsError, match=r":1: first line"):
        parse_lfw_pairs("10 300 7\n")


def test_ytf_splits():
    text = (
        "split number, pair number, first name, second name, is same person (1-yes), is same person (1-yes)\n"
        "1, 1, Aaron_Eckhart/0, Aaron_Eckhart/1, 1, 1\n"
        "1, 2, Aaron_Eckhart/0, Bob/3, 0, 0\n"
        "2, 1, Carl/2, Carl/4, 1, 1\n"
    )
    p = parse_ytf_splits(text)
    assert p.a == ["Aaron_Eckhart/0", "Aaron_Eckhart/0", "Carl/2"]
    assert p.same.tolist() == [True, False, True]
    assert p.fold.tolist() == [0, 0, 1]
    with pytest.raises(PairsError, match=r"splits.txt:3: is same person must be an integer"):
        parse_ytf_splits(text.replace("Bob/3, 0", "Bob/3, x"))


def test_csv_pairs_labels_and_default_folds(tmp_path):
    text = "a,b,same\nx/1.jpg,x/2.jpg,same\nx/1.jpg,y/1.jpg,different\nx/1.jpg,y/2.jpg,0\n"
    p = parse_csv_pairs(text, n_folds=2)
    assert p.same.tolist() == [True, False, False]
    assert p.fold.tolist() == [0, 1, 0]
    with pytest.raises(PairsError, match=r"pairs.csv:3: column 'same'"):
        parse_csv_pairs(text.replace("different", "maybe"))
    with pytest.raises(PairsError, match="missing"):
        parse_csv_pairs("left,right\n1,2\n")
    f = tmp_path / "p.csv"
    write_csv_pairs(p, f)
    q = read_pairs(f)
    assert q.a == p.a and q.same.tolist() == p.same.tolist() and q.fold.tolist() == p.fold.tolist()


def test_read_pairs_detects_lfw(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text(LFW)
    assert len(read_pairs(f)) == 8
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "none.txt")


def test_generated_pairs_balanced_deterministic_and_subject_disjoint():
    items = {f"s{i:02d}": [f"s{i:02d}/{j}.png" for j in range(4)] for i in range(25)}
    p = generate_pairs(items, n_folds=10, pairs_per_fold=6, seed=3)
    q = generate_pairs(items, n_folds=10, pairs_per_fold=6, seed=3)
    assert p.a == q.a and p.b == q.b
    assert len(p) == 120 and p.same.sum() == 60
    subj = lambda x: x.split("/")[0]  # noqa: E731
    for a, b, s in zip(p.a, p.b, p.same, strict=True):
        assert a != b
        assert (subj(a) == subj(b)) == bool(s)
    folds_of = {}
    for a, b, k in zip(p.a, p.b, p.fold, strict=True):
        for x in (a, b):
            folds_of.setdefault(subj(x), set()).add(int(k))
    assert all(len(v) == 1 for v in folds_of.values())
    assert np.bincount(p.fold).tolist() == [12] * 10
