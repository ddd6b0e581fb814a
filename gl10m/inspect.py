"""Inspect a shards folder: numbers (``gl10m stats``) and one sample as a picture (``gl10m show``).

Everything reads the sidecar index (``W/shards/index.parquet``) and fetches a sample's members
straight from its shard by the indexed offsets (seek + read), so looking at one sample never
scans a shard. Usable from Python::

    from gl10m import inspect as gi
    print(gi.format_stats(gi.stats("W/shards")))
    s = gi.load_sample("W/shards", "CA-123")          # a gl10m.samples.Sample
    fig = gi.render(s, mode="outlines")                # a matplotlib Figure (no pyplot)
    gi.show("CA-123", "W/shards", "ca-123.png")

The picture: the LR image (shown at an integer zoom, nearest neighbour, so its pixels are the
sample's own) next to the 10 x 10 HR mosaic with its tile grid (index ``row*10 + col``, row 0
north, col 0 west) and either the per-tile dominant concept (``mode="dominant"``: the concept
with the largest area fraction in that tile, from ``tile_frac``) or the outline of each
concept's tiles (``mode="outlines"``: the boundary of the tiles where that concept's fraction is
above zero). Concept outlines are at tile resolution: a sample carries per-tile fractions, not
the OSM geometries.
"""
from __future__ import annotations

import difflib
import io
import json
import os
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gl10m import samples as smp
from gl10m.errors import UserError
from gl10m.io import atomic_path

MODES = ("dominant", "outlines")
DPI = 100
_INDEX = "index.parquet"
_MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Reading by the index
# ---------------------------------------------------------------------------------------------
def shards_root(shards_dir: str | Path) -> Path:
    """`shards_dir` checked: a folder holding ``index.parquet`` (else one-line UserError)."""
    p = Path(shards_dir)
    if not p.is_dir():
        raise UserError(f"{p}: no such shards folder (expected W/shards with index.parquet)")
    if not (p / _INDEX).is_file():
        raise UserError(f"{p}: no {_INDEX} here; is this a shards folder (gl10m shard writes W/shards)?")
    return p


def read_index(shards_dir: str | Path):
    """The sidecar index as a pandas DataFrame (one row per sample)."""
    import pyarrow.parquet as pq

    root = shards_root(shards_dir)
    try:
        return pq.read_table(root / _INDEX).to_pandas()
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{root / _INDEX}: cannot be read as a shard index ({type(e).__name__}: {e})") from None


def read_manifest(shards_dir: str | Path) -> dict:
    """``manifest.json`` as a dict ({} when absent)."""
    p = Path(shards_dir) / _MANIFEST
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None


def index_row(index, key: str, shards_dir: str | Path = "") :
    """The index row of `key`; an unknown key is a one-line UserError naming it."""
    hit = index[index["key"] == key]
    if len(hit) == 0:
        near = difflib.get_close_matches(str(key), index["key"].tolist(), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        where = f" in {shards_dir}" if shards_dir else ""
        raise UserError(f"unknown sample key {key!r}: not one of the {len(index)} samples{where}{hint}")
    return hit.iloc[0]


def read_fields(shards_dir: str | Path, row, names: Iterable[str] | None = None, *, fh=None) -> dict[str, bytes]:
    """The bytes of some (default all) fields of the sample in index row `row`, read from its
    shard by offset (:func:`gl10m.shards.read_members`: extents checked before a byte is read,
    each member's tar header checked against the index). `fh` may be an already open shard file
    (for many reads from one shard)."""
    from gl10m.shards import read_members

    fields = list(row["fields"])
    offsets, sizes = list(row["offsets"]), list(row["sizes"])
    want = fields if names is None else list(names)
    unknown = [n for n in want if n not in fields]
    if unknown:
        raise UserError(f"sample {row['key']}: no field {unknown[0]!r} in the index")
    where = f"{row['split']}/{row['shard']}"
    path = Path(shards_dir) / str(row["split"]) / str(row["shard"])
    if not (len(fields) == len(offsets) == len(sizes)):
        raise UserError(f"sample {row['key']} ({where}): the index lists "
                        f"{len(fields)} fields, {len(offsets)} offsets, {len(sizes)} sizes")

    def _read(f):
        fd = f.fileno()

        def read(offset: int, size: int) -> bytes:
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise UserError(f"sample {row['key']}: {path.name} is shorter than the index says (truncated?)")
            return data

        extents = [(n, offsets[fields.index(n)], sizes[fields.index(n)]) for n in want]
        return read_members(read, where, str(row["key"]), extents, file_size=os.fstat(fd).st_size)

    if fh is not None:
        return _read(fh)
    if not path.is_file():
        raise UserError(f"sample {row['key']}: shard {path} is missing")
    with open(path, "rb") as f:
        return _read(f)


def load_sample(shards_dir: str | Path, key: str, *, tiles: Iterable[int] | str | None = None) -> smp.Sample:
    """Sample `key` decoded from the shards (only the HR `tiles` asked for: a list of indices, or
    ``"all"`` / None for all 100)."""
    root = shards_root(shards_dir)
    row = index_row(read_index(root), key, root)
    idx = smp._tile_list(tiles)
    names = [smp.LR_FIELD, smp.LABELS_FIELD, smp.TILE_FRAC_FIELD, smp.META_FIELD, *(smp.hr_field(i) for i in idx)]
    data = read_fields(root, row, names)
    try:
        return smp.decode_sample(data, tiles=idx)
    except Exception as e:  # noqa: BLE001 - a bad image or array: one line naming the shard and sample
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"sample {key} ({row['split']}/{row['shard']}): does not decode "
                        f"({type(e).__name__}: {msg})"[:500]) from None


def iter_meta(shards_dir: str | Path, rows) -> Iterable[tuple[str, dict]]:
    """(key, meta.json dict) for the index `rows` (a DataFrame), one open file per shard."""
    root = Path(shards_dir)
    for (split, shard), g in rows.groupby(["split", "shard"], sort=True):
        path = root / split / shard
        if not path.is_file():
            raise UserError(f"shard {path} is listed in the index but missing")
        with open(path, "rb") as f:
            for _, r in g.iterrows():
                data = read_fields(root, r, [smp.META_FIELD], fh=f)[smp.META_FIELD]
                yield str(r["key"]), smp.decode_meta(data)


# ---------------------------------------------------------------------------------------------
# Concept names
# ---------------------------------------------------------------------------------------------
def resolve_profile(profile, shards_dir: str | Path | None, n: int):
    """`profile` if given; else the default profile when the shards' manifest names it (or names
    none) and it has `n` concepts; else None."""
    if profile is not None:
        return profile if profile.n_concepts == n else None
    if shards_dir is None:
        return None
    try:
        from gl10m import profile as prof_mod

        p = prof_mod.load()
    except UserError:
        return None
    named = (read_manifest(shards_dir).get("profile") or {}).get("name")
    return p if p.n_concepts == n and named in (None, p.name) else None


def _manifest_concepts(shards_dir: str | Path | None, n: int) -> list[dict] | None:
    """The manifest's ``concepts`` list ({id, name, label}) when it has `n` entries."""
    if shards_dir is None:
        return None
    cs = read_manifest(shards_dir).get("concepts")
    if isinstance(cs, list) and len(cs) == n and all(isinstance(c, dict) and "name" in c for c in cs):
        return sorted(cs, key=lambda c: int(c.get("id", 0)))
    return None


def concept_labels(n: int, profile=None, shards_dir: str | Path | None = None) -> list[str]:
    """Display labels of the `n` concepts (``Pool``): the given profile's, else the shards'
    manifest's, else the default profile's (:func:`resolve_profile`), else ``c00``, ``c01``.."""
    if profile is None and (cs := _manifest_concepts(shards_dir, n)):
        return [str(c.get("label") or c["name"]) for c in cs]
    p = resolve_profile(profile, shards_dir, n)
    return [c.label for c in p.concepts] if p is not None else [f"c{i:02d}" for i in range(n)]


def concept_names(n: int, profile=None, shards_dir: str | Path | None = None) -> list[str]:
    """Snake_case names of the `n` concepts (``swimming_pool``), looked up like :func:`concept_labels`."""
    if profile is None and (cs := _manifest_concepts(shards_dir, n)):
        return [str(c["name"]) for c in cs]
    p = resolve_profile(profile, shards_dir, n)
    return [c.name for c in p.concepts] if p is not None else [f"c{i:02d}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------
def stats(shards_dir: str | Path, profile=None) -> dict:
    """Numbers of a shards folder, from the index (and the shard files' sizes on disk).

    Keys: ``path``, ``profile``, ``builder`` (from the manifest), ``samples`` {split: n},
    ``total_samples``, ``hr_tiles``, ``states`` {split: {state: n}}, ``concepts`` (names),
    ``concept_counts`` {split: [n per concept]} (scenes containing each concept) and ``all``,
    ``shards`` {split: n}, ``shard_bytes`` {split: bytes}, ``total_shards``, ``total_bytes``,
    ``mean_sample_bytes`` and ``mean_sample_bytes_split`` (sample payload without tar headers: the
    index ``nbytes``), ``missing_shards``. All plain
    JSON types.
    """
    root = shards_root(shards_dir)
    idx = read_index(root)
    man = read_manifest(root)
    splits = [s for s in smp.SPLITS if s in set(idx["split"])] + sorted(set(idx["split"]) - set(smp.SPLITS))
    n_concepts = len(idx["labels"].iloc[0]) if len(idx) else 0
    counts: dict[str, list[int]] = {}
    for s in splits:
        lab = np.stack([np.asarray(x, dtype=np.int64) for x in idx.loc[idx["split"] == s, "labels"]])
        counts[s] = [int(v) for v in lab.sum(axis=0)]
    counts["all"] = [int(sum(counts[s][i] for s in splits)) for i in range(n_concepts)]
    shards_n, shard_bytes, missing = {}, {}, []
    for s in splits:
        names = sorted(set(idx.loc[idx["split"] == s, "shard"]))
        shards_n[s] = len(names)
        total = 0
        for name in names:
            p = root / s / name
            if p.is_file():
                total += p.stat().st_size
            else:
                missing.append(f"{s}/{name}")
        shard_bytes[s] = int(total)
    states = {s: {str(k): int(v) for k, v in sorted(idx.loc[idx["split"] == s, "state"].value_counts().items())}
              for s in splits}
    n = int(len(idx))
    return {
        "path": str(root),
        "profile": man.get("profile"),
        "builder": man.get("builder"),
        "samples": {s: int((idx["split"] == s).sum()) for s in splits},
        "total_samples": n,
        "hr_tiles": n * smp.N_TILES,
        "states": states,
        "concepts": concept_names(n_concepts, profile, root) if n_concepts else [],
        "concept_counts": counts,
        "shards": shards_n,
        "shard_bytes": shard_bytes,
        "total_shards": int(sum(shards_n.values())),
        "total_bytes": int(sum(shard_bytes.values())),
        "mean_sample_bytes": float(idx["nbytes"].mean()) if n else 0.0,
        "mean_sample_bytes_split": {s: float(idx.loc[idx["split"] == s, "nbytes"].mean()) for s in splits},
        "missing_shards": missing,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def format_stats(d: dict) -> str:
    """The :func:`stats` dict as a plain-text report (what ``gl10m stats`` prints)."""
    lines = []
    prof, builder = d.get("profile") or {}, d.get("builder") or {}
    who = []
    if prof:
        who.append(f"profile {prof.get('name')} v{prof.get('version')} ({prof.get('hash')})")
    if builder:
        who.append(f"{builder.get('name')} {builder.get('version')}")
    lines.append(f"shards: {d['path']}" + (f"  [{', '.join(who)}]" if who else ""))
    splits = list(d["samples"])
    lines.append(f"{'split':<7} {'samples':>8} {'shards':>7} {'size':>10} {'mean/sample':>12}  states")
    for s in splits:
        n = d["samples"][s]
        st = " ".join(f"{k}:{v}" for k, v in d["states"][s].items())
        mean = d.get("mean_sample_bytes_split", {}).get(s, 0.0)
        lines.append(f"{s:<7} {n:>8} {d['shards'][s]:>7} {human_bytes(d['shard_bytes'][s]):>10} "
                     f"{human_bytes(mean):>12}  {st}")
    lines.append(f"{'total':<7} {d['total_samples']:>8} {d['total_shards']:>7} {human_bytes(d['total_bytes']):>10} "
                 f"{human_bytes(d['mean_sample_bytes']):>12}  {d['hr_tiles']} HR tiles")
    if d["missing_shards"]:
        lines.append(f"MISSING shard files: {', '.join(d['missing_shards'][:5])}"
                     + (" ..." if len(d["missing_shards"]) > 5 else ""))
    names, counts = d["concepts"], d["concept_counts"]
    if names:
        order = sorted(range(len(names)), key=lambda i: (-counts["all"][i], i))
        lines.append("")
        lines.append("scenes containing each concept (sorted by total):")
        head = f"{'id':>3} {'concept':<26}" + "".join(f" {s:>7}" for s in splits) + f" {'total':>7}"
        lines.append(head)
        for i in order:
            lines.append(f"{i:>3} {names[i]:<26}" + "".join(f" {counts[s][i]:>7}" for s in splits)
                         + f" {counts['all'][i]:>7}")
        absent = [names[i] for i in order if counts["all"][i] == 0]
        if absent:
            lines.append(f"absent from every split: {len(absent)} concept(s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# render / show
# ---------------------------------------------------------------------------------------------
def _palette(n: int) -> list:
    from matplotlib import colormaps

    base = list(colormaps["tab20"].colors) + list(colormaps["tab20b"].colors)
    return [base[(2 * i) % 20] if i < 10 else base[(2 * (i - 10) + 1) % 20] if i < 20 else base[20 + (i - 20) % 20]
            for i in range(n)]


def mosaic(sample: smp.Sample, tile_display: int | None = None, fill: int = 128) -> np.ndarray:
    """The HR tiles of `sample` as one ``[10*t, 10*t, 3]`` uint8 image (tile index row*10+col, row 0
    north); `tile_display` resizes each tile (Pillow Lanczos) to t x t, default native 268. Tiles
    the sample does not hold are flat grey."""
    from PIL import Image

    g = int(round(smp.N_TILES ** 0.5))
    t = int(tile_display or smp.TILE_PX)
    out = np.full((g * t, g * t, 3), fill, np.uint8)
    for j, i in enumerate(sample.tiles):
        tile = np.asarray(sample.hr[j])
        if t != tile.shape[0]:
            tile = np.asarray(Image.fromarray(tile).resize((t, t), Image.Resampling.LANCZOS))
        r, c = divmod(int(i), g)
        out[r * t:(r + 1) * t, c * t:(c + 1) * t] = tile
    return out


def outline_segments(mask: np.ndarray, inset: float = 0.0, res: int = 50) -> np.ndarray:
    """Closed outline of the True cells of a boolean tile grid as line segments
    ``[n, 2, 2]`` (x, y in tile units, y down), moved `inset` tile units into the region: the
    region is rasterised at `res` px per tile, eroded by ``round(inset*res)`` px (outside the
    grid counts as outside), and its pixel boundary is returned."""
    mask = np.asarray(mask, bool)
    m = int(round(inset * res))
    big = np.kron(mask, np.ones((res, res), bool))
    if m > 0:
        pad = np.pad(big, m + 1).astype(np.int32)
        ii = pad.cumsum(0).cumsum(1)
        w = 2 * m + 1
        box = ii[w:, w:] - ii[:-w, w:] - ii[w:, :-w] + ii[:-w, :-w]
        big = box[: big.shape[0], : big.shape[1]] == w * w
    e = np.pad(big, 1)
    segs = []
    hy, hx = np.nonzero(e[1:, 1:-1] != e[:-1, 1:-1])  # horizontal edges at y = hy (pixel units)
    segs += [((x, y), (x + 1, y)) for y, x in zip(hy.tolist(), hx.tolist())]
    vy, vx = np.nonzero(e[1:-1, 1:] != e[1:-1, :-1])  # vertical edges at x = vx
    segs += [((x, y), (x, y + 1)) for y, x in zip(vy.tolist(), vx.tolist())]
    return np.asarray(segs, dtype=np.float64).reshape(-1, 2, 2) / res


def _title(sample: smp.Sample) -> str:
    m = sample.meta or {}
    parts = [f"{sample.key or m.get('key', '?')}", f"{m.get('state', '?')} / {sample.split or m.get('split', '?')}"]
    naip = m.get("naip") or {}
    if naip:
        parts.append(f"NAIP {naip.get('year', '?')} ({naip.get('date', '?')}, {len(naip.get('items') or [])} quarter-quads)")
    s2 = m.get("s2") or {}
    if s2:
        parts.append(f"S2 {s2.get('window', '?')} window {s2.get('start', '?')}..{s2.get('end', '?')}, "
                     f"{len(s2.get('items') or [])} dates")
    return "   |   ".join(parts)


def render(sample: smp.Sample, *, mode: str = "dominant", concept_labels: Sequence[str] | None = None,
           zoom: int = 3):
    """A matplotlib Figure of `sample`: LR (left, ``zoom`` x nearest, untouched pixels: the LR
    axes' image array is ``sample.lr``) and the 10 x 10 HR mosaic (right, each tile resized to
    ``round(268*zoom/10)`` px) with its grid, row/col ticks, and the per-tile dominant concept
    (``mode="dominant"``) or the outline of each concept's tiles (``mode="outlines"``).
    Built without pyplot (no global state); save with ``fig.savefig(..., dpi=gl10m.inspect.DPI)``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    zoom = int(zoom)
    if zoom < 1:
        raise UserError(f"zoom must be a positive integer, got {zoom}")
    frac = np.asarray(sample.tile_frac, dtype=np.float32)
    n_tiles, n_c = frac.shape
    g = int(round(n_tiles ** 0.5))
    labels = list(concept_labels) if concept_labels is not None else _labels_from_meta(sample, n_c)
    lab_vec = np.asarray(sample.labels).astype(bool)
    present = [c for c in range(n_c) if (c < len(lab_vec) and lab_vec[c]) or (frac[:, c] > 0).any()]
    colours = dict(zip(present, _palette(len(present))))
    dom = np.where(frac.max(axis=1) > 0, frac.argmax(axis=1), -1)

    lr_px = smp.TILE_PX * zoom
    t_px = int(round(smp.TILE_PX * zoom / g))
    mos_px = g * t_px
    pad, gap, top = 50, 70, 64 + 12 * zoom
    n_leg = max(1, len(present))
    ncol = 3 if zoom >= 3 else 2
    leg_h = 30 + 22 * ((n_leg + ncol - 1) // ncol)
    panel = max(lr_px, mos_px)
    W, H = pad + lr_px + gap + mos_px + pad, top + panel + 40 + leg_h
    fig = Figure(figsize=(W / DPI, H / DPI), dpi=DPI)
    fig.patch.set_facecolor("white")

    def axes(x0, y_top, w, h):
        return fig.add_axes((x0 / W, (H - y_top - h) / H, w / W, h / H))

    fs = 7 + zoom
    ax_lr = axes(pad, top, lr_px, lr_px)
    ax_lr.imshow(sample.lr, interpolation="nearest", resample=False)
    ax_lr.set_axis_off()
    m = sample.meta or {}
    lr_m = (m.get("lr") or {})
    res = f", {lr_m.get('px_m_x')} x {lr_m.get('px_m_y')} m/px" if lr_m.get("px_m_x") else ""
    ax_lr.set_title(f"LR Sentinel-2 RGB {sample.lr.shape[1]}x{sample.lr.shape[0]}{res}", fontsize=fs)

    ax = axes(pad + lr_px + gap, top, mos_px, mos_px)
    ax.imshow(mosaic(sample, t_px), extent=(0, g, g, 0), interpolation="nearest", resample=False)
    ax.set_xlim(0, g)
    ax.set_ylim(g, 0)
    for k in range(1, g):
        ax.axhline(k, color="white", lw=0.6, alpha=0.8)
        ax.axvline(k, color="white", lw=0.6, alpha=0.8)
    ax.set_xticks(np.arange(g) + 0.5, [str(i) for i in range(g)], fontsize=fs - 2)
    ax.set_yticks(np.arange(g) + 0.5, [str(i) for i in range(g)], fontsize=fs - 2)
    ax.tick_params(length=0, labeltop=True, labelbottom=False)
    ax.set_ylabel("row (0 = north)", fontsize=fs - 1)
    ax.set_title(f"HR NAIP {g}x{g} tiles, index = row*{g} + col  ({mode})", fontsize=fs, pad=6 + 3 * zoom)

    counts_dom = {c: int((dom == c).sum()) for c in present}
    counts_any = {c: int((frac[:, c] > 0).sum()) for c in present}
    if mode == "dominant":
        tfs = 3.5 + 1.2 * zoom
        width = max(6, int(t_px / (tfs * 0.75)))
        for i in range(n_tiles):
            c = int(dom[i])
            if c < 0:
                continue
            r, col = divmod(i, g)
            text = "\n".join(textwrap.wrap(labels[c], width)[:2])
            if zoom >= 3:
                text += f"\n{frac[i, c] * 100:.0f}%"
            ax.add_patch(Rectangle((col + 0.04, r + 0.04), 0.92, 0.92, fill=False, ec=colours[c], lw=1.5))
            ax.text(col + 0.5, r + 0.5, text, ha="center", va="center", fontsize=tfs, color="black",
                    bbox=dict(boxstyle="round,pad=0.15", fc=colours[c], ec="none", alpha=0.75))
        handles = [Patch(fc=colours[c], ec="none", label=f"{labels[c]} ({c}): dominant in {counts_dom[c]}, "
                                                              f"present in {counts_any[c]} tiles") for c in present]
    else:
        from matplotlib.collections import LineCollection

        for k, c in enumerate(present):
            mask = (frac[:, c] > 0).reshape(g, g)
            if not mask.any():
                continue
            inset = 0.03 + 0.04 * (k % 5)  # outlines of concepts sharing a tile edge stay apart
            ax.add_collection(LineCollection(outline_segments(mask, inset), colors=[colours[c]],
                                             linewidths=1.0 + 0.3 * zoom, capstyle="projecting"))
        handles = [Patch(fc="none", ec=colours[c], lw=2, label=f"{labels[c]} ({c}): {counts_any[c]} tiles")
                   for c in present]
    if not present:
        handles = [Patch(fc="none", ec="none", label="no concept in this sample")]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, (leg_h + 5) / H), ncol=ncol,
               fontsize=fs - 1, frameon=False, title="concepts (id)", title_fontsize=fs - 1)
    fig.suptitle(_title(sample), y=1 - 18 / H, fontsize=fs + 1)
    return fig


def _labels_from_meta(sample: smp.Sample, n: int) -> list[str]:
    labels = [f"c{i:02d}" for i in range(n)]
    m = sample.meta or {}
    for cid, name in zip(m.get("concept_ids") or [], m.get("concepts") or []):
        if 0 <= int(cid) < n:
            labels[int(cid)] = str(name)
    return labels


def write_public(path: str | Path, data: bytes) -> Path:
    """Atomic write (gl10m.io) of a file meant to be read by others: mode 0644, not the 0600 of
    the temp file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Write a Figure as PNG atomically, without the software/date metadata (same bytes on rerun)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return write_public(path, buf.getvalue())


def show(key: str, shards_dir: str | Path, out_png: str | Path, *, mode: str = "dominant", profile=None,
         zoom: int = 3) -> Path:
    """Render sample `key` from `shards_dir` (LR, HR mosaic, concepts) to the PNG `out_png`."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    s = load_sample(shards_dir, key)
    n = np.asarray(s.tile_frac).shape[1]
    labels = concept_labels(n, profile, shards_dir)
    if labels[0] == "c00":
        labels = _labels_from_meta(s, n)
    fig = render(s, mode=mode, concept_labels=labels, zoom=zoom)
    return save_figure(fig, out_png)
