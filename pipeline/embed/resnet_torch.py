"""dlib's face-recognition ResNet as a torch module, its weights read from dlib's own ``.dat``.

The network (dlib's ``dnn_face_recognition_ex``: a 29-convolution ResNet on a 150x150 RGB chip,
128-d output) is rebuilt from the layers :func:`pipeline.embed.dlib_format.read_network` reads, in
their data-flow order: a stem (conv 7x7/2, affine, relu, max-pool 3x3/2), then residual units
``[conv, affine, relu, conv, affine, (avg_pool 2x2/2), add_prev, relu]`` — the pool marks a
downsampling unit whose shortcut is the unit's input averaged 2x2 — then a global average and a
bias-free fully connected layer. Every hyperparameter (filters, strides, paddings, pool windows,
the input's channel means) comes from the file and is checked, so a file of another layout is
refused rather than misread.

dlib-specific semantics kept exactly:

- a stride-2 convolution has no padding and a stride-1 one pads by half its window;
- ``add_prev`` of tensors of different sizes adds them aligned at the top-left corner into the
  larger shape (the smaller is zero-padded at the bottom, the right and in the extra channels):
  at 8x8 the block gives 3x3 and the pooled shortcut 4x4;
- the input is ``(pixel - channel mean) / 256`` in RGB order;
- an ``affine`` layer (batch norm frozen into a scale and a shift) is folded into the
  convolution before it, which is the same function up to float rounding.

The module is differentiable (losses may use its features) and runs on any torch device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.embed.dlib_format import DlibFormatError, Layer, Network, read_network

CHIP_SIZE = 150


def _fold(con: Layer, affine: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """conv then per-channel affine -> one conv's weight and bias (float32)."""
    w = con.arrays["filters"].astype(np.float64)
    b = con.arrays.get("biases", np.zeros(w.shape[0])).astype(np.float64)
    g = affine.arrays["gamma"].astype(np.float64)
    beta = affine.arrays["beta"].astype(np.float64)
    if g.shape[0] != w.shape[0] or beta.shape[0] != w.shape[0]:
        raise DlibFormatError(f"affine of {g.shape[0]} channels after a conv of {w.shape[0]} filters")
    weight = w * g[:, None, None, None]
    bias = b * g + beta
    return torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))


class _Conv(nn.Module):
    def __init__(self, con: Layer, affine: Layer) -> None:
        super().__init__()
        v = con.values
        if v["nr"] != v["nc"] or v["stride_y"] != v["stride_x"] or v["padding_y"] != v["padding_x"]:
            raise DlibFormatError(f"a non-square convolution {v}")
        weight, bias = _fold(con, affine)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride = int(v["stride_y"])
        self.padding = int(v["padding_y"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def _add_top_left(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum in the larger shape, each operand aligned at the top-left."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class _Unit(nn.Module):
    def __init__(self, layers: list[Layer]) -> None:
        super().__init__()
        con1, aff1, _relu, con2, aff2, *rest = layers
        self.conv1 = _Conv(con1, aff1)
        self.conv2 = _Conv(con2, aff2)
        self.down = rest[0].kind == "avg_pool"
        if self.down:
            p = rest[0].values
            if (p["nr"], p["nc"], p["stride_y"], p["stride_x"], p["padding_y"]) != (2, 2, 2, 2, 0):
                raise DlibFormatError(f"a shortcut pool {p} (expected 2x2, stride 2, no padding)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_top_left(y, shortcut))


class DlibFaceResnet(nn.Module):
    """chips (N, 3, 150, 150) float RGB in 0..255 -> embeddings (N, 128)."""

    def __init__(self, network: Network) -> None:
        super().__init__()
        layers = list(network.layers)
        kinds = [layer.kind for layer in layers]
        stem = ["input_rgb_image_sized", "con", "affine", "relu", "max_pool"]
        if kinds[:5] != stem or kinds[-2:] != ["avg_pool", "fc"]:
            raise DlibFormatError(f"not dlib's face-recognition ResNet: layers {kinds[:5]} ... {kinds[-2:]}")
        inp = layers[0].values
        if (inp["nr"], inp["nc"]) != (CHIP_SIZE, CHIP_SIZE):
            raise DlibFormatError(f"input size {inp['nr']}x{inp['nc']}, expected {CHIP_SIZE}x{CHIP_SIZE}")
        mean = [inp["avg_red"], inp["avg_green"], inp["avg_blue"]]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = _Conv(layers[1], layers[2])
        pool = layers[4].values
        if pool["stride_y"] != pool["stride_x"] or pool["nr"] != pool["nc"] or pool["padding_y"] != 0:
            raise DlibFormatError(f"stem pool {pool}")
        self.pool_size, self.pool_stride = int(pool["nr"]), int(pool["stride_y"])
        units, i, body = [], 5, layers[:-2]
        while i < len(body):
            j = i + 5 + (1 if body[i + 5].kind == "avg_pool" else 0)
            chunk = body[i : j + 2]
            want = ["con", "affine", "relu", "con", "affine"] + (["avg_pool"] if j > i + 5 else [])
            if [layer.kind for layer in chunk] != want + ["add_prev", "relu"]:
                raise DlibFormatError(
                    f"layers {i}..{j + 1}: {[x.kind for x in chunk]} is not a residual unit"
                )
            units.append(_Unit(chunk))
            i = j + 2
        self.units = nn.Sequential(*units)
        gap, fc = layers[-2], layers[-1]
        if (gap.values["nr"], gap.values["nc"]) != (0, 0):
            raise DlibFormatError(f"the last pool {gap.values} is not a global average")
        if "biases" in fc.arrays:
            raise DlibFormatError("the fc layer has a bias (dlib's face network has none)")
        self.fc = nn.Parameter(
            torch.from_numpy(np.ascontiguousarray(fc.arrays["weights"])), requires_grad=False
        )
        self.dim = int(fc.values["num_outputs"])

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = (chips - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), self.pool_size, self.pool_stride)
        x = self.units(x)
        return x.mean(dim=(2, 3)) @ self.fc


def load(path: str | Path) -> DlibFaceResnet:
    """The network of a dlib face-recognition ``.dat`` (the caller has verified its sha256)."""
    return DlibFaceResnet(read_network(path)).eval()
