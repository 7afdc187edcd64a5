"""Compiled clustering core: PCA, FastICA, k-means and silhouette on float64 arrays.

Imports numpy and numba only. Arrays in, arrays out, explicit integer seeds; kernels are
compiled on first use and cached on disk (``cache=True``; on a read-only install numba uses
``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

from .ica import fastica
from .kmeans import kmeans
from .pca import pca
from .silhouette import silhouette_samples, silhouette_score

__all__ = ["fastica", "kmeans", "pca", "silhouette_samples", "silhouette_score"]
