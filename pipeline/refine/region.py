"""The part of the model the refinement looks at: the face inside its jaw line, closed over the
brows, and the vertices its photometric term samples (one per cell of a grid on the frontal face,
so the term weighs area, not the mesh's density)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.path import Path as PolygonPath
from scipy.spatial import Delaunay, cKDTree

from pipeline.landmarks.scheme import LandmarkScheme
from pipeline.models.morphable_model import MorphableModel
from pipeline.refine.photometric import RegionModel


def face_region(model: MorphableModel, scheme: LandmarkScheme, forehead_mm: float = 12.0) -> np.ndarray:
    """(R,) vertex ids inside the jaw line closed over the brows raised by ``forehead_mm``, on
    the frontal mean face."""
    mean = model.mean.reshape(-1, 3).astype(np.float64)
    points = model.landmarks_of(scheme).locate(mean)
    jaw = points[scheme.group("jaw")][:, :2]
    brows = points[scheme.group("brows")][::-1, :2] + np.array([0.0, forehead_mm])
    outline = PolygonPath(np.concatenate([jaw, brows]))
    front = mean[:, 2] > np.percentile(mean[:, 2], 20)  # not the back of an ear seen from the front
    return np.flatnonzero(outline.contains_points(mean[:, :2]) & front)


def grid_samples(xy: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Indices into ``xy`` (n, 2): the point nearest each occupied cell's centre of a square grid."""
    cell = np.floor(xy / spacing_mm).astype(np.int64)
    centre = (cell + 0.5) * spacing_mm
    dist = np.sum((xy - centre) ** 2, axis=1)
    key = cell[:, 0] * 1_000_003 + cell[:, 1]
    order = np.lexsort((dist, key))
    first = np.ones(order.size, bool)
    first[1:] = key[order][1:] != key[order][:-1]
    return np.sort(order[first])


def sample_mesh(xy: np.ndarray, longest_mm: float) -> np.ndarray:
    """(T, 3) triangles over points ``xy`` (n, 2) (the frontal face: counter-clockwise seen from
    the front, so outward): their Delaunay triangulation less the triangles with an edge longer
    than ``longest_mm`` (the outline's concave parts)."""
    tri = Delaunay(xy).simplices.astype(np.int64)
    a, b, c = (xy[tri[:, i]] for i in range(3))
    longest = np.max(
        [np.linalg.norm(b - a, axis=1), np.linalg.norm(c - b, axis=1), np.linalg.norm(a - c, axis=1)], 0
    )
    tri = tri[longest <= longest_mm]
    cross = (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]
    flip = cross[longest <= longest_mm] < 0
    tri[flip] = tri[flip][:, [0, 2, 1]]
    return tri


def mirror_pairs(points: np.ndarray, face: np.ndarray, spacing_mm: float) -> np.ndarray:
    """(n,) for each of ``points`` (n, 3) the index of the one nearest its mirror image across
    the midline of ``face`` (the whole mean face, whose x is near symmetric about its median), or
    its own index where none lies within a sample spacing (an asymmetric edge of the region)."""
    x0 = float(np.median(face[:, 0]))
    mirrored = points * [-1.0, 1.0, 1.0] + [2.0 * x0, 0.0, 0.0]
    dist, nearest = cKDTree(points).query(mirrored)
    return np.where(dist <= spacing_mm, nearest, np.arange(len(points)))


def region_model(
    model: MorphableModel,
    scheme: LandmarkScheme,
    spacing_mm: float,
    device: torch.device | str = "cpu",
    forehead_mm: float = 12.0,
) -> tuple[RegionModel, np.ndarray]:
    """(the model at the face region's samples as tensors, the samples' vertex ids). The samples
    carry a mesh of their own (their frontal Delaunay triangulation) for normals and visibility:
    a face's shading needs no finer one, and the refinement's cost follows the samples."""
    region = face_region(model, scheme, forehead_mm)
    mean = model.mean.reshape(-1, 3)
    ids = region[grid_samples(mean[region, :2].astype(np.float64), spacing_mm)]
    xy = mean[ids, :2].astype(np.float64)
    coords = (xy - xy.mean(0)) / np.abs(xy - xy.mean(0)).max()
    tri = sample_mesh(xy, 3.0 * spacing_mm)
    k_id, k_exp = model.k_id, model.k_exp
    id_basis = (model.id_basis * model.id_std).reshape(-1, 3, k_id)
    exp_basis = (model.exp_basis * model.exp_std).reshape(-1, 3, k_exp)
    lm_mean, lm_id, lm_exp = model.landmark_model(scheme)
    inner = scheme.inner
    m, i, e = mean[ids].astype(np.float64), id_basis[ids], exp_basis[ids]

    def t(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    return (
        RegionModel(
            mean=t(mean[ids]),
            id_basis=t(id_basis[ids]),
            exp_basis=t(exp_basis[ids]),
            triangles=t(tri, torch.int64),
            landmark_mean=t(lm_mean[inner]),
            landmark_id=t(lm_id[inner] * model.id_std),
            landmark_exp=t(lm_exp[inner] * model.exp_std),
            coords=t(coords),
            edge_mean=t(np.stack([m[tri[:, 1]] - m[tri[:, 0]], m[tri[:, 2]] - m[tri[:, 0]]])),
            edge_id=t(np.stack([i[tri[:, 1]] - i[tri[:, 0]], i[tri[:, 2]] - i[tri[:, 0]]])),
            edge_exp=t(np.stack([e[tri[:, 1]] - e[tri[:, 0]], e[tri[:, 2]] - e[tri[:, 0]]])),
            mirror=t(mirror_pairs(m, model.mean.reshape(-1, 3), spacing_mm), torch.int64),
        ),
        ids,
    )
