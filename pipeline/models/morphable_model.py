"""The one in-memory linear 3D morphable model type: s = mean + id_basis @ a_id + exp_basis @ a_exp.

Conventions (every loader converts into these):
- vertices are flattened interleaved xyz: s[3*v + c];
- units are millimetres; x to the subject's left-to-right in the image, y up, z towards the camera;
- coefficients a_id, a_exp are in basis units; their prior is N(0, diag(std**2));
- landmarks are 68 iBUG vertex indices (not flattened indices);
- triangles index vertices, wound so normals point out of the face (towards +z at the nose).
Stored by the project as a plain ``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.landmarks.scheme import IBUG68
from pipeline.storage.atomic import atomic_write
from pipeline.storage.hashing import sha256_file  # noqa: F401  (re-exported)

# 2: the default model's triangles are consistently wound (format 1 files are still read; a cached
# conversion of format 1 is converted again)
NPZ_FORMAT_VERSION = 2
READABLE_NPZ_FORMATS = (1, 2)
N_LANDMARKS = IBUG68.points  # the models' landmarks follow the iBUG-68 scheme


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
    landmarks: np.ndarray  # (68,) int64 vertex indices
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
        for a in (self.mean, self.id_basis, self.id_std, self.exp_basis, self.exp_std, self.landmarks):
            h.update(np.ascontiguousarray(a).tobytes())
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

    def landmark_rows(self, vertices: np.ndarray | None = None) -> np.ndarray:
        """Flattened row indices (L*3,) of the landmark vertices (default the model's iBUG-68
        ``landmarks``; any other scheme's vertex ids), xyz interleaved."""
        ids = self.landmarks if vertices is None else np.asarray(vertices, np.int64)
        return (ids[:, None] * 3 + np.arange(3)[None, :]).reshape(-1)

    def landmark_model(self, vertices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean (L,3), id_basis (L,3,k_id), exp_basis (L,3,k_exp)) restricted to the landmark
        vertices (default the model's ``landmarks``)."""
        rows = self.landmark_rows(vertices)
        n = len(rows) // 3
        mean = self.mean[rows].reshape(n, 3)
        idb = self.id_basis[rows].reshape(n, 3, self.k_id)
        expb = self.exp_basis[rows].reshape(n, 3, self.k_exp)
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
        if self.landmarks.shape != (N_LANDMARKS,):
            raise ModelError(
                f"{where}: landmarks must be ({N_LANDMARKS},) vertex indices, got {self.landmarks.shape}"
            )
        n = n3 // 3
        if self.landmarks.min() < 0 or self.landmarks.max() >= n:
            raise ModelError(f"{where}: landmark vertex index out of range 0..{n - 1}")
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
            landmarks=self.landmarks.astype(np.int64),
            triangles=self.triangles.astype(np.int64),
            source_sha256=np.str_(self.source_sha256),
            licence=np.str_(self.licence),
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
    "landmarks",
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
        landmarks=data["landmarks"].astype(np.int64),
        triangles=data["triangles"].astype(np.int64),
        source_sha256=str(data["source_sha256"]),
        licence=str(data.get("licence", "")),
    )
