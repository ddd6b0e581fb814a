"""Evaluation: how good is sparse HR observation here, and at what cost.

``gl10m model eval --checkpoint MODEL_DIR --shards W/shards --split test --out REPORT_DIR`` runs
the full pipeline on every scene of a split, straight from the shards, and writes
``report.json``, ``report.md`` and ``sweep.png``.

The pipeline of one batch (``batch_size`` scenes, 32 by default), each stage timed:

1. read the LR image and labels (IO) and decode the LR image;
2. encode it (LR tokens + LR embedding) and score the 100 tiles with the sampler;
3. select tiles (threshold on the per-scene min-max-normalised scores, or top-k), read
   (IO) and decode **only the selected tiles**, encode them (pooled HR tokens);
4. the predictor completes the unobserved tiles (observed tiles keep their own tokens);
5. score: each tile's tokens -> its embedding in the text space
   (:meth:`TileEncoder.embed_tokens`), the scene embedding is their normalised mean, and a
   concept's score is its cosine with the concept's text embedding (the prompts of the encoder's
   templates). Every score is therefore zero-shot from text prompts; no classifier is trained.

Times: each stage is timed with the device synchronised before and after (CUDA), IO (the member
reads) separately from compute. A row's time per scene is the sum of the stages it runs, over
the split, divided by the number of scenes.

Rows (one pipeline each; ``obr`` is the mean requested HR area / scene area):

- ``lr_only``: the LR embedding alone (OBR 0);
- ``full_hr``: all 100 tiles, no predictor (OBR 1);
- ``random``: random tiles, as many per scene as the default selects (same OBR), observed
  tiles only; ``random_predictor``: the same tiles completed by the predictor;
- ``sampler_only``: the learned sampler's tiles, observed tiles only (no predictor);
- ``lr_fill``: the sampler's tiles, unobserved tiles filled directly with the LR tokens of
  their area (resampled to the HR token grid);
- ``predictor_nolr``: the sampler's tiles completed by a predictor trained without LR context
  (when its checkpoint is given);
- ``default``: the sampler's tiles completed by the predictor;
- ``default_head``: the same with a stage II predictor, scored through its SigLIP head
  (when its checkpoint is given);
- ``sampler_<variant>``: samplers trained on the other supervision variants (structural,
  semantic, additive, multiplicative), completed by the predictor (when given).

Observed-only rows average the observed tiles' embeddings; a scene with no observed tile falls
back to its LR embedding (the only thing there is to score).

The sweep runs the default pipeline at thresholds 0, 0.1, 0.25, 0.45, 0.55, 0.65, 0.85, 1 and at
the sampler's top-k: mAP@100 against OBR, with time per scene.

Metrics (:mod:`gl10m.model.metrics`): mAP@20 and mAP@100 and non-interpolated AP (macro and
support-weighted) over all concepts, base and novel. Novel concepts are those named by
``novel`` plus those a stage II checkpoint held out of its loss.

A model dir holds ``encoder/`` (a saved encoder), ``sampler/`` and ``predictor/`` (trainer runs;
their latest checkpoint is used), and optionally ``predictor-nolr/``, ``predictor-stage2/`` and
``sampler-<variant>/``; each can also be given explicitly.
"""
from __future__ import annotations

import json
import math
import os
import platform
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
from gl10m.io import atomic_path, atomic_write_text

from . import metrics as M
from .checkpoint import read_checkpoint
from .encoders import TileEncoder, load_encoder
from .features import _HR_CHUNK
from .predictor import Predictor, load_predictor
from .sampler import load_sampler, select
from .supervision import VARIANTS

N_TILES = smp.N_TILES
GRID = 10
SWEEP_THRESHOLDS = (0.0, 0.1, 0.25, 0.45, 0.55, 0.65, 0.85, 1.0)
REPORT_VERSION = 1


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
    predictor: Predictor
    selection: dict                      # {"threshold": .., "top_k": ..} of the sampler's config
    predictor_nolr: Predictor | None = None
    predictor_stage2: Predictor | None = None
    variants: dict[str, torch.nn.Module] = field(default_factory=dict)
    novel_from_checkpoint: list[int] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)


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
          ("predictor_nolr", "predictor-nolr", False), ("predictor_stage2", "predictor-stage2", False))


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
            parts[name] = p if name == "encoder" else latest_checkpoint(p)
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

    p_main, _ = pred("predictor")
    p_nolr, _ = pred("predictor-nolr")
    if p_nolr is not None and p_nolr.use_lr:
        raise EvalError(f"{parts['predictor-nolr']}: this predictor uses LR context (use_lr: true)")
    p_s2, s2info = pred("predictor-stage2")
    novel = []
    if p_s2 is not None:
        if not hasattr(p_s2, "head"):
            raise EvalError(f"{parts['predictor-stage2']}: not a stage II predictor (no SigLIP head)")
        novel = [int(c) for c in s2info["config"].get("novel_concepts") or []]
    found = {v: load_sampler(parts[f"sampler-{v}"]).to(dev) for v in VARIANTS if f"sampler-{v}" in parts}
    return Bundle(enc, text, list(labels), samp, p_main, selection, p_nolr, p_s2, found, novel,
                  {k: str(v) for k, v in parts.items()})


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


IO_STAGES = ("io_lr", "io_hr")


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


def scene_embedding(tile_emb: torch.Tensor, mask: torch.Tensor | None = None,
                    fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Tile embeddings [B, 100, E] -> scene embeddings [B, E]: the normalised mean over the tiles
    (over the ``mask``'s tiles when given; a scene without any takes ``fallback`` [B, E])."""
    if mask is None:
        return F.normalize(tile_emb.float().mean(1), dim=-1)
    m = mask.to(tile_emb.device, torch.float32)[..., None]
    n = m.sum(1)
    e = F.normalize((tile_emb.float() * m).sum(1) / n.clamp(min=1), dim=-1)
    if fallback is not None:
        e = torch.where(n > 0, e, F.normalize(fallback.float(), dim=-1))
    return e


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
            tok, emb = b.encoder.encode_lr(self.lr.to(dev))
            self.lr_tokens, self.lr_embed = tok.float(), emb.float()
        self.scores: dict[str, torch.Tensor] = {}
        with shared("sampler"), ev.autocast():
            self.scores["default"] = b.sampler(self.lr_tokens).float()
        for v, s in b.variants.items():
            with shared(f"sampler_{v}"), ev.autocast():
                self.scores[v] = s(self.lr_tokens).float()
        self._masks: dict[tuple, torch.Tensor] = {}

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
            hr = np.concatenate([gdata.decode_tiles(s, r, k) for s, r, k in zip(sel, raw, self.keys) if len(s)])
            hr = torch.from_numpy(hr).permute(0, 3, 1, 2)
        with t("encode_hr"), ev.autocast():
            pooled = torch.cat([enc.encode_hr(hr[i:i + _HR_CHUNK].to(ev.device))[0].float()
                                for i in range(0, hr.shape[0], _HR_CHUNK)])
            bi = torch.from_numpy(np.concatenate([np.full(len(s), j) for j, s in enumerate(sel)])).to(ev.device)
            ti = torch.from_numpy(np.concatenate(sel)).to(ev.device)
            out[bi, ti] = pooled
        return out

    def score(self, scene: torch.Tensor, t: Timer) -> torch.Tensor:
        with t("score"):
            s = (scene.float() @ self.ev.bundle.text.to(scene.device).T).cpu()
        return s


class Evaluator:
    def __init__(self, bundle: Bundle, reader: gdata.SampleReader, *, device: str | torch.device = "cpu",
                 batch_size: int = 32, seed: int = 0, threshold: float | None = None, top_k: int | None = None,
                 sweep: Sequence[float] = SWEEP_THRESHOLDS, progress: bool = True):
        if batch_size < 1:
            raise EvalError(f"batch size must be >= 1, got {batch_size}")
        self.bundle, self.reader, self.device = bundle, reader, torch.device(device)
        self.keys = reader.keys
        self.batch_size, self.seed, self.progress = int(batch_size), int(seed), progress
        sel = bundle.selection
        self.threshold = threshold if threshold is not None else sel.get("threshold", 0.55)
        self.top_k = top_k if top_k is not None else sel.get("top_k", 12)
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
    def _complete(self, bt: _Batch, t: Timer, mask: torch.Tensor, predictor: Predictor | None,
                  mode: str) -> torch.Tensor:
        """Scene embeddings [B, E] for the tiles in ``mask``: mode observed | predictor | lr_fill | head."""
        enc = self.bundle.encoder
        tok = bt.tiles(mask, t)
        m = mask.to(tok.device)
        if mode == "observed":
            with t("score"):
                return scene_embedding(enc.embed_tokens(tok), m, bt.lr_embed)
        if mode == "lr_fill":
            with t("fill"):
                full = torch.where(m[:, :, None, None, None], tok, lr_fill_tokens(bt.lr_tokens, tok.shape[2]))
        else:
            with t("predictor"), self.autocast():
                lr = bt.lr_tokens if predictor.use_lr else None
                if mode == "head":
                    pred, emb = predictor(lr, tok, m, return_embed=True)
                else:
                    pred = predictor(lr, tok, m)
            if mode == "head":
                return F.normalize(emb.float(), dim=-1)
            full = torch.where(m[:, :, None, None, None], tok, pred.float())
        with t("score"):
            return scene_embedding(enc.embed_tokens(full))

    def rows(self) -> list[Row]:
        b = self.bundle
        th, k = self.threshold, None
        lrs = ("decode_lr", "encode_lr")
        smp_ = ("decode_lr", "encode_lr", "sampler")

        def default_mask(bt):
            return bt.mask("default", th, k)

        def lr_only(bt, t):
            return bt.score(bt.lr_embed, t), torch.zeros(len(bt.idx), N_TILES, dtype=torch.bool)

        def full_hr(bt, t):
            m = torch.ones(len(bt.idx), N_TILES, dtype=torch.bool)
            return bt.score(self._complete(bt, t, m, None, "observed"), t), m

        def rnd(with_pred):
            def run(bt, t):
                m = random_masks(bt.keys, default_mask(bt).sum(1).tolist(), self.seed)
                mode = "predictor" if with_pred else "observed"
                return bt.score(self._complete(bt, t, m, b.predictor, mode), t), m
            return run

        def sampled(mode, predictor=None, sampler="default"):
            def run(bt, t):
                m = bt.mask(sampler, th, k)
                return bt.score(self._complete(bt, t, m, predictor, mode), t), m
            return run

        rows = [
            Row("lr_only", "LR only (no HR)", lrs, lr_only),
            Row("full_hr", "full HR (all 100 tiles, no predictor)", (), full_hr),
            Row("random", "random tiles at the default's OBR, observed only", (), rnd(False)),
            Row("random_predictor", "random tiles at the default's OBR + predictor", lrs, rnd(True)),
            Row("sampler_only", "learned sampler, observed tiles only (no predictor)", smp_, sampled("observed")),
            Row("lr_fill", "learned sampler, missing tiles filled directly with LR tokens", smp_,
                sampled("lr_fill")),
        ]
        if b.predictor_nolr is not None:
            rows.append(Row("predictor_nolr", "learned sampler + predictor without LR context", smp_,
                            sampled("predictor", b.predictor_nolr)))
        rows.append(Row("default", f"learned sampler (threshold {th}) + predictor", smp_,
                        sampled("predictor", b.predictor)))
        if b.predictor_stage2 is not None:
            rows.append(Row("default_head", "learned sampler + stage II predictor, scored by its SigLIP head",
                            smp_, sampled("head", b.predictor_stage2)))
        for v in b.variants:
            rows.append(Row(f"sampler_{v}", f"sampler trained on {v} supervision + predictor",
                            ("decode_lr", "encode_lr", f"sampler_{v}"), sampled("predictor", b.predictor, v)))
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
        reuse = {name for name, th, k in pts if "default" in timers and k is None and th == self.threshold}
        for name in reuse:
            sweep_timers[name] = timers["default"]
        scores = {r.name: [] for r in all_rows}
        sweep_scores = {p[0]: [] for p in pts}
        masks = {r.name: [] for r in all_rows}
        sweep_masks = {p[0]: [] for p in pts}
        labels = []
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=n, desc="eval", unit="scene", dynamic_ncols=True)
        try:
            for start in range(0, n, self.batch_size):
                idx = list(range(start, min(n, start + self.batch_size)))
                bt = _Batch(self, idx, shared)
                labels.append(bt.labels)
                for r in all_rows:
                    s, m = r.run(bt, timers[r.name])
                    scores[r.name].append(s.numpy())
                    masks[r.name].append(m.numpy())
                for name, th, k in pts:
                    if name in reuse:  # the default row's own pipeline: not run twice
                        sweep_scores[name].append(scores["default"][-1])
                        sweep_masks[name].append(masks["default"][-1])
                        continue
                    m = bt.mask("default", th, k)
                    s = bt.score(self._complete(bt, sweep_timers[name], m, self.bundle.predictor, "predictor"),
                                 sweep_timers[name])
                    sweep_scores[name].append(s.numpy())
                    sweep_masks[name].append(m.numpy())
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        y = np.concatenate(labels)
        if y.shape[1] != len(self.bundle.labels):
            raise EvalError(f"the shards have {y.shape[1]} concepts, the model {len(self.bundle.labels)}")
        return {"n": n, "labels": y, "rows": all_rows, "shared": shared, "timers": timers,
                "scores": {k: np.concatenate(v) for k, v in scores.items()},
                "masks": {k: np.concatenate(v) for k, v in masks.items()},
                "sweep": pts, "sweep_timers": sweep_timers,
                "sweep_scores": {k: np.concatenate(v) for k, v in sweep_scores.items()},
                "sweep_masks": {k: np.concatenate(v) for k, v in sweep_masks.items()}}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _timing(timer: Timer, shared: Timer, uses: Sequence[str], n: int) -> dict:
    stages = {k: v for k, v in timer.totals.items()}
    for u in uses:
        stages[u] = stages.get(u, 0.0) + shared.totals.get(u, 0.0)
    compute = sum(v for k, v in stages.items() if k not in IO_STAGES)
    io = sum(v for k, v in stages.items() if k in IO_STAGES)
    if "decode_lr" in uses:  # the LR read belongs to the rows that use LR
        io += shared.totals.get("io_lr", 0.0)
        stages["io_lr"] = shared.totals.get("io_lr", 0.0)
    return {"per_scene_s": compute / n, "split_s": compute, "io_per_scene_s": io / n, "io_split_s": io,
            "stages_s": {k: round(v, 6) for k, v in sorted(stages.items())}}


def _clean(x):
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 6)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, " \
           f"{torch.get_num_threads()} torch threads)"


def build_report(res: dict, ev: Evaluator, *, split: str, novel: Sequence[int], shards: str) -> dict:
    b = ev.bundle
    n, y = res["n"], res["labels"]
    c = len(b.labels)
    groups = {"all": range(c)}
    if novel:
        groups["base"] = [i for i in range(c) if i not in set(novel)]
        groups["novel"] = list(novel)
    rows = []
    per_concept = {}
    for r in res["rows"]:
        pc = M.per_concept(res["scores"][r.name], y)
        per_obr = res["masks"][r.name].sum(1) / N_TILES
        rows.append({"name": r.name, "description": r.description, "obr": float(per_obr.mean()),
                     "metrics": M.summarise(pc, groups),
                     "time": _timing(res["timers"][r.name], res["shared"], r.uses, n)})
        per_concept[r.name] = pc
    sweep = []
    smp_uses = ("decode_lr", "encode_lr", "sampler")
    for name, th, k in res["sweep"]:
        m = M.summarise(M.per_concept(res["sweep_scores"][name], y), groups)
        sweep.append({"selection": name, "threshold": th, "top_k": k,
                      "obr": float(res["sweep_masks"][name].mean()),
                      "mAP@100": m["all"]["mAP@100"], "mAP@20": m["all"]["mAP@20"],
                      "novel_mAP@100": m.get("novel", {}).get("mAP@100"),
                      "time": _timing(res["sweep_timers"][name], res["shared"], smp_uses, n)})
    default = "default" if "default" in per_concept else None
    concepts = []
    if default:
        pc = per_concept[default]
        for i, lab in enumerate(b.labels):
            concepts.append({"id": i, "name": lab, "novel": i in set(novel), "positives": int(pc["n_pos"][i]),
                             "AP@100": float(pc["AP@100"][i]), "AP": float(pc["AP"][i])})
    obr_scene = {}
    if default:
        per = res["masks"][default].sum(1) / N_TILES
        obr_scene = {k: float(v) for k, v in zip(ev.keys[:n], per)}
    rep = {
        "version": REPORT_VERSION, "split": split, "shards": shards, "scenes": n,
        "device": {"type": ev.device.type, "name": _device_name(ev.device)},
        "torch": torch.__version__, "batch_size": ev.batch_size, "seed": ev.seed,
        "selection": {"threshold": ev.threshold, "top_k_sweep": ev.top_k},
        "model": b.sources,
        "concepts": {"n": c, "with_positives": int((y > 0).any(0).sum()), "novel": [b.labels[i] for i in novel]},
        "scoring": "zero-shot: cosine between the scene embedding and each concept's text-prompt embedding",
        "rows": rows, "sweep": sweep, "obr_per_scene": obr_scene, "per_concept_default": concepts,
    }
    return _clean(rep)


def _fmt(x, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ms(x) -> str:
    return "n/a" if x is None else f"{1000 * x:.1f}"


def render_markdown(rep: dict, plot: str | None) -> str:
    groups = [g for g in ("all", "base", "novel") if rep["rows"] and g in rep["rows"][0]["metrics"]]
    out = [f"# gl10m model evaluation: split `{rep['split']}`", "",
           f"{rep['scenes']} scenes from `{rep['shards']}`; device {rep['device']['name']}; batch "
           f"{rep['batch_size']}; default selection: threshold {rep['selection']['threshold']}. "
           f"Scores are {rep['scoring']}. Concepts: {rep['concepts']['n']} "
           f"({rep['concepts']['with_positives']} with positives in this split); novel: "
           f"{', '.join(rep['concepts']['novel']) or 'none declared'}.", "",
           "## Baselines and ablations", ""]
    head = "| row | OBR | " + " | ".join(f"mAP@20 {g} | mAP@100 {g}" for g in groups) + \
           " | AP macro | AP weighted | ms/scene | IO ms/scene |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rep["rows"]:
        m = r["metrics"]
        cells = " | ".join(f"{_fmt(m[g]['mAP@20'])} | {_fmt(m[g]['mAP@100'])}" for g in groups)
        out.append(f"| {r['name']} | {_fmt(r['obr'])} | {cells} | {_fmt(m['all']['AP_macro'])} | "
                   f"{_fmt(m['all']['AP_weighted'])} | {_ms(r['time']['per_scene_s'])} | "
                   f"{_ms(r['time']['io_per_scene_s'])} |")
    out += ["", "Rows:", ""] + [f"- `{r['name']}`: {r['description']}" for r in rep["rows"]]
    if rep["sweep"]:
        out += ["", "## Threshold sweep (default pipeline)", "",
                "| selection | OBR | mAP@100 | mAP@20 | ms/scene | IO ms/scene |", "|---|---|---|---|---|---|"]
        for s in rep["sweep"]:
            out.append(f"| {s['selection']} | {_fmt(s['obr'])} | {_fmt(s['mAP@100'])} | {_fmt(s['mAP@20'])} | "
                       f"{_ms(s['time']['per_scene_s'])} | {_ms(s['time']['io_per_scene_s'])} |")
        if plot:
            out += ["", f"![mAP@100 against OBR]({plot})"]
    d = next((r for r in rep["rows"] if r["name"] == "default"), None)
    if d is not None:
        out += ["", "## Time of the default pipeline, by stage (whole split, seconds)", "",
                "| stage | s |", "|---|---|"]
        out += [f"| {k} | {v:.4f} |" for k, v in d["time"]["stages_s"].items()]
    if rep.get("time_cpu"):
        tc = rep["time_cpu"]
        out += ["", f"## The same on the CPU ({tc['device']}, first {tc['scenes']} scenes)", "",
                "| row | ms/scene | IO ms/scene |", "|---|---|---|"]
        out += [f"| {k} | {_ms(v['per_scene_s'])} | {_ms(v['io_per_scene_s'])} |" for k, v in tc["rows"].items()]
    out += ["", "mAP@K: per concept, scenes ranked by score (stable sort); AP@K = sum_{i<=K} P@i rel_i / "
            "min(n_pos, K); concepts without positives skipped. OBR: selected tiles / 100. Times exclude IO "
            "(member reads), which is listed separately; CUDA is synchronised around every stage.", ""]
    return "\n".join(out)


def plot_sweep(rep: dict, path: Path) -> bool:
    """mAP@100 against OBR for the sweep, with LR-only and full HR as reference points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib ships with the model extra
        return False
    pts = [(s["obr"], s["mAP@100"], s["selection"]) for s in rep["sweep"] if s["mAP@100"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if pts:
        th = sorted((p for p in pts if p[2].startswith("threshold")), key=lambda p: p[0])
        ax.plot([p[0] for p in th], [p[1] for p in th], "o-", label="sampler + predictor (threshold)")
        for x, yv, lab in pts:
            ax.annotate(lab.replace("threshold ", "t="), (x, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        tk = [p for p in pts if p[2].startswith("top-")]
        if tk:
            ax.plot([p[0] for p in tk], [p[1] for p in tk], "s", label="sampler + predictor (top-k)")
    for name, marker in (("lr_only", "v"), ("full_hr", "^"), ("random", "x")):
        r = next((r for r in rep["rows"] if r["name"] == name), None)
        if r is not None and r["metrics"]["all"]["mAP@100"] is not None:
            ax.plot([r["obr"]], [r["metrics"]["all"]["mAP@100"]], marker, label=name.replace("_", " "))
    ax.set_xlabel("OBR (requested HR area / scene area)")
    ax.set_ylabel("mAP@100 (all concepts)")
    ax.set_xlim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def describe(checkpoint: str | os.PathLike | None, shards: str | os.PathLike, *, split: str = "test",
             **paths) -> dict:
    """What :func:`evaluate` would use, without loading a model: the checkpoint files found, the
    split's scene count and the rows (``--dry-run``)."""
    parts = {k: str(v) for k, v in resolve_parts(checkpoint, **paths).items()}
    with gdata.SampleReader(shards, split) as reader:
        n = len(reader)
    rows = ["lr_only", "full_hr", "random", "random_predictor", "sampler_only", "lr_fill"]
    rows += ["predictor_nolr"] if "predictor-nolr" in parts else []
    rows += ["default"] + (["default_head"] if "predictor-stage2" in parts else [])
    rows += [f"sampler_{v}" for v in VARIANTS if f"sampler-{v}" in parts]
    return {"parts": parts, "split": split, "scenes": n, "rows": rows}


def evaluate(checkpoint: str | os.PathLike | None, shards: str | os.PathLike, out: str | os.PathLike, *,
             split: str = "test", device: str = "auto", batch_size: int = 32, seed: int = 0,
             threshold: float | None = None, top_k: int | None = None, novel: Sequence[str] | None = None,
             limit: int | None = None, sweep: bool = True, progress: bool = True, cpu_time_scenes: int = 32,
             **paths) -> dict:
    """The whole evaluation (see the module doc) -> the report dict; writes ``out/report.json``,
    ``out/report.md`` and ``out/sweep.png`` atomically. ``paths``: explicit encoder, sampler,
    predictor, predictor_nolr, predictor_stage2 and variants ({variant: run dir}). On CUDA, the
    LR-only, full-HR and default pipelines are also timed on the CPU over the first
    ``cpu_time_scenes`` scenes (``time_cpu`` in the report)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EvalError("device cuda: no CUDA device here")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    bundle = load_bundle(checkpoint, device=device, **paths)
    nov = resolve_novel(novel, bundle.labels, bundle.novel_from_checkpoint)
    outp = Path(out)
    with gdata.SampleReader(shards, split) as reader:
        ev = Evaluator(bundle, reader, device=device, batch_size=batch_size, seed=seed, threshold=threshold,
                       top_k=top_k, progress=progress)
        res = ev.run(limit=limit, sweep=sweep)
        rep = build_report(res, ev, split=split, novel=nov, shards=str(shards))
        if ev.device.type == "cuda" and cpu_time_scenes > 0:
            cpu = Evaluator(load_bundle(checkpoint, device="cpu", **paths), reader, device="cpu",
                            batch_size=batch_size, seed=seed, threshold=threshold, top_k=top_k, progress=progress)
            m = min(cpu_time_scenes, len(reader))
            r2 = cpu.run(limit=m, rows=("lr_only", "full_hr", "default"), sweep=False)
            rep["time_cpu"] = _clean({"scenes": m, "device": _device_name(torch.device("cpu")),
                                      "rows": {r.name: _timing(r2["timers"][r.name], r2["shared"], r.uses, m)
                                               for r in r2["rows"]}})
    outp.mkdir(parents=True, exist_ok=True)
    plot = "sweep.png" if sweep and plot_sweep(rep, outp / "sweep.png") else None
    atomic_write_text(outp / "report.json", json.dumps(rep, indent=1, sort_keys=True) + "\n")
    atomic_write_text(outp / "report.md", render_markdown(rep, plot))
    return rep


def summary_table(rep: dict) -> list[tuple[str, str, str, str]]:
    """(row, OBR, mAP@100 all, ms/scene) for printing."""
    return [(r["name"], _fmt(r["obr"]), _fmt(r["metrics"]["all"]["mAP@100"]), _ms(r["time"]["per_scene_s"]))
            for r in rep["rows"]]


__all__ = ["Bundle", "EvalError", "Evaluator", "Timer", "build_report", "evaluate", "latest_checkpoint",
           "load_bundle", "lr_fill_tokens", "random_masks", "render_markdown", "resolve_novel",
           "scene_embedding", "summary_table"]
