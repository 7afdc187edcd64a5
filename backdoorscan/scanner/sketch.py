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
        stop = start + len(xb)
        if self.tokens:
            self.matrix[start:stop] = self._project_tokens(xb)
            return
        v = xb.reshape(len(xb), -1).astype(np.float32)
        self.matrix[start:stop] = v @ self._projection(v.shape[1])

    def _projection(self, width: int) -> np.ndarray:
        if self._proj is None:
            rng = np.random.default_rng(self.seed)
            self._proj = (rng.standard_normal((width, self.dim)) / np.sqrt(self.dim)).astype(
                np.float32
            )
        return self._proj

    def _project_tokens(self, xb: np.ndarray) -> np.ndarray:
        """The hashed bag of tokens (id 0 pads and is left out), length-normalised, projected:
        the sum of the projection rows of a sequence's tokens over the norm of its bag, without
        forming the ``[n, HASH_BUCKETS]`` bag."""
        proj = self._projection(HASH_BUCKETS)
        ids = xb.reshape(len(xb), -1).astype(np.int64)
        used = ids > 0
        buckets = ids % HASH_BUCKETS
        sums = np.einsum("ntd,nt->nd", proj[buckets], used.astype(np.float32))
        rows = np.broadcast_to(np.arange(len(xb))[:, None], ids.shape)[used]
        _, first, counts = np.unique(
            rows * HASH_BUCKETS + buckets[used], return_index=True, return_counts=True
        )
        sq = np.bincount(rows[first], weights=counts.astype(np.float64) ** 2, minlength=len(xb))
        return sums / np.maximum(np.sqrt(sq), 1e-12)[:, None].astype(np.float32)
