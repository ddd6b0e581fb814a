"""The card's QC statistics: the panels read from each sample's meta.json, their values per
split (:func:`qc_values`), the summary table rows (:func:`qc_summary`) and which samples' meta.json
are read (:func:`meta_subset`)."""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from gl10m.card.markdown import fmt


def meta_get(d: dict, path: str):
    """d["a"]["b"] for path "a.b", None when any part is missing."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


# (title, kind, extractor(meta) -> list of values, threshold attr on profile.qc or None)
def _scl(meta: dict, part: str) -> list:
    items = meta_get(meta, "s2.items") or []
    return [meta_get(it, f"scl.{part}") for it in items if isinstance(it, dict)]


QC_PANELS = [
    ("LR black ratio", "hist", lambda m: [meta_get(m, "qc.lr_black_ratio")], "max_black_ratio"),
    ("HR max tile black ratio", "hist", lambda m: [meta_get(m, "qc.hr_black_ratio_max")], "max_black_ratio"),
    ("S2 cloud fraction per used date (SCL 8,9,10)", "hist", lambda m: _scl(m, "cloud"), None),
    ("S2 shadow fraction per used date (SCL 3)", "hist", lambda m: _scl(m, "shadow"), None),
    ("S2 nodata fraction per used date (SCL 0)", "hist", lambda m: _scl(m, "nodata"), None),
    ("S2 dates used per scene", "int",
     lambda m: [len(m["s2"]["items"])] if isinstance(meta_get(m, "s2.items"), list) else [], None),
    ("S2 min valid dates per LR pixel", "int", lambda m: [meta_get(m, "qc.s2_composite.min_obs")], None),
    ("S2 mean valid dates per LR pixel", "hist", lambda m: [meta_get(m, "qc.s2_composite.mean_obs")], None),
    ("S2 LR pixels with no valid date (fraction)", "hist", lambda m: [meta_get(m, "qc.s2_composite.uncovered")], None),
    ("NAIP year", "cat", lambda m: [meta_get(m, "naip.year")], None),
    ("S2 window mode", "cat", lambda m: [meta_get(m, "s2.window")], None),
    ("NAIP quarter-quads per scene", "int",
     lambda m: [len(m["naip"]["items"])] if isinstance(meta_get(m, "naip.items"), list) else [], None),
]


def qc_values(metas: Iterable[tuple[str, dict]]) -> dict[str, dict[str, list]]:
    """{panel title: {split: [values]}} for the QC panels that have any value (missing keys are
    skipped, per sample)."""
    out: dict[str, dict[str, list]] = {}
    for _, m in metas:
        split = str(m.get("split", "?"))
        for title, kind, fn, _thr in QC_PANELS:
            try:
                vals = fn(m)
            except (KeyError, TypeError):
                vals = []
            for v in vals:
                if v is None:
                    continue
                if kind != "cat":
                    v = _num(v)
                    if v is None:
                        continue
                out.setdefault(title, {}).setdefault(split, []).append(v if kind != "cat" else str(v))
    return {t: out[t] for t, *_ in QC_PANELS if t in out}


def qc_summary(values: dict[str, dict[str, list]]) -> list[list[str]]:
    """Rows (statistic, n, min, median, mean, max) for numeric panels; counts for categorical."""
    kinds = {t: k for t, k, _f, _t in QC_PANELS}
    rows = []
    for title, per in values.items():
        vals = [v for s in per for v in per[s]]
        if kinds[title] == "cat":
            c = Counter(vals)
            rows.append([title, str(len(vals)), ", ".join(f"{k}: {v}" for k, v in sorted(c.items())), "", "", ""])
        else:
            a = np.asarray(vals, float)
            rows.append([title, str(len(a)), fmt(a.min()), fmt(float(np.median(a))), fmt(float(a.mean())),
                         fmt(a.max())])
    return rows


def meta_subset(index, max_n: int | None):
    """The index rows whose meta.json the card reads: all, key-ordered, or `max_n` evenly spaced."""
    rows = index.sort_values("key", kind="stable")
    if max_n is not None and len(rows) > max_n:
        pick = np.unique(np.linspace(0, len(rows) - 1, max_n).round().astype(int))
        rows = rows.iloc[pick]
    return rows
