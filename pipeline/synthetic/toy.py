"""Synthetic landmark observations drawn from a morphable model (tests and ``benchmarks/fit.py``).

:func:`synthesize` draws identities, expressions and poses, projects the 68 landmark vertices
with the stage's camera convention into an image (y down) and adds Gaussian pixel noise. With
``silhouette=True`` the jaw landmarks are the outermost visible mesh points of a wide horizontal
band (every band vertex, not the fitter's subsampled candidates), as a human annotator would put
them at large yaw.

:func:`toy_model` is a small face-shaped model (height-field mesh, iBUG-like landmark layout,
smooth random bases) for tests and for benchmarking when no converted model is available.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat.numpy as anp
import numpy as np
from scipy.spatial import Delaunay

from pipeline.fit import contour as contour_mod
from pipeline.fit.camera import rotation_from_euler_deg
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.correspondence import Correspondence
from pipeline.models.morphable_model import MorphableModel

# iBUG-68 layout on the toy face, (x, y) mm, x to image right, y up.
_JAW = [(72 * np.cos(a), -10 + 95 * np.sin(a)) for a in np.deg2rad(np.linspace(170.0, 370.0, 17))]
_BROWS = [
    (-55, 38),
    (-45, 44),
    (-34, 46),
    (-23, 45),
    (-12, 42),
    (12, 42),
    (23, 45),
    (34, 46),
    (45, 44),
    (55, 38),
]
_NOSE = [(0, 30), (0, 18), (0, 6), (0, -6), (-14, -16), (-7, -18), (0, -19), (7, -18), (14, -16)]
_EYES = [(-48, 25), (-40, 29), (-28, 29), (-20, 25), (-28, 21), (-40, 21)]
_EYES += [(20, 25), (28, 29), (40, 29), (48, 25), (40, 21), (28, 21)]
_MOUTH = [(-25, -45), (-16, -38), (-6, -35), (0, -36), (6, -35), (16, -38), (25, -45)]
_MOUTH += [(16, -53), (6, -56), (0, -57), (-6, -56), (-16, -53)]
_MOUTH += [(-20, -45), (-7, -42), (0, -42), (7, -42), (20, -45), (7, -48), (0, -48), (-7, -48)]
TOY_LANDMARKS_XY = np.asarray(_JAW + _BROWS + _NOSE + _EYES + _MOUTH, dtype=np.float64)


def _similarity_motions(verts: np.ndarray) -> np.ndarray:
    """Orthonormal basis (3n, 7) of infinitesimal translations, rotations and scaling of ``verts``."""
    c = verts - verts.mean(axis=0)
    n = len(verts)
    cols = [np.tile(np.eye(3)[i], n) for i in range(3)]
    for axis in np.eye(3):
        cols.append(np.cross(axis, c).reshape(-1))
    cols.append(c.reshape(-1))
    q, _ = np.linalg.qr(np.stack(cols, axis=1))
    return q


def _rbf_fields(
    rng: np.random.Generator, verts: np.ndarray, k: int, centres: np.ndarray, width: float
) -> np.ndarray:
    """k random smooth 3D displacement fields, each 1 mm RMS: (3n, k).

    Similarity motions are projected out, as in a PCA model of Procrustes-aligned scans; without
    that a basis vector can mimic a change of pose and the pose/shape alternation crawls.
    """
    xy = verts[:, :2]
    phi = np.exp(-np.sum((xy[:, None, :] - centres[None]) ** 2, axis=-1) / (2 * width**2))  # (n, c)
    coef = rng.standard_normal((centres.shape[0], 3, k))
    fields = np.einsum("nc,cdk->ndk", phi, coef).reshape(-1, k)
    q = _similarity_motions(verts)
    fields -= q @ (q.T @ fields)
    return fields / np.sqrt(np.mean(fields**2, axis=0, keepdims=True))


def toy_model(k_id: int = 40, k_exp: int = 10, seed: int = 0, spacing_mm: float = 3.0) -> MorphableModel:
    """A face-shaped height-field model with an iBUG-like landmark layout."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(-84, 84.1, spacing_mm), np.arange(-112, 92.1, spacing_mm))
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    xy = xy[(xy[:, 0] / 80) ** 2 + ((xy[:, 1] + 10) / 102) ** 2 <= 1.0]
    z = 95 * np.sqrt(np.clip(1 - (xy[:, 0] / 86) ** 2 - ((xy[:, 1] + 10) / 118) ** 2, 0, None))
    z += 24 * np.exp(-(xy[:, 0] ** 2 / (2 * 10**2) + (xy[:, 1] + 2) ** 2 / (2 * 18**2)))
    verts = np.column_stack([xy, z])
    lm = np.argmin(np.sum((xy[None] - TOY_LANDMARKS_XY[:, None]) ** 2, axis=-1), axis=1)
    if len(set(lm.tolist())) != len(TOY_LANDMARKS_XY):
        raise ValueError(f"toy_model: spacing {spacing_mm} mm merges landmark vertices; use a finer grid")
    tri = Delaunay(xy).simplices.astype(np.int64)
    e1, e2 = xy[tri[:, 1]] - xy[tri[:, 0]], xy[tri[:, 2]] - xy[tri[:, 0]]
    flip = (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]) < 0  # counter-clockwise in x-y = normal towards +z
    tri[flip] = tri[flip][:, [0, 2, 1]]
    id_centres = rng.uniform([-80, -110], [80, 90], size=(24, 2))
    exp_centres = np.asarray([[-22, -45], [22, -45], [0, -55], [0, -38], [-34, 30], [34, 30], [0, -80]])
    return MorphableModel(
        name=f"toy-{k_id}id-{k_exp}exp-seed{seed}",
        mean=verts.reshape(-1).astype(np.float32),
        id_basis=_rbf_fields(rng, verts, k_id, id_centres, 30.0).astype(np.float32),
        id_std=np.geomspace(4.0, 0.4, k_id).astype(np.float32),
        exp_basis=_rbf_fields(rng, verts, k_exp, exp_centres, 14.0).astype(np.float32),
        exp_std=np.geomspace(3.0, 0.5, k_exp).astype(np.float32),
        landmark_maps={IBUG68.name: Correspondence.at_vertices(IBUG68.name, lm)},
        triangles=tri,
        source_sha256="0" * 64,
        licence="synthetic test model",
    )


@dataclass
class SyntheticSet:
    landmarks: np.ndarray  # (S, M, 68, 2) image pixels, y down
    alpha_id: np.ndarray  # (S, k_id)
    alpha_exp: np.ndarray  # (S, M, k_exp)
    scale: np.ndarray  # (S, M) px per mm
    rotation: np.ndarray  # (S, M, 3, 3)
    yaw: np.ndarray  # (S, M) degrees
    translation: np.ndarray  # (S, M, 2) image pixels: u = (tx + f (RX)_x, ty - f (RX)_y)


def synthesize(
    model: MorphableModel,
    n_subjects: int,
    n_images: int,
    noise_px: float = 0.0,
    seed: int = 0,
    max_yaw: float = 60.0,
    max_pitch: float = 15.0,
    max_roll: float = 10.0,
    scale: float = 1.2,
    image_size: int = 250,
    expression_scale: float = 1.0,
    silhouette: bool = False,
) -> SyntheticSet:
    """Landmarks of ``n_subjects`` x ``n_images`` random faces (coefficients ~ N(0, std^2))."""
    rng = np.random.default_rng(seed)
    S, M = n_subjects, n_images
    a_id = rng.standard_normal((S, model.k_id)) * model.id_std
    a_exp = rng.standard_normal((S, M, model.k_exp)) * model.exp_std * expression_scale
    yaw = rng.uniform(-max_yaw, max_yaw, (S, M))
    R = rotation_from_euler_deg(
        yaw, rng.uniform(-max_pitch, max_pitch, (S, M)), rng.uniform(-max_roll, max_roll, (S, M))
    )
    f = scale * rng.uniform(0.9, 1.1, (S, M))
    c = image_size / 2.0
    t = np.stack([c + rng.uniform(-5, 5, (S, M)), c + rng.uniform(-5, 5, (S, M))], axis=-1)
    mean, idb, expb = (a.astype(np.float64) for a in model.landmark_model(IBUG68))
    X = mean + np.einsum("lck,sk->slc", idb, a_id)[:, None] + np.einsum("lck,smk->smlc", expb, a_exp)
    if silhouette:
        cand = contour_mod.build_candidates(model, max_candidates=None)
        cb = contour_mod.contour_basis(model, cand, anp, np.float64)
        t_up = np.stack([t[..., 0], -t[..., 1]], axis=-1)
        choice = contour_mod.select_silhouette(cb, a_id, a_exp, f, R, t_up)
        cm, ci, ce = contour_mod.gather(cb, choice)
        Xc = cm + (ci @ a_id[:, None, None, :, None])[..., 0] + (ce @ a_exp[:, :, None, :, None])[..., 0]
        X[:, :, cand.landmark_ids, :] = np.swapaxes(Xc, -1, -2)
    P = np.einsum("smij,smlj->smli", R[..., :2, :], X) * f[..., None, None]
    u = np.stack([t[..., None, 0] + P[..., 0], t[..., None, 1] - P[..., 1]], axis=-1)
    u = u + rng.standard_normal(u.shape) * noise_px
    return SyntheticSet(u, a_id, a_exp, f, R, yaw, t)
