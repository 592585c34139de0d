"""End-to-end `morphset evaluate` / `export-mesh` on a small random morphable model and fake fit shards."""

from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh

from pipeline.cli import main
from pipeline.config.manifest import load_manifest
from pipeline.config.schemas import from_rows, load_schema
from pipeline.evaluate import run as evrun
from pipeline.evaluate.meshes import read_mesh, write_mesh
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.correspondence import Correspondence
from pipeline.models.morphable_model import MorphableModel
from pipeline.storage.store import ShardStore

K_ID, K_EXP = 6, 3


def toy_model(n: int = 24, seed: int = 0) -> MorphableModel:
    """A face-sized height field with smooth random identity/expression bases."""
    rng = np.random.default_rng(seed)
    xs = np.linspace(-70, 70, n)
    x, y = np.meshgrid(xs, xs)
    z = 45 * np.exp(-(x**2 + y**2) / (2 * 40**2))
    mean = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)

    def bump(cx: float, cy: float, w: float) -> np.ndarray:
        b = np.zeros_like(mean)
        g = np.exp(-((mean[:, 0] - cx) ** 2 + (mean[:, 1] - cy) ** 2) / (2 * w**2))
        b[:, 0], b[:, 2] = 0.2 * g * rng.normal(), g
        return b.ravel()

    id_basis = np.stack([bump(*rng.uniform(-40, 40, 2), 20) for _ in range(K_ID)], 1)
    exp_basis = np.stack([bump(rng.uniform(-20, 20), -30, 12) for _ in range(K_EXP)], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tri = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    lm = rng.choice(n * n, size=68, replace=False)
    lm[30] = int(np.argmax(z.ravel()))
    return MorphableModel(
        "toy",
        mean.ravel().astype(np.float32),
        id_basis.astype(np.float32),
        np.full(K_ID, 3.0, np.float32),
        exp_basis.astype(np.float32),
        np.full(K_EXP, 2.0, np.float32),
        {IBUG68.name: Correspondence.at_vertices(IBUG68.name, lm)},
        tri.astype(np.int64),
        "0" * 64,
    )


def make_run(
    tmp_path: Path,
    model: MorphableModel,
    n_subjects: int = 12,
    per_subject: int = 4,
    noise: float = 0.3,
    per_image_identity: bool = False,
):
    """Fit shards (2 shards) with fitted = truth + noise, and the matching ground_truth.parquet.
    ``per_image_identity``: every image its own noisy α_id (as ``stages.fit.identity: image``)."""
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    fit_rows, gt_rows = [], []
    for s in range(n_subjects):
        subject = f"person_{s:02d}"
        a_id = rng.normal(size=K_ID) * 3.0
        fit_id = a_id + noise * rng.normal(size=K_ID)
        for i in range(per_subject):
            if per_image_identity:
                fit_id = a_id + noise * rng.normal(size=K_ID)
            image_id = f"{subject}/{i:03d}.png"
            a_exp = rng.normal(size=K_EXP) * 2.0
            yaw = float(rng.uniform(-85, 85))
            failed = s == 0 and i == 0
            fit_rows.append(
                {
                    "image_id": image_id,
                    "subject": subject,
                    "label": s,
                    "alpha_id": fit_id.tolist(),
                    "alpha_exp": None if failed else (a_exp + noise * rng.normal(size=K_EXP)).tolist(),
                    "scale": 1.0,
                    "rotation": np.eye(3).ravel().tolist(),
                    "yaw": yaw,
                    "pitch": 0.0,
                    "roll": 0.0,
                    "translation": [0.0, 0.0],
                    "reproj_rmse_px": float(rng.uniform(0.5, 3)),
                    "reproj_nme": float(rng.uniform(0.01, 0.05)),
                    "used": not failed,
                    "subject_images_used": per_subject - (s == 0),
                    "iterations": int(rng.integers(3, 12)),
                    "converged": s != 3,
                    "objective": 1.0,
                    "objective_history": [2.0, 1.0],
                    "failure_reason": "rejected_reprojection" if failed else None,
                }
            )
            gt_rows.append(
                {
                    "image_id": image_id,
                    "subject": subject,
                    "alpha_id": a_id.tolist(),
                    "alpha_exp": a_exp.tolist(),
                    "yaw": yaw,
                }
            )
    schema = load_schema("fits")
    store = ShardStore(str(run), "fit")
    half = len(fit_rows) // 2
    for shard, rows in enumerate((fit_rows[:half], fit_rows[half:])):
        store.write(
            shard,
            from_rows(rows, schema),
            schema,
            "fp",
            "ph",
            0.0,
            extra_metadata={"morphset.model.sha256": model.sha256},
        )
    gt = pa.Table.from_pylist(gt_rows).replace_schema_metadata({"morphset.model.sha256": model.sha256})
    pq.write_table(gt, tmp_path / "ground_truth.parquet")
    return run, tmp_path / "ground_truth.parquet"


class Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids, self.h2, self.imgs, self.tables, self._in_h2 = [], [], [], 0, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.tables += 1
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    run, gt = make_run(tmp_path, model)
    return model, run, gt


def test_evaluate_writes_report_with_all_sections(toy, capsys):
    model, run, gt = toy
    rc = main(
        ["evaluate", str(run), "--ground-truth", str(gt), "--set", "stages.evaluate.genova_max_samples=5"]
    )
    assert rc == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert page == run / "eval" / "report.html"
    p = Sections()
    p.feed(page.read_text(encoding="utf-8"))
    assert p.ids == [
        "identity-curve",
        "summary",
        "encoders",
        "verification",
        "reconstruction",
        "fit-quality",
        "picture-sheet",
        "provenance",
        "notes",
    ]
    assert p.h2 == [
        "What multi-image fitting buys",
        "Summary",
        "Trained encoders side by side",
        "Face verification",
        "3D reconstruction accuracy",
        "Fit quality",
        "Picture sheet",
        "Provenance",
        "Notes",
    ]
    # self-contained: every image is embedded
    assert len(p.imgs) >= 5 and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    assert "http" not in page.read_text(encoding="utf-8").replace("http-equiv", "")

    doc = json.loads((run / "eval" / "report.json").read_text())
    fq = doc["fit_quality"]
    assert fq["images"] == 48 and fq["fitted"] == 47
    assert fq["rejected_by_reason"] == {"rejected_reprojection": 1}
    assert fq["convergence_rate"] == pytest.approx(11 / 12)
    assert fq["identity_consistency"]["within_mm"] == pytest.approx(0.0, abs=1e-9)  # shared α_id

    rec = doc["reconstruction"]["results"]
    full, ident = rec["fit/full"], rec["fit/identity"]
    assert full["samples"] == 48 and full["measured"] == 47 and full["failures"] == {"fit_failed": 1}
    assert ident["samples"] == 12 and ident["measured"] == 12
    assert 0 < full["overall"]["liu_mean_mm"]["mean"] < 5  # noise 0.3 on coefficients of ~mm bases
    assert full["overall"]["genova_mm"]["n"] == 5
    assert [r["yaw"] for r in full["per_yaw"]][0] == "±90°" and full["per_yaw"][-1]["yaw"] == "0°"
    assert sum(r["liu_mean_mm"]["n"] for r in full["per_yaw"]) == 47
    assert sum(r["liu_mean_mm"]["n"] for r in full["per_expression"]) == 47

    # provenance: what made these figures, on the page and in report.json
    prov = doc["provenance"]
    assert (
        prov["morphset_version"]
        and prov["landmark_backend"] == load_manifest().stage_params("landmarks")["backend"]
    )
    assert prov["seeds"]["evaluate"] == 0 and "fit" in prov["settings"] and "evaluate" in prov["settings"]
    backend = prov["landmark_backend"]
    assert (prov["landmark_error_model"] or {}).get("sha256") == load_manifest().get(
        f"models.landmark_error.{backend}.sha256"
    )
    assert "landmark error model" in page.read_text(encoding="utf-8")
    # every headline figure: a value, its interval, its sample count and the set it was measured on
    for h in doc["headline"]:
        assert h["measured_on"] and ("value" in h or ("ci95" in h and h["n"])), h
    assert any(h["figure"].startswith("Liu error mm (fit, full") and h["ci95"] for h in doc["headline"])
    # a spread that is zero by construction prints as 0, not as rounding noise (8.6e-15)
    assert not re.search(r"\de-1\d", page.read_text(encoding="utf-8").split("<img")[0])

    ver = doc["verification"]
    assert ver["pair_sets"]["fit"]["n_folds"] == 10 and (run / "eval" / "pairs.csv").is_file()
    res = ver["results"]["fit α_id"]
    # the multi-image fit shares α_id within a subject: not presented as a verification result
    assert res["identical_feature_same_pairs"] == 1.0 and res["withheld"] == "identical by construction"
    assert "summary" not in res and any("identical features" in n for n in doc["notes"])
    assert "Not shown: fit α_id: identical by construction" in page.read_text(encoding="utf-8")
    assert any("no trained encoder" in n for n in doc["notes"])

    samples = pq.read_table(run / "eval" / "samples.parquet")
    assert samples.schema.metadata[b"morphset.schema"] == b"evaluation"
    assert samples.num_rows == 48 + 12 + 48  # fit full, fit identity, mean-shape baseline
    baseline = rec["mean shape/full"]
    assert baseline["measured"] == 48
    assert baseline["overall"]["liu_mean_mm"]["mean"] > 3 * full["overall"]["liu_mean_mm"]["mean"]


def test_reconstruction_error_grows_with_fit_noise(tmp_path, monkeypatch):
    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    errs = []
    for noise in (0.0, 1.0):
        run, gt = make_run(tmp_path / f"n{noise}", model, n_subjects=4, noise=noise)
        params = load_manifest().stage_params("evaluate") | {
            "ground_truth": str(gt),
            "genova_max_samples": 3,
            "sheet_rows": 0,
            "n_folds": 2,
            "pairs_per_fold": 4,
        }
        evrun.evaluate_run(str(run), load_manifest(), params)
        doc = json.loads((run / "eval" / "report.json").read_text())
        errs.append(doc["reconstruction"]["results"]["fit/full"]["overall"])
    assert errs[0]["liu_mean_mm"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert errs[0]["genova_mm"]["mean"] < 1e-3
    assert errs[1]["liu_mean_mm"]["mean"] > 0.1
    assert errs[1]["genova_mm"]["mean"] > 10 * errs[0]["genova_mm"]["mean"]


def test_scan_ground_truth_layout(tmp_path, monkeypatch):
    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    run, _ = make_run(tmp_path, model, n_subjects=3)
    scans = tmp_path / "scans"
    from pipeline.core.tables import RunTables
    from pipeline.evaluate.inputs import load_fits

    fits = load_fits(RunTables(str(run)))
    rows = ["subject,image_id,mesh,landmarks,yaw"]
    for s in ("person_01", "person_02"):
        a_id = fits["alpha_id"][list(fits["subject"]).index(s)]
        verts = model.shape(a_id) * 1.1 + 4.0  # a scan in other units/placement: similarity removes it
        write_mesh(verts, model.triangles, scans / f"{s}.ply")
        np.savetxt(scans / f"{s}.lm.txt", model.landmarks_of(IBUG68).locate(verts))
        rows.append(f"{s},,{s}.ply,{s}.lm.txt,")
    (scans / "scans.csv").write_text("\n".join(rows) + "\n")
    params = load_manifest().stage_params("evaluate") | {
        "ground_truth": str(scans),
        "sheet_rows": 2,
        "n_folds": 2,
        "pairs_per_fold": 4,
    }
    evrun.evaluate_run(str(run), load_manifest(), params)
    doc = json.loads((run / "eval" / "report.json").read_text())
    ident = doc["reconstruction"]["results"]["fit/identity"]
    assert ident["measured"] == 2
    assert ident["overall"]["liu_mean_mm"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert ident["overall"]["genova_mm"]["mean"] < 1e-3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scans.csv").write_text("subject,mesh,landmarks\nx,missing.ply,lm.txt\n")
    with pytest.raises(FileNotFoundError, match=r"scans.csv:2: mesh file 'missing.ply' not found"):
        evrun.evaluate_run(str(run), load_manifest(), params | {"ground_truth": str(bad)})


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_export_mesh_keeps_correspondence_in_trimesh_default_load(toy, tmp_path, suffix, capsys, monkeypatch):
    model, run, _ = toy
    # a model with vertices no triangle uses (the default model has 1,218 of them)
    keep = np.isin(model.triangles, [0, 5, 17], invert=True).all(axis=1)
    model = dataclasses.replace(model, triangles=model.triangles[keep])
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    used = np.unique(model.triangles)
    assert len(used) < model.n_vertices
    out = tmp_path / f"ident{suffix}"
    assert main(["export-mesh", str(run), "--subject", "person_02", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["vertices"] == len(used) and doc["model_vertices"] == model.n_vertices
    from pipeline.core.tables import RunTables
    from pipeline.evaluate.inputs import load_fits

    fits = load_fits(RunTables(str(run)))
    a_id = fits["alpha_id"][list(fits["subject"]).index("person_02")]
    ids = np.loadtxt(doc["vertex_ids"], dtype=np.int64)
    np.testing.assert_array_equal(ids, used)
    mesh = trimesh.load(out)  # trimesh's defaults: process=True merges and drops unused vertices
    assert len(mesh.vertices) == len(used)
    np.testing.assert_allclose(mesh.vertices, model.shape(a_id)[ids], atol=1e-4)
    np.testing.assert_array_equal(ids[mesh.faces], model.triangles)
    out2 = tmp_path / f"full{suffix}"
    assert main(["export-mesh", str(run), "--image", "person_02/001.png", "-o", str(out2)]) == 0
    i = list(fits["image_id"]).index("person_02/001.png")
    v2, _ = read_mesh(out2)
    assert np.allclose(v2, model.shape(fits["alpha_id"][i], fits["alpha_exp"][i])[ids], atol=1e-4)


def test_export_mesh_errors_are_clear(toy, tmp_path, capsys):
    _, run, _ = toy
    assert main(["export-mesh", str(run), "--subject", "nobody", "-o", str(tmp_path / "x.obj")]) == 2
    assert "subject 'nobody': no successful fit" in capsys.readouterr().err
    assert main(["export-mesh", str(run), "--image", "person_00/000.png", "-o", str(tmp_path / "x.obj")]) == 2
    assert "fit failed (rejected_reprojection)" in capsys.readouterr().err
    assert main(["export-mesh", str(run), "--subject", "person_01", "-o", str(tmp_path / "x.stl")]) == 2
    assert "must end in .obj or .ply" in capsys.readouterr().err


def test_evaluate_without_fit_shards_names_the_directory(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "empty")]) == 2
    assert "no committed fit shards" in capsys.readouterr().err


def test_one_subject_run_reports_without_verification(tmp_path, monkeypatch):
    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    run, _ = make_run(tmp_path, model, n_subjects=1)
    params = load_manifest().stage_params("evaluate") | {"sheet_rows": 1}
    page = evrun.evaluate_run(str(run), load_manifest(), params)
    doc = json.loads((run / "eval" / "report.json").read_text())
    assert "verification" not in doc and any("verification skipped" in n for n in doc["notes"])
    assert page.is_file()
    bad = tmp_path / "pairs.txt"
    bad.write_text("1 1\nperson_00 1 2\nperson_00 1\n")
    with pytest.raises(ValueError, match=r"pairs.txt:3: set 1 expects a mismatched pair"):
        evrun.evaluate_run(str(run), load_manifest(), params | {"pairs": str(bad)})


def _write_export(run: Path, model: MorphableModel) -> None:
    """Trainset shards with random JPEG crops for every fitted image of the fake run."""
    import io

    from PIL import Image

    from pipeline.core.tables import RunTables
    from pipeline.evaluate.inputs import load_fits

    fits = load_fits(RunTables(str(run)))
    rng = np.random.default_rng(5)
    rows = []
    for i in np.flatnonzero(fits.is_null("failure_reason")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (112, 96, 3), dtype=np.uint8)).save(buf, format="JPEG")
        rows.append(
            {
                "image_id": fits["image_id"][i],
                "subject": fits["subject"][i],
                "label": 0,
                "split": "train",
                "crop_jpeg": {"bytes": buf.getvalue(), "path": None},
                "landmarks_crop": [0.0] * 136,
                "alpha_id": fits["alpha_id"][i].tolist(),
                "alpha_exp": fits["alpha_exp"][i].tolist(),
                "yaw": 0.0,
                "pitch": 0.0,
                "roll": 0.0,
                "scale": 1.0,
                "reproj_rmse_px": 1.0,
                "reproj_nme": 0.01,
                "detection_score": 0.99,
            }
        )
    schema = load_schema("trainset")
    ShardStore(str(run), "export").write(0, from_rows(rows, schema), schema, "fp", "ph", 0.0)


@pytest.mark.slow
def test_evaluate_with_encoder(toy, tmp_path):
    torch = pytest.importorskip("torch")
    from pipeline.train.inference import export_encoder
    from pipeline.train.network import MorphNet

    model, run, gt = toy
    _write_export(run, model)
    torch.manual_seed(0)
    net = MorphNet(K_ID, K_EXP, model.n_vertices, 1, 0.25, 16)
    net.mean_shape.copy_(torch.from_numpy(model.mean.astype(np.float32)))
    norm = {
        "mid_id": np.zeros(K_ID),
        "half_id": np.ones(K_ID),
        "mid_exp": np.zeros(K_EXP),
        "half_exp": np.ones(K_EXP),
    }
    params = {"width_multiplier": 0.25, "embedding_dim": 16, "identification": "softmax"}
    enc_dir = export_encoder(net, tmp_path / "enc", params, norm, model, epochs=0, torchscript=False)
    params = load_manifest().stage_params("evaluate") | {
        "ground_truth": str(gt),
        "encoder": str(enc_dir),
        "genova": False,
        "sheet_rows": 2,
    }
    evrun.evaluate_run(str(run), load_manifest(), params)
    doc = json.loads((run / "eval" / "report.json").read_text())
    results = doc["verification"]["results"]
    assert {"fit α_id", "encoder c_id", "encoder α_id", "encoder c_id + encoder α_id (fused)"} <= set(results)
    enc = results["encoder c_id"]
    pair_set = doc["verification"]["pair_sets"][enc["pair_set"]]
    assert enc["pairs_used"] == pair_set["n_pairs"] - enc["pairs_missing_features"]
    # pairs drawn within the subjects the encoder has features for: both classes, every pair used
    assert enc["pairs_missing_features"] == 0 and 0 < enc["n_same"] < enc["n_pairs"]
    lo, hi = enc["summary"]["accuracy_pct"]["ci95"]
    assert 0 <= lo <= hi <= 100
    assert enc["summary"]["auc"]["ci95"] is not None
    rec = doc["reconstruction"]["results"]
    assert rec["encoder/full"]["measured"] == 47 and rec["encoder/identity"]["measured"] == 47
    assert "encoder: full" in doc["picture_sheet"]["columns"]
    assert "identity_consistency_encoder" in doc["fit_quality"]


def test_directory_items_average_their_images(tmp_path, monkeypatch):
    """YouTube-Faces-style items (a directory of frames) use the mean feature of their images."""
    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    run, _ = make_run(tmp_path, model, per_image_identity=True)
    rows = ["a,b,same,fold"]
    for k in range(4):
        rows.append(f"person_{k + 1:02d},person_{k + 1:02d}/000.png,1,{k % 2}")
        rows.append(f"person_{k + 1:02d},person_{k + 5:02d},0,{k % 2}")
    rows.append("person_01,nobody,0,1")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(rows) + "\n")
    params = load_manifest().stage_params("evaluate") | {
        "pairs": str(pairs),
        "sheet_rows": 0,
        "genova": False,
        "min_pairs_per_class": 4,
    }
    evrun.evaluate_run(str(run), load_manifest(), params)
    res = json.loads((run / "eval" / "report.json").read_text())["verification"]["results"]["fit α_id"]
    assert res["pairs_used"] == 8 and res["pairs_missing_features"] == 1
    assert res["identical_feature_same_pairs"] == 0.0  # per-image α_id: shown as a result
    assert res["summary"]["auc"]["mean"] == 1.0  # noise 0.3 against subjects 3.0 apart

    # too few pairs of a class: not a result, and the page says why
    evrun.evaluate_run(str(run), load_manifest(), params | {"min_pairs_per_class": 5})
    doc = json.loads((run / "eval" / "report.json").read_text())
    res = doc["verification"]["results"]["fit α_id"]
    assert "summary" not in res and "fewer than 5 of each" in res["not_shown"]
    assert not any(h["figure"].startswith("verification") for h in doc["headline"])
    page = (run / "eval" / "report.html").read_text(encoding="utf-8")
    assert "Not shown: fit α_id: 4 same-person and 4 different-person pairs" in page


def test_generated_pairs_stay_within_the_measured_subjects(tmp_path, monkeypatch):
    """Few subjects (a demo's validation split): pairs are drawn within them, distinct, with both
    classes in every fold, so the row measures something (it had 0 different pairs before)."""
    from pipeline.evaluate.pairs import generate_pairs

    items = {f"s{k}": [f"s{k}/{i}.png" for i in range(8)] for k in range(3)}
    p = generate_pairs(items, n_folds=10, pairs_per_fold=30, seed=0)
    keys = {tuple(sorted(ab)) for ab in zip(p.a, p.b, strict=True)}
    assert len(keys) == len(p)  # no pair twice
    assert p.same.sum() == (~p.same).sum() == 3 * 28  # every distinct same-person pair, balanced
    for k in range(10):
        assert 0 < p.same[p.fold == k].sum() < (p.fold == k).sum()
    subj = {x.split("/")[0] for x in p.a + p.b}
    assert subj == set(items)


def test_evaluate_and_train_take_an_fsspec_url_run(tmp_path, monkeypatch, capsys):
    """A run at a URL is evaluated in place (the report written there); train refuses to write its
    checkpoints into a local folder named after the URL and says what to give instead."""
    import fsspec

    model = toy_model()
    monkeypatch.setattr(evrun, "load_model", lambda manifest: (model, None))
    monkeypatch.chdir(tmp_path)
    run, _ = make_run(tmp_path, model, n_subjects=4)
    fs = fsspec.filesystem("memory")
    fs.put(str(run), "/urlrun", recursive=True)
    params = load_manifest().stage_params("evaluate") | {"sheet_rows": 0, "n_folds": 2, "pairs_per_fold": 4}
    page = evrun.evaluate_run("memory://urlrun", load_manifest(), params)
    assert page == "memory://urlrun/eval/report.html"
    assert fs.exists("/urlrun/eval/report.json") and fs.exists("/urlrun/eval/report.html")
    assert main(["train", "memory://urlrun"]) == 2
    err = capsys.readouterr().err
    assert "writes its checkpoints to a local folder: give --out DIR" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("memory*"))  # nothing named after the URL


@pytest.mark.slow
def test_encoders_of_several_objectives_side_by_side(toy, tmp_path):
    """Two trained encoders (a liu and a genova objective) in one report: each has its own rows in
    verification and reconstruction, and the side-by-side table puts them beside the landmark fit,
    each against the mean shape on the same images."""
    torch = pytest.importorskip("torch")
    from pipeline.train.inference import export_encoder
    from pipeline.train.network import MorphNet

    model, run, gt = toy
    _write_export(run, model)
    norm = {
        "mid_id": np.zeros(K_ID),
        "half_id": np.ones(K_ID),
        "mid_exp": np.zeros(K_EXP),
        "half_exp": np.ones(K_EXP),
    }
    dirs = []
    for seed, objective in ((0, "liu"), (1, "genova")):
        torch.manual_seed(seed)
        net = MorphNet(K_ID, K_EXP, model.n_vertices, 1, 0.25, 16)
        net.mean_shape.copy_(torch.from_numpy(model.mean.astype(np.float32)))
        params = {
            "width_multiplier": 0.25,
            "embedding_dim": 16,
            "identification": "softmax",
            "objective": objective,
        }
        dirs.append(
            export_encoder(net, tmp_path / objective, params, norm, model, epochs=seed, torchscript=False)
        )
    params = load_manifest().stage_params("evaluate") | {
        "ground_truth": str(gt),
        "encoder": [str(d) for d in dirs],
        "genova": False,
        "sheet_rows": 2,
    }
    evrun.evaluate_run(str(run), load_manifest(), params)
    doc = json.loads((run / "eval" / "report.json").read_text())
    results = doc["verification"]["results"]
    for name in ("encoder liu", "encoder genova"):
        assert {f"{name} c_id", f"{name} α_id", f"{name} c_id + {name} α_id (fused)"} <= set(results)
        assert doc["reconstruction"]["results"][f"{name}/full"]["measured"] == 47
        assert f"{name}: full" in doc["picture_sheet"]["columns"]
    # different networks, different answers
    assert results["encoder liu c_id"]["summary"] != results["encoder genova c_id"]["summary"]
    rows = {r["source"]: r for r in doc["encoders"]["rows"]}
    assert list(rows) == ["fit", "encoder liu", "encoder genova"]
    assert rows["encoder genova"]["objective"] == "genova" and rows["encoder genova"]["epochs"] == 1
    for r in rows.values():  # every row on the same images, against the same mean-shape error
        assert r["images"] == rows["fit"]["images"] > 0
        assert r["mean_shape_liu_mean_mm"] == rows["fit"]["mean_shape_liu_mean_mm"]
        assert r["ratio_to_mean_shape"] == pytest.approx(r["liu_mean_mm"] / r["mean_shape_liu_mean_mm"])
        lo, hi = r["ratio_ci95"]
        assert lo <= r["ratio_to_mean_shape"] <= hi
    assert rows["encoder liu"]["c_id_auc"] == results["encoder liu c_id"]["summary"]["auc"]["mean"]
    assert [e["objective"] for e in doc["provenance"]["encoders"]] == ["liu", "genova"]
    html = (run / "eval" / "report.html").read_text()
    assert "Trained encoders side by side" in html and "encoder genova" in html


def test_the_encoder_flag_repeats_and_refuses_one_encoder_twice(toy, tmp_path, monkeypatch, capsys):
    from pipeline import api

    model, run, gt = toy
    seen = {}
    monkeypatch.setattr(api, "evaluate", lambda run, **kw: seen.update(kw) or tmp_path / "report.html")
    assert main(["evaluate", str(run), "--encoder", "a", "--encoder", "b"]) == 0
    assert seen["encoder"] == ["a", "b"]
    monkeypatch.undo()
    assert main(["evaluate", str(run), "--encoder", str(tmp_path), "--encoder", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "stages.evaluate.encoder" in err and "non-unique" in err
