"""Losses of the predictor: centered cosine regression (JEPA-style, running-mean centre of the
targets), the SigLIP sigmoid loss against concept text embeddings, and collapse monitors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gl10m.errors import UserError

LOG_SCALE_INIT = math.log(10.0)  # SigLIP: t' = log 10
BIAS_INIT = -10.0                # SigLIP: b = -10
LOG_SCALE_MAX = math.log(100.0)  # scale = exp(log_scale) clamped to <= 100


def centered_cosine(pred: torch.Tensor, target: torch.Tensor, center: torch.Tensor,
                    eps: float = 1e-8) -> torch.Tensor:
    """mean(1 - cos(pred - c, target - c)) over every token; last dim is the feature dim.

    `center` ([D]) is treated as a constant (no gradient flows into it).
    """
    if pred.shape != target.shape:
        raise UserError(f"centered_cosine: pred {tuple(pred.shape)} != target {tuple(target.shape)}")
    if center.shape[-1] != pred.shape[-1]:
        raise UserError(f"centered_cosine: centre dim {center.shape[-1]} != feature dim {pred.shape[-1]}")
    c = center.detach().to(pred.dtype)
    cos = F.cosine_similarity(pred - c, target - c, dim=-1, eps=eps)
    return (1.0 - cos).mean()


def scale_loss(pred: torch.Tensor, target: torch.Tensor, center: torch.Tensor,
               eps: float = 1e-6) -> torch.Tensor:
    """Relative squared error of each token's distance to the centre:
    ``mean((|pred - c| - |target - c|)^2) / mean(|target - c|^2)`` (the denominator a constant).
    Centered cosine leaves the norm free; this term pins it to the true tokens'."""
    if pred.shape != target.shape:
        raise UserError(f"scale_loss: pred {tuple(pred.shape)} != target {tuple(target.shape)}")
    c = center.detach().to(pred.dtype)
    pn = (pred - c).norm(dim=-1)
    tn = (target - c).norm(dim=-1).detach()
    return ((pn - tn) ** 2).mean() / (tn.pow(2).mean() + eps)


@torch.no_grad()
def norm_ratio(pred: torch.Tensor, target: torch.Tensor, center: torch.Tensor) -> float:
    """mean |pred - c| / mean |target - c| (1 = predictions as far from the centre as the truth)."""
    c = center.detach().float()
    return float((pred.float() - c).norm(dim=-1).mean() / (target.float() - c).norm(dim=-1).mean().clamp(min=1e-12))


class RunningCenter(nn.Module):
    """Running mean of the *targets* (never of predictions): c <- m * c + (1 - m) * mean(batch).

    Starts at zero. Updated under no_grad and only in training mode (frozen in eval); under an
    initialised torch.distributed process group the batch mean is averaged over all ranks first.
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"RunningCenter momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def update(self, targets: torch.Tensor) -> None:
        if not self.training:
            return
        mean = targets.detach().float().reshape(-1, targets.shape[-1]).mean(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        self.center.mul_(self.momentum).add_(mean.to(self.center.dtype), alpha=1.0 - self.momentum)

    def forward(self) -> torch.Tensor:
        return self.center


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, targets: torch.Tensor,
                log_scale: torch.Tensor, bias: torch.Tensor, normalize: bool = True,
                balanced: bool = False) -> torch.Tensor:
    """SigLIP sigmoid loss with multi-label targets, mean over all (image, text) pairs.

    img [B, E], txt [C, E], targets [B, C] (1 = concept present). With x_i, y_j the (L2-normalised)
    embeddings, t = exp(log_scale) (clamped to <= 100) and z_ij = +1 for a positive pair, -1 else:
    loss = mean_ij -log sigmoid(z_ij * (t * x_i . y_j + b)).

    ``balanced``: the mean over the positive pairs plus the mean over the negative ones (each
    half weighted alike), for sparse multi-label targets (a tile holds ~2 of 56 concepts, ~3 % of
    the pairs). The bootstrap encoder offers it (``train.balanced``), off by default: on seed 2027
    it did not help.
    """
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise UserError(f"siglip_loss: img {tuple(img.shape)} and txt {tuple(txt.shape)} must be [B,E], [C,E]")
    if targets.shape != (img.shape[0], txt.shape[0]):
        raise UserError(f"siglip_loss: targets {tuple(targets.shape)} must be [{img.shape[0]}, {txt.shape[0]}]")
    x = img.float()
    y = txt.float()
    if normalize:
        x = F.normalize(x, dim=-1)
        y = F.normalize(y, dim=-1)
    t = log_scale.float().clamp(max=LOG_SCALE_MAX).exp()
    logits = t * (x @ y.t()) + bias.float()
    pos = targets > 0
    pair = -F.logsigmoid(torch.where(pos, logits, -logits))
    if not balanced:
        return pair.mean()
    n_pos = pos.sum()
    return (torch.where(pos, pair, 0.0).sum() / n_pos.clamp(min=1)
            + torch.where(pos, 0.0, pair).sum() / (pos.numel() - n_pos).clamp(min=1))


@torch.no_grad()
def collapse_monitors(pred: torch.Tensor, center: torch.Tensor,
                      target: torch.Tensor | None = None) -> dict[str, float]:
    """pred_std: mean over dims of the per-dimension std of predicted tokens (-> 0 on collapse);
    pred_cos_center: mean cosine of predicted tokens to the running mean (-> 1 on collapse);
    with ``target``, pred_norm_ratio: :func:`norm_ratio` (-> 1 when the scale is right)."""
    flat = pred.detach().float().reshape(-1, pred.shape[-1])
    std = flat.std(0, unbiased=False).mean() if flat.shape[0] > 1 else flat.new_zeros(())
    cos = F.cosine_similarity(flat, center.detach().float().expand_as(flat), dim=-1).mean()
    out = {"pred_std": float(std), "pred_cos_center": float(cos)}
    if target is not None:
        out["pred_norm_ratio"] = norm_ratio(pred.detach(), target, center)
    return out
