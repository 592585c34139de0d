"""The one choice of a torch device for a stage setting (``stages.<stage>.device``)."""

from __future__ import annotations


def torch_device(setting: str, key: str = "device") -> str:
    """auto = CUDA when this process sees a GPU, else CPU; cuda without one is an error naming ``key``."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key}: cuda, but this process sees no CUDA device")
    return setting
