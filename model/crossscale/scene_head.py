"""The scene head, fitted to convergence on the frozen stage II predictor's completions.

Every evaluation row scores a scene through one head (:mod:`gl10m.model.scoring`): the pooled
completed grid (mean and max of the tiles' tokens) -> ``SceneNorm`` + linear -> the concept text
space. Stage II trains that head jointly with the predictor, for as many steps as the predictor
gets (600 on the CPU config): far from converged. On the bootstrap encoder's cache of seed 7373
(train -> val, base concepts, the *true* HR tokens pooled) the same head and loss read mAP@100
0.18 after 600 steps, 0.24 after 3,000 and 0.28 after 10,000 (a logistic-regression probe: 0.29);
the LR tokens 0.16, 0.19, 0.18. An under-trained head hides most of what HR adds.

So after stage II the predictor is frozen and the head alone is trained on, for each training
scene, the pooled vectors of several **views** -- the ones the evaluation rows score:

- ``full``: all 100 true tiles (the full-HR row);
- ``lr_only``: no tile, the grid completed by the predictor from LR (the LR-only row);
- ``completed``: random tiles at an OBR drawn from ``obr`` [lo, hi], completed by the predictor
  (the default and random+predictor rows);
- ``observed``: the same kind of random tiles, pooled alone (the observed-only rows, with the
  empty-mask fallback the evaluation uses).

Every row -- baselines included -- is scored by this one head, so none gets a better-trained
scorer than another. Its loss is stage II's: SigLIP between the (L2-normalised) head output and the
**centred text of the base concepts** (novel concepts are held out: neither their labels nor
their text are seen), starting from stage II's head, scale and bias. The views are computed once
(the predictor is frozen; one forward per completed view and scene) and the head is trained on
them for ``steps`` minibatches: seconds to a minute on a CPU.

Output: ``out_dir/head.pt`` ({"model": the head's state dict, "log_scale", "bias", "config",
"dims", "novel_concepts", "stage2"}) and ``out_dir/head.json`` (config, views, loss, seconds);
:func:`load_scene_head` reads it and :func:`gl10m.model.crossscale.evaluate.load_bundle` uses it as the scene
space's head when the model dir has one.
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gl10m.errors import UserError
from gl10m.samples import N_TILES

from .losses import siglip_loss
from .predictor import SceneNorm, complete, load_predictor
from .scoring import center_text, pool_scene


VIEWS = ("full", "lr_only", "completed", "observed")
DEFAULTS = dict(steps=10000, batch_size=64, lr=3.0e-3, weight_decay=0.05, seed=0, split="train",
                views={"full": 1, "lr_only": 1, "completed": 2, "observed": 1}, obr=[0.02, 0.3],
                forward_batch=64, log_every=1000)


class SceneHeadError(UserError, ValueError):
    """A bad scene-head config or input (one line)."""


def head_config(cfg: dict | None) -> dict:
    """``cfg`` over :data:`DEFAULTS`, checked (unknown keys, view names, counts, OBR range)."""
    c = {**DEFAULTS, **(cfg or {})}
    bad = sorted(set(cfg or {}) - set(DEFAULTS))
    if bad:
        raise SceneHeadError(f"scene_head config: unknown key {bad[0]!r} (known: {', '.join(sorted(DEFAULTS))})")
    views = c["views"]
    if not isinstance(views, dict) or not views or set(views) - set(VIEWS):
        raise SceneHeadError(f"scene_head views: a mapping of {', '.join(VIEWS)} to counts, got {views!r}")
    for k, v in views.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SceneHeadError(f"scene_head views: {k} must be a count >= 0, got {v!r}")
    if sum(views.values()) == 0:
        raise SceneHeadError("scene_head views: every count is 0")
    for k in ("steps", "batch_size", "forward_batch", "log_every"):
        if isinstance(c[k], bool) or not isinstance(c[k], int) or c[k] < 1:
            raise SceneHeadError(f"scene_head config: {k} must be a positive integer, got {c[k]!r}")
    lo, hi = (float(x) for x in c["obr"])
    if not 0.0 <= lo <= hi <= 1.0:
        raise SceneHeadError(f"scene_head obr: [lo, hi] within [0, 1], got {c['obr']!r}")
    c["obr"] = [lo, hi]
    return c


def _random_mask(key: str, seed: int, view: int, lo: float, hi: float) -> torch.Tensor:
    """[100] bool: a seeded (seed, scene key, view) draw of round(OBR * 100) tiles, OBR ~ U[lo, hi]."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode()), int(view)])
    n = int(round(float(rng.uniform(lo, hi)) * N_TILES))
    m = torch.zeros(N_TILES, dtype=torch.bool)
    m[torch.from_numpy(rng.choice(N_TILES, size=n, replace=False))] = True
    return m


@torch.inference_mode()
def pooled_views(predictor, center: torch.Tensor, batches, cfg: dict,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The pooled vectors [N, 2D] and labels [N, C] of every view of every scene in ``batches``
    (dicts with ``key``, ``lr_tokens``, ``hr_tokens``, ``labels``), and the count per view."""
    xs, ys, counts = [], [], {v: 0 for v in VIEWS}
    lo, hi = cfg["obr"]
    fb = center.to(device).float()
    for b in batches:
        tok = b["hr_tokens"].to(device).float()
        lr = b["lr_tokens"].to(device).float()
        y = b["labels"]
        n = tok.shape[0]
        for view in VIEWS:
            for j in range(int(cfg["views"].get(view, 0))):
                if view == "full":
                    x = pool_scene(tok)
                elif view == "lr_only":
                    m = torch.zeros(n, N_TILES, dtype=torch.bool, device=device)
                    pred = predictor(lr if predictor.use_lr else None, tok, m).float()
                    x = pool_scene(pred)
                else:
                    m = torch.stack([_random_mask(k, cfg["seed"], 2 * j + (view == "observed"), lo, hi)
                                     for k in b["key"]]).to(device)
                    if view == "observed":
                        x = pool_scene(tok, m, fb)
                    else:
                        pred = predictor(lr if predictor.use_lr else None, tok, m).float()
                        x = pool_scene(complete(tok, pred, m))
                xs.append(x.cpu())
                ys.append(y.cpu())
                counts[view] += n
    if not xs:
        raise SceneHeadError("scene_head: no scenes to fit on")
    return torch.cat(xs), torch.cat(ys), counts


def fit_head(x: torch.Tensor, y: torch.Tensor, text: torch.Tensor, keep: torch.Tensor, init: dict,
             cfg: dict, progress: Callable[[int, float], None] | None = None) -> tuple[nn.Module, nn.Parameter, nn.Parameter, list]:
    """Train ``SceneNorm`` + linear (from ``init``: the stage II head's state, log_scale, bias)
    on pooled vectors ``x`` [N, 2D] with multi-label ``y`` [N, C] against the centred text of the
    ``keep`` concepts -> (head, log_scale, bias, loss log)."""
    d, e = x.shape[1], text.shape[1]
    head = nn.Sequential(SceneNorm(d), nn.Linear(d, e))
    head.load_state_dict(init["head"])
    log_scale = nn.Parameter(init["log_scale"].detach().clone().float())
    bias = nn.Parameter(init["bias"].detach().clone().float())
    txt = center_text(text.float()[keep])
    targets = (y > 0)[:, keep]
    params = list(head.parameters()) + [log_scale, bias]
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    steps = int(cfg["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    bs = min(int(cfg["batch_size"]), x.shape[0])
    log = []
    head.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # [64, 256] x [256, E] steps: one thread beats several (and leaves the rest free)
    try:
        _steps(head, x, targets, txt, log_scale, bias, opt, sched, g, bs, steps, cfg, log, progress)
    finally:
        torch.set_num_threads(threads)
    return head.eval(), log_scale, bias, log


def _steps(head, x, targets, txt, log_scale, bias, opt, sched, g, bs, steps, cfg, log, progress) -> None:
    for s in range(steps):
        idx = torch.randint(0, x.shape[0], (bs,), generator=g)
        loss = siglip_loss(head(x[idx]), txt, targets[idx], log_scale, bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if s % int(cfg["log_every"]) == 0 or s == steps - 1:
            log.append({"step": s, "loss": float(loss.detach())})
            if progress is not None:
                progress(s, log[-1]["loss"])


def fit_scene_head(features_dir: str | os.PathLike, stage2: str | os.PathLike, out_dir: str | os.PathLike,
                   cfg: dict | None = None, *, device: str = "cpu",
                   progress: Callable[[int, float], None] | None = None) -> Path:
    """Fit the scene head on the frozen stage II predictor (a checkpoint file) over the feature
    cache's ``cfg['split']`` -> path of ``out_dir/head.pt`` (written atomically)."""
    from gl10m.io import atomic_write_text

    from .features import FeatureDataset, load_text

    c = head_config(cfg)
    dev = torch.device(device)
    torch.manual_seed(int(c["seed"]))
    pred, info = load_predictor(stage2)
    if not hasattr(pred, "head"):
        raise SceneHeadError(f"{stage2}: not a stage II predictor (no scene head to start from)")
    pred = pred.to(dev).eval()
    text = load_text(features_dir).float()
    novel = {int(i) for i in info["config"].get("novel_concepts") or []}
    keep = torch.tensor([i for i in range(text.shape[0]) if i not in novel], dtype=torch.long)
    ds = FeatureDataset(features_dir, c["split"], rank=0, world_size=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=int(c["forward_batch"]), num_workers=0)
    t0 = time.time()
    x, y, counts = pooled_views(pred, info["center"], dl, c, dev)
    t_views = time.time() - t0
    init = {"head": {k: v.detach().cpu().clone() for k, v in pred.head.state_dict().items()},
            "log_scale": pred.log_scale.detach().cpu(), "bias": pred.bias.detach().cpu()}
    head, log_scale, bias, log = fit_head(x, y, text, keep, init, c, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {"model": head.state_dict(), "log_scale": log_scale.detach(), "bias": bias.detach(),
             "config": c, "dims": info["dims"], "novel_concepts": sorted(novel), "stage2": str(stage2)}
    tmp = out / "head.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "head.pt")
    atomic_write_text(out / "head.json", json.dumps(
        {"config": c, "views": counts, "vectors": int(x.shape[0]), "stage2": str(stage2),
         "novel_concepts": sorted(novel), "loss": log, "seconds": {"views": round(t_views, 1),
                                                                    "total": round(time.time() - t0, 1)}},
        indent=2, sort_keys=True) + "\n")
    return out / "head.pt"


def load_scene_head(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """A fitted scene head (eval mode) from ``head.pt`` (or its folder) -> (head, info); its sizes
    come from its weights."""
    from .checkpoint import load_weights, read_checkpoint

    p = Path(path)
    if p.is_dir():
        p = p / "head.pt"
    st = read_checkpoint(p, "scene head", map_location)
    w = st["model"].get("1.weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise SceneHeadError(f"scene head {p}: no linear layer in its weights")
    e, d = w.shape
    head = load_weights(nn.Sequential(SceneNorm(d), nn.Linear(d, e)), st, "scene head", p)
    return head, {k: v for k, v in st.items() if k != "model"}


__all__ = ["DEFAULTS", "SceneHeadError", "VIEWS", "fit_head", "fit_scene_head", "head_config", "load_scene_head",
           "pooled_views"]
