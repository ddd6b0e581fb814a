"""The card's plots: label frequency per split against the GL-10M reference, the QC statistics,
and the example scenes (picked by :func:`pick_examples`)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from gl10m import inspect as gi
from gl10m import samples as smp
from gl10m.card.qc import QC_PANELS

SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
GL10M_TRAIN_VAL = 86_008 + 8_069  # scenes behind the paper's Figure 6 counts (train + val)


def card_splits(st: dict) -> list[str]:
    """The splits of `gl10m.inspect.stats` output, in its order."""
    return list(st["samples"])


def split_colour(split: str, k: int = 0) -> str:
    """A split's colour in every plot (the k-th spare colour for a split with none)."""
    return SPLIT_COLOURS.get(split, ["#9467bd", "#8c564b", "#7f7f7f"][k % 3])


def reference_scale(st: dict) -> tuple[float, int]:
    """(factor, n): the paper's train+val counts are scaled by n / 94,077, n being this dataset's
    train+val samples (all samples when it has neither), so the markers show what the GL-10M
    label distribution would give at this dataset's size."""
    n = sum(v for s, v in st["samples"].items() if s in ("train", "val")) or st["total_samples"]
    return n / GL10M_TRAIN_VAL, n


def plot_label_frequency(st: dict, profile, path: Path) -> Path:
    """Horizontal bars: scenes containing each concept per split (log x), sorted by total,
    most frequent on top; black ticks: GL-10M Fig. 6 counts scaled to this dataset."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    counts, splits = st["concept_counts"], card_splits(st)
    n = profile.n_concepts
    order = sorted(range(n), key=lambda i: (-counts["all"][i], -profile.concepts[i].count, i))
    factor, n_ref = reference_scale(st)
    y = np.arange(n)[::-1].astype(float)  # first in order at the top
    fig_h, top_in, bottom_in = 0.2 * n + 1.6, 1.05, 0.35
    fig = Figure(figsize=(8.5, fig_h), dpi=gi.DPI)
    ax = fig.add_axes((0.22, bottom_in / fig_h, 0.74, 1 - (top_in + bottom_in) / fig_h))
    h = 0.8 / max(1, len(splits))
    for k, s in enumerate(splits):
        vals = np.array([counts[s][i] for i in order], dtype=float)
        off = (len(splits) - 1) / 2 * h - k * h
        ax.barh(y + off, np.where(vals > 0, vals, np.nan), height=h, color=split_colour(s, k), label=f"{s} ({st['samples'][s]})")
    ref = np.array([profile.concepts[i].count for i in order], dtype=float) * factor
    ax.scatter(np.where(ref > 0, ref, np.nan), y, marker="|", s=60, color="black", linewidths=1.5, zorder=3)
    ax.set_xscale("log")
    top = max([max(counts["all"]) if counts["all"] else 1, float(np.nanmax(ref)) if n else 1, 1])
    # markers of concepts that GL-10M itself rarely has fall below 0.05 scenes at small sizes: clipped
    low = max(0.05, min(0.5, float(np.nanmin(np.where(ref > 0, ref, np.nan))) * 0.8)) if (ref > 0).any() else 0.5
    ax.set_xlim(low, top * 1.6)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_yticks(y, [f"{profile.concepts[i].label} ({i})" for i in order], fontsize=7)
    ax.tick_params(axis="x", labelsize=8)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("scenes containing the concept (log scale)", fontsize=9)
    ax.grid(axis="x", which="major", color="0.85", lw=0.6)
    ax.set_axisbelow(True)
    handles = [Patch(color=split_colour(s, k), label=f"{s} ({st['samples'][s]} scenes)") for k, s in enumerate(splits)]
    handles.append(Line2D([], [], color="black", marker="|", ls="none", markersize=8, mew=1.5,
                          label=f"GL-10M Fig. 6 (train+val) x {n_ref}/{GL10M_TRAIN_VAL:,}"))
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.9)
    fig.suptitle(f"{profile.name}: label frequency per split", y=1 - 0.15 / fig_h, fontsize=11)
    return gi.save_figure(fig, path)



def plot_qc(values: dict[str, dict[str, list]], profile, path: Path, n_meta: int, n_total: int) -> Path:
    """One panel per QC statistic present: histograms stacked by split (thresholds as dashed
    lines), integer and categorical statistics as grouped bars."""
    from matplotlib.figure import Figure

    kinds = {t: (k, thr) for t, k, _f, thr in QC_PANELS}
    titles = list(values)
    ncol = 3
    nrow = max(1, (len(titles) + ncol - 1) // ncol)
    fig = Figure(figsize=(13, 3.1 * nrow + 0.8), dpi=gi.DPI)
    axs = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axs.flat[len(titles):]:
        ax.set_axis_off()
    if not titles:
        axs[0, 0].text(0.5, 0.5, "the samples' meta.json hold no QC statistics", ha="center", va="center")
    order = [s for s in smp.SPLITS if any(s in values[t] for t in titles)]
    order += sorted({s for t in titles for s in values[t]} - set(order))
    for ax, title in zip(axs.flat, titles):
        kind, thr = kinds[title]
        per = values[title]
        splits = [s for s in order if s in per]
        if kind == "hist":
            allv = np.concatenate([np.asarray(per[s], float) for s in splits])
            lo, hi = float(allv.min()), float(allv.max())
            thr_v = getattr(profile.qc, thr) if thr else None
            if thr_v is not None:
                hi = max(hi, thr_v)
            if hi <= lo:  # one value: a narrow range around it
                d = max(abs(lo) * 0.05, 0.01)
                lo, hi = (max(0.0, lo - d) if lo >= 0 else lo - d), hi + d
            bins = np.linspace(lo, hi, 31)
            ax.hist([np.asarray(per[s], float) for s in splits], bins=bins, stacked=True,
                    color=[split_colour(s, k) for k, s in enumerate(splits)], label=splits)
            if thr_v is not None:
                ax.axvline(thr_v, color="red", ls="--", lw=1, label=f"reject at >= {thr_v}")
            ax.locator_params(axis="x", nbins=6)
        else:
            if kind == "int":
                cats = sorted({int(v) for s in splits for v in per[s]})
                cnt = {s: Counter(int(v) for v in per[s]) for s in splits}
            else:
                cats = sorted({v for s in splits for v in per[s]})
                cnt = {s: Counter(per[s]) for s in splits}
            x = np.arange(len(cats))
            w = 0.8 / max(1, len(splits))
            for k, s in enumerate(splits):
                ax.bar(x - 0.4 + w * (k + 0.5), [cnt[s][c] for c in cats], width=w, color=split_colour(s, k), label=s)
            ax.set_xticks(x, [str(c) for c in cats], fontsize=8)
        n_vals = sum(len(per[s]) for s in splits)
        ax.set_title(f"{title}  (n={n_vals})", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    sub = f"{n_meta} of {n_total} samples" if n_meta < n_total else f"all {n_total} samples"
    fig.suptitle(f"{profile.name}: QC statistics from meta.json ({sub})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.1 * nrow + 0.8)))
    return gi.save_figure(fig, path)


def pick_examples(index, n: int) -> list[str]:
    """`n` keys, round-robin over the splits (train, val, test), in each split the samples with
    the most concepts first (ties by key): deterministic and informative."""
    per: dict[str, list[str]] = {}
    for s in [*smp.SPLITS, *sorted(set(index["split"]) - set(smp.SPLITS))]:
        g = index[index["split"] == s]
        if len(g):
            nlab = [int(np.asarray(x).sum()) for x in g["labels"]]
            per[s] = [k for _, k in sorted(zip((-v for v in nlab), g["key"].tolist()))]
    out: list[str] = []
    depth = 0
    while len(out) < n and any(depth < len(v) for v in per.values()):
        for s, keys in per.items():
            if depth < len(keys) and len(out) < n:
                out.append(keys[depth])
        depth += 1
    return out


def plot_examples(root: Path, examples: list[str], profile, card: Path) -> None:
    """card/example_{i}.png for each key: LR next to the HR mosaic with each tile's dominant concept."""
    labels = [c.label for c in profile.concepts]
    for i, key in enumerate(examples):
        s = gi.load_sample(root, key)
        gi.save_figure(gi.render(s, mode="dominant", concept_labels=labels, zoom=2), card / f"example_{i}.png")
