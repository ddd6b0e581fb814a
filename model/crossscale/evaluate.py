"""Evaluation: how good is sparse HR observation here, and at what cost.

``gl10m model eval --checkpoint MODEL_DIR --shards W/shards --split test --out REPORT_DIR
[--target-obr 0.12] [--allow-small]`` runs the full pipeline on every scene of a split, straight
from the shards, and writes ``report.json``, ``report.md`` and ``sweep.png``
(:mod:`gl10m.model.crossscale.eval_report`). A split with fewer than 100 scenes is refused unless
``allow_small``.

The pipeline of one batch (``batch_size`` scenes, 32 by default), each stage timed:

1. read the LR image and labels (IO) and decode the LR image;
2. encode it (LR tokens) and score the 100 tiles with the sampler;
3. select tiles with the one rule of :mod:`gl10m.model.crossscale.selection` (``sigmoid(logit) >
   threshold``; the threshold from the sampler's config, given, or calibrated on the **val**
   split to ``target_obr`` -- never on the split reported), read (IO) and decode **only the
   selected tiles**, encode them (pooled HR tokens);
4. complete the 10 x 10 token grid (observed tiles keep their own tokens);
5. score it in the one scene space of :mod:`gl10m.model.crossscale.scoring`: the stage II head's embedding of
   the completed grid (the encoder's HR head when there is no stage II model, then for every row),
   cosine with the centred concept text embeddings. Zero-shot from text prompts throughout.

Rows (``obr`` = the mean requested HR area / scene area each actually spends; "the predictor" is
the stage II predictor when there is one, else stage I):

- ``lr_only``: no tile observed, the predictor completes the whole grid from LR (OBR 0);
- ``full_hr``: all 100 tiles observed (OBR 1);
- ``random``: random tiles, as many per scene as the default selects, observed tiles only (the
  scene's pooled tokens over them); ``random_predictor``: the same tiles completed by the predictor;
- ``sampler_only``: the learned sampler's tiles, observed tiles only;
- ``lr_fill``: the sampler's tiles, unobserved tiles filled with the LR tokens of their area;
- ``predictor_nolr``: the sampler's tiles completed by a predictor trained without LR context;
- ``default``: the sampler's tiles completed by the predictor;
- ``default_stage1``: the same completed by the stage I predictor (when there is a stage II one);
- ``sampler_<variant>``: samplers trained on other supervision variants, + the predictor;
- ``oracle_cover``: **an upper bound, not a method**: as many tiles per scene as the default
  selects, chosen with the scene's own labels and per-tile concept fractions (a greedy cover of
  its labelled concepts, :func:`gl10m.model.crossscale.supervision.cover_order`), + the
  predictor: how far any LR-only sampler could go at that cost with this predictor and space.

Beside the rows, when ``full_hr`` and ``default`` both run, the report's ``completion`` says
whether the predictor uses LR (:mod:`gl10m.model.crossscale.completion`): the centred cosine of
its predicted to the true tokens of the default's unobserved tiles, with the scene's own LR,
another scene's LR, and from the no-LR predictor.

A scene with no observed tile in an observed-only row pools to the target centre (nothing
known), in the same space as every other scene.

The sweep runs the default pipeline at thresholds 0, 0.1, 0.25, 0.45, 0.55, 0.65, 0.85, 1 (1 =
no tile: the same grid as ``lr_only``; 0 = every tile: the same grid as ``full_hr``) and at the
sampler's top-k.

Novel concepts: those named by ``novel`` plus those the stage II checkpoint held out; every one
must have been held out of encoder pretraining and of the sampler's supervision too where those
record what they held out (``novel_holdout`` in the report).

A model dir holds ``encoder/`` (a saved encoder), ``sampler/`` and ``predictor/`` (trainer runs;
their latest checkpoint is used), and optionally ``predictor-nolr/``, ``predictor-stage2/`` and
``sampler-<variant>/``; each can also be given explicitly.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gl10m import data as gdata
from gl10m import samples as smp
from gl10m.errors import UserError
from gl10m.io import atomic_write_text

from .checkpoint import read_checkpoint
from .completion import CompletionCheck
from ..encoders import TileEncoder, load_encoder
from .eval_report import IO_STAGES, MIN_SCENES, N_BOOT, _clean, _timing, build_report, device_name  # noqa: F401
from .eval_report import plot_sweep, render_markdown, summary_table
from .features import _HR_CHUNK
from .predictor import Predictor, complete, load_predictor
from .scene_head import load_scene_head
from .sampler import load_sampler
from .scoring import SceneSpace, mean_half
from .selection import RULE, calibrate_threshold, select
from .supervision import VARIANTS, cover_order

N_TILES = smp.N_TILES
GRID = smp.GRID
SWEEP_THRESHOLDS = (0.0, 0.1, 0.25, 0.45, 0.55, 0.65, 0.85, 1.0)
REPORT_VERSION = 2


class EvalError(UserError, ValueError):
    """A model dir, checkpoint or option the evaluation cannot use."""


# ---------------------------------------------------------------------------------------------
# The model bundle
# ---------------------------------------------------------------------------------------------
def latest_checkpoint(run: str | os.PathLike) -> Path:
    """A trainer run dir (its newest ``checkpoints/step-*.pt``) or a checkpoint file."""
    p = Path(run)
    if p.is_file():
        return p
    if not p.is_dir():
        raise EvalError(f"{p}: no such checkpoint or run dir")
    found = sorted((p / "checkpoints").glob("step-*.pt"))
    if not found:
        raise EvalError(f"{p}: a run dir without checkpoints (checkpoints/step-*.pt)")
    return found[-1]


@dataclass
class Bundle:
    encoder: TileEncoder
    text: torch.Tensor                   # [C, E] concept text embeddings, L2-normalised
    labels: list[str]
    sampler: torch.nn.Module
    predictor: Predictor                 # stage I
    selection: dict                      # {"threshold": .., "top_k": ..} of the sampler's config
    space: SceneSpace                    # the one scene space every row is scored in
    predictor_nolr: Predictor | None = None
    predictor_stage2: Predictor | None = None
    variants: dict[str, torch.nn.Module] = field(default_factory=dict)
    novel_from_checkpoint: list[int] = field(default_factory=list)
    holdout: dict[str, list[int] | None] = field(default_factory=dict)  # part -> novel ids it held out
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def completer(self) -> Predictor:
        """The predictor of the headline pipeline: stage II when there is one, else stage I."""
        return self.predictor_stage2 if self.predictor_stage2 is not None else self.predictor


def _opt(model_dir: Path | None, given, name: str, required: bool) -> Path | None:
    if given is not None:
        return Path(given)
    if model_dir is not None and (model_dir / name).exists():
        return model_dir / name
    if required:
        where = f"{model_dir}/{name}" if model_dir is not None else f"--{name}"
        raise EvalError(f"no {name}: expected {where} (or give it explicitly)")
    return None


def _check_dims(enc: TileEncoder, dims: dict, what: str) -> None:
    ed = enc.dims()
    for k in ("D", "g", "Gl"):
        if k in dims and int(dims[k]) != int(ed[k]):
            raise EvalError(f"{what} was trained on features with {k}={dims[k]}, the encoder gives {k}={ed[k]}")


_PARTS = (("encoder", "encoder", True), ("sampler", "sampler", True), ("predictor", "predictor", True),
          ("predictor_nolr", "predictor-nolr", False), ("predictor_stage2", "predictor-stage2", False),
          ("scene_head", "scene-head", False))
_FOLDERS = ("encoder", "scene-head")  # parts that are folders, not trainer run dirs


def resolve_parts(model_dir: str | os.PathLike | None = None, *, variants: dict | None = None,
                  **paths) -> dict[str, Path]:
    """The files a model dir (and explicit paths) name: ``encoder`` (a saved encoder folder),
    ``sampler``, ``predictor`` (required), ``predictor-nolr``, ``predictor-stage2`` and
    ``sampler-<variant>`` (optional), each run dir resolved to its latest checkpoint."""
    md = Path(model_dir) if model_dir is not None else None
    if md is not None and not md.is_dir():
        raise EvalError(f"{md}: no such model dir")
    unknown = set(variants or {}) - set(VARIANTS)
    if unknown:
        raise EvalError(f"unknown sampler variant {sorted(unknown)[0]!r}; one of {', '.join(VARIANTS)}")
    extra = set(paths) - {k for k, _, _ in _PARTS}
    if extra:
        raise EvalError(f"unknown model part {sorted(extra)[0]!r}")
    parts: dict[str, Path] = {}
    for key, name, required in _PARTS:
        p = _opt(md, paths.get(key), name, required)
        if p is not None:
            parts[name] = p if name in _FOLDERS else latest_checkpoint(p)
    for v in VARIANTS:
        p = (variants or {}).get(v) or _opt(md, None, f"sampler-{v}", False)
        if p is not None:
            parts[f"sampler-{v}"] = latest_checkpoint(p)
    return parts


def load_bundle(model_dir: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                **paths) -> Bundle:
    """The model a model dir names (see :func:`resolve_parts`), loaded onto `device`."""
    parts = resolve_parts(model_dir, **paths)
    dev = torch.device(device)
    enc, info = load_encoder(parts["encoder"], device=str(dev))
    labels = info.get("labels")
    if not labels:
        raise EvalError(f"{parts['encoder']}: the saved encoder names no concept labels")
    raw = info.get("text_raw")
    if raw is None:
        raw = enc.text_raw(labels)
    with torch.inference_mode():
        text = enc.encode_text(raw).float()

    st = read_checkpoint(parts["sampler"], "sampler")  # read once: the weights and the selection config
    samp = load_sampler(parts["sampler"], state=st).to(dev)
    _check_dims(enc, st["dims"], f"sampler {parts['sampler']}")
    selection = dict((st["config"] or {}).get("selection") or {})

    def pred(name):
        if name not in parts:
            return None, None
        m, pinfo = load_predictor(parts[name])
        _check_dims(enc, pinfo["dims"], f"{name} {parts[name]}")
        return m.to(dev), pinfo

    p_main, info_main = pred("predictor")
    p_nolr, _ = pred("predictor-nolr")
    if p_nolr is not None and p_nolr.use_lr:
        raise EvalError(f"{parts['predictor-nolr']}: this predictor uses LR context (use_lr: true)")
    p_s2, s2info = pred("predictor-stage2")
    novel = []
    holdout: dict[str, list[int] | None] = {"encoder": _ids(info.get("novel"), labels),
                                            "sampler": _ids(((st["config"] or {}).get("supervision") or {})
                                                            .get("novel_concepts"), labels)}
    if p_s2 is not None:
        if not hasattr(p_s2, "head"):
            raise EvalError(f"{parts['predictor-stage2']}: not a stage II predictor (no SigLIP head)")
        novel = [int(c) for c in s2info["config"].get("novel_concepts") or []]
        holdout["predictor-stage2"] = novel
        space = SceneSpace(p_s2.head, text, s2info["center"].to(dev), "the stage II head of the completed grid")
        if "scene-head" in parts:
            head, hinfo = load_scene_head(parts["scene-head"])
            _check_dims(enc, hinfo["dims"], f"scene head {parts['scene-head']}")
            holdout["scene-head"] = [int(c) for c in hinfo.get("novel_concepts") or []]
            space = SceneSpace(head.to(dev), text, s2info["center"].to(dev),
                               "the scene head fitted on the frozen stage II predictor's completions")
    elif "scene-head" in parts:
        raise EvalError(f"{parts['scene-head']}: a scene head needs the stage II predictor it was fitted on "
                        "(predictor-stage2)")
    else:
        space = SceneSpace(lambda pooled: enc.embed_mean(mean_half(pooled)), text, info_main["center"].to(dev),
                           "the encoder's HR head of the completed grid (no stage II model)")
    found = {v: load_sampler(parts[f"sampler-{v}"]).to(dev) for v in VARIANTS if f"sampler-{v}" in parts}
    return Bundle(enc, text, list(labels), samp, p_main, selection, space, p_nolr, p_s2, found, novel, holdout,
                  {k: str(v) for k, v in parts.items()})


def _ids(novel, labels: Sequence[str]) -> list[int] | None:
    """A recorded held-out list (ids or names) as ids; None when the part records none."""
    if novel is None:
        return None
    return resolve_novel([str(x) for x in novel], labels)


def resolve_novel(names: Sequence[str] | None, labels: Sequence[str], extra: Sequence[int] = ()) -> list[int]:
    """Concept names or indices -> sorted concept indices (one-line error for an unknown name)."""
    out = {int(c) for c in extra}
    pos = {lab.lower(): i for i, lab in enumerate(labels)}
    for n in names or ():
        n = str(n).strip()
        if not n:
            continue
        if n.isdigit():
            i = int(n)
            if not 0 <= i < len(labels):
                raise EvalError(f"novel concept {i} is outside 0..{len(labels) - 1}")
        elif n.lower() in pos:
            i = pos[n.lower()]
        else:
            raise EvalError(f"novel concept {n!r} is not one of the model's {len(labels)} concepts")
        out.add(i)
    bad = [c for c in out if not 0 <= c < len(labels)]
    if bad:
        raise EvalError(f"novel concept {bad[0]} is outside 0..{len(labels) - 1}")
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class Timer:
    """Accumulates wall time per named stage; on CUDA the device is synchronised before and after
    each stage so that asynchronous kernels are charged to the stage that launched them."""

    def __init__(self, device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.syncs = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.syncs += 1

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.sync()
        t0 = self.clock()
        try:
            yield
        finally:
            self.sync()
            self.totals[stage] += self.clock() - t0

    def total(self, stages: Sequence[str] | None = None) -> float:
        keys = self.totals if stages is None else stages
        return float(sum(self.totals.get(k, 0.0) for k in keys))



# ---------------------------------------------------------------------------------------------
# Pipeline pieces
# ---------------------------------------------------------------------------------------------
def lr_fill_tokens(lr_tokens: torch.Tensor, g: int) -> torch.Tensor:
    """LR tokens [B, Gl, Gl, D] -> per-tile tokens [B, 100, g, g, D]: each tile's own (Gl/10)^2
    block of LR tokens, resampled (bilinear) to the HR token grid g x g."""
    b, gl, _, d = lr_tokens.shape
    lg = gl // GRID
    x = lr_tokens.reshape(b, GRID, lg, GRID, lg, d).permute(0, 1, 3, 5, 2, 4).reshape(b * N_TILES, d, lg, lg)
    if lg != g:
        x = F.interpolate(x.float(), size=(g, g), mode="bilinear", align_corners=False).to(lr_tokens.dtype)
    return x.reshape(b, N_TILES, d, g, g).permute(0, 1, 3, 4, 2)


def random_masks(keys: Sequence[str], counts: Sequence[int], seed: int) -> torch.Tensor:
    """[B, 100] bool: ``counts[i]`` tiles drawn uniformly for scene ``keys[i]``, seeded by the
    seed and the key (the same scene gets the same tiles in every run and batch)."""
    out = torch.zeros(len(keys), N_TILES, dtype=torch.bool)
    for i, (k, n) in enumerate(zip(keys, counts)):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(k.encode())])
        out[i, torch.from_numpy(rng.choice(N_TILES, size=int(n), replace=False))] = True
    return out


@dataclass
class Row:
    name: str
    description: str
    uses: tuple[str, ...]         # shared stages the row's pipeline runs (their time is charged to it)
    run: Callable[["_Batch", Timer], tuple[torch.Tensor, torch.Tensor]]  # -> (scores [B, C], mask [B, 100])


class _Batch:
    """One batch of scenes: the shared stages' results, and a way to run tiles through the encoder."""

    def __init__(self, ev: "Evaluator", idx: list[int], shared: Timer):
        self.ev, self.idx = ev, idx
        b = ev.bundle
        reader, dev = ev.reader, ev.device
        self.keys = [ev.keys[i] for i in idx]
        with shared("io_lr"):
            heads = [reader.read(i, (smp.LR_FIELD, smp.LABELS_FIELD)) for i in idx]
        self.labels = np.stack([gdata.decode_labels(h[smp.LABELS_FIELD], k) for h, k in zip(heads, self.keys)])
        with shared("decode_lr"):
            lr = np.stack([gdata.decode_lr(h[smp.LR_FIELD], k) for h, k in zip(heads, self.keys)])
            self.lr = torch.from_numpy(lr).permute(0, 3, 1, 2)
        with shared("encode_lr"), ev.autocast():
            self.lr_tokens = b.encoder.encode_lr(self.lr.to(dev))[0].float()
        self.scores: dict[str, torch.Tensor] = {}
        with shared("sampler"), ev.autocast():
            self.scores["default"] = b.sampler(self.lr_tokens).float()
        for v, s in b.variants.items():
            with shared(f"sampler_{v}"), ev.autocast():
                self.scores[v] = s(self.lr_tokens).float()
        self._masks: dict[tuple, torch.Tensor] = {}
        self.full: torch.Tensor | None = None  # every tile's tokens, once the full_hr row has read them

    def oracle_mask(self, counts: Sequence[int]) -> torch.Tensor:
        """The ``oracle_cover`` row's tiles: each scene's ``counts`` first tiles of a greedy cover
        of its labelled concepts (read from its labels and tile fractions, outside every timer:
        no method could read them)."""
        frac = np.stack([smp.decode_tile_frac(self.ev.reader.read(i, (smp.TILE_FRAC_FIELD,))[smp.TILE_FRAC_FIELD])
                         for i in self.idx])
        order = cover_order(torch.from_numpy(frac.astype(np.float32)), torch.from_numpy(self.labels))
        m = torch.zeros(len(self.idx), N_TILES, dtype=torch.bool)
        for j, c in enumerate(counts):
            if c:
                m[j, order[j].topk(int(c)).indices] = True
        return m

    def mask(self, sampler: str = "default", threshold: float | None = None, top_k: int | None = None) -> torch.Tensor:
        key = (sampler, threshold, top_k)
        if key not in self._masks:
            self._masks[key] = select(self.scores[sampler].cpu(), threshold=threshold, top_k=top_k)
        return self._masks[key]

    def tiles(self, mask: torch.Tensor, t: Timer) -> torch.Tensor:
        """Read, decode and encode only the masked tiles -> pooled tokens [B, 100, g, g, D] (zeros
        where unobserved)."""
        ev, enc = self.ev, self.ev.bundle.encoder
        dims = enc.dims()
        g, d = dims["g"], dims["D"]
        out = torch.zeros(len(self.idx), N_TILES, g, g, d, device=ev.device)
        sel = [np.flatnonzero(mask[j].numpy()) for j in range(len(self.idx))]
        if not any(len(s) for s in sel):
            return out
        with t("io_hr"):
            raw = [ev.reader.read(i, [smp.hr_field(int(x)) for x in s]) if len(s) else {}
                   for i, s in zip(self.idx, sel)]
        with t("decode_hr"):
            hr = np.concatenate([gdata.decode_tiles(s, r, k, enc.tile_px) for s, r, k in zip(sel, raw, self.keys) if len(s)])
            hr = torch.from_numpy(hr).permute(0, 3, 1, 2)
        with t("encode_hr"), ev.autocast():
            pooled = torch.cat([enc.encode_hr(hr[i:i + _HR_CHUNK].to(ev.device))[0].float()
                                for i in range(0, hr.shape[0], _HR_CHUNK)])
            bi = torch.from_numpy(np.concatenate([np.full(len(s), j) for j, s in enumerate(sel)])).to(ev.device)
            ti = torch.from_numpy(np.concatenate(sel)).to(ev.device)
            out[bi, ti] = pooled
        if bool(mask.all()):
            self.full = out
        return out

    def score(self, tokens: torch.Tensor, t: Timer, mask: torch.Tensor | None = None) -> torch.Tensor:
        """A completed grid (observed-only rows: with the mask of its informative tiles) -> concept
        scores [B, C], through the bundle's one scene space."""
        sp = self.ev.bundle.space
        with t("score"), self.ev.autocast():
            return sp.score(sp.embed(tokens, None if mask is None else mask.to(tokens.device))).float().cpu()


class Evaluator:
    def __init__(self, bundle: Bundle, reader: gdata.SampleReader, *, device: str | torch.device = "cpu",
                 batch_size: int = 32, seed: int = 0, threshold: float | None = None, top_k: int | None = None,
                 sweep: Sequence[float] = SWEEP_THRESHOLDS, progress: bool = True, budget: int | None = None):
        if batch_size < 1:
            raise EvalError(f"batch size must be >= 1, got {batch_size}")
        self.bundle, self.reader, self.device = bundle, reader, torch.device(device)
        self.keys = reader.keys
        self.batch_size, self.seed, self.progress = int(batch_size), int(seed), progress
        sel = bundle.selection
        self.threshold = threshold if threshold is not None else sel.get("threshold", 0.55)
        self.top_k = top_k if top_k is not None else sel.get("top_k", 12)
        if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool)
                                       and 1 <= budget <= N_TILES):
            raise EvalError(f"budget must be an int in 1..100 (tiles per scene), got {budget!r}")
        self.budget = budget  # per-scene budget: the rows take each scene's `budget` best tiles, no threshold
        if self.threshold is None:
            raise EvalError("the default selection needs a threshold")
        self.sweep = tuple(float(x) for x in sweep)
        for x in (self.threshold, *self.sweep):
            if not 0.0 <= float(x) <= 1.0:
                raise EvalError(f"threshold {x} is outside [0, 1]")
        if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k <= N_TILES):
            raise EvalError(f"top_k must be an int in 1..100, got {self.top_k!r}")

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -- rows ---------------------------------------------------------------------------------
    def _run(self, bt: _Batch, t: Timer, mask: torch.Tensor, mode: str,
             predictor: Predictor | None = None) -> torch.Tensor:
        """Scores [B, C] of the grid ``mask``'s tiles give: mode observed (those tiles only) |
        predictor (completed by ``predictor``) | lr_fill (the others filled with LR tokens)."""
        tok = bt.tiles(mask, t)
        m = mask.to(tok.device)
        if mode == "observed":
            return bt.score(tok, t, m)
        if mode == "lr_fill":
            with t("fill"):
                full = complete(tok, lr_fill_tokens(bt.lr_tokens, tok.shape[2]), m)
            return bt.score(full, t)
        if mode != "predictor" or predictor is None:
            raise EvalError(f"unknown row mode {mode!r}")
        with t("predictor"), self.autocast():
            pred = predictor(bt.lr_tokens if predictor.use_lr else None, tok, m)
            full = complete(tok, pred.float(), m)
        return bt.score(full, t)

    def rows(self) -> list[Row]:
        b = self.bundle
        th, k = (None, self.budget) if self.budget is not None else (self.threshold, None)
        lrs = ("decode_lr", "encode_lr")
        smp_ = ("decode_lr", "encode_lr", "sampler")

        def fixed(value: bool, mode: str, predictor=None):
            def run(bt, t):
                m = torch.full((len(bt.idx), N_TILES), value, dtype=torch.bool)
                return self._run(bt, t, m, mode, predictor), m
            return run

        def rnd(mode, predictor=None):
            def run(bt, t):
                m = random_masks(bt.keys, bt.mask("default", th, k).sum(1).tolist(), self.seed)
                return self._run(bt, t, m, mode, predictor), m
            return run

        def sampled(mode, predictor=None, sampler="default"):
            def run(bt, t):
                m = bt.mask(sampler, th, k)
                return self._run(bt, t, m, mode, predictor), m
            return run

        main = b.completer
        rows = [
            Row("lr_only", "LR only: no HR tile, the predictor completes the whole grid from LR", lrs,
                fixed(False, "predictor", main)),
            Row("full_hr", "full HR: all 100 tiles observed, no predictor", (), fixed(True, "observed")),
            Row("random", "random tiles at the default's OBR, observed tiles only", (), rnd("observed")),
            Row("random_predictor", "random tiles at the default's OBR + predictor", lrs, rnd("predictor", main)),
            Row("sampler_only", "learned sampler, observed tiles only (no predictor)", smp_, sampled("observed")),
            Row("lr_fill", "learned sampler, missing tiles filled directly with LR tokens", smp_,
                sampled("lr_fill")),
        ]
        if b.predictor_nolr is not None:
            rows.append(Row("predictor_nolr", "learned sampler + predictor without LR context", smp_,
                            sampled("predictor", b.predictor_nolr)))
        stage = "stage II" if b.predictor_stage2 is not None else "stage I"
        how = f"top {k} tiles per scene" if k is not None else f"threshold {th:.4g}"
        rows.append(Row("default", f"learned sampler ({how}) + {stage} predictor", smp_,
                        sampled("predictor", main)))
        if b.predictor_stage2 is not None:
            rows.append(Row("default_stage1", "learned sampler + stage I predictor", smp_,
                            sampled("predictor", b.predictor)))
        for v in b.variants:
            rows.append(Row(f"sampler_{v}", f"sampler trained on {v} supervision + predictor",
                            ("decode_lr", "encode_lr", f"sampler_{v}"), sampled("predictor", main, v)))

        def oracle(bt, t):
            m = bt.oracle_mask(bt.mask("default", th, k).sum(1).tolist())
            return self._run(bt, t, m, "predictor", main), m
        rows.append(Row("oracle_cover", "upper bound, not a method: tiles covering the scene's labelled concepts "
                        "(read from its labels) at the default's OBR + predictor", lrs, oracle))
        return rows

    def sweep_points(self) -> list[tuple[str, float | None, int | None]]:
        pts = [(f"threshold {x:g}", x, None) for x in self.sweep]
        if self.top_k is not None:
            pts.append((f"top-{self.top_k}", None, int(self.top_k)))
        return pts

    # -- the run --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, limit: int | None = None, rows: Sequence[str] | None = None, sweep: bool = True) -> dict:
        n = len(self.keys) if limit is None else min(limit, len(self.keys))
        if n == 0:
            raise EvalError(f"split {self.reader.split!r} has no scenes")
        all_rows = self.rows()
        if rows is not None:
            unknown = set(rows) - {r.name for r in all_rows}
            if unknown:
                raise EvalError(f"unknown row {sorted(unknown)[0]!r}")
            all_rows = [r for r in all_rows if r.name in rows]
        pts = self.sweep_points() if sweep else []
        shared = Timer(self.device)
        timers = {r.name: Timer(self.device) for r in all_rows}
        sweep_timers = {p[0]: Timer(self.device) for p in pts}
        same = (lambda th, k: th is None and k == self.budget) if self.budget is not None else \
            (lambda th, k: k is None and th == self.threshold)
        reuse = {name for name, th, k in pts if "default" in timers and same(th, k)}
        for name in reuse:
            sweep_timers[name] = timers["default"]
        scores = {r.name: [] for r in all_rows}
        sweep_scores = {p[0]: [] for p in pts}
        masks = {r.name: [] for r in all_rows}
        sweep_masks = {p[0]: [] for p in pts}
        labels = []
        names = {r.name for r in all_rows}
        # the LR-guidance check (completion.py) reuses the full_hr row's tokens and the default's tiles
        check = CompletionCheck(self.bundle.space.centre) if {"full_hr", "default"} <= names else None
        default_sel = (None, self.budget) if self.budget is not None else (self.threshold, None)
        bar = None
        if self.progress:
            from gl10m.pipelines.runner import progress_bar
            bar = progress_bar(unit="scenes")
            bar_task = bar.add_task("eval", total=n)
            bar.start()
        try:
            for start in range(0, n, self.batch_size):
                idx = list(range(start, min(n, start + self.batch_size)))
                bt = _Batch(self, idx, shared)
                labels.append(bt.labels)
                for r in all_rows:
                    s, m = r.run(bt, timers[r.name])
                    scores[r.name].append(s.numpy())
                    masks[r.name].append(m.numpy())
                if check is not None and bt.full is not None:
                    with self.autocast():
                        check.add(self.bundle.completer, self.bundle.predictor_nolr, bt.lr_tokens, bt.full,
                                  bt.mask("default", *default_sel))
                for name, th, k in pts:
                    if name in reuse:  # the default row's own pipeline: not run twice
                        sweep_scores[name].append(scores["default"][-1])
                        sweep_masks[name].append(masks["default"][-1])
                        continue
                    m = bt.mask("default", th, k)
                    s = self._run(bt, sweep_timers[name], m, "predictor", self.bundle.completer)
                    sweep_scores[name].append(s.numpy())
                    sweep_masks[name].append(m.numpy())
                if bar is not None:
                    bar.advance(bar_task, len(idx))
        finally:
            if bar is not None:
                bar.stop()
        y = np.concatenate(labels)
        if y.shape[1] != len(self.bundle.labels):
            raise EvalError(f"the shards have {y.shape[1]} concepts, the model {len(self.bundle.labels)}")
        return {"n": n, "labels": y, "rows": all_rows, "shared": shared, "timers": timers,
                "scores": {k: np.concatenate(v) for k, v in scores.items()},
                "masks": {k: np.concatenate(v) for k, v in masks.items()},
                "sweep": pts, "sweep_timers": sweep_timers,
                "completion": check.result() if check is not None else None,
                "sweep_scores": {k: np.concatenate(v) for k, v in sweep_scores.items()},
                "sweep_masks": {k: np.concatenate(v) for k, v in sweep_masks.items()}}


def describe(checkpoint: str | os.PathLike | None, shards: str | os.PathLike, *, split: str = "test",
             **paths) -> dict:
    """What :func:`evaluate` would use, without loading a model: the checkpoint files found, the
    split's scene count and the rows (``--dry-run``)."""
    parts = {k: str(v) for k, v in resolve_parts(checkpoint, **paths).items()}
    with gdata.SampleReader(shards, split) as reader:
        n = len(reader)
    rows = ["lr_only", "full_hr", "random", "random_predictor", "sampler_only", "lr_fill"]
    rows += ["predictor_nolr"] if "predictor-nolr" in parts else []
    rows += ["default"] + (["default_stage1"] if "predictor-stage2" in parts else [])
    rows += [f"sampler_{v}" for v in VARIANTS if f"sampler-{v}" in parts] + ["oracle_cover"]
    return {"parts": parts, "split": split, "scenes": n, "rows": rows}


@torch.inference_mode()
def sampler_logits(bundle: Bundle, reader: gdata.SampleReader, *, device: str | torch.device = "cpu",
                   batch_size: int = 32) -> torch.Tensor:
    """The default sampler's logits [N, 100] over every scene of ``reader``'s split (LR only)."""
    dev = torch.device(device)
    out = []
    for start in range(0, len(reader), batch_size):
        idx = range(start, min(len(reader), start + batch_size))
        lr = np.stack([gdata.decode_lr(reader.read(i, (smp.LR_FIELD,))[smp.LR_FIELD], reader.keys[i]) for i in idx])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            tok = bundle.encoder.encode_lr(torch.from_numpy(lr).permute(0, 3, 1, 2).to(dev))[0].float()
            out.append(bundle.sampler(tok).float().cpu())
    if not out:
        raise EvalError(f"split {reader.split!r} has no scenes to calibrate on")
    return torch.cat(out)


def check_holdout(bundle: Bundle, novel: Sequence[int]) -> dict:
    """Every novel concept must be held out of every part that records what it held out (encoder
    pretraining, the sampler's s_gain, stage II) -> the report's ``novel_holdout``; a part that
    saw a novel concept is a one-line error (its novel numbers would not be zero-shot)."""
    out = {}
    for part, held in bundle.holdout.items():
        if held is None:
            out[part] = "not recorded"
            continue
        seen = [bundle.labels[c] for c in novel if c not in set(held)]
        if seen:
            raise EvalError(f"novel concept(s) {', '.join(seen)} were not held out of the {part} (it held out "
                            f"{len(held)}: {', '.join(bundle.labels[c] for c in held) or 'none'}); retrain it "
                            "with them held out or do not report them as novel")
        out[part] = [bundle.labels[c] for c in held]
    return out


def evaluate(checkpoint: str | os.PathLike | None, shards: str | os.PathLike, out: str | os.PathLike, *,
             split: str = "test", device: str = "auto", batch_size: int = 32, seed: int = 0,
             threshold: float | None = None, target_obr: float | None = None, calibration_split: str = "val",
             top_k: int | None = None, budget: int | None = None, novel: Sequence[str] | None = None,
             allow_small: bool = False,
             n_boot: int = N_BOOT, limit: int | None = None, sweep: bool = True, progress: bool = True,
             cpu_time_scenes: int = 32, **paths) -> dict:
    """The whole evaluation (see the module doc) -> the report dict; writes ``out/report.json``,
    ``out/report.md`` and ``out/sweep.png`` atomically. ``paths``: explicit encoder, sampler,
    predictor, predictor_nolr, predictor_stage2 and variants ({variant: run dir}).

    Threshold: ``threshold``, or with ``target_obr`` the shared threshold calibrated on
    ``calibration_split`` (val; never the split evaluated), else the sampler config's. ``budget``
    instead: every scene gets its ``budget`` best-scored tiles (a per-scene budget, OBR exactly
    budget / 100 on every split; the released code's operating point) and no threshold applies. A split of
    fewer than 100 scenes is refused unless ``allow_small``. ``n_boot`` bootstrap resamples (seeded
    by ``seed``) give every row's 95 % intervals. On CUDA, the LR-only, full-HR and default
    pipelines are also timed on the CPU over the first ``cpu_time_scenes`` scenes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EvalError("device cuda: no CUDA device here")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    if threshold is not None and target_obr is not None:
        raise EvalError("give a threshold or a target OBR, not both")
    if budget is not None and (threshold is not None or target_obr is not None):
        raise EvalError("give a per-scene budget or a threshold (or target OBR), not both")
    if target_obr is not None and calibration_split == split:
        raise EvalError(f"the threshold is calibrated on split {calibration_split!r}: evaluate another split "
                        "(calibrating on the split reported would tune on it)")
    resolve_parts(checkpoint, **paths)  # a missing part, then a small split: refused before loading a model
    with gdata.SampleReader(shards, split) as reader:
        n = len(reader) if limit is None else min(limit, len(reader))
    if n < MIN_SCENES and not allow_small:
        raise EvalError(f"split {split!r}: {n} scenes; mAP on fewer than {MIN_SCENES} is not meaningful "
                        "(--allow-small reports it anyway)")
    bundle = load_bundle(checkpoint, device=device, **paths)
    nov = resolve_novel(novel, bundle.labels, bundle.novel_from_checkpoint)
    holdout = check_holdout(bundle, nov)
    sel = {"rule": RULE, "threshold": threshold, "source": "--threshold", "target_obr": target_obr}
    if target_obr is not None:
        with gdata.SampleReader(shards, calibration_split) as cal:
            logits = sampler_logits(bundle, cal, device=device, batch_size=batch_size)
        t, got = calibrate_threshold(logits, target_obr)
        sel.update(threshold=t, source=f"calibration on {calibration_split}",
                   calibration={"split": calibration_split, "scenes": int(logits.shape[0]), "obr": got})
    elif threshold is None:
        sel.update(threshold=bundle.selection.get("threshold", 0.55), source="sampler's config")
    if budget is not None:  # no threshold applies (the sweep keeps the sampler config's)
        sel.update(budget=int(budget), threshold=None, source=f"per-scene budget: the {budget} best tiles of every scene")
    outp = Path(out)
    with gdata.SampleReader(shards, split) as reader:
        ev = Evaluator(bundle, reader, device=device, batch_size=batch_size, seed=seed, threshold=sel["threshold"],
                       top_k=top_k, progress=progress, budget=budget)
        res = ev.run(limit=limit, sweep=sweep)
        sel["top_k_sweep"] = ev.top_k
        ctx = {"version": REPORT_VERSION, "split": split, "shards": str(shards), "labels": bundle.labels,
               "novel": nov, "keys": ev.keys, "device": ev.device, "batch_size": ev.batch_size, "selection": sel,
               "scoring": {"space": bundle.space.name,
                           "text": f"cosine with the concept text embeddings centred over the {len(bundle.labels)} "
                                   "concepts and renormalised"},
               "novel_holdout": holdout, "sources": bundle.sources}
        rep = build_report(res, ctx, n_boot=n_boot, seed=seed)
        if ev.device.type == "cuda" and cpu_time_scenes > 0:
            cpu = Evaluator(load_bundle(checkpoint, device="cpu", **paths), reader, device="cpu",
                            batch_size=batch_size, seed=seed, threshold=sel["threshold"], top_k=top_k,
                            progress=progress, budget=budget)
            m = min(cpu_time_scenes, len(reader))
            r2 = cpu.run(limit=m, rows=("lr_only", "full_hr", "default"), sweep=False)
            rep["time_cpu"] = _clean({"scenes": m, "device": device_name(torch.device("cpu")),
                                      "rows": {r.name: _timing(r2["timers"][r.name], r2["shared"], r.uses, m)
                                               for r in r2["rows"]}})
    outp.mkdir(parents=True, exist_ok=True)
    plot = "sweep.png" if sweep and plot_sweep(rep, outp / "sweep.png") else None
    atomic_write_text(outp / "report.json", json.dumps(rep, indent=1, sort_keys=True) + "\n")
    atomic_write_text(outp / "report.md", render_markdown(rep, plot))
    return rep


__all__ = ["Bundle", "EvalError", "Evaluator", "Timer", "build_report", "calibrate_threshold", "check_holdout",
           "evaluate", "latest_checkpoint", "load_bundle", "lr_fill_tokens", "random_masks", "render_markdown",
           "resolve_novel", "sampler_logits", "summary_table"]
