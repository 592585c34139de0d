"""The training loop: phases I-III of Liu et al. (CVPR 2018), checkpoints, resume, metrics.

Epoch schedule: ``epochs_phase1`` epochs of Phase I (encoder alone, coefficient loss), then
``epochs_phase2`` of Phase II (decoders alone, reconstruction from the true coefficients; reads no
images), then ``epochs_phase3`` of Phase III (end to end, L = λ_R·L_R + L_C [+ optional terms]).
λ_R starts at ``lambda_r_initial`` and becomes ``lambda_r_final`` once the Phase III epoch loss
plateaus (or after ``lambda_r_switch_epoch`` Phase III epochs). Each phase gets a fresh optimiser
and StepLR schedule over the parameters it trains.

After every epoch a checkpoint (network, optimiser, scheduler, phase, λ_R/plateau state,
normalisation statistics, vertex subsample, model sha256, torch RNG) is written atomically;
``resume=True`` continues from the newest one and reproduces an uninterrupted run bit for bit
(data order depends only on (seed, epoch); CPU kernels are deterministic for a fixed thread count).

GPU paths (guarded, not exercised on the CPU development machines): ``amp: true`` uses float16
autocast and a GradScaler on CUDA; launching with ``torchrun --nproc_per_node=G`` (WORLD_SIZE > 1)
initialises torch.distributed, wraps the step module in DistributedDataParallel, splits row groups
across ranks, and lets rank 0 alone write checkpoints, metrics and the export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.config.manifest import Manifest
from pipeline.models.morphable_model import MorphableModel
from pipeline.storage.atomic import atomic_write
from pipeline.train import checkpoint as ckpt_io
from pipeline.train.config import ARCHITECTURE_KEYS
from pipeline.train.data import (
    TrainsetInfo,
    TrainsetStream,
    compute_norm_stats,
    denormalise,
    normalise,
    scan_trainset,
)
from pipeline.train.genova import GenovaLosses, GenovaSettings
from pipeline.train.losses import (
    asoftmax_lambda,
    asoftmax_loss,
    batch_distribution_loss,
    coefficient_loss,
    reconstruction_loss,
    softmax_loss,
)
from pipeline.train.network import MorphNet, init_decoders_from_model

log = logging.getLogger(__name__)

PHASE_NAMES = {1: "I encoder", 2: "II decoders", 3: "III end-to-end"}


@dataclass
class TrainResult:
    out_dir: Path
    epochs_completed: int
    total_epochs: int
    metrics_path: Path
    export_dir: Path | None
    epoch_records: list[dict] = field(default_factory=list)


def phase_schedule(params: dict) -> list[int]:
    if params.get("objective") == "genova":  # no 3D labels: Genova's losses train end to end only
        return [3] * params["epochs_phase3"]
    return [1] * params["epochs_phase1"] + [2] * params["epochs_phase2"] + [3] * params["epochs_phase3"]


def vertex_rows(n_vertices: int, count: int, seed: int) -> torch.Tensor:
    """Flattened coordinate rows of a fixed, seeded vertex subsample (all vertices if count is 0)."""
    if count <= 0 or count >= n_vertices:
        verts = np.arange(n_vertices)
    else:
        verts = np.sort(np.random.default_rng([seed, 7]).choice(n_vertices, count, replace=False))
    return torch.from_numpy((verts[:, None] * 3 + np.arange(3)[None, :]).reshape(-1).astype(np.int64))


class ShapeTargets(nn.Module):
    """Ground-truth shapes s̄ + A_id α_id + A_exp α_exp on the loss rows, computed on the fly."""

    def __init__(self, model: MorphableModel, rows: torch.Tensor) -> None:
        super().__init__()
        r = rows.numpy()
        self.register_buffer("mean", torch.from_numpy(model.mean[r].astype(np.float32)))
        self.register_buffer("id_basis", torch.from_numpy(model.id_basis[r].astype(np.float32)))
        self.register_buffer("exp_basis", torch.from_numpy(model.exp_basis[r].astype(np.float32)))

    def forward(self, alpha_id: torch.Tensor, alpha_exp: torch.Tensor) -> torch.Tensor:
        return self.mean + alpha_id @ self.id_basis.t() + alpha_exp @ self.exp_basis.t()


class StepModule(nn.Module):
    """Loss of one batch for a given phase (one module, so DDP sees a single forward)."""

    def __init__(
        self,
        net: MorphNet,
        targets: ShapeTargets,
        norm: dict[str, torch.Tensor],
        rows: torch.Tensor,
        params: dict,
        genova: GenovaLosses | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.targets = targets
        self.params = params
        self.genova = genova
        # the loopback's random poses: a generator of its own, seeded, so runs repeat
        self.loopback_rng = torch.Generator().manual_seed(int(params["seed"]))
        for k, v in norm.items():
            self.register_buffer(k, v.float())
        self.register_buffer("rows", rows)

    def forward(
        self, batch: dict, phase: int, lambda_r: float, asoft_lambda: float
    ) -> dict[str, torch.Tensor]:
        p = self.params
        a_id, a_exp = batch["alpha_id"], batch["alpha_exp"]
        t_id = normalise(a_id, self.mid_id, self.half_id)
        t_exp = normalise(a_exp, self.mid_exp, self.half_exp)
        out: dict[str, torch.Tensor] = {}
        if phase == 2:
            _, full = self.net.shapes(t_id, t_exp, self.rows)
            out["recon"] = reconstruction_loss(full, self.targets(a_id, a_exp), p["recon_unit_mm"])
            out["loss"] = out["recon"]
            return out
        c_id, c_exp = self.net.encoder(batch["image"])
        out["coef"] = coefficient_loss(c_id, c_exp, t_id, t_exp)
        loss = out["coef"] if phase == 1 else p["coef_loss_weight_phase3"] * out["coef"]
        objective = p.get("objective", "liu")
        if phase == 3 and objective == "genova":
            # Genova et al. alone: no label enters the loss (coef is logged, not optimised)
            loss = torch.zeros((), dtype=out["coef"].dtype, device=out["coef"].device)
        if phase == 3 and objective != "genova":
            _, full = self.net.shapes(c_id, c_exp, self.rows)
            out["recon"] = reconstruction_loss(full, self.targets(a_id, a_exp), p["recon_unit_mm"])
            w = self.net.classifier.weight
            if p["identification"] == "asoftmax":
                out["id"], logits = asoftmax_loss(c_id, w, batch["label"], p["asoftmax_m"], asoft_lambda)
            else:
                out["id"], logits = softmax_loss(c_id, w, batch["label"])
            out["acc"] = (logits.argmax(1) == batch["label"]).float().mean().detach()
            loss = loss + lambda_r * out["recon"] + out["id"]
        genova_on = phase == 3 and objective != "liu" and self.genova is not None
        bd_weight = p["genova_batch_distribution_weight"] if genova_on else p["batch_dist_weight"]
        if bd_weight > 0:
            # prior units: the 3DMM prior is N(0, std^2), so alpha / std should be N(0, 1) over a batch
            z = torch.cat(
                [
                    denormalise(c_id, self.mid_id, self.half_id) / self.std_id,
                    denormalise(c_exp, self.mid_exp, self.half_exp) / self.std_exp,
                ],
                dim=1,
            )
            out["batch_distribution"] = batch_distribution_loss(z)
            loss = loss + bd_weight * out["batch_distribution"]
        if genova_on:
            assert self.genova is not None
            alpha_id = denormalise(c_id, self.mid_id, self.half_id)
            alpha_exp = denormalise(c_exp, self.mid_exp, self.half_exp)
            vertices = self.genova.shapes(alpha_id, alpha_exp)
            colours = self.genova.input_colours(batch["image"], batch["landmarks"], vertices.detach())
            if p["genova_loopback_weight"] > 0:
                out["loopback"] = self.genova.loopback(
                    self.net.encoder, vertices, colours, (c_id, c_exp), self.loopback_rng
                )
                loss = loss + p["genova_loopback_weight"] * out["loopback"]
            if p["genova_identity_weight"] > 0:
                out["multiview_identity"] = self.genova.multiview_identity(
                    vertices, colours, batch["image"], batch["landmarks"]
                )
                loss = loss + p["genova_identity_weight"] * out["multiview_identity"]
        out["loss"] = loss
        return out


def _trainable(net: MorphNet, phase: int) -> dict[str, list[nn.Parameter]]:
    enc = list(net.encoder.parameters())
    dec = list(net.decoder_id.parameters()) + list(net.decoder_exp.parameters())
    if phase == 1:
        return {"encoder": enc}
    if phase == 2:
        return {"decoder": dec}
    return {"encoder": enc, "classifier": list(net.classifier.parameters()), "decoder": dec}


def _group_lr(group: str, phase: int, params: dict) -> float:
    if group == "decoder":
        return params["lr_decoder"]
    if group == "classifier":
        # a new layer whose logits need weights of order 1: at the encoder's rate it would take
        # thousands of steps before L_C carries any signal
        return params["lr_classifier"] if params["lr_classifier"] is not None else 10 * params["lr"]
    if phase == 3:
        if params["lr_phase3"] is not None:
            return params["lr_phase3"]
        if params.get("objective") == "genova":
            # Genova's losses alone skip Phase I: Phase III trains the encoder from its random
            # start, so it takes the rate Phase I trains the same encoder with from scratch
            return params["lr"]
        # Phase III fine-tunes the trained encoder; a fresh optimiser at the Phase I rate knocks it
        # off its Phase I solution
        return params["lr"] / 10
    return params["lr"]


def build_optimizer(
    net: MorphNet, phase: int, params: dict
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    groups = _trainable(net, phase)
    for p in net.parameters():
        p.requires_grad_(False)
    param_groups = []
    for name, ps in groups.items():
        for p in ps:
            p.requires_grad_(True)
        is_dec = name == "decoder"
        param_groups.append(
            {
                "params": ps,
                "lr": _group_lr(name, phase, params),
                # the decoders start as the 3DMM; decay would pull them away from it for no reason
                "weight_decay": 0.0 if is_dec else params["weight_decay"],
            }
        )
    if params["optimizer"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(param_groups, momentum=params["momentum"], foreach=True)
    else:
        opt = torch.optim.Adam(param_groups, foreach=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=params["lr_step_epochs"], gamma=params["lr_gamma"])
    return opt, sched


@dataclass
class TrainState:
    """What the loop carries from step to step and epoch to epoch (saved in every checkpoint)."""

    lambda_r: float  # weight of the reconstruction loss in Phase III
    switched: bool = False  # λ_R has switched to lambda_r_final (it switches once)
    best_loss: float | None = None  # best Phase III epoch loss so far (plateau detection)
    bad_epochs: int = 0  # Phase III epochs since best_loss improved
    step: int = 0  # optimiser steps taken
    id_steps: int = 0  # Phase III steps (A-Softmax λ annealing)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def update_lambda_r(state: TrainState, epoch_loss: float, phase3_epochs_done: int, params: dict) -> None:
    """Plateau detection on the Phase III epoch loss; switches λ_R once, to lambda_r_final."""
    if state.lambda_r == params["lambda_r_final"] and state.switched:
        return
    if params["lambda_r_switch_epoch"] is not None:
        if phase3_epochs_done >= params["lambda_r_switch_epoch"]:
            state.lambda_r, state.switched = params["lambda_r_final"], True
        return
    best = state.best_loss
    if best is None or epoch_loss < best * (1.0 - params["plateau_min_delta"]):
        state.best_loss, state.bad_epochs = float(epoch_loss), 0
    else:
        state.bad_epochs += 1
    if state.bad_epochs >= params["plateau_patience"]:
        state.lambda_r, state.switched = params["lambda_r_final"], True


def _device(params: dict) -> torch.device:
    if params["device"] == "cuda" or (params["device"] == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("stages.train.device: cuda requested but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _maybe_init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def _truncate_metrics(path: Path, before_epoch: int) -> None:
    """On resume, drop records of epochs that the checkpoint does not contain (re-run ones)."""
    keep = [r for r in _read_metrics(path) if r.get("epoch", 0) < before_epoch]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _loader(ds: TrainsetStream, params: dict, device: torch.device) -> DataLoader:
    nw = params["num_workers"]
    return DataLoader(
        ds,
        batch_size=params["batch_size"],
        num_workers=nw,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # workers are re-forked each epoch so they see set_epoch()
        prefetch_factor=2 if nw else None,
    )


def _show_progress(params: dict) -> bool:
    mode = params["progress"]
    return mode == "always" or (mode == "auto" and sys.stderr.isatty())


@torch.no_grad()
def evaluate_split(step: StepModule, ds: TrainsetStream, params: dict, device: torch.device) -> dict:
    """Coefficient MSE (normalised units) and full-shape RMSE (mm, on the loss rows) over a split."""
    net = step.net
    net.eval()
    n, coef_sum, sq_sum, count = 0, 0.0, 0.0, 0
    for batch in _loader(ds, params, device):
        batch = _to_device(batch, device)
        c_id, c_exp = net.encoder(batch["image"])
        t_id = normalise(batch["alpha_id"], step.mid_id, step.half_id)
        t_exp = normalise(batch["alpha_exp"], step.mid_exp, step.half_exp)
        b = batch["label"].shape[0]
        coef_sum += float(coefficient_loss(c_id, c_exp, t_id, t_exp)) * b
        _, full = net.shapes(c_id, c_exp, step.rows)
        err = full - step.targets(batch["alpha_id"], batch["alpha_exp"])
        sq_sum += float(err.pow(2).sum())
        count += err.numel()
        n += b
    net.train()
    if not n:
        return {}
    return {"coef": coef_sum / n, "shape_rmse_mm": math.sqrt(sq_sum / max(count, 1)), "images": n}


def train(
    run_root: str,
    params: dict,
    model: MorphableModel,
    out_dir: str | Path,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    storage_options: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    identity_weights: str | Path | None = None,
) -> TrainResult:
    """Train on ``run_root``'s committed export shards; write checkpoints/metrics/export to ``out_dir``.

    ``params`` are validated ``stages.train`` parameters (see :mod:`pipeline.train.config`).
    ``identity_weights``: the frozen face network (dlib's ``.dat``, sha256 verified by the caller)
    the genova objectives' multi-view identity loss needs.
    ``stop_after_epoch`` ends this invocation after that many completed epochs (for time-sliced
    runs; ``resume=True`` continues). Returns where things were written and the epoch records.
    """
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    info = scan_trainset(run_root, storage_options)
    if info.model_sha256 != model.sha256:
        raise ValueError(
            f"{run_root}/export: trainset was built with morphable model {info.model_name!r} "
            f"(sha256 {info.model_sha256[:12]}…), but the resolved model {model.name!r} has sha256 "
            f"{model.sha256[:12]}…; use the same model as the export stage"
        )
    if (info.k_id, info.k_exp) != (model.k_id, model.k_exp):
        raise ValueError(f"{run_root}/export: k_id/k_exp {info.k_id}/{info.k_exp} differ from the model's")
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    # PReLU nets drift into denormal floats, which slow x86 CPUs down several-fold as training goes
    # on; flushing them to zero changes no result that matters and keeps steps at a steady speed
    # (reset to torch's default when train() returns)
    torch.set_flush_denormal(True)
    device = _device(params)
    rank, world = _maybe_init_distributed(device)
    use_amp = bool(params["amp"]) and device.type == "cuda"
    if params["amp"] and not use_amp:
        log.warning("stages.train.amp: mixed precision needs CUDA; training in float32 on %s", device)

    resumed = ckpt_io.latest_checkpoint(ckpt_dir) if resume else None
    if resumed is not None:
        ckpt_path, ck = resumed
        if ck["model_sha256"] != model.sha256:
            raise ValueError(
                f"{ckpt_path}: checkpoint was trained with another morphable model (sha256 differs)"
            )
        for k in ARCHITECTURE_KEYS:
            if ck["config"][k] != params[k]:
                raise ValueError(
                    f"{ckpt_path}: checkpoint has {k}={ck['config'][k]}, the config says {params[k]}; "
                    "resume with the checkpoint's architecture or start a new --out"
                )
        norm_np = {k: v.numpy().astype(np.float64) for k, v in ck["norm"].items()}
        rows = ck["vertex_rows"]
        num_classes = int(ck["num_classes"])
        if info.num_classes > num_classes:
            raise ValueError(
                f"{ckpt_path}: trainset now has {info.num_classes} labels, checkpoint {num_classes}"
            )
        log.info("resuming from %s (epoch %d done)", ckpt_path, ck["epoch"])
    else:
        ck = None
        if resume:
            log.info("no checkpoint in %s; starting from scratch", ckpt_dir)
        torch.manual_seed(params["seed"])
        norm_np = compute_norm_stats(info, params["target_norm"])
        rows = vertex_rows(model.n_vertices, params["recon_vertices"], params["seed"])
        num_classes = info.num_classes

    net = MorphNet(
        model.k_id,
        model.k_exp,
        model.n_vertices,
        num_classes,
        params["width_multiplier"],
        params["embedding_dim"],
    )
    if ck is not None:
        net.load_state_dict(ck["model"])
        torch.set_rng_state(ck["rng"])
    else:
        init_decoders_from_model(net, model, norm_np)
    norm_t = {k: torch.from_numpy(v) for k, v in norm_np.items()}
    buffers = {k: norm_t[k] for k in ("mid_id", "half_id", "mid_exp", "half_exp")}
    buffers["std_id"] = torch.from_numpy(model.id_std.astype(np.float64))
    buffers["std_exp"] = torch.from_numpy(model.exp_std.astype(np.float64))
    genova = None
    if params.get("objective", "liu") != "liu":
        if identity_weights is None:
            raise ValueError(
                f"stages.train.objective {params['objective']!r} needs the face network's weights"
            )
        from pipeline.embed.resnet_torch import load as load_identity_net

        genova = GenovaLosses(model, load_identity_net(identity_weights), GenovaSettings.from_params(params))
    step = StepModule(net, ShapeTargets(model, rows), buffers, rows, params, genova).to(device)
    runner: nn.Module = step
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(step, find_unused_parameters=True)

    schedule = phase_schedule(params)
    start = int(ck["epoch"]) if ck is not None else 0
    state = TrainState.from_dict(ck["state"]) if ck is not None else TrainState(params["lambda_r_initial"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(params, indent=1, sort_keys=True), encoding="utf-8")
        if ck is not None:
            _truncate_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()

    train_ds = TrainsetStream(
        info,
        "train",
        params["seed"],
        params["shuffle_buffer"],
        True,
        params["flip_augment"],
        landmarks=genova is not None,
    )
    coef_ds = TrainsetStream(info, "train", params["seed"], params["shuffle_buffer"], images=False)
    val_ds = TrainsetStream(info, "val", params["seed"], params["shuffle_buffer"]) if info.n_val else None
    if val_ds is None and rank == 0:
        log.warning(
            "%s/export has no validation rows (%d training subjects): epoch metrics are on training "
            "subjects only; stages.export.val_fraction decides the held-out share",
            info.run_root,
            info.num_classes,
        )
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    opt = sched = None
    records: list[dict] = []
    end = len(schedule) if stop_after_epoch is None else min(len(schedule), stop_after_epoch)
    metrics_f = open(metrics_path, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    try:
        for epoch in range(start, end):
            phase = schedule[epoch]
            new_phase = epoch == 0 or schedule[epoch - 1] != phase
            if opt is None or new_phase:
                opt, sched = build_optimizer(net, phase, params)
                # mid-phase resume: continue the checkpoint's optimiser (only if its phase is this one;
                # a config with other phase lengths starts this phase's optimiser afresh)
                if ck is not None and epoch == start and not new_phase and int(ck["phase"]) == phase:
                    opt.load_state_dict(ck["optimizer"])
                    sched.load_state_dict(ck["scheduler"])
                    if scaler is not None and ck.get("scaler"):
                        scaler.load_state_dict(ck["scaler"])
            ds = coef_ds if phase == 2 else train_ds
            ds.set_epoch(epoch)
            rec = _run_epoch(
                runner, step, opt, ds, params, device, epoch, phase, state, scaler, metrics_f, len(schedule)
            )
            sched.step()
            if phase == 3:
                done3 = sum(1 for p in schedule[: epoch + 1] if p == 3)
                update_lambda_r(state, rec["loss"], done3, params)
            if val_ds is not None and phase != 2:
                val_ds.set_epoch(epoch)
                rec["val"] = evaluate_split(step, val_ds, params, device)
            rec["lambda_r_next"] = state.lambda_r
            records.append(rec)
            if rank == 0:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                _save_checkpoint(
                    ckpt_dir,
                    epoch + 1,
                    phase,
                    net,
                    opt,
                    sched,
                    scaler,
                    state,
                    norm_t,
                    rows,
                    num_classes,
                    params,
                    model,
                )
                ckpt_io.prune(ckpt_dir, params["keep_checkpoints"])
            if on_epoch is not None:
                on_epoch(rec)
            log.info(
                "epoch %d/%d phase %s: loss %.4g%s",
                epoch + 1,
                len(schedule),
                PHASE_NAMES[phase],
                rec["loss"],
                f", val shape RMSE {rec['val']['shape_rmse_mm']:.3g} mm" if rec.get("val") else "",
            )
    finally:
        if metrics_f is not None:
            metrics_f.close()
        torch.set_flush_denormal(False)  # torch's default; do not leak the setting to the caller

    completed = max(end, start)
    export_dir = None
    if completed >= len(schedule) and rank == 0:
        from pipeline.train.inference import export_encoder

        export_dir = out / "export"
        export_encoder(net, export_dir, params, norm_np, model, completed, torchscript=params["torchscript"])
    return TrainResult(out, completed, len(schedule), metrics_path, export_dir, records)


def _run_epoch(
    runner: nn.Module,
    step: StepModule,
    opt: torch.optim.Optimizer,
    ds: TrainsetStream,
    params: dict,
    device: torch.device,
    epoch: int,
    phase: int,
    state: TrainState,
    scaler: torch.amp.GradScaler | None,
    metrics_f: object,
    total_epochs: int,
) -> dict:
    from tqdm import tqdm

    step.train()
    sums: dict[str, float] = {}
    n_images, t0 = 0, time.perf_counter()
    bar = tqdm(
        total=len(ds),
        unit="img",
        desc=f"epoch {epoch + 1}/{total_epochs} phase {PHASE_NAMES[phase]}",
        disable=not _show_progress(params),
        leave=False,
    )
    for batch in _loader(ds, params, device):
        batch = _to_device(batch, device)
        # A-Softmax anneals over the identification head's own iterations (Phase III steps)
        lam = asoftmax_lambda(state.id_steps, params["asoftmax_lambda_min"])
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
            losses = runner(batch, phase, state.lambda_r, lam)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.step(opt)
            scaler.update()
        else:
            losses["loss"].backward()
            opt.step()
        b = int(batch["label"].shape[0])
        vals = {k: float(v.detach()) for k, v in losses.items()}
        if not math.isfinite(vals["loss"]):
            raise FloatingPointError(
                f"epoch {epoch + 1} step {state.step}: loss is {vals['loss']}; lower stages.train.lr"
            )
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v * b
        n_images += b
        state.step += 1
        if phase == 3:
            state.id_steps += 1
        if metrics_f is not None:
            rec = {"kind": "step", "epoch": epoch, "phase": phase, "step": state.step, "batch": b}
            rec.update(vals)
            rec.update({"lambda_r": state.lambda_r, "lr": opt.param_groups[0]["lr"]})
            metrics_f.write(json.dumps(rec) + "\n")
        bar.update(b)
        bar.set_postfix(loss=f"{vals['loss']:.4g}")
    bar.close()
    secs = time.perf_counter() - t0
    if not n_images:
        raise ValueError(f"epoch {epoch + 1}: the training split yielded no decodable rows")
    rec = {"kind": "epoch", "epoch": epoch, "phase": phase, "images": n_images, "seconds": round(secs, 3)}
    rec.update({k: v / n_images for k, v in sums.items()})
    rec["images_per_s"] = round(n_images / secs, 2) if secs > 0 else None
    rec["lambda_r"] = state.lambda_r
    rec["lr"] = opt.param_groups[0]["lr"]
    return rec


def _save_checkpoint(
    ckpt_dir: Path,
    epoch: int,
    phase: int,
    net: MorphNet,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    norm_t: dict[str, torch.Tensor],
    rows: torch.Tensor,
    num_classes: int,
    params: dict,
    model: MorphableModel,
) -> None:
    ckpt_io.save_atomic(
        {
            "format": ckpt_io.CHECKPOINT_FORMAT,
            "epoch": epoch,
            "phase": phase,
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": state.to_dict(),
            "norm": norm_t,
            "vertex_rows": rows,
            "num_classes": num_classes,
            "config": dict(params),
            "model_sha256": model.sha256,
            "model_name": model.name,
            "rng": torch.get_rng_state(),
        },
        ckpt_io.checkpoint_path(ckpt_dir, epoch),
    )


def resolve_model(manifest: Manifest) -> MorphableModel:
    """The manifest's morphable model (verified by sha256 in :mod:`pipeline.models.assets`)."""
    try:
        from pipeline.models.assets import resolve_morphable_model
    except ModuleNotFoundError as exc:
        if exc.name != "pipeline.models.assets":
            raise
        raise ValueError(
            "morphset train: pipeline.models.assets is missing; cannot resolve the morphable model"
        ) from None
    return resolve_morphable_model(manifest)


__all__ = [
    "TrainResult",
    "TrainsetInfo",
    "train",
    "phase_schedule",
    "update_lambda_r",
    "vertex_rows",
    "resolve_model",
]
