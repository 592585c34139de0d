"""Liu et al. (CVPR 2018) encoder-decoder: SphereFace-20 encoder, c_Id / c_Res heads, linear decoders.

The encoder maps a 112x96 RGB crop (pixels in [-1, 1], NCHW) to the identity latent c_Id (k_id)
and the residual latent c_Res (k_exp), both in the normalised [-1, 1] target space. The decoders
are single FC layers to 3n vertex coordinates in mm; :func:`init_decoders_from_model` sets them to
the morphable model's bases (composed with the de-normalisation), so for given coefficients the
network's shape is the 3DMM shape exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pipeline.models.morphable_model import MorphableModel

INPUT_HW = (112, 96)
BASE_CHANNELS = (64, 128, 256, 512)
UNITS_PER_STAGE = (1, 2, 4, 1)  # 4 stride-2 convs + 2*(1+2+4+1) residual convs = 20 layers


def stage_channels(width_multiplier: float) -> tuple[int, ...]:
    """Channels per stage; at least 8 so the tiny encoder keeps a usable PReLU trunk."""
    return tuple(max(8, int(round(c * width_multiplier))) for c in BASE_CHANNELS)


class _Residual(nn.Module):
    """SphereFace residual unit: two 3x3 convs with PReLU, identity shortcut, no batch norm."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, 1, 1)
        self.act1 = nn.PReLU(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1)
        self.act2 = nn.PReLU(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act2(self.conv2(self.act1(self.conv1(x))))


class SphereFace20(nn.Module):
    """The 20-layer SphereFace trunk (Liu et al. 2017) with a width multiplier, then FC -> embedding."""

    def __init__(self, width_multiplier: float = 1.0, embedding_dim: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout, units in zip(stage_channels(width_multiplier), UNITS_PER_STAGE, strict=True):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.PReLU(cout)]
            layers += [_Residual(cout) for _ in range(units)]
            cin = cout
        self.features = nn.Sequential(*layers)
        h, w = INPUT_HW
        for _ in BASE_CHANNELS:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.fc = nn.Linear(cin * h * w, embedding_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier as in the SphereFace prototxt; biases zero
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class Encoder(nn.Module):
    """Trunk + two parallel FC heads; returns (c_id, c_res) in normalised target units."""

    def __init__(
        self, k_id: int, k_exp: int, width_multiplier: float = 1.0, embedding_dim: int = 512
    ) -> None:
        super().__init__()
        self.trunk = SphereFace20(width_multiplier, embedding_dim)
        self.head_id = nn.Linear(embedding_dim, k_id)
        self.head_exp = nn.Linear(embedding_dim, k_exp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk(x)
        return self.head_id(f), self.head_exp(f)


class ShapeDecoder(nn.Module):
    """One FC layer k -> 3n (mm), evaluable on a subset of output rows for cheap losses."""

    def __init__(self, k: int, n3: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n3, k))
        self.bias = nn.Parameter(torch.zeros(n3))

    def forward(self, c: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return torch.nn.functional.linear(c, self.weight, self.bias)
        return torch.nn.functional.linear(
            c, self.weight.index_select(0, rows), self.bias.index_select(0, rows)
        )


class MorphNet(nn.Module):
    """Encoder + decoders + identification classifier; ``mean_shape`` is the model mean (mm, flat)."""

    def __init__(
        self,
        k_id: int,
        k_exp: int,
        n_vertices: int,
        num_classes: int,
        width_multiplier: float = 1.0,
        embedding_dim: int = 512,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(k_id, k_exp, width_multiplier, embedding_dim)
        self.decoder_id = ShapeDecoder(k_id, 3 * n_vertices)
        self.decoder_exp = ShapeDecoder(k_exp, 3 * n_vertices)
        # classifier weights without bias: A-Softmax needs the bias-free form, softmax is fine with it
        self.classifier = nn.Linear(k_id, max(1, num_classes), bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.register_buffer("mean_shape", torch.zeros(3 * n_vertices))

    def shapes(
        self, c_id: torch.Tensor, c_exp: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(identity shape s̄ + Δs_Id, full shape s̄ + Δs_Id + Δs_Res), flat mm, optionally on ``rows``."""
        mean = self.mean_shape if rows is None else self.mean_shape.index_select(0, rows)
        ident = mean + self.decoder_id(c_id, rows)
        return ident, ident + self.decoder_exp(c_exp, rows)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)


class ExportedEncoder(nn.Module):
    """What the TorchScript export traces: image -> (c_id, c_exp, identity shape, full shape)."""

    def __init__(self, net: MorphNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c_id, c_exp = self.net.encoder(x)
        ident, full = self.net.shapes(c_id, c_exp)
        return c_id, c_exp, ident, full


def init_decoders_from_model(net: MorphNet, model: MorphableModel, norm: dict[str, np.ndarray]) -> None:
    """Set the decoders to the model's bases composed with the target de-normalisation.

    With alpha = c * half + mid (``half``/``mid`` from the [-1,1] normalisation of the train split),
    A @ alpha = (A * half) @ c + A @ mid, so weight = A * half and bias = A @ mid make
    s̄ + D_id(c_id) + D_exp(c_exp) equal the 3DMM shape for the corresponding coefficients.
    """
    with torch.no_grad():
        for dec, basis, key in (
            (net.decoder_id, model.id_basis, "id"),
            (net.decoder_exp, model.exp_basis, "exp"),
        ):
            a = basis.astype(np.float64)
            half = np.asarray(norm[f"half_{key}"], dtype=np.float64)
            mid = np.asarray(norm[f"mid_{key}"], dtype=np.float64)
            dec.weight.copy_(torch.from_numpy(a * half[None, :]).float())
            dec.bias.copy_(torch.from_numpy(a @ mid).float())
        net.mean_shape.copy_(torch.from_numpy(model.mean.astype(np.float32)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_flops(width_multiplier: float, embedding_dim: int = 512) -> int:
    """Multiply-accumulates of one encoder forward pass (for the benchmark's context)."""
    h, w = INPUT_HW
    cin, macs = 3, 0
    for cout, units in zip(stage_channels(width_multiplier), UNITS_PER_STAGE, strict=True):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        macs += h * w * cout * cin * 9 + units * 2 * h * w * cout * cout * 9
        cin = cout
    return macs + cin * h * w * embedding_dim
