"""The bootstrap encoder: a small ViT trained on the shards with a SigLIP sigmoid loss.

Each step takes ``batch_size`` scenes and ``tiles_per_scene`` random HR tiles of each. A tile is
positive for concept ``c`` when ``tile_frac[c] >= pos_threshold``; the loss is SigLIP's
``-mean log sigmoid(z * (exp(t) <img, txt> + b))`` (``z`` = +1/-1, ``t`` init log 10, ``b`` init -10)
between the tiles' embeddings and the concepts' text embeddings (frozen MiniLM prompts through
the encoder's learned ``text_proj``). The LR image embedding is aligned with the scene's
``labels`` the same way (its own scale and bias), weighted by ``lr_weight``.

Config (dict or YAML, see model/configs/encoder-*.yaml)::

    encoder: {backend: vit, width: 192, depth: 6, heads: 3, patch: 16, hr_size: 224, lr_size: 160, ...}
    train: {split: train, steps: 2000, batch_size: 8, tiles_per_scene: 8, lr: 3.0e-4,
            weight_decay: 0.05, pos_threshold: 0.0001, lr_weight: 1.0, seed: 0, shuffle: 64,
            profile: null, device: cpu, log_every: 50, novel: null, balanced: false}

``balanced``: positive and negative pairs weigh alike in both losses
(:func:`gl10m.model.crossscale.losses.siglip_loss`). Tried on seed 2027 (fit-cpu's encoder, 500 steps, val
split): it did not read scenes better (zero-shot mAP@100 LR 0.080 vs 0.095, best HR tile 0.092 vs
0.103), so the default stays the plain mean.

Novel concepts are held out of pretraining entirely: their text and their labels leave both
SigLIP losses, so the encoder never learns them. ``train.novel`` (or the ``novel`` argument):
concept names or ids; null = the concepts the profile marks ``novel: true``. The held-out ids are
recorded in ``encoder.json`` (``novel``, ``novel_labels``); the feature cache copies them
(``encoder_novel``) and the sampler and stage II default to them.

Output: ``out_dir/encoder.pt`` + ``encoder.json`` (see :func:`model.encoders.save_encoder`) and
``out_dir/pretrain_log.json`` (loss per step).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gl10m.model.crossscale.losses import siglip_loss
from gl10m.model.encoders import EncoderConfig, EncoderError, TextEncoder, TileEncoder, concept_labels, load_config, save_encoder
from gl10m.samples import N_TILES

TRAIN_DEFAULTS = dict(split="train", steps=2000, batch_size=8, tiles_per_scene=8, lr=3.0e-4, weight_decay=0.05,
                      pos_threshold=1e-4, lr_weight=1.0, seed=0, shuffle=64, profile=None, device="cpu",
                      log_every=50, labels=None, novel=None, balanced=False)


class SigLIPHead(nn.Module):
    """Learnable SigLIP temperature and bias (init log 10 and -10)."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, img, txt, targets, balanced: bool = False):
        return siglip_loss(img, txt, targets, self.log_scale, self.bias, balanced=balanced)


def _train_cfg(cfg: dict) -> tuple[dict, dict]:
    if not isinstance(cfg, dict):
        raise EncoderError("pretrain config must be a mapping with 'encoder' and 'train' sections")
    enc = cfg.get("encoder", {}) or {}
    tr = dict(TRAIN_DEFAULTS)
    user = cfg.get("train", {}) or {}
    bad = sorted(set(user) - set(TRAIN_DEFAULTS))
    if bad:
        raise EncoderError(f"train config: unknown key {bad[0]!r} (known: {', '.join(sorted(TRAIN_DEFAULTS))})")
    tr.update(user)
    for k in ("steps", "batch_size", "tiles_per_scene"):
        if isinstance(tr[k], bool) or not isinstance(tr[k], int) or tr[k] < 1:
            raise EncoderError(f"train config: {k} must be a positive integer, got {tr[k]!r}")
    if not 0 < tr["tiles_per_scene"] <= N_TILES:
        raise EncoderError(f"train config: tiles_per_scene must be in 1..{N_TILES}")
    EncoderConfig.from_dict(enc)  # fail fast, before the text encoder loads
    if not 0.0 < float(tr["pos_threshold"]) <= 1.0:
        raise EncoderError(f"train config: pos_threshold must be in (0, 1], got {tr['pos_threshold']!r}")
    return enc, tr


def _tile_picker(k: int, seed: int) -> Callable:
    rng = np.random.default_rng(seed)
    return lambda _lr: sorted(rng.choice(N_TILES, size=k, replace=False).tolist())


def novel_ids(novel, labels: list[str], profile=None) -> list[int]:
    """Novel concepts (names or ids; None = the profile's ``novel: true`` flags) -> sorted ids."""
    if novel is None:
        from gl10m.model.crossscale.features import _novel_ids

        return _novel_ids(profile, labels)
    pos = {lab.lower(): i for i, lab in enumerate(labels)}
    out = set()
    for n in novel:
        if isinstance(n, int) and not isinstance(n, bool):
            i = n
        elif isinstance(n, str) and n.strip().isdigit():
            i = int(n)
        elif isinstance(n, str) and n.strip().lower() in pos:
            i = pos[n.strip().lower()]
        else:
            raise EncoderError(f"novel concept {n!r} is not one of the {len(labels)} concepts")
        if not 0 <= i < len(labels):
            raise EncoderError(f"novel concept {i} is outside 0..{len(labels) - 1}")
        out.add(i)
    return sorted(out)


def pretrain_encoder(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: dict | str | os.PathLike,
                     *, progress: Callable[[int, float], None] | None = None,
                     text_encoder: TextEncoder | None = None, novel=None) -> Path:
    """Train the bootstrap encoder on ``shards_dir`` (a gl10m shards folder) -> path of encoder.pt.
    ``novel`` (names or ids) overrides the config's ``train.novel``; they are held out."""
    from gl10m import data

    if isinstance(cfg, (str, os.PathLike)):
        cfg = load_config(cfg)
    enc_cfg, tr = _train_cfg(cfg)
    if novel is not None:
        tr["novel"] = list(novel)
    seed = int(tr["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = torch.device(tr["device"])

    labels = list(tr["labels"]) if tr["labels"] else concept_labels(tr["profile"])
    held = novel_ids(tr["novel"], labels, tr["profile"])
    keep = torch.tensor([c for c in range(len(labels)) if c not in set(held)], dtype=torch.long, device=dev)
    enc = TileEncoder(enc_cfg).to(dev)
    te = text_encoder if (text_encoder is not None or enc.clip) else TextEncoder()  # CLIP has its own text tower
    text_raw = enc.text_raw(labels, te).to(dev)

    ds = data.load(shards_dir, split=tr["split"], tiles=_tile_picker(tr["tiles_per_scene"], seed),
                   shuffle=int(tr["shuffle"]), seed=seed, rank=0, world_size=1, decode_meta=False,
                   tile_px=enc.tile_px)
    dl = torch.utils.data.DataLoader(ds, batch_size=tr["batch_size"], num_workers=0, collate_fn=data.collate)

    hr_head, lr_head = SigLIPHead().to(dev), SigLIPHead().to(dev)
    params = list(enc.parameters()) + list(hr_head.parameters()) + list(lr_head.parameters())
    opt = torch.optim.AdamW(params, lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    steps = int(tr["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    thr = float(tr["pos_threshold"])
    log, step, epoch, t0 = [], 0, 0, time.time()
    enc.train()
    while step < steps:
        ds.set_epoch(epoch)
        n_batches = 0
        for batch in dl:
            n_batches += 1
            hr = batch["hr"]
            if not isinstance(hr, torch.Tensor):
                raise EncoderError("pretrain: scenes returned different tile counts")
            b, n = hr.shape[:2]
            if batch["labels"].shape[1] != len(labels):
                raise EncoderError(f"pretrain: samples have {batch['labels'].shape[1]} concepts, "
                                   f"the profile {len(labels)}")
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                _, hr_emb, _ = enc.encode_hr(hr.reshape(b * n, *hr.shape[2:]))
                _, lr_emb = enc.encode_lr(batch["lr"])
                txt = enc.encode_text(text_raw)
            hr_emb, lr_emb, txt = hr_emb.float(), lr_emb.float(), txt.float()
            tile_pos = (batch["tile_frac"].float().reshape(b * n, -1) >= thr).to(dev)
            # novel concepts leave both losses: neither their text nor their labels are seen
            txt = txt[keep]
            bal = bool(tr["balanced"])
            loss_hr = hr_head(hr_emb, txt, tile_pos[:, keep], bal)
            loss_lr = lr_head(lr_emb, txt, (batch["labels"].to(dev) > 0)[:, keep], bal)
            loss = loss_hr + float(tr["lr_weight"]) * loss_lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            log.append({"step": step, "loss": loss.item(), "loss_hr": loss_hr.item(), "loss_lr": loss_lr.item()})
            if progress is not None and (step % int(tr["log_every"]) == 0 or step == steps - 1):
                progress(step, log[-1]["loss"])
            step += 1
            if step >= steps:
                break
        if n_batches == 0:
            raise EncoderError(f"pretrain: split {tr['split']!r} of {shards_dir} has no samples")
        epoch += 1
    enc.eval()
    out = Path(out_dir)
    path = save_encoder(enc, out, text_raw=text_raw, labels=labels,
                        extra={"novel": held, "novel_labels": [labels[i] for i in held],
                               "train": {k: v for k, v in tr.items() if k != "labels"}, "text_model": te.name if te is not None else f"open_clip:{enc.cfg.model}",
                               "source": str(shards_dir), "steps": steps, "epochs": epoch,
                               "seconds": round(time.time() - t0, 2),
                               "siglip": {"hr": [hr_head.log_scale.item(), hr_head.bias.item()],
                                          "lr": [lr_head.log_scale.item(), lr_head.bias.item()]}})
    from gl10m.io import atomic_write_text

    atomic_write_text(out / "pretrain_log.json", json.dumps(log) + "\n")
    return path


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "encoder-bootstrap.yaml"


def cli_pretrain_encoder(shards: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None,
                         *, steps: int | None = None, batch_size: int | None = None, device: str | None = None,
                         seed: int | None = None, profile: str | None = None, novel=None, echo=print) -> Path:
    """``gl10m model pretrain-encoder SHARDS OUT [--config YAML] [--steps N] [--batch-size N]
    [--device cpu|cuda] [--seed N] [--profile YAML]``: train the bootstrap encoder; the options
    override the config's ``train:`` section. Returns the path of ``encoder.pt``."""
    from gl10m.errors import UserError
    from gl10m.shards import MANIFEST_NAME

    local = "://" not in str(shards)
    if local and not (Path(shards) / MANIFEST_NAME).is_file():  # before loading any model: fail fast
        raise UserError(f"{shards}: not a shards folder (no {MANIFEST_NAME})")
    cfg = load_config(config or DEFAULT_CONFIG)
    tr = dict(cfg.get("train") or {})
    for k, v in (("steps", steps), ("batch_size", batch_size), ("device", device), ("seed", seed),
                 ("profile", profile), ("novel", novel)):
        if v is not None:
            tr[k] = v
    cfg = {**cfg, "train": tr}
    path = pretrain_encoder(shards, out, cfg, progress=lambda s, loss: echo(f"step {s}: loss {loss:.4f}"))
    echo(f"encoder -> {path}")
    return path
