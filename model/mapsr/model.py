"""MapSR: prompt-driven land-cover map super-resolution with a frozen vision encoder.

Turns a *coarse* land-cover map (30 m NLCD-like rasters, or gl10m's per-tile dominant concept on
a 10x10 grid) into a map at the imagery's resolution, without any high-resolution label (after
"Prompt-Driven Land Cover Map Super-Resolution via Vision Foundation Models", MapSR; our own
implementation). Four steps:

1. **Dense features.** Any frozen encoder of :mod:`gl10m.model.encoders` (``TileEncoder``;
   ``encode_hr``'s dense patch tokens). The image is cut into chips of ``chip`` pixels (default
   the encoder's ``hr_size``, so no resizing) with ``overlap`` pixels between neighbours; the chips'
   token grids are stitched into one token grid by a weighted average (a tent window per chip, so
   token estimates near a chip edge count less), and upsampled to pixels bilinearly (token centres
   at pixel centres) on demand, window by window (only the token grid is held in memory).
   Options: ``chip`` larger than ``hr_size`` feeds the encoder at a coarser scale (an encoder
   trained on 268 px GL-10M tiles shrunk to 64 px sees 256 px chips as it saw its tiles);
   ``shifts=n`` runs it on ``n x n`` copies of the image shifted by sub-token offsets and interleaves
   the token grids (a token every ``stride / n`` pixels); ``color_feature`` appends the image's own
   RGB to every pixel's (L2-normalised) token feature.
2. **Linear probe** (fitted once on the coarse labels). A single ``nn.Linear(D, C)`` on
   L2-normalised pixel features, trained with cross-entropy on up to ``probe_pixels`` pixels
   sampled at random (seeded) from the pixels that carry a coarse label, AdamW, full batch,
   ``probe_steps`` steps. **Class-balanced by default** (``probe_balanced=True``: the loss weights
   each class by the inverse of its pixel count, so rare classes are not swamped); set it False for
   plain cross-entropy.
3. **Class prompts.** For every class, the mean (L2-normalised) feature of the pixels whose probe
   prediction *agrees* with their coarse label: pixels where coarse map and image disagree (the
   coarse label bled over a road, a pond, a building) are left out. Only real classes get a prompt:
   unlabelled / no-data pixels (``-1``) never do, so there is no background or zero prompt. A class
   with coarse pixels but no agreeing pixel falls back to the mean of all its coarse pixels (a
   warning says so); a class without any coarse pixel has no prompt and is never predicted.
4. **Matching and refinement.** Every pixel is scored by the cosine of its feature with each prompt
   and labelled with the best one ("cosine matching"). Refinement (:mod:`gl10m.model.mapsr.graph`)
   min-max normalises the scores per pixel (the reference's heat map), propagates them on a kNN
   graph of the pixel features (``w_ij = max(0, cos)^gamma exp(-sigma |p_i - p_j|)``, symmetric
   normalisation, ``(I - alpha W) F = Y`` solved by conjugate gradient in torch, CPU or GPU) and
   takes the argmax. Defaults: pixel windows of 112 px, k=400, gamma=3, alpha=0.95, sigma=0.01
   (``--refine-mode blocks``: 4x4-pixel blocks as nodes, k=100, gamma=1, alpha=0.5, sigma=0); an
   optional colour term ``exp(-color |c_i - c_j|)`` on the image's RGB, off by default, lets the image
   say where a boundary runs inside one encoder token). Optionally (``prior > 0``), the coarse map,
   which MapSR has at prediction time anyway (its task: HR image + LR map -> HR map), is a prior:
   every class's cosine score gets ``prior`` times its share of the coarse map within
   ``prior_radius`` pixels (:func:`coarse_prior`) before the argmax and the refinement.

Nothing is cached between calls: features are recomputed from the inputs every time, and a fitted
model (probe + prompts) records the sha256 of the inputs it was fitted on (``fit_hash``), so a
prompt file is never silently reused for other inputs (``predict`` checks the encoder hash).

Inputs
------
* **GeoTIFFs** (the Chesapeake setting): a NAIP-like image (first three bands used as RGB; uint8,
  or anything else stretched 2-98 % per band) and a coarse land-cover GeoTIFF on any grid and CRS,
  reprojected onto the image grid with rasterio (nearest). A class map says what the coarse values
  mean (YAML or dict)::

      classes: [water, tree_canopy, low_vegetation, barren, impervious]   # output codes 1..5
      map: {11: water, 41: tree_canopy, 42: tree_canopy, 21: impervious, 71: low_vegetation}
      ignore: [0, 255]                                                     # no label, no prompt

  A coarse value neither mapped nor ignored is an error (one line), as is a class name not in
  ``classes``. Output GeoTIFFs (uint8, ``0`` = no data, ``i + 1`` = ``classes[i]``) keep the
  image's CRS and transform and are written atomically.
* **gl10m samples** (shards, :func:`gl10m.data.load` with ``tiles="all"``): the 100 HR tiles form a
  2680 x 2680 mosaic; the coarse map is each tile's dominant concept (``tile_frac`` argmax; tiles
  whose top fraction is below ``min_frac`` are unlabelled) or a 10x10 (or any size) array you give;
  classes are the profile's 66 concepts (prompts only for those present).
* **The offline testbed** (:func:`testbed_scene`): a window of a generated world rendered like
  NAIP from its 1 m truth raster; the truth's materials are grouped into five base classes
  (:data:`TESTBED_BASE`), the coarse map is their majority over ``cell`` x ``cell`` pixel cells, and
  the 1 m truth scores the outputs (:func:`evaluate`: per-class IoU, mIoU, OA).

Python::

    from gl10m.model.encoders import build_encoder
    from gl10m.model.mapsr import MapSR, MapSRConfig, testbed_scene, evaluate
    enc, _ = build_encoder({"backend": "vit", "patch": 8, "hr_size": 64, "lr_size": 80, "width": 64,
                            "depth": 1, "heads": 2})    # or a saved / pretrained encoder
    sc = testbed_scene(region="CA", size=256, cell=32)
    m = MapSR(enc, sc.classes).fit([(sc.image, sc.coarse)])
    out = m.predict(sc.image)             # {"cosine": [H, W], "refined": [H, W]} class indices
    evaluate(out["refined"], sc.truth, len(sc.classes))["miou"]

CLI: ``gl10m mapsr fit|predict|eval`` (:mod:`gl10m.model.mapsr.cli`); judged on held-out testbed windows
by ``bench/mapsr.py`` (:mod:`gl10m.model.mapsr.bench`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gl10m.errors import UserError
from gl10m.model.mapsr.graph import RefineConfig, refine_window

IGNORE = -1  # coarse label of unlabelled / no-data pixels
NODATA_OUT = 0  # output raster code of no data (class i is written as i + 1)


class MapSRError(UserError, ValueError):
    """Bad MapSR input: a missing file, a raster without CRS, an unknown class, a mismatch..."""


def _progress(it, total=None, desc="", enable=True):
    """``it`` with a rich bar (gl10m.pipelines.runner.progress_bar) on a terminal; in a
    non-interactive run (a pipe, a log file, a bench) no bar at all."""
    from gl10m.pipelines.runner import console, progress_bar

    if not enable or not console.is_terminal:
        yield from it
        return
    with progress_bar() as bar:
        task = bar.add_task(desc, total=total)
        for x in it:
            yield x
            bar.advance(task)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass
class MapSRConfig:
    """MapSR settings; see the module docstring. ``chip``/``overlap`` in pixels (``None``: the
    encoder's ``hr_size`` and a quarter of it), ``batch``: chips per encoder call, ``shifts``: shifted
    passes per side (:func:`dense_features`; 1 = none), ``color_feature``: weight of the image's own
    colour as extra feature channels (:func:`dense_features`'s ``color``; 0 = off). ``prior``: weight of the coarse map as a prior
    at prediction time (0 = off; > 0: ``predict`` needs the coarse map, and every class's cosine
    score gets ``prior`` times that class's share of the coarse map within ``prior_radius`` pixels,
    :func:`coarse_prior`)."""

    chip: int | None = None
    overlap: int | None = None
    batch: int = 16
    shifts: int = 1
    color_feature: float = 0.0
    prior: float = 0.0
    prior_radius: int = 0
    probe_steps: int = 200
    probe_lr: float = 1e-2
    probe_pixels: int = 200_000
    probe_balanced: bool = True
    seed: int = 0
    refine: RefineConfig = field(default_factory=RefineConfig)
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict | None) -> "MapSRConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise MapSRError(f"mapsr config: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")
        r = d.pop("refine", None)
        if isinstance(r, dict):
            rk = {f.name for f in fields(RefineConfig)}
            if set(r) - rk:
                raise MapSRError(f"mapsr config: unknown refine key {sorted(set(r) - rk)[0]!r}")
            r = RefineConfig(**r)
        return cls(refine=r or RefineConfig(), **d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return d


# ---------------------------------------------------------------------------------------------
# Dense features
# ---------------------------------------------------------------------------------------------
@dataclass
class FeatureMap:
    """Stitched token features of one image: ``tokens [D, Ht, Wt]`` (float32), ``stride`` pixels a
    token, ``shape`` the image's (H, W). Pixel ``(r, c)``'s feature is the bilinear interpolation
    of the tokens at ``((r + 0.5) / stride - 0.5, (c + 0.5) / stride - 0.5)``. ``color``: optional
    per-pixel channels ``[K, H, W]`` (the image's own colour, :func:`dense_features`'s ``color``):
    when given, a pixel's feature is its L2-normalised token feature followed by these ``K`` values
    (``D + K`` channels)."""

    tokens: torch.Tensor
    stride: int
    shape: tuple[int, int]
    color: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[0]) + (0 if self.color is None else int(self.color.shape[0]))

    def _with_color(self, feats: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(feats, dim=0), color.to(feats.device, feats.dtype)], 0)

    def window(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Pixel features ``[D, r1 - r0, c1 - c0]`` of an image window (bilinear upsampling of the
        tokens around it; identical to upsampling the whole grid)."""
        s = self.stride
        ht, wt = self.tokens.shape[1:]
        t0, t1 = max(0, r0 // s - 1), min(ht, -(-r1 // s) + 1)
        u0, u1 = max(0, c0 // s - 1), min(wt, -(-c1 // s) + 1)
        sub = self.tokens[:, t0:t1, u0:u1]
        if s > 1:
            up = F.interpolate(sub[None], scale_factor=s, mode="bilinear", align_corners=False)[0]
            # interior rows are exact; the sub-grid's own border rows would clamp differently from
            # the full grid, which is why we took one token of margin (none at the image border,
            # where the full grid clamps the same way)
        else:
            up = sub
        out = up[:, r0 - t0 * s:r1 - t0 * s, c0 - u0 * s:c1 - u0 * s]
        return out if self.color is None else self._with_color(out, self.color[:, r0:r1, c0:c1])

    def points(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Pixel features ``[N, D]`` at pixel indices (bilinear, as :meth:`window`)."""
        ht, wt = self.tokens.shape[1:]
        s = self.stride
        # token-space coordinates, then grid_sample's normalised coordinates (align_corners=False)
        ty = (rows.float() + 0.5) / s
        tx = (cols.float() + 0.5) / s
        gy = ty / ht * 2 - 1
        gx = tx / wt * 2 - 1
        grid = torch.stack([gx, gy], -1).to(self.tokens.device).view(1, 1, -1, 2)
        out = F.grid_sample(self.tokens[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
        if self.color is not None:
            out = self._with_color(out, self.color[:, rows.long(), cols.long()])
        return out.T


def _tent(n: int) -> torch.Tensor:
    """A tent window over n tokens, max 1 at the centre, never below 0.1 (edges still count)."""
    x = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return (1.0 - (2 * x - 1).abs()).clamp_min(0.1)


def _as_uint8_rgb(image) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if x.dim() != 3:
        raise MapSRError(f"image must be [bands, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] < 3:
        x = x[:1].expand(3, -1, -1)
    x = x[:3]
    if x.dtype != torch.uint8:
        raise MapSRError(f"image must be uint8 (read_image stretches other types), got {x.dtype}")
    return x


def _token_grid(encoder, x: torch.Tensor, chip: int, step: int, s: int, batch: int, progress: bool,
                pad_mode: str = "constant") -> torch.Tensor:
    """Token grid ``[D, hp/s, wp/s]`` of uint8 ``x [3, H, W]`` cut into ``chip`` px chips ``step`` px
    apart (padded at the bottom/right to whole chips: zeros, or ``pad_mode="replicate"``), the
    chips' tokens averaged with a tent window where chips overlap."""
    g = chip // s
    h, w = x.shape[1:]
    nr = max(1, math.ceil((h - chip) / step) + 1) if h > chip else 1
    nc = max(1, math.ceil((w - chip) / step) + 1) if w > chip else 1
    hp, wp = (nr - 1) * step + chip, (nc - 1) * step + chip
    if (hp, wp) != (h, w):
        if pad_mode == "constant":
            x = F.pad(x, (0, wp - w, 0, hp - h))
        else:
            x = F.pad(x[None].float(), (0, wp - w, 0, hp - h), mode=pad_mode)[0].to(torch.uint8)
    dev = next(encoder.parameters()).device
    d = encoder.token_dim
    acc = torch.zeros(d, hp // s, wp // s, device=dev)
    wsum = torch.zeros(1, hp // s, wp // s, device=dev)
    win = (_tent(g)[:, None] * _tent(g)[None, :]).to(dev)
    origins = [(i * step, j * step) for i in range(nr) for j in range(nc)]
    batches = range(0, len(origins), batch)
    for b0 in _progress(batches, total=len(batches), desc="features", enable=progress and len(batches) > 1):
        ob = origins[b0:b0 + batch]
        chips = torch.stack([x[:, r:r + chip, c:c + chip] for r, c in ob])
        _, _, dense = encoder.encode_hr(chips)  # [B, g, g, D]
        dense = dense.float().permute(0, 3, 1, 2)
        for k, (r, c) in enumerate(ob):
            tr, tc = r // s, c // s
            acc[:, tr:tr + g, tc:tc + g] += dense[k] * win
            wsum[:, tr:tr + g, tc:tc + g] += win
    return acc / wsum.clamp_min(1e-6)


@torch.no_grad()
def dense_features(encoder, image, chip: int | None = None, overlap: int | None = None, batch: int = 16,
                   progress: bool = True, shifts: int = 1, color: float = 0.0) -> FeatureMap:
    """A frozen encoder's dense patch tokens over a whole image (see the module docstring, step 1).

    ``image``: uint8 ``[3+, H, W]`` (numpy or torch; bands after the third ignored). ``chip``: chip
    size in pixels (default ``encoder.cfg.hr_size``; the encoder resizes chips to ``hr_size``, so
    ``chip`` must be a multiple of its token grid side, and a chip larger than ``hr_size`` is seen
    shrunk: e.g. 268 px GL-10M tiles for an encoder trained on them at 64 px). ``overlap``: pixels
    shared by neighbouring chips (default ``chip // 4``, rounded down to whole tokens). The image is
    zero-padded to whole chips; the returned grid is cropped back to the image.

    ``shifts`` (``n``): the token stride ``s = chip / grid`` is cut ``n`` times finer by running the
    encoder on ``n x n`` copies of the image shifted by multiples of ``u = s / n`` pixels (padded by
    replicating its edge) and interleaving their token grids, so a token sits every ``u`` pixels:
    pass ``(a, b)`` is shifted by ``((s - u) / 2 + a u, (s - u) / 2 + b u)`` pixels, which puts its
    token centres exactly on the finer grid's (``n ** 2`` times the encoder calls). ``s`` must be a
    multiple of ``n`` and ``s - u`` even.

    ``color`` (> 0): the image's own RGB, per pixel, joins the features (``FeatureMap.color``:
    ``color * (2 rgb / 255 - 1)``, so in ``[-color, color]`` beside the unit-norm token feature):
    the encoder's tokens are coarser than the pixels; the colour says where inside a token a
    boundary runs."""
    cfg = encoder.cfg
    chip = int(chip or cfg.hr_size)
    g = cfg.hr_grid
    if chip % g:
        raise MapSRError(f"chip {chip} px is not a multiple of the encoder's {g} tokens a side")
    s = chip // g
    overlap = chip // 4 if overlap is None else int(overlap)
    overlap = (overlap // s) * s
    if not 0 <= overlap < chip:
        raise MapSRError(f"overlap {overlap} must be in [0, chip {chip})")
    n = int(shifts)
    if n < 1 or s % n or (s - s // n) % 2:
        raise MapSRError(f"shifts {shifts}: the token stride {s} px must be a multiple of it, and the stride "
                         f"minus stride/shifts even")
    step = chip - overlap
    x = _as_uint8_rgb(image)
    h, w = x.shape[1:]
    col = None
    if color and color > 0:
        col = (x.float() * (2.0 / 255.0) - 1.0) * float(color)
        col = col.to(next(encoder.parameters()).device)
    if n == 1:
        tok = _token_grid(encoder, x, chip, step, s, batch, progress)
        th, tw = -(-h // s), -(-w // s)
        return FeatureMap(tok[:, :th, :tw].contiguous(), s, (int(h), int(w)), col)
    u = s // n
    th, tw = -(-h // u), -(-w // u)
    fine = None
    xf = x[None].float()
    for a in range(n):
        for b in range(n):
            top, left = (s - u) // 2 + a * u, (s - u) // 2 + b * u
            xs = F.pad(xf, (left, s, top, s), mode="replicate")[0].to(torch.uint8)
            tok = _token_grid(encoder, xs, chip, step, s, batch, False, "replicate")
            if fine is None:
                fine = torch.zeros(tok.shape[0], th, tw, device=tok.device)
            # pass token (i, j) is centred on the fine token (i n - a, j n - b)
            ra, cb = (n - a) % n, (n - b) % n
            sub = tok[:, (1 if a else 0):, (1 if b else 0):]
            dst = fine[:, ra::n, cb::n]
            dst.copy_(sub[:, :dst.shape[1], :dst.shape[2]])
    return FeatureMap(fine.contiguous(), u, (int(h), int(w)), col)


# ---------------------------------------------------------------------------------------------
# Probe and prompts
# ---------------------------------------------------------------------------------------------
def train_probe(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 200, lr: float = 1e-2,
                balanced: bool = True, seed: int = 0) -> nn.Linear:
    """A linear probe ``nn.Linear(D, n_classes)`` on L2-normalised features ``[N, D]`` with labels
    ``[N]`` in ``0..n_classes-1``: full-batch AdamW (weight decay 1e-4), ``steps`` steps,
    cross-entropy, class-balanced (inverse class frequency weights) unless ``balanced=False``.
    Seeded (``torch.Generator``) so the same inputs give the same probe."""
    gen = torch.Generator().manual_seed(int(seed))
    d = feats.shape[1]
    probe = nn.Linear(d, n_classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(d)
        probe.weight.copy_(torch.rand(n_classes, d, generator=gen) * 2 * bound - bound)
        probe.bias.zero_()
    probe = probe.to(feats.device)
    x = F.normalize(feats.float(), dim=-1)
    y = labels.long().to(feats.device)
    weight = None
    if balanced:
        cnt = torch.bincount(y, minlength=n_classes).float()
        weight = torch.where(cnt > 0, cnt.sum() / (cnt.clamp_min(1) * (cnt > 0).sum()), torch.zeros_like(cnt))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(probe(x), y, weight=weight)
            loss.backward()
            opt.step()
    return probe.eval()


class PromptAccumulator:
    """Per-class sums of L2-normalised features of *agreeing* pixels (probe argmax == coarse label),
    plus the sums over all labelled pixels (the fallback). ``prompts()`` -> ``([C, D], has [C])``."""

    def __init__(self, n_classes: int, dim: int, device="cpu"):
        self.agree = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)
        self.n_agree = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.all = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)
        self.n_all = torch.zeros(n_classes, dtype=torch.float64, device=device)

    def add(self, feats: torch.Tensor, labels: torch.Tensor, probe: nn.Module | None) -> None:
        """``feats [N, D]``, coarse ``labels [N]`` (``-1`` ignored)."""
        keep = labels >= 0
        x = F.normalize(feats[keep].float(), dim=-1)
        y = labels[keep].long()
        if not len(y):
            return
        self.all.index_add_(0, y, x.double())
        self.n_all.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        if probe is not None:
            with torch.no_grad():
                ok = probe(x).argmax(1) == y
        else:
            ok = torch.ones_like(y, dtype=torch.bool)
        self.agree.index_add_(0, y[ok], x[ok].double())
        self.n_agree.index_add_(0, y[ok], torch.ones_like(y[ok], dtype=torch.float64))

    def prompts(self, names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        use_all = (self.n_agree == 0) & (self.n_all > 0)
        for i in torch.nonzero(use_all).flatten().tolist():
            nm = names[i] if names else str(i)
            warnings.warn(f"mapsr: no pixel of class {nm} agrees with the probe; its prompt is the mean of all "
                          "its coarse pixels", stacklevel=2)
        s = torch.where(use_all[:, None], self.all, self.agree)
        has = (self.n_agree > 0) | use_all
        return F.normalize(s.float(), dim=-1), has


def cosine_scores(feats: torch.Tensor, prompts: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """``feats [D, h, w]`` x ``prompts [C, D]`` -> cosine ``[C, h, w]``; classes without a prompt -2."""
    f = F.normalize(feats.float(), dim=0)
    s = torch.einsum("dhw,cd->chw", f, prompts.to(f.device))
    return torch.where(has.to(f.device)[:, None, None], s, torch.full_like(s, -2.0))


def heat(scores: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Per-pixel min-max normalisation of the scores over the prompted classes (the propagation's
    ``Y``; classes without a prompt get 0)."""
    hs = has.to(scores.device)[:, None, None]
    big = torch.finfo(scores.dtype).max
    lo = torch.where(hs, scores, torch.full_like(scores, big)).amin(0, keepdim=True)
    hi = torch.where(hs, scores, torch.full_like(scores, -big)).amax(0, keepdim=True)
    y = (scores - lo) / (hi - lo).clamp_min(1e-8)
    return torch.where(hs, y, torch.zeros_like(y))


def sha256_arrays(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def encoder_hash(encoder) -> str:
    h = hashlib.sha256(json.dumps(encoder.cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def coarse_prior(coarse, n_classes: int, radius: int = 0) -> torch.Tensor:
    """The coarse map as a per-pixel class prior: ``[C, H, W]``, class ``c``'s share of the labelled
    coarse pixels within ``radius`` pixels (a ``2 radius + 1`` square box, clipped at the image
    edge) of each pixel; all 0 where that box has no labelled pixel. ``radius=0``: the pixel's own
    coarse label, one-hot. With a coarse map of cells, ``radius`` about half a cell lets a pixel near
    a cell edge see the neighbouring cell's class."""
    c = torch.as_tensor(np.asarray(coarse)).long()
    if c.dim() != 2:
        raise MapSRError(f"coarse map must be [H, W], got shape {tuple(c.shape)}")
    ok = (c >= 0) & (c < n_classes)
    oh = F.one_hot(torch.where(ok, c, torch.zeros_like(c)), n_classes).permute(2, 0, 1).float() * ok.float()
    r = int(radius)
    if r <= 0:
        return oh
    # box sums by cumulative sums (exact, any radius, O(H W C))
    k = 2 * r + 1
    pad = F.pad(oh[None], (r + 1, r, r + 1, r))[0].double()
    cs = pad.cumsum(1).cumsum(2)
    box = cs[:, k:, k:] - cs[:, :-k, k:] - cs[:, k:, :-k] + cs[:, :-k, :-k]
    tot = box.sum(0, keepdim=True)
    return torch.where(tot > 0, box / tot.clamp_min(1e-12), torch.zeros_like(box)).float()


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class MapSR:
    """Fit on (image, coarse labels) pairs, predict HR maps. ``classes``: class names; coarse labels
    are ``0..C-1`` per pixel on the image grid (``-1`` = unlabelled)."""

    def __init__(self, encoder, classes: Sequence[str], cfg: MapSRConfig | dict | None = None):
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.classes = list(classes)
        if not self.classes:
            raise MapSRError("mapsr: no classes")
        self.cfg = cfg if isinstance(cfg, MapSRConfig) else MapSRConfig.from_dict(cfg)
        self.refine_cfg = self.cfg.refine.resolved()
        self.probe: nn.Linear | None = None
        self.prompts: torch.Tensor | None = None
        self.has_prompt: torch.Tensor | None = None
        self.fit_hash: str | None = None
        self.encoder_hash = encoder_hash(self.encoder)

    @property
    def device(self):
        return next(self.encoder.parameters()).device

    def features(self, image) -> FeatureMap:
        return dense_features(self.encoder, image, self.cfg.chip, self.cfg.overlap, self.cfg.batch, self.cfg.progress,
                              self.cfg.shifts, self.cfg.color_feature)

    def _check_labels(self, coarse, shape) -> torch.Tensor:
        lab = torch.as_tensor(np.asarray(coarse)).long()
        if tuple(lab.shape) != tuple(shape):
            raise MapSRError(f"coarse map {tuple(lab.shape)} is not on the image grid {tuple(shape)} "
                             "(resample it first: coarse_on_grid / upsample_coarse)")
        bad = (lab >= len(self.classes)) | (lab < IGNORE)
        if bool(bad.any()):
            raise MapSRError(f"coarse map has label {int(lab[bad][0])}, classes are 0..{len(self.classes) - 1} "
                             "(-1 = unlabelled)")
        return lab

    def fit(self, scenes: Iterable[tuple[Any, Any]], fmaps: Sequence[FeatureMap] | None = None) -> "MapSR":
        """Train the probe on the coarse labels of all scenes, then compute the class prompts from
        the agreeing pixels. ``scenes``: ``(image uint8 [3, H, W], coarse int [H, W])`` pairs;
        ``fmaps``: their features when already computed (:meth:`features`, same encoder and config)."""
        scenes = list(scenes)
        if not scenes:
            raise MapSRError("mapsr fit: no scenes")
        if fmaps is not None and len(fmaps) != len(scenes):
            raise MapSRError(f"mapsr fit: {len(fmaps)} feature maps for {len(scenes)} scenes")
        given = list(fmaps) if fmaps is not None else None
        fmaps, labs = [], []
        h = hashlib.sha256(self.encoder_hash.encode())
        h.update(json.dumps([self.cfg.to_dict(), self.classes], sort_keys=True, default=str).encode())
        for i, (img, coarse) in enumerate(scenes):
            fm = given[i] if given is not None else self.features(img)
            fmaps.append(fm)
            labs.append(self._check_labels(coarse, fm.shape))
            h.update(sha256_arrays(_as_uint8_rgb(img), labs[-1]).encode())
        self.fit_hash = h.hexdigest()
        # probe: pixels sampled at random (seeded) among the labelled ones, spread over scenes by size
        gen = torch.Generator().manual_seed(self.cfg.seed)
        n_lab = [int((lab >= 0).sum()) for lab in labs]
        total = sum(n_lab)
        if total == 0:
            raise MapSRError("mapsr fit: the coarse map has no labelled pixel")
        xs, ys = [], []
        for fm, lab, n in zip(fmaps, labs, n_lab):
            if n == 0:
                continue
            take = min(n, max(1, round(self.cfg.probe_pixels * n / total)))
            idx = torch.nonzero(lab.flatten() >= 0).flatten()
            pick = idx[torch.randperm(len(idx), generator=gen)[:take]]
            r, c = pick // fm.shape[1], pick % fm.shape[1]
            xs.append(fm.points(r, c))
            ys.append(lab.flatten()[pick].to(self.device))
        self.probe = train_probe(torch.cat(xs), torch.cat(ys), len(self.classes), self.cfg.probe_steps,
                                 self.cfg.probe_lr, self.cfg.probe_balanced, self.cfg.seed)
        acc = PromptAccumulator(len(self.classes), fmaps[0].dim, self.device)
        for fm, lab in zip(fmaps, labs):
            for r0, r1, c0, c1 in _windows(fm.shape, 256):
                f = fm.window(r0, r1, c0, c1)
                acc.add(f.reshape(f.shape[0], -1).T, lab[r0:r1, c0:c1].reshape(-1).to(self.device), self.probe)
        self.prompts, self.has_prompt = acc.prompts(self.classes)
        return self

    @torch.no_grad()
    def predict(self, image, refine: bool = True, fmap: FeatureMap | None = None,
                coarse=None) -> dict[str, np.ndarray]:
        """-> ``{"cosine": int16 [H, W], "refined": int16 [H, W]}`` (class indices; ``refined`` only
        with ``refine=True``). ``fmap``: the image's features when already computed (``image`` may
        then be None unless the refinement uses colour). ``coarse``: the coarse labels on the image
        grid (``[H, W]``, ``-1`` unlabelled), needed only when ``cfg.prior > 0``: the cosine scores
        (and so the refinement's seeds) then get ``prior`` x :func:`coarse_prior`."""
        if self.prompts is None:
            raise MapSRError("mapsr: predict before fit (no prompts)")
        fm = fmap or self.features(image)
        img = None
        if refine and self.refine_cfg.color > 0:
            if image is None:
                raise MapSRError("mapsr: refinement with color > 0 needs the image")
            img = _as_uint8_rgb(image)
        h, w = fm.shape
        pri = None
        if self.cfg.prior > 0:
            if coarse is None:
                raise MapSRError(f"mapsr: prior {self.cfg.prior:g} needs the coarse map at prediction time")
            pri = coarse_prior(self._check_labels(coarse, (h, w)), len(self.classes), self.cfg.prior_radius)
        cos = np.zeros((h, w), np.int16)
        ref = np.zeros((h, w), np.int16) if refine else None
        win = self.refine_cfg.window
        wins = _windows((h, w), win)
        for r0, r1, c0, c1 in _progress(wins, total=len(wins), desc="predict",
                                        enable=self.cfg.progress and len(wins) > 1):
            f = fm.window(r0, r1, c0, c1)
            s = cosine_scores(f, self.prompts, self.has_prompt)
            if pri is not None:
                s = s + self.cfg.prior * pri[:, r0:r1, c0:c1].to(s.device)
            cos[r0:r1, c0:c1] = s.argmax(0).cpu().numpy()
            if refine:
                out = refine_window(f, heat(s, self.has_prompt), self.refine_cfg,
                                    None if img is None else img[:, r0:r1, c0:c1])
                out = torch.where(self.has_prompt.to(out.device)[:, None, None], out, torch.full_like(out, -1e9))
                ref[r0:r1, c0:c1] = out.argmax(0).cpu().numpy()
        res = {"cosine": cos}
        if refine:
            res["refined"] = ref
        return res

    # -- save / load -------------------------------------------------------------------------
    def state(self) -> dict:
        if self.prompts is None:
            raise MapSRError("mapsr: nothing to save before fit")
        return {"prompts": self.prompts.cpu(), "has_prompt": self.has_prompt.cpu(),
                "probe.weight": self.probe.weight.detach().cpu(), "probe.bias": self.probe.bias.detach().cpu()}

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """``path`` (a ``.pt`` of tensors, atomically) + ``path.json`` (classes, config, hashes)."""
        from gl10m.io import atomic_path, atomic_write_text

        p = Path(path)
        with atomic_path(p) as tmp:
            torch.save(self.state(), tmp)
        meta = {"classes": self.classes, "config": self.cfg.to_dict(), "fit_hash": self.fit_hash,
                "encoder_hash": self.encoder_hash, **(extra or {})}
        atomic_write_text(p.with_suffix(p.suffix + ".json"), json.dumps(meta, indent=1, default=str) + "\n")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, encoder, check_encoder: bool = True) -> tuple["MapSR", dict]:
        """A saved MapSR for ``encoder`` (which must be the one it was fitted with unless
        ``check_encoder=False``) -> (model, saved meta)."""
        p = Path(path)
        js = p.with_suffix(p.suffix + ".json")
        if not p.is_file() or not js.is_file():
            raise MapSRError(f"{p}: not a fitted MapSR model (needs {p.name} and {js.name})")
        meta = json.loads(js.read_text())
        blob = torch.load(p, map_location="cpu", weights_only=True)
        m = cls(encoder, meta["classes"], MapSRConfig.from_dict(meta["config"]))
        if check_encoder and meta.get("encoder_hash") != m.encoder_hash:
            raise MapSRError(f"{p}: fitted with another encoder (hash {str(meta.get('encoder_hash'))[:12]}, "
                             f"this one {m.encoder_hash[:12]}); refit")
        dev = m.device
        m.prompts, m.has_prompt = blob["prompts"].to(dev), blob["has_prompt"].to(dev)
        m.probe = nn.Linear(blob["probe.weight"].shape[1], blob["probe.weight"].shape[0]).to(dev)
        m.probe.load_state_dict({"weight": blob["probe.weight"], "bias": blob["probe.bias"]})
        m.fit_hash = meta.get("fit_hash")
        return m, meta


def _windows(shape, size: int) -> list[tuple[int, int, int, int]]:
    h, w = shape
    return [(r, min(h, r + size), c, min(w, c + size)) for r in range(0, h, size) for c in range(0, w, size)]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def confusion(pred, truth, n_classes: int) -> np.ndarray:
    """``[n, n + 1]`` int64 confusion: rows the truth class, columns the predicted class, the last
    column predictions outside ``0..n-1`` (no data: a miss, not a false positive of any class).
    Pixels whose truth is outside ``0..n-1`` (-1, 255) are not scored."""
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    t = np.asarray(truth).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise MapSRError(f"prediction and truth differ in size ({p.size} vs {t.size})")
    keep = (t >= 0) & (t < n_classes)
    p, t = p[keep], t[keep]
    p = np.where((p < 0) | (p >= n_classes), n_classes, p)
    m = n_classes + 1
    return np.bincount(t * m + p, minlength=n_classes * m).reshape(n_classes, m)


def scores_from_confusion(conf: np.ndarray, names: Sequence[str] | None = None) -> dict:
    """Per-class IoU = TP / (TP + FP + FN), mIoU over classes present in truth or prediction (a class
    absent from both is skipped, NaN in ``iou``), OA = correct / all scored pixels."""
    n = conf.shape[0]
    tp = np.diag(conf[:, :n]).astype(np.float64)
    row = conf.sum(1).astype(np.float64)  # truth count (incl. misses)
    col = conf[:, :n].sum(0).astype(np.float64)
    union = row + col - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    total = conf.sum()
    names = list(names) if names else [str(i) for i in range(n)]
    return {"iou": {names[i]: (None if np.isnan(iou[i]) else float(iou[i])) for i in range(n)},
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "oa": float(tp.sum() / total) if total else float("nan"), "pixels": int(total)}


def evaluate(pred, truth, n_classes: int, names: Sequence[str] | None = None) -> dict:
    """Per-class IoU, mIoU, OA of ``pred`` against ``truth`` (class indices; truth outside
    ``0..n_classes-1`` ignored)."""
    return scores_from_confusion(confusion(pred, truth, n_classes), names)


# ---------------------------------------------------------------------------------------------
# Coarse maps on the image grid
# ---------------------------------------------------------------------------------------------
def upsample_coarse(coarse, shape) -> np.ndarray:
    """A coarse grid ``[h, w]`` of labels -> ``[H, W]`` (nearest; cell ``(i, j)`` covers rows
    ``i*H/h .. (i+1)*H/h``). The "coarse map upsampled" baseline."""
    c = np.asarray(coarse)
    H, W = shape
    ri = np.minimum((np.arange(H) * c.shape[0]) // H, c.shape[0] - 1)
    ci = np.minimum((np.arange(W) * c.shape[1]) // W, c.shape[1] - 1)
    return c[ri][:, ci]


def majority_pool(labels, cell: int, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """``[H, W]`` labels -> ``[ceil(H/cell), ceil(W/cell)]`` majority label per cell (ties: lowest
    id; a cell of only ``ignore`` stays ``ignore``)."""
    a = np.asarray(labels).astype(np.int64)
    H, W = a.shape
    hc, wc = -(-H // cell), -(-W // cell)
    pad = np.full((hc * cell, wc * cell), ignore, np.int64)
    pad[:H, :W] = a
    blocks = pad.reshape(hc, cell, wc, cell).transpose(0, 2, 1, 3).reshape(hc * wc, cell * cell)
    cnt = np.zeros((hc * wc, n_classes), np.int64)
    rows = np.repeat(np.arange(hc * wc), cell * cell)
    v = blocks.reshape(-1)
    ok = (v >= 0) & (v < n_classes)
    np.add.at(cnt, (rows[ok], v[ok]), 1)
    out = cnt.argmax(1)
    out[cnt.sum(1) == 0] = ignore
    return out.reshape(hc, wc)
