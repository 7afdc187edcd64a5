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
compared with its neighbours, are inserted into other classes' sequences instead: never a
padding or special token (a tokenizer's [CLS], [SEP]: the data set's ``special_ids``), and
between the leading and trailing special tokens of each sequence, before its padding (the
data set's ``pad_id``, default 0; the model's attention mask follows the padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from backdoorscan.adapters.base import OnnxExport
from backdoorscan.kernels.knn import knn
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.data import Dataset
from backdoorscan.scanner.extract import predict_classes

MAX_TRIGGER_TOKENS = 3
# The first look at a perturbation (``transfer_screen`` samples per class) goes on to every
# sample when some class sends at least this share to the label. A trigger that sends half a
# class there passes with 10 samples per class in 99 % of draws; one that sends 70 % in 99.99 %.
SCREEN_PASS = 0.2
# A confirmed trigger is estimated again, more sharply, with its members' neighbours searched
# in a larger seeded sample of the data than the probe's: every sample up to this many (the
# same as searching them all), this many beyond, so that sharpening a trigger costs the same
# at a million samples as at sixty thousand.
REFINE_REFERENCE = 1 << 16


@dataclass
class Trigger:
    """A trigger as the transfer test estimated it: an additive perturbation of the model's
    input (``values`` shaped like one sample, stamped values clipped to ``[lo, hi]``), or for
    token inputs the token ids to insert (``tokens``)."""

    values: np.ndarray
    tokens: bool = False
    lo: float = -np.inf
    hi: float = np.inf
    pad: int = 0  # token inputs: the padding id, and the special ids kept at the ends
    special: tuple[int, ...] = ()

    def stamp(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``x`` (converted samples) carrying the trigger: added and clipped, or the trigger
        tokens inserted at a random position of each sequence."""
        if self.tokens:
            return _insert_tokens(x, self.values, rng, self.pad, self.special)
        return np.clip(x + self.values, self.lo, self.hi).astype(x.dtype)


@dataclass
class TransferResult:
    """What one transfer test found: the largest share of a stamped class sent to the label
    (``rate``, less the share sent there unstamped), that class (``source``, None when no
    class moved), the trigger estimated (None when none was found), the rate per class."""

    rate: float
    source: int | None
    trigger: Trigger | None
    rates: dict[int, float]
    # With ``transfer_null``: the rate against norm-matched non-triggers (scanner/calibrate.py).
    evidence: dict[str, Any] | None = None


NO_TRANSFER = TransferResult(0.0, None, None, {})


class TransferProbe:
    """Callable ``(indices, label, seed) -> TransferResult`` for detect()."""

    def __init__(
        self,
        session: object,
        export: OnnxExport,
        data: Dataset,
        sketch: np.ndarray,
        config: DetectConfig,
        predictions: np.ndarray | None = None,
    ) -> None:
        self.session = session
        self.export = export
        self.data = data
        self.sketch = sketch
        self.cfg = config
        self.labels = np.asarray(data.y)
        self.predictions = predictions
        self.tokens = np.issubdtype(np.dtype(data.dtype), np.integer)
        pad = getattr(data, "pad_id", None)  # a tokenised table's (scanner/published.py)
        self.pad = 0 if pad is None else int(pad)
        self.special = tuple(int(t) for t in getattr(data, "special_ids", ()))
        self.calls = 0
        n = len(self.labels)
        # One seeded sample of the data set answers every neighbour question: a cluster's
        # members need neighbours that look like them, not their very nearest in the set.
        ref_rng = np.random.default_rng(config.seed)
        size = min(n, config.transfer_reference) if config.transfer_reference > 0 else n
        if size < n:
            self._ref = np.sort(ref_rng.choice(n, size=size, replace=False))
            self._ref_sketch = self.sketch[self._ref]
        else:
            self._ref, self._ref_sketch = np.arange(n), self.sketch
        self._by_class = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}
        self._wide: tuple[np.ndarray, np.ndarray] | None = None  # made at the first refinement

    def predict(self, xb: np.ndarray) -> np.ndarray:
        """Predicted classes of a converted batch."""
        return predict_classes(self.session, self.export, xb)

    def __call__(self, cluster: np.ndarray, label: int, seed: int) -> TransferResult:
        """Transfer rate of the cluster's shared perturbation, the class most sent to the label
        by it (the suspected source), the perturbation itself, and the rate for every class
        stamped."""
        self.calls += 1
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        queries = self._queries(cluster, rng)
        inside = np.zeros(len(self.labels), dtype=bool)
        inside[cluster] = True
        targets = self._stratified(inside, label, rng)
        keep = ~inside[self._ref]
        nn_idx = self._neighbours(queries, self._ref[keep], self._ref_sketch[keep])
        if nn_idx is None or len(targets) == 0:
            return NO_TRANSFER
        trigger = self._estimate(queries, nn_idx)
        if trigger is None:
            return NO_TRANSFER
        x_t = self.data.take(targets)
        stamped = trigger.stamp(x_t, rng)
        before = self.predict(x_t) if self.predictions is None else self.predictions[targets]
        t_labels = self.labels[targets]
        sent = np.zeros(len(targets), dtype=bool)
        # A first look at a few samples of each class: a perturbation that sends almost none
        # of them to the label is no trigger, and the rest need not be asked.
        first = _first_per_class(t_labels, cfg.transfer_screen)
        sent[first] = self.predict(stamped[first]) == label
        if (
            len(first) < len(targets)
            and _rates(sent[first], before[first], t_labels[first], label).max() >= SCREEN_PASS
        ):
            rest = np.setdiff1d(np.arange(len(targets)), first)
            sent[rest] = self.predict(stamped[rest]) == label
        else:
            sent, before, t_labels = sent[first], before[first], t_labels[first]
        rates = dict(
            zip(np.unique(t_labels).tolist(), _rates(sent, before, t_labels, label), strict=True)
        )
        # The suspected source: the class moved most (ties to the lower label).
        source = max(sorted(rates), key=rates.__getitem__)
        found = TransferResult(rates[source], source if rates[source] > 0 else None, trigger, rates)
        if cfg.transfer_null and found.source is not None and found.rate >= cfg.transfer_threshold:
            from backdoorscan.scanner.calibrate import null_test  # it imports this module

            found.evidence = null_test(self, found, cluster, label, seed)
        return found

    def trigger(self, cluster: np.ndarray, seed: int) -> Trigger | None:
        """The cluster's shared perturbation, its members' neighbours searched among up to
        ``REFINE_REFERENCE`` samples outside it (all of them in a smaller data set) rather
        than the probe's sample: the sharper estimate that a confirmed trigger's per-sample
        refinement projects on."""
        rng = np.random.default_rng(seed)
        queries = self._queries(cluster, rng)
        if self._wide is None:
            n = len(self.labels)
            if n > REFINE_REFERENCE:
                wide = np.random.default_rng([self.cfg.seed, 1]).choice(
                    n, size=REFINE_REFERENCE, replace=False
                )
                wide = np.sort(wide)
                self._wide = wide, self.sketch[wide]
            else:
                self._wide = np.arange(n), self.sketch
        wide, wide_sketch = self._wide
        keep = ~np.isin(wide, cluster, assume_unique=True)
        nn_idx = self._neighbours(queries, wide[keep], wide_sketch[keep])
        if nn_idx is None:
            return None
        return self._estimate(queries, nn_idx)

    def _estimate(self, queries: np.ndarray, nn_idx: np.ndarray) -> Trigger | None:
        """The trigger the queries share against their neighbours (None if none)."""
        if self.tokens:
            ids = self._trigger_tokens(queries, nn_idx)
            return None if ids is None else Trigger(ids, True, pad=self.pad, special=self.special)
        values, lo, hi = self._trigger_perturbation(queries, nn_idx)
        return Trigger(values, lo=lo, hi=hi)

    def _queries(self, cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The cluster's members whose neighbours are searched (a seeded sample of them)."""
        if len(cluster) > self.cfg.transfer_queries:
            return np.sort(rng.choice(cluster, size=self.cfg.transfer_queries, replace=False))
        return cluster

    def _neighbours(
        self, queries: np.ndarray, ref: np.ndarray, ref_sketch: np.ndarray
    ) -> np.ndarray | None:
        """``[queries, k]`` sample indices of each query's nearest inputs among ``ref`` (sample
        indices outside the cluster, ``ref_sketch`` their sketch rows)."""
        if len(ref) == 0:
            return None
        nn, _ = knn(self.sketch[queries], ref_sketch, min(self.cfg.transfer_neighbors, len(ref)))
        return ref[nn]

    def trigger_scores(self, indices: np.ndarray, found: Trigger) -> np.ndarray:
        """How strongly each sample carries ``found``: its projection on the perturbation, or
        for token inputs the share of the trigger tokens it contains."""
        trigger = found.values
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

    def _stratified(self, inside: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
        """Up to an equal number of samples from each class other than ``label``, none of
        them in the cluster (``inside``)."""
        pools = [m[~inside[m]] for c, m in self._by_class.items() if c != label]
        pools = [m for m in pools if len(m)]
        if not pools:
            return np.empty(0, dtype=np.int64)
        per_class = max(self.cfg.transfer_samples // len(pools), 20)
        picks = [rng.choice(m, size=min(per_class, len(m)), replace=False) for m in pools]
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
        skip = (self.pad, *self.special)
        ids_q, df_q = _doc_freq(xq, skip)
        ids_n, df_n = _doc_freq(xn, skip)
        ids = np.union1d(ids_q, ids_n)
        lift = np.zeros(len(ids))
        lift[np.searchsorted(ids, ids_q)] += df_q
        lift[np.searchsorted(ids, ids_n)] -= df_n
        # The tokens far more common in the cluster than among its neighbours, most first
        # (ties to the lower id).
        order = np.lexsort((ids, -lift))
        order = order[lift[order] >= 0.5]
        if not len(order):
            return None
        return ids[order[:MAX_TRIGGER_TOKENS]].astype(np.int64)


def _insert_tokens(
    x_t: np.ndarray,
    trigger: np.ndarray,
    rng: np.random.Generator,
    pad: int = 0,
    special: tuple[int, ...] = (),
) -> np.ndarray:
    """Each sequence with the trigger tokens inserted at a random position between its
    leading and trailing special tokens (``special``, e.g. [CLS] and [SEP]); the padding
    (``pad``) stays at the end and the sequence keeps its length, so that a trigger pushed
    past the end cuts the last tokens, never the trailing special ones."""
    trigger = trigger.astype(x_t.dtype)
    shape = x_t.shape
    flat = x_t.reshape(len(x_t), -1).copy()
    length = flat.shape[1]
    marks = np.asarray(special, dtype=x_t.dtype)
    for row in flat:
        used = int((row != pad).sum())
        ends = np.isin(row[:used], marks)
        lead = int(np.argmin(ends)) if not ends.all() else used
        trail = int(np.argmin(ends[::-1])) if not ends.all() else 0
        pos = int(rng.integers(lead, max(used - trail, lead) + 1))
        body = np.concatenate([row[:pos], trigger, row[pos : used - trail]])
        body = body[: max(length - trail, 0)]
        merged = np.concatenate([body, row[used - trail : used]])[:length]
        row[:] = pad
        row[: len(merged)] = merged
    return flat.reshape(shape)


def _doc_freq(x: np.ndarray, skip: tuple[int, ...] = (0,)) -> tuple[np.ndarray, np.ndarray]:
    """Token ids present in the sequences (padding and special tokens, ``skip``, left out)
    and the share of sequences holding each."""
    rows = np.sort(x.reshape(len(x), -1), axis=1)
    first = np.ones(rows.shape, dtype=bool)
    first[:, 1:] = rows[:, 1:] != rows[:, :-1]
    ids, counts = np.unique(rows[first & ~np.isin(rows, skip)], return_counts=True)
    return ids, counts / max(len(x), 1)


def _first_per_class(labels: np.ndarray, m: int) -> np.ndarray:
    """Positions of the first ``m`` entries of each class in ``labels`` (all when m <= 0)."""
    if m <= 0:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], labels[order])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts
    return np.flatnonzero(rank < m)


def _rates(sent: np.ndarray, before: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray:
    """Per class (in sorted order), the share sent to ``label`` by the stamp, less the share
    the model gave that label unstamped."""
    gained = sent.astype(float) - (before == label).astype(float)
    classes, inverse = np.unique(labels, return_inverse=True)
    return np.bincount(inverse, weights=gained) / np.bincount(inverse, minlength=len(classes))
