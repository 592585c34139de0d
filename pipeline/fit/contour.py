"""Jaw-line contour correspondence: re-pick the silhouette vertex of each contour landmark per image.

The 2D jaw landmarks (iBUG 0-16) are drawn on the visible face outline, which at large yaw is
not where the fixed model vertex is. As in eos and 3DDFA, each contour landmark gets a set of
candidate vertices: a horizontal band of the mean face at the height of its model vertex, from
the cheek to just outside the vertex. Given the current pose and shape, the candidate that lies
outermost in the image (smallest image x on the image-left contour, largest on the right) is the
silhouette point and becomes that landmark's vertex for the next expression and identity steps.
The chin points (7-9) run horizontally along the outline and keep their fixed vertices.

Candidates are found once per model (NumPy, at load time); selection and gathering are array-API
code batched over subjects and images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from pipeline.fit.camera import project
from pipeline.fit.linear import shape_points
from pipeline.fit.xp import namespace_of
from pipeline.landmarks.scheme import IBUG68
from pipeline.models.morphable_model import MorphableModel

Array = Any
CONTOUR_LANDMARKS = IBUG68.contour


@dataclass(frozen=True)
class ContourCandidates:
    """Candidate vertices per contour landmark (NumPy; candidate 0 is the model's own vertex)."""

    landmark_ids: np.ndarray  # (n_c,) which of the 68 landmarks are re-picked
    side: np.ndarray  # (n_c,) +1: outermost = largest image x; -1: smallest
    vertices: np.ndarray  # (n_c, C) vertex indices, short rows padded by repeating candidate 0

    @property
    def n_candidates(self) -> int:
        return int(self.vertices.shape[1])


def build_candidates(
    model: MorphableModel,
    band_mm: float | None = None,
    inner: float = 0.45,
    outer: float = 1.15,
    depth_mm: float = 45.0,
    max_candidates: int | None = 24,
) -> ContourCandidates:
    """Candidate sets from the mean shape.

    ``band_mm``: half-height of the horizontal band (default 1.5x the median vertex spacing, at
    least 2 mm); candidates have ``inner*|x0| <= |x| <= outer*|x0|`` on the landmark's side and
    lie at most ``depth_mm`` behind it (keeps ears and the back of the head out);
    ``max_candidates`` evenly subsamples the band by |x| (None keeps all).
    """
    V = model.mean.reshape(-1, 3).astype(np.float64)
    if band_mm is None:
        d, _ = cKDTree(V).query(V, k=2)
        band_mm = max(2.0, 1.5 * float(np.median(d[:, 1])))
    ids = np.asarray(CONTOUR_LANDMARKS, dtype=np.int64)
    sets, sides = [], []
    for lm in ids:  # 14 landmarks, once per model: a loop here is set-up, not the fitting path
        v0 = int(model.landmarks_of(IBUG68).nearest[lm])
        x0, y0, z0 = V[v0]
        side = 1.0 if x0 >= 0 else -1.0
        ax = np.abs(V[:, 0])
        sel = (
            (np.abs(V[:, 1] - y0) <= band_mm)
            & (np.sign(V[:, 0]) == side)
            & (ax >= inner * abs(x0))
            & (ax <= outer * abs(x0))
            & (V[:, 2] >= z0 - depth_mm)
        )
        cand = np.flatnonzero(sel)
        cand = cand[np.argsort(ax[cand], kind="stable")]
        if max_candidates is not None and cand.size > max_candidates - 1:
            cand = cand[np.linspace(0, cand.size - 1, max_candidates - 1).round().astype(np.int64)]
        cand = np.concatenate([[v0], cand[cand != v0]])
        sets.append(cand)
        sides.append(side)
    width = max(len(c) for c in sets)
    verts = np.stack([np.pad(c, (0, width - len(c)), mode="constant", constant_values=c[0]) for c in sets])
    return ContourCandidates(ids, np.asarray(sides), verts.astype(np.int64))


@dataclass(frozen=True)
class ContourBasis:
    """Model rows of all candidates, component-major, in the fitting namespace."""

    side: Array  # (n_c,)
    n_contour: int
    n_candidates: int
    mean: Array  # (3, n_c*C)
    id_basis: Array  # (3, n_c*C, k_id)
    exp_basis: Array  # (3, n_c*C, k_exp)


def contour_basis(
    model: MorphableModel, cand: ContourCandidates, xp: Any, dtype: Any, whiten: bool = False
) -> ContourBasis:
    """Gather the candidate vertices' mean and basis rows once per model (``whiten``: columns
    scaled by the model stds, for coefficients in std units as the fit uses them)."""
    v = cand.vertices.reshape(-1)
    rows = (v[None, :] * 3 + np.arange(3)[:, None]).reshape(-1)  # component-major rows

    def take(a: np.ndarray) -> Array:
        return xp.asarray(np.ascontiguousarray(a[rows].reshape(3, v.size, *a.shape[1:])), dtype=dtype)

    return ContourBasis(
        side=xp.asarray(cand.side, dtype=dtype),
        n_contour=int(cand.vertices.shape[0]),
        n_candidates=int(cand.vertices.shape[1]),
        mean=take(model.mean.astype(np.float64)),
        id_basis=take(model.id_basis.astype(np.float64) * (model.id_std if whiten else 1.0)),
        exp_basis=take(model.exp_basis.astype(np.float64) * (model.exp_std if whiten else 1.0)),
    )


def select_silhouette(
    cb: ContourBasis, alpha_id: Array, alpha_exp: Array, f: Array, R: Array, t: Array
) -> Array:
    """Index (S, M, n_c) of the outermost candidate in the image for every image at once."""
    xp = namespace_of(alpha_id, alpha_exp, f)
    X = shape_points(cb.mean, cb.id_basis, alpha_id[:, None, :])  # (S, 1, 3, n_c*C)
    X = X + (cb.exp_basis @ alpha_exp[..., None, :, None])[..., 0]  # (S, M, 3, n_c*C)
    x_img = project(X, f, R, t)[..., 0, :]
    x_img = xp.reshape(x_img, x_img.shape[:-1] + (cb.n_contour, cb.n_candidates))
    # Padding repeats candidate 0, so it can never beat the real candidates strictly.
    return xp.argmax(cb.side[:, None] * x_img, axis=-1)


def gather(cb: ContourBasis, choice: Array) -> tuple[Array, Array, Array]:
    """Per-image rows of the chosen vertices: mean (S, M, 3, n_c), id (S, M, 3, n_c, k_id), exp (..., k_exp)."""
    xp = namespace_of(choice)
    S, M, n_c = choice.shape
    offset = xp.arange(n_c, dtype=choice.dtype) * cb.n_candidates
    g = xp.reshape(choice + offset, (-1,))

    def pick(a: Array) -> Array:
        sel = xp.take(a, g, axis=1)  # (3, S*M*n_c, ...)
        sel = xp.reshape(sel, (3, S, M, n_c) + tuple(a.shape[2:]))
        return xp.permute_dims(sel, (1, 2, 0, *range(3, sel.ndim)))

    return pick(cb.mean), pick(cb.id_basis), pick(cb.exp_basis)
