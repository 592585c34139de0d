"""Loaders for the paper's user-supplied morphable models, converted into :class:`MorphableModel`.

- Basel Face Model 2009 ``01_MorphableModel.mat`` (``shapeMU`` (3n,1), ``shapePC`` (3n,199),
  ``shapeEV`` (199,1) standard deviations, ``tl`` (t,3) 1-based triangles) combined with the
  29-component FaceWarehouse-derived expression basis used by 3DDFA: ``Model_Expression.mat``
  (``mu_exp``, ``w_exp``, ``sigma_exp``) or ``Exp_Pca.bin`` (int32 k, float32 mean (3n),
  float32 basis k x 3n) with its standard deviations in ``std_exp.txt`` beside it. The 3DDFA
  expression basis lives on the 53,215-vertex crop of BFM: give the crop as ``vertex_subset``
  (3DDFA's ``BFM_exp_idx.mat`` / ``model_info.mat`` ``trimIndex``, 1-based).
- Basel Face Model 2017 ``model2017-1_*.h5`` (``shape/model/{mean,pcaBasis,pcaVariance}``,
  ``shape/representer/cells``, ``expression/model/{mean,pcaBasis,pcaVariance}``).

Neither ships iBUG-68 landmark vertex indices; they come from a user file (see docs/models.md).
Index base: ``.mat`` files are MATLAB (1-based), ``.npy``/``.txt`` files are 0-based. A 204-long
list is read as 3DDFA-style flattened xyz indices (vertex = index // 3); a text file of
``N = index`` lines (eos ``ibug_to_*.txt`` mappings, ``correspondence.read_mapping``) as iBUG
number -> 0-based vertex (or a barycentric point).

Conversion into the project's conventions: units become millimetres (the files' unit is detected
from the size of the mean face: BFM 2009 is in micrometres), and every basis is rescaled to
unit-norm columns with the standard deviation carrying the scale (std in mm of displacement norm),
the same convention as the default model. Nothing is unpickled; MATLAB v7.3 files are read as HDF5.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from pipeline.landmarks.scheme import IBUG68, LandmarkScheme, load_scheme
from pipeline.models.correspondence import Correspondence, CorrespondenceError, read_mapping
from pipeline.models.morphable_model import ModelError, MorphableModel, load_npz, sha256_file
from pipeline.models.triangulation import face_normals

N_LANDMARKS = IBUG68.points  # the scheme of a user model's ``landmarks`` file

# A face is ~150 mm wide: a mean shape whose widest extent exceeds this is in micrometres.
_MICROMETRE_EXTENT = 2000.0
_MIN_MM_EXTENT = 50.0
log = logging.getLogger(__name__)


# --- reading files ---------------------------------------------------------------------------


def read_mat(path: str | Path) -> dict[str, np.ndarray]:
    """Numeric variables of a MATLAB file (v5/v7 via scipy, v7.3 via h5py), no objects."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    import h5py

    try:
        raw = scipy.io.loadmat(str(path))
    except Exception as exc:
        if h5py.is_hdf5(path):  # MATLAB v7.3 files are HDF5 (scipy refuses them)
            return _read_mat73(path)
        raise ModelError(f"{path}: not a readable MATLAB .mat file ({exc})") from None
    return {k: v for k, v in raw.items() if not k.startswith("__") and isinstance(v, np.ndarray)}


def _read_mat73(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            for k, ds in f.items():
                if isinstance(ds, h5py.Dataset) and ds.dtype.kind in "fiu":
                    out[k] = np.asarray(ds).T  # HDF5 stores MATLAB's column-major arrays transposed
    except OSError as exc:
        raise ModelError(f"{path}: not a readable MATLAB v7.3 (HDF5) file ({exc})") from None
    return out


def _var(mat: dict[str, np.ndarray], names: tuple[str, ...], path: Path) -> np.ndarray:
    for n in names:
        if n in mat:
            return np.asarray(mat[n])
    raise ModelError(f"{path}: missing variable {' or '.join(names)} (has {sorted(mat)})")


def _column(a: np.ndarray, what: str, path: Path) -> np.ndarray:
    """(n,), (n,1) or (1,n) -> (n,) float64."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ModelError(f"{path}: {what} must be a vector, got shape {a.shape}")
    return a


def _indices(values: np.ndarray, one_based: bool, what: str, path: Path) -> np.ndarray:
    a = np.asarray(values).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
        raise ModelError(f"{path}: {what} must be non-empty integer indices")
    a = a.astype(np.int64) - (1 if one_based else 0)
    if a.min() < 0:
        raise ModelError(
            f"{path}: {what} contains an index below {1 if one_based else 0} (file read as {'1' if one_based else '0'}-based)"
        )
    return a


def _read_index_file(path: str | Path, what: str, mat_names: tuple[str, ...]) -> np.ndarray:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: {what} file not found")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        mat = read_mat(path)
        found = [n for n in mat_names if n in mat] or [n for n in sorted(mat) if mat[n].size > 1]
        if not found:
            raise ModelError(f"{path}: no index variable ({' or '.join(mat_names)}) found for {what}")
        return _indices(mat[found[0]], True, what, path)
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ModelError(f"{path}: not a readable .npy of {what} ({exc})") from None
        return _indices(arr, False, what, path)
    try:
        text = path.read_text(encoding="utf-8")
        arr = np.array([float(t) for t in text.replace(",", " ").split()])
    except ModelError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: expected whitespace/comma-separated integers for {what} ({exc})") from None
    return _indices(arr, False, what, path)


def place_contour_points(mean_mm: np.ndarray, landmarks: Correspondence, where: str) -> Correspondence:
    """``landmarks`` with every point a mapping left out (vertex -1: a jaw contour point) set to
    a vertex on the mean shape's frontal outline: per side, the outline from about the outer eye
    corner's height down to the chin, its points spaced evenly along it as iBUG's jaw points are.
    Contour marching (``stages.fit.contour``) re-picks these points per pose anyway; this is their
    frontal place. Defined for schemes with a ``jaw`` group and named chin, outer eye corners and
    nose tip (iBUG-68)."""
    missing = np.flatnonzero(landmarks.vertices[:, 0] < 0)
    if not len(missing):
        return landmarks
    scheme = load_scheme(landmarks.scheme)
    named = scheme.named
    needed = ("chin", "right_eye_outer", "left_eye_outer", "nose_tip")
    if "jaw" not in scheme.groups or any(k not in named for k in needed):
        raise ModelError(
            f"{where}: points {(missing + 1).tolist()} are unmapped and scheme {scheme.name!r} "
            "has no jaw outline to place them on"
        )
    if any(landmarks.vertices[named[k], 0] < 0 for k in needed):
        raise ModelError(f"{where}: the chin, the outer eye corners and the nose tip must be mapped")
    v = mean_mm.reshape(-1, 3)
    at = landmarks.locate(v)
    chin, eyes = at[named["chin"]], at[[named["right_eye_outer"], named["left_eye_outer"]]]
    mid_x = float(at[named["nose_tip"], 0])
    top = float(eyes[:, 1].mean()) - 0.1 * float(eyes[:, 1].mean() - chin[1])
    front = v[:, 2] > eyes[:, 2].mean() - 35.0  # ahead of the ears
    heights = np.linspace(top, chin[1], 40)
    band = max(1.5, 0.6 * abs(top - chin[1]) / 40)
    jaw = scheme.group("jaw")
    chin_at = jaw.index(named["chin"])
    ids, weights = landmarks.vertices.copy(), landmarks.weights.copy()
    for side, points in ((-1.0, jaw[:chin_at]), (1.0, jaw[chin_at + 1 :][::-1])):
        outline = []
        for h in heights[:-1]:
            cand = np.flatnonzero(front & (np.abs(v[:, 1] - h) <= band) & (side * (v[:, 0] - mid_x) > 0))
            if len(cand):
                outline.append(cand[np.argmax(side * (v[cand, 0] - mid_x))])
        if len(outline) < 2:
            raise ModelError(f"{where}: cannot find the face's outline to place the jaw's contour points")
        path = np.vstack([v[outline], chin[None]])
        arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(path[:, :2], axis=0), axis=1))]
        for k, point in enumerate(points):  # top of the jaw first, towards the chin
            if ids[point, 0] < 0:
                s = arc[-1] * k / len(points)
                ids[point] = outline[min(int(np.argmin(np.abs(arc[:-1] - s))), len(outline) - 1)]
                weights[point] = (1.0, 0.0, 0.0)
    return Correspondence(landmarks.scheme, ids, weights)


def load_landmark_map(path: str | Path, scheme: LandmarkScheme = IBUG68) -> Correspondence:
    """Where ``scheme``'s points lie on a model, from a user file: an eos-style mapping
    (``N = index`` lines; the points the scheme lets a mapping leave out come back as -1 for
    :func:`place_contour_points`), or the vertex indices alone: .txt/.csv/.npy (0-based) or .mat
    (1-based), a 3-per-point list read as 3DDFA's flattened xyz indices."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (".mat", ".npy") and p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = ""
        if "=" in text:
            try:
                return read_mapping(p, scheme)
            except CorrespondenceError as exc:
                raise ModelError(str(exc)) from None
    idx = _read_index_file(path, "landmark indices", ("keypoints", "landmarks", "lm", "kpt_ind"))
    if idx.size == 3 * scheme.points:
        # 3DDFA keypoints: flattened xyz rows (x, x+1, x+2 per landmark)
        if np.any(idx[1::3] != idx[0::3] + 1) or np.any(idx[2::3] != idx[0::3] + 2):
            raise ModelError(f"{path}: {idx.size} landmark values but not xyz-interleaved flattened indices")
        idx = idx[0::3] // 3
    if idx.size != scheme.points:
        raise ModelError(
            f"{path}: expected {scheme.points} landmark vertex indices, got {idx.size} (scheme {scheme.name})"
        )
    return Correspondence.at_vertices(scheme.name, idx)


def load_landmark_indices(path: str | Path) -> np.ndarray:
    """The iBUG-68 vertex indices (0-based) of a user file (see :func:`load_landmark_map`); -1 for
    a contour point an eos mapping left out."""
    found = load_landmark_map(path, IBUG68)
    if not found.on_vertices:
        raise ModelError(f"{path}: points between vertices where vertex indices are expected")
    return found.vertices[:, 0]


def load_vertex_subset(path: str | Path) -> np.ndarray:
    """Vertex indices (0-based) of a crop, e.g. 3DDFA's ``trimIndex`` (53,215 of BFM's 53,490)."""
    return _read_index_file(path, "vertex subset", ("trimIndex", "idx", "indices"))


# --- expression bases --------------------------------------------------------------------------
def load_3ddfa_expression(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (3n,), basis (3n, k), std (k,)) in the file's units, from .mat or Exp_Pca.bin."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: expression model file not found")
    if path.suffix.lower() == ".bin":
        return _read_exp_pca_bin(path)
    mat = read_mat(path)
    mean = _column(_var(mat, ("mu_exp",), path), "mu_exp", path)
    basis = np.asarray(_var(mat, ("w_exp",), path), dtype=np.float64)
    std = _column(_var(mat, ("sigma_exp",), path), "sigma_exp", path)
    if basis.ndim != 2 or basis.shape[0] != mean.size or basis.shape[1] != std.size:
        raise ModelError(
            f"{path}: w_exp must be ({mean.size}, {std.size}) to match mu_exp and sigma_exp, got {basis.shape}"
        )
    return mean, basis, std


def _read_exp_pca_bin(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = path.read_bytes()
    if len(data) < 8:
        raise ModelError(f"{path}: too short for Exp_Pca.bin (int32 k, float32 mean, float32 k x 3n basis)")
    k = int(np.frombuffer(data[:4], "<i4")[0])
    body = (len(data) - 4) // 4
    if k <= 0 or (len(data) - 4) % 4 or body % (k + 1) or (body // (k + 1)) % 3:
        raise ModelError(
            f"{path}: size {len(data)} bytes does not fit Exp_Pca.bin with k={k} (int32 k, then 3n*(k+1) float32)"
        )
    n3 = body // (k + 1)
    floats = np.frombuffer(data, "<f4", count=body, offset=4).astype(np.float64)
    mean, basis = floats[:n3], floats[n3:].reshape(k, n3).T
    std_path = path.with_name("std_exp.txt")
    if not std_path.is_file():
        raise ModelError(f"{std_path}: not found; Exp_Pca.bin needs its standard deviations beside it")
    try:
        std = np.loadtxt(std_path, dtype=np.float64).reshape(-1)
    except ValueError as exc:
        raise ModelError(f"{std_path}: expected {k} numbers ({exc})") from None
    if std.size != k:
        raise ModelError(
            f"{std_path}: expected {k} standard deviations (Exp_Pca.bin has k={k}), got {std.size}"
        )
    return mean, basis, std


# --- conversion helpers ------------------------------------------------------------------------
def unit_scale(mean: np.ndarray, where: str) -> float:
    """Factor to millimetres from the extent of the mean face (micrometres or millimetres)."""
    extent = float(np.ptp(np.asarray(mean).reshape(-1, 3), axis=0).max())
    if extent > _MICROMETRE_EXTENT:
        return 1e-3
    if extent >= _MIN_MM_EXTENT:
        return 1.0
    raise ModelError(f"{where}: mean face is {extent:.3g} units wide; expected millimetres or micrometres")


def unit_columns(basis_mm: np.ndarray, std: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rescale to unit-norm columns; the std absorbs the norm (displacement std in mm)."""
    norms = np.linalg.norm(basis_mm, axis=0)
    if np.any(norms <= 0) or np.any(std <= 0) or not np.all(np.isfinite(std)):
        raise ModelError(f"{where}: zero basis columns or non-positive standard deviations")
    return (basis_mm / norms).astype(np.float32), (std * norms).astype(np.float32)


def wind_outward(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Flip the whole (consistently wound) mesh if most of its area faces away from the camera."""
    n = face_normals(vertices, triangles)
    # area-weighted z of the normals: a face seen from +z has mostly +z normals
    return triangles if n[:, 2].sum() >= 0 else triangles[:, [0, 2, 1]]


def crop(
    subset: np.ndarray, n_vertices: int, triangles: np.ndarray, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened rows of ``subset`` and the triangles fully inside it, re-indexed."""
    if subset.max() >= n_vertices or len(np.unique(subset)) != subset.size:
        raise ModelError(f"{where}: vertex subset indices must be unique and < {n_vertices}")
    remap = np.full(n_vertices, -1, np.int64)
    remap[subset] = np.arange(subset.size)
    t = remap[triangles]
    t = t[(t >= 0).all(axis=1)]
    rows = (subset[:, None] * 3 + np.arange(3)).reshape(-1)
    return rows, t


def check_landmark_geometry(mean_mm: np.ndarray, landmarks: Correspondence, where: str) -> None:
    """Refuse iBUG-68 landmark files that do not fit the model's axes (eyes ordered left-right,
    nose in front)."""
    v = mean_mm.reshape(-1, 3)
    if landmarks.vertices.max() >= len(v):
        raise ModelError(
            f"{where}: landmark vertex index {landmarks.vertices.max()} out of range 0..{len(v) - 1}"
        )
    lm = landmarks.locate(v)
    named = IBUG68.named
    right, left = IBUG68.outer_eye_corners
    tip, chin, bridge = named["nose_tip"], named["chin"], named["nose_bridge_top"]
    eye = np.linalg.norm(lm[right] - lm[left])
    if not (lm[right, 0] < lm[left, 0] and 40.0 < eye < 140.0):
        raise ModelError(
            f"{where}: landmarks {right}/{left} (outer eye corners) are {eye:.1f} mm apart at x={lm[right, 0]:.1f}, "
            f"{lm[left, 0]:.1f}; expected ~86 mm with {right} left of {left}: wrong landmark file for this model?"
        )
    if lm[tip, 2] <= lm[[right, left], 2].mean() or lm[chin, 1] >= lm[bridge, 1]:
        raise ModelError(
            f"{where}: nose tip ({tip}) is not in front of the eyes or the chin ({chin}) is not below the "
            f"brows ({bridge}): expected y up and z towards the camera"
        )


def source_files(
    source: str | Path,
    landmarks: str | Path,
    expression: str | Path | None = None,
    vertex_subset: str | Path | None = None,
) -> list[Path]:
    """Every file a user model is made from, in a fixed order (its provenance hash covers them all)."""
    files = [Path(source).expanduser()]
    if expression is not None:
        exp = Path(expression).expanduser()
        files.append(exp)
        if exp.suffix.lower() == ".bin":
            files.append(exp.with_name("std_exp.txt"))
    if vertex_subset is not None:
        files.append(Path(vertex_subset).expanduser())
    files.append(Path(landmarks).expanduser())
    return files


def combined_sha256(paths: list[Path]) -> str:
    """Provenance of a model made from several files: sha256 over their names and sha256s."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\x00" + sha256_file(p).encode() + b"\x00")
    return h.hexdigest()


# --- models ------------------------------------------------------------------------------------
def assemble(
    name: str,
    mean: np.ndarray,
    exp_mean: np.ndarray,
    identity: tuple[np.ndarray, np.ndarray, Path],
    expression: tuple[np.ndarray, np.ndarray, Path],
    triangles: np.ndarray,
    landmarks_path: Path,
    sources: list[Path],
    licence: str,
) -> MorphableModel:
    """The common tail of every loader: units to mm, landmark checks, unit-norm bases, outward winding.

    ``identity`` / ``expression`` are (basis (3n, k) in file units, std (k,), file it came from).
    """
    (pc, pc_std, pc_path), (e_pc, e_std, e_path) = identity, expression
    scale = unit_scale(mean, str(pc_path))
    mean_mm = (mean + exp_mean) * scale  # the mean face includes the mean expression
    landmarks = place_contour_points(mean_mm, load_landmark_map(landmarks_path), str(landmarks_path))
    check_landmark_geometry(mean_mm, landmarks, str(landmarks_path))
    id_basis, id_std = unit_columns(pc * scale, pc_std, str(pc_path))
    exp_basis, exp_std = unit_columns(e_pc * scale, e_std, str(e_path))
    return MorphableModel(
        name,
        mean_mm.astype(np.float32),
        id_basis,
        id_std,
        exp_basis,
        exp_std,
        {landmarks.scheme: landmarks},
        wind_outward(mean_mm.reshape(-1, 3), triangles),
        combined_sha256(sources),
        licence,
    )


def load_bfm2009(
    shape_path: str | Path,
    expression_path: str | Path,
    landmarks_path: str | Path,
    vertex_subset_path: str | Path | None = None,
    name: str = "bfm2009-3ddfa",
    licence: str = "Basel Face Model 2009: academic, non-commercial use",
) -> MorphableModel:
    """BFM 2009 identity (199 components) + 3DDFA's 29 expression components."""
    shape_path = Path(shape_path).expanduser()
    mat = read_mat(shape_path)
    mean = _column(_var(mat, ("shapeMU",), shape_path), "shapeMU", shape_path)
    pc = np.asarray(_var(mat, ("shapePC",), shape_path), dtype=np.float64)
    ev = _column(_var(mat, ("shapeEV",), shape_path), "shapeEV", shape_path)
    tl = _var(mat, ("tl",), shape_path)
    if mean.size % 3 or pc.ndim != 2 or pc.shape != (mean.size, ev.size):
        raise ModelError(
            f"{shape_path}: shapePC must be ({mean.size}, {ev.size}) to match shapeMU (3n) and shapeEV, got {pc.shape}"
        )
    n = mean.size // 3
    if tl.ndim != 2 or tl.shape[1] != 3:
        raise ModelError(f"{shape_path}: tl must be (t, 3) triangles, got {tl.shape}")
    triangles = _indices(tl, True, "tl (triangles)", shape_path).reshape(-1, 3)
    if triangles.max() >= n:
        raise ModelError(f"{shape_path}: tl refers to vertex {triangles.max() + 1} of {n}")

    exp_path = Path(expression_path).expanduser()
    e_mean, e_basis, e_std = load_3ddfa_expression(exp_path)
    if vertex_subset_path is not None:
        sub_path = Path(vertex_subset_path).expanduser()
        rows, triangles = crop(load_vertex_subset(sub_path), n, triangles, str(sub_path))
        mean, pc = mean[rows], pc[rows]
    if e_mean.size != mean.size:
        raise ModelError(
            f"{exp_path}: expression basis has {e_mean.size // 3} vertices, the shape model {mean.size // 3}; "
            "3DDFA's basis needs vertex_subset (trimIndex, 53,215 of BFM's 53,490 vertices)"
        )
    return assemble(
        name,
        mean,
        e_mean,
        (pc, ev, shape_path),
        (e_basis, e_std, exp_path),
        triangles,
        Path(landmarks_path).expanduser(),
        source_files(shape_path, landmarks_path, expression_path, vertex_subset_path),
        licence,
    )


def load_bfm2017(
    h5_path: str | Path,
    landmarks_path: str | Path,
    name: str = "bfm2017",
    licence: str = "Basel Face Model 2017: academic, non-commercial use",
) -> MorphableModel:
    """BFM 2017 (``model2017-1_bfm_nomouth.h5`` / ``model2017-1_face12_nomouth.h5``) with expressions."""
    import h5py

    path = Path(h5_path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: BFM 2017 file not found")

    def get(f: h5py.File, key: str) -> np.ndarray:
        if key not in f:
            raise ModelError(f"{path}: missing dataset {key}")
        return np.asarray(f[key], dtype=np.float64)

    try:
        with h5py.File(path, "r") as f:
            mean = get(f, "shape/model/mean").reshape(-1)
            pc = get(f, "shape/model/pcaBasis")
            var = get(f, "shape/model/pcaVariance").reshape(-1)
            cells = get(f, "shape/representer/cells")
            e_mean = get(f, "expression/model/mean").reshape(-1)
            e_pc = get(f, "expression/model/pcaBasis")
            e_var = get(f, "expression/model/pcaVariance").reshape(-1)
    except OSError as exc:
        raise ModelError(f"{path}: not a readable HDF5 file ({exc})") from None
    for what, m, b, v in (("shape", mean, pc, var), ("expression", e_mean, e_pc, e_var)):
        if mean.size % 3 or b.ndim != 2 or b.shape != (mean.size, v.size) or m.size != mean.size:
            raise ModelError(
                f"{path}: {what}/model: mean ({m.size}), pcaBasis {b.shape} and pcaVariance ({v.size}) "
                f"must be (3n,), (3n, k), (k,) with 3n={mean.size}"
            )
    if np.any(var <= 0) or np.any(e_var <= 0):
        raise ModelError(f"{path}: pcaVariance must be positive")
    n = mean.size // 3
    if cells.ndim != 2 or 3 not in cells.shape:
        raise ModelError(f"{path}: shape/representer/cells must be (3, t), got {cells.shape}")
    triangles = _indices(cells if cells.shape[1] == 3 else cells.T, False, "cells", path).reshape(-1, 3)
    if triangles.max() >= n:
        raise ModelError(f"{path}: shape/representer/cells refers to vertex {triangles.max()} of {n}")
    lm_path = Path(landmarks_path).expanduser()
    return assemble(
        name,
        mean,
        e_mean,
        (pc, np.sqrt(var), path),
        (e_pc, np.sqrt(e_var), path),
        triangles,
        lm_path,
        source_files(path, lm_path),
        licence,
    )


def load_user_model_cached(
    entry: dict, cache_dir: Path, where: str = "models.morphable_model"
) -> MorphableModel:
    """:func:`load_user_model`, converted once into ``<cache_dir>/<name>.npz``.

    The cache is reused only if it records the provenance hash of exactly these input files.
    """
    files = source_files(
        entry["source"], entry.get("landmarks") or "", entry.get("expression"), entry.get("vertex_subset")
    )
    missing = [str(p) for p in files if not p.is_file()]
    if missing or not entry.get("landmarks"):
        return load_user_model(entry, where)  # raises the precise error
    cached = Path(cache_dir) / f"{entry.get('name', 'morphable_model')}.npz"
    want = combined_sha256(files)
    if cached.is_file():
        try:
            model = load_npz(cached)
            if model.source_sha256 == want:
                return model
        except ModelError:
            pass  # a corrupt cache is rebuilt below
    model = load_user_model(entry, where)
    model.save_npz(cached)
    return model


def load_user_model(entry: dict, where: str = "models.morphable_model") -> MorphableModel:
    """The model a manifest entry with a ``.mat`` (BFM 2009) or ``.h5`` (BFM 2017) source describes."""
    source = Path(entry["source"]).expanduser()
    if not source.is_file():
        raise ModelError(f"{source}: {where}.source: file not found")
    sha = sha256_file(source)
    if not entry.get("sha256"):
        # the user's own file: allowed without a hash, but never without a word
        log.warning(
            "%s: %s.sha256 is not set: used unchecked (sha256 %s); put it in the manifest to have it checked",
            source,
            where,
            sha,
        )
    elif sha != entry["sha256"]:
        raise ModelError(f"{source}: sha256 {sha} does not match {where}.sha256 {entry['sha256']}")
    if not entry.get("landmarks"):
        raise ModelError(
            f"{where}.landmarks: required for {source.name} (where the {N_LANDMARKS} iBUG points lie: a mapping or vertex-index file)"
        )
    name = entry.get("name")
    licence = entry.get("licence")
    extra = {k: v for k, v in (("name", name), ("licence", licence)) if v}
    suffix = source.suffix.lower()
    if suffix == ".mat":
        if not entry.get("expression"):
            raise ModelError(
                f"{where}.expression: required for BFM 2009 (Model_Expression.mat or Exp_Pca.bin of 3DDFA)"
            )
        return load_bfm2009(
            source, entry["expression"], entry["landmarks"], entry.get("vertex_subset"), **extra
        )
    if suffix in (".h5", ".hdf5"):
        return load_bfm2017(source, entry["landmarks"], **extra)
    raise ModelError(f"{source}: {where}.source: expected a BFM 2009 .mat or a BFM 2017 .h5 file")
