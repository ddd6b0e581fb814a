"""Does the predictor use the LR image? A check on the completions themselves, beside the rows.

The rows judge the completed grid through the scene space (mAP). This module looks one step
earlier: how close the predicted tokens of the **unobserved** tiles are to the true tokens of
those tiles (all 100 are encoded for the ``full_hr`` row), under three inputs, with the default's
tiles observed:

- ``own_lr``: the headline predictor with the scene's own LR tokens (what the default row runs);
- ``other_lr``: the same predictor with another scene's LR tokens (the next scene of the batch):
  if this is as good as ``own_lr``, the predictor ignores LR;
- ``no_lr``: the predictor trained without LR context (when the model has one): if this is as
  good as ``own_lr``, LR adds nothing the observed tiles do not already give.

The measure is the centred cosine of each unobserved tile's mean token with the true one (the
centre is the scene space's, the mean true token), averaged over every unobserved tile of the
split: 1 is a perfect completion, 0 no better than predicting the centre.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("own_lr", "other_lr", "no_lr")


def tile_cosines(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Centred cosine of the unobserved tiles' mean tokens: pred/true [B, 100, g, g, D], mask [B, 100]
    (True = observed), centre [D] -> [n unobserved tiles]."""
    if pred.shape != true.shape or pred.shape[:2] != mask.shape:
        raise ValueError(f"shapes differ: pred {tuple(pred.shape)}, true {tuple(true.shape)}, mask {tuple(mask.shape)}")
    c = centre.to(pred.device, torch.float32)
    p = pred.float().mean((2, 3)) - c
    t = true.float().mean((2, 3)) - c
    return F.cosine_similarity(p, t, dim=-1)[~mask.to(pred.device)]


class CompletionCheck:
    """Accumulates :func:`tile_cosines` over batches for the three inputs; :meth:`result` -> dict."""

    def __init__(self, centre: torch.Tensor):
        self.centre = centre
        self.sums = {k: 0.0 for k in KINDS}
        self.counts = {k: 0 for k in KINDS}

    def _add(self, kind: str, pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> None:
        cos = tile_cosines(pred, true, mask, self.centre)
        self.sums[kind] += float(cos.sum())
        self.counts[kind] += int(cos.numel())

    def add(self, predictor, nolr, lr_tokens: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> None:
        """One batch: ``true`` [B, 100, g, g, D] all tiles' tokens, ``mask`` [B, 100] the observed
        tiles; ``predictor`` the headline predictor (with LR), ``nolr`` the no-LR one or None."""
        m = mask.to(true.device)
        observed = true * m[:, :, None, None, None]
        if predictor.use_lr:
            self._add("own_lr", predictor(lr_tokens, observed, m), true, m)
            if lr_tokens.shape[0] > 1:
                self._add("other_lr", predictor(lr_tokens.roll(1, dims=0), observed, m), true, m)
        if nolr is not None:
            self._add("no_lr", nolr(None, observed, m), true, m)

    def result(self) -> dict:
        out = {k: (self.sums[k] / self.counts[k] if self.counts[k] else None) for k in KINDS}
        out["tiles"] = max(self.counts.values())
        return out


__all__ = ["CompletionCheck", "KINDS", "tile_cosines"]
