"""The one scene-level space every evaluation row is scored in.

A row produces a **completed 10 x 10 token grid** ``tokens`` [B, 100, g, g, D] (observed tiles
keep their own encoder tokens; unobserved ones come from a predictor, from LR filling, ...) and,
for rows that only look at some tiles, a ``mask`` [B, 100] of the tiles that hold information.
Its scene embedding is always

    embed(tokens, mask) = normalise(head(pool_scene(tokens, mask)))

- :func:`pool_scene`: the **mean and the max** over the masked tiles (all tiles when no mask) of
  the tiles' mean tokens, concatenated, [B, 2D]; a scene without any masked tile gets
  ``fallback`` in both halves (the target centre = the mean true token, i.e. "nothing
  observed"). The max half is there because a mean over 100 tiles dilutes what only one tile
  shows (a pool, a helipad, a court: the concepts HR exists for) a hundredfold: on the
  bootstrap encoder's cache of a 3,400-scene world (seed 2027, train -> val, base concepts) a
  linear probe reads mAP@100 0.13 from the mean of the true HR tokens, 0.30 from their max,
  0.33 from both, against 0.18 from the LR tokens' mean;
- ``head``: the stage II predictor's head (LayerNorm + linear, trained with SigLIP on exactly
  this pooling of the completed grid, :meth:`gl10m.model.crossscale.predictor.Predictor.forward`) when
  there is a stage II model; otherwise the encoder's own HR head
  (:meth:`TileEncoder.embed_mean`) of the mean half (:func:`mean_half`), consistently for every
  row.

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
from gl10m.samples import N_TILES



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
    """Tile tokens [B, 100, g, g, D] -> the scene's pooled token [B, 2D]: the mean and the max
    over the ``mask``'s tiles (all tiles when None) of each tile's mean token, concatenated (a
    scene with no masked tile takes ``fallback`` [D] in both halves, zeros when None)."""
    if tokens.dim() != 5 or tokens.shape[1] != N_TILES:
        raise UserError(f"pool_scene: expected tokens [B, 100, g, g, D], got {tuple(tokens.shape)}")
    per_tile = tokens.float().mean(dim=(2, 3))                          # [B, 100, D]
    if mask is None:
        return torch.cat([per_tile.mean(1), per_tile.amax(1)], dim=-1)
    m = mask.to(per_tile.device, torch.bool)[..., None]
    n = m.sum(1)
    mean = torch.where(m, per_tile, 0.0).sum(1) / n.clamp(min=1)
    top = torch.where(m, per_tile, float("-inf")).amax(1)
    fb = per_tile.new_zeros(per_tile.shape[-1]) if fallback is None else fallback.to(per_tile)
    fb = fb.expand_as(mean)
    return torch.cat([torch.where(n > 0, mean, fb), torch.where(n > 0, top, fb)], dim=-1)


def mean_half(pooled: torch.Tensor) -> torch.Tensor:
    """The mean half [..., D] of :func:`pool_scene`'s [..., 2D] (for a head that takes one token)."""
    return pooled[..., : pooled.shape[-1] // 2]


@dataclass
class SceneSpace:
    """``head``: [B, 2D] (:func:`pool_scene`) -> [B, E]; ``text``: [C, E] raw concept embeddings; ``centre``: [D] the
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


__all__ = ["SceneSpace", "center_text", "mean_half", "pool_scene"]
