"""Training masks for the predictor: which HR tiles of a scene count as observed (see
:mod:`.predictor` for the grid convention)."""
from __future__ import annotations

import torch

from gl10m.errors import UserError

from .predictor import N_TILES


def draw_masks(batch_size: int, generator: torch.Generator, max_frac: float = 0.3,
               scores: torch.Tensor | None = None, mix: float = 0.5) -> torch.Tensor:
    """Training masks [B, 100] bool (True = observed HR tile).

    Per scene the number of observed tiles is uniform in {0, ..., round(max_frac * 100)} (zero
    allowed). Tiles are chosen at random; when `scores` ([B, 100], e.g. a sampler's utility map)
    is given, each scene takes the top-scoring tiles with probability `mix`, random ones otherwise.
    """
    kmax = int(round(max_frac * N_TILES))
    if not 0 <= kmax <= N_TILES:
        raise UserError(f"max observed fraction must be in [0, 1], got {max_frac}")
    counts = torch.randint(0, kmax + 1, (batch_size,), generator=generator)
    rank = torch.rand(batch_size, N_TILES, generator=generator)
    if scores is not None:
        use = torch.rand(batch_size, generator=generator) < mix
        s = scores.detach().float().cpu()
        # Order by score (descending) where the sampler is used: negate so argsort ascends.
        rank = torch.where(use[:, None], -s, rank)
    order = rank.argsort(dim=1)
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(N_TILES).expand(batch_size, N_TILES).contiguous())
    return pos < counts[:, None]
