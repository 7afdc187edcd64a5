"""Compiled clustering core: PCA, FastICA, k-means and silhouette on float64 arrays.

Imports numpy and numba only. Arrays in, arrays out, explicit integer seeds; kernels are
compiled on first use and cached on disk (``cache=True``; on a read-only install numba uses
``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import sys

from numba.core import event as _event

from .ica import fastica
from .kmeans import kmeans
from .median import column_medians
from .pca import pca
from .silhouette import silhouette_samples, silhouette_score

__all__ = [
    "column_medians",
    "fastica",
    "kmeans",
    "pca",
    "silhouette_samples",
    "silhouette_score",
]


class _CompileNotice(_event.Listener):
    """One line on stderr, once per process, when a kernel of this package is about to be
    compiled. Numba fires ``numba:compile`` only after a disk-cache miss, so a process that
    loads the cached kernels says nothing."""

    said = False

    def on_start(self, event: _event.Event) -> None:
        if _CompileNotice.said:
            return
        func = getattr(event.data.get("dispatcher"), "py_func", None)
        if (getattr(func, "__module__", "") or "").startswith(__name__ + "."):
            _CompileNotice.said = True
            print(
                "compiling the clustering kernels (first run only: Numba caches them on disk)...",
                file=sys.stderr,
                flush=True,
            )

    def on_end(self, event: _event.Event) -> None:
        pass


_event.register("numba:compile", _CompileNotice())
