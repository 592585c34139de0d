"""`morphset train`: help, configuration precedence, a tiny end-to-end run, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import cli
from pipeline.synthetic.trainset import write_synthetic_trainset
from pipeline.train import loop
from pipeline.train.inference import load_encoder

MODEL = {"k_id": 6, "k_exp": 3, "seed": 0, "spacing_mm": 7.0}  # the model fixture (conftest.py)


@pytest.fixture
def run(tmp_path, model, monkeypatch):
    write_synthetic_trainset(
        str(tmp_path), model, n_subjects=4, images_per_subject=3, n_shards=2, val_subjects=1
    )
    monkeypatch.setattr(loop, "resolve_model", lambda manifest: model)
    return tmp_path


def test_help_says_what_it_does_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in (
        "Phase I",
        "lambda_R",
        "--tiny",
        "--resume",
        "RUN/train",
        "width_multiplier 1.0",
        "--epochs",
    ):
        assert needle in text


def test_config_precedence_manifest_tiny_file_set_flag(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("batch_size: 8\nlr: 0.01\nseed: 4\n")
    argv = ["train", str(tmp_path), "--tiny", "--config", str(cfg), "--set", "stages.train.lr=0.02"]
    assert cli.main([*argv, "--epochs", "2,0,1", "--print-config"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["width_multiplier"] == 0.25  # --tiny over the defaults
    assert p["batch_size"] == 8 and p["seed"] == 4  # the file over --tiny
    assert p["lr"] == 0.02  # --set over the file
    assert (p["epochs_phase1"], p["epochs_phase2"], p["epochs_phase3"]) == (2, 0, 1)  # flags last
    assert p["optimizer"] == "adam"  # untouched keys keep the schema default


def test_bad_values_name_the_key(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path), "--set", "stages.train.batch_size=big", "--print-config"]) == 2
    assert "stages.train.batch_size" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path), "--epochs", "1,2", "--print-config"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_missing_export_is_a_clear_error(tmp_path, model, monkeypatch, capsys):
    monkeypatch.setattr(loop, "resolve_model", lambda manifest: model)
    assert cli.main(["train", str(tmp_path), "--tiny"]) == 2
    assert "no committed trainset shards" in capsys.readouterr().err


def test_tiny_run_end_to_end_then_resume(run, capsys):
    argv = ["train", str(run), "--tiny", "--epochs", "1,1,1", "--set", "stages.train.width_multiplier=0.125"]
    argv += ["--set", "stages.train.recon_vertices=50", "--set", "stages.train.progress=never"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epochs"] == 3
    train_dir = run / "train"
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir())[-1] == "epoch-0003.pt"
    kinds = [json.loads(line)["kind"] for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("epoch") == 3 and kinds.count("step") == 3  # 9 train images, batch 32
    enc = load_encoder(train_dir)
    assert enc.k_id == 6
    # the last checkpoint loads as an encoder too, with the same outputs as the export
    from pipeline.synthetic.trainset import draw_crop

    rng = np.random.default_rng(0)
    crops = np.stack([draw_crop(np.full(3, 120.0), np.zeros(3), np.zeros(3), rng) for _ in range(2)])
    from_ckpt = load_encoder(train_dir / "checkpoints" / "epoch-0003.pt")
    assert np.allclose(from_ckpt.embed(crops)["alpha_id"], enc.embed(crops)["alpha_id"], atol=1e-5)
    assert np.allclose(from_ckpt.reconstruct(crops)[1], enc.reconstruct(crops)[1], atol=1e-4)
    # resuming a finished run changes nothing but re-exports
    assert cli.main([*argv, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 3
    # nothing to repeat: a bare --resume continues with the settings the run started with (--tiny…)
    assert cli.main(["train", str(run), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 3
    assert cli.main(["train", str(run), "--resume", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert '"width_multiplier": 0.125' in printed and '"recon_vertices": 50' in printed
