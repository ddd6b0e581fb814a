"""The one scene-level space every evaluation row is scored in.

A row produces a **completed 10 x 10 token grid** ``tokens`` [B, 100, g, g, D] (observed tiles
keep their own encoder tokens; unobserved ones come from a predictor, from LR filling, ...) and,
for rows that only look at some tiles, a ``mask`` [B, 100] of the tiles that hold information.
Its scene embedding is always

    embed(tokens, mask) = normalise(head(pool_scene(tokens, mask)))

- :func:`pool_scene`: the mean token of the scene over the masked tiles (all tiles when no mask;
  a scene without any masked tile gets ``fallback``, the target centre = the mean true token,
  i.e. "nothing observed");
- ``head``: the stage II predictor's head (trained with SigLIP on exactly this pooling of the
  completed grid, :meth:`gl10m.model.predictor.Predictor.forward`) when there is a stage II
  model; otherwise the encoder's own HR head (:meth:`TileEncoder.embed_mean`), consistently for
  every row.

Concept scores are cosines between the scene embedding and the **centred** concept text
embeddings (:func:`center_text`): the text embeddings of the 66 concepts are nearly collinear
(mean pairwise cosine ~0.9), so raw cosines mostly measure a scene's alignment with their common
direction, the same for every concept. Subtracting the mean over the concept set and
renormalising removes it; it is done once, identically for every row, and stage II trains its
SigLIP loss against the same centred text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gl10m.errors import UserError

N_TILES = 100


def center_text(text: torch.Tensor) -> torch.Tensor:
    """[C, E] concept text embeddings -> the same, minus their mean over the C concepts,
    L2-normalised (unchanged when C < 2: nothing to centre over)."""
    if not isinstance(text, torch.Tensor) or text.dim() != 2:
        raise UserError(f"text embeddings: expected [C, E], got {tuple(getattr(text, 'shape', ()))}")
    t = F.normalize(text.float(), dim=-1)
    if t.shape[0] < 2:
        return t
    return F.normalize(t - t.mean(0, keepdim=True), dim=-1)


def pool_scene(tokens: torch.Tensor, mask: torch.Tensor | None = None,
               fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Tile tokens [B, 100, g, g, D] -> the scene's mean token [B, D], over the ``mask``'s tiles
    when given (a scene with none takes ``fallback`` [D], zeros when None)."""
    if tokens.dim() != 5 or tokens.shape[1] != N_TILES:
        raise UserError(f"pool_scene: expected tokens [B, 100, g, g, D], got {tuple(tokens.shape)}")
    per_tile = tokens.float().mean(dim=(2, 3))                          # [B, 100, D]
    if mask is None:
        return per_tile.mean(1)
    m = mask.to(per_tile.device, torch.float32)[..., None]
    n = m.sum(1)
    mean = (per_tile * m).sum(1) / n.clamp(min=1)
    fb = per_tile.new_zeros(per_tile.shape[-1]) if fallback is None else fallback.to(per_tile)
    return torch.where(n > 0, mean, fb.expand_as(mean))


@dataclass
class SceneSpace:
    """``head``: [B, D] -> [B, E]; ``text``: [C, E] raw concept embeddings; ``centre``: [D] the
    mean true token (fallback of an empty mask); ``name``: which head (for the report)."""

    head: Callable[[torch.Tensor], torch.Tensor]
    text: torch.Tensor
    centre: torch.Tensor
    name: str

    def __post_init__(self):
        self.text_c = center_text(self.text)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Completed grid (and optional mask of informative tiles) -> scene embedding [B, E]."""
        s = pool_scene(tokens, mask, self.centre)
        return F.normalize(self.head(s).float(), dim=-1)

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """Scene embeddings [B, E] -> concept scores [B, C] (cosine with the centred text)."""
        return emb.float() @ self.text_c.to(emb.device).T


__all__ = ["SceneSpace", "center_text", "pool_scene"]
