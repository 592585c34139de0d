"""Backend ``fan``: face-alignment 1.5.0's 2DFAN4 network run on the MTCNN boxes.

We use the library's network class (``face_alignment.models.FAN``) and its checkpoint format (a
plain state dict read with ``torch.load(weights_only=True)``), but not ``FaceAlignment`` itself:
its constructor always builds a face detector (SFD downloads its own weights), it resolves the
checkpoint by downloading, and it batches only the faces of one image. Cropping and heatmap
decoding are done here in floating point (the library rounds crop corners and output points to
whole pixels), with the library's crop geometry (box centre moved up by 0.12 box heights, crop
side 200 * (w + h) / 195). No numba code is used, so there is nothing to warm up.

Weights: ``models.fan.file`` if set, else ``$TORCH_HOME/hub/checkpoints/2DFAN4-11f355bf06.pth.tar``.
If missing and ``stages.landmarks.download`` is on, it is downloaded from ``models.fan.source``
into a temporary file next to the target and renamed only after the hash check, so nothing partial
is ever left behind. The sha256 is checked against ``models.fan.sha256`` when given, else against
the hash prefix in the file name (torch hub's convention).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from pipeline.landmarks.base import (
    N_POINTS,
    LandmarkBackend,
    LandmarkResult,
    WeightsError,
    check_box,
    verify_sha256,
)

MODEL_KEY = "fan"
FAN_URL = "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar"
FAN_FILENAME = FAN_URL.rsplit("/", 1)[1]
HASH_RE = re.compile(r"-([a-f0-9]{6,})\.")
NETWORK_SIZE = 4  # 2DFAN-4: four stacked hourglasses
CROP = 256  # network input side
HEATMAP = 64  # heatmap side (CROP / 4)
REFERENCE_SCALE = 195.0  # face_alignment's detector reference scale
SCALE_FACTOR = 200.0  # crop side = SCALE_FACTOR * scale
CENTER_Y_OFFSET = 0.12  # box centre moved up by this fraction of the box height


def hub_checkpoint_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _alternative() -> str:
    return "or use the offline dlib backend: --set stages.landmarks.backend=dlib (CLI shorthand --landmarks dlib)"


def _download(url: str, target: Path, expected: str | None, prefix_ok: bool, timeout: float) -> None:
    """Download to a temporary file beside ``target``; rename after the hash check; clean up always."""
    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    ok = False
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            shutil.copyfileobj(resp, out, length=1 << 20)
        if tmp.stat().st_size == 0:
            raise WeightsError(f"models.{MODEL_KEY}: download from {url} returned 0 bytes")
        verify_sha256(tmp, expected, f"models.{MODEL_KEY} (downloaded from {url})", prefix_ok)
        os.replace(tmp, target)
        ok = True
    finally:
        if tmp.exists():
            tmp.unlink()
        if not ok:
            for d in created:  # deepest first: leave the cache tree as it was
                try:
                    d.rmdir()
                except OSError:
                    break


def resolve_checkpoint(model: dict, params: dict) -> tuple[Path, str]:
    """Path and verified sha256 of the 2DFAN4 checkpoint, downloading it if allowed.

    Raises :class:`WeightsError` naming the file, where to put it and the dlib alternative.
    """
    expected = model.get("sha256")
    if model.get("file"):
        path = Path(str(model["file"])).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"models.{MODEL_KEY}.file: FAN checkpoint {path} not found; put {FAN_FILENAME} there "
                f"(download: {model.get('source') or FAN_URL}), {_alternative()}"
            )
        if expected:
            return path, verify_sha256(path, expected, f"models.{MODEL_KEY}.file")
        named = HASH_RE.search(path.name)  # torch hub convention: name-<sha256 prefix>.ext
        return path, verify_sha256(path, named.group(1) if named else None, f"models.{MODEL_KEY}.file", True)
    path = hub_checkpoint_dir() / FAN_FILENAME
    m = HASH_RE.search(FAN_FILENAME)
    check, prefix_ok = (expected, False) if expected else ((m.group(1) if m else None), True)
    if not path.is_file():
        source = str(model.get("source") or FAN_URL)
        url = source if re.match(r"^(https?|file)://", source) and source.endswith(".pth.tar") else FAN_URL
        why = "downloading is disabled (stages.landmarks.download=false)"
        if params.get("download", True):
            try:
                _download(url, path, check, prefix_ok, float(params.get("download_timeout_s", 30)))
            except WeightsError:
                raise
            except (OSError, ValueError) as exc:
                why = f"download from {url} failed ({type(exc).__name__}: {exc})"
            else:
                return path, verify_sha256(path, check, f"models.{MODEL_KEY}", prefix_ok)
        raise WeightsError(
            f"FAN landmark weights {FAN_FILENAME} not found in {path.parent} and {why}. "
            f"Fetch {url} on a machine with internet access and copy it to {path} "
            f"(or set models.{MODEL_KEY}.file in the manifest to its path), {_alternative()}"
        )
    return path, verify_sha256(path, check, f"models.{MODEL_KEY} ({path})", prefix_ok)


# --- pure geometry ----------------------------------------------------------------------------
def crop_matrix(box: np.ndarray) -> np.ndarray:
    """(2, 3) image->crop matrix of face_alignment's crop for a box x0 y0 x1 y1."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0 - (y1 - y0) * CENTER_Y_OFFSET
    side = SCALE_FACTOR * ((x1 - x0) + (y1 - y0)) / REFERENCE_SCALE
    k = CROP / side
    return np.array([[k, 0.0, CROP * 0.5 - k * cx], [0.0, k, CROP * 0.5 - k * cy]])


def decode_heatmaps(hm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (B, 68, H, W) -> peak positions (B, 68, 2) x/y in heatmap pixels and peak values.

    The argmax is refined by a quarter pixel towards the higher neighbour (as FAN's authors do).
    """
    b, c, h, w = hm.shape
    flat = hm.reshape(b, c, h * w)
    idx = flat.argmax(axis=-1)
    peak = np.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
    ys, xs = np.divmod(idx, w)
    pts = np.stack([xs, ys], axis=-1).astype(np.float64)
    inner = (xs > 0) & (xs < w - 1) & (ys > 0) & (ys < h - 1)
    bi, ci = np.nonzero(inner)
    if len(bi):
        x, y = xs[bi, ci], ys[bi, ci]
        m = hm[bi, ci]
        dx = m[np.arange(len(bi)), y, x + 1] - m[np.arange(len(bi)), y, x - 1]
        dy = m[np.arange(len(bi)), y + 1, x] - m[np.arange(len(bi)), y - 1, x]
        pts[bi, ci, 0] += 0.25 * np.sign(dx)
        pts[bi, ci, 1] += 0.25 * np.sign(dy)
    return pts, peak.astype(np.float32)


def heatmap_to_image(points_hm: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Heatmap pixel coordinates (68, 2) -> image pixels through the inverse crop matrix.

    Heatmap pixel j covers crop pixels 4j .. 4j+3, whose centre is at 4j + 1.5.
    """
    scale = CROP / HEATMAP
    u = np.asarray(points_hm, dtype=np.float64) * scale + (scale - 1) / 2.0
    inv = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    return u @ inv[:, :2].T + inv[:, 2]


class FanBackend(LandmarkBackend):
    name = "fan"

    def __init__(self, path: Path, sha256: str, batch_size: int = 16, flip_input: bool = False) -> None:
        import face_alignment
        import torch
        from face_alignment.models import FAN

        self.version = str(face_alignment.__version__)
        self.weights_sha256 = sha256
        self.batch_size = max(1, int(batch_size))
        self.flip_input = bool(flip_input)
        self._torch = torch
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            net = FAN(NETWORK_SIZE)
            net.load_state_dict(state)
        except (
            RuntimeError,
            KeyError,
            TypeError,
            ValueError,
            OSError,
            EOFError,
            pickle.UnpicklingError,
        ) as exc:
            msg = str(exc).splitlines()[0][:300]
            raise WeightsError(
                f"models.{MODEL_KEY}: {path} is not a 2DFAN-4 state dict ({type(exc).__name__}: {msg})"
            ) from None
        self._net = net.eval()

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        from face_alignment.utils import flip

        with torch.inference_mode():
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
            out = self._net(x)
            hm = out[-1] if isinstance(out, list | tuple) else out
            if self.flip_input:
                fo = self._net(flip(x))
                fo = fo[-1] if isinstance(fo, list | tuple) else fo
                hm = (hm + flip(fo, is_label=True)) / 2.0
            return hm.float().numpy()

    def predict(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[LandmarkResult]:
        out: list[LandmarkResult] = ["not run"] * len(items)
        crops, mats, where = [], [], []
        for i, (image, box) in enumerate(items):
            try:
                h, w = image.shape[:2]
                m = crop_matrix(check_box(box, w, h))
                crops.append(
                    cv2.warpAffine(image, m, (CROP, CROP), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
                )
                mats.append(m)
                where.append(i)
            except (ValueError, cv2.error) as exc:
                out[i] = f"{type(exc).__name__}: {exc}"
        for s in range(0, len(crops), self.batch_size):
            chunk = np.stack(crops[s : s + self.batch_size])
            try:
                hm = self._forward(chunk)
            except RuntimeError as exc:
                for i in where[s : s + self.batch_size]:
                    out[i] = f"RuntimeError: {exc}"
                continue
            pts_hm, conf = decode_heatmaps(hm)
            for j in range(hm.shape[0]):
                pts = heatmap_to_image(pts_hm[j], mats[s + j]).astype(np.float32)
                out[where[s + j]] = (pts.reshape(N_POINTS, 2), conf[j])
        return out


# --- the backend's entry points (pipeline/landmarks/stage.py looks them up by name) -------------
USES_GPU = True  # a build gives its tasks the worker resource GPU=1 (FAN runs on CUDA there)


def resolve_weights(model: dict, params: dict) -> tuple[Path, str]:
    return resolve_checkpoint(model, params)


def create(path: str, sha256: str, params: dict) -> LandmarkBackend:
    if params.get("torch_threads"):
        import torch

        torch.set_num_threads(int(params["torch_threads"]))
    return FanBackend(Path(path), sha256, params["batch_size"], params["flip_input"])


def cache_key(params: dict) -> tuple:
    """What, besides the weights, makes a per-process instance different."""
    return (int(params["batch_size"]), bool(params["flip_input"]))
