"""The dataset card: ``W/shards/README.md`` and its plots in ``W/shards/card/``.

:func:`write_card` reads the sidecar index and the manifest (counts), the ``meta.json`` of the
samples (QC statistics and provenance; every sample up to ``max_qc_samples``, else an evenly
spaced, key-ordered subset, each read by seek from its shard) and a few whole samples (example
mosaics), and writes:

* ``README.md``: what the data is, how it was built, the sample schema, per-split and per-state
  counts, every concept's count per split next to the GL-10M paper count, the QC rules and
  statistics, how to load it, licences and attribution;
* ``card/label_frequency.png``: scenes containing each concept, per split, log scale, sorted,
  with the GL-10M Figure 6 counts (scaled to this dataset's size) as reference markers;
* ``card/qc.png``: histograms of whatever QC statistics the samples' meta.json hold;
* ``card/example_{i}.png``: LR next to the HR mosaic with the per-tile dominant concept.

Nothing in it depends on the clock or the machine: the same shards give the same card (PNGs
are written without software/date metadata).
"""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from gl10m import inspect as gi
from gl10m import samples as smp
from gl10m.errors import UserError
from gl10m.io import is_url

CARD_DIR = "card"
README = "README.md"
SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
GL10M_TRAIN_VAL = 86_008 + 8_069  # scenes behind the paper's Figure 6 counts (train + val)
GL10M_PAPER = "Observe Less, Understand More: Cost-aware Cross-scale Observation for Remote Sensing Understanding"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    return gi.save_figure(fig, path)


def _splits(st: dict) -> list[str]:
    return list(st["samples"])


def _colour(split: str, k: int = 0) -> str:
    return SPLIT_COLOURS.get(split, ["#9467bd", "#8c564b", "#7f7f7f"][k % 3])


def _get(d: dict, path: str):
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


def _fmt(v: float | None, nd: int = 4) -> str:
    if v is None:
        return "n/a"
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.{nd}g}"


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------
# label frequency
# ---------------------------------------------------------------------------------------------
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

    counts, splits = st["concept_counts"], _splits(st)
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
        ax.barh(y + off, np.where(vals > 0, vals, np.nan), height=h, color=_colour(s, k), label=f"{s} ({st['samples'][s]})")
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
    handles = [Patch(color=_colour(s, k), label=f"{s} ({st['samples'][s]} scenes)") for k, s in enumerate(splits)]
    handles.append(Line2D([], [], color="black", marker="|", ls="none", markersize=8, mew=1.5,
                          label=f"GL-10M Fig. 6 (train+val) x {n_ref}/{GL10M_TRAIN_VAL:,}"))
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.9)
    fig.suptitle(f"{profile.name}: label frequency per split", y=1 - 0.15 / fig_h, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# QC statistics
# ---------------------------------------------------------------------------------------------
# (title, kind, extractor(meta) -> list of values, threshold attr on profile.qc or None)
def _scl(meta: dict, part: str) -> list:
    items = _get(meta, "s2.items") or []
    return [_get(it, f"scl.{part}") for it in items if isinstance(it, dict)]


QC_PANELS = [
    ("LR black ratio", "hist", lambda m: [_get(m, "qc.lr_black_ratio")], "max_black_ratio"),
    ("HR max tile black ratio", "hist", lambda m: [_get(m, "qc.hr_black_ratio_max")], "max_black_ratio"),
    ("S2 cloud fraction per used date (SCL 8,9,10)", "hist", lambda m: _scl(m, "cloud"), None),
    ("S2 shadow fraction per used date (SCL 3)", "hist", lambda m: _scl(m, "shadow"), None),
    ("S2 nodata fraction per used date (SCL 0)", "hist", lambda m: _scl(m, "nodata"), None),
    ("S2 dates used per scene", "int",
     lambda m: [len(m["s2"]["items"])] if isinstance(_get(m, "s2.items"), list) else [], None),
    ("S2 min valid dates per LR pixel", "int", lambda m: [_get(m, "qc.s2_composite.min_obs")], None),
    ("S2 mean valid dates per LR pixel", "hist", lambda m: [_get(m, "qc.s2_composite.mean_obs")], None),
    ("S2 LR pixels with no valid date (fraction)", "hist", lambda m: [_get(m, "qc.s2_composite.uncovered")], None),
    ("NAIP year", "cat", lambda m: [_get(m, "naip.year")], None),
    ("S2 window mode", "cat", lambda m: [_get(m, "s2.window")], None),
    ("NAIP quarter-quads per scene", "int",
     lambda m: [len(m["naip"]["items"])] if isinstance(_get(m, "naip.items"), list) else [], None),
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
                    color=[_colour(s, k) for k, s in enumerate(splits)], label=splits)
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
                ax.bar(x - 0.4 + w * (k + 0.5), [cnt[s][c] for c in cats], width=w, color=_colour(s, k), label=s)
            ax.set_xticks(x, [str(c) for c in cats], fontsize=8)
        n_vals = sum(len(per[s]) for s in splits)
        ax.set_title(f"{title}  (n={n_vals})", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    sub = f"{n_meta} of {n_total} samples" if n_meta < n_total else f"all {n_total} samples"
    fig.suptitle(f"{profile.name}: QC statistics from meta.json ({sub})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.1 * nrow + 0.8)))
    return _save(fig, path)


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
            rows.append([title, str(len(a)), _fmt(a.min()), _fmt(float(np.median(a))), _fmt(float(a.mean())),
                         _fmt(a.max())])
    return rows


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the card
# ---------------------------------------------------------------------------------------------
def _meta_subset(index, max_n: int | None):
    rows = index.sort_values("key", kind="stable")
    if max_n is not None and len(rows) > max_n:
        pick = np.unique(np.linspace(0, len(rows) - 1, max_n).round().astype(int))
        rows = rows.iloc[pick]
    return rows


def write_card(shards_dir: str | Path, profile, *, n_examples: int = 3, max_qc_samples: int | None = 20000) -> Path:
    """Write ``{shards_dir}/README.md`` and ``{shards_dir}/card/*.png``; return the README path."""
    root = gi.shards_root(shards_dir)
    index = gi.read_index(root)
    manifest = gi.read_manifest(root)
    if len(index) == 0:  # an empty build still gets a card that says so (and no stale plots)
        for old in (root / CARD_DIR).glob("*.png"):
            old.unlink()
        return gi.write_public(root / README, (
            f"# {profile.name}: a GL-10M-style Sentinel-2 / NAIP dataset with OpenStreetMap concepts\n\n"
            f"This shards folder holds no samples: the build (profile `{profile.name}` version {profile.version}, "
            f"hash `{profile.hash()}`) produced none. Run `gl10m download` and `gl10m shard` again once scenes "
            "are fetched.\n" + "".join(f"\n{line}\n" for line in _build_outcome(manifest, 0))).encode("utf-8"))
    n_lab = len(index["labels"].iloc[0])
    if n_lab != profile.n_concepts:
        raise UserError(f"{root}: samples have {n_lab} labels but profile {profile.name} has "
                        f"{profile.n_concepts} concepts")
    st = gi.stats(root, profile)
    card = root / CARD_DIR
    card.mkdir(parents=True, exist_ok=True)

    plot_label_frequency(st, profile, card / "label_frequency.png")
    rows = _meta_subset(index, max_qc_samples)
    metas = list(gi.iter_meta(root, rows))
    values = qc_values(metas)
    plot_qc(values, profile, card / "qc.png", len(metas), len(index))

    examples = pick_examples(index, max(0, int(n_examples)))
    labels = [c.label for c in profile.concepts]
    for i, key in enumerate(examples):
        s = gi.load_sample(root, key)
        _save(gi.render(s, mode="dominant", concept_labels=labels, zoom=2), card / f"example_{i}.png")
    for old in card.glob("example_*.png"):
        stem = old.stem.split("_", 1)[1]
        if not stem.isdigit() or int(stem) >= len(examples):
            old.unlink()

    text = card_text(st, manifest, profile, metas, values, examples, n_meta=len(metas))
    out = root / README
    gi.write_public(out, text.encode("utf-8"))
    return out


def _table(header: list[str], rows: list[list], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return lines


SCHEMA = [
    ("`lr.png`", "uint8", "268 x 268 x 3", "Sentinel-2 L2A RGB (B04, B03, B02) median composite over the scene footprint, "
                                        "stretched from reflectance to 0..255 (PNG, lossless)"),
    ("`hr_00.jpg` .. `hr_99.jpg`", "uint8", "100 x (268 x 268 x 3)",
     "NAIP RGB tiles of the 2680 x 2680 HR mosaic of the same footprint; tile index `row*10 + col`, row 0 = "
     "north (top), col 0 = west (left), so `hr_00` is the north-west and `hr_09` the north-east corner "
     "(JPEG quality 95, 4:4:4)"),
    ("`labels.npy`", "uint8", "[66]", "multi-hot: 1 when the concept covers at least the profile's minimum area "
                                      "in the scene (order = concept id, table below)"),
    ("`tile_frac.npy`", "float16", "[100, 66]", "fraction of each HR tile (same row*10 + col index) covered by "
                                               "each concept's OSM geometry (buffered for lines and points)"),
    ("`meta.json`", "JSON object", "-", "provenance and QC: key, scene id, state, split, footprint (EPSG:4326), "
                                        "ground pixel size, concepts by name, every NAIP and Sentinel-2 item id "
                                        "with its date, S2 window mode, harmonisation, QC statistics, profile hash, "
                                        "builder version (keys below)"),
]

META_KEYS = [
    ("key, scene_id, state, split", "identity of the sample; `key` = `{state}-{scene id}` (no dots)"),
    ("footprint, crs", "west/south/east/north in degrees, EPSG:4326 (0.024 x 0.024 degrees)"),
    ("lr, hr", "image sizes, pixel size in degrees and in metres (x and y differ: degree footprints "
               "have anisotropic ground pixels), bands; hr also grid, tile size, tile index convention"),
    ("georef", "georeferencing (section below): crs, the GDAL geotransforms of the LR image (`lr`) and of the "
               "HR mosaic (`hr`) with their sizes, and `tiles` (grid, tile size, index, the rule that gives "
               "each tile's transform)"),
    ("concepts, concept_ids", "concepts present, by name and id"),
    ("naip", "year, date, quarter-quad items (id, date, EPSG, GSD; with the earthengine provider the "
             "Earth Engine asset id and the collection), resampling, mosaic rule"),
    ("s2", "window mode (aligned to the NAIP date, or the calendar-year fallback), date range, items used "
           "(id, datetime, processing baseline, offset subtracted, cloud cover, MGRS tile, per-date SCL "
           "fractions), items excluded and why, harmonisation, SCL mask, compositing, resampling, stretch; "
           "with the earthengine provider the asset ids and collection, harmonised by Earth Engine"),
    ("qc", "black level and threshold, LR black ratio, S2 composite coverage (dates, uncovered fraction, "
           "min/mean valid dates per pixel), HR black ratio per tile and maximum"),
    ("provider, plan_hash, profile, builder", "imagery provider, hash of the plan row, profile name/version/hash, "
                                              "builder name/version"),
]
BANDS_META_KEY = ("bands", "(`imagery.bands` rgbn or raw only) mode, and for `lr` / `hr`: the extra member's field, "
                           "the array's name, bands, dtype, shape, nodata; for `lr` the reflectance scale and offset")


def _extra_rows(bands: str) -> list[tuple[str, str, str, str]]:
    """Schema rows of the extra members of `bands` (none for rgb)."""
    from gl10m import samples as smp

    if bands == "rgb":
        return []
    name, lc, ld, hc, hd, lb, hb = smp.EXTRA[bands]
    return [
        (f"`{smp.lr_extra_field(bands)}`", ld, f"268 x 268 x {lc}",
         f"Sentinel-2 {', '.join(lb)} median composite (same dates, masks and grid as `lr.png`) as harmonised "
         f"surface reflectance * 10000 (reflectance = value * {smp.REFLECTANCE_SCALE:g} + "
         f"{smp.REFLECTANCE_OFFSET:g}; the L2A +1000 offset already removed), 0 without a valid observation; "
         f"`.npz`, one array `{name}`"),
        (f"`hr_00_{name}.npz` .. `hr_99_{name}.npz`", hd, f"100 x (268 x 268 x {hc})",
         f"NAIP {', '.join(hb)} of the same HR mosaic and tiles as `hr_NN.jpg` (the same warp, uncompressed "
         f"8-bit values); `.npz`, one array `{name}`"),
    ]


def _data_load_call() -> str | None:
    """How to call gl10m.data.load on these shards; None when gl10m has no data module (it is
    looked up, not imported: importing it pulls in torch)."""
    if importlib.util.find_spec("gl10m.data") is None:
        return None
    return 'data.load("W/shards", split="train")  # a torch IterableDataset of sample dicts'


def _pbf_sources(profile, st: dict) -> str:
    """Where the OSM data of the regions in the data came from, as the profile says."""
    regions = sorted({k for s in _splits(st) for k in st["states"][s]} & set(profile.regions)) or sorted(profile.regions)
    pinned = [r for r in regions if profile.regions[r].pbf]
    dated = [r for r in regions if not profile.regions[r].pbf]
    parts = []
    if dated:
        parts.append(f"per-state extracts `{profile.osm.base_url}/<state>-{profile.osm.extract_date}.osm.pbf` "
                     f"(dated {profile.osm.extract_date}) for {', '.join(dated)}")
    if pinned:
        files = ", ".join(f"{r} `{_pbf_name(profile.regions[r].pbf)}`" for r in pinned)
        parts.append(f"the PBF files the profile names per region: {files}")
    return "; ".join(parts)


def _pbf_name(pbf: str) -> str:
    """A URL as it is (credentials redacted); a local file by its name (no paths of this machine)."""
    from gl10m.errors import redact

    return redact(pbf) if is_url(pbf) else Path(pbf).name


def _build_outcome(manifest: dict, total: int) -> list[str]:
    """What became of the planned scenes: rejections by reason, what is missing and why."""
    if "planned" not in manifest:
        return [f"- Planned but not fetched: {manifest['not_fetched']}."] if "not_fetched" in manifest else []
    rej = manifest.get("rejected_at_fetch") or {}
    out = [f"- Of {manifest['planned']} planned scenes, {total} are in the shards, "
           f"{manifest.get('dropped_border', 0)} were dropped at split borders, {sum(rej.values())} were rejected "
           "at fetch" + (" (" + ", ".join(f"`{k}` {v}" for k, v in sorted(rej.items(), key=lambda kv: (-kv[1], kv[0])))
                         + ")" if rej else "")
           + f" and {manifest.get('not_fetched', 0)} are missing."]
    npl = manifest.get("not_planned") or {}
    if npl:
        out.append(f"- Candidates not planned: {sum(npl.values())} ("
                   + ", ".join(f"`{k}` {v}" for k, v in sorted(npl.items(), key=lambda kv: (-kv[1], kv[0]))) + ").")
    missing = manifest.get("missing") or []
    if missing:
        shown = ", ".join(f"`{m['key']}` ({_md_escape(m['why'])})" for m in missing[:10])
        out.append(f"- **Incomplete build** (`--allow-incomplete`): {len(missing)} planned scene(s) have no sample: "
                   f"{shown}" + (f" and {len(missing) - 10} more (all in `manifest.json`)" if len(missing) > 10 else "")
                   + ".")
    return out


def _intro(st: dict, profile, splits: list[str]) -> list[str]:
    """Title, what the data is, and the at-a-glance table."""
    counts = st["concept_counts"]
    geo = profile.geometry
    total = st["total_samples"]
    L: list[str] = []
    A = L.append
    A(f"# {profile.name}: a GL-10M-style Sentinel-2 / NAIP dataset with OpenStreetMap concepts")
    A("")
    if profile.description:
        A(f"> {profile.description}")
        A("")
    A("This folder is a GL-10M-style paired multi-resolution remote-sensing dataset written as "
      "[WebDataset](https://github.com/webdataset/webdataset) shards. Each sample is one scene: a "
      f"{geo.footprint_deg:g} x {geo.footprint_deg:g} degree footprint seen at two resolutions, a "
      f"Sentinel-2 L2A 10 m RGB image (LR, {geo.lr_px} x {geo.lr_px} px) and NAIP 1 m-class aerial "
      f"imagery of the same footprint cut into a {geo.grid} x {geo.grid} grid of {geo.tile_px} x {geo.tile_px} px "
      f"tiles (HR), labelled with {profile.n_concepts} OpenStreetMap concepts (a multi-hot vector per scene and "
      "the area fraction of every concept in every tile). GL-10M is the dataset of "
      f"*{GL10M_PAPER}* (arXiv 2604.11415: 104,020 scenes in 11 US states, 10,402,000 HR tiles); this "
      "dataset was built the same way by `gl10m` from the profile named below, so its size and states are "
      "those of this build.")
    A("")
    A("## At a glance")
    A("")
    rows = [
        ["samples (scenes)", *[str(st["samples"][s]) for s in splits], str(total)],
        ["states", *[", ".join(st["states"][s]) for s in splits],
         ", ".join(sorted({k for s in splits for k in st["states"][s]}))],
        ["HR tiles", *[str(st["samples"][s] * smp.N_TILES) for s in splits], str(st["hr_tiles"])],
        ["shards", *[str(st["shards"][s]) for s in splits], str(st["total_shards"])],
        ["size on disk", *[gi.human_bytes(st["shard_bytes"][s]) for s in splits], gi.human_bytes(st["total_bytes"])],
    ]
    L += _table(["", *splits, "total"], rows, ["---"] + ["--:"] * (len(splits) + 1))
    A("")
    A(f"Mean sample payload: {gi.human_bytes(st['mean_sample_bytes'])}. Concepts present in at least one "
      f"scene: {sum(1 for v in counts['all'] if v > 0)} of {profile.n_concepts}.")
    if st["missing_shards"]:
        A("")
        A(f"**Warning:** {len(st['missing_shards'])} shard file(s) listed in the index are missing: "
          f"{', '.join(st['missing_shards'][:5])}.")
    A("")
    return L


def _provenance(st: dict, manifest: dict, profile, metas: list[tuple[str, dict]]) -> list[str]:
    """"How it was built": profile, builder, providers, sources, pipeline, imagery rules, splits, outcome."""
    geo, s2p, naip = profile.geometry, profile.imagery.s2, profile.imagery.naip
    prof_m = manifest.get("profile") or {"name": profile.name, "version": profile.version, "hash": profile.hash()}
    builder = manifest.get("builder") or {}
    providers = sorted({str(m.get("provider")) for _, m in metas if m.get("provider")})
    builders = sorted({f"{_get(m, 'builder.name')} {_get(m, 'builder.version')}" for _, m in metas
                       if _get(m, "builder.version")})
    prof_hashes = sorted({str(_get(m, "profile.hash")) for _, m in metas if _get(m, "profile.hash")})
    naip_years = sorted({str(_get(m, "naip.year")) for _, m in metas if _get(m, "naip.year") is not None})
    total = st["total_samples"]
    L: list[str] = []
    A = L.append
    A("## How it was built")
    A("")
    A(f"- Profile: `{prof_m.get('name')}` version {prof_m.get('version')}, hash `{prof_m.get('hash')}`"
      + (f" (samples carry profile hash{'es' if len(prof_hashes) > 1 else ''} "
         f"{', '.join(f'`{h}`' for h in prof_hashes)})" if prof_hashes else "") + ".")
    A(f"- Builder: {builder.get('name', 'gl10m')} {builder.get('version', '?')}"
      + (f" (samples: {', '.join(builders)})" if builders else "") + ".")
    A(f"- Imagery provider(s): {', '.join(providers) if providers else profile.provider.name}"
      f" (profile default `{profile.provider.name}`).")
    syn = manifest.get("synthetic")
    if syn:  # `gl10m testbed scenes`: no PBF was downloaded and no provider was asked
        A(f"- **Synthetic scenes**, not imagery of real places: {syn.get('n_scenes')} scenes of seed {syn.get('seed')} "
          f"by `{syn.get('generator')}` version {syn.get('generator_version')} (`gl10m testbed scenes`): each scene "
          "its own seeded layout of the testbed's recipes, rendered by the testbed's NAIP and Sentinel-2 renderer; "
          "labels from the layout written as a PBF and read by the osm and anchors stages. The OpenStreetMap, "
          "NAIP and Sentinel-2 lines below describe the profile the scenes imitate, not downloads.")
    A(f"- OpenStreetMap: {_pbf_sources(profile, st)}.")
    A(f"- Pipeline: OSM features matching a concept rule -> anchors (a point on the surface of each feature, "
      f"always inside it, unlike a centroid; {geo.footprint_deg:g}-degree "
      f"footprints, thinned so that footprints overlap by at most {geo.max_overlap:g}, at least "
      f"{geo.min_concepts} concepts of at least {geo.min_concept_area_m2:g} m2 per scene) -> provider catalogue -> "
      "plan (coverage check, class-aware subsampling, matched NAIP state-year and Sentinel-2 window) -> fetch "
      "(compose, QC, stage one sample per scene) -> shards (byte copies, deterministic order and assignment).")
    sub = (manifest.get("concept_subset") or {}).get("concepts")
    if sub:
        A(f"- **Concept subset** (`--concepts`): only scenes holding at least one of {', '.join(f'`{c}`' for c in sub)} "
          "were planned, fetched and sharded (every scene keeps all its labels); the class-aware subsampling target "
          "was filled from that subset. Candidates without them are counted as `no_named_concept` below.")
    A(f"- NAIP (`{naip.collection}`): the most recent state-year between {naip.start} and {naip.end}, bands "
      f"{', '.join(naip.bands)}, mosaicked newest first and resampled bilinearly onto the "
      f"{geo.hr_px} x {geo.hr_px} HR grid." + (f" NAIP years in the data: {', '.join(naip_years)}." if naip_years else ""))
    A(f"- Sentinel-2 L2A (`{s2p.collection}`): dates within +-{s2p.window_days} days of the NAIP date, clipped to "
      f"{s2p.clip_start}..{s2p.clip_end} (`aligned`); if none is valid, {s2p.fallback_start}..{s2p.fallback_end} "
      f"(`fallback`). Scenes with cloudy pixels >= {s2p.max_cloud_pct:g} % are skipped; pixels with SCL classes "
      f"{s2p.scl_mask} are masked; the per-pixel median of the remaining dates is the composite. Harmonisation: "
      + (f"the +{s2p.offset} DN offset is subtracted from items with processing baseline >= {s2p.offset_baseline}"
         if s2p.harmonize else "off")
      + f"; reflectance {s2p.stretch[0]:g}..{s2p.stretch[1]:g} is stretched to 0..255.")
    sch = profile.splits.schemes[profile.splits.scheme]
    A(f"- Splits by state (scheme `{manifest.get('split_scheme', profile.splits.scheme)}`): train "
      f"{', '.join(sch.train) or '-'}; val {', '.join(sch.val) or '-'}; test {', '.join(sch.test) or '-'}. Scenes within "
      f"{profile.splits.border_buffer_deg:g} degrees of a state of another split are dropped from the smaller split"
      + (f" ({manifest['dropped_border']} dropped in this build)" if "dropped_border" in manifest else "") + ".")
    L += _build_outcome(manifest, total)
    A("")
    return L


def _per_state(st: dict, profile, splits: list[str]) -> list[str]:
    """Samples per split and state."""
    L: list[str] = []
    A = L.append
    A("## Samples per split and state")
    A("")
    rows = []
    for s in splits:
        for state, n in st["states"][s].items():
            reg = profile.regions.get(state)
            rows.append([s, state, reg.name if reg else "", str(n), str(reg.target) if reg else ""])
    L += _table(["split", "state", "name", "samples", "profile download target"], rows,
                ["---", "---", "---", "--:", "--:"])
    A("")
    return L


def _schema(profile) -> list[str]:
    """The sample schema, the tile index convention, meta.json keys, the index."""
    geo = profile.geometry
    L: list[str] = []
    A = L.append
    A("## Sample schema")
    A("")
    A("Every sample has exactly these fields; in a shard each is the tar member `{key}.{field}` (keys have no "
      "dots), small fields first (`meta.json`, `labels.npy`, `lr.png`, `tile_frac.npy`) then `hr_00.jpg` .. "
      "`hr_99.jpg`, so a reader that needs only the LR image stops early.")
    A("")
    bands = getattr(profile.imagery, "bands", "rgb")
    L += _table(["field", "dtype", "shape", "meaning"], [list(r) for r in SCHEMA + _extra_rows(bands)])
    A("")
    if bands != "rgb":
        A(f"**Extra bands** (`imagery.bands: {bands}`): one more member for the LR image and one per HR tile, "
          "so a reader that wants 12 tiles reads 12 extra members. They are `.npz` (deflate, lossless; one "
          "array): plain webdataset's default decoders give `dict(np.load(...))` and Hugging Face `datasets`' "
          "webdataset builder `np.load(..., allow_pickle=False)`, so neither needs gl10m. (`.npy` is not "
          "compressed; 16-bit PNG holds 1 or 3 channels and webdataset's Pillow decoder reduces 16-bit RGB to "
          "8 bits.) Pixels without a valid observation are 0.")
        A("")
    A(f"**Tile index convention** (as in GL-10M): index = `row*{geo.grid} + col`, row 0 = north (top), col 0 = "
      f"west (left). Tile `hr_{{index:02d}}.jpg` covers rows `[row*{geo.tile_px}, (row+1)*{geo.tile_px})` and "
      f"columns `[col*{geo.tile_px}, (col+1)*{geo.tile_px})` of the HR mosaic; the {geo.grid ** 2} tiles exactly "
      "tessellate the LR footprint. `tile_frac[index]` refers to the same tile. (The older SAR downloader used "
      "col*10 + row-from-south: do not mix the two.)")
    A("")
    A("`meta.json` keys:")
    A("")
    L += _table(["key(s)", "content"], [list(r) for r in META_KEYS + ([BANDS_META_KEY] if bands != "rgb" else [])])
    A("")
    L += _georef_section()
    A(f"The sidecar `{gi._INDEX}` has one row per sample: `key`, `split`, `state`, `shard`, `fields`, `offsets` and "
      f"`sizes` (byte offset and length of each member's data in the shard), `sha256` (of the sample's fields), "
      f"`labels` ({profile.n_concepts} uint8) and `nbytes`. `manifest.json` lists the shards (name, bytes, samples, "
      "sha256), samples and states per split, and the profile and builder.")
    A("")
    return L


def _georef_section() -> list[str]:
    """How to place the LR image and any HR tile on the map from meta.json alone."""
    return [
        "**Georeferencing.** `meta.json`'s `georef` block places every image in EPSG:4326 (`crs`): "
        "`georef.lr.transform` and `georef.hr.transform` are GDAL geotransforms (`[west edge, pixel width, 0, "
        "north edge, 0, -pixel height]` in degrees, north-up; a pixel's corner is at `x = t[0] + col*t[1]`, "
        "`y = t[3] + row*t[5]`) of the LR image and of the 2680 x 2680 HR mosaic, with their `width` and "
        "`height`. Both cover the footprint exactly. The 100 tiles are blocks of that mosaic, so their transforms "
        "are not stored one by one (they would add ~10 KB of JSON to every sample, more than the rest of "
        "`meta.json`, and could only repeat the mosaic's); tile `i` is block `row, col = divmod(i, grid)` and "
        "its transform follows from `georef.tiles` (`grid`, `width`, `height`) without gl10m:",
        "",
        "```python",
        'g = meta["georef"]; hr = g["hr"]["transform"]; t = g["tiles"]',
        'row, col = divmod(i, t["grid"])',
        'tile_gt = [hr[0] + col * t["width"] * hr[1], hr[1], 0.0, hr[3] + row * t["height"] * hr[5], 0.0, hr[5]]',
        "# rasterio: affine.Affine.from_gdal(*tile_gt); GDAL: ds.SetGeoTransform(tile_gt)",
        "```",
        "",
        "With gl10m: `gl10m.geometry.tile_transform(meta, i)`, `gl10m.geometry.image_bounds(meta, i)`, "
        "`gl10m.data.load(..., georef=True)` (adds `crs`, `bounds`, `transform`, `tile_bounds`, `tile_transform` "
        "to each sample), and `gl10m export KEY --shards W/shards --out DIR` (writes `DIR/KEY/lr.tif` and "
        "`DIR/KEY/hr_XX.tif`, RGB GeoTIFFs at their place). `gl10m verify` checks every sample's georef against "
        "its footprint.",
        "",
    ]


def _concepts(st: dict, profile, splits: list[str]) -> list[str]:
    """Concept frequencies: the plot, most/least frequent, absent, the table."""
    counts = st["concept_counts"]
    L: list[str] = []
    A = L.append
    A("## Concepts")
    A("")
    factor, n_ref = reference_scale(st)
    A("![label frequency](card/label_frequency.png)")
    A("")
    A("Scenes containing each concept, per split (log scale, most frequent on top). Black ticks: the GL-10M "
      f"paper's Figure 6 counts (train+val of {GL10M_TRAIN_VAL:,} scenes) scaled to this dataset's "
      f"{n_ref} train+val scenes, i.e. where each bar would end if this data had GL-10M's label distribution.")
    A("")
    order = sorted(range(profile.n_concepts), key=lambda i: (-counts["all"][i], i))
    present = [i for i in order if counts["all"][i] > 0]
    k = min(10, len(present))
    if present:
        A("Most frequent: " + ", ".join(f"{profile.concepts[i].label} ({counts['all'][i]})" for i in present[:k]) + ".")
        A("")
        A("Least frequent (present): " + ", ".join(f"{profile.concepts[i].label} ({counts['all'][i]})"
                                                     for i in present[::-1][:k]) + ".")
        A("")
    absent = [i for i in range(profile.n_concepts) if counts["all"][i] == 0]
    if absent:
        A(f"Absent from every split ({len(absent)}): " + ", ".join(profile.concepts[i].label for i in absent) + ".")
        A("")
    rows = []
    for c in profile.concepts:
        rows.append([str(c.id), f"`{c.name}`", c.label, *[str(counts[s][c.id]) for s in splits],
                     str(counts["all"][c.id]), f"{c.count:,}", "/".join(c.kinds)])
    L += _table(["id", "name", "label", *splits, "total", "GL-10M count", "OSM kinds"], rows,
                ["--:", "---", "---"] + ["--:"] * (len(splits) + 2) + ["---"])
    A("")
    return L


def _quality(st: dict, profile, values: dict, n_meta: int) -> list[str]:
    """The QC rules applied and the QC statistics of the samples."""
    geo, s2p, qc = profile.geometry, profile.imagery.s2, profile.qc
    total = st["total_samples"]
    L: list[str] = []
    A = L.append
    A("## Quality control")
    A("")
    A("Rules applied while building (a scene failing any of them is not in the data; the build ledger "
      "records why):")
    A("")
    A(f"- Black pixels: a pixel is black when all channels are <= {qc.black_level}; an image is invalid when its "
      f"black ratio is >= {qc.max_black_ratio:g}. An invalid LR image drops the scene; so does any missing, corrupt "
      f"or invalid HR tile, so every sample has one LR image and {smp.N_TILES} HR tiles.")
    A(f"- Sentinel-2: scene-level cloudy pixels < {s2p.max_cloud_pct:g} %; SCL classes {s2p.scl_mask} masked per "
      "pixel; the composite is the per-pixel median of the remaining dates, and an LR pixel left with no valid "
      "date is black, so it counts toward the LR black ratio above (as in GL-10M's masked median).")
    A("- Coverage: the whole LR footprint inside Sentinel-2 coverage and the HR footprint fully covered by the "
      "state's NAIP quarter-quads.")
    A(f"- Labels: at least {geo.min_concepts} concepts per scene, each covering at least "
      f"{geo.min_concept_area_m2:g} m2; footprints thinned to overlap by at most {geo.max_overlap:g}.")
    A(f"- Splits: states never mix; border scenes dropped (buffer {profile.splits.border_buffer_deg:g} degrees).")
    A("")
    A("![QC statistics](card/qc.png)")
    A("")
    sub = f"{n_meta} of {total} samples (evenly spaced by key)" if n_meta < total else f"all {total} samples"
    A(f"QC statistics from the samples' `meta.json` ({sub}):")
    A("")
    summary = qc_summary(values)
    if summary:
        L += _table(["statistic", "n", "min / counts", "median", "mean", "max"], summary,
                    ["---", "--:", "--:", "--:", "--:", "--:"])
    else:
        A("(the samples' meta.json hold no QC statistics)")
    A("")
    return L


def _examples(examples: list[str]) -> list[str]:
    """The example scenes (none: no section)."""
    L: list[str] = []
    A = L.append
    if examples:
        A("## Examples")
        A("")
        A("LR (left, Sentinel-2, nearest-neighbour zoom) and the 10 x 10 HR mosaic (right, NAIP) with the tile grid "
          "and each tile's dominant concept (largest area fraction in `tile_frac`). Made with "
          "`gl10m show KEY --shards W/shards -o out.png`.")
        A("")
        for i, key in enumerate(examples):
            A(f"### `{key}`")
            A("")
            A(f"![example {i}: {key}](card/example_{i}.png)")
            A("")
    return L


def _loading(bands: str = "rgb") -> list[str]:
    """How to load the shards: gl10m, webdataset, Hugging Face datasets, the index."""
    L: list[str] = []
    A = L.append
    A("## Loading")
    A("")
    load_call = _data_load_call()
    if load_call:
        A("With gl10m installed, its documented loader (`help(gl10m.data.load)`):")
        A("")
        A("```python")
        A("from gl10m import data")
        A(f"ds = {load_call}")
        A("```")
        A("")
    A("Plain [webdataset](https://github.com/webdataset/webdataset):")
    A("")
    A("```python")
    A("import glob, webdataset as wds")
    A("urls = sorted(glob.glob(\"W/shards/train/*.tar\"))")
    A("ds = wds.WebDataset(urls, shardshuffle=False).decode(\"rgb8\")  # png/jpg -> uint8 HWC, .npy, .json")
    A("for s in ds:")
    A("    lr, tile_00, labels = s[\"lr.png\"], s[\"hr_00.jpg\"], s[\"labels.npy\"]")
    A("    tile_frac, meta = s[\"tile_frac.npy\"], s[\"meta.json\"]")
    if bands != "rgb":
        from gl10m import samples as smp

        nm = smp.EXTRA[bands][0]
        A(f"    lr_{nm}, tile_00_{nm} = s[\"lr_{nm}.npz\"][\"{nm}\"], s[\"hr_00_{nm}.npz\"][\"{nm}\"]  # npz -> dict of arrays")
    A("```")
    A("")
    if bands != "rgb":
        A(f"With gl10m, `data.load(..., bands=\"{bands}\")` also returns `lr_extra` and `hr_extra` (the requested "
          "tiles' extra bands, read by offset like the tiles).")
        A("")
    A("Hugging Face `datasets` (its `webdataset` builder; images come back as PIL images):")
    A("")
    A("```python")
    A("from datasets import load_dataset")
    A("files = {\"train\": \"W/shards/train/*.tar\", \"validation\": \"W/shards/val/*.tar\", \"test\": \"W/shards/test/*.tar\"}")
    A("ds = load_dataset(\"webdataset\", data_files=files, split=\"train\", streaming=True)")
    A("```")
    A("")
    A("Random access to one sample (or a few tiles) through the index, without scanning a shard:")
    A("")
    A("```python")
    A("from gl10m import inspect")
    A("s = inspect.load_sample(\"W/shards\", \"KEY\", tiles=[0, 9, 90, 99])  # gl10m.samples.Sample")
    A("```")
    A("")
    A("From the command line: `gl10m stats W/shards` (counts), `gl10m show KEY --shards W/shards -o out.png` "
      "(one sample), `gl10m export KEY --shards W/shards --out DIR` (one sample as GeoTIFFs), `gl10m verify "
      "W/shards` (checksums against the index, georeferencing against the footprints).")
    A("")
    return L


def _licences(profile, metas: list[tuple[str, dict]]) -> list[str]:
    """Licences and attribution of the three sources."""
    s2p = profile.imagery.s2
    s2_years = sorted({str(it.get("datetime"))[:4] for _, m in metas for it in (_get(m, "s2.items") or [])
                       if isinstance(it, dict) and it.get("datetime")})
    if not s2_years:
        s2_years = sorted({str(s2p.clip_start.year), str(s2p.clip_end.year)})
    cop_year = ", ".join(s2_years)
    L: list[str] = []
    A = L.append
    A("## Licences and attribution")
    A("")
    A("This dataset combines three sources, each under its own terms; keep these notices with any copy or "
      "derivative of the data:")
    A("")
    A("- **Labels: OpenStreetMap.** Map data (c) OpenStreetMap contributors, available under the Open Database "
      "License (ODbL) 1.0, https://www.openstreetmap.org/copyright. The labels (`labels.npy`, `tile_frac.npy`, "
      "concept names in `meta.json`) are derived from OpenStreetMap data; a derived database made public must "
      "be offered under the ODbL.")
    A("- **HR imagery: NAIP.** National Agriculture Imagery Program, USDA Farm Production and Conservation "
      "Business Center / Farm Service Agency (FSA). Public domain (US government work); credit USDA FSA.")
    A(f"- **LR imagery: Copernicus Sentinel-2.** Contains modified Copernicus Sentinel data [{cop_year}], "
      "processed by gl10m. Free and open use under the Copernicus data licence (legal notice on the use of "
      "Copernicus Sentinel Data and Service Information, EU Regulation 1159/2013).")
    A("")
    A("The card and its plots are generated from the data by `gl10m.card.write_card`; rebuilding the same "
      "shards gives the same card.")
    return L


def card_text(st: dict, manifest: dict, profile, metas: list[tuple[str, dict]], values: dict,
              examples: list[str], *, n_meta: int) -> str:
    """The card's Markdown: its sections in order."""
    splits = _splits(st)
    sections = [_intro(st, profile, splits), _provenance(st, manifest, profile, metas),
                _per_state(st, profile, splits), _schema(profile), _concepts(st, profile, splits),
                _quality(st, profile, values, n_meta), _examples(examples), _loading(getattr(profile.imagery, "bands", "rgb")),
                _licences(profile, metas)]
    return "\n".join(line for lines in sections for line in lines) + "\n"
