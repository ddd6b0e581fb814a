"""The LR-only sampler: shapes and tile order, BCE, selection rules, OBR, the task, overfitting."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from gl10m.errors import UserError
from gl10m.model.crossscale.sampler import (CONFIG_DIR, TASKS, Sampler, SamplerTask, build_sampler,
                                 load_model_config, load_sampler, obr,
                                 precision_at_k, rank, resolve_config, sampler_loss,
                                 scene_budgets, select)
from gl10m.model.crossscale.supervision import g_star

torch.set_num_threads(1)


def fake_batch(b=4, gl=10, d=6, e=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(c, e, generator=g), dim=-1)
    labels = (torch.rand(b, c, generator=g) > 0.5).to(torch.uint8)
    labels[:, 0] = 1  # every scene has a concept, so G* is informative
    batch = {
        "lr_tokens": torch.randn(b, gl, gl, d, generator=g),
        "hr_tokens": torch.randn(b, 100, 2, 2, d, generator=g),
        "hr_embed": torch.randn(b, 100, e, generator=g),
        "lr_embed": torch.randn(b, e, generator=g),
        "s_vis": torch.rand(b, 100, generator=g),
        "labels": labels,
        "tile_frac": torch.rand(b, 100, c, generator=g),
    }
    return batch, text


# -- config and model -------------------------------------------------------------------------
def _train_config(name):
    """A bundled training config with its model file read, as the trainer hands it over."""
    cfg = yaml.safe_load((CONFIG_DIR / name).read_text())
    cfg["model"] = load_model_config(cfg["model"])
    return cfg


def test_bundled_configs_load_and_validate():
    tiny, base = load_model_config("tiny"), load_model_config("base")
    assert set(tiny) == set(base) == {"hidden", "kernel", "layers"}
    assert tiny["hidden"] < base["hidden"]
    assert load_model_config("sampler-tiny.yaml") == tiny
    for name, model in (("sampler-train-tiny.yaml", tiny), ("sampler-train.yaml", base)):
        cfg = _train_config(name)
        assert cfg["task"] == "sampler"
        assert set(SamplerTask.config_keys) <= set(cfg)
        r = resolve_config(cfg)
        assert r["model"] == model
        assert r["selection"] == {"threshold": 0.55, "top_k": 12}
        assert r["supervision"] == {"variant": "multiplicative", "lam": 0.5, "novel_concepts": None}
    assert resolve_config({"model": "tiny"})["model"] == tiny  # a name is read too
    with pytest.raises(UserError, match="unknown key"):
        resolve_config({"model": {"hiden": 8}})
    with pytest.raises(UserError, match="kernel"):
        resolve_config({"model": {"kernel": 2}})
    with pytest.raises(UserError, match="variant"):
        resolve_config({"supervision": {"variant": "nope"}})
    with pytest.raises(UserError, match="threshold"):
        resolve_config({"selection": {"threshold": 1.5}})
    with pytest.raises(UserError, match="not found"):
        load_model_config("missing")


def test_output_shape_and_input_checks():
    torch.manual_seed(0)
    m = build_sampler({"model": load_model_config("tiny")}, 6)
    for gl in (10, 20, 30):
        assert m(torch.randn(3, gl, gl, 6)).shape == (3, 100)
    with pytest.raises(UserError, match="multiple of 10"):
        m(torch.randn(1, 15, 15, 6))
    with pytest.raises(UserError, match="D=6"):
        m(torch.randn(1, 10, 10, 5))
    with pytest.raises(UserError, match="Gl"):
        m(torch.randn(10, 10, 6))


def test_coordinate_channels():
    xy = Sampler.coords(4)
    assert xy.shape == (2, 4, 4)
    assert torch.allclose(xy[0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # x along columns
    assert torch.allclose(xy[1, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # y along rows
    assert torch.equal(xy[0, 0], xy[0, 3]) and torch.equal(xy[1, :, 0], xy[1, :, 2])


def test_tile_order_by_gradients():
    """With the spatial conv reduced to its centre tap, logit t depends only on the LR cells
    of tile t = row*10 + col; gradients show exactly which cells those are."""
    torch.manual_seed(0)
    gl, d = 20, 3
    m = Sampler(d, hidden=4, kernel=3, layers=1)
    with torch.no_grad():
        w = m.spatial[0].weight
        centre = w[:, :, 1, 1].clone()
        w.zero_()
        w[:, :, 1, 1] = centre
    x = torch.randn(1, gl, gl, d, requires_grad=True)
    out = m(x)
    for r, c in [(0, 0), (0, 9), (9, 0), (3, 7), (6, 2)]:
        (grad,) = torch.autograd.grad(out[0, r * 10 + c], x, retain_graph=True)
        per_tile = grad.abs().sum(-1)[0].reshape(10, 2, 10, 2).sum((1, 3))  # [row, col]
        assert per_tile[r, c] > 0
        per_tile[r, c] = 0
        assert torch.count_nonzero(per_tile) == 0


def test_tile_order_after_training():
    """Trained to find a marker feature, the full (unmodified) sampler puts its highest logit
    at the marked tile's index r*10+c."""
    torch.manual_seed(0)
    gl, d, b = 10, 3, 32
    m = Sampler(d, hidden=8, kernel=3, layers=1)
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    marker = torch.tensor([2.0, -1.0, 1.0])

    def make(tiles):
        x = 0.1 * torch.randn(len(tiles), gl, gl, d)
        y = torch.zeros(len(tiles), 100)
        for i, t in enumerate(tiles):
            x[i, t // 10, t % 10] += marker
            y[i, t] = 1.0
        return x, y

    for _ in range(150):
        x, y = make(torch.randint(0, 100, (b,)).tolist())
        loss = sampler_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probes = [0, 9, 90, 99, 37, 62, 45]
    x, _ = make(probes)
    with torch.no_grad():
        assert m(x).argmax(dim=1).tolist() == probes


# -- loss -------------------------------------------------------------------------------------
def test_bce_hand_case():
    logits = torch.tensor([[0.0, 2.0, -1.0] + [0.0] * 97])
    target = torch.tensor([[0.5, 1.0, 0.25] + [0.0] * 97])

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    want = (bce(0, 0.5) + bce(2, 1.0) + bce(-1, 0.25) + 97 * bce(0, 0.0)) / 100
    got = sampler_loss(logits, target)
    assert abs(float(got) - want) < 1e-6
    assert torch.allclose(got, torch.nn.BCEWithLogitsLoss()(logits, target))
    with pytest.raises(UserError, match="logits"):
        sampler_loss(logits, target[:, :50])


# -- selection --------------------------------------------------------------------------------
def test_threshold_on_sigmoid_scores_strictly():
    """The rule (model/crossscale/selection.py): sigmoid(logit) > threshold; the scale is the logits' own."""
    s = torch.zeros(2, 100)
    s[0, :4] = torch.tensor([0.3, 0.1, 0.2, -5.0])        # sigmoid 0.574, 0.525, 0.550, ~0
    s[1] = torch.linspace(-4, 4, 100)
    m = select(s, threshold=0.55)
    assert torch.nonzero(m[0]).flatten().tolist() == [0]  # 0.574 only: 0.5498 is not > 0.55
    assert torch.equal(m[1], torch.sigmoid(s[1].double()) > 0.55)
    # Higher threshold selects a subset; 1.0 selects nothing, 0.0 every tile.
    assert not (select(s, threshold=0.85) & ~m).any()
    assert select(s, threshold=0.0).all()
    assert not select(s, threshold=1.0).any()
    assert not select(torch.full((1, 100), 30.0), threshold=1.0).any()  # even saturated scores


def test_constant_scores_are_not_rescaled():
    """No per-scene min-max: a scene whose tiles all score low requests nothing, one whose
    tiles all score high requests them all (a flat scene is not forced to give up a tile)."""
    s = torch.stack([torch.full((100,), -3.0), torch.full((100,), 3.0)])
    assert select(s, threshold=0.55).sum(1).tolist() == [0, 100]
    # With top-k alone, ties go to the lower index first.
    assert torch.nonzero(select(s[:1], threshold=None, top_k=3)[0]).flatten().tolist() == [0, 1, 2]


def test_top_k_and_ties():
    s = torch.zeros(1, 100)
    s[0, [7, 3, 50, 20]] = torch.tensor([5.0, 9.0, 5.0, 5.0])
    m = select(s, threshold=None, top_k=3)
    assert torch.nonzero(m[0]).flatten().tolist() == [3, 7, 20]  # 9, then ties 7 < 20 < 50
    assert rank(s)[0, [3, 7, 20, 50, 0, 1]].tolist() == [0, 1, 2, 3, 4, 5]
    assert select(s, threshold=None, top_k=0).sum() == 0
    assert select(s, threshold=None, top_k=100).all()
    # threshold and top-k intersect: the threshold (sigmoid > 0.5) leaves 4 candidates, top-2 keeps 2.
    assert torch.nonzero(select(s, threshold=0.5, top_k=2)[0]).flatten().tolist() == [3, 7]
    assert select(s, threshold=0.5, top_k=12).sum() == 4
    with pytest.raises(UserError, match="top_k"):
        select(s, threshold=None, top_k=101)


def test_per_class_budgets():
    s = torch.arange(100, dtype=torch.float32).flip(0).repeat(3, 1)  # tile 0 best
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.uint8)
    budgets = {0: 2, 1: 5}
    assert scene_budgets(labels, budgets).tolist() == [2, 5, 0]
    assert scene_budgets(labels, budgets, default_budget=3).tolist() == [2, 5, 3]
    m = select(s, threshold=None, budgets=budgets, labels=labels)
    assert m.sum(dim=1).tolist() == [2, 5, 0]
    assert torch.nonzero(m[1]).flatten().tolist() == [0, 1, 2, 3, 4]
    # top-k and budgets: the smaller cap wins.
    m = select(s, threshold=None, top_k=3, budgets=budgets, labels=labels, default_budget=50)
    assert m.sum(dim=1).tolist() == [2, 3, 3]
    # With a threshold, the budget caps the candidates (logits 0.25, 0.15, 0.05 > 0: 3 tiles).
    m = select(s * 0.1 - 9.65, threshold=0.5, budgets=budgets, labels=labels, default_budget=100)
    assert m.sum(dim=1).tolist() == [2, 3, 3]
    with pytest.raises(UserError, match="labels"):
        select(s, threshold=None, budgets=budgets)
    with pytest.raises(UserError, match="class"):
        select(s, threshold=None, budgets={7: 1}, labels=labels)
    with pytest.raises(UserError, match="budget"):
        select(s, threshold=None, budgets={0: -1}, labels=labels)


def test_select_bad_input():
    with pytest.raises(UserError, match="give a threshold"):
        select(torch.rand(1, 100), threshold=None)
    with pytest.raises(UserError, match="logits"):
        select(torch.rand(1, 99))
    with pytest.raises(UserError, match="finite"):
        select(torch.full((1, 100), float("nan")))
    with pytest.raises(UserError, match="threshold"):
        select(torch.rand(1, 100), threshold=-0.1)


def test_obr_accounting():
    m = torch.zeros(3, 100, dtype=torch.bool)
    m[0, :12] = True
    m[1, ::2] = True
    per, mean = obr(m)
    assert torch.allclose(per, torch.tensor([0.12, 0.5, 0.0]))
    assert abs(mean - (0.12 + 0.5) / 3) < 1e-7
    s = torch.rand(4, 100, generator=torch.Generator().manual_seed(1))
    per, mean = obr(select(s, threshold=None, top_k=12))
    assert torch.allclose(per, torch.full((4,), 0.12)) and abs(mean - 0.12) < 1e-7
    with pytest.raises(UserError, match="bool"):
        obr(m.float())


def test_precision_at_k():
    target = torch.arange(100, dtype=torch.float32).flip(0)[None].repeat(2, 1)  # top-12: 0..11
    scores = target.clone()
    scores[1, :6] = -1.0  # drops 6 of the true top-12 -> 6/12
    assert precision_at_k(scores, target, k=12) == pytest.approx((1.0 + 0.5) / 2)
    # Constant targets have no top-k and are left out; none left -> NaN.
    flat = torch.zeros(2, 100)
    assert math.isnan(precision_at_k(scores, flat, k=12))
    mixed = torch.stack([target[0], flat[0]])
    assert precision_at_k(scores, mixed, k=12) == pytest.approx(1.0)


# -- the task ---------------------------------------------------------------------------------
def test_task_loss_and_metrics():
    assert TASKS["sampler"] is SamplerTask and SamplerTask.name == "sampler"
    cfg = _train_config("sampler-train-tiny.yaml")
    task = SamplerTask()
    batch, text = fake_batch()
    torch.manual_seed(0)
    model = task.build_model(cfg, {"D": 6, "E": 5, "Gl": 10, "g": 2, "n_concepts": 4})
    loss, metrics = task.loss(model, batch, text, step=0)
    assert set(metrics) == {"bce", "obr@0.55", "precision@12"}
    target = g_star(batch["s_vis"], batch["hr_embed"], batch["lr_embed"], text, batch["labels"])
    logits = model(batch["lr_tokens"])
    assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, target))
    # the same rule, on the same scores, as the evaluation (model/crossscale/selection.py)
    assert metrics["obr@0.55"] == pytest.approx(obr(select(logits, threshold=0.55))[1])
    assert metrics["obr@0.55"] == pytest.approx(float((torch.sigmoid(logits.double()) > 0.55).double().mean()))
    assert metrics["precision@12"] == pytest.approx(precision_at_k(logits, target, k=12))
    assert 0 <= metrics["obr@0.55"] <= 1 and 0 <= metrics["precision@12"] <= 1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # The LR width D_lr wins over the HR width D when the trainer gives both.
    assert SamplerTask().build_model(cfg, {"D": 9, "D_lr": 6})(batch["lr_tokens"]).shape == (4, 100)
    # The supervision settings come from the config.
    task2 = SamplerTask()
    task2.build_model({**cfg, "supervision": {"variant": "structural"}}, {"D": 6})
    t2 = task2.targets(batch, text)
    assert torch.allclose(t2, g_star(batch["s_vis"], batch["hr_embed"], batch["lr_embed"], text,
                                     batch["labels"], variant="structural"))
    with pytest.raises(UserError, match="lacks"):
        task.loss(model, {"lr_tokens": batch["lr_tokens"]}, text, step=0)
    # coverage: the target is where the labelled concepts are (the batch's tile fractions)
    task3 = SamplerTask()
    task3.build_model({**cfg, "supervision": {"variant": "coverage", "novel_concepts": [1]}}, {"D": 6, "n_concepts": 4})
    t3 = task3.targets(batch, text)
    assert torch.allclose(t3, g_star(batch["s_vis"], batch["hr_embed"], batch["lr_embed"], text, batch["labels"],
                                     variant="coverage", novel=[1], tile_frac=batch["tile_frac"]))
    assert not torch.allclose(t3, target)
    # only the coverage variant needs the tile fractions
    no_frac = {k: v for k, v in batch.items() if k != "tile_frac"}
    assert torch.allclose(task.targets(no_frac, text), target)
    with pytest.raises(UserError, match="lacks tile_frac"):
        task3.targets(no_frac, text)


def test_sampler_overfits_a_few_samples():
    """The excess BCE over the targets' own entropy (its floor with soft targets) falls by a
    large factor in a few hundred CPU steps."""
    torch.manual_seed(0)
    batch, text = fake_batch(b=4, gl=10, d=8, seed=3)
    task = SamplerTask()
    model = task.build_model({"model": {"hidden": 32, "kernel": 3, "layers": 2}}, {"D": 8})
    target = task.targets(batch, text)
    floor = float(-(torch.xlogy(target, target) + torch.xlogy(1 - target, 1 - target)).mean())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(200):
        loss, metrics = task.loss(model, batch, text, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    final, _ = task.loss(model, batch, text, 200)
    assert float(final.detach()) - floor < (first - floor) / 50
    _, metrics = task.loss(model, batch, text, 200)
    assert metrics["precision@12"] > 0.8


def test_load_sampler_from_checkpoint(tmp_path):
    cfg = _train_config("sampler-train-tiny.yaml")
    dims = {"D": 9, "D_lr": 6, "E": 5, "Gl": 10, "g": 2, "n_concepts": 4}
    torch.manual_seed(0)
    model = SamplerTask().build_model(cfg, dims)
    path = tmp_path / "step-1.pt"
    torch.save({"model": model.state_dict(), "config": cfg, "dims": dims, "step": 1}, path)
    loaded = load_sampler(path)
    x = torch.randn(2, 10, 10, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    torch.save({"model": model.state_dict(), "config": {**cfg, "task": "predictor"},
                "dims": dims}, path)
    with pytest.raises(UserError, match="not 'sampler'"):
        load_sampler(path)
    torch.save({"model": model.state_dict(), "config": cfg, "dims": {**dims, "D_lr": 7}}, path)
    with pytest.raises(UserError, match="do not match"):
        load_sampler(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_sampler(path)
    with pytest.raises(UserError, match="not found"):
        load_sampler(tmp_path / "missing.pt")
