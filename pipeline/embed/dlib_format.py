"""Reading the parameters of a dlib DNN file (``.dat``, as written by ``dlib::serialize(net)``).

Pure parsing, no pickle and no dlib: the format is dlib's own binary serialization
(``dlib/serialize.h``, ``dlib/cuda/tensor.h``, ``dlib/dnn/{core,layers,loss,input}.h``):

- integers: one control byte (low nibble = byte count, bit 7 = negative) then that many
  little-endian bytes; floats: an integer mantissa and an integer exponent (m * 2**e);
  strings: an integer length then the bytes; booleans: the ASCII characters ``'0'`` / ``'1'``;
- tensors: version 2, four integer dimensions (n, k, nr, nc), then n*k*nr*nc little-endian
  float32; alias tensors: version 1 and four dimensions (views into a layer's ``params``);
- a network: the loss layer's details, then every wrapper's version from the top down (one
  integer for each ``add_layer``, ``add_tag_layer`` and ``add_skip_layer``), then each
  computational layer's details bottom-up (input first), each followed by its ``add_layer``
  bookkeeping (three booleans and two or three tensors that a saved net leaves empty).

:func:`read_network` returns the computational layers in data-flow order with their
hyperparameters and arrays; the topology (which ``tag`` a ``skip`` or ``add_prev`` refers to)
is not in the file and belongs to the module that rebuilds the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    """The file is not a dlib network of the kind expected; the message names the offset."""


@dataclass
class Layer:
    """One computational layer: its serialized type tag (e.g. ``con_4``) and what it carries."""

    kind: str  # con, affine, fc, relu, max_pool, avg_pool, add_prev, input_rgb_image_sized
    tag: str  # the version string as stored
    values: dict = field(default_factory=dict)  # hyperparameters (ints, floats, bools)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Network:
    loss: str  # the loss layer's tag, e.g. ``loss_metric_2``
    loss_values: dict
    layers: list[Layer]  # data-flow order: the input layer first


class _Reader:
    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: at byte {self.pos}: {what}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"expected {n} more bytes, the file ends at {len(self.data)}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def peek_int(self) -> int | None:
        """The next integer without consuming it, or None where the bytes are not one."""
        save = self.pos
        try:
            return self.int()
        except DlibFormatError:
            return None
        finally:
            self.pos = save

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self.fail(f"control byte {control:#04x} is not an integer's")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        # dlib's float_details marks the special values with these exponents
        specials = {32767: np.inf, 32766: -np.inf, 32765: np.nan}
        if exponent in specials:
            return float(specials[exponent])
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self) -> bool:
        ch = self.take(1)
        if ch not in (b"0", b"1"):
            raise self.fail(f"expected a boolean ('0' or '1'), got {ch!r}")
        return ch == b"1"

    def string(self, limit: int = 256) -> str:
        n = self.int()
        if not 0 <= n <= limit:
            raise self.fail(f"a string of {n} bytes (expected a layer tag of at most {limit})")
        raw = self.take(n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise self.fail(f"a string that is not ASCII: {raw[:32]!r}") from exc

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise self.fail(f"tensor version {version}, expected 2")
        dims = [self.int() for _ in range(4)]
        if any(d < 0 for d in dims):
            raise self.fail(f"negative tensor dimensions {dims}")
        count = int(np.prod(dims, dtype=np.int64))
        raw = self.take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise self.fail(f"alias tensor version {version}, expected 1")
        dims = tuple(self.int() for _ in range(4))
        return dims  # type: ignore[return-value]


def _split(params: np.ndarray, shapes: list[tuple[int, ...]], where: str) -> list[np.ndarray]:
    """Alias tensors are consecutive views into a layer's flat ``params``."""
    flat = params.reshape(-1)
    sizes = [int(np.prod(s)) for s in shapes]
    if sum(sizes) != flat.size:
        raise DlibFormatError(f"{where}: params hold {flat.size} values, its views {sum(sizes)}")
    out, at = [], 0
    for s, n in zip(shapes, sizes, strict=True):
        out.append(flat[at : at + n].reshape(s))
        at += n
    return out


def _con(r: _Reader, tag: str) -> Layer:
    if tag not in ("con_4", "con_5", "con_6"):
        raise r.fail(f"convolution version {tag!r} (con_4..con_6 are read)")
    params = r.tensor()
    v = {"num_filters": r.int(), "nr": r.int(), "nc": r.int(), "stride_y": r.int(), "stride_x": r.int()}
    v["padding_y"], v["padding_x"] = r.int(), r.int()
    filters_shape, biases_shape = r.alias(), r.alias()
    for key in ("lr", "wd", "bias_lr", "bias_wd"):
        v[key] = r.float()
    v["use_bias"] = r.bool() if tag in ("con_5", "con_6") else True
    if tag == "con_6":
        v["use_relu"] = r.bool()
    shapes = [filters_shape] + ([biases_shape] if params.size > np.prod(filters_shape) else [])
    parts = _split(params, shapes, f"{r.name}: {tag}")
    arrays = {"filters": parts[0]}
    if len(parts) > 1:
        arrays["biases"] = parts[1].reshape(-1)
    return Layer("con", tag, v, arrays)


def _affine(r: _Reader, tag: str) -> Layer:
    if tag not in ("affine_", "affine_2"):
        raise r.fail(f"affine version {tag!r} (affine_, affine_2 are read; bn_ layers are not)")
    params = r.tensor()
    gamma_shape, beta_shape = r.alias(), r.alias()
    v = {"mode": r.int()}
    if tag == "affine_2":
        v["disabled"] = r.bool()
    gamma, beta = _split(params, [gamma_shape, beta_shape], f"{r.name}: {tag}")
    return Layer("affine", tag, v, {"gamma": gamma.reshape(-1), "beta": beta.reshape(-1)})


def _fc(r: _Reader, tag: str) -> Layer:
    if tag not in ("fc_2", "fc_3"):
        raise r.fail(f"fully connected version {tag!r} (fc_2, fc_3 are read)")
    v = {"num_outputs": r.int(), "num_inputs": r.int()}
    params = r.tensor()
    weights_shape, biases_shape = r.alias(), r.alias()
    v["bias_mode"] = r.int()
    for key in ("lr", "wd", "bias_lr", "bias_wd"):
        v[key] = r.float()
    if tag == "fc_3":
        v["use_bias"] = r.bool()
    n_weights = int(np.prod(weights_shape))
    shapes = [weights_shape] + ([biases_shape] if params.size > n_weights else [])
    parts = _split(params, shapes, f"{r.name}: {tag}")
    # dlib computes input (n, num_inputs) @ weights (num_inputs, num_outputs)
    arrays = {"weights": parts[0].reshape(v["num_inputs"], v["num_outputs"])}
    if len(parts) > 1:
        arrays["biases"] = parts[1].reshape(-1)
    return Layer("fc", tag, v, arrays)


def _pool(r: _Reader, tag: str) -> Layer:
    kind = tag[: -len("_2")]
    v = {k: r.int() for k in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")}
    return Layer(kind, tag, v)


def _relu(r: _Reader, tag: str) -> Layer:
    return Layer("relu", tag, {"disabled": r.bool()} if tag == "relu_2" else {})


def _add_prev(r: _Reader, tag: str) -> Layer:
    return Layer("add_prev", tag)


def _input_rgb(r: _Reader, tag: str) -> Layer:
    v = {"avg_red": r.float(), "avg_green": r.float(), "avg_blue": r.float()}
    if tag == "input_rgb_image_sized":
        v["nr"], v["nc"] = r.int(), r.int()
    return Layer("input_rgb_image_sized" if "nr" in v else "input_rgb_image", tag, v)


_LAYERS = {
    "con_4": _con,
    "con_5": _con,
    "con_6": _con,
    "affine_": _affine,
    "affine_2": _affine,
    "fc_2": _fc,
    "fc_3": _fc,
    "max_pool_2": _pool,
    "avg_pool_2": _pool,
    "relu_": _relu,
    "relu_2": _relu,
    "add_prev_": _add_prev,
    "input_rgb_image": _input_rgb,
    "input_rgb_image_sized": _input_rgb,
}


def _loss(r: _Reader) -> tuple[str, dict]:
    version = r.int()
    if version != 1:
        raise r.fail(f"loss layer wrapper version {version}, expected 1")
    tag = r.string()
    if tag == "loss_metric_2":
        return tag, {"margin": r.float(), "dist_thresh": r.float()}
    if tag == "loss_metric_":
        return tag, {}
    raise r.fail(f"loss {tag!r} (a metric-learning network, loss_metric_, is read)")


def read_network(path: str | Path) -> Network:
    """The layers of the dlib network in ``path``, in data-flow order (input first)."""
    data = Path(path).read_bytes()
    r = _Reader(data, str(path))
    loss, loss_values = _loss(r)
    # the wrappers' versions, top down, until the input layer's tag begins
    versions = 0
    while True:
        save = r.pos
        try:
            tag = r.string()
        except DlibFormatError:
            tag = ""
        if tag.startswith("input_rgb_image"):
            break
        r.pos = save
        v = r.int()
        if v not in (1, 2, 3):
            raise r.fail(f"a wrapper version {v} before the input layer (expected 1..3)")
        versions += 1
        if versions > 100_000:
            raise r.fail("no input layer found")
    r.pos = save
    layers: list[Layer] = []
    first = True
    while r.pos < len(data):
        tag = r.string()
        reader = _LAYERS.get(tag)
        if reader is None:
            raise r.fail(f"layer {tag!r} is not one this reader knows ({sorted(_LAYERS)})")
        layers.append(reader(r, tag))
        if first:  # the input layer has no add_layer of its own: the first layer above it holds it
            first = False
            continue
        # add_layer's bookkeeping: three flags, then two or three tensors (x_grad, cached_output,
        # params_grad or grad_final; empty in a saved network) and, in the newest bottom wrapper,
        # an expansion factor of 1. A layer tag is a string of at least 5 bytes, so a next
        # integer of 2 (a tensor's version) or 1 (the factor) is never the next layer's tag.
        for _ in range(3):
            r.bool()
        while r.pos < len(data) and r.peek_int() == 2:
            r.tensor()
        if r.pos < len(data) and r.peek_int() == 1:
            r.int()
    if len(layers) < 2:
        raise DlibFormatError(f"{path}: no layers after the input layer")
    return Network(loss, loss_values, layers)
