"""3D reconstruction error measures of the two seed papers.

- Liu et al. (CVPR 2018): similarity (Procrustes) alignment of the prediction to the ground truth on
  the 68 3D landmarks, crop of the ground truth to ``radius`` mm around the nose tip, then the mean
  per-vertex distance (and its root mean square). With a shared topology (synthetic ground truth
  from the same morphable model) vertices correspond one-to-one; otherwise (scans) each cropped
  ground-truth vertex is matched to its nearest predicted vertex.
- Genova et al. (CVPR 2018): symmetric point-to-plane distance after ICP with isotropic scale,
  within the region of intersection (pairs whose closest point lies on the other surface's boundary
  or farther than ``max_pair_mm`` are outside it).

All inputs are millimetres; meshes are (vertices (n,3), triangles (t,3)).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from pipeline.landmarks.scheme import IBUG68
from pipeline.models.geometry import vertex_normals

NOSE_TIP = IBUG68.named["nose_tip"]


@dataclass(frozen=True)
class Similarity:
    """x -> scale * R @ x + t."""

    scale: float
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def compose(self, inner: Similarity) -> Similarity:
        """self ∘ inner."""
        return Similarity(
            self.scale * inner.scale,
            self.rotation @ inner.rotation,
            self.scale * self.rotation @ inner.translation + self.translation,
        )


def similarity_transform(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> Similarity:
    """Least-squares similarity mapping ``src`` onto ``dst`` (Umeyama 1991), proper rotation only."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 3:
        raise ValueError(f"similarity_transform: need two (n>=3, 3) arrays, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection would fit better; forbid it
        sign[-1] = -1.0
    r = u @ np.diag(sign) @ vt
    var_s = (xs**2).sum() / len(src)
    s = float((d * sign).sum() / var_s) if with_scale and var_s > 0 else 1.0
    return Similarity(s, r, mu_d - s * r @ mu_s)


def crop_mask(vertices: np.ndarray, center: np.ndarray, radius_mm: float) -> np.ndarray:
    """Vertices within ``radius_mm`` (Euclidean) of ``center``."""
    return np.linalg.norm(np.asarray(vertices, dtype=np.float64) - np.asarray(center), axis=1) <= radius_mm


@dataclass(frozen=True)
class LiuError:
    mean_mm: float  # mean per-vertex distance over the crop
    rms_mm: float  # root mean square of the same distances
    n_vertices: int  # ground-truth vertices inside the crop


def liu_error(
    pred: np.ndarray,
    gt: np.ndarray,
    pred_landmarks: np.ndarray,
    gt_landmarks: np.ndarray,
    radius_mm: float = 95.0,
) -> LiuError:
    """Liu et al.'s reconstruction error of one sample (see the module doc)."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    tf = similarity_transform(pred_landmarks, gt_landmarks)
    aligned = tf.apply(pred)
    mask = crop_mask(gt, np.asarray(gt_landmarks)[NOSE_TIP], radius_mm)
    if not mask.any():
        raise ValueError(f"no ground-truth vertex within {radius_mm} mm of the nose tip")
    if aligned.shape == gt.shape:  # shared topology: vertex i corresponds to vertex i
        d = np.linalg.norm(aligned[mask] - gt[mask], axis=1)
    else:
        d, _ = cKDTree(aligned).query(gt[mask])
    return LiuError(float(d.mean()), float(np.sqrt((d**2).mean())), int(mask.sum()))


# --- Genova et al. -------------------------------------------------------------------------------
_BOUNDARY_CACHE: dict[str, np.ndarray] = {}


def boundary_vertices(triangles: np.ndarray, n_vertices: int) -> np.ndarray:
    """(n,) bool: vertices on an edge used by exactly one triangle (cached per topology: every
    sample of one morphable model shares it)."""
    tri = np.ascontiguousarray(triangles, np.int64)
    key = hashlib.sha1(tri.tobytes()).hexdigest() + f":{n_vertices}"
    if key not in _BOUNDARY_CACHE:
        boundary = np.zeros(n_vertices, bool)
        if len(tri):
            edges = np.sort(tri[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
            once = trimesh.grouping.group_rows(edges, require_count=1)
            boundary[edges[once].ravel()] = True
        if len(_BOUNDARY_CACHE) > 16:
            _BOUNDARY_CACHE.clear()
        _BOUNDARY_CACHE[key] = boundary
    return _BOUNDARY_CACHE[key]


@dataclass
class Surface:
    """A triangle mesh prepared for closest-point queries."""

    vertices: np.ndarray
    normals: np.ndarray
    boundary: np.ndarray  # (n,) bool: vertex on an open edge
    tree: cKDTree

    @classmethod
    def from_mesh(cls, vertices: np.ndarray, triangles: np.ndarray) -> Surface:
        v = np.asarray(vertices, np.float64)
        return cls(
            v,
            vertex_normals(v, triangles, weighting="mean"),
            boundary_vertices(triangles, len(v)),
            cKDTree(v),
        )


def submesh(vertices: np.ndarray, triangles: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices where ``keep`` and the triangles whose three vertices are all kept (re-indexed)."""
    keep = np.asarray(keep, bool)
    new_index = np.full(len(keep), -1, np.int64)
    new_index[keep] = np.arange(keep.sum())
    tri = np.asarray(triangles, np.int64)
    tri = tri[keep[tri].all(axis=1)] if len(tri) else tri.reshape(0, 3)
    return np.asarray(vertices)[keep], new_index[tri]


def closest_pairs(
    points: np.ndarray, target: Surface, max_pair_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance, target index, inside) for each point; ``inside`` marks the region of intersection."""
    d, idx = target.tree.query(points)
    inside = (d <= max_pair_mm) & ~target.boundary[idx]
    return d, idx, inside


def point_to_plane_step(points: np.ndarray, anchors: np.ndarray, normals: np.ndarray) -> Similarity:
    """One linearised point-to-plane step with isotropic scale (Low 2004, plus a scale term).

    Minimises sum(((s R p + t − q) · n)^2) for small rotation ω, scale 1 + δ and translation t about
    the points' centroid: the residual is linear in (ω, δ, t)."""
    c = points.mean(0)
    pc = points - c
    a = np.concatenate([np.cross(pc, normals), np.einsum("ij,ij->i", pc, normals)[:, None], normals], axis=1)
    b = -np.einsum("ij,ij->i", points - anchors, normals)
    # normal equations (7x7): far cheaper than an SVD of the tall system; the tiny ridge keeps a
    # flat patch (tangential motion unconstrained) solvable, preferring no motion along it
    ata = a.T @ a
    x = np.linalg.solve(ata + 1e-9 * np.trace(ata) * np.eye(7), a.T @ b)
    rot = Rotation.from_rotvec(x[:3]).as_matrix()
    s = 1.0 + float(x[3])
    return Similarity(s, rot, c + x[4:] - s * rot @ c)


def icp_similarity(
    points: np.ndarray,
    target: Surface,
    init: Similarity | None = None,
    max_iterations: int = 30,
    max_pair_mm: float = 10.0,
    tolerance_mm: float = 1e-3,
) -> tuple[Similarity, int]:
    """Point-to-plane ICP with isotropic scale, moving ``points`` onto ``target``.

    Each iteration matches the transformed points to their closest target vertices, keeps pairs in
    the region of intersection and takes a linearised point-to-plane step
    (:func:`point_to_plane_step`); it stops when the largest point displacement of a step is below
    ``tolerance_mm``. Returns the total transform and the iterations used."""
    tf = init or Similarity(1.0, np.eye(3), np.zeros(3))
    pts = np.asarray(points, dtype=np.float64)
    used = 0
    for it in range(1, max_iterations + 1):
        used = it
        moved = tf.apply(pts)
        _, idx, inside = closest_pairs(moved, target, max_pair_mm)
        if inside.sum() < 7:
            break
        step = point_to_plane_step(moved[inside], target.vertices[idx[inside]], target.normals[idx[inside]])
        tf = step.compose(tf)
        if np.abs(step.apply(moved) - moved).max() < tolerance_mm:
            break
    return tf, used


def point_to_plane(points: np.ndarray, target: Surface, max_pair_mm: float) -> np.ndarray:
    """|(p − q) · n_q| for each point inside the region of intersection (q its closest target vertex)."""
    _, idx, inside = closest_pairs(points, target, max_pair_mm)
    diff = points[inside] - target.vertices[idx[inside]]
    return np.abs(np.einsum("ij,ij->i", diff, target.normals[idx[inside]]))


@dataclass(frozen=True)
class GenovaError:
    mean_mm: float  # symmetric: mean of the two directional means
    pred_to_gt_mm: float
    gt_to_pred_mm: float
    overlap: float  # fraction of the cropped ground-truth vertices inside the region of intersection
    scale: float  # ICP's final scale applied to the prediction
    iterations: int


def genova_error(
    pred_vertices: np.ndarray,
    pred_triangles: np.ndarray,
    gt_vertices: np.ndarray,
    gt_triangles: np.ndarray,
    pred_landmarks: np.ndarray | None = None,
    gt_landmarks: np.ndarray | None = None,
    radius_mm: float = 95.0,
    max_points: int = 4000,
    max_pair_mm: float = 10.0,
    max_iterations: int = 30,
    seed: int = 0,
) -> GenovaError:
    """Genova et al.'s symmetric point-to-plane error of one sample (see the module doc).

    The ground truth is cropped to ``radius_mm`` around its nose tip (landmark 30 when landmarks are
    given, else its centroid); ICP starts from the landmark similarity when landmarks are given.
    ``max_points`` vertices per side (fixed random subset) keep the cost bounded on dense meshes."""
    gt_v = np.asarray(gt_vertices, np.float64)
    center = np.asarray(gt_landmarks)[NOSE_TIP] if gt_landmarks is not None else gt_v.mean(0)
    gv, gt_t = submesh(gt_v, gt_triangles, crop_mask(gt_v, center, radius_mm))
    if len(gv) < 3:
        raise ValueError(f"fewer than 3 ground-truth vertices within {radius_mm} mm of the nose tip")
    gt_surf = Surface.from_mesh(gv, gt_t)
    init = None
    if pred_landmarks is not None and gt_landmarks is not None:
        init = similarity_transform(pred_landmarks, gt_landmarks)
    rng = np.random.default_rng(seed)
    pv = np.asarray(pred_vertices, np.float64)
    # ICP points from the part of the prediction that can overlap the cropped truth
    start = init.apply(pv) if init is not None else pv
    near = np.flatnonzero(crop_mask(start, center, radius_mm + max_pair_mm))
    near = near if len(near) >= 3 else np.arange(len(pv))
    sample = np.sort(rng.choice(near, size=min(max_points, len(near)), replace=False))
    tf, iters = icp_similarity(pv[sample], gt_surf, init, max_iterations, max_pair_mm)
    pred_surf = Surface.from_mesh(tf.apply(pv), pred_triangles)
    d_pg = point_to_plane(pred_surf.vertices[sample], gt_surf, max_pair_mm)
    gsample = np.sort(rng.choice(len(gv), size=min(max_points, len(gv)), replace=False))
    d_gp = point_to_plane(gv[gsample], pred_surf, max_pair_mm)
    if not len(d_pg) or not len(d_gp):
        raise ValueError("prediction and ground truth do not overlap after ICP")
    return GenovaError(
        float((d_pg.mean() + d_gp.mean()) / 2.0),
        float(d_pg.mean()),
        float(d_gp.mean()),
        float(len(d_gp) / len(gsample)),
        tf.scale,
        iters,
    )


# --- grouping -----------------------------------------------------------------------------------
YAW_BINS = tuple(range(90, -1, -10))  # the paper's Table 1 columns: ±90° … ±10°, 0°


def yaw_bin(yaw_deg: float) -> int:
    """|yaw| rounded to the nearest 10° (capped at 90): the Table 1 column a sample belongs to."""
    return int(min(90, 10 * round(abs(float(yaw_deg)) / 10.0)))


def yaw_bin_label(b: int) -> str:
    return "0°" if b == 0 else f"±{b}°"


def expression_bin_label(level_mm: float, edges_mm: list[float]) -> str:
    """Label of the expression bin: '< e0 mm', 'e0–e1 mm', …, '≥ ek mm'."""
    edges = sorted(float(e) for e in edges_mm)
    if not edges or level_mm < edges[0]:
        return f"< {edges[0]:g} mm" if edges else "all"
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        if lo <= level_mm < hi:
            return f"{lo:g}–{hi:g} mm"
    return f"≥ {edges[-1]:g} mm"


def expression_bin_labels(edges_mm: list[float]) -> list[str]:
    edges = sorted(float(e) for e in edges_mm)
    if not edges:
        return ["all"]
    return (
        [f"< {edges[0]:g} mm"]
        + [f"{lo:g}–{hi:g} mm" for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
        + [f"≥ {edges[-1]:g} mm"]
    )
