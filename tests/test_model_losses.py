"""Losses: centered cosine and SigLIP against values computed by hand; the running centre."""
from __future__ import annotations

import math

import pytest
import torch

from gl10m.errors import UserError
from gl10m.model.crossscale.losses import (BIAS_INIT, LOG_SCALE_INIT, RunningCenter, centered_cosine, collapse_monitors,
                          siglip_loss)


def test_centered_cosine_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [3.0, 1.0]])
    c = torch.tensor([1.0, 1.0])
    # row 0: pred-c = (0,-1), target-c = (-1,0) -> cos 0 -> 1
    # row 1: pred-c = (1,1),  target-c = (2,0)  -> cos 1/sqrt2 -> 1 - 1/sqrt2
    expect = (1.0 + (1.0 - 1.0 / math.sqrt(2.0))) / 2.0
    assert centered_cosine(pred, target, c).item() == pytest.approx(expect, rel=1e-6)
    # without a centre this is the plain cosine loss: row 0 cos 0, row 1 cos(2,2 ; 3,1) = 8/(sqrt8 sqrt10)
    plain = (1.0 + 1.0 - 8.0 / (math.sqrt(8.0) * math.sqrt(10.0))) / 2.0
    assert centered_cosine(pred, target, torch.zeros(2)).item() == pytest.approx(plain, rel=1e-6)
    # identical after centring -> 0; opposite -> 2
    assert centered_cosine(target, target, c).item() == pytest.approx(0.0, abs=1e-6)
    assert centered_cosine(2 * c - target, target, c).item() == pytest.approx(2.0, abs=1e-6)


def test_centered_cosine_gradients_and_shapes():
    pred = torch.randn(2, 100, 2, 2, 8, requires_grad=True)
    target = torch.randn(2, 100, 2, 2, 8)
    center = torch.randn(8, requires_grad=True)
    centered_cosine(pred, target, center).backward()
    assert pred.grad is not None and center.grad is None  # the centre is a constant
    with pytest.raises(UserError):
        centered_cosine(pred, target[:, :99], center)


def test_siglip_loss_hand_computed():
    img = torch.tensor([[3.0, 4.0], [1.0, 0.0]])        # normalised: (0.6, 0.8), (1, 0)
    txt = torch.tensor([[0.0, 2.0], [1.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.uint8)
    log_scale = torch.tensor(math.log(10.0))
    bias = torch.tensor(-10.0)
    xn = [(0.6, 0.8), (1.0, 0.0)]
    yn = [(0.0, 1.0), (1.0, 0.0), (1 / math.sqrt(2), 1 / math.sqrt(2))]
    total = 0.0
    for i in range(2):
        for j in range(3):
            dot = xn[i][0] * yn[j][0] + xn[i][1] * yn[j][1]
            z = 1.0 if targets[i, j] else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * (10.0 * dot - 10.0))))
    expect = total / 6.0
    got = siglip_loss(img, txt, targets, log_scale, bias)
    assert got.item() == pytest.approx(expect, rel=1e-5)
    # the scale is clamped at 100
    big = siglip_loss(img, txt, targets, torch.tensor(10.0), bias)
    assert big.item() == pytest.approx(siglip_loss(img, txt, targets, torch.tensor(math.log(100.0)), bias).item())
    assert LOG_SCALE_INIT == pytest.approx(math.log(10.0)) and BIAS_INIT == -10.0
    with pytest.raises(UserError):
        siglip_loss(img, txt, targets[:, :2], log_scale, bias)


def test_balanced_siglip_weighs_positive_and_negative_pairs_alike():
    """balanced: mean over positive pairs + mean over negative pairs; with 1 positive in 60 pairs
    the plain mean all but ignores it, the balanced loss gives it half the weight."""
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g)
    t = torch.zeros(6, 10, dtype=torch.uint8)
    t[2, 7] = 1
    ls, b = torch.tensor(LOG_SCALE_INIT), torch.tensor(BIAS_INIT)
    logits = torch.exp(ls) * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T + b
    pair = -torch.nn.functional.logsigmoid(torch.where(t.bool(), logits, -logits))
    want = pair[2, 7] + (pair.sum() - pair[2, 7]) / 59
    assert siglip_loss(img, txt, t, ls, b, balanced=True).item() == pytest.approx(want.item(), rel=1e-5)
    assert siglip_loss(img, txt, t, ls, b).item() == pytest.approx(pair.mean().item(), rel=1e-5)
    # relative to the negatives-only images, the positive pair's image gets ~59x more gradient
    ratios = []
    for bal in (False, True):
        x = img.clone().requires_grad_(True)
        siglip_loss(x, txt, t, ls, b, balanced=bal).backward()
        ratios.append(x.grad[2].norm() / x.grad[[0, 1, 3, 4, 5]].norm(dim=1).mean())
    assert ratios[1] / ratios[0] > 10
    none = torch.zeros_like(t)               # no positive at all: the negatives' mean
    assert siglip_loss(img, txt, none, ls, b, balanced=True).item() == pytest.approx(
        siglip_loss(img, txt, none, ls, b).item(), rel=1e-5)


def test_siglip_gradients_reach_scale_and_bias():
    torch.manual_seed(0)
    img = torch.randn(4, 6, requires_grad=True)
    txt = torch.randn(5, 6)
    t = (torch.rand(4, 5) < 0.5).to(torch.uint8)
    ls = torch.tensor(LOG_SCALE_INIT, requires_grad=True)
    b = torch.tensor(BIAS_INIT, requires_grad=True)
    siglip_loss(img, txt, t, ls, b).backward()
    assert img.grad.abs().sum() > 0 and ls.grad != 0 and b.grad != 0


def test_running_center_momentum_formula_targets_only_frozen_in_eval():
    rc = RunningCenter(3, momentum=0.75)
    assert torch.equal(rc.center, torch.zeros(3))
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])    # mean (2, 2, 2)
    t2 = torch.tensor([[[4.0, 0.0, 8.0]]])                   # mean (4, 0, 8), any leading shape
    rc.train()
    rc.update(t1)
    c1 = 0.25 * torch.tensor([2.0, 2.0, 2.0])
    assert torch.allclose(rc.center, c1)
    rc.update(t2)
    c2 = 0.75 * c1 + 0.25 * torch.tensor([4.0, 0.0, 8.0])
    assert torch.allclose(rc.center, c2)
    # no gradient ever flows through the update, even from a tensor requiring grad
    x = torch.ones(2, 3, requires_grad=True)
    rc.update(x)
    assert not rc.center.requires_grad
    c3 = rc.center.clone()
    rc.eval()
    rc.update(torch.full((2, 3), 100.0))
    assert torch.equal(rc.center, c3)
    assert "center" in rc.state_dict()
    with pytest.raises(UserError):
        RunningCenter(3, momentum=1.0)


def test_task_updates_centre_from_targets_not_predictions():
    from gl10m.model.crossscale.tasks import PredictorTask
    from tests.test_model_predictor import synthetic_samples, tiny_cfg

    torch.manual_seed(0)
    task = PredictorTask()
    model = task.build_model({"model": tiny_cfg(), "center_momentum": 0.5},
                             {"D": 16, "g": 2, "Gl": 10, "D_lr": 16, "E": 8, "n_concepts": 66})
    samples = synthetic_samples(2)
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    model.train()
    loss, logs = task.loss(model, batch, None, 0)
    expect = 0.5 * batch["hr_tokens"].reshape(-1, 16).mean(0)
    assert torch.allclose(model.center.center, expect, atol=1e-6)
    assert {"loss", "loss_cc", "pred_std", "pred_cos_center"} <= set(logs)
    model.eval()
    task.loss(model, batch, None, 1)
    assert torch.allclose(model.center.center, expect, atol=1e-6)


def test_collapse_monitors():
    c = torch.tensor([1.0, 0.0])
    collapsed = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    m = collapse_monitors(collapsed, c)
    assert m["pred_std"] == pytest.approx(0.0) and m["pred_cos_center"] == pytest.approx(1.0)
    spread = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    m = collapse_monitors(spread, c)
    assert m["pred_std"] == pytest.approx(1.0) and m["pred_cos_center"] == pytest.approx(0.0, abs=1e-6)
