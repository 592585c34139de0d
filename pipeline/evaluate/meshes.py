"""Mesh files (.obj / .ply through trimesh) and the shapes a run's fits describe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from pipeline.evaluate.frame import Frame
from pipeline.models.morphable_model import MorphableModel
from pipeline.storage.atomic import atomic_write

MESH_SUFFIXES = (".obj", ".ply")


def write_mesh(vertices: np.ndarray, triangles: np.ndarray, path: str | Path) -> Path:
    """Write a triangle mesh as .obj or .ply (chosen by the suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise ValueError(f"{path}: mesh file must end in .obj or .ply")
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(triangles, np.int64), process=False)
    atomic_write(path, lambda f: mesh.export(f, file_type=suffix[1:]))
    return path


def vertex_ids_path(mesh_path: str | Path) -> Path:
    """Where :func:`write_model_mesh` writes the model vertex index of each file vertex."""
    mesh_path = Path(mesh_path)
    return mesh_path.with_name(mesh_path.stem + ".vertex_ids.txt")


def write_model_mesh(vertices: np.ndarray, triangles: np.ndarray, path: str | Path) -> tuple[Path, Path, int]:
    """A shape of the morphable model as .obj/.ply that every reader loads as written.

    Only the vertices some triangle uses are written, in model order, so readers that drop unused
    vertices (trimesh's and Open3D's defaults) keep them all and in order; ``<stem>.vertex_ids.txt``
    beside the file holds, one per line, the model vertex index of each file vertex (the same list
    for every mesh of one model: meshes correspond vertex to vertex, and to the model through it).
    Returns (mesh path, vertex-ids path, vertices written)."""
    vertices, triangles = np.asarray(vertices), np.asarray(triangles, np.int64)
    used = np.unique(triangles)
    remap = np.full(len(vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    path = write_mesh(vertices[used], remap[triangles], path)
    ids = vertex_ids_path(path)
    atomic_write(ids, ("\n".join(map(str, used.tolist())) + "\n").encode())
    return path, ids, len(used)


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (n,3) float64, triangles (t,3) int64) of a .obj/.ply file, vertex order kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mesh file not found")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for bad files; name the file
        raise ValueError(f"{path}: cannot read mesh ({exc})") from exc
    if not isinstance(mesh, trimesh.Trimesh) or not len(mesh.vertices):
        raise ValueError(f"{path}: no triangle mesh found")
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)


class ShapeBuilder:
    """``MorphableModel.shape`` for many coefficient vectors: the float64 bases are converted once
    (the model method converts its whole basis on every call, ~50 MB for the default model)."""

    def __init__(self, model: MorphableModel) -> None:
        self.n = model.n_vertices
        self.mean = model.mean.astype(np.float64)
        self.id_basis = model.id_basis.astype(np.float64)
        self.exp_basis = model.exp_basis.astype(np.float64)

    def __call__(self, a_id: np.ndarray | None = None, a_exp: np.ndarray | None = None) -> np.ndarray:
        """One shape (n, 3) mm."""
        return self.many(
            None if a_id is None else np.asarray(a_id)[None],
            None if a_exp is None else np.asarray(a_exp)[None],
        )[0]

    def many(self, a_id: np.ndarray | None, a_exp: np.ndarray | None) -> np.ndarray:
        """Shapes (N, n, 3) mm for coefficient rows (N, k); one matrix product reads each basis once
        for the whole batch (the cost is memory traffic, not arithmetic)."""
        rows = next((len(a) for a in (a_id, a_exp) if a is not None), 1)
        s = np.broadcast_to(self.mean, (rows, len(self.mean))).copy()
        if a_id is not None:
            s += np.asarray(a_id, np.float64) @ self.id_basis.T
        if a_exp is not None:
            s += np.asarray(a_exp, np.float64) @ self.exp_basis.T
        return s.reshape(rows, self.n, 3)

    def expression_levels(self, a_exp: np.ndarray) -> np.ndarray:
        """Mean per-vertex displacement (mm) caused by each row of expression coefficients."""
        disp = (np.asarray(a_exp, np.float64) @ self.exp_basis.T).reshape(len(a_exp), self.n, 3)
        return np.linalg.norm(disp, axis=2).mean(axis=1)


def _check_sizes(model: MorphableModel, a_id: np.ndarray, a_exp: np.ndarray | None) -> None:
    if a_id.shape != (model.k_id,) or (a_exp is not None and a_exp.shape != (model.k_exp,)):
        raise ValueError(
            f"fit coefficients (k_id={a_id.shape[0]}, k_exp={None if a_exp is None else a_exp.shape[0]}) do "
            f"not match the morphable model {model.name!r} (k_id={model.k_id}, k_exp={model.k_exp})"
        )


def subject_identity_shape(fits: Frame, model: MorphableModel, subject: str) -> np.ndarray:
    """The neutral identity shape (n, 3) mm a subject's fit estimated."""
    ok = fits.is_null("failure_reason")
    rows = np.flatnonzero(ok & (fits["subject"] == subject))
    if not len(rows):
        hint = ", ".join(sorted(set(fits["subject"][ok]))[:5])
        raise ValueError(
            f"subject {subject!r}: no successful fit in this run (fitted subjects include: {hint})"
        )
    a_id = fits["alpha_id"][rows[0]]
    _check_sizes(model, a_id, None)
    return model.shape(a_id)


def image_full_shape(fits: Frame, model: MorphableModel, image_id: str) -> np.ndarray:
    """The full (identity + expression) shape (n, 3) mm fitted to one image, in model coordinates."""
    rows = np.flatnonzero(fits["image_id"] == image_id)
    if not len(rows):
        raise ValueError(f"image {image_id!r}: not in this run's fit shards")
    i = rows[0]
    if fits["failure_reason"][i] is not None:
        raise ValueError(f"image {image_id!r}: fit failed ({fits['failure_reason'][i]})")
    a_id, a_exp = fits["alpha_id"][i], fits["alpha_exp"][i]
    _check_sizes(model, a_id, a_exp)
    return model.shape(a_id, a_exp)
