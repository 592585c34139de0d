"""The one in-memory linear 3D morphable model type: s = mean + id_basis @ a_id + exp_basis @ a_exp.

Conventions (every loader converts into these):
- vertices are flattened interleaved xyz: s[3*v + c];
- units are millimetres; x to the subject's left-to-right in the image, y up, z towards the camera;
- coefficients a_id, a_exp are in basis units; their prior is N(0, diag(std**2));
- the model carries no landmark scheme of its own: ``landmark_maps`` holds a correspondence
  (``correspondence.py``: a vertex or a barycentric point per point) for each scheme it has a
  mapping file for, asked for by scheme (``landmarks_of(IBUG68)``);
- triangles index vertices, wound so normals point out of the face (towards +z at the nose).
Stored by the project as a plain ``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.landmarks.scheme import IBUG68, LandmarkScheme
from pipeline.models.correspondence import Correspondence, CorrespondenceError
from pipeline.storage.atomic import atomic_write
from pipeline.storage.hashing import sha256_file  # noqa: F401  (re-exported)

# 2: the default model's triangles are consistently wound; 3: landmark correspondences per scheme
# (``landmarks__<scheme>__vertices`` / ``__weights``) instead of one iBUG-68 ``landmarks`` array.
# Files of formats 1 and 2 are still read (their ``landmarks`` are iBUG-68 vertex ids); a cached
# conversion of an older format is converted again.
NPZ_FORMAT_VERSION = 3
READABLE_NPZ_FORMATS = (1, 2, 3)
LEGACY_SCHEME = IBUG68.name  # the scheme of the ``landmarks`` array of format 1 and 2 files


class ModelError(ValueError):
    """A morphable-model file is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class MorphableModel:
    name: str
    mean: np.ndarray  # (3n,) float32, mm
    id_basis: np.ndarray  # (3n, k_id) float32, mm per coefficient unit
    id_std: np.ndarray  # (k_id,) float32
    exp_basis: np.ndarray  # (3n, k_exp) float32
    exp_std: np.ndarray  # (k_exp,) float32
    landmark_maps: dict[str, Correspondence]  # scheme name -> where its points lie on the mesh
    triangles: np.ndarray  # (t, 3) int64 vertex indices
    source_sha256: str  # sha256 of the file(s) this model was converted from
    licence: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # --- sizes -------------------------------------------------------------------------
    @property
    def n_vertices(self) -> int:
        return self.mean.shape[0] // 3

    @property
    def k_id(self) -> int:
        return self.id_basis.shape[1]

    @property
    def k_exp(self) -> int:
        return self.exp_basis.shape[1]

    @property
    def sha256(self) -> str:
        """Content hash of the converted model (what fits and trainsets record)."""
        h = hashlib.sha256()
        for a in (self.mean, self.id_basis, self.id_std, self.exp_basis, self.exp_std):
            h.update(np.ascontiguousarray(a).tobytes())
        for name in sorted(self.landmark_maps):  # one iBUG map on vertices: the hash of format 2
            h.update(self.landmark_maps[name].digest_bytes())
        return h.hexdigest()

    # --- geometry ------------------------------------------------------------------------
    def shape(self, a_id: np.ndarray | None = None, a_exp: np.ndarray | None = None) -> np.ndarray:
        """Vertices (..., n, 3) for coefficient arrays of shape (..., k_id) and (..., k_exp)."""
        s = self.mean.astype(np.float64)
        if a_id is not None:
            s = s + np.asarray(a_id, dtype=np.float64) @ self.id_basis.T.astype(np.float64)
        if a_exp is not None:
            s = s + np.asarray(a_exp, dtype=np.float64) @ self.exp_basis.T.astype(np.float64)
        return s.reshape(*s.shape[:-1], self.n_vertices, 3)

    def landmarks_of(self, scheme: LandmarkScheme | str) -> Correspondence:
        """Where ``scheme``'s points lie on this model (a model without a map of that scheme is
        refused, naming the schemes it has and the setting that adds one)."""
        name = scheme if isinstance(scheme, str) else scheme.name
        if name not in self.landmark_maps:
            raise ModelError(
                f"morphable model {self.name!r} has no landmark map of scheme {name!r} (it has "
                f"{sorted(self.landmark_maps)}); add one with models.morphable_model.landmark_maps.{name}"
            )
        found = self.landmark_maps[name]
        if not isinstance(scheme, str) and found.points != scheme.points:
            raise ModelError(
                f"morphable model {self.name!r}: its map of {name!r} has {found.points} points, the "
                f"scheme {scheme.points}"
            )
        return found

    def with_landmarks(self, correspondence: Correspondence) -> MorphableModel:
        """This model with ``correspondence`` added (or replacing the one of its scheme)."""
        maps = {**self.landmark_maps, correspondence.scheme: correspondence}
        return replace(self, landmark_maps=maps)

    def landmark_model(self, scheme: LandmarkScheme | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean (L,3), id_basis (L,3,k_id), exp_basis (L,3,k_exp)) float64 at ``scheme``'s points
        (interpolated where a point lies between vertices)."""
        c = self.landmarks_of(scheme)
        n = c.points
        mean = c.rows(self.mean).reshape(n, 3)
        idb = c.rows(self.id_basis).reshape(n, 3, self.k_id)
        expb = c.rows(self.exp_basis).reshape(n, 3, self.k_exp)
        return mean, idb, expb

    # --- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        where = f"morphable model {self.name!r}"
        if self.mean.ndim != 1 or self.mean.shape[0] % 3:
            raise ModelError(f"{where}: mean must be a flat (3n,) array, got shape {self.mean.shape}")
        n3 = self.mean.shape[0]
        for nm, basis, std in (("id", self.id_basis, self.id_std), ("exp", self.exp_basis, self.exp_std)):
            if basis.ndim != 2 or basis.shape[0] != n3:
                raise ModelError(f"{where}: {nm}_basis must be ({n3}, k), got {basis.shape}")
            if std.shape != (basis.shape[1],):
                raise ModelError(f"{where}: {nm}_std must be ({basis.shape[1]},), got {std.shape}")
            if not np.all(np.isfinite(basis)) or not np.all(np.isfinite(std)) or np.any(std <= 0):
                raise ModelError(f"{where}: {nm}_basis/{nm}_std contain non-finite or non-positive values")
        if not np.all(np.isfinite(self.mean)):
            raise ModelError(f"{where}: mean contains non-finite values")
        n = n3 // 3
        for name, c in self.landmark_maps.items():
            if c.scheme != name:
                raise ModelError(f"{where}: landmark map {name!r} holds scheme {c.scheme!r}")
            try:
                c.check(n, where)
            except CorrespondenceError as exc:
                raise ModelError(str(exc)) from None
        if self.triangles.ndim != 2 or self.triangles.shape[1] != 3:
            raise ModelError(f"{where}: triangles must be (t, 3), got {self.triangles.shape}")
        if self.triangles.size and (self.triangles.min() < 0 or self.triangles.max() >= n):
            raise ModelError(f"{where}: triangle vertex index out of range 0..{n - 1}")

    # --- storage -------------------------------------------------------------------------
    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            format_version=np.int64(NPZ_FORMAT_VERSION),
            name=np.str_(self.name),
            mean=self.mean.astype(np.float32),
            id_basis=self.id_basis.astype(np.float32),
            id_std=self.id_std.astype(np.float32),
            exp_basis=self.exp_basis.astype(np.float32),
            exp_std=self.exp_std.astype(np.float32),
            triangles=self.triangles.astype(np.int64),
            source_sha256=np.str_(self.source_sha256),
            licence=np.str_(self.licence),
            **{
                f"landmarks__{k}__vertices": c.vertices.astype(np.int64)
                for k, c in self.landmark_maps.items()
            },
            **{
                f"landmarks__{k}__weights": c.weights.astype(np.float64)
                for k, c in self.landmark_maps.items()
            },
        )
        return buf.getvalue()

    def save_npz(self, path: str | Path) -> None:
        """Write atomically (a unique temporary name, then rename: concurrent first uses never collide)."""
        atomic_write(path, self.to_npz_bytes())


_REQUIRED_NPZ_KEYS = (
    "format_version",
    "name",
    "mean",
    "id_basis",
    "id_std",
    "exp_basis",
    "exp_std",
    "triangles",
    "source_sha256",
)


def npz_format(path: str | Path) -> int | None:
    """The format version of a model ``.npz`` (None when it has none or cannot be read)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z["format_version"])
    except Exception:  # unreadable: load_npz says why
        return None


def load_npz(path: str | Path) -> MorphableModel:
    """Load a model written by :meth:`MorphableModel.save_npz` (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: morphable model file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _REQUIRED_NPZ_KEYS if k not in z.files]
            if missing:
                raise ModelError(f"{path}: not a morphset model .npz, missing arrays {missing}")
            version = int(z["format_version"])
            if version not in READABLE_NPZ_FORMATS:
                raise ModelError(
                    f"{path}: model format version {version}, this morphset reads {READABLE_NPZ_FORMATS}"
                )
            data = {k: z[k] for k in z.files}
            if version < 3 and "landmarks" not in data:
                raise ModelError(f"{path}: not a morphset model .npz, missing arrays ['landmarks']")
    except ModelError:
        raise
    except Exception as exc:  # zipfile/format errors: name the file
        raise ModelError(f"{path}: cannot read morphable model .npz ({exc})") from exc
    return MorphableModel(
        name=str(data["name"]),
        mean=data["mean"].astype(np.float32),
        id_basis=data["id_basis"].astype(np.float32),
        id_std=data["id_std"].astype(np.float32),
        exp_basis=data["exp_basis"].astype(np.float32),
        exp_std=data["exp_std"].astype(np.float32),
        landmark_maps=_landmark_maps(data),
        triangles=data["triangles"].astype(np.int64),
        source_sha256=str(data["source_sha256"]),
        licence=str(data.get("licence", "")),
    )


def _landmark_maps(data: dict[str, np.ndarray]) -> dict[str, Correspondence]:
    """The correspondences of a model file: ``landmarks__<scheme>__vertices`` / ``__weights``
    pairs (format 3), or the iBUG-68 vertex ids of formats 1 and 2."""
    if "landmarks" in data:
        return {LEGACY_SCHEME: Correspondence.at_vertices(LEGACY_SCHEME, data["landmarks"])}
    names = sorted(k.split("__")[1] for k in data if k.startswith("landmarks__") and k.endswith("__vertices"))
    return {
        n: Correspondence(
            n,
            data[f"landmarks__{n}__vertices"].astype(np.int64),
            data[f"landmarks__{n}__weights"].astype(np.float64)
            if f"landmarks__{n}__weights" in data
            else np.zeros(0),
        )
        for n in names
    }
