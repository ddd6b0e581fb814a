"""The one selection rule (model/crossscale/selection.py): the same scores in training and evaluation,
threshold 1.0 selects nothing, and a shared threshold calibrated to a target OBR."""
from __future__ import annotations

import pytest
import torch

from gl10m.errors import UserError
from gl10m.model.crossscale import selection as S
from gl10m.model.crossscale.sampler import SamplerTask, select

torch.set_num_threads(1)


def test_threshold_one_selects_nothing_and_zero_everything():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=g) * 3
    assert not S.select(logits, threshold=1.0).any()        # old rule (>= on min-max): 1 tile a scene
    assert S.select(logits, threshold=0.0).all()
    obrs = [S.obr(S.select(logits, threshold=t))[1] for t in (0.0, 0.25, 0.55, 0.85, 1.0)]
    assert obrs == sorted(obrs, reverse=True) and obrs[0] == 1.0 and obrs[-1] == 0.0


def test_training_metric_and_evaluation_use_the_same_scale():
    """The sampler task's obr@t equals the evaluation's selection on the same logits: the scores
    are sigmoid(logit), not a per-scene min-max of either logits or probabilities."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 100, generator=g) * 0.5 - 0.5
    p = torch.sigmoid(logits.double())
    want = float((p > 0.55).double().mean())
    assert S.obr(S.select(logits, threshold=0.55))[1] == pytest.approx(want)
    # the old per-scene min-max rules disagree with it (and with each other)
    mm = lambda x: (x - x.amin(1, keepdim=True)) / (x.amax(1, keepdim=True) - x.amin(1, keepdim=True))  # noqa: E731
    assert abs(float((mm(logits) >= 0.55).float().mean()) - want) > 0.05
    # sampler.select is this very function
    assert select is S.select

    class Fixed(torch.nn.Module):
        def forward(self, lr):
            return logits

    task = SamplerTask({"selection": {"threshold": 0.55, "top_k": 12}})
    from tests.test_model_sampler import fake_batch
    batch, text = fake_batch(b=8)
    _, metrics = task.loss(Fixed(), batch, text, step=0)
    assert metrics["obr@0.55"] == pytest.approx(want)


def test_calibrate_threshold_hits_the_target_obr():
    g = torch.Generator().manual_seed(2)
    val = torch.randn(50, 100, generator=g) * 2
    for target in (0.0, 0.05, 0.12, 0.5, 1.0):
        t, got = S.calibrate_threshold(val, target)
        assert 0.0 <= t <= 1.0
        assert got == pytest.approx(target, abs=1 / 5000 + 1e-9)
        assert S.obr(S.select(val, threshold=t))[1] == pytest.approx(got)
    assert S.calibrate_threshold(val, 0.0)[0] == 1.0
    # ties: a split where half the tiles share one score cannot reach 0.25; the closest count wins
    tied = torch.zeros(4, 100)
    tied[:, :50] = 2.0
    t, got = S.calibrate_threshold(tied, 0.3)
    assert got == 0.5 and S.obr(S.select(tied, threshold=t))[1] == 0.5
    with pytest.raises(UserError, match="target OBR"):
        S.calibrate_threshold(val, 1.5)
    with pytest.raises(UserError, match="logits"):
        S.calibrate_threshold(torch.zeros(3, 99), 0.1)
