"""MTCNN's weights from the ``mtcnn`` 1.0.0 wheel, read without running any pickled code.

The wheel ships them as joblib pickles (``mtcnn/assets/weights/{p,r,o}net.lz4``: an LZ4 frame
around a pickled list of float32 arrays). Each file's sha256 is checked against the manifest
(``models.mtcnn.members``) first; then a restricted unpickler admits only joblib's array wrapper,
``numpy.ndarray`` and ``numpy.dtype`` (anything else, and any object-dtype array, is refused), and
the arrays are cached as one ``.npz`` (read back with ``allow_pickle=False``) whose sha256 the
conversion records beside it and every use checks. The package is
located without importing it (its ``__init__`` imports TensorFlow).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import pickle
from pathlib import Path

import numpy as np

from pipeline.storage.atomic import atomic_write
from pipeline.storage.hashing import sha256_file

log = logging.getLogger(__name__)

NETS = ("pnet", "rnet", "onet")
MEMBER = "mtcnn/assets/weights/{}.lz4"
MODEL_KEY = "mtcnn"
# the weights of each network as the arrays' order in the pickle (keras get_weights order)
SHAPES = {
    "pnet": 13,
    "rnet": 16,
    "onet": 21,
}


class MtcnnWeightsError(FileNotFoundError):
    """The MTCNN weight files are missing, altered, or not plain arrays."""


_ALLOWED = {
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _restricted_load(data: bytes, what: str) -> list[np.ndarray]:
    from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler

    class Restricted(NumpyUnpickler):
        dispatch = NumpyUnpickler.dispatch.copy()

        def find_class(self, module: str, name: str) -> object:
            if (module, name) not in _ALLOWED:
                raise pickle.UnpicklingError(f"{what}: refusing to load {module}.{name} (only plain arrays)")
            return super().find_class(module, name)

        def load_build(self) -> None:
            state, obj = self.stack[-1], self.stack[-2]
            if isinstance(obj, NumpyArrayWrapper):
                dtype = state.get("dtype") if isinstance(state, dict) else None
                if not isinstance(dtype, np.dtype) or dtype.hasobject:
                    raise pickle.UnpicklingError(f"{what}: an array of dtype {dtype!r} (only plain numbers)")
            NumpyUnpickler.load_build(self)

        dispatch[pickle.BUILD[0]] = load_build

    value = Restricted(what, io.BytesIO(data), ensure_native_byte_order=True).load()
    if not isinstance(value, list) or not all(isinstance(a, np.ndarray) for a in value):
        raise MtcnnWeightsError(f"{what}: expected a list of arrays, got {type(value).__name__}")
    return value


def package_dir() -> Path:
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise MtcnnWeightsError(
            "the mtcnn package (1.0.0, for its weights) is not installed: pip install mtcnn==1.0.0"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_weights(model: dict) -> dict[str, list[np.ndarray]]:
    """The three networks' arrays, each file verified against ``models.mtcnn.members``."""
    import lz4.frame

    members = model.get("members") or {}
    root = package_dir().parent
    out = {}
    for net in NETS:
        member = MEMBER.format(net)
        want = members.get(member)
        if not want:
            raise MtcnnWeightsError(f"models.{MODEL_KEY}.members: no sha256 for {member}")
        path = root / member
        if not path.is_file():
            raise MtcnnWeightsError(f"models.{MODEL_KEY}: {path} not found (mtcnn==1.0.0 installed?)")
        got = sha256_file(path)
        if got != want:
            raise MtcnnWeightsError(f"models.{MODEL_KEY}: {path} has sha256 {got}, the manifest says {want}")
        arrays = _restricted_load(lz4.frame.decompress(path.read_bytes()), str(path))
        if len(arrays) != SHAPES[net]:
            raise MtcnnWeightsError(f"{path}: {len(arrays)} arrays, expected {SHAPES[net]}")
        out[net] = arrays
    return out


def weights_npz(model: dict, cache_dir: Path) -> tuple[Path, str]:
    """The verified weights converted once into ``<cache_dir>/mtcnn-<hash>.npz``; (path, sha256).

    The conversion records the ``.npz``'s own sha256 beside it (``…npz.sha256``), written after the
    file: the cache is trusted only while it still hashes to what the conversion wrote from the
    verified wheel members. An altered, truncated or unrecorded cache is converted again (with a
    warning naming it), never used."""
    members = model.get("members") or {}
    key = "-".join(members.get(MEMBER.format(n), "none")[:8] for n in NETS)
    path = Path(cache_dir) / f"mtcnn-{key}.npz"
    record = path.with_name(path.name + ".sha256")
    if path.is_file():
        want = record.read_text(encoding="ascii", errors="replace").strip() if record.is_file() else None
        got = sha256_file(path)
        if got == want:
            return path, got
        log.warning(
            "%s: %s; converting the MTCNN weights again from the verified wheel",
            path,
            "no recorded sha256" if want is None else f"sha256 {got[:12]}… is not the recorded {want[:12]}…",
        )
    arrays = read_weights(model)
    buf = io.BytesIO()
    np.savez(buf, **{f"{net}_{i:02d}": a for net, arrs in arrays.items() for i, a in enumerate(arrs)})
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write(record, (digest + "\n").encode())
    return path, digest


def load_npz(path: str | Path) -> dict[str, list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        return {net: [z[f"{net}_{i:02d}"] for i in range(SHAPES[net])] for net in NETS}
