"""Backend ``dlib-resnet-torch`` (the default): dlib's face network in torch, batched, CPU or CUDA.

The same ``.dat`` as ``dlib-resnet`` (``models.dlib_embedding``, sha256 checked against the
manifest on the driver and re-checked once per worker) is read by our own parser
(:mod:`pipeline.embed.dlib_format`, no pickle) into :class:`pipeline.embed.resnet_torch.DlibFaceResnet`.
Faces are aligned by dlib's ``get_face_chip`` exactly as for ``dlib-resnet``, so the two backends
give the same embeddings up to float rounding (cosine >= 0.999 per face is tested; measured
0.9999999) and the identity thresholds of docs/identity.md hold for both. On one CPU thread it
is ~15x faster than dlib's one-face-at-a-time network (docs/BENCHMARKS.md).

There is no converted-weights cache: reading the verified ``.dat`` takes ~0.3 s once per worker,
so no second file exists that could be altered behind the first one's hash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.devices import torch_device
from pipeline.embed.dlib_resnet import MODEL_KEY, ChipEmbeddingBackend, import_dlib, resolve_model

__all__ = ["MODEL_KEY", "Backend", "TorchResnetBackend", "resolve_model"]


class TorchResnetBackend(ChipEmbeddingBackend):
    name = "dlib-resnet-torch"
    dim = 128

    def __init__(self, path: Path, sha256: str, params: dict | None = None) -> None:
        import torch

        from pipeline.embed.resnet_torch import load

        self._dlib = import_dlib()
        self.version = f"torch {torch.__version__}"
        self.weights_sha256 = sha256
        self.device = torch_device(str((params or {}).get("device", "auto")), "stages.embed.device")
        # channels-last convolutions are ~25 % faster on a CPU (oneDNN); the same numbers
        self._memory_format = torch.channels_last
        net = load(path).to(self.device)
        self._net = net.to(memory_format=self._memory_format)

    def embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        import torch

        batch = torch.from_numpy(np.stack(chips)).to(self.device)
        x = batch.permute(0, 3, 1, 2).float().contiguous(memory_format=self._memory_format)
        with torch.inference_mode():
            return self._net(x).cpu().numpy().astype(np.float32)


Backend = TorchResnetBackend
