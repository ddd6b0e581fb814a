"""The predictor's training tasks: "predictor" (stage I, centered cosine regression of the HR
tokens) and "predictor_stage2" (stage I + SigLIP between the completed grid's scene embedding
and the concept text embeddings), as the trainer (:mod:`.train`) runs them."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gl10m.errors import UserError

from .losses import RunningCenter, centered_cosine, collapse_monitors, scale_loss, siglip_loss
from .masks import draw_masks
from .predictor import Predictor
from .scoring import center_text


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return getattr(model, "module", model)


class PredictorModel(nn.Module):
    """Predictor + the running centre of the targets (saved with the model's state dict)."""

    def __init__(self, predictor: Predictor, momentum: float):
        super().__init__()
        self.predictor = predictor
        self.center = RunningCenter(predictor.in_dim, momentum)

    def forward(self, lr_tokens, hr_tokens, mask, return_embed: bool = False):
        return self.predictor(lr_tokens, hr_tokens, mask, return_embed=return_embed)


class PredictorTask:
    """Stage I: centered cosine between predicted and target HR tokens of all 100 tiles, plus
    ``scale_weight`` (default 1) x :func:`~gl10m.model.crossscale.losses.scale_loss` (their distances to the
    centre)."""

    name = "predictor"
    stage2 = False
    config_keys = ("center_momentum", "max_observed_frac", "sampler_mix", "sampler_checkpoint", "scale_weight",
                   "full_share")

    def __init__(self, scorer: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.scorer = scorer  # optional: lr_tokens [B, Gl, Gl, D] -> tile scores [B, 100]
        self.cfg: dict = {}

    def build_model(self, cfg: dict, dims: dict) -> nn.Module:
        self.cfg = cfg
        if cfg.get("sampler_checkpoint") and self.scorer is None:
            # mixed masks: a trained sampler's top tiles for a share (sampler_mix) of the scenes
            from .sampler import load_sampler
            self.scorer = load_sampler(cfg["sampler_checkpoint"])
        pcfg = cfg.get("model") or {}
        emb = dims["E"] if self.stage2 else None
        return PredictorModel(Predictor.from_config(pcfg, dims, embed_dim=emb),
                              float(cfg.get("center_momentum", 0.9)))

    def masks(self, batch: dict, step: int) -> torch.Tensor:
        """Masks for this step: a generator seeded by (seed, step, rank), so a resumed run draws
        exactly the masks an uninterrupted one would."""
        cfg = self.cfg
        b = batch["hr_tokens"].shape[0]
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)) * 1_000_003 + step * 7919 + rank)
        scores = None
        if self.scorer is not None:
            if isinstance(self.scorer, nn.Module):
                self.scorer.to(batch["lr_tokens"].device)
            with torch.no_grad():
                scores = self.scorer(batch["lr_tokens"])
        mask = draw_masks(b, gen, float(cfg.get("max_observed_frac", 0.3)), scores,
                          float(cfg.get("sampler_mix", 0.5)))
        full = float(cfg.get("full_share", 0.0))
        if not 0.0 <= full <= 1.0:
            raise UserError(f"full_share must be in [0, 1], got {full}")
        if full > 0:  # some scenes fully observed: stage II's head also learns the full-HR grid it scores
            mask |= (torch.rand(b, generator=gen) < full)[:, None]
        return mask.to(batch["hr_tokens"].device)

    def stage1(self, model, batch: dict, step: int):
        inner = unwrap(model)
        mask = self.masks(batch, step)
        target = batch["hr_tokens"]
        out = model(batch["lr_tokens"], target, mask, return_embed=self.stage2)
        pred, emb = out if self.stage2 else (out, None)
        center = inner.center.center.clone()
        cc = centered_cosine(pred.float(), target.float(), center)
        # centered cosine fixes the direction only: the scale term keeps each predicted token's
        # distance to the centre at the true token's, so completed grids mix like with like
        sc = scale_loss(pred.float(), target.float(), center)
        loss = cc + float(self.cfg.get("scale_weight", 1.0)) * sc
        inner.center.update(target)
        logs = {"loss_cc": float(cc.detach()), "loss_scale": float(sc.detach()),
                "observed_frac": float(mask.float().mean())}
        logs.update(collapse_monitors(pred, center, target))
        return loss, logs, emb

    def loss(self, model, batch: dict, text: torch.Tensor | None, step: int):
        loss, logs, _ = self.stage1(model, batch, step)
        logs["loss"] = float(loss.detach())
        return loss, logs


class PredictorStage2Task(PredictorTask):
    """Stage II: stage I loss + SigLIP between the head's embedding of the completed grid
    (:meth:`Predictor.scene_embed`, the evaluation's scene embedding) and the centred text
    embeddings of the concepts (:func:`~gl10m.model.crossscale.scoring.center_text`), multi-label from
    `labels`; cfg `novel_concepts` are held out."""

    name = "predictor_stage2"
    stage2 = True
    config_keys = PredictorTask.config_keys + ("novel_concepts", "siglip_weight", "head_lr_mult")

    def lr_mult(self, name: str) -> float:
        """Learning-rate multiplier of a parameter: ``head_lr_mult`` (default 1) for the new SigLIP
        head, its scale and bias (trained from scratch while the predictor is fine-tuned), 1 else."""
        n = name.removeprefix("module.")
        head = n.startswith("predictor.head.") or n in ("predictor.log_scale", "predictor.bias")
        return float(self.cfg.get("head_lr_mult", 1.0)) if head else 1.0

    def loss(self, model, batch: dict, text: torch.Tensor | None, step: int):
        cfg = self.cfg
        if text is None:
            raise UserError("predictor_stage2 needs the concept text embeddings")
        cc, logs, emb = self.stage1(model, batch, step)
        labels = batch["labels"]
        n = text.shape[0]
        novel = {int(c) for c in cfg.get("novel_concepts") or []}
        bad = [c for c in novel if not 0 <= c < n]
        if bad:
            raise UserError(f"novel_concepts {sorted(bad)} out of range 0..{n - 1}")
        keep = torch.tensor([c for c in range(n) if c not in novel], device=text.device, dtype=torch.long)
        inner = unwrap(model).predictor
        # centred as the evaluation centres its scoring text (model/crossscale/scoring.py), over the base
        # concepts only: nothing about a novel concept, not even its text, enters stage II
        txt = center_text(text.to(emb.device)[keep])
        sl = siglip_loss(emb, txt, labels.to(emb.device)[:, keep],
                         inner.log_scale, inner.bias)
        w = float(cfg.get("siglip_weight", 1.0))
        loss = cc + w * sl
        logs.update({"loss_siglip": float(sl.detach()), "loss": float(loss.detach()),
                     "siglip_scale": float(inner.log_scale.detach().exp())})
        return loss, logs
