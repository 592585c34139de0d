"""What every face-embedding backend provides.

A backend maps (image, 68 landmarks) to a fixed-length vector whose Euclidean distance is small for
two photos of one person. The fit stage's identity screening and ``morphset overlap`` compare
distances in the backend's own units, so thresholds are documented per backend (docs/identity.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

# Per face: the embedding (dim,) float32, or an error text.
EmbeddingResult = np.ndarray | str


class EmbeddingBackend(ABC):
    """Embeds aligned faces; created once per worker process (heavy)."""

    name: str  # as written to the embeddings table
    version: str  # package version of the backend
    weights_sha256: str  # sha256 of the weights file actually loaded
    dim: int  # embedding length

    @abstractmethod
    def embed(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[EmbeddingResult]:
        """For each (RGB uint8 image, (68, 2) landmarks in its pixels): the embedding of the face
        aligned from those landmarks. Never raises for one bad face: its entry is an error text."""
