"""Retrieval metrics of the paper and its released code, in NumPy.

Per concept, all scenes are ranked by score, descending, with a **stable** sort (ties keep the
scenes' order: the split's index order), so every figure is deterministic.

- ``AP@K = sum_{i<=K} P@i * rel_i / min(n_pos, K)`` (``P@i`` the precision of the first ``i``,
  ``rel_i`` 1 when the ``i``-th scene has the concept); with ``K > N`` the ranking simply ends at
  ``N`` (``n_pos <= N``, so the denominator is ``n_pos``). Concepts without positives are
  skipped; ``mAP@K`` is the mean over the remaining concepts.
- Non-interpolated ``AP = sum_i P@i * rel_i / n_pos`` over the whole ranking; reported as the
  macro mean over concepts with positives and the support-weighted mean (weights ``n_pos``).

Groups: the same figures over subsets of the concepts (all, base, novel); a group with no
concept that has a positive gives NaN (written as ``null`` in JSON).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from gl10m.errors import UserError

KS = (20, 100)


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim == 1:
        s, y = s[:, None], y.reshape(-1, 1)
    if s.ndim != 2 or s.shape != y.shape:
        raise UserError(f"metrics: scores {s.shape} and labels {y.shape} must both be [scenes, concepts]")
    if not np.isfinite(s).all():
        raise UserError("metrics: scores must be finite")
    return s, y > 0


def ranking(scores: np.ndarray) -> np.ndarray:
    """[N, C] -> [N, C] scene indices per concept, best first (stable: ties keep scene order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=0, kind="stable")


def per_concept(scores, labels, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-concept figures: ``n_pos`` [C] and ``AP@K`` for each K and ``AP`` [C] (NaN where a
    concept has no positive)."""
    s, y = _check(scores, labels)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"metrics: K must be a positive integer, got {k!r}")
    n, c = s.shape
    order = ranking(s)
    rel = np.take_along_axis(y, order, axis=0).astype(np.float64)      # [N, C], rank order
    n_pos = y.sum(axis=0).astype(np.int64)
    hits = np.cumsum(rel, axis=0)
    prec = hits / np.arange(1, n + 1, dtype=np.float64)[:, None]
    pr = prec * rel
    out: dict[str, np.ndarray] = {"n_pos": n_pos}
    valid = n_pos > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            end = min(int(k), n)
            num = pr[:end].sum(axis=0)
            out[f"AP@{int(k)}"] = np.where(valid, num / np.minimum(n_pos, int(k)), np.nan)
        out["AP"] = np.where(valid, pr.sum(axis=0) / n_pos, np.nan)
    return out


def _nanmean(x: np.ndarray, w: np.ndarray | None = None) -> float:
    ok = ~np.isnan(x)
    if not ok.any():
        return float("nan")
    if w is None:
        return float(x[ok].mean())
    return float((x[ok] * w[ok]).sum() / w[ok].sum())


def summarise(pc: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[int]] | None = None,
              ks: Sequence[int] = KS) -> dict[str, dict]:
    """Per-concept figures -> ``{group: {"mAP@K": .., "AP_macro": .., "AP_weighted": ..,
    "concepts": number with positives}}``; ``groups`` maps a name to concept indices (default:
    ``all``)."""
    c = len(pc["n_pos"])
    groups = dict(groups or {"all": range(c)})
    out = {}
    for name, idx in groups.items():
        ix = np.asarray(sorted(int(i) for i in idx), dtype=np.int64)
        if ix.size and (ix.min() < 0 or ix.max() >= c):
            raise UserError(f"metrics: group {name!r} names a concept outside 0..{c - 1}")
        w = pc["n_pos"][ix].astype(np.float64)
        g = {f"mAP@{int(k)}": _nanmean(pc[f"AP@{int(k)}"][ix]) for k in ks}
        g["AP_macro"] = _nanmean(pc["AP"][ix])
        g["AP_weighted"] = _nanmean(pc["AP"][ix], w)
        g["concepts"] = int((w > 0).sum())
        out[name] = g
    return out


def retrieval(scores, labels, groups: Mapping[str, Sequence[int]] | None = None,
              ks: Sequence[int] = KS) -> dict[str, dict]:
    """:func:`per_concept` then :func:`summarise`."""
    return summarise(per_concept(scores, labels, ks), groups, ks)
