"""A small random sketch of each input sample, for nearest-neighbour questions in input space.

Images are flattened and projected to ``dim`` dimensions with a seeded Gaussian matrix, which
keeps Euclidean distances roughly (Johnson-Lindenstrauss); token-id inputs first become a
hashed, length-normalised bag of tokens. Built batch by batch during extraction.
"""

from __future__ import annotations

import numpy as np

HASH_BUCKETS = 4096


class InputSketch:
    """Fills an ``[n, dim]`` float32 matrix with projected inputs, one batch at a time."""

    def __init__(self, n: int, dim: int = 64, *, seed: int = 0, tokens: bool = False) -> None:
        self.matrix = np.empty((n, dim), dtype=np.float32)
        self.dim = dim
        self.seed = seed
        self.tokens = tokens
        self._proj: np.ndarray | None = None

    def add(self, start: int, xb: np.ndarray) -> None:
        """Project the batch starting at sample ``start``."""
        v = self._bag(xb) if self.tokens else xb.reshape(len(xb), -1).astype(np.float32)
        if self._proj is None:
            rng = np.random.default_rng(self.seed)
            width = v.shape[1]
            self._proj = (rng.standard_normal((width, self.dim)) / np.sqrt(self.dim)).astype(
                np.float32
            )
        self.matrix[start : start + len(xb)] = v @ self._proj

    @staticmethod
    def _bag(xb: np.ndarray) -> np.ndarray:
        ids = xb.reshape(len(xb), -1).astype(np.int64)
        bag = np.zeros((len(xb), HASH_BUCKETS), dtype=np.float32)
        rows = np.repeat(np.arange(len(xb)), ids.shape[1])
        flat = ids.ravel()
        keep = flat > 0  # id 0 pads sequences
        np.add.at(bag, (rows[keep], flat[keep] % HASH_BUCKETS), 1.0)
        norms = np.linalg.norm(bag, axis=1, keepdims=True)
        return bag / np.maximum(norms, 1e-12)
