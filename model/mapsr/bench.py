"""MapSR judged on held-out windows with known 1 m truth, against a supervised baseline.

The testbed world (:mod:`gl10m.testbed`) has a per-pixel truth raster, so MapSR's claims can be
checked offline (:func:`run`):

* **Windows.** Square windows of ``size`` 1 m pixels (default 268, one GL-10M HR tile) rendered like
  NAIP from the testbed world (:func:`gl10m.model.mapsr.io.testbed_scene`), their truth grouped
  into the five base classes. Train, val and test windows come from *different world seeds*
  (default 101, 2027, 7919), so they never overlap; within a seed, windows sit on a grid of
  ``size`` pixels (never overlapping either), drawn at random (seeded) round-robin over the
  regions, and a window with more than 5 % unlabelled truth is skipped.
* **Coarse labels** from the truth, majority per cell (:func:`majority_pool`): NLCD-like 30 m cells
  and GL-10M's 268 px tiles (with 268 px windows: one label per window, the tile's dominant class).
* **Methods**, all on the same frozen encoder's dense features (:func:`dense_features`, with the
  encoder's settings in ``BenchConfig.features``: chip size, shifted passes, colour channels):
  ``coarse`` (the coarse map upsampled, nothing trained); ``cosine`` (MapSR fitted on the *coarse*
  labels of the train windows: linear probe, prompts, cosine matching, with the window's own coarse
  map as a prior at prediction time, its weight chosen on the val windows among
  ``BenchConfig.priors``, 0 = none, :func:`select_prior`: MapSR's task gives it the coarse map);
  ``refined`` (graph refinement on top, its settings chosen on the val windows,
  :func:`select_refinement`, among a small grid that includes "no refinement", so on val it is
  never below cosine); ``supervised`` (:class:`DenseHead`, a small per-pixel MLP trained on the
  train windows' *1 m* truth: what HR labels buy); ``cosine_noprior`` (cosine matching without the
  prior, to show what the prior does).
* **Scores.** The headline is the *pooled* mIoU over the test windows (one confusion matrix summed
  over all windows, the usual segmentation score), with a bootstrap 95 % interval that resamples
  windows (:func:`pooled_ci`); paired differences (refined - cosine, cosine - coarse, ...) use the
  same resamples for both methods. Also: OA, and the mean of per-window mIoUs (a class predicted
  on a few pixels of a window that lacks it costs that window a whole class's IoU, so this one is
  harsh on maps that are right almost everywhere). Trainable parameters and training seconds of
  each method (features excluded: they are shared).

Test windows are rendered only after everything is fitted and chosen; nothing about them reaches
the fit or the selection. ``bench/mapsr.py`` is the script (table, ``--json``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gl10m.model.mapsr.graph import RefineConfig
from gl10m.model.mapsr.model import (FeatureMap, MapSR, MapSRConfig, MapSRError, confusion, dense_features,
                                     majority_pool, scores_from_confusion)

SPLIT_SEEDS = {"train": 101, "val": 2027, "test": 7919}
METHODS = ("coarse", "cosine", "refined", "supervised", "cosine_noprior")
PRIORS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0)  # coarse-prior weights tried on val (0: none)
MAX_UNLABELLED = 0.05


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Where a window is: its split, the world seed, region, and (row, col) in the region's 1 m grid."""

    split: str
    seed: int
    region: str
    row: int
    col: int
    size: int

    @property
    def key(self) -> str:
        return f"{self.split}/{self.seed}/{self.region}/{self.row}_{self.col}"


@dataclass
class BenchWindow:
    window: Window
    image: np.ndarray                 # uint8 [3, S, S]
    truth: np.ndarray                 # int16 [S, S], -1 unlabelled
    coarse: dict[int, np.ndarray]     # cell -> int16 [S, S] (majority per cell, upsampled)
    classes: list[str]


def coarse_from_truth(truth: np.ndarray, cell: int, n_classes: int) -> np.ndarray:
    """The majority class of every ``cell`` x ``cell`` block of the truth (``-1`` where a block is all
    unlabelled), upsampled back onto the truth's grid: a coarse map made from the HR truth."""
    grid = majority_pool(truth, cell, n_classes)
    h, w = truth.shape
    # each cell covers exactly its cell x cell pixels (the last row/column of cells may be partial)
    full = np.repeat(np.repeat(grid, cell, 0), cell, 1)[:h, :w]
    return full.astype(np.int16)


class WorldWindows:
    """Renders windows of one world seed (the world is generated once, on first use)."""

    def __init__(self, seed: int, spec: Any = None):
        self.seed = int(seed)
        self._spec_arg = spec
        self._regions = None
        self.spec = None

    def regions(self):
        if self._regions is None:
            from gl10m.testbed import layout as L, spec as SP

            spec = self._spec_arg
            if spec is None or not hasattr(spec, "regions"):
                spec = SP.load_spec(spec) if not isinstance(spec, dict) else SP.spec_from_dict(spec)
            self.spec = spec
            self._regions = L.generate(spec, self.seed)
        return self._regions

    def candidates(self, size: int, rng: np.random.Generator) -> list[tuple[str, int, int]]:
        """Non-overlapping grid positions of every region (away from the rotated grid's corners,
        where the region ends), shuffled, interleaved over regions."""
        from gl10m.testbed import raster as R

        per = []
        for r in sorted(self.regions(), key=lambda r: r.code):
            _, _, (h, w) = R.truth_grid(r, 1.0)
            m = max(size, int(0.06 * max(h, w)))
            rows = list(range(m, h - m - size, size))
            cols = list(range(m, w - m - size, size))
            pos = [(r.code, a, b) for a in rows for b in cols]
            rng.shuffle(pos)
            per.append(pos)
        out = []
        for i in range(max((len(p) for p in per), default=0)):
            out += [p[i] for p in per if i < len(p)]
        return out

    def render(self, split: str, n: int, size: int, cells: Sequence[int], rng_seed: int = 0) -> list[BenchWindow]:
        from gl10m.model.mapsr.io import testbed_scene

        rng = np.random.default_rng([self.seed, int(rng_seed)])
        out: list[BenchWindow] = []
        for code, r0, c0 in self.candidates(size, rng):
            if len(out) >= n:
                break
            sc = testbed_scene(self.spec, region=code, size=size, cell=max(cells), offset=(r0, c0), seed=self.seed,
                               regions=self.regions())
            if (sc.truth < 0).mean() > MAX_UNLABELLED:
                continue
            nc = len(sc.classes)
            out.append(BenchWindow(Window(split, self.seed, code, r0, c0, size), sc.image, sc.truth,
                                   {c: coarse_from_truth(sc.truth, c, nc) for c in cells}, sc.classes))
        if len(out) < n:
            raise MapSRError(f"world seed {self.seed}: only {len(out)} windows of {size} px, {n} asked")
        return out


# ---------------------------------------------------------------------------------------------
# The supervised baseline
# ---------------------------------------------------------------------------------------------
class DenseHead(nn.Module):
    """A small per-pixel head on L2-normalised frozen features: ``Linear(D, hidden) - ReLU -
    Linear(hidden, C)`` (``hidden=0``: a single linear layer)."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.net = (nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)) if hidden
                    else nn.Linear(dim, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, C]
        return self.net(F.normalize(x.float(), dim=-1))

    @torch.no_grad()
    def predict(self, fmap: FeatureMap, window: int = 256) -> np.ndarray:
        h, w = fmap.shape
        out = np.zeros((h, w), np.int16)
        for r0 in range(0, h, window):
            for c0 in range(0, w, window):
                r1, c1 = min(h, r0 + window), min(w, c0 + window)
                f = fmap.window(r0, r1, c0, c1)
                out[r0:r1, c0:c1] = self(f.reshape(f.shape[0], -1).T).argmax(1).reshape(r1 - r0, c1 - c0).cpu().numpy()
        return out


def train_dense_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, hidden: int = 32, steps: int = 300,
                     batch: int = 4096, lr: float = 3e-3, seed: int = 0) -> DenseHead:
    """Train :class:`DenseHead` on pixel features ``x [N, D]`` and their HR labels ``y [N]``
    (``0..n_classes-1``): AdamW (weight decay 1e-4), minibatches of ``batch`` pixels drawn at random
    (seeded), ``steps`` steps, cross-entropy."""
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    head = DenseHead(x.shape[1], n_classes, hidden).to(x.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    y = y.long().to(x.device)
    for _ in range(int(steps)):
        i = torch.randint(0, len(x), (min(batch, len(x)),), generator=gen).to(x.device)
        loss = F.cross_entropy(head(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def sample_pixels(fmaps: Sequence[FeatureMap], labels: Sequence[np.ndarray], n: int, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` labelled pixels (label >= 0) drawn at random (seeded), spread over the maps by
    their labelled pixel counts -> (features [N, D], labels [N])."""
    gen = torch.Generator().manual_seed(int(seed))
    labs = [torch.as_tensor(np.asarray(l)).long().flatten() for l in labels]
    counts = [int((l >= 0).sum()) for l in labs]
    total = sum(counts)
    if total == 0:
        raise MapSRError("no labelled pixel to train on")
    xs, ys = [], []
    for fm, lab, k in zip(fmaps, labs, counts):
        if not k:
            continue
        take = min(k, max(1, round(n * k / total)))
        idx = torch.nonzero(lab >= 0).flatten()
        pick = idx[torch.randperm(len(idx), generator=gen)[:take]]
        xs.append(fm.points(pick // fm.shape[1], pick % fm.shape[1]))
        ys.append(lab[pick])
    return torch.cat(xs), torch.cat(ys)


def n_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ---------------------------------------------------------------------------------------------
# Refinement chosen on val windows
# ---------------------------------------------------------------------------------------------
def refine_grid(size: str = "default", window: int = 268) -> list[RefineConfig | None]:
    """The candidates :func:`select_refinement` tries: ``None`` (no refinement: the cosine map) and
    block graphs (4 x 4 pixel nodes over a ``window`` px region) over k, alpha, sigma and the image's
    colour in the edge weights. The reference's pixel graph (``RefineConfig()``: pixel nodes, k=400)
    is not among them: ~150 s a 256 px window on this CPU, too slow to select or bench here.
    ``size="tiny"``: three candidates, for tests."""
    b = dict(mode="blocks", window=int(window), block=4, gamma=1.0)
    if size == "tiny":
        return [None, RefineConfig(**b, k=10, alpha=0.5, sigma=0.0), RefineConfig(**b, k=10, alpha=0.9, sigma=0.0)]
    return [None,
            RefineConfig(**b, k=20, alpha=0.5, sigma=0.0),
            RefineConfig(**b, k=20, alpha=0.9, sigma=0.0),
            RefineConfig(**b, k=100, alpha=0.9, sigma=0.0),
            RefineConfig(**b, k=20, alpha=0.9, sigma=0.05),
            RefineConfig(**b, k=20, alpha=0.9, sigma=0.0, color=8.0),
            RefineConfig(**b, k=100, alpha=0.95, sigma=0.05, color=8.0)]


def describe(cfg: RefineConfig | None) -> str:
    if cfg is None:
        return "none"
    c = cfg.resolved()
    s = f"{c.mode} w{c.window}" + (f" b{c.block}" if c.mode == "blocks" else "")
    return s + f" k{c.k} g{c.gamma:g} a{c.alpha:g} s{c.sigma:g}" + (f" color{c.color:g}" if c.color else "")


@dataclass
class Scored:
    window: BenchWindow
    fmap: FeatureMap
    coarse: np.ndarray | None = None  # the coarse map the model may use as a prior (``MapSRConfig.prior``)


def select_refinement(model: MapSR, val: Sequence[Scored], candidates: Sequence[RefineConfig | None],
                      progress: Callable[[str], None] | None = None) -> tuple[RefineConfig | None, list[dict]]:
    """Score every candidate (``None``: no refinement) by its pooled mIoU over the *val* windows and
    return ``(best, table)``; ties go to the earlier candidate (``None`` first: refinement must earn
    its place). Only the windows given are looked at."""
    n = len(model.classes)
    rows = []
    for cand in candidates:
        t0 = time.perf_counter()
        conf = np.zeros((n, n + 1), np.int64)
        for it in val:
            if cand is None:
                pred = model.predict(it.window.image, refine=False, fmap=it.fmap, coarse=it.coarse)["cosine"]
            else:
                model.refine_cfg = cand.resolved()
                pred = model.predict(it.window.image, refine=True, fmap=it.fmap, coarse=it.coarse)["refined"]
            conf += confusion(pred, it.window.truth, n)
        rows.append({"refine": describe(cand), "val_miou": scores_from_confusion(conf)["miou"],
                     "seconds_per_window": (time.perf_counter() - t0) / max(1, len(val)), "cfg": cand})
        if progress:
            progress(f"  val {rows[-1]['refine']:45s} mIoU {rows[-1]['val_miou']:.4f}")
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_miou"], -i))
    return rows[best]["cfg"], rows


def select_prior(model: MapSR, val: Sequence[Scored], weights: Sequence[float], radius: int,
                 progress: Callable[[str], None] | None = None) -> tuple[float, list[dict]]:
    """The coarse map as a prior at prediction time (``MapSRConfig.prior``, :func:`coarse_prior` within
    ``radius`` px): score every weight (0: no prior) by the pooled mIoU of cosine matching over the
    *val* windows (their own coarse maps, ``Scored.coarse``), set the best on ``model.cfg`` and
    return ``(best, table)``; ties go to the earlier weight (put 0 first: the prior must earn its
    place). Only the windows given are looked at."""
    n = len(model.classes)
    rows = []
    for wgt in weights:
        model.cfg.prior, model.cfg.prior_radius = float(wgt), int(radius)
        conf = np.zeros((n, n + 1), np.int64)
        for it in val:
            conf += confusion(model.predict(it.window.image, refine=False, fmap=it.fmap, coarse=it.coarse)["cosine"],
                              it.window.truth, n)
        rows.append({"prior": float(wgt), "val_miou": scores_from_confusion(conf)["miou"]})
        if progress:
            progress(f"  val prior {wgt:<6g} (radius {radius} px) cosine mIoU {rows[-1]['val_miou']:.4f}")
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_miou"], -i))
    model.cfg.prior = rows[best]["prior"]
    return rows[best]["prior"], rows


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile bootstrap interval (resampling
    the values, i.e. windows, with replacement; seeded)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def pooled_ci(confs: np.ndarray, others: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> tuple[float, float, float]:
    """(value, low, high) of the pooled mIoU of per-window confusions ``confs [W, C, C+1]`` (summed
    over windows), its percentile bootstrap interval resampling windows with replacement (seeded).
    With ``others`` (the same windows scored for another method), the same for the paired
    difference ``mIoU(confs) - mIoU(others)``, both sums drawn from the same resampled windows."""
    confs = np.asarray(confs, np.int64)

    def miou(c):  # c [..., C, C+1] -> [...]
        n = c.shape[-2]
        tp = np.diagonal(c[..., :n], axis1=-2, axis2=-1).astype(np.float64)
        union = c.sum(-1) + c[..., :n].sum(-2) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        return np.nanmean(iou, -1)

    o = None if others is None else np.asarray(others, np.int64)
    value = float(miou(confs.sum(0)) - (0.0 if o is None else miou(o.sum(0))))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(confs), (n_boot, len(confs)))
    boot = miou(confs[idx].sum(1)) - (0.0 if o is None else miou(o[idx].sum(1)))
    a = (1 - level) / 2
    return value, float(np.nanquantile(boot, a)), float(np.nanquantile(boot, 1 - a))


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    size: int = 268
    cells: tuple[int, ...] = (30, 268)
    n_train: int = 24
    n_val: int = 12
    n_test: int = 50
    seeds: dict[str, int] = field(default_factory=lambda: dict(SPLIT_SEEDS))
    grid: str = "default"
    pixels: int = 20_000
    probe_steps: int = 100
    head_hidden: int = 32
    head_steps: int = 300
    features: dict = field(default_factory=dict)  # encoder name -> dense_features settings (chip, shifts, color)
    priors: tuple[float, ...] = PRIORS
    prior_radius: float = 0.5  # in cells: the prior's box reaches half a cell around a pixel
    spec: Any = None
    seed: int = 0


def _features(encoder, wins: Sequence[BenchWindow], settings: dict | None = None) -> tuple[list[FeatureMap], float]:
    """Every window's dense features (:func:`dense_features` with ``settings``: ``chip``, ``shifts``,
    ``color``; by default chips of the encoder's ``hr_size``) and the seconds taken."""
    t0 = time.perf_counter()
    out = [dense_features(encoder, w.image, progress=False, **(settings or {})) for w in wins]
    return out, time.perf_counter() - t0


def run(encoders: dict[str, Any], cfg: BenchConfig | None = None, log: Callable[[str], None] = lambda s: None,
        select: Callable = None) -> dict:
    """The bench (see the module docstring). ``encoders``: name -> frozen ``TileEncoder``. Returns
    ``{"config", "windows": {split: [keys]}, "results": {encoder: {cell: {...}}}, "supervised":
    {encoder: {...}}}``; per method: per-window mIoU and OA, mean and bootstrap interval, params,
    training seconds; per (encoder, cell): the val table of refinement candidates and the choice."""
    cfg = cfg or BenchConfig()
    select = select or select_refinement
    cells = tuple(int(c) for c in cfg.cells)
    grid = refine_grid(cfg.grid, cfg.size)
    t0 = time.perf_counter()
    worlds = {s: WorldWindows(cfg.seeds[s], cfg.spec) for s in ("train", "val", "test")}
    if len({cfg.seeds[s] for s in worlds}) != 3:
        raise MapSRError(f"train, val and test need three different world seeds, got {cfg.seeds}")
    train = worlds["train"].render("train", cfg.n_train, cfg.size, cells, cfg.seed)
    val = worlds["val"].render("val", cfg.n_val, cfg.size, cells, cfg.seed)
    log(f"rendered {len(train)} train and {len(val)} val windows of {cfg.size} px "
        f"({time.perf_counter() - t0:.0f} s)")
    classes = train[0].classes
    nc = len(classes)
    fitted: dict[str, dict] = {}
    for ename, enc in encoders.items():
        enc.eval()
        fset = dict(cfg.features.get(ename) or {})
        bad = sorted(set(fset) - {"chip", "shifts", "color"})
        if bad:
            raise MapSRError(f"bench features for {ename}: unknown setting {bad[0]!r} (chip, shifts, color)")
        ftr, s_tr = _features(enc, train, fset)
        fva, s_va = _features(enc, val, fset)
        feat_s = (s_tr + s_va) / (len(train) + len(val))
        # supervised: HR truth of the train windows
        t1 = time.perf_counter()
        x, y = sample_pixels(ftr, [w.truth for w in train], cfg.pixels, cfg.seed)
        head = train_dense_head(x, y, nc, cfg.head_hidden, cfg.head_steps, seed=cfg.seed)
        sup = {"params": n_params(head), "train_seconds": time.perf_counter() - t1, "head": head}
        per_cell = {}
        for cell in cells:
            t1 = time.perf_counter()
            m = MapSR(enc, classes, MapSRConfig(chip=fset.get("chip"), shifts=int(fset.get("shifts", 1)),
                                                color_feature=float(fset.get("color", 0.0)),
                                                probe_pixels=cfg.pixels, probe_steps=cfg.probe_steps, seed=cfg.seed,
                                                progress=False))
            m.fit([(w.image, w.coarse[cell]) for w in train], fmaps=ftr)
            fit_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            scored = [Scored(w, f, w.coarse[cell]) for w, f in zip(val, fva)]
            radius = int(round(cfg.prior_radius * cell))
            prior, prior_table = select_prior(m, scored, cfg.priors, radius,
                                              progress=lambda s: log(f"{ename} cell {cell}:{s}"))
            log(f"{ename} cell {cell}: coarse prior chosen on val: {prior:g}")
            best, table = select(m, scored, grid, progress=lambda s: log(f"{ename} cell {cell}:{s}"))
            sel_s = time.perf_counter() - t1
            log(f"{ename} cell {cell}: refinement chosen on val: {describe(best)}")
            per_cell[cell] = {"model": m, "fit_seconds": fit_s, "select_seconds": sel_s, "refine": best,
                              "prior": prior, "prior_radius": radius, "prior_table": prior_table,
                              "val_table": [{k: v for k, v in r.items() if k != "cfg"} for r in table]}
        fitted[ename] = {"supervised": sup, "cells": per_cell, "feature_seconds_per_window": feat_s,
                         "features": fset, "stride": ftr[0].stride}
    # only now: the test windows
    test = worlds["test"].render("test", cfg.n_test, cfg.size, cells, cfg.seed)
    log(f"rendered {len(test)} test windows")
    results: dict[str, Any] = {}
    for ename, enc in encoders.items():
        fz = fitted[ename]
        fte, _ = _features(enc, test, fz["features"])
        sup = fz["supervised"]
        sup_conf = [confusion(sup["head"].predict(f), w.truth, nc) for w, f in zip(test, fte)]
        res_e: dict[str, Any] = {"feature_seconds_per_window": fz["feature_seconds_per_window"], "cells": {},
                                 "features": fz["features"], "stride": fz["stride"]}
        for cell, pc in fz["cells"].items():
            m: MapSR = pc["model"]
            per: dict[str, list] = {k: [] for k in METHODS}
            t1 = time.perf_counter()
            for w, f in zip(test, fte):
                per["coarse"].append(confusion(w.coarse[cell], w.truth, nc))
                if pc["refine"] is None:
                    p = m.predict(w.image, refine=False, fmap=f, coarse=w.coarse[cell])
                    p["refined"] = p["cosine"]
                else:
                    m.refine_cfg = pc["refine"].resolved()
                    p = m.predict(w.image, refine=True, fmap=f, coarse=w.coarse[cell])
                per["cosine"].append(confusion(p["cosine"], w.truth, nc))
                per["refined"].append(confusion(p["refined"], w.truth, nc))
                if pc["prior"]:  # cosine matching without the coarse prior, for comparison
                    m.cfg.prior = 0.0
                    per["cosine_noprior"].append(confusion(m.predict(w.image, refine=False, fmap=f)["cosine"],
                                                           w.truth, nc))
                    m.cfg.prior = pc["prior"]
                else:
                    per["cosine_noprior"].append(per["cosine"][-1])
            per["supervised"] = sup_conf
            probe_params = n_params(m.probe)
            meta = {"coarse": (0, 0.0), "cosine": (probe_params, pc["fit_seconds"]),
                    "cosine_noprior": (probe_params, pc["fit_seconds"]),
                    "refined": (probe_params, pc["fit_seconds"] + pc["select_seconds"]),
                    "supervised": (sup["params"], sup["train_seconds"])}
            rows = {}
            for k in METHODS:
                sc = [scores_from_confusion(c) for c in per[k]]
                mi = [s["miou"] for s in sc]
                oa = [s["oa"] for s in sc]
                pooled = scores_from_confusion(np.sum(per[k], 0), classes)
                rows[k] = {"miou": pooled_ci(np.stack(per[k]), seed=cfg.seed), "iou": pooled["iou"],
                           "oa": bootstrap_ci(oa, seed=cfg.seed), "window_miou": bootstrap_ci(mi, seed=cfg.seed),
                           "per_window_miou": mi, "params": meta[k][0], "train_seconds": meta[k][1]}
            diffs = {}
            for a, b in (("refined", "cosine"), ("cosine", "coarse"), ("refined", "coarse"),
                         ("supervised", "refined"), ("cosine", "cosine_noprior")):
                diffs[f"{a}-{b}"] = pooled_ci(np.stack(per[a]), np.stack(per[b]), seed=cfg.seed)
            res_e["cells"][cell] = {"rows": rows, "diffs": diffs, "refine": describe(pc["refine"]),
                                    "val_table": pc["val_table"], "prior": pc["prior"],
                                    "prior_radius": pc["prior_radius"], "prior_table": pc["prior_table"],
                                    "predict_seconds_per_window": (time.perf_counter() - t1) / len(test)}
        results[ename] = res_e
    return {"config": {k: v for k, v in vars(cfg).items() if k != "spec"},
            "windows": {"train": [w.window.key for w in train], "val": [w.window.key for w in val],
                        "test": [w.window.key for w in test]},
            "classes": classes, "results": results, "seconds": time.perf_counter() - t0}


def table(report: dict) -> str:
    """The human-readable table of a :func:`run` report."""
    lines = []
    cfg = report["config"]
    lines.append(f"MapSR on held-out testbed windows: {len(report['windows']['test'])} test windows of {cfg['size']} px "
                 f"(world seed {cfg['seeds']['test']}); fitted on {len(report['windows']['train'])} train windows "
                 f"(seed {cfg['seeds']['train']}), refinement chosen on {len(report['windows']['val'])} val windows "
                 f"(seed {cfg['seeds']['val']}); mIoU pooled over the test windows, OA and per-window mIoU their mean over "
                 f"windows; [bootstrap 95 %, resampling windows]")
    for ename, re_ in report["results"].items():
        for cell, rc in re_["cells"].items():
            lines.append("")
            fs = re_.get("features") or {}
            fdesc = ", ".join(f"{k} {v}" for k, v in sorted(fs.items())) or "chips of hr_size"
            lines.append(f"encoder {ename} (features: {fdesc}; a token every {re_.get('stride')} px), coarse cell "
                         f"{cell} px (coarse prior {rc['prior']:g} within {rc['prior_radius']} px; "
                         f"refinement: {rc['refine']})")
            lines.append(f"  {'method':14s} {'mIoU (pooled)':>24s} {'OA':>24s} {'per-window mIoU':>24s} "
                         f"{'params':>8s} {'train s':>8s}")
            for k in METHODS:
                r = rc["rows"][k]
                mi, oa, wm = r["miou"], r["oa"], r["window_miou"]
                lines.append(f"  {k:14s} {mi[0]:8.3f} [{mi[1]:.3f}, {mi[2]:.3f}] {oa[0]:8.3f} [{oa[1]:.3f}, {oa[2]:.3f}] "
                             f"{wm[0]:8.3f} [{wm[1]:.3f}, {wm[2]:.3f}] {r['params']:8d} {r['train_seconds']:8.1f}")
            ds = ", ".join(f"{k} {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for k, v in rc["diffs"].items())
            lines.append(f"  pooled mIoU, paired: {ds}")
            lines.append("  IoU per class (pooled): " + "; ".join(
                f"{k} " + " ".join(f"{'-' if v is None else f'{v:.2f}'}" for v in rc["rows"][k]["iou"].values())
                for k in METHODS) + f"  ({', '.join(report['classes'])})")
    return "\n".join(lines)
