"""Export of the trained encoder, and the interface evaluation codes against.

``<out>/export/`` holds ``encoder.pt`` (a state_dict of tensors: encoder, decoders, mean shape),
``encoder.json`` (architecture, normalisation statistics, model name/sha256, and the sha256 of
``encoder.pt``, verified on load) and optionally ``encoder.torchscript.pt`` (traced
image -> (c_id, c_exp, identity shape, full shape) for consumers without morphset).

``load_encoder(path).embed(crops)`` takes (N, 112, 96, 3) uint8 RGB crops as in the trainset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.models.morphable_model import MorphableModel, sha256_file
from pipeline.storage.atomic import atomic_write
from pipeline.train.checkpoint import load_checkpoint, save_atomic
from pipeline.train.data import to_input_tensor
from pipeline.train.network import ExportedEncoder, MorphNet

EXPORT_FORMAT = 1
STATE_FILE = "encoder.pt"
CONFIG_FILE = "encoder.json"
TORCHSCRIPT_FILE = "encoder.torchscript.pt"


def export_encoder(
    net: MorphNet,
    export_dir: str | Path,
    params: dict,
    norm: dict[str, np.ndarray],
    model: MorphableModel,
    epochs: int,
    torchscript: bool = True,
) -> Path:
    """Write the state_dict (without the identification classifier) + JSON config (+ TorchScript)."""
    d = Path(export_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith("classifier.")
    }
    save_atomic(state, d / STATE_FILE)
    cfg = {
        "format": EXPORT_FORMAT,
        "k_id": model.k_id,
        "k_exp": model.k_exp,
        "n_vertices": model.n_vertices,
        "width_multiplier": params["width_multiplier"],
        "embedding_dim": params["embedding_dim"],
        "input": {"height": 112, "width": 96, "channels": "RGB", "pixels": "x / 127.5 - 1", "layout": "NCHW"},
        "norm": {k: [float(x) for x in np.asarray(v)] for k, v in norm.items()},
        "model_name": model.name,
        "model_sha256": model.sha256,
        "epochs": epochs,
        "identification": params["identification"],
        "objective": params.get("objective", "liu"),
        "state_sha256": sha256_file(d / STATE_FILE),
    }
    if torchscript:
        wrapper = ExportedEncoder(net).cpu().eval()
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, torch.zeros(1, 3, 112, 96), check_trace=False)
        atomic_write(d / TORCHSCRIPT_FILE, lambda f: torch.jit.save(traced, f))
        cfg["torchscript_sha256"] = sha256_file(d / TORCHSCRIPT_FILE)
    atomic_write(d / CONFIG_FILE, json.dumps(cfg, indent=1))
    return d


class TrainedEncoder:
    """A trained encoder + decoders for evaluation (CPU unless ``device`` says otherwise)."""

    def __init__(self, net: MorphNet, config: dict, device: str = "cpu", batch_size: int = 64) -> None:
        self.net = net.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.batch_size = batch_size
        n = config["norm"]
        self._mid_id = np.asarray(n["mid_id"], np.float64)
        self._half_id = np.asarray(n["half_id"], np.float64)
        self._mid_exp = np.asarray(n["mid_exp"], np.float64)
        self._half_exp = np.asarray(n["half_exp"], np.float64)

    @property
    def k_id(self) -> int:
        return int(self.config["k_id"])

    @property
    def k_exp(self) -> int:
        return int(self.config["k_exp"])

    @property
    def model_sha256(self) -> str:
        return str(self.config["model_sha256"])

    @torch.no_grad()
    def _latents(self, crops_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = to_input_tensor(crops_uint8)
        ids, exps = [], []
        for i in range(0, x.shape[0], self.batch_size):
            c_id, c_exp = self.net.encoder(x[i : i + self.batch_size].to(self.device))
            ids.append(c_id.cpu().numpy())
            exps.append(c_exp.cpu().numpy())
        if not ids:
            return np.zeros((0, self.k_id), np.float32), np.zeros((0, self.k_exp), np.float32)
        return np.concatenate(ids), np.concatenate(exps)

    def embed(self, crops_uint8: np.ndarray) -> dict[str, np.ndarray]:
        """``c_id`` (N, k_id) raw identity features (for verification; compare with cosine),
        ``c_exp`` (N, k_exp), and ``alpha_id`` / ``alpha_exp`` de-normalised to model basis units."""
        c_id, c_exp = self._latents(crops_uint8)
        return {
            "c_id": c_id.astype(np.float32),
            "c_exp": c_exp.astype(np.float32),
            "alpha_id": (c_id * self._half_id + self._mid_id).astype(np.float32),
            "alpha_exp": (c_exp * self._half_exp + self._mid_exp).astype(np.float32),
        }

    @torch.no_grad()
    def reconstruct(self, crops_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(identity shape s̄ + Δs_Id, full shape s̄ + Δs_Id + Δs_Res), each (N, n, 3) float32 mm."""
        c_id, c_exp = self._latents(crops_uint8)
        n = int(self.config["n_vertices"])
        idents, fulls = [], []
        for i in range(0, c_id.shape[0], self.batch_size):
            ident, full = self.net.shapes(
                torch.from_numpy(c_id[i : i + self.batch_size]).to(self.device),
                torch.from_numpy(c_exp[i : i + self.batch_size]).to(self.device),
            )
            idents.append(ident.cpu().numpy().reshape(-1, n, 3))
            fulls.append(full.cpu().numpy().reshape(-1, n, 3))
        if not idents:
            empty = np.zeros((0, n, 3), np.float32)
            return empty, empty.copy()
        return np.concatenate(idents), np.concatenate(fulls)


def _config_path(path: Path) -> Path:
    if path.is_dir():
        for cand in (path / CONFIG_FILE, path / "export" / CONFIG_FILE):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (expected a `morphset train` export directory)")
    if path.name == STATE_FILE:
        return path.with_name(CONFIG_FILE)
    return path


def _from_checkpoint(path: Path, device: str) -> TrainedEncoder:
    """A per-epoch training checkpoint (``checkpoints/epoch-NNNN.pt``), e.g. to evaluate mid-run."""
    ck = load_checkpoint(path)
    state = {k: v for k, v in ck["model"].items() if not k.startswith("classifier.")}
    n3, k_id = state["decoder_id.weight"].shape
    k_exp = state["decoder_exp.weight"].shape[1]
    cfg = {
        "format": EXPORT_FORMAT,
        "k_id": int(k_id),
        "k_exp": int(k_exp),
        "n_vertices": int(n3) // 3,
        "width_multiplier": ck["config"]["width_multiplier"],
        "embedding_dim": ck["config"]["embedding_dim"],
        "norm": {k: [float(x) for x in v.tolist()] for k, v in ck["norm"].items()},
        "model_name": ck.get("model_name", ""),
        "model_sha256": ck["model_sha256"],
        "epochs": ck["epoch"],
        "identification": ck["config"]["identification"],
    }
    net = MorphNet(
        cfg["k_id"], cfg["k_exp"], cfg["n_vertices"], 1, cfg["width_multiplier"], cfg["embedding_dim"]
    )
    net.load_state_dict(state, strict=False)
    return TrainedEncoder(net, cfg, device)


def load_encoder(path: str | Path, device: str = "cpu") -> TrainedEncoder:
    """Load an export (its directory, ``encoder.json``, ``encoder.pt``, or the train output dir),
    or a per-epoch checkpoint ``checkpoints/epoch-NNNN.pt``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt" and p.name != STATE_FILE:
        return _from_checkpoint(p, device)
    cfg_path = _config_path(p)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: encoder config not found")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    need = (
        "format",
        "k_id",
        "k_exp",
        "n_vertices",
        "width_multiplier",
        "embedding_dim",
        "norm",
        "state_sha256",
    )
    missing = [k for k in need if k not in cfg]
    if missing or cfg.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{cfg_path}: not a morphset encoder export v{EXPORT_FORMAT} (missing {missing})")
    state_path = cfg_path.with_name(STATE_FILE)
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: encoder weights not found")
    digest = sha256_file(state_path)
    if digest != cfg["state_sha256"]:
        raise ValueError(
            f"{state_path}: sha256 {digest[:12]}… does not match {cfg_path} ({cfg['state_sha256'][:12]}…)"
        )
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    net = MorphNet(
        int(cfg["k_id"]),
        int(cfg["k_exp"]),
        int(cfg["n_vertices"]),
        1,
        float(cfg["width_multiplier"]),
        int(cfg["embedding_dim"]),
    )
    missing_keys, unexpected = net.load_state_dict(state, strict=False)
    bad = [k for k in missing_keys if not k.startswith("classifier.")] + list(unexpected)
    if bad:
        raise ValueError(f"{state_path}: weights do not match {cfg_path}'s architecture ({bad[:5]})")
    return TrainedEncoder(net, cfg, device)
