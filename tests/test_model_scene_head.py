"""The scene head fitted on the frozen stage II predictor's completions (model/crossscale/scene_head.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gl10m.errors import UserError
from gl10m.model.crossscale import scene_head as SH
from gl10m.model.crossscale.predictor import Predictor, SceneNorm
from gl10m.model.crossscale.scoring import center_text

D, E, C = 8, 16, 6


def _toy(seed: int, n: int):
    """Pooled vectors [n, 2D] whose concept c is present when dimension c is high."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * D, generator=g) * torch.linspace(0.2, 5.0, 2 * D)  # spreads differ, as tokens do
    y = (x[:, :C] > 0.8 * x[:, :C].std(0)).to(torch.uint8)
    return x, y


def _init(seed: int) -> dict:
    torch.manual_seed(seed)
    h = nn.Sequential(SceneNorm(2 * D), nn.Linear(2 * D, E))
    return {"head": h.state_dict(), "log_scale": torch.tensor(np.log(10.0)), "bias": torch.tensor(-10.0)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitting_reads_what_the_starting_head_does_not(seed):
    x, y = _toy(seed, 600)
    xt, yt = _toy(seed + 100, 300)
    text = torch.randn(C, E, generator=torch.Generator().manual_seed(seed))
    keep = torch.arange(C)
    init = _init(seed)
    start = nn.Sequential(SceneNorm(2 * D), nn.Linear(2 * D, E))
    start.load_state_dict(init["head"])
    start.eval()
    cfg = SH.head_config({"steps": 400, "batch_size": 64, "lr": 1e-2, "seed": seed})
    head, ls, b, log = SH.fit_head(x, y, text, keep, init, cfg)

    def auc(h):
        with torch.no_grad():
            s = nn.functional.normalize(h(xt), dim=-1) @ center_text(text).T
        out = []
        for c in range(C):
            pos, neg = s[yt[:, c] > 0, c], s[yt[:, c] == 0, c]
            out.append(float((pos[:, None] > neg[None, :]).float().mean()))
        return float(np.mean(out))

    assert log[-1]["loss"] < log[0]["loss"]
    assert auc(head) > 0.9 and auc(head) > auc(start) + 0.2


def test_novel_concepts_never_reach_the_head():
    """Novel concepts' labels and text are held out: changing them changes nothing."""
    x, y = _toy(3, 200)
    text = torch.randn(C, E, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([0, 1, 2, 4])  # 3 and 5 novel
    cfg = SH.head_config({"steps": 30, "batch_size": 16})
    h1, *_ = SH.fit_head(x, y, text, keep, _init(0), cfg)
    y2, t2 = y.clone(), text.clone()
    y2[:, [3, 5]] = 1 - y2[:, [3, 5]]
    t2[[3, 5]] = torch.randn(2, E)
    h2, *_ = SH.fit_head(x, y2, t2, keep, _init(0), cfg)
    for k, v in h1.state_dict().items():
        assert torch.equal(v, h2.state_dict()[k]), k
    # a base concept's labels do matter (the test can fail)
    y3 = y.clone()
    y3[:, 0] = 1 - y3[:, 0]
    h3, *_ = SH.fit_head(x, y3, text, keep, _init(0), cfg)
    assert not torch.equal(h1[1].weight, h3[1].weight)


def test_views_are_the_rows_inputs_and_are_seeded():
    torch.manual_seed(0)
    pred = Predictor(in_dim=D, g=2, lr_dim=D, dim=16, depth=1, heads=2, mlp_ratio=2.0, pool=1,
                     embed_dim=E).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"key": ["a", "b", "c"], "hr_tokens": torch.randn(3, 100, 2, 2, D, generator=g),
             "lr_tokens": torch.randn(3, 10, 10, D, generator=g), "labels": torch.zeros(3, C, dtype=torch.uint8)}
    centre = torch.randn(D, generator=g)
    cfg = SH.head_config({"views": {"full": 1, "lr_only": 1, "completed": 2, "observed": 1}, "obr": [0.1, 0.1]})
    x, y, counts = SH.pooled_views(pred, centre, [batch], cfg, torch.device("cpu"))
    assert counts == {"full": 3, "lr_only": 3, "completed": 6, "observed": 3} and x.shape == (15, 2 * D)
    tok = batch["hr_tokens"]
    per_tile = tok.mean((2, 3))
    assert torch.allclose(x[:3], torch.cat([per_tile.mean(1), per_tile.amax(1)], 1))  # full: the true grid
    m = SH._random_mask("a", 0, 1, 0.1, 0.1)
    assert int(m.sum()) == 10
    assert torch.allclose(x[12], torch.cat([per_tile[0, m].mean(0), per_tile[0, m].amax(0)]))  # observed only
    x2, _, _ = SH.pooled_views(pred, centre, [batch], cfg, torch.device("cpu"))
    assert torch.equal(x, x2)
    # the two completed views of a scene draw different tiles
    assert not torch.equal(SH._random_mask("a", 0, 0, 0.1, 0.3), SH._random_mask("a", 0, 2, 0.1, 0.3))


@pytest.mark.parametrize("cfg, msg", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"views": {"everything": 1}}, "views"),
    ({"views": {"full": 0}}, "every count is 0"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"obr": [0.5, 0.2]}, "obr"),
])
def test_bad_configs_are_one_line_errors(cfg, msg):
    with pytest.raises(UserError, match=msg):
        SH.head_config(cfg)
    with pytest.raises(UserError, match="not found"):
        SH.load_scene_head("/nonexistent/scene-head")
