"""Who is who, from face embeddings (pure math): the screening of one subject's images, and
subject centres for comparing two runs.

Per subject, the embedded images are clustered (average linkage on Euclidean distances, cut at
``cluster_distance``). When the second-largest cluster holds at least ``ambiguous_ratio`` times
the images of the largest, the subject is two (or more) comparable people: every image is
``identity_ambiguous``. Otherwise the subject's centre is the mean embedding of its largest
cluster (robust: planted minorities do not move it), and an image farther than
``outlier_distance`` from it is an ``identity_outlier``. Images without an embedding are not
judged. Distances are in the embedding backend's units (docs/identity.md has the dlib figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

OUTLIER = "identity_outlier"
AMBIGUOUS = "identity_ambiguous"


@dataclass(frozen=True)
class ScreenParams:
    outlier_distance: float
    cluster_distance: float
    ambiguous_ratio: float


def clusters(embeddings: np.ndarray, cluster_distance: float) -> np.ndarray:
    """Cluster label per row (0 = the largest cluster, then by size; ties by first row)."""
    n = len(embeddings)
    if n < 2:
        return np.zeros(n, dtype=int)
    raw = fcluster(linkage(embeddings, method="average", metric="euclidean"), cluster_distance, "distance")
    labels, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))  # biggest first, then the earliest
    rank = np.empty(len(labels), dtype=int)
    rank[order] = np.arange(len(labels))
    return rank[np.searchsorted(labels, raw)]


def screen_subject(embeddings: np.ndarray, p: ScreenParams) -> tuple[list[str | None], np.ndarray | None]:
    """Reasons (None = kept) per row of one subject's (n, dim) embeddings, and its centre (None
    for an ambiguous subject)."""
    n = len(embeddings)
    if n == 0:
        return [], None
    lab = clusters(embeddings, p.cluster_distance)
    sizes = np.bincount(lab)
    if len(sizes) > 1 and sizes[1] >= p.ambiguous_ratio * sizes[0]:
        return [AMBIGUOUS] * n, None
    centre = embeddings[lab == 0].mean(axis=0)
    far = np.linalg.norm(embeddings - centre, axis=1) > p.outlier_distance
    return [OUTLIER if f else None for f in far], centre


def screen_identities(
    subjects: np.ndarray, embeddings: np.ndarray, p: ScreenParams
) -> tuple[list[str | None], dict[str, np.ndarray]]:
    """Screen every subject of a table: ``subjects`` (N,), ``embeddings`` (N, dim) with NaN rows
    for images without one. Returns a reason per row and each judged subject's centre."""
    reasons: list[str | None] = [None] * len(subjects)
    centres: dict[str, np.ndarray] = {}
    have = np.all(np.isfinite(embeddings), axis=1) if embeddings.size else np.zeros(len(subjects), bool)
    subjects = np.asarray(subjects, dtype=object)
    for s in dict.fromkeys(subjects[have].tolist()):
        rows = np.flatnonzero(have & (subjects == s))
        rs, centre = screen_subject(embeddings[rows], p)
        for r, why in zip(rows, rs, strict=True):
            reasons[r] = why
        if centre is not None:
            centres[s] = centre
    return reasons, centres


def embedding_matrix(column: object, n: int) -> np.ndarray:
    """(n, dim) float64 from an Arrow list column (NaN rows where null); (n, 0) if none is set."""
    import pyarrow as pa

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    if not valid.any():
        return np.full((n, 0), np.nan)
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    dim = int(lengths[valid][0])
    if np.any(lengths[valid] != dim):
        raise ValueError(
            f"embeddings of different lengths in one table: {sorted(set(lengths[valid].tolist()))}"
        )
    out = np.full((n, dim), np.nan)
    out[valid] = np.asarray(col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)).reshape(
        -1, dim
    )
    return out
