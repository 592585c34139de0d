"""Machine-readable output and the command line's small promises: every reporting command's
``--json`` is one JSON document on stdout; evaluate's defaults and refusals; no abbreviations."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pipeline import api
from pipeline.cli import main

SYNC = ["--scheduler", "sync", "--no-progress"]


def _json(capsys) -> object:
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout: one document, nothing before or after it


@pytest.mark.slow
def test_every_reporting_command_prints_one_json_document(tmp_path, capsys):
    data, run = tmp_path / "faces", tmp_path / "run"
    assert main(["synth", "--out", str(data), "--subjects", "3", "--images-per-subject", "3",
                 "--seed", "4", "--yaw-range", "-20", "20", "--workers", "1", "--json"]) == 0  # fmt: skip
    assert _json(capsys)["images"] == 9
    shutil.move(data / "ground_truth.parquet", tmp_path / "ground_truth.parquet")
    assert main(["build", str(run), "--dataset", "synthetic", "--root", str(data), "--landmarks", "dlib",
                 *SYNC, "--json"]) == 0  # fmt: skip
    assert _json(capsys)["stages"]["export"]["shards_computed"] == 1
    assert main(["status", str(run), "--json"]) == 0
    st = _json(capsys)
    assert st["export"]["done"] == 1
    # embed is off for renders: no rate for work that was not done
    assert st["embed"]["off"] is True and st["embed"]["images_per_second"] is None
    assert st["fit"]["off"] is False and st["fit"]["images_per_second"] > 0
    # a fit setting changed: the fit shard and everything downstream of it are stale, not done
    assert main(["status", str(run), "--set", "stages.fit.max_iterations=3", "--json"]) == 0
    st = _json(capsys)
    assert (st["fit"]["stale"], st["fit"]["done"]) == (1, 0)
    assert (st["export"]["stale"], st["export"]["done"]) == (1, 0)
    assert st["crop"]["done"] == 1  # upstream of the fit: still done
    # the table: a stale column and "off"; piped into `head`, no broken-pipe error
    proc = subprocess.run(
        f"{sys.executable} -m pipeline.cli status {run} | head -2", shell=True, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "stale" in proc.stdout.splitlines()[1]
    assert main(["status", str(run)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^embed .* off  -$", table, re.M), table
    assert main(["ingest", str(run), "--json"]) == 0
    assert _json(capsys)["shards_skipped"] == [0]
    assert main(["fit", str(run), *SYNC, "--json"]) == 0
    assert _json(capsys)["stages"]["fit"]["shards_skipped"] == 1
    assert main(["train", str(run), "--tiny", "--epochs", "1,1,1", "--json"]) == 0
    doc = _json(capsys)
    assert doc["epochs"] == 3 and doc["last_epoch"]["phase"] == 3
    # evaluate uses the run's trained encoder without being told
    assert main(["evaluate", str(run), "--ground-truth", str(tmp_path / "ground_truth.parquet"),
                 "--no-genova", "--json"]) == 0  # fmt: skip
    doc = _json(capsys)
    assert doc["params"]["encoder"] == str(run / "train")
    assert doc["report_html"].endswith("report.html")
    # the run remembers its dataset: a synthetic set's ground truth under its root is found, and a
    # normal evaluation raises no warning (scikit-learn's ROC warnings came from one-class folds)
    shutil.copy(tmp_path / "ground_truth.parquet", data / "ground_truth.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["evaluate", str(run), "--no-genova", "--json"]) == 0
    doc = _json(capsys)
    assert doc["params"]["ground_truth"] == str(data / "ground_truth.parquet")
    assert doc["reconstruction"]["results"]["fit/full"]["measured"] > 0
    assert not [w for w in caught if "sklearn" in str(w.filename)], [str(w.message) for w in caught]
    subject = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    mesh = tmp_path / "id.obj"
    assert main(["export-mesh", str(run), "--subject", subject, "-o", str(mesh), "--json"]) == 0
    assert _json(capsys)["path"] == str(mesh)

    # a pairs file that names nothing of this run is an error with counts, not "no data"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,same\nx/1.jpg,x/2.jpg,1\ny/1.jpg,z/1.jpg,0\n")
    assert main(["evaluate", str(run), "--pairs", str(pairs)]) == 1
    err = capsys.readouterr().err
    assert "none of its 4 image names" in err and "4 missing" in err
    # the dataset's own pairs file (datasets.<name>.pairs) is the default protocol
    missing = tmp_path / "nope" / "pairs.txt"
    assert main(["evaluate", str(run), "--set", f"datasets.synthetic.pairs={missing}"]) == 2
    assert f"{missing}: pairs file not found" in capsys.readouterr().err


def test_options_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["build", "runs/x", "--land", "dlib"])
    assert ei.value.code == 2
    assert "--land" in capsys.readouterr().err


def test_status_of_a_run_that_does_not_exist_is_an_error(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nosuch")]) == 2
    assert "no such run" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        api.status(tmp_path / "nosuch")


def test_an_unreachable_scheduler_is_one_line(tmp_path, capsys):
    rc = main(["build", str(tmp_path / "r"), "--dataset", "synthetic", "--root", str(tmp_path),
               "--landmarks", "dlib", "--scheduler", "tcp://127.0.0.1:9", "--set",
               "execution.connect_timeout=1s"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in line
    ]


def test_the_bare_export_folder_opens_in_every_common_reader(tmp_path, monkeypatch):
    """pyarrow, pandas, polars, duckdb and Hugging Face datasets on RUN/export, no glob: same rows."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from datasets import load_dataset

    from pipeline.storage.run import Run
    from pipeline.synthetic.toy import toy_model
    from pipeline.synthetic.trainset import write_synthetic_trainset

    run = tmp_path / "run"
    model = toy_model(6, 3, 0, 7.0)
    write_synthetic_trainset(str(run), model, n_subjects=6, images_per_subject=4, n_shards=3, val_subjects=2)
    Run(run).store("export").write_json("_labels.json", {"subjects": {}})  # stage-level files too
    d = str(run / "export" / "data")
    rows = Run(run).table("export", ["image_id", "split"]).to_pylist()
    want = sorted(r["image_id"] for r in rows)
    got = {
        "pyarrow.dataset": pads.dataset(d).to_table(columns=["image_id"]).column("image_id").to_pylist(),
        "pq.read_table": pq.read_table(d, columns=["image_id"]).column("image_id").to_pylist(),
        "pandas": pd.read_parquet(d, columns=["image_id"])["image_id"].tolist(),
        "polars": pl.read_parquet(d, columns=["image_id"])["image_id"].to_list(),
        "duckdb": [r[0] for r in duckdb.sql(f"select image_id from read_parquet('{d}')").fetchall()],
    }
    assert {name: sorted(ids) for name, ids in got.items()} == {name: want for name in got}
    # Hugging Face on the whole folder (card, model/, data/): the split from the file names, each
    # row once, typed by the files' features metadata
    hf = load_dataset("parquet", data_dir=str(run / "export"))
    assert sorted(hf) == ["train", "validation"]
    for split, ours in (("train", "train"), ("validation", "val")):
        assert sorted(hf[split]["image_id"]) == sorted(r["image_id"] for r in rows if r["split"] == ours)
        assert set(hf[split]["split"]) == {ours}
    features = hf["train"].features
    assert type(features["crop_jpeg"]).__name__ == "Image"
    assert type(features["label"]).__name__ == "ClassLabel"
    assert features["label"].names == [f"s{k:04d}" for k in range(6)]
    assert features["landmarks_crop"].length == 136
    first = hf["train"][0]
    assert first["crop_jpeg"].size == (96, 112)  # a PIL image, width x height
    assert features["label"].int2str(first["label"]) == first["subject"]
    # each column's meaning and unit travel with the data (schemas/trainset.yaml)
    schema = pq.read_schema(sorted((run / "export" / "data").glob("*.parquet"))[0])
    assert schema.field("yaw").metadata == {b"morphset.doc": b"degrees", b"morphset.unit": b"deg"}
    assert schema.field("scale").metadata[b"morphset.unit"] == b"px/mm"
    assert b"identity coefficients" in schema.field("alpha_id").metadata[b"morphset.doc"]


def test_the_export_folder_is_a_dataset_card_and_a_model(tmp_path):
    """RUN/export/README.md parses as a Hugging Face dataset card (no network); the model beside the
    data turns labels into shapes with NumPy alone, and its sha256 is the one the card names."""
    import hashlib

    import yaml
    from huggingface_hub import DatasetCard

    from pipeline.storage.run import Run
    from pipeline.synthetic.toy import toy_model
    from pipeline.synthetic.trainset import write_synthetic_trainset

    run = tmp_path / "run"
    model = toy_model(6, 3, 0, 7.0)
    write_synthetic_trainset(str(run), model, n_subjects=5, images_per_subject=3, n_shards=2, val_subjects=1)
    card = DatasetCard.load(run / "export" / "README.md")
    assert card.data.license == "other" and card.data.license_name == "bfm-academic"
    assert [c["split"] for c in card.data.configs[0]["data_files"]] == ["train", "validation"]
    feats = {f["name"]: f for f in card.data.dataset_info["features"]}
    assert feats["crop_jpeg"]["dtype"] == "image"
    assert feats["label"]["dtype"]["class_label"]["names"][0] == "s0000"
    splits = {s["name"]: s["num_examples"] for s in card.data.dataset_info["splits"]}
    assert splits == {"train": 12, "validation": 3}
    for column in ("alpha_id", "yaw", "scale", "crop_jpeg"):
        assert f"| `{column}` |" in card.text  # every column's meaning and unit
    assert "Rz(roll)" in card.text and "Liu" in card.text and "Paysan" in card.text

    record = yaml.safe_load((run / "export" / "model" / "model.json").read_text())
    data = (run / "export" / "model" / "morphable_model.npz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["file_sha256"]
    assert record["file_sha256"] in card.text and record["model_sha256"] == model.sha256
    m = np.load(run / "export" / "model" / "morphable_model.npz", allow_pickle=False)
    row = Run(run).table("export", ["alpha_id", "alpha_exp"]).to_pylist()[0]
    shape = (m["mean"] + m["id_basis"] @ row["alpha_id"] + m["exp_basis"] @ row["alpha_exp"]).reshape(-1, 3)
    np.testing.assert_allclose(shape, model.shape(row["alpha_id"], row["alpha_exp"]), atol=1e-3)


def test_a_run_of_the_old_layout_is_migrated(tmp_path, capsys, caplog):
    """Runs written before _meta/ had their sidecars beside the data: the first command moves them."""
    from pipeline.storage.run import Run
    from pipeline.synthetic.toy import toy_model
    from pipeline.synthetic.trainset import write_synthetic_trainset

    run = tmp_path / "run"
    write_synthetic_trainset(
        str(run), toy_model(6, 3, 0, 7.0), n_subjects=4, images_per_subject=2, n_shards=2
    )
    # the oldest layout: sidecars beside the data, the data in the stage folder itself
    for p in [*(run / "_meta" / "export").iterdir(), *(run / "export" / "data").iterdir()]:
        p.rename(run / "export" / p.name)
    assert Run(run).store("export").shards_with_sidecar() == []  # unreadable as it stands
    assert main(["verify", str(run)]) == 0
    assert "moved 4 file(s) into the current layout" in caplog.text
    assert sorted(p.name for p in (run / "export" / "data").iterdir()) == [
        "part-00000-train.parquet",
        "part-00001-train.parquet",
    ]
    assert Run(run).store("export").shards_with_sidecar() == [0, 1]


def test_an_unguarded_script_is_refused_in_one_line_not_hung(tmp_path):
    """README's Python block saved as a script without the __main__ guard: synth would spawn
    workers that re-run the script (the parent waited forever); it is refused before any starts."""
    import subprocess
    import sys

    script = tmp_path / "make_faces.py"
    script.write_text(
        "from pipeline.api import synth\n"
        f"synth({str(tmp_path / 'faces')!r}, subjects=2, images_per_subject=1, workers=2, textures='painted')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{script}:2: morphset synth (a process pool) starts worker processes" in last
    assert 'if __name__ == "__main__":' in last
    assert not (tmp_path / "faces" / "ground_truth.parquet").exists()

    guarded = tmp_path / "guarded.py"
    guarded.write_text(
        "from pipeline.core.processes import refuse_unguarded_main\n"
        'if __name__ == "__main__":\n'
        "    refuse_unguarded_main('x')\n"
        "    print('guarded call accepted')\n"
        "refuse_unguarded_main('y')\n"
    )
    proc = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=120)
    assert "guarded call accepted" in proc.stdout
    assert f"{guarded}:5: y starts worker processes" in proc.stderr


def test_a_missing_optional_package_is_one_line_naming_it(capsys):
    """s3:// without s3fs was a 26-line traceback; now one line that names the package."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        assert main(["status", "s3://some-bucket/run"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "s3fs" in err and "a package is missing" in err
    else:
        pytest.skip("s3fs is installed here")


def test_commands_that_write_local_files_refuse_a_url_in_one_line(tmp_path, capsys, monkeypatch):
    """synth, calibrate, export-mesh, evaluate's inputs and train's --out take local paths: a URL is
    one line naming the option, never a local folder named after the URL."""
    monkeypatch.chdir(tmp_path)
    cases = [
        (["synth", "--out", "memory://b/faces", "--subjects", "1"], "morphset synth --out: memory://b/faces is a URL"),
        (["calibrate", "s3://b/faces", "--landmarks", "dlib", "-o", "x.json"], "morphset calibrate SYNTH_DIR: s3://b/faces is a URL"),
        (["export-mesh", str(tmp_path), "--subject", "a", "-o", "s3://b/a.obj"], "morphset export-mesh --out: s3://b/a.obj is a URL"),
        (["evaluate", str(tmp_path), "--pairs", "s3://b/pairs.txt"], "morphset evaluate --pairs: s3://b/pairs.txt is a URL"),
        (["train", str(tmp_path), "--out", "gs://b/train"], "morphset train --out: gs://b/train is a URL"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, nothing named after a URL
