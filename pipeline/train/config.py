"""The trainer's configuration: ``stages.train`` of the manifest, merged in a fixed order.

Precedence, lowest first: the defaults in ``schemas/manifest/stage.train.schema.json`` < the
manifest's ``stages.train`` < ``--tiny`` (:data:`TINY`) < ``--config FILE.yaml`` (a flat mapping of
train keys) < ``--set stages.train.KEY=VALUE`` < the command's own flags (``--epochs``). The result
is validated against the schema; errors name the source and key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.manifest import Manifest, ManifestError, validate

# The CPU demo configuration (used by `make demo`): a quarter-width encoder, a vertex subsample for
# the reconstruction loss, and a few epochs per phase; ~240 images train in a few minutes on 2 cores.
TINY: dict[str, Any] = {
    "width_multiplier": 0.25,
    "embedding_dim": 128,
    "batch_size": 32,
    "epochs_phase1": 4,
    "epochs_phase2": 1,
    "epochs_phase3": 4,
    "lr": 0.001,
    "lr_step_epochs": 3,
    "lr_gamma": 0.3,
    "recon_vertices": 2000,
    "shuffle_buffer": 512,
    "plateau_patience": 1,
    "keep_checkpoints": 2,
}

ARCHITECTURE_KEYS = ("width_multiplier", "embedding_dim")


def validate_params(params: dict, manifest: Manifest | None = None, source: str = "train config") -> dict:
    """Fill the schema defaults into ``params`` and validate them as ``stages.train``."""
    base = copy.deepcopy(manifest.data) if manifest is not None else None
    if base is None:
        from pipeline.config.manifest import load_manifest

        base = copy.deepcopy(load_manifest().data)
    base.setdefault("stages", {})["train"] = copy.deepcopy(params)
    validate(base, source)
    return Manifest(base).stage_params("train")


def read_config_file(path: str | Path) -> dict:
    """A YAML mapping of train keys (flat, or nested as stages: {train: ...})."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: train config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ManifestError(f"{p}: not valid YAML ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("stages"), dict) and "train" in data["stages"]:
        data = data["stages"]["train"]
    if not isinstance(data, dict):
        raise ManifestError(f"{p}: expected a mapping of stages.train keys, got {type(data).__name__}")
    return data


def parse_epochs(text: str) -> dict[str, int]:
    """``--epochs N`` (every phase) or ``--epochs I,II,III``."""
    try:
        parts = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise ManifestError(f"--epochs {text!r}: expected N or I,II,III (integers)") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 0:
        raise ManifestError(f"--epochs {text!r}: expected N or I,II,III (non-negative integers)")
    return {f"epochs_phase{i + 1}": n for i, n in enumerate(parts)}


def resolve_params(
    manifest: Manifest,
    tiny: bool = False,
    config_file: str | Path | None = None,
    set_values: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> dict:
    """The effective, validated ``stages.train`` parameters (see the module docstring for order)."""
    params = copy.deepcopy(manifest.data.get("stages", {}).get("train", {}))
    sources = [manifest.path]
    if tiny:
        params.update(TINY)
        sources.append("--tiny")
    if config_file:
        params.update(read_config_file(config_file))
        sources.append(str(config_file))
    for key, value in (set_values or {}).items():
        if key.startswith("stages.train."):
            params[key[len("stages.train.") :]] = value
    params.update(flags or {})
    return validate_params(params, manifest, " + ".join(sources) + " + command line")
