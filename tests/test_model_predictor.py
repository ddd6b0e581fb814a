"""The predictor: rasterisation layout, mask token placement, shapes, masks, and that the tiny
predictor overfits a handful of samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gl10m.errors import UserError
from gl10m.model.crossscale.masks import draw_masks
from gl10m.model.crossscale.predictor import Predictor, rasterise, unrasterise
from gl10m.model.crossscale.tasks import PredictorTask
from gl10m.model.crossscale.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "model" / "configs"


def synthetic_samples(n: int, g: int = 2, d: int = 16, gl: int = 10, e: int = 8, seed: int = 0,
                      n_concepts: int = 66) -> list[dict]:
    """Feature-cache-shaped samples whose HR tokens are learnable from the LR tokens: each
    tile's HR tokens are the tile's base vector + a within-tile pattern; the LR tokens over the
    tile are that base vector + noise."""
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randn(g, g, d, generator=gen)
    out = []
    for _ in range(n):
        base = torch.randn(100, d, generator=gen)
        hr = base[:, None, None, :] + 0.5 * pattern
        k = gl // 10
        lr = base.view(10, 10, d).repeat_interleave(k, 0).repeat_interleave(k, 1)
        lr = lr + 0.1 * torch.randn(gl, gl, d, generator=gen)
        out.append({"lr_tokens": lr, "hr_tokens": hr,
                    "hr_embed": torch.randn(100, e, generator=gen),
                    "lr_embed": torch.randn(e, generator=gen),
                    "s_vis": torch.rand(100, generator=gen),
                    "labels": (torch.rand(n_concepts, generator=gen) < 0.2).to(torch.uint8),
                    "tile_frac": torch.rand(100, n_concepts, generator=gen)})
    return out


def tiny_cfg() -> dict:
    return yaml.safe_load((CONFIGS / "predictor-tiny.yaml").read_text())


def test_rasterise_places_tile_t_at_row_t_div_10_col_t_mod_10():
    b, g, c = 2, 3, 4
    tokens = torch.randn(b, 100, g, g, c)
    grid = rasterise(tokens)
    assert grid.shape == (b, 10 * g, 10 * g, c)
    for t in (0, 7, 10, 42, 99):
        r, col = t // 10, t % 10
        assert torch.equal(grid[:, r * g:(r + 1) * g, col * g:(col + 1) * g], tokens[:, t])
    # tile 1 is east of tile 0, tile 10 south (row 0 north)
    marker = torch.zeros(1, 100, g, g, 1)
    marker[0, 12] = 1.0
    rows, cols = torch.nonzero(rasterise(marker)[0, ..., 0], as_tuple=True)
    assert set(rows.tolist()) == set(range(g, 2 * g)) and set(cols.tolist()) == set(range(2 * g, 3 * g))
    assert torch.equal(unrasterise(grid), tokens)
    other = torch.randn(b, 10 * g, 10 * g, c)
    assert torch.equal(rasterise(unrasterise(other)), other)


def test_rasterise_fills_unobserved_tiles():
    tokens = torch.randn(2, 100, 2, 2, 3)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, [3, 50]] = True
    fill = torch.tensor([7.0, 8.0, 9.0])
    tiles = unrasterise(rasterise(tokens, mask, fill))
    assert torch.equal(tiles[0, 3], tokens[0, 3]) and torch.equal(tiles[0, 50], tokens[0, 50])
    unobs = ~mask
    assert torch.equal(tiles[unobs], fill.expand(int(unobs.sum()), 2, 2, 3))
    with pytest.raises(UserError):
        rasterise(torch.randn(2, 99, 2, 2, 3))


def test_mask_token_used_exactly_at_unobserved_tiles():
    torch.manual_seed(0)
    p = Predictor(in_dim=8, g=2, dim=16, depth=1, heads=2, pool=1)
    hr = torch.randn(3, 100, 2, 2, 8)
    mask = torch.rand(3, 100) < 0.3
    mask[2] = False  # zero observed tiles allowed
    tiles = unrasterise(p.embed(hr, mask))
    is_mask = (tiles == p.mask_token).all(-1).all(-1).all(-1)  # [3, 100]
    assert torch.equal(is_mask, ~mask)
    assert torch.allclose(tiles[mask], p.in_proj(hr)[mask])
    # unobserved tiles' input tokens are never read
    hr2 = hr.clone()
    hr2[~mask] = 1e6
    p.eval()
    with torch.no_grad():
        lr = torch.randn(3, 10, 10, 8)
        assert torch.allclose(p(lr, hr, mask), p(lr, hr2, mask))


@pytest.mark.parametrize("pool,gl,use_lr,ckpt", [(1, 10, True, False), (2, 20, True, True), (2, 10, False, False)])
def test_predictor_shapes_and_options(pool, gl, use_lr, ckpt):
    torch.manual_seed(0)
    p = Predictor(in_dim=8, g=2, lr_dim=6, lr_grid=gl, dim=16, depth=2, heads=2, pool=pool,
                  use_lr=use_lr, grad_checkpointing=ckpt, embed_dim=5)
    hr = torch.randn(2, 100, 2, 2, 8)
    lr = torch.randn(2, gl, gl, 6)
    mask = torch.rand(2, 100) < 0.2
    pred, emb = p(lr, hr, mask, return_embed=True)
    assert pred.shape == (2, 100, 2, 2, 8) and emb.shape == (2, 5)
    pred.square().mean().backward()
    assert p.mask_token.grad is not None and p.tile_pos.grad.abs().sum() > 0
    if use_lr:
        assert p.lr_proj.weight.grad.abs().sum() > 0
        # the LR context changes the prediction
        with torch.no_grad():
            assert not torch.allclose(p(lr, hr, mask), p(lr + 1.0, hr, mask))
    else:
        assert not hasattr(p, "lr_proj")
        with torch.no_grad():
            assert torch.allclose(p(None, hr, mask), p(lr, hr, mask))


def test_predictor_rejects_bad_dims():
    with pytest.raises(UserError):
        Predictor(in_dim=8, g=2, dim=16, heads=3)
    with pytest.raises(UserError):
        Predictor(in_dim=8, g=2, dim=16, heads=2, pool=3)  # 20 % 3
    # pool must divide the tokens per tile side: pool 4 on 2x2 tokens a tile would merge 2x2 tiles
    # into one latent (the old predictor-base.yaml on the shipped encoders: a 5x5 bottleneck)
    with pytest.raises(UserError, match=r"must divide the 2 tokens per tile side.*\[1, 2\]"):
        Predictor(in_dim=8, g=2, dim=16, heads=2, pool=4)
    Predictor(in_dim=8, g=4, dim=16, heads=2, pool=4)  # 4x4 tokens a tile: one latent a tile
    with pytest.raises(UserError):
        Predictor(in_dim=8, g=2, dim=16, heads=2, lr_grid=15)
    with pytest.raises(UserError):
        Predictor.from_config({"dim": 16, "heads": 2, "bogus": 1}, {"D": 8, "g": 2})


def test_shipped_predictor_configs_fit_the_shipped_encoders():
    """Every bundled predictor config builds on every bundled encoder's token grid (g = pool)."""
    import yaml

    from gl10m.model.encoders import load_config as enc_config
    from gl10m.model.crossscale.sampler import CONFIG_DIR
    gs = {enc_config(p)["encoder"].get("pool", 2) for p in CONFIG_DIR.glob("encoder-*.yaml")}
    for p in CONFIG_DIR.glob("predictor-*.yaml"):
        cfg = {k: v for k, v in yaml.safe_load(p.read_text()).items()}
        for g in gs:
            m = Predictor.from_config({**cfg, "dim": 16, "heads": 2, "depth": 1}, {"D": 8, "g": g, "Gl": 10})
            assert g % m.pool == 0, (p.name, g)


def test_draw_masks_fraction_and_sampler_mix():
    gen = torch.Generator().manual_seed(0)
    m = draw_masks(2000, gen, max_frac=0.3)
    counts = m.sum(1)
    assert counts.min() == 0 and counts.max() == 30
    assert abs(counts.float().mean().item() - 15.0) < 1.0
    # tiles are spread over the whole scene when random
    assert (m.float().mean(0) > 0).all()
    # deterministic given the generator
    assert torch.equal(m, draw_masks(2000, torch.Generator().manual_seed(0), max_frac=0.3))
    # with a scorer always used (mix = 1): the observed tiles are the top-scoring ones
    scores = torch.rand(50, 100, generator=gen)
    ms = draw_masks(50, gen, 0.3, scores=scores, mix=1.0)
    for i in range(50):
        k = int(ms[i].sum())
        if k:
            assert set(torch.nonzero(ms[i]).flatten().tolist()) == set(scores[i].topk(k).indices.tolist())
    # mix = 0: the scores are ignored (same masks as without them for the same generator state)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = draw_masks(50, g1, 0.3, scores=scores, mix=0.0)
    b = draw_masks(50, g2, 0.3)
    assert torch.equal(a.sum(1), b.sum(1))


def test_task_uses_the_sampler_scorer():
    calls = []

    def scorer(lr):
        calls.append(lr.shape)
        s = torch.zeros(lr.shape[0], 100)
        s[:, :30] = torch.arange(30, 0, -1).float()  # tiles 0..29 best, in order
        return s

    task = PredictorTask(scorer=scorer)
    task.build_model({"model": tiny_cfg(), "sampler_mix": 1.0, "max_observed_frac": 0.3},
                     {"D": 16, "g": 2, "Gl": 10, "D_lr": 16, "E": 8, "n_concepts": 66})
    batch = {k: torch.stack([s[k] for s in synthetic_samples(4)]) for k in ("lr_tokens", "hr_tokens")}
    m = task.masks(batch, step=3)
    assert calls and calls[0] == (4, 10, 10, 16)
    for row in m:
        k = int(row.sum())
        assert row[:k].all() and not row[k:].any()


def test_tiny_predictor_overfits_a_handful_of_samples(tmp_path):
    torch.manual_seed(0)
    cfg = {"task": "predictor", "model": {**tiny_cfg(), "pool": 1, "dim": 64}, "batch_size": 2, "steps": 200,
           "lr": 1e-2, "warmup_steps": 5, "weight_decay": 0.0, "ckpt_every": 1000, "progress": False}
    res = train(cfg, None, tmp_path / "run", dataset=synthetic_samples(2, g=1, d=8))
    losses = [json.loads(ln)["loss"] for ln in Path(res["metrics"]).read_text().splitlines()]
    assert len(losses) == 200
    first, last = sum(losses[:3]) / 3, sum(losses[-10:]) / 10
    assert last < first / 10, (first, last)


@pytest.mark.parametrize("scale_weight", [None, 0.0])
def test_predicted_tokens_sit_as_far_from_the_centre_as_true_ones(tmp_path, scale_weight):
    """Centered cosine alone leaves the norm free (scale_weight 0: the old loss); with the scale
    term (default) the predicted tokens of unobserved tiles are as far from the centre as the true
    ones, so a completed grid mixes observed and predicted tokens on one scale."""
    from gl10m.model.crossscale.losses import norm_ratio
    from gl10m.model.crossscale.masks import draw_masks

    torch.manual_seed(0)
    data = synthetic_samples(8, d=16, seed=1)
    for s in data:  # true tokens close together: a freshly built predictor's outputs are ~10x farther out
        s["hr_tokens"] = 0.05 * s["hr_tokens"] + 1.0
        s["lr_tokens"] = 0.05 * s["lr_tokens"] + 1.0
    cfg = {"task": "predictor", "model": tiny_cfg(), "batch_size": 4, "steps": 150, "lr": 3e-3,
           "warmup_steps": 5, "ckpt_every": 1000, "progress": False, "center_momentum": 0.5}
    if scale_weight is not None:
        cfg["scale_weight"] = scale_weight
    res = train(cfg, None, tmp_path / "run", dataset=data)
    model = res["model"].eval()
    batch = {k: torch.stack([s[k] for s in data]) for k in ("lr_tokens", "hr_tokens")}
    mask = draw_masks(8, torch.Generator().manual_seed(5), 0.3)
    with torch.no_grad():
        pred = model(batch["lr_tokens"], batch["hr_tokens"], mask)
    un = ~mask
    ratio = norm_ratio(pred[un], batch["hr_tokens"][un], model.center.center)
    if scale_weight is None:
        assert 0.8 < ratio < 1.25, ratio
    else:
        assert not 0.8 < ratio < 1.25, ratio   # the defect the scale term fixes


@pytest.mark.parametrize("seed", [0, 7, 123])
def test_full_share_observes_whole_scenes_on_top_of_the_drawn_masks(seed):
    dims = {"D": 16, "g": 2, "Gl": 10, "D_lr": 16, "E": 8, "n_concepts": 66}
    batch = {k: torch.stack([s[k] for s in synthetic_samples(64)]) for k in ("lr_tokens", "hr_tokens")}

    def masks(share):
        task = PredictorTask()
        task.build_model({"model": tiny_cfg(), "seed": seed, "max_observed_frac": 0.3, "full_share": share}, dims)
        return task.masks(batch, step=11)

    plain, some, every = masks(0.0), masks(0.3), masks(1.0)
    assert plain.sum(1).max() <= 30 and every.all()
    full = some.all(1)
    assert 5 <= int(full.sum()) <= 35                        # ~30 % of 64 scenes
    assert torch.equal(some[~full], plain[~full])            # the others keep the drawn masks
    with pytest.raises(UserError):
        masks(1.5)
