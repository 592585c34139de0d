"""MTCNN (Zhang et al. 2016) in torch: P-Net, R-Net and O-Net with the ``mtcnn`` 1.0.0 weights,
batched over a list of images, on CPU or CUDA.

The networks are the package's definitions layer for layer (keras kernels transposed to torch's
layout; the fully connected layers see the package's width-major flatten). The cascade follows
the package's arithmetic so that both give the same faces (tests/test_detect_torch.py): the
(x - 127.5) / 128 input, exact area resampling per pyramid scale (cv2/TensorFlow ``area``), box
generation on P-Net's 2-pixel grid with 12-pixel cells, its non-maximum suppression (a box is
dropped when it overlaps any higher-scored box of its image by more than the threshold), squared
boxes, bilinear crops with zero outside the image (TensorFlow's ``crop_and_resize``), and the
box and landmark regressions. Two differences: the pyramid has every scale at which the
smallest face of ``min_face_size`` pixels spans P-Net's 12-pixel cell (the package computes the
count as if ``min_face_size`` were 20, so other values give empty pyramids there), and all images
of a list go through each P-Net scale, each R-Net and each O-Net as one call.

Output rows as the package's ``output_type="numpy"``: ``[image, x0, y0, x1, y1, score, lx0..lx4,
ly0..ly4]`` in the pixels of the (top-left aligned, zero-padded) input list.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.core.devices import torch_device
from pipeline.core.stage import Asset, ConfigView
from pipeline.detect.base import FaceDetector

CELL, STRIDE = 12, 2
NMS_PNET_SCALE, NMS_PNET, NMS_RNET, NMS_ONET = 0.5, 0.7, 0.7, 0.7
MAX_PATCHES = 4096  # per R-Net / O-Net call (memory bound; results do not depend on it)


def _wh_flatten(x: torch.Tensor) -> torch.Tensor:
    """Keras ``Permute((2, 1, 3))`` + ``Flatten`` on NHWC, from NCHW: (width, height, channel) order."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)  # keras "same"
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x), F.softmax(self.conv4_2(x), dim=1)[:, 1]


class RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.fc5_1, self.fc5_2 = nn.Linear(128, 4), nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)  # "same" on 22 px
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu4(self.fc4(_wh_flatten(self.prelu3(self.conv3(x)))))
        return self.fc5_1(x), F.softmax(self.fc5_2(x), dim=1)[:, 1]


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.fc6_1, self.fc6_2, self.fc6_3 = nn.Linear(256, 4), nn.Linear(256, 10), nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)  # "same" on 46 px
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.fc5(_wh_flatten(self.prelu4(self.conv4(x)))))
        return self.fc6_1(x), self.fc6_2(x), F.softmax(self.fc6_3(x), dim=1)[:, 1]


def load_net(net: nn.Module, arrays: list[np.ndarray]) -> nn.Module:
    """Keras weights in ``get_weights`` order into ``net`` (conv kernels HWIO -> OIHW, dense IO ->
    OI, PReLU alphas flattened)."""
    params = list(net.parameters())  # registration order = the keras layer order
    if len(params) != len(arrays):
        raise ValueError(f"{type(net).__name__}: {len(arrays)} weight arrays for {len(params)} parameters")
    with torch.no_grad():
        for p, a in zip(params, arrays, strict=True):
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            if t.ndim == 4:
                t = t.permute(3, 2, 0, 1)
            elif t.ndim == 2:
                t = t.t()
            else:
                t = t.reshape(-1)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{type(net).__name__}: weight of shape {tuple(a.shape)} for a {tuple(p.shape)} parameter"
                )
            p.copy_(t)
    return net.eval()


# --- resampling --------------------------------------------------------------------------------
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of exact area resampling: output pixel i averages input interval
    [i s, (i + 1) s) with s = n_in / n_out, partial pixels weighted by their overlap."""
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    hi = lo + s
    px = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None)
    return (overlap / s).astype(np.float32)


def crop_and_resize(images: torch.Tensor, boxes: np.ndarray, index: np.ndarray, size: int) -> torch.Tensor:
    """TensorFlow's ``crop_and_resize`` (bilinear, 0 outside) of ``boxes`` (x0 y0 x1 y1 pixels) from
    NCHW ``images``; the box corners map to the first and last samples of a ``size`` grid."""
    _, _, H, W = images.shape
    dev = images.device
    b = torch.as_tensor(boxes, dtype=torch.float32, device=dev)
    t = torch.arange(size, dtype=torch.float32, device=dev) / (size - 1)
    # the package normalises by H and W, TensorFlow scales back by H - 1 and W - 1
    y = (b[:, 1:2] / H + t * (b[:, 3:4] - b[:, 1:2]) / H) * (H - 1)  # (N, size)
    x = (b[:, 0:1] / W + t * (b[:, 2:3] - b[:, 0:1]) / W) * (W - 1)
    vy = (y >= 0) & (y <= H - 1)
    vx = (x >= 0) & (x <= W - 1)
    y0f, x0f = torch.floor(y), torch.floor(x)
    dy, dx = y - y0f, x - x0f
    y0 = y0f.clamp(0, H - 1).long()
    y1 = torch.ceil(y).clamp(0, H - 1).long()
    x0 = x0f.clamp(0, W - 1).long()
    x1 = torch.ceil(x).clamp(0, W - 1).long()
    hwc = images.permute(0, 2, 3, 1)  # a view: gathering (image, y, x) copies only the samples
    k = torch.as_tensor(index, dtype=torch.long, device=dev)[:, None, None]

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:  # (N, C, size, size)
        return hwc[k, yy[:, :, None], xx[:, None, :]].permute(0, 3, 1, 2)

    a00, a01, a10, a11 = at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1)  # each corner gathered once
    top = a00 + (a01 - a00) * dx[:, None, None, :]
    bottom = a10 + (a11 - a10) * dx[:, None, None, :]
    out = top + (bottom - top) * dy[:, None, :, None]
    valid = (vy[:, :, None] & vx[:, None, :])[:, None]
    return torch.where(valid, out, torch.zeros((), device=dev))


# --- boxes -----------------------------------------------------------------------------------
def iou_matrix(boxes: np.ndarray, method: str = "union") -> np.ndarray:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = np.maximum(
        0, np.minimum(boxes[None, :, 2], boxes[:, None, 2]) - np.maximum(boxes[None, :, 0], boxes[:, None, 0])
    )
    h = np.maximum(
        0, np.minimum(boxes[None, :, 3], boxes[:, None, 3]) - np.maximum(boxes[None, :, 1], boxes[:, None, 1])
    )
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "union":
            return inter / (area[:, None] + area[None, :] - inter)
        return inter / np.minimum(area[:, None], area[None, :])


def sort_by_score(rows: np.ndarray) -> np.ndarray:
    return rows[np.argsort(rows[:, 5])[::-1]]


def nms(rows: np.ndarray, threshold: float, method: str = "union", presorted: bool = False) -> np.ndarray:
    """Per image: drop every box that overlaps a higher-scored box by more than ``threshold``."""
    if not len(rows):
        return rows
    if not presorted:
        rows = sort_by_score(rows)
    kept = []
    for image in np.unique(rows[:, 0]):
        r = rows[rows[:, 0] == image]
        over = np.triu(iou_matrix(r[:, 1:5], method) > threshold, k=1)
        kept.append(r[~over.any(axis=0)])
    return np.concatenate(kept)


def square(rows: np.ndarray) -> np.ndarray:
    rows = rows.copy()
    w, h = rows[:, 3] - rows[:, 1], rows[:, 4] - rows[:, 2]
    side = np.maximum(w, h)
    rows[:, 1] += 0.5 * (w - side)
    rows[:, 2] += 0.5 * (h - side)
    rows[:, 3] = rows[:, 1] + side
    rows[:, 4] = rows[:, 2] + side
    return rows


def regress(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    rows = rows.copy()
    w = rows[:, 3] - rows[:, 1] + 1
    h = rows[:, 4] - rows[:, 2] + 1
    rows[:, 1:5] += offsets * np.stack([w, h, w, h], axis=1)
    return rows


def pyramid(min_side: int, min_face_size: float, scale_factor: float) -> list[float]:
    """Scales at which faces of ``min_face_size`` and up fill P-Net's 12-pixel cell, while the
    scaled image still holds one cell."""
    m = CELL / float(min_face_size)
    n = (
        int(math.floor(math.log(CELL / (min_side * m)) / math.log(scale_factor) + 1e-9)) + 1
        if min_side * m >= CELL
        else 0
    )
    return [m * scale_factor**k for k in range(max(n, 0))]


class TorchMTCNN(FaceDetector):
    """The three networks on one device; ``detect`` runs the cascade on a list of images."""

    def raw(self, images: list[np.ndarray], params: dict) -> np.ndarray:
        t_p, t_r, t_o = params["thresholds"]
        return self.detect(
            images, float(params["min_face_size"]), float(params["scale_factor"]), (t_p, t_r, t_o)
        )

    def __init__(
        self, weights: dict[str, list[np.ndarray]], device: str = "cpu", pnet_runtime: str = "torch"
    ) -> None:
        """``pnet_runtime``: ``onnxruntime`` runs P-Net in ONNX Runtime (CPU only; see
        :mod:`pipeline.detect.onnx_pnet`), ``torch`` in torch."""
        self.device = torch.device(device)
        self.pnet = load_net(PNet(), weights["pnet"]).to(self.device)
        self.rnet = load_net(RNet(), weights["rnet"]).to(self.device)
        self.onet = load_net(ONet(), weights["onet"]).to(self.device)
        self._area: dict[tuple[int, int], torch.Tensor] = {}
        self.pnet_runtime = "torch"
        self._pnet_forward = self.pnet
        if pnet_runtime == "onnxruntime":
            if self.device.type != "cpu":
                raise ValueError(f"pnet_runtime onnxruntime runs on a CPU, not on {device}")
            from pipeline.detect.onnx_pnet import OnnxPNet

            self._pnet_forward = OnnxPNet(self.pnet, torch.get_num_threads())
            self.pnet_runtime = "onnxruntime"
        elif pnet_runtime != "torch":
            raise ValueError(f"pnet_runtime: expected torch or onnxruntime, got {pnet_runtime!r}")

    def _area_t(self, n_in: int, n_out: int) -> torch.Tensor:
        key = (n_in, n_out)
        if key not in self._area:
            self._area[key] = torch.from_numpy(area_matrix(n_in, n_out)).to(self.device)
        return self._area[key]

    @torch.inference_mode()
    def detect(
        self,
        images: list[np.ndarray],
        min_face_size: float = 20,
        scale_factor: float = 0.709,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
    ) -> np.ndarray:
        """(n, 16) rows for RGB images (H, W, 3) of 0-255 values (any float or uint8 dtype)."""
        if not images:
            return np.zeros((0, 16))
        H = max(im.shape[0] for im in images)
        W = max(im.shape[1] for im in images)
        batch = np.zeros((len(images), H, W, 3), np.float32)  # top-left aligned, zero padded
        for i, im in enumerate(images):
            batch[i, : im.shape[0], : im.shape[1]] = im
        batch = (batch - 127.5) / 128.0
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
        # the largest member's pyramid (as the package), on the padded list
        biggest = max(min(im.shape[0], im.shape[1]) for im in images)
        rows = self._pnet(x, batch, pyramid(biggest, min_face_size, scale_factor), thresholds[0])
        if not len(rows):
            return np.zeros((0, 16))
        rows = self._rnet(x, square(rows), thresholds[1])
        if not len(rows):
            return np.zeros((0, 16))
        return self._onet(x, square(rows), thresholds[2])

    def _resized(self, x: torch.Tensor, batch: np.ndarray, h: int, w: int) -> torch.Tensor:
        """The list at (h, w) by exact area resampling: OpenCV's on a CPU (sparse, ~10x faster
        than the dense form there), two matrix products on a GPU; the same values."""
        if self.device.type == "cpu":
            small = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in batch])
            return torch.from_numpy(small).permute(0, 3, 1, 2)
        _, _, H, W = x.shape
        return torch.matmul(torch.matmul(self._area_t(H, h), x), self._area_t(W, w).t())

    def _pnet(self, x: torch.Tensor, batch: np.ndarray, scales: list[float], threshold: float) -> np.ndarray:
        _, _, H, W = x.shape
        found = []
        for s in scales:
            h, w = int(H * s), int(W * s)
            if min(h, w) < CELL:
                continue
            xs = self._resized(x, batch, h, w)
            reg, prob = self._pnet_forward(xs)
            prob = prob.cpu().numpy()
            b, r, c = np.nonzero(prob > threshold)
            if not len(b):
                continue
            off = reg.permute(0, 2, 3, 1).cpu().numpy()[b, r, c]
            x0, y0 = c * STRIDE + 1.0, r * STRIDE + 1.0
            x1, y1 = c * STRIDE + float(CELL), r * STRIDE + float(CELL)
            size = CELL - 1.0
            boxes = np.stack(
                [x0 + off[:, 0] * size, y0 + off[:, 1] * size, x1 + off[:, 2] * size, y1 + off[:, 3] * size],
                1,
            )
            scale_rows = np.concatenate([b[:, None], boxes / s, prob[b, r, c][:, None]], axis=1)
            found.append(nms(scale_rows, NMS_PNET_SCALE))
        if not found:
            return np.zeros((0, 6))
        return nms(np.concatenate(found), NMS_PNET)

    def _patches(self, x: torch.Tensor, rows: np.ndarray, size: int, net: nn.Module) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = []
        for k in range(0, len(rows), MAX_PATCHES):
            part = rows[k : k + MAX_PATCHES]
            crops = crop_and_resize(x, part[:, 1:5], part[:, 0].astype(np.int64), size)
            outs.append([o.cpu().numpy().astype(np.float64) for o in net(crops)])
        return [np.concatenate(col) for col in zip(*outs, strict=True)]

    def _rnet(self, x: torch.Tensor, rows: np.ndarray, threshold: float) -> np.ndarray:
        off, prob = self._patches(x, rows, 24, self.rnet)
        rows = rows.copy()
        rows[:, 5] = prob
        rows = regress(rows, off)
        return nms(rows[rows[:, 5] > threshold], NMS_RNET)

    def _onet(self, x: torch.Tensor, rows: np.ndarray, threshold: float) -> np.ndarray:
        off, lm, prob = self._patches(x, rows, 48, self.onet)
        w = rows[:, 3:4] - rows[:, 1:2] + 1
        h = rows[:, 4:5] - rows[:, 2:3] + 1
        points = np.concatenate([w * lm[:, :5] + rows[:, 1:2] - 1, h * lm[:, 5:] + rows[:, 2:3] - 1], axis=1)
        rows = rows.copy()
        rows[:, 5] = prob
        rows = np.concatenate([regress(rows, off), points], axis=1)
        return nms(rows[rows[:, 5] > threshold], NMS_ONET, method="min")


# --- the backend's entry points (pipeline/detect/stage.py looks them up by name) ---------------
def resources(params: dict) -> dict[str, float]:
    return {"GPU": 1} if params["device"] != "cpu" else {}


def resolve_assets(config: ConfigView) -> dict[str, Asset]:
    from pipeline.detect.weights import weights_npz

    path, sha = weights_npz(config.model("mtcnn"), config.cache_dir)
    return {"weights": Asset(str(path), sha, f"MTCNN (torch) weights from mtcnn 1.0.0: {path}")}


def pnet_runtime(setting: str, device: str) -> str:
    """``stages.detect.pnet_runtime``: auto = ONNX Runtime for P-Net on a CPU when the ``onnx``
    extra is installed (1.7x faster there, same faces), else torch; onnxruntime without the extra
    is an error that says what to install."""
    from pipeline.detect.onnx_pnet import available

    if setting == "torch" or device != "cpu":
        return "torch"
    if setting == "onnxruntime" and not available():
        raise ImportError(
            "stages.detect.pnet_runtime: onnxruntime needs the onnx extra (pip install 'morphset[onnx]')"
        )
    return "onnxruntime" if available() else "torch"


def _where(params: dict) -> tuple[str, str]:
    device = torch_device(str(params["device"]), "stages.detect.device")
    return device, pnet_runtime(str(params.get("pnet_runtime", "torch")), device)


def create(params: dict, weights: Asset | None) -> FaceDetector:
    from pipeline.detect.weights import load_npz

    if weights is None:
        raise ValueError("the torch MTCNN needs its verified weights (resolve_assets)")
    device, runtime = _where(params)
    return TorchMTCNN(load_npz(weights.recheck()), device, runtime)


def cache_key(params: dict) -> tuple:
    return _where(params)
