"""The training entry point: metrics, checkpoints loadable with weights_only, resume equal to an
uninterrupted run, stage II, config errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gl10m.errors import UserError
from gl10m.model.crossscale.train import checkpoint_paths, get_task, load_checkpoint, lr_factor, train
from tests.test_model_predictor import CONFIGS, synthetic_samples, tiny_cfg


def cfg(**kw) -> dict:
    base = {"task": "predictor", "model": tiny_cfg(), "batch_size": 2, "steps": 8, "lr": 3e-3,
            "warmup_steps": 2, "ckpt_every": 3, "keep_checkpoints": 5, "progress": False}
    return {**base, **kw}


def losses(metrics: str | Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in Path(metrics).read_text().splitlines()]


class IterableSamples:
    """An iterable (not map-style) dataset that reshuffles per epoch, like FeatureDataset."""

    def __init__(self, samples):
        self.samples, self.epoch = samples, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(100 + self.epoch))
        return (self.samples[i] for i in order.tolist())


def test_train_writes_metrics_and_weights_only_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = train(CONFIGS / "train-predictor-tiny.yaml", None, out, dataset=synthetic_samples(5), max_steps=7)
    assert res["step"] == 7
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 8))
    for r in recs:
        assert math.isfinite(r["loss"]) and {"lr", "grad_norm", "pred_std", "pred_cos_center"} <= set(r)
    assert [p.name for p in checkpoint_paths(out)] == ["step-00000005.pt", "step-00000007.pt"]
    st = torch.load(res["checkpoint"], map_location="cpu", weights_only=True)
    assert st["step"] == 7 and st["config"]["task"] == "predictor"
    assert {"model", "optimizer", "scheduler", "rng"} <= set(st)
    assert "center.center" in st["model"] and "predictor.mask_token" in st["model"]
    assert not list(out.glob("**/*.tmp*"))
    # warmup then cosine: lr rises for warmup_steps, then falls
    lrs = [r["lr"] for r in recs]
    assert lrs[0] < lrs[1] and lrs[2] > lrs[-1]


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, kind):
    samples = synthetic_samples(5)
    ds = (lambda: samples) if kind == "map" else (lambda: IterableSamples(samples))
    full = train(cfg(), None, tmp_path / "full", dataset=ds())
    ref = losses(full["metrics"])
    assert len(ref) == 8 and len(set(ref)) == 8
    # stop at step 5 (mid-epoch: 3 batches an epoch), then resume in a fresh call
    part = tmp_path / "part"
    train(cfg(), None, part, dataset=ds(), max_steps=5)
    assert losses(part / "metrics.jsonl") == ref[:5]
    res = train(cfg(), None, part, dataset=ds(), resume=True)
    assert res["step"] == 8
    assert losses(res["metrics"]) == ref
    a = load_checkpoint(full["checkpoint"])["model"]
    b = load_checkpoint(res["checkpoint"])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_drops_metrics_past_the_checkpoint(tmp_path):
    samples = synthetic_samples(5)
    ref = losses(train(cfg(), None, tmp_path / "full", dataset=samples)["metrics"])
    run = tmp_path / "crash"
    train(cfg(), None, run, dataset=samples, max_steps=5)
    # as if killed after step 5 was logged but before its checkpoint was written
    (run / "checkpoints" / "step-00000005.pt").unlink()
    assert checkpoint_paths(run)[-1].name == "step-00000003.pt"
    res = train(cfg(), None, run, dataset=samples, resume=True)
    assert losses(res["metrics"]) == ref


def test_stage2_trains_from_stage1_and_holds_out_novel_concepts(tmp_path):
    samples = synthetic_samples(4, n_concepts=6)
    text = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    s1 = train(cfg(steps=3), None, tmp_path / "s1", dataset=samples)
    c2 = cfg(task="predictor_stage2", steps=3, init_from=s1["checkpoint"], novel_concepts=[1, 4])
    res = train(c2, None, tmp_path / "s2", dataset=samples, text=text)
    recs = [json.loads(ln) for ln in Path(res["metrics"]).read_text().splitlines()]
    assert all(math.isfinite(r["loss_siglip"]) and r["loss"] > r["loss_cc"] for r in recs)
    st = load_checkpoint(res["checkpoint"])
    assert "predictor.head.1.weight" in st["model"] and "predictor.log_scale" in st["model"]
    # the novel concepts' text embeddings do not enter the loss; the others do
    task = get_task("predictor_stage2")
    model = task.build_model(c2, st["dims"])
    model.load_state_dict(st["model"])
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def loss_with(t):
        torch.manual_seed(0)
        return task.loss(model, batch, t, 0)[1]["loss_siglip"]

    model.eval()
    t2 = text.clone()
    t2[[1, 4]] = torch.randn(2, 8)
    assert loss_with(text) == loss_with(t2)
    t3 = text.clone()
    t3[0] = torch.randn(8)
    assert loss_with(text) != loss_with(t3)
    with pytest.raises(UserError):
        train(cfg(task="predictor_stage2", steps=1), None, tmp_path / "s3", dataset=samples)  # no text


def test_config_and_state_errors(tmp_path):
    samples = synthetic_samples(2)
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg(), None, tmp_path / "a", dataset=samples, resume=True)
    train(cfg(steps=1), None, tmp_path / "b", dataset=samples)
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(cfg(steps=1), None, tmp_path / "b", dataset=samples)
    with pytest.raises(UserError, match="unknown training config keys"):
        train(cfg(bogus=1), None, tmp_path / "c", dataset=samples)
    with pytest.raises(UserError, match="unknown task"):
        get_task("nope")
    with pytest.raises(UserError):
        train(cfg(batch_size=0), None, tmp_path / "d", dataset=samples)
    with pytest.raises(UserError, match="not found"):
        train(tmp_path / "missing.yaml", None, tmp_path / "e", dataset=samples)
    with pytest.raises(UserError):
        train(cfg(), tmp_path / "no-such-features", tmp_path / "f")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(bad)


def test_lr_schedule():
    assert lr_factor(0, 4, 20, 0.0) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.0) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def _write_feature_cache(root: Path, samples: list[dict], text: torch.Tensor) -> None:
    """A feature cache laid out as model.features writes it: features.json, text.npy and
    <split>/<shard>.tar members '<key>.<field>.npy' (float16 features, uint8 labels)."""
    import io
    import tarfile

    import numpy as np

    def npy(a) -> bytes:
        b = io.BytesIO()
        np.save(b, a, allow_pickle=False)
        return b.getvalue()

    (root / "train").mkdir(parents=True)
    with tarfile.open(root / "train" / "f-000000.tar", "w") as tar:
        for i, s in enumerate(samples):
            for k, v in s.items():
                a = v.numpy()
                a = a.astype(np.float16) if a.dtype == np.float32 and k != "s_vis" else a
                data = npy(a)
                ti = tarfile.TarInfo(f"s{i:03d}.{k}.npy")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    (root / "text.npy").write_bytes(npy(text.numpy().astype(np.float16)))
    (root / "features.json").write_text(json.dumps({"shards": {"train": ["f-000000.tar"]}}))


def test_train_reads_the_feature_cache_and_resumes(tmp_path):
    pytest.importorskip("gl10m.model.crossscale.features")
    samples = synthetic_samples(5, n_concepts=6)
    feats = tmp_path / "features"
    _write_feature_cache(feats, samples, torch.randn(6, 8, generator=torch.Generator().manual_seed(2)))
    c = cfg(task="predictor_stage2", steps=6, shuffle_buffer=3)
    ref = losses(train(c, feats, tmp_path / "full")["metrics"])
    assert len(ref) == 6 and all(math.isfinite(x) for x in ref)
    train(c, feats, tmp_path / "part", max_steps=4)
    assert losses(train(c, feats, tmp_path / "part", resume=True)["metrics"]) == ref
    # the same with a DataLoader worker
    cw = {**c, "num_workers": 1}
    refw = losses(train(cw, feats, tmp_path / "w")["metrics"])
    assert refw == ref


def test_stage2_holds_out_the_profiles_novel_concepts_unless_told_otherwise(tmp_path):
    pytest.importorskip("gl10m.model.crossscale.features")
    samples = synthetic_samples(3, n_concepts=6)
    feats = tmp_path / "features"
    _write_feature_cache(feats, samples, torch.randn(6, 8, generator=torch.Generator().manual_seed(2)))
    meta = json.loads((feats / "features.json").read_text())
    (feats / "features.json").write_text(json.dumps({**meta, "novel": [2, 5]}))  # as write_features records
    c = cfg(task="predictor_stage2", steps=1)
    assert load_checkpoint(train(c, feats, tmp_path / "a")["checkpoint"])["config"]["novel_concepts"] == [2, 5]
    given = {**c, "novel_concepts": [1, 2, 5]}  # more held out: fine
    assert load_checkpoint(train(given, feats, tmp_path / "b")["checkpoint"])["config"]["novel_concepts"] == [1, 2, 5]
    with pytest.raises(UserError, match="omits concept"):  # fewer than the profile marks novel: refused
        train({**c, "novel_concepts": [1]}, feats, tmp_path / "c")


def test_sampler_and_stage2_hold_out_what_the_encoder_held_out(tmp_path):
    """No novel leak: the sampler's s_gain and stage II default to the encoder's held-out list
    (recorded in the feature cache), record it in their checkpoints, and refuse a novel concept the
    encoder was pretrained on."""
    pytest.importorskip("gl10m.model.crossscale.features")
    samples = synthetic_samples(3, n_concepts=6)
    feats = tmp_path / "features"
    _write_feature_cache(feats, samples, torch.randn(6, 8, generator=torch.Generator().manual_seed(2)))
    meta = json.loads((feats / "features.json").read_text())
    (feats / "features.json").write_text(json.dumps({**meta, "novel": [], "encoder_novel": [0, 4]}))
    smp = {"task": "sampler", "model": {"hidden": 4, "kernel": 3, "layers": 0}, "steps": 1, "batch_size": 2,
           "progress": False, "warmup_steps": 0}
    ck = load_checkpoint(train(smp, feats, tmp_path / "s")["checkpoint"])
    assert ck["config"]["supervision"]["novel_concepts"] == [0, 4]
    st2 = cfg(task="predictor_stage2", steps=1)
    assert load_checkpoint(train(st2, feats, tmp_path / "p")["checkpoint"])["config"]["novel_concepts"] == [0, 4]
    with pytest.raises(UserError, match=r"\[3\] were not held out of the encoder"):
        train({**smp, "supervision": {"novel_concepts": [0, 3, 4]}}, feats, tmp_path / "s2")
    with pytest.raises(UserError, match="not held out of the encoder"):
        train({**st2, "novel_concepts": [3]}, feats, tmp_path / "p2")


def test_features_record_the_profiles_novel_concepts(tmp_path):
    features = pytest.importorskip("gl10m.model.crossscale.features")
    import yaml

    from gl10m import profile as prof_mod

    raw = yaml.safe_load(prof_mod.DEFAULT_PROFILE.read_text())
    labels = features.concept_labels()
    assert features._novel_ids(None, labels) == []            # the default profile marks none
    for c in raw["concepts"]:
        if c["id"] in (3, 7):
            c["novel"] = True
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert features._novel_ids(p, labels) == [3, 7]
    assert features._novel_ids(p, labels[::-1]) == []          # labels that are not the profile's


def test_sampler_task_through_the_registry_and_as_the_mask_scorer(tmp_path):
    sampler_mod = pytest.importorskip("gl10m.model.crossscale.sampler")
    samples = synthetic_samples(4, n_concepts=6)
    text = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    sc = cfg(task="sampler", model={"hidden": 8, "kernel": 3, "layers": 1}, steps=2)
    sres = train(sc, None, tmp_path / "sampler", dataset=samples, text=text)
    assert len(losses(sres["metrics"])) == 2
    scorer = sampler_mod.load_sampler(sres["checkpoint"])
    # the predictor with that sampler and sampler_mix 1: every scene observes its top tiles
    pc = cfg(steps=2, sampler_checkpoint=sres["checkpoint"], sampler_mix=1.0)
    task = get_task("predictor")
    task.build_model(pc, {"D": 16, "g": 2, "Gl": 10, "D_lr": 16, "E": 8, "n_concepts": 6})
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("lr_tokens", "hr_tokens")}
    m = task.masks(batch, step=0)
    with torch.no_grad():
        s = scorer(batch["lr_tokens"])
    for i in range(4):
        k = int(m[i].sum())
        assert set(torch.nonzero(m[i]).flatten().tolist()) == set(s[i].topk(k).indices.tolist())
    res = train(pc, None, tmp_path / "pred", dataset=samples)
    assert res["step"] == 2


def test_cli_train(tmp_path):
    pytest.importorskip("gl10m.model.crossscale.features")
    from gl10m.model.crossscale.train import cli_train

    feats = tmp_path / "features"
    _write_feature_cache(feats, synthetic_samples(3, n_concepts=6), torch.randn(6, 8))
    lines = []
    res = cli_train(CONFIGS / "train-predictor-tiny.yaml", feats, tmp_path / "out", max_steps=2, echo=lines.append)
    assert res["step"] == 2 and len(lines) == 1 and "step 2" in lines[0]
    res = cli_train(CONFIGS / "train-predictor-tiny.yaml", feats, tmp_path / "out", resume=True, max_steps=3,
                    echo=lines.append)
    assert res["step"] == 3 and len(losses(res["metrics"])) == 3


def _ddp_worker(rank: int, world: int, port: int, out: str, result_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    try:
        res = train(cfg(steps=3, ckpt_every=100), None, out, dataset=synthetic_samples(5), device="cpu")
        torch.save({"step": res["step"], "model": res["model"].state_dict()}, Path(result_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_cpu_ranks_train_in_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, port, str(out), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 3
    # the ranks saw different samples, yet weights (gradients all-reduced) and the running centre
    # (target means all-reduced) are the same on both
    assert set(r0["model"]) == set(r1["model"])
    for k in r0["model"]:
        assert torch.allclose(r0["model"][k], r1["model"][k], atol=1e-6), k
    assert r0["model"]["center.center"].abs().sum() > 0
    recs = losses(out / "metrics.jsonl")  # written by rank 0 only: one line per step
    assert len(recs) == 3
    st = load_checkpoint(checkpoint_paths(out)[-1])
    assert st["step"] == 3 and all(torch.equal(st["model"][k], r0["model"][k]) for k in st["model"])


def test_stage2_head_learns_at_its_own_rate():
    """head_lr_mult: the stage II head (and its SigLIP scale/bias) gets lr x mult, the predictor
    lr; with the default 1 every parameter shares one rate; decayed matrices come first."""
    from gl10m.model.crossscale.train import _param_groups
    dims = {"D": 16, "g": 2, "Gl": 10, "D_lr": 16, "E": 8, "n_concepts": 66}
    for mult in (1.0, 10.0):
        task = get_task("predictor_stage2")
        c = {"model": tiny_cfg(), "head_lr_mult": mult, "lr": 2e-4, "weight_decay": 0.05}
        model = task.build_model(c, dims)
        groups = _param_groups(model, c, task.lr_mult)
        ids = {id(p): g["lr"] for g in groups for p in g["params"]}
        names = dict(model.named_parameters())
        assert sum(len(g["params"]) for g in groups) == len(names)
        for n, p in names.items():
            head = n.startswith("predictor.head.") or n in ("predictor.log_scale", "predictor.bias")
            assert ids[id(p)] == pytest.approx(2e-4 * (mult if head else 1.0)), n
        assert groups[0]["weight_decay"] == 0.05 and groups[-1]["weight_decay"] == 0.0
        assert len(groups) == (2 if mult == 1.0 else 4)
