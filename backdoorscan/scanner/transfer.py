"""The transfer test: does the perturbation a cluster shares act as a trigger on the model?

Poison is made by stamping one trigger on samples of other classes. So the samples of a
poison cluster differ from their nearest neighbours outside the cluster (clean samples of
the source class) by nearly the same perturbation: the trigger. Stamping the median of those
differences on samples of other classes makes the poisoned model call them the cluster's
label. A genuine mode of a class differs from its neighbours in many directions at once; its
median difference is not a trigger, and the model ignores it. A trigger may act on one
source class only (the paper's l -> l+1 attack), so the samples stamped are drawn from every
other class alike, and the figure reported is the largest share, over those classes, of
stamped samples sent to the label (less the share sent there unstamped). That class is the
suspected source.

Token-id inputs have no additive perturbation: the tokens over-represented in the cluster,
compared with its neighbours, are inserted into other classes' sequences instead.
"""

from __future__ import annotations

import numpy as np

from backdoorscan.adapters.base import OnnxExport
from backdoorscan.kernels.knn import knn
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.data import Dataset

MAX_TRIGGER_TOKENS = 3


class TransferProbe:
    """Callable ``(indices, label, seed) -> (transfer rate, suspected source)`` for detect()."""

    def __init__(
        self,
        session: object,
        export: OnnxExport,
        data: Dataset,
        sketch: np.ndarray,
        config: DetectConfig,
    ) -> None:
        self.session = session
        self.export = export
        self.data = data
        self.sketch = sketch
        self.cfg = config
        self.labels = data.y
        self.tokens = np.issubdtype(np.dtype(data.dtype), np.integer)
        self.calls = 0

    def predict(self, xb: np.ndarray) -> np.ndarray:
        """Predicted classes of a converted batch."""
        out = []
        for s in range(0, len(xb), 256):
            (logits,) = self.session.run(  # type: ignore[attr-defined]
                [self.export.logits_name], {self.export.input_name: xb[s : s + 256]}
            )
            out.append(np.asarray(logits).reshape(len(xb[s : s + 256]), -1).argmax(axis=1))
        return np.concatenate(out)

    def __call__(
        self, cluster: np.ndarray, label: int, seed: int
    ) -> tuple[float, int | None, np.ndarray | None, dict[int, float]]:
        """Transfer rate of the cluster's shared perturbation, the class most sent to the label
        by it (the suspected source), the perturbation itself (None if none was found), and the
        rate for every class stamped."""
        self.calls += 1
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        queries = cluster
        if len(queries) > cfg.transfer_queries:
            queries = np.sort(rng.choice(cluster, size=cfg.transfer_queries, replace=False))
        outside = np.ones(len(self.labels), dtype=bool)
        outside[cluster] = False
        ref = np.flatnonzero(outside)
        targets_pool = np.flatnonzero(outside & (self.labels != label))
        if len(ref) == 0 or len(targets_pool) == 0:
            return 0.0, None, None, {}
        k = min(cfg.transfer_neighbors, len(ref))
        nn, _ = knn(self.sketch[queries], self.sketch[ref], k)
        nn_idx = ref[nn]  # [q, k] sample indices
        targets = self._stratified(targets_pool, rng)
        x_t = self.data.take(targets)
        if self.tokens:
            trigger = self._trigger_tokens(queries, nn_idx)
            stamped = None if trigger is None else self._insert_tokens(x_t, trigger, rng)
        else:
            trigger, lo, hi = self._trigger_perturbation(queries, nn_idx)
            stamped = np.clip(x_t + trigger, lo, hi).astype(x_t.dtype)
        if stamped is None:
            return 0.0, None, None, {}
        gained = (self.predict(stamped) == label).astype(float) - (
            self.predict(x_t) == label
        ).astype(float)
        t_labels = self.labels[targets]
        rates = {int(s): float(gained[t_labels == s].mean()) for s in np.unique(t_labels)}
        source = max(rates, key=rates.__getitem__)
        return rates[source], (source if rates[source] > 0 else None), trigger, rates

    def trigger_scores(self, indices: np.ndarray, trigger: np.ndarray) -> np.ndarray:
        """How strongly each sample carries ``trigger``: its projection on the perturbation, or
        for token inputs the share of the trigger tokens it contains."""
        out = np.empty(len(indices), dtype=np.float64)
        norm = float((trigger.astype(np.float64) ** 2).sum()) if not self.tokens else 1.0
        for s in range(0, len(indices), 1024):
            xb = self.data.take(indices[s : s + 1024])
            if self.tokens:
                flat = xb.reshape(len(xb), -1)
                hits = np.stack([(flat == t).any(axis=1) for t in trigger], axis=1)
                out[s : s + len(xb)] = hits.mean(axis=1)
            else:
                flat = xb.reshape(len(xb), -1).astype(np.float64)
                out[s : s + len(xb)] = (
                    flat @ trigger.reshape(-1).astype(np.float64) / max(norm, 1e-12)
                )
        return out

    def _stratified(self, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Up to an equal number of samples from each class in ``pool``."""
        classes = np.unique(self.labels[pool])
        per_class = max(self.cfg.transfer_samples // max(len(classes), 1), 20)
        picks = []
        for s in classes:
            members = pool[self.labels[pool] == s]
            picks.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
        return np.sort(np.concatenate(picks))

    def _trigger_perturbation(
        self, queries: np.ndarray, nn_idx: np.ndarray
    ) -> tuple[np.ndarray, float, float]:
        xq = self.data.take(queries).astype(np.float64)
        k = nn_idx.shape[1]
        flat_nn = self.data.take(nn_idx.ravel()).astype(np.float64)
        neighbours = flat_nn.reshape(len(queries), k, *xq.shape[1:]).mean(axis=1)
        trigger = np.median(xq - neighbours, axis=0)
        lo = min(float(xq.min()), float(flat_nn.min()))
        hi = max(float(xq.max()), float(flat_nn.max()))
        return trigger, lo, hi

    def _trigger_tokens(self, queries: np.ndarray, nn_idx: np.ndarray) -> np.ndarray | None:
        xq = self.data.take(queries).reshape(len(queries), -1)
        xn = self.data.take(np.unique(nn_idx.ravel())).reshape(-1, xq.shape[1])
        df_q = _doc_freq(xq)
        df_n = _doc_freq(xn)
        tokens = sorted(set(df_q) | set(df_n), key=lambda t: df_q.get(t, 0) - df_n.get(t, 0))
        lift = [t for t in reversed(tokens) if df_q.get(t, 0) - df_n.get(t, 0) >= 0.5]
        if not lift:
            return None
        return np.array(lift[:MAX_TRIGGER_TOKENS], dtype=np.int64)

    def _insert_tokens(
        self, x_t: np.ndarray, trigger: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        trigger = trigger.astype(x_t.dtype)
        shape = x_t.shape
        flat = x_t.reshape(len(x_t), -1).copy()
        length = flat.shape[1]
        for row in flat:
            used = int((row != 0).sum())
            pos = int(rng.integers(0, max(used, 1) + 1))
            merged = np.concatenate([row[:pos], trigger, row[pos:used]])[:length]
            row[:] = 0
            row[: len(merged)] = merged
        return flat.reshape(shape)


def _doc_freq(x: np.ndarray) -> dict[int, float]:
    """Share of sequences holding each token id (pads, id 0, left out)."""
    counts: dict[int, int] = {}
    for row in x:
        for t in np.unique(row[row != 0]):
            counts[int(t)] = counts.get(int(t), 0) + 1
    return {t: c / len(x) for t, c in counts.items()}
