"""The cross-scale predictor: fills in the HR features of unobserved tiles from the observed HR
tiles and the LR context. Its training masks are :mod:`.masks`, the two training tasks built on it
("predictor", "predictor_stage2") :mod:`.tasks`.

Grid convention: a scene is 10 x 10 tiles, tile t = row * 10 + col, row 0 north. Each tile has
g x g HR tokens; on the HR token grid (10g x 10g) tile t occupies rows (t // 10) * g ... and
cols (t % 10) * g ....
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gl10m.errors import UserError
from gl10m.samples import GRID as N_SIDE
from gl10m.samples import N_TILES

from .losses import BIAS_INIT, LOG_SCALE_INIT
from .scoring import pool_scene



def rasterise(tokens: torch.Tensor, mask: torch.Tensor | None = None,
              fill: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 100, g, g, C] tile tokens -> [B, 10g, 10g, C] HR grid.

    With `mask` ([B, 100] bool, True = observed), unobserved tiles get `fill` ([C], broadcast;
    zeros when None).
    """
    if tokens.ndim != 5 or tokens.shape[1] != N_TILES or tokens.shape[2] != tokens.shape[3]:
        raise UserError(f"rasterise: expected tokens [B, 100, g, g, C], got {tuple(tokens.shape)}")
    b, _, g, _, c = tokens.shape
    if mask is not None:
        if mask.shape != (b, N_TILES):
            raise UserError(f"rasterise: mask must be [{b}, 100], got {tuple(mask.shape)}")
        m = mask.to(torch.bool).view(b, N_TILES, 1, 1, 1)
        f = tokens.new_zeros(c) if fill is None else fill.to(tokens.dtype)
        tokens = torch.where(m, tokens, f.view(1, 1, 1, 1, c))
    grid = tokens.view(b, N_SIDE, N_SIDE, g, g, c).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, N_SIDE * g, N_SIDE * g, c)


def unrasterise(grid: torch.Tensor) -> torch.Tensor:
    """[B, 10g, 10g, C] HR grid -> [B, 100, g, g, C] tile tokens (inverse of `rasterise`)."""
    if grid.ndim != 4 or grid.shape[1] != grid.shape[2] or grid.shape[1] % N_SIDE:
        raise UserError(f"unrasterise: expected grid [B, 10g, 10g, C], got {tuple(grid.shape)}")
    b, h, _, c = grid.shape
    g = h // N_SIDE
    t = grid.reshape(b, N_SIDE, g, N_SIDE, g, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, N_TILES, g, g, c)


def complete(observed: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The completed grid [B, 100, g, g, D]: observed tiles keep their own tokens, the others
    take the prediction."""
    m = mask.to(torch.bool).view(mask.shape[0], N_TILES, 1, 1, 1).to(pred.device)
    return torch.where(m, observed.to(pred.dtype), pred)


class SceneNorm(nn.BatchNorm1d):
    """Per-dimension standardisation of the pooled scene token (batch statistics in training,
    running ones in evaluation). The encoder's token dimensions differ ~60x in spread, and a
    per-sample LayerNorm leaves the head to learn that scale: on seed 2027's cache (train -> val,
    600 head steps) SigLIP reads mAP@100 0.23 from standardised pooled HR tokens against 0.10-0.15
    through a LayerNorm. A batch of one (an epoch's last) uses the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _Block(nn.Module):
    """Pre-norm: self-attention over HR tokens, cross-attention to LR tokens, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross: bool):
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.cross = cross
        if cross:
            self.n2 = nn.LayerNorm(dim)
            self.n2kv = nn.LayerNorm(dim)
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
            self.cproj = nn.Linear(dim, dim)
        self.n3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, dh = x.shape
        return x.transpose(1, 2).reshape(b, n, h * dh)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        x = x + self.proj(self._merge(a))
        if self.cross and ctx is not None:
            q = self.q(self.n2(x))
            k, v = self.kv(self.n2kv(ctx)).chunk(2, dim=-1)
            a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
            x = x + self.cproj(self._merge(a))
        return x + self.mlp(self.n3(x))


class Predictor(nn.Module):
    """Predicts the HR tokens of all 100 tiles: forward(lr_tokens [B, Gl, Gl, D_lr],
    hr_tokens [B, 100, g, g, D], mask [B, 100] bool) -> [B, 100, g, g, D].

    Only the observed tiles' hr_tokens are read (unobserved ones may hold anything).
    """

    def __init__(self, *, in_dim: int, g: int, lr_dim: int | None = None, lr_grid: int = N_SIDE,
                 dim: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0,
                 pool: int = 1, use_lr: bool = True, grad_checkpointing: bool = False,
                 embed_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise UserError(f"predictor dim {dim} is not a multiple of heads {heads}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or g % pool:
            ok = [p for p in range(1, g + 1) if g % p == 0]
            raise UserError(f"predictor pool {pool!r} must divide the {g} tokens per tile side (each latent "
                            f"inside one tile, >= 1 latent per tile): one of {ok}")
        if use_lr and lr_grid % N_SIDE:
            raise UserError(f"LR token grid {lr_grid} is not a multiple of 10 (tile-aligned)")
        self.g, self.in_dim, self.dim, self.pool = g, in_dim, dim, pool
        self.use_lr, self.grad_checkpointing = use_lr, grad_checkpointing
        self.lr_grid = lr_grid
        self.in_proj = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.tile_pos = nn.Parameter(torch.zeros(N_TILES, dim))   # which tile
        self.hr_pos = nn.Parameter(torch.zeros(g * g, dim))       # where within the tile
        if use_lr:
            lg = lr_grid // N_SIDE
            self.lr_proj = nn.Linear(lr_dim or in_dim, dim)
            self.lr_tile_pos = nn.Parameter(torch.zeros(N_TILES, dim))
            self.lr_in_pos = nn.Parameter(torch.zeros(lg * lg, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, use_lr) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, in_dim)
        if embed_dim is not None:  # stage II head: pooled prediction (mean and max, 2 x in_dim) -> text space
            self.head = nn.Sequential(SceneNorm(2 * in_dim), nn.Linear(2 * in_dim, embed_dim))
            self.log_scale = nn.Parameter(torch.tensor(LOG_SCALE_INIT))
            self.bias = nn.Parameter(torch.tensor(BIAS_INIT))
        for p in (self.mask_token, self.tile_pos, self.hr_pos):
            nn.init.trunc_normal_(p, std=0.02)
        if use_lr:
            nn.init.trunc_normal_(self.lr_tile_pos, std=0.02)
            nn.init.trunc_normal_(self.lr_in_pos, std=0.02)

    @classmethod
    def from_config(cls, cfg: dict, dims: dict, embed_dim: int | None = None) -> "Predictor":
        known = {"dim", "depth", "heads", "mlp_ratio", "pool", "use_lr", "grad_checkpointing"}
        unknown = set(cfg) - known - {"name"}
        if unknown:
            raise UserError(f"unknown predictor config keys: {sorted(unknown)}")
        return cls(in_dim=dims["D"], g=dims["g"], lr_dim=dims.get("D_lr", dims["D"]),
                   lr_grid=dims.get("Gl", N_SIDE), embed_dim=embed_dim,
                   **{k: cfg[k] for k in known if k in cfg})

    def positions(self) -> torch.Tensor:
        """[10g, 10g, dim]: tile-level + within-tile positional embedding on the HR grid."""
        g = self.g
        pos = self.tile_pos.view(N_TILES, 1, 1, -1) + self.hr_pos.view(1, g, g, -1)
        return rasterise(pos.unsqueeze(0))[0]

    def embed(self, hr_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Observed tiles' projected tokens, the mask token elsewhere: [B, 10g, 10g, dim]."""
        return rasterise(self.in_proj(hr_tokens), mask, fill=self.mask_token)

    def lr_context(self, lr_tokens: torch.Tensor) -> torch.Tensor:
        b, gl, gl2, _ = lr_tokens.shape
        if gl != self.lr_grid or gl2 != self.lr_grid:
            raise UserError(f"LR tokens {gl}x{gl2}, predictor built for {self.lr_grid}x{self.lr_grid}")
        lg = gl // N_SIDE
        pos = self.lr_tile_pos.view(N_TILES, 1, 1, -1) + self.lr_in_pos.view(1, lg, lg, -1)
        pos = rasterise(pos.unsqueeze(0))[0]  # same tile layout on the LR grid
        return (self.lr_proj(lr_tokens) + pos).reshape(b, gl * gl, self.dim)

    def forward(self, lr_tokens: torch.Tensor | None, hr_tokens: torch.Tensor, mask: torch.Tensor,
                return_embed: bool = False):
        b = hr_tokens.shape[0]
        if hr_tokens.shape[1:4] != (N_TILES, self.g, self.g):
            raise UserError(f"hr_tokens {tuple(hr_tokens.shape)}: expected [B, 100, {self.g}, {self.g}, D]")
        x = self.embed(hr_tokens, mask) + self.positions()           # [B, H, H, dim]
        h = x.shape[1]
        skip = x
        if self.pool > 1:
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), self.pool).permute(0, 2, 3, 1)
        hp = x.shape[1]
        x = x.reshape(b, hp * hp, self.dim)
        ctx = self.lr_context(lr_tokens) if self.use_lr else None
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, ctx, use_reentrant=False)
            else:
                x = blk(x, ctx)
        x = x.view(b, hp, hp, self.dim)
        if self.pool > 1:
            x = x.repeat_interleave(self.pool, dim=1).repeat_interleave(self.pool, dim=2)
        x = self.out_proj(self.norm(x + skip))  # final norm, back to the feature dim
        assert x.shape[1] == h
        pred = unrasterise(x)
        if return_embed:
            return pred, self.scene_embed(complete(hr_tokens, pred, mask))
        return pred

    def scene_embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                    fallback: torch.Tensor | None = None) -> torch.Tensor:
        """Stage II head of a completed token grid [B, 100, g, g, D] -> [B, E] (not normalised):
        ``head(pool_scene(tokens, mask))`` (:mod:`gl10m.model.crossscale.scoring`), the same function in
        training and in every evaluation row."""
        if not hasattr(self, "head"):
            raise UserError("this predictor has no stage II head (built without embed_dim)")
        return self.head(pool_scene(tokens, mask, fallback).to(self.head[-1].weight.dtype))


def load_predictor(path: str | Path, map_location="cpu") -> tuple[Predictor, dict]:
    """A trained predictor (eval mode) from a trainer checkpoint of task ``predictor`` or
    ``predictor_stage2`` ({"model", "config", "dims"}), loaded with ``weights_only=True`` ->
    (predictor, {"task", "config", "dims", "step", "center"}); ``center`` [D] is the running mean
    of the true tokens it was trained against."""
    from .checkpoint import load_weights, read_checkpoint
    from .tasks import PredictorStage2Task, PredictorTask

    st = read_checkpoint(path, "predictor", map_location)
    cfg = st["config"] or {}
    task = {"predictor": PredictorTask, "predictor_stage2": PredictorStage2Task}.get(cfg.get("task"))
    if task is None:
        raise UserError(f"checkpoint {path} is for task {cfg.get('task')!r}, not a predictor")
    cfg = {k: v for k, v in cfg.items() if k != "sampler_checkpoint"}  # training masks only
    model = load_weights(task().build_model(cfg, st["dims"]), st, "predictor", path)
    return model.predictor, {"task": cfg.get("task"), "config": cfg, "dims": st["dims"], "step": st.get("step"),
                             "center": model.center.center.detach().float().clone()}
