"""Identity screening, the per-image fit and the overlap of two runs on real photographs.

The tree is ../shared/fixtures/faces (8 people x 5) and three people of ../shared/fixtures/people,
with 2 images in each of 3 subjects replaced by photos of other people (the planted images).
Built once with the offline chain (MTCNN, dlib landmarks, dlib embeddings); skipped without the
fixtures.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline import api
from pipeline.cli import main

pytestmark = pytest.mark.slow
PLANTED_SUBJECTS = ("amy", "howard", "penny")
TRAIN_PEOPLE = ("obama", "biden", "kit_harington")
SYNC = ["--scheduler", "sync", "--no-progress"]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def trees(faces_dir, people_dir, tmp_path_factory):
    pytest.importorskip("dlib")
    base = tmp_path_factory.mktemp("identity")
    train, ev = base / "train", base / "eval"
    for person in sorted(p for p in faces_dir.iterdir() if p.is_dir()):
        for img in sorted(person.iterdir()):
            _copy(img, train / person.name / img.name)
    for name in TRAIN_PEOPLE:
        for img in sorted((people_dir / name).iterdir()):
            _copy(img, train / name / img.name)
    # 2 images of each planted subject replaced by two different other people
    others = [
        (people_dir / "obama" / "obama.jpg", people_dir / "biden" / "biden.jpg"),
        (people_dir / "rose_leslie" / "img1.jpg", people_dir / "kit_harington" / "john1.jpeg"),
        (sorted((faces_dir / "raj").iterdir())[0], sorted((faces_dir / "sheldon").iterdir())[0]),
    ]
    planted = []
    for subject, photos in zip(PLANTED_SUBJECTS, others, strict=True):
        for old in sorted((train / subject).iterdir())[:2]:
            old.unlink()
        for k, photo in enumerate(photos):
            target = train / subject / f"planted{k}{photo.suffix}"
            _copy(photo, target)
            planted.append(f"{subject}/{target.name}")
    # the evaluation set: two people of the training set (other names, other photos where there
    # are any) and two who are not in it
    for img in sorted((people_dir / "obama").iterdir()):
        _copy(img, ev / "e_first" / img.name)
    for img in sorted((faces_dir / "stuart").iterdir())[3:]:
        _copy(img, ev / "e_second" / img.name)
    for name, new in (("rose_leslie", "e_third"), ("alex_lacamoire", "e_fourth")):
        for img in sorted((people_dir / name).iterdir()):
            _copy(img, ev / new / img.name)
    return train, ev, planted


@pytest.fixture(scope="module")
def train_run(trees, tmp_path_factory):
    train, _, planted = trees
    run = tmp_path_factory.mktemp("runs") / "train"
    assert main(["build", str(run), "--root", str(train), "--landmarks", "dlib", *SYNC]) == 0
    return run, planted


def _fits(run: Path) -> list[dict]:
    return pads.dataset(str(run / "fit"), format="parquet").to_table().to_pylist()


def test_planted_photos_are_identity_outliers(train_run, capsys):
    run, planted = train_run
    fits = _fits(run)
    reasons = {r["image_id"]: r["failure_reason"] for r in fits}
    hit = [i for i in planted if reasons[i] == "identity_outlier"]
    genuine = [
        i for i in reasons if i not in planted and reasons[i] in ("identity_outlier", "identity_ambiguous")
    ]
    embedded = [i for i in reasons if reasons[i] is None or reasons[i].startswith("identity_")]
    print(
        json.dumps(
            {
                "planted": len(planted),
                "marked": len(hit),
                "genuine": len(embedded) - len(planted),
                "genuine_marked": len(genuine),
            }
        )
    )
    assert len(hit) >= 0.9 * len(planted)
    assert len(genuine) <= 0.02 * (len(embedded) - len(planted))
    # kept out of the identity and out of the training set
    assert all(not r["used"] for r in fits if r["image_id"] in hit)
    export = pads.dataset(str(run / "export" / "data"), format="parquet").to_table(columns=["image_id"])
    assert not set(hit) & set(export.column("image_id").to_pylist())
    # counted where a user looks
    st = api.status(run)
    assert st["fit"]["failures"]["identity_outlier"] == len(hit)
    assert st["embed"]["done"] == st["embed"]["shards"]
    report = json.loads((run / "report.json").read_text())
    assert report["status"]["fit"]["failures"]["identity_outlier"] == len(hit)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fit_quality"]["rejected_by_reason"]["identity_outlier"] == len(hit)
    assert "identity screening: outliers / ambiguous images" in (run / "eval" / "report.html").read_text()


def test_overlap_lists_exactly_the_shared_people_and_export_leaves_them_out(
    train_run, trees, tmp_path, capsys
):
    run, _ = train_run
    _, ev, _ = trees
    eval_run = tmp_path / "eval"
    assert (
        main(["build", str(eval_run), "--root", str(ev), "--landmarks", "dlib", "--until", "embed", *SYNC])
        == 0
    )
    out = tmp_path / "shared.csv"
    capsys.readouterr()
    assert main(["overlap", str(run), str(eval_run), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shared"] == ["obama", "stuart"]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["train_subject"], r["eval_subject"]) for r in rows} == {
        ("obama", "e_first"),
        ("stuart", "e_second"),
    }

    assert main(["export", str(run), "--exclude-subjects", str(out), *SYNC]) == 0
    subjects = set(
        pads.dataset(str(run / "export" / "data"), format="parquet")
        .to_table(columns=["subject"])
        .column("subject")
        .to_pylist()
    )
    assert not subjects & {"obama", "stuart"} and {"amy", "leonard"} <= subjects
    st = api.status(run)
    assert st["export"]["failures"]["excluded_subject"] == 5 + 3  # stuart's 5 photos, obama's 3


def test_image_mode_fits_every_image_alone_and_verifies_on_them(train_run, tmp_path, capsys):
    src, _ = train_run
    run = tmp_path / "per-image"
    shutil.copytree(src, run)
    assert main(["build", str(run), "--until", "fit", "--set", "stages.fit.identity=image", *SYNC]) == 0
    fits = [r for r in _fits(run) if r["failure_reason"] is None]
    by_subject: dict[str, list] = {}
    for r in fits:
        by_subject.setdefault(r["subject"], []).append(tuple(np.round(r["alpha_id"], 5)))
    assert all(len(set(v)) == len(v) for v in by_subject.values())  # one α_id per image
    assert all(r["subject_images_used"] == 1 for r in fits)
    # a pairs file over the face crops: same = two photos of one person
    people = sorted(s for s in by_subject if len(by_subject[s]) >= 3)
    ids = {s: sorted(r["image_id"] for r in fits if r["subject"] == s) for s in people}
    lines = ["a,b,same,fold"]
    for k, s in enumerate(people):
        other = people[(k + 1) % len(people)]
        lines += [f"{ids[s][0]},{ids[s][1]},1,{k % 2}", f"{ids[s][0]},{ids[other][0]},0,{k % 2}"]
        lines += [f"{ids[s][1]},{ids[s][2]},1,{k % 2}", f"{ids[s][2]},{ids[other][1]},0,{k % 2}"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--pairs", str(pairs), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    res = doc["verification"]["results"]["fit α_id"]
    assert "withheld" not in res and res["identical_feature_same_pairs"] == 0.0
    assert 0.0 <= res["summary"]["auc"]["mean"] <= 1.0 and 0 <= res["summary"]["accuracy_pct"]["mean"] <= 100
    print(json.dumps({"auc": res["summary"]["auc"], "accuracy_pct": res["summary"]["accuracy_pct"]}))
