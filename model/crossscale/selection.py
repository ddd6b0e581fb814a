"""The one tile-selection rule of the model: sampler training metrics, evaluation rows, the
threshold sweep and :func:`gl10m.model.crossscale.sampler.select` all go through :func:`select`.

Scores. The sampler outputs one logit per tile; its **normalised score** is the sigmoid of that
logit, ``p = sigmoid(logit)`` in (0, 1). Why this and not a per-scene min-max: the sampler is
trained with BCE against G*, which is already min-max normalised over the 100 tiles of each scene
(:mod:`gl10m.model.crossscale.supervision`), so ``p`` estimates G* on its own [0, 1] scale, identically in
training and evaluation. A per-scene min-max on top would force the best tile of *every* scene to
1.0 (threshold 1.0 would still request one tile per scene, and a scene the sampler finds
uninformative would still get tiles), and it amplifies noise in flat scenes. Scores are computed
in float64, so ``p`` is 1.0 only for logits above ~37.

Rule. A tile is a threshold candidate when ``p > threshold`` (strict): threshold 1.0 selects
nothing (the paper: 1.0 = no HR at all), threshold 0.0 every tile (unless a logit is below ~-745).
Two optional caps then keep the best candidates (higher logit first, ties to the lower tile
index): ``top_k`` tiles per scene, and per-class ``budgets`` (``{class: tiles}``; a scene's
budget is the largest budget among its concepts, ``labels > 0``, else ``default_budget``). With
the threshold left out (None) every tile is a candidate.

Shared threshold at a target cost. :func:`calibrate_threshold` finds the one threshold whose OBR
(selected tiles / 100, averaged over scenes) on a calibration split -- the val split, never the
split that is reported -- is closest to a target OBR; the evaluation then applies that threshold
unchanged to every scene of the reported split.
"""
from __future__ import annotations

import numpy as np
import torch

from gl10m.errors import UserError
from gl10m.samples import N_TILES

RULE = "p = sigmoid(sampler logit); a tile is selected when p > threshold (strict: 1.0 selects nothing)"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_threshold(threshold) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0.0 <= threshold <= 1.0:
        raise UserError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")


def check_scores(scores, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] != N_TILES:
        shape = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise UserError(f"{name}: expected a tensor [B, {N_TILES}], got {shape}")
    if not scores.is_floating_point() or not bool(torch.isfinite(scores).all()):
        raise UserError(f"{name}: expected finite floating-point scores")


def tile_scores(logits: torch.Tensor) -> torch.Tensor:
    """The normalised scores the threshold is applied to: sigmoid of the sampler's logits
    [B, 100], float64."""
    check_scores(logits, "logits")
    return torch.sigmoid(logits.detach().double())


def scene_budgets(labels: torch.Tensor, budgets: dict, *, default_budget: int = 0) -> torch.Tensor:
    """[B] tile budget per scene: the max budget over the scene's concepts (labels > 0)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise UserError("budgets need labels: a tensor [B, n_concepts] of known or predicted concepts")
    n = labels.shape[1]
    if not isinstance(budgets, dict):
        raise UserError(f"budgets: expected a mapping class index -> tile count, got {type(budgets).__name__}")
    per_class = torch.full((n,), -1, dtype=torch.long)
    for k, v in budgets.items():
        if not (_is_int(k) and 0 <= k < n):
            raise UserError(f"budgets: class {k!r} is not an index in [0, {n})")
        if not (_is_int(v) and 0 <= v <= N_TILES):
            raise UserError(f"budgets: class {k} budget must be an int in [0, 100], got {v!r}")
        per_class[k] = v
    if not (_is_int(default_budget) and 0 <= default_budget <= N_TILES):
        raise UserError(f"default_budget must be an int in [0, 100], got {default_budget!r}")
    present = labels.detach().cpu() > 0
    best = per_class[None, :].expand(labels.shape[0], -1).masked_fill(~present, -1).amax(dim=1)
    return torch.where(best < 0, torch.full_like(best, default_budget), best)


def rank(scores: torch.Tensor) -> torch.Tensor:
    """[B, 100] rank of each tile (0 = best): descending score, ties -> lower index first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 100] bool: the k highest values of each row (ties to the lower index); any scale."""
    check_scores(values, "values")
    if not (_is_int(k) and 0 <= k <= N_TILES):
        raise UserError(f"top_k must be an int in [0, 100], got {k!r}")
    return rank(values.float()) < k


def select(logits: torch.Tensor, *, threshold: float | None = 0.55, top_k: int | None = None,
           budgets: dict | None = None, labels: torch.Tensor | None = None,
           default_budget: int = 0) -> torch.Tensor:
    """Bool mask [B, 100] of the tiles to request from the sampler's raw ``logits`` (see the
    module docstring for the rule)."""
    check_scores(logits, "logits")
    check_threshold(threshold)
    if threshold is None and top_k is None and budgets is None:
        raise UserError("select: give a threshold, a top_k or budgets")
    b = logits.shape[0]
    mask = torch.ones_like(logits, dtype=torch.bool)
    if threshold is not None:
        mask = tile_scores(logits) > float(threshold)
    cap = None
    if top_k is not None:
        if not (_is_int(top_k) and 0 <= top_k <= N_TILES):
            raise UserError(f"top_k must be an int in [0, 100], got {top_k!r}")
        cap = torch.full((b,), top_k, dtype=torch.long)
    if budgets is not None:
        if labels is None or labels.shape[0] != b:
            raise UserError("budgets need labels [B, n_concepts] with the same B as scores")
        per_scene = scene_budgets(labels, budgets, default_budget=default_budget)
        cap = per_scene if cap is None else torch.minimum(cap, per_scene)
    if cap is not None:
        # Non-candidates rank after every candidate (logits are finite).
        ranks = rank(logits.detach().float().masked_fill(~mask, float("-inf")))
        mask = mask & (ranks < cap.to(logits.device)[:, None])
    return mask


def obr(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Observation budget ratio: ([B] selected tiles / 100, its mean over the batch)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2 \
            or mask.shape[1] != N_TILES:
        raise UserError(f"obr: expected a bool mask [B, {N_TILES}]")
    per = mask.sum(dim=1).float() / N_TILES
    return per, float(per.mean()) if per.numel() else float("nan")


def calibrate_threshold(logits: torch.Tensor, target_obr: float) -> tuple[float, float]:
    """The shared threshold whose OBR on these scenes (``logits`` [N, 100] of the calibration
    split) is closest to ``target_obr`` -> (threshold, the OBR it gives there).

    Thresholds between two neighbouring distinct scores give the same selection; the midpoint is
    returned (1.0 when selecting nothing is closest), so the rule generalises without sitting on
    a score of the calibration split."""
    check_scores(logits, "logits")
    if isinstance(target_obr, bool) or not isinstance(target_obr, (int, float)) \
            or not 0.0 <= float(target_obr) <= 1.0:
        raise UserError(f"target OBR must be a number in [0, 1], got {target_obr!r}")
    if logits.shape[0] == 0:
        raise UserError("calibrate_threshold: no scenes to calibrate on")
    p = tile_scores(logits).cpu().numpy().ravel()
    n = p.size
    want = float(target_obr) * n
    u, cnt = np.unique(p, return_counts=True)
    u, cnt = u[::-1], cnt[::-1]                         # distinct scores, descending
    ge = np.cumsum(cnt)                                 # ge[j] = #(p >= u[j])
    # candidate selections: nothing (t = 1.0), or everything >= u[j] (t between u[j] and u[j+1])
    counts = np.concatenate([[0], ge])
    j = int(np.argmin(np.abs(counts - want)))          # first (smallest count) on a tie
    if j == 0:
        return 1.0, 0.0
    j -= 1
    lower = u[j + 1] if j + 1 < len(u) else 0.0
    t = float((u[j] + lower) / 2)
    return t, float((p > t).sum() / n)


__all__ = ["N_TILES", "RULE", "calibrate_threshold", "check_scores", "check_threshold", "obr", "rank",
           "scene_budgets", "select", "tile_scores", "top_k_mask"]
