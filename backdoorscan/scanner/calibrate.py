"""The transfer test calibrated per model: is the trigger's effect more than a non-trigger's?

A share of a class flipped by a perturbation means little by itself: a less robust model is
flipped by the difference between two genuine kinds of object, and a genuine mode of one class
differs from its neighbours in another class by just such a difference. So beside every
candidate trigger that passes the absolute threshold, the model is asked about perturbations
known not to be triggers, of the same size, stamped on the same samples of the suspected source
class:

- ``between``: the genuine difference between the label and the source class, estimated as the
  trigger is (the median difference of the label's samples outside the cluster to their nearest
  neighbours in the source class), scaled to the trigger's L1 norm; for token inputs, the same
  number of tokens most over-represented in the label's sequences against the source's;
- ``noise``: Gaussian noise of the trigger's L2 norm (image-like inputs only).

The evidence is the trigger's rate less the ``between`` rate (``effect``) and a one-sided
paired test on the same stamped samples (``p``: samples the trigger sends that the null does not,
against the reverse; McNemar's normal approximation). The candidate stands when both pass.
The noise rate is reported, not decisive: clean models measured here send almost nothing with
it, while a backdoored model may answer noise with its target (a residual CNN sent 0.58 of
one source class to a patch trigger's target), which is no reason to doubt the trigger.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from backdoorscan.kernels.knn import knn
from backdoorscan.scanner.transfer import TransferProbe, TransferResult, Trigger, _doc_freq

# A trigger must send more of its source class to the label than a non-trigger of its size
# does (by ``transfer_effect``), at this one-sided significance.
MAX_P = 0.01
# The genuine difference is scaled to the trigger's L1 norm (the same total change of the
# input). Matched in L2 instead, it sent 0.79 of the demo's 7s to 1 against the 2x2 patch's
# 0.99 on 8x8 digits (a sparse trigger is a large part of a small image's L2 norm).
NULL_NORM = 1
NULL_QUERIES = 100
MAX_STAMPED = 200


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided p of "``a`` sends more samples than ``b``" on the same samples (McNemar)."""
    only_a = int((a & ~b).sum())
    only_b = int((b & ~a).sum())
    if only_a + only_b == 0:
        return 1.0
    z = (only_a - only_b) / math.sqrt(only_a + only_b)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def null_test(
    probe: TransferProbe, found: TransferResult, cluster: np.ndarray, label: int, seed: int
) -> dict[str, Any]:
    """The evidence on a transfer result: the trigger against norm-matched non-triggers on
    samples of its source class (see the module docstring); ``passed`` says if it stands."""
    rng = np.random.default_rng([seed, 18])
    source = int(found.source)
    pool = probe._by_class[source]
    pool = pool[~np.isin(pool, cluster)]
    picks = np.sort(rng.choice(pool, size=min(MAX_STAMPED, len(pool)), replace=False))
    x = probe.data.take(picks)
    before = probe.predict(x) == label
    trig = found.trigger
    sent = (probe.predict(trig.stamp(x, rng)) == label) & ~before
    nulls: dict[str, Trigger] = {}
    cos = None  # how much of the trigger is the genuine difference itself
    between = _between(probe, cluster, label, source, trig, rng)
    if between is not None:
        nulls["between"] = between
        if not trig.tokens:
            t = trig.values.reshape(-1).astype(np.float64)
            d = between.values.reshape(-1).astype(np.float64)
            cos = float(t @ d / max(np.linalg.norm(t) * np.linalg.norm(d), 1e-12))
    if not trig.tokens:
        noise = rng.standard_normal(trig.values.shape)
        scale = float(np.linalg.norm(trig.values)) / max(float(np.linalg.norm(noise)), 1e-12)
        nulls["noise"] = Trigger(noise * scale, lo=trig.lo, hi=trig.hi)
    rate = float(sent.mean()) if len(sent) else 0.0
    out: dict[str, Any] = {"source": source, "n": len(picks), "rate": round(rate, 4)}
    if cos is not None:
        out["cos"] = round(cos, 3)
    for name, null in nulls.items():
        null_sent = (probe.predict(null.stamp(x, rng)) == label) & ~before
        out[f"null_{name}"] = round(float(null_sent.mean()) if len(null_sent) else 0.0, 4)
        if name == "between":
            p = paired_p(sent, null_sent)
    if "between" not in nulls:
        out.update(effect=0.0, p=1.0, passed=False)
        return out
    out["effect"] = round(rate - out["null_between"], 4)
    out["p"] = float(f"{p:.3g}")
    out["passed"] = out["effect"] >= probe.cfg.transfer_effect and p <= MAX_P
    return out


def _between(
    probe: TransferProbe,
    cluster: np.ndarray,
    label: int,
    source: int,
    trig: Trigger,
    rng: np.random.Generator,
) -> Trigger | None:
    """The genuine label-minus-source difference, as large as the trigger (None if the
    classes are too small to estimate it)."""
    own = probe._by_class[label]
    own = own[~np.isin(own, cluster)]
    src = probe._by_class[source]
    if len(own) == 0 or len(src) == 0:
        return None
    queries = np.sort(rng.choice(own, size=min(NULL_QUERIES, len(own)), replace=False))
    k = min(probe.cfg.transfer_neighbors, len(src))
    nn, _ = knn(probe.sketch[queries], probe.sketch[src], k)
    nn_idx = src[nn]
    if trig.tokens:
        return _between_tokens(probe, queries, nn_idx, trig)
    xq = probe.data.take(queries).astype(np.float64)
    xn = probe.data.take(nn_idx.ravel()).astype(np.float64)
    xn = xn.reshape(len(queries), k, *xq.shape[1:]).mean(axis=1)
    diff = np.median(xq - xn, axis=0)
    norm = float(np.linalg.norm(diff.ravel(), ord=NULL_NORM))
    if norm <= 1e-12:
        return None
    values = diff * (float(np.linalg.norm(trig.values.ravel(), ord=NULL_NORM)) / norm)
    return Trigger(values.astype(trig.values.dtype), lo=trig.lo, hi=trig.hi)


def _between_tokens(
    probe: TransferProbe, queries: np.ndarray, nn_idx: np.ndarray, trig: Trigger
) -> Trigger | None:
    """As many tokens as the trigger has, the most over-represented in the label's
    sequences against their source-class neighbours (the trigger's own left out)."""
    xq = probe.data.take(queries).reshape(len(queries), -1)
    xn = probe.data.take(np.unique(nn_idx.ravel())).reshape(-1, xq.shape[1])
    ids_q, df_q = _doc_freq(xq)
    ids_n, df_n = _doc_freq(xn)
    ids = np.union1d(ids_q, ids_n)
    lift = np.zeros(len(ids))
    lift[np.searchsorted(ids, ids_q)] += df_q
    lift[np.searchsorted(ids, ids_n)] -= df_n
    skip = set(int(t) for t in trig.values) | {int(getattr(trig, "pad", 0))}
    skip |= set(getattr(trig, "special", ()))
    order = [i for i in np.lexsort((ids, -lift)) if int(ids[i]) not in skip]
    if not order:
        return None
    picked = ids[order[: len(trig.values)]].astype(np.int64)
    extra = {f: getattr(trig, f) for f in ("pad", "special") if hasattr(trig, f)}
    return Trigger(picked, tokens=True, **extra)
