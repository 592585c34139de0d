"""Training loop: a tiny configuration overfits, resume is bit-for-bit, checkpoints are safe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.synthetic.toy import toy_model
from pipeline.synthetic.trainset import write_synthetic_trainset
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.config import validate_params
from pipeline.train.loop import TrainState, phase_schedule, train, update_lambda_r

TINY_TEST = {
    "width_multiplier": 0.125,
    "embedding_dim": 32,
    "batch_size": 16,
    "lr": 0.0005,
    "lr_classifier": 0.02,
    "weight_decay": 0.0,
    "lr_step_epochs": 100,
    "recon_vertices": 100,
    "torchscript": False,
    "progress": "never",
    "threads": 2,
}


MODEL = {"k_id": 8, "k_exp": 4, "seed": 0, "spacing_mm": 7.0}  # the model fixture (conftest.py)


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("trainrun")
    write_synthetic_trainset(str(root), model, n_subjects=8, images_per_subject=4, n_shards=2, seed=0)
    return str(root)


def _steps(metrics_path):
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [r for r in recs if r["kind"] == "step"], [r for r in recs if r["kind"] == "epoch"]


def test_tiny_config_overfits_a_small_synthetic_set(run, model, tmp_path):
    # 32 images, batch 16: 20 Phase I steps, 24 Phase III steps (< 30 s on 2 CPU cores)
    params = validate_params({**TINY_TEST, "epochs_phase1": 10, "epochs_phase2": 1, "epochs_phase3": 12})
    result = train(run, params, model, tmp_path / "out")
    steps, epochs = _steps(result.metrics_path)
    assert len(steps) == 10 * 2 + 1 * 2 + 12 * 2
    p1 = [s for s in steps if s["phase"] == 1]
    p3_epochs = [e for e in epochs if e["phase"] == 3]
    p3 = [s for s in steps if s["phase"] == 3]
    # Phase I: coefficient MSE falls at least 3x from the first step to the last epoch's mean
    assert epochs[9]["coef"] < p1[0]["coef"] / 3
    # Phase II starts at the 3DMM, so the reconstruction is already exact (float32 noise, mm^2)
    assert epochs[10]["recon"] < 1e-3
    # Phase III: identification loss at least halves and the subjects are recognised
    assert p3_epochs[-1]["id"] < p3[0]["id"] / 2
    assert p3_epochs[-1]["acc"] >= 0.75
    assert p3_epochs[-1]["recon"] < p3_epochs[0]["recon"]
    assert result.export_dir is not None and (result.export_dir / "encoder.json").is_file()


def _params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_bit_for_bit(run, model, tmp_path):
    params = validate_params({**TINY_TEST, "epochs_phase1": 1, "epochs_phase2": 1, "epochs_phase3": 2})
    straight = train(run, params, model, tmp_path / "straight")
    # interrupted after Phase I, then after the first Phase III epoch (mid-phase: optimiser restored)
    part = train(run, params, model, tmp_path / "resumed", stop_after_epoch=1)
    assert part.epochs_completed == 1 and part.export_dir is None
    train(run, params, model, tmp_path / "resumed", resume=True, stop_after_epoch=3)
    resumed = train(run, params, model, tmp_path / "resumed", resume=True)
    assert resumed.epochs_completed == 4
    a = ckpt_io.load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch-0004.pt")
    b = ckpt_io.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch-0004.pt")
    assert _params_equal(a["model"], b["model"])
    assert a["state"] == b["state"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    # the metrics of the resumed run hold each step exactly once, like the straight run's
    steps_a, _ = _steps(straight.metrics_path)
    steps_b, _ = _steps(resumed.metrics_path)
    assert [s["step"] for s in steps_b] == [s["step"] for s in steps_a]
    assert [s["loss"] for s in steps_b] == [s["loss"] for s in steps_a]


def test_checkpoints_are_weights_only_and_pruned(run, model, tmp_path):
    params = validate_params(
        {**TINY_TEST, "epochs_phase1": 2, "epochs_phase2": 1, "epochs_phase3": 0, "keep_checkpoints": 2}
    )
    train(run, params, model, tmp_path / "o")
    found = ckpt_io.list_checkpoints(tmp_path / "o" / "checkpoints")
    assert [e for e, _ in found] == [2, 3]
    ck = torch.load(found[-1][1], weights_only=True)  # only tensors and primitive containers
    assert ck["phase"] == 2 and ck["model_sha256"] == model.sha256
    assert set(ck["norm"]) >= {"mid_id", "half_id", "mid_exp", "half_exp"}
    # a truncated newest checkpoint is skipped in favour of the previous one
    found[-1][1].write_bytes(found[-1][1].read_bytes()[:100])
    path, ck = ckpt_io.latest_checkpoint(tmp_path / "o" / "checkpoints")
    assert ck["epoch"] == 2


def test_model_mismatch_is_refused(run, tmp_path):
    other = toy_model(k_id=8, k_exp=4, seed=5, spacing_mm=7.0)
    with pytest.raises(ValueError, match="use the same model as the export stage"):
        train(run, validate_params(TINY_TEST), other, tmp_path / "x")


def test_resume_refuses_another_architecture(run, model, tmp_path):
    params = validate_params({**TINY_TEST, "epochs_phase1": 1, "epochs_phase2": 0, "epochs_phase3": 0})
    train(run, params, model, tmp_path / "o")
    wider = validate_params({**TINY_TEST, "width_multiplier": 0.25, "epochs_phase1": 2})
    with pytest.raises(ValueError, match="width_multiplier=0.125"):
        train(run, wider, model, tmp_path / "o", resume=True)


def test_lambda_r_switches_on_plateau_or_fixed_epoch():
    params = validate_params({"plateau_patience": 2, "plateau_min_delta": 0.01})
    state = TrainState(lambda_r=0.5)
    for i, loss in enumerate([10.0, 8.0, 7.0, 6.99, 6.98]):
        update_lambda_r(state, loss, i + 1, params)
        assert state.lambda_r == (1.0 if i == 4 else 0.5)
    fixed = validate_params({"lambda_r_switch_epoch": 3})
    state = TrainState(lambda_r=0.5)
    for i in range(4):
        update_lambda_r(state, 100.0 / (i + 1), i + 1, fixed)
        assert state.lambda_r == (1.0 if i >= 2 else 0.5)
    assert phase_schedule(validate_params({"epochs_phase1": 2, "epochs_phase2": 0, "epochs_phase3": 1})) == [
        1,
        1,
        3,
    ]


def test_asoftmax_batch_loss_and_dataloader_workers_path(run, model, tmp_path):
    params = validate_params(
        {
            **TINY_TEST,
            "epochs_phase1": 0,
            "epochs_phase2": 0,
            "epochs_phase3": 2,
            "identification": "asoftmax",
            "batch_dist_weight": 0.1,
            "num_workers": 2,
        }
    )
    result = train(run, params, model, tmp_path / "o")
    steps, epochs = _steps(result.metrics_path)
    assert [e["images"] for e in epochs] == [32, 32]  # every row once per epoch through 2 workers
    assert all(s["batch_distribution"] > 0 and s["id"] > 0 for s in steps)
    assert all(np.isfinite(s["loss"]) for s in steps)
