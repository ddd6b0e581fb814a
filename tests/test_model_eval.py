"""Model evaluation: mAP@K against hand-computed cases, OBR accounting, the timing harness, the
pipeline pieces, and the report of a tiny trained model on real shards (API and CLI)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gl10m.errors import UserError  # noqa: E402
from gl10m.model.crossscale import metrics as M  # noqa: E402

# -- mAP@K, hand-computed -----------------------------------------------------------------------


def test_ap_at_k_simple_ranking():
    s = np.array([0.9, 0.8, 0.7, 0.6])
    y = np.array([1, 0, 1, 0])
    pc = M.per_concept(s, y, ks=(1, 2, 4))
    assert pc["n_pos"].tolist() == [2]
    assert pc["AP@1"][0] == pytest.approx(1.0)            # P@1 = 1, min(2, 1) = 1
    assert pc["AP@2"][0] == pytest.approx(0.5)            # (1 + 0) / min(2, 2)
    assert pc["AP@4"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert pc["AP"][0] == pytest.approx((1 + 2 / 3) / 2)  # non-interpolated AP over the whole ranking


def test_ties_keep_scene_order():
    s = np.array([0.5, 0.5, 0.5])
    # stable sort: ranking 0, 1, 2 -> the positive at scene 1 is found at rank 2
    assert M.per_concept(s, np.array([0, 1, 0]), ks=(3,))["AP@3"][0] == pytest.approx(0.5)
    assert M.per_concept(s, np.array([1, 0, 0]), ks=(3,))["AP@3"][0] == pytest.approx(1.0)
    assert M.per_concept(s, np.array([0, 0, 1]), ks=(3,))["AP@3"][0] == pytest.approx(1 / 3)
    # a tie below a distinct score: scene 2 first, then 0 and 1 in order
    assert M.ranking(np.array([[0.1], [0.1], [0.9]]))[:, 0].tolist() == [2, 0, 1]


def test_k_larger_than_the_split_and_k_smaller_than_the_positives():
    s = np.array([0.9, 0.5, 0.1])
    pc = M.per_concept(s, np.array([0, 0, 1]), ks=(100,))
    assert pc["AP@100"][0] == pytest.approx(1 / 3)        # ranking ends at N = 3; min(n_pos, K) = 1
    s5 = np.array([5, 4, 3, 2, 1], dtype=float)
    pc = M.per_concept(s5, np.array([1, 0, 1, 1, 1]), ks=(2, 3))
    assert pc["AP@2"][0] == pytest.approx(1 / 2)          # (1 + 0) / min(4, 2)
    assert pc["AP@3"][0] == pytest.approx((1 + 2 / 3) / 3)


def test_concepts_without_positives_are_skipped_and_groups_and_weights():
    s = np.array([[0.9, 0.1, 0.3], [0.8, 0.2, 0.2], [0.1, 0.3, 0.1]])
    y = np.array([[0, 0, 1], [1, 0, 1], [0, 0, 1]])      # concept 1 has no positive
    pc = M.per_concept(s, y, ks=(20, 100))
    assert math.isnan(pc["AP@100"][1]) and math.isnan(pc["AP"][1])
    assert pc["AP@100"][0] == pytest.approx(0.5) and pc["AP@100"][2] == pytest.approx(1.0)
    out = M.summarise(pc, {"all": range(3), "base": [0, 1], "novel": [2], "empty": [1]})
    assert out["all"]["mAP@100"] == pytest.approx(0.75)   # mean over concepts 0 and 2 only
    assert out["all"]["concepts"] == 2
    assert out["all"]["AP_weighted"] == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)
    assert out["base"]["mAP@100"] == pytest.approx(0.5) and out["novel"]["mAP@100"] == pytest.approx(1.0)
    assert math.isnan(out["empty"]["mAP@100"]) and out["empty"]["concepts"] == 0


def test_metric_input_errors():
    with pytest.raises(UserError, match="must both be"):
        M.per_concept(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(UserError, match="finite"):
        M.per_concept(np.array([np.nan, 1.0]), np.array([1, 0]))
    with pytest.raises(UserError, match="positive integer"):
        M.per_concept(np.zeros(3), np.zeros(3), ks=(0,))
    with pytest.raises(UserError, match="outside"):
        M.summarise(M.per_concept(np.zeros((2, 2)), np.ones((2, 2))), {"x": [5]})


# -- pipeline pieces ----------------------------------------------------------------------------
from gl10m.model.crossscale import evaluate as EV  # noqa: E402


def test_random_masks_match_counts_and_are_seeded_per_scene():
    keys = ["CA-a", "CA-b", "TX-c"]
    m = EV.random_masks(keys, [0, 12, 100], seed=3)
    assert m.dtype == torch.bool and m.sum(1).tolist() == [0, 12, 100]
    again = EV.random_masks(["TX-c", "CA-b"], [100, 12], seed=3)   # another batch, another order
    assert torch.equal(again[1], m[1])
    assert not torch.equal(EV.random_masks(keys, [0, 12, 100], seed=4)[1], m[1])
    assert not torch.equal(EV.random_masks(["CA-x"], [12], seed=3)[0], m[1])


def test_lr_fill_takes_each_tiles_own_lr_block():
    gl, d = 20, 3                          # 2x2 LR tokens per tile
    lr = torch.zeros(2, gl, gl, d)
    for r in range(10):
        for c in range(10):
            lr[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2, :] = r * 10 + c
    out = EV.lr_fill_tokens(lr, g=2)
    assert out.shape == (2, 100, 2, 2, d)
    assert torch.equal(out[0, :, 0, 0, 0], torch.arange(100, dtype=torch.float32))
    up = EV.lr_fill_tokens(lr, g=4)       # resampled to a finer grid: still the tile's own value
    assert torch.allclose(up[1, 37], torch.full((4, 4, d), 37.0))


def test_pool_scene_masks_and_falls_back_to_the_centre():
    from gl10m.model.crossscale.scoring import pool_scene
    tok = torch.zeros(2, 100, 2, 2, 2)
    tok[:, :50, ..., 0] = 1.0
    tok[:, 50:, ..., 1] = 1.0
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, :50] = True                    # scene 0 sees only the first half; scene 1 nothing
    centre = torch.tensor([0.25, 0.5])
    out = pool_scene(tok, mask, centre)    # [mean | max]
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(out[1], torch.cat([centre, centre]))  # nothing observed: the mean true token
    assert torch.allclose(pool_scene(tok)[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_pool_scene_keeps_what_one_tile_shows():
    """A small object seen in one tile of 100: the mean dilutes it a hundredfold, the max half
    keeps it whole (the old mean-only pooling scored such scenes like empty ones)."""
    from gl10m.model.crossscale.scoring import mean_half, pool_scene
    g = torch.Generator().manual_seed(3)
    d = 8
    base = torch.randn(1, 1, 1, 1, d, generator=g).expand(2, 100, 2, 2, d).clone()
    base += 0.01 * torch.randn(base.shape, generator=g)
    spike = torch.zeros(d)
    spike[5] = 4.0
    base[1, 37] += spike                   # scene 1 holds the object in tile 37 only
    out = pool_scene(base)
    assert out.shape == (2, 2 * d)
    mean_gap = (mean_half(out)[1] - mean_half(out)[0])[5]
    max_gap = (out[1, d:] - out[0, d:])[5]
    assert mean_gap < 0.06 and max_gap > 3.9
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[:, 30:40] = True                  # observed tiles only: the max is over them
    assert (pool_scene(base, mask)[1, d:] - pool_scene(base, mask)[0, d:])[5] > 3.9
    mask[:, 37] = False
    assert (pool_scene(base, mask)[1, d:] - pool_scene(base, mask)[0, d:])[5] < 0.1


def test_centred_text_scoring_separates_collinear_concepts():
    """Concept texts = a large common direction + a small own one (mean pairwise cosine ~0.9):
    raw cosines rank scenes by the common direction, centred ones by the concept's own."""
    from gl10m.model.crossscale.scoring import SceneSpace, center_text
    g = torch.Generator().manual_seed(0)
    c, e, n = 6, 16, 60
    common = torch.nn.functional.normalize(torch.randn(e, generator=g), dim=0)
    own = torch.linalg.qr(torch.randn(e, e, generator=g))[0][:c]
    own = own - (own @ common)[:, None] * common          # orthogonal to the common direction
    text = torch.nn.functional.normalize(3 * common + torch.nn.functional.normalize(own, dim=-1), dim=-1)
    cos = text @ text.T
    assert cos[~torch.eye(c, dtype=torch.bool)].mean() > 0.85
    labels = torch.zeros(n, c, dtype=torch.uint8)
    labels[torch.arange(n), torch.arange(n) % c] = 1
    # scene embedding: its concept's own direction + a scene-specific amount of the common one
    emb = own[torch.arange(n) % c] * 0.3 + (torch.rand(n, 1, generator=g) * 2 - 1) * 3 * common
    space = SceneSpace(lambda x: x, text, torch.zeros(e), "identity")
    centred = M.retrieval(space.score(torch.nn.functional.normalize(emb, dim=-1)).numpy(), labels.numpy())
    raw = M.retrieval((torch.nn.functional.normalize(emb, dim=-1) @ text.T).numpy(), labels.numpy())
    assert centred["all"]["mAP@100"] == pytest.approx(1.0)
    assert raw["all"]["mAP@100"] < 0.6
    tc = center_text(text)
    off = ~torch.eye(c, dtype=torch.bool)
    assert torch.allclose(tc.norm(dim=-1), torch.ones(c)) and abs(float((tc @ tc.T)[off].mean())) < 0.25


def test_timer_accounts_stages_and_io_apart():
    ticks = iter([0.0, 1.0, 1.0, 1.5, 2.0, 4.0, 10.0, 10.25])
    t = EV.Timer("cpu", clock=lambda: next(ticks))
    with t("encode_hr"):
        pass
    with t("io_hr"):
        pass
    with t("encode_hr"):
        pass
    with pytest.raises(RuntimeError):
        with t("predictor"):
            raise RuntimeError("boom")       # a failing stage is still charged
    assert t.totals == {"encode_hr": 3.0, "io_hr": 0.5, "predictor": 0.25}
    assert t.syncs == 0                      # nothing to synchronise on the CPU
    shared = EV.Timer("cpu")
    shared.totals.update({"io_lr": 0.3, "decode_lr": 0.2, "encode_lr": 1.0, "sampler": 0.1})
    tm = EV._timing(t, shared, ("decode_lr", "encode_lr", "sampler"), n=2)
    assert tm["split_s"] == pytest.approx(3.0 + 0.25 + 0.2 + 1.0 + 0.1)
    assert tm["io_split_s"] == pytest.approx(0.5 + 0.3)
    assert tm["per_scene_s"] == pytest.approx(tm["split_s"] / 2)
    no_lr = EV._timing(t, shared, (), n=1)   # a row that never touches LR is not charged its stages
    assert no_lr["split_s"] == pytest.approx(3.25) and no_lr["io_split_s"] == pytest.approx(0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_timer_synchronises_cuda():  # pragma: no cover - runs where a GPU is
    t = EV.Timer("cuda")
    with t("x"):
        torch.randn(512, 512, device="cuda") @ torch.randn(512, 512, device="cuda")
    assert t.syncs == 2 and t.totals["x"] > 0


def test_resolve_novel():
    labels = ["Tennis", "Solar farm", "Wind farm"]
    assert EV.resolve_novel(["solar farm", "2"], labels) == [1, 2]
    assert EV.resolve_novel(None, labels, extra=[0]) == [0]
    with pytest.raises(UserError, match="not one of"):
        EV.resolve_novel(["volcano"], labels)
    with pytest.raises(UserError, match="outside"):
        EV.resolve_novel(["7"], labels)


# -- a tiny trained model on real shards ----------------------------------------------------------
TINY_ENC = dict(backend="vit", width=32, depth=1, heads=2, patch=8, hr_size=32, lr_size=80, pool=2, embed_dim=16)
TINY_PRED = {"dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "pool": 2}


@pytest.fixture(scope="module")
def model_env(tmp_path_factory):
    from gl10m.model import encoders as E
    from gl10m.model.crossscale.features import write_features
    from gl10m.model.crossscale.train import train
    from tests.fixtures.samples import build_shards

    root = tmp_path_factory.mktemp("eval")
    sd = build_shards(root, n_train=4, n_val=5)
    torch.manual_seed(0)
    md = root / "model"
    enc, _ = E.build_encoder(TINY_ENC)
    E.save_encoder(enc, md / "encoder", text_raw=E.TextEncoder().concepts(E.concept_labels()),
                   labels=E.concept_labels())
    write_features(sd, root / "features", md / "encoder", batch_size=4)
    base = {"batch_size": 2, "steps": 3, "lr": 1e-3, "warmup_steps": 1, "ckpt_every": 3, "progress": False}
    held = {"novel_concepts": [0, 3, 4]}  # the novel concepts, held out of s_gain as of stage II
    train({"task": "sampler", "model": {"hidden": 8, "kernel": 3, "layers": 1}, "supervision": held, **base},
          root / "features", md / "sampler")
    train({"task": "sampler", "model": {"hidden": 8, "kernel": 3, "layers": 1},
           "supervision": {"variant": "structural", "lam": 0.5, **held}, **base}, root / "features",
          md / "sampler-structural")
    train({"task": "predictor", "model": TINY_PRED, **base}, root / "features", md / "predictor")
    train({"task": "predictor", "model": {**TINY_PRED, "use_lr": False}, **base}, root / "features",
          md / "predictor-nolr")
    train({"task": "predictor_stage2", "model": TINY_PRED, "novel_concepts": [0, 3, 4], **base}, root / "features",
          md / "predictor-stage2")
    return sd, md


def test_report_of_a_tiny_trained_model(model_env, tmp_path):
    sd, md = model_env
    out = tmp_path / "report"
    rep = EV.evaluate(md, sd, out, split="val", device="cpu", batch_size=2, novel=["Tennis"], progress=False,
                      allow_small=True, n_boot=50)
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "sweep.png"}
    assert json.loads((out / "report.json").read_text()) == rep
    assert rep["scenes"] == 5 and rep["split"] == "val" and rep["small_split"] is True
    rows = rep["rows"]
    assert list(rows) == ["lr_only", "full_hr", "random", "random_predictor", "sampler_only", "lr_fill",
                          "predictor_nolr", "default", "default_stage1", "sampler_structural", "oracle_cover"]
    assert rep["scoring"]["space"].startswith("the stage II head")
    assert rep["selection"]["threshold"] == 0.55 and rep["selection"]["source"] == "sampler's config"
    assert rep["novel_holdout"] == {"encoder": "not recorded", "sampler": ["Tennis", "Pool", "Golf course"],
                                    "predictor-stage2": ["Tennis", "Pool", "Golf course"]}
    assert rows["lr_only"]["obr"] == 0.0 and rows["full_hr"]["obr"] == 1.0
    # OBR accounting: the default row's OBR is the mean of its per-scene OBR; random matches it
    per = rep["obr_per_scene"]
    assert len(per) == 5 and rows["default"]["obr"] == pytest.approx(sum(per.values()) / 5, abs=1e-6)
    assert rows["random"]["obr"] == pytest.approx(rows["default"]["obr"], abs=1e-6)
    assert rows["sampler_only"]["obr"] == pytest.approx(rows["default"]["obr"], abs=1e-6)
    assert rows["oracle_cover"]["obr"] == pytest.approx(rows["default"]["obr"], abs=1e-6)
    # novel = --novel plus the stage II checkpoint's held-out concepts
    assert rep["concepts"]["novel"] == [EV.load_bundle(md).labels[i] for i in (0, 3, 4)]
    for r in rows.values():
        assert set(r["metrics"]) == set(r["map100"]) == set(r["map20"]) == {"all", "base", "novel"}
        assert r["map100"]["all"] == r["metrics"]["all"]["mAP@100"]
        for g in r["metrics"].values():
            for k in ("mAP@20", "mAP@100", "AP_macro", "AP_weighted"):
                assert g[k] is None or 0.0 <= g[k] <= 1.0
        for k in ("map20", "map100"):   # bootstrap intervals around every point estimate
            for grp, (lo, hi) in r["ci95"][k].items():
                v = r[k][grp]
                assert v is None or lo is None or lo - 1e-9 <= hi
        assert r["time"]["per_scene_s"] >= 0 and r["time"]["io_per_scene_s"] >= 0
    assert "default-lr_only" in rep["paired"] and "gap_recovered" in rep["paired"]
    assert "default-sampler_structural" in rep["paired"] and "oracle_cover-default" in rep["paired"]
    d = rep["paired"]["oracle_cover-default"]["map100"]["all"]
    assert d["diff"] == pytest.approx(rows["oracle_cover"]["map100"]["all"] - rows["default"]["map100"]["all"])
    assert rows["full_hr"]["time"]["stages_s"]["encode_hr"] > 0
    assert "predictor" in rows["default"]["time"]["stages_s"] and "predictor" not in rows["sampler_only"]["time"]["stages_s"]
    assert "encode_lr" not in rows["full_hr"]["time"]["stages_s"]
    # the sweep: thresholds 0 .. 1 and top-12; OBR falls as the threshold rises
    sw = {s["selection"]: s for s in rep["sweep"]}
    assert list(sw) == [f"threshold {t:g}" for t in EV.SWEEP_THRESHOLDS] + ["top-12"]
    obrs = [sw[f"threshold {t:g}"]["obr"] for t in EV.SWEEP_THRESHOLDS]
    assert obrs == sorted(obrs, reverse=True) and obrs[0] == 1.0 and obrs[-1] == 0.0  # 1.0 = no HR
    assert sw["top-12"]["obr"] == pytest.approx(0.12)
    assert sw["threshold 0.55"]["mAP@100"] == pytest.approx(rows["default"]["metrics"]["all"]["mAP@100"])
    md_text = (out / "report.md").read_text()
    assert "| default |" in md_text and "threshold 0.55" in md_text and "![mAP@100 against OBR](sweep.png)" in md_text
    assert "not meaningful" in md_text
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rep["per_concept_default"]) == 66


def test_rows_really_differ_and_reruns_are_identical(model_env, tmp_path):
    sd, md = model_env
    bundle = EV.load_bundle(md)
    from gl10m import data as gdata
    with gdata.SampleReader(sd, "val") as reader:
        ev = EV.Evaluator(bundle, reader, batch_size=3, progress=False)
        a = ev.run(sweep=False)
        b = ev.run(sweep=False)
    for k in a["scores"]:
        np.testing.assert_array_equal(a["scores"][k], b["scores"][k])
    # LR only, full HR, observed-only and predictor-completed scenes score differently
    for x, y in (("lr_only", "full_hr"), ("sampler_only", "default"), ("default", "lr_fill"),
                 ("default", "predictor_nolr")):
        assert not np.allclose(a["scores"][x], a["scores"][y]), (x, y)
    # full HR through the evaluator == the one scene space applied to the encoder's own tokens
    it = next(iter(gdata.load(sd, split="val", decode_meta=False, tile_px=bundle.encoder.tile_px)))
    with torch.inference_mode():
        pooled, _, _ = bundle.encoder.encode_hr(it["hr"].contiguous())
        want = bundle.space.score(bundle.space.embed(pooled[None]))[0].numpy()
    np.testing.assert_allclose(a["scores"]["full_hr"][0], want, rtol=1e-4, atol=1e-5)


def test_every_row_scores_the_same_grid_the_same_way(model_env):
    """One scene space: the default pipeline at threshold 1 (no tile) completes the same grid as
    lr_only and scores it identically; at threshold 0 (every tile) it observes the same grid as
    full_hr. (Before: lr_only used the LR head's embedding, full HR the mean of tile embeddings.)"""
    sd, md = model_env
    bundle = EV.load_bundle(md)
    from gl10m import data as gdata
    with gdata.SampleReader(sd, "val") as reader:
        ev = EV.Evaluator(bundle, reader, batch_size=2, progress=False, sweep=(0.0, 1.0))
        r = ev.run(rows=("lr_only", "full_hr", "sampler_only"))
    assert r["sweep_masks"]["threshold 1"].sum() == 0 and r["sweep_masks"]["threshold 0"].all()
    np.testing.assert_allclose(r["sweep_scores"]["threshold 1"], r["scores"]["lr_only"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["sweep_scores"]["threshold 0"], r["scores"]["full_hr"], rtol=1e-5, atol=1e-6)
    # the stage II head is the training-time scene embedding: Predictor.forward(return_embed) on the
    # completed grid equals the evaluation's space
    p2 = bundle.predictor_stage2
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(2, 100, 2, 2, bundle.encoder.token_dim, generator=g)
    lr = torch.randn(2, 10, 10, bundle.encoder.token_dim, generator=g)
    mask = torch.rand(2, 100, generator=g) < 0.2
    with torch.inference_mode():
        pred, emb = p2(lr, tok, mask, return_embed=True)
        from gl10m.model.crossscale.predictor import complete
        torch.testing.assert_close(torch.nn.functional.normalize(emb, dim=-1),
                                   bundle.space.embed(complete(tok, pred, mask)), rtol=1e-5, atol=1e-6)


def test_eval_errors(model_env, tmp_path):
    sd, md = model_env
    with pytest.raises(UserError, match="no such model dir"):
        EV.evaluate(tmp_path / "nope", sd, tmp_path / "r", split="val", progress=False)
    with pytest.raises(UserError, match="no split 'test'"):
        EV.evaluate(md, sd, tmp_path / "r", split="test", progress=False)
    with pytest.raises(UserError, match="unknown sampler variant"):
        EV.load_bundle(md, variants={"bogus": md / "sampler"})
    with pytest.raises(UserError, match="uses LR context"):
        EV.load_bundle(md, predictor_nolr=md / "predictor")
    with pytest.raises(UserError, match="threshold"):
        EV.evaluate(md, sd, tmp_path / "r", split="val", threshold=1.5, progress=False, allow_small=True)
    # a novel concept some part was trained on is refused
    with pytest.raises(UserError, match="Skate park were not held out of the sampler"):
        EV.evaluate(md, sd, tmp_path / "r", split="val", novel=["Skate park"], progress=False, allow_small=True)
    # mAP on 5 scenes is refused unless asked for
    with pytest.raises(UserError, match="5 scenes.*--allow-small"):
        EV.evaluate(md, sd, tmp_path / "r", split="val", progress=False)
    # the threshold is never calibrated on the split reported
    with pytest.raises(UserError, match="calibrated on split 'val'"):
        EV.evaluate(md, sd, tmp_path / "r", split="val", target_obr=0.1, progress=False, allow_small=True)
    with pytest.raises(UserError, match="not both"):
        EV.evaluate(md, sd, tmp_path / "r", split="val", target_obr=0.1, threshold=0.5, progress=False)
    assert not (tmp_path / "r").exists()  # nothing written on a failed start


def test_cli_eval_and_dry_run(model_env, tmp_path):
    sd, md = model_env
    exe = str(Path(sys.executable).with_name("gl10m"))
    env = {**os.environ, "COLUMNS": "200"}
    dry = subprocess.run([exe, "model", "eval", "--checkpoint", str(md), "--shards", str(sd), "--split", "val",
                          "--out", str(tmp_path / "r"), "--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "5 scenes" in dry.stdout and "predictor-stage2" in dry.stdout and not (tmp_path / "r").exists()
    run = subprocess.run([exe, "model", "eval", "--checkpoint", str(md), "--shards", str(sd), "--split", "val",
                          "--out", str(tmp_path / "r"), "--no-sweep", "--limit", "2", "--device", "cpu",
                          "--allow-small", "--bootstrap", "20",
                          "--variant", f"structural={md / 'sampler-structural'}"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["scenes"] == 2 and rep["sweep"] == [] and "default" in run.stdout
    bad = subprocess.run([exe, "model", "eval", "--checkpoint", str(md), "--shards", str(sd), "--split", "val",
                          "--out", str(tmp_path / "r2"), "--variant", "structural"], capture_output=True, text=True)
    assert bad.returncode == 2 and "VARIANT=RUN_DIR" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    small = subprocess.run([exe, "model", "eval", "--checkpoint", str(md), "--shards", str(sd), "--split", "val",
                            "--out", str(tmp_path / "r3")], capture_output=True, text=True)
    assert small.returncode == 2 and "--allow-small" in small.stderr and len(small.stderr.strip().splitlines()) == 1


def test_target_obr_calibrates_the_shared_threshold_on_val(model_env, tmp_path):
    sd, md = model_env
    rep = EV.evaluate(md, sd, tmp_path / "r", split="train", device="cpu", batch_size=4, target_obr=0.12,
                      progress=False, allow_small=True, sweep=False, n_boot=10)
    sel = rep["selection"]
    bundle = EV.load_bundle(md)
    from gl10m import data as gdata
    with gdata.SampleReader(sd, "val") as reader:
        logits = EV.sampler_logits(bundle, reader, batch_size=2)
    t, got = EV.calibrate_threshold(logits, 0.12)
    assert sel["source"] == "calibration on val" and sel["calibration"]["split"] == "val"
    assert sel["calibration"]["scenes"] == 5 and sel["calibration"]["obr"] == pytest.approx(got, abs=1e-6)
    assert sel["threshold"] == pytest.approx(t, abs=1e-6) and sel["target_obr"] == 0.12  # the report rounds to 1e-6
    assert got == pytest.approx(0.12, abs=0.01)
    # the calibrated threshold is what the train split's default row used
    with gdata.SampleReader(sd, "train") as reader:
        tl = EV.sampler_logits(bundle, reader)
    from gl10m.model.crossscale.selection import select
    assert rep["rows"]["default"]["obr"] == pytest.approx(float(select(tl, threshold=sel["threshold"]).float().mean()),
                                                          abs=1e-6)
    assert "calibrated on split `val`" in (tmp_path / "r" / "report.md").read_text()


def test_a_per_scene_budget_gives_every_scene_its_k_best_tiles(model_env, tmp_path):
    """--budget K: the sampler-driven rows take exactly the K best-scored tiles of every scene (no
    threshold), the random rows the same count; a budget with a threshold is refused."""
    sd, md = model_env
    rep = EV.evaluate(md, sd, tmp_path / "r", split="val", device="cpu", batch_size=2, budget=7, progress=False,
                      allow_small=True, sweep=False, n_boot=10)
    for name in ("default", "random", "random_predictor", "sampler_only", "lr_fill", "predictor_nolr"):
        assert rep["rows"][name]["obr"] == pytest.approx(0.07), name
    assert rep["selection"]["budget"] == 7 and rep["selection"]["threshold"] is None
    assert "per-scene budget" in rep["selection"]["source"]
    bundle = EV.load_bundle(md)
    from gl10m import data as gdata
    from gl10m.model.crossscale.selection import select, top_k_mask
    with gdata.SampleReader(sd, "val") as reader:
        logits = EV.sampler_logits(bundle, reader, batch_size=2)
    # at the sampler config's threshold the OBR differs: the budget, not a threshold, decided
    assert float(select(logits, threshold=bundle.selection.get("threshold", 0.55)).float().mean()) != \
        pytest.approx(0.07)
    assert top_k_mask(logits, 7).sum(1).eq(7).all()
    assert "per-scene budget" in (tmp_path / "r" / "report.md").read_text()
    for bad in ({"threshold": 0.5}, {"target_obr": 0.1}):
        with pytest.raises(UserError, match="budget"):
            EV.evaluate(md, sd, tmp_path / "x", split="val", budget=7, progress=False, allow_small=True, **bad)
    with pytest.raises(UserError, match="budget must be an int in 1..100"):
        EV.evaluate(md, sd, tmp_path / "x", split="val", budget=0, progress=False, allow_small=True)


def test_the_scene_head_scores_every_row_when_the_model_has_one(model_env, tmp_path):
    """A model dir with scene-head/: the bundle's one scene space is that head (its weights, its
    name in the report); without stage II it is refused."""
    import shutil

    from gl10m.model.crossscale.scene_head import fit_scene_head, load_scene_head

    sd, md0 = model_env
    md = tmp_path / "model"
    shutil.copytree(md0, md)
    feats = md0.parent / "features"
    fit_scene_head(feats, EV.latest_checkpoint(md / "predictor-stage2"), md / "scene-head",
                   {"steps": 5, "batch_size": 4, "forward_batch": 2})
    b = EV.load_bundle(md)
    head, info = load_scene_head(md / "scene-head")
    assert "scene head" in b.space.name and info["novel_concepts"] == [0, 3, 4]
    for k, v in head.state_dict().items():
        assert torch.equal(b.space.head.state_dict()[k], v), k
    assert not torch.equal(b.space.head[1].weight, b.predictor_stage2.head[1].weight)  # not stage II's own
    rep = EV.evaluate(md, sd, tmp_path / "r", split="val", device="cpu", batch_size=2, progress=False,
                      allow_small=True, sweep=False, n_boot=10)
    assert "scene head" in rep["scoring"]["space"] and rep["novel_holdout"]["scene-head"] == \
        [b.labels[c] for c in (0, 3, 4)]
    shutil.rmtree(md / "predictor-stage2")
    with pytest.raises(UserError, match="needs the stage II predictor"):
        EV.load_bundle(md)


# -- does the predictor use LR? (model/crossscale/completion.py) -------------------------------

def test_tile_cosines_judge_only_the_unobserved_tiles():
    from gl10m.model.crossscale.completion import tile_cosines

    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        true = torch.randn(3, 100, 2, 2, 8, generator=g)
        centre = torch.randn(8, generator=g)
        mask = torch.rand(3, 100, generator=g) < 0.12
        n_un = int((~mask).sum())
        assert torch.allclose(tile_cosines(true, true, mask, centre), torch.ones(n_un), atol=1e-5)
        mirrored = 2 * centre - true  # the same offsets from the centre, the other way
        assert torch.allclose(tile_cosines(mirrored, true, mask, centre), -torch.ones(n_un), atol=1e-5)
        # an observed tile's prediction is not judged: spoiling it changes nothing
        spoiled = true.clone()
        spoiled[mask] = 0
        assert torch.equal(tile_cosines(spoiled, true, mask, centre), tile_cosines(true, true, mask, centre))
    with pytest.raises(ValueError):
        tile_cosines(true[:1], true, mask, centre)


def test_completion_check_tells_a_predictor_that_uses_lr_from_one_that_does_not():
    from gl10m.model.crossscale.completion import CompletionCheck
    from gl10m.model.crossscale.predictor import Predictor

    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        kw = dict(in_dim=8, g=2, lr_dim=8, lr_grid=10, dim=16, depth=1, heads=2, mlp_ratio=2.0)
        uses = Predictor(**kw).eval()
        deaf = Predictor(**kw).eval()
        nolr = Predictor(**kw, use_lr=False).eval()
        with torch.no_grad():  # LR enters only through lr_proj: zeroed, every scene's LR looks the same
            deaf.lr_proj.weight.zero_()
            deaf.lr_proj.bias.zero_()
        g = torch.Generator().manual_seed(seed)
        lr = torch.randn(4, 10, 10, 8, generator=g)
        true = torch.randn(4, 100, 2, 2, 8, generator=g)
        mask = torch.rand(4, 100, generator=g) < 0.12
        res = {}
        with torch.no_grad():
            for name, p in (("uses", uses), ("deaf", deaf)):
                ck = CompletionCheck(torch.zeros(8))
                ck.add(p, nolr, lr, true, mask)
                res[name] = ck.result()
        assert res["deaf"]["own_lr"] == pytest.approx(res["deaf"]["other_lr"], abs=1e-6)
        assert abs(res["uses"]["own_lr"] - res["uses"]["other_lr"]) > 1e-4
        assert res["uses"]["no_lr"] == res["deaf"]["no_lr"] is not None
        assert res["uses"]["tiles"] == int((~mask).sum())
    ck = CompletionCheck(torch.zeros(8))  # one scene: no other scene's LR to swap in
    with torch.no_grad():
        ck.add(uses, None, lr[:1], true[:1], mask[:1])
    r = ck.result()
    assert r["other_lr"] is None and r["no_lr"] is None and r["own_lr"] is not None


def test_the_report_carries_the_completion_check(model_env, tmp_path):
    """The check runs on the default's tiles with the full_hr row's tokens: own LR as the default row
    completes them, the report and its markdown say so; without full_hr it is absent."""
    sd, md = model_env
    bundle = EV.load_bundle(md)
    from gl10m import data as gdata
    from gl10m.model.crossscale.completion import CompletionCheck
    with gdata.SampleReader(sd, "val") as reader:
        ev = EV.Evaluator(bundle, reader, batch_size=3, progress=False, budget=12)
        r = ev.run(sweep=False)
        comp = r["completion"]
        assert set(comp) == {"own_lr", "other_lr", "no_lr", "tiles"} and comp["tiles"] == 5 * 88
        assert all(-1 <= comp[k] <= 1 for k in ("own_lr", "other_lr", "no_lr"))
        # the same numbers by hand: every tile encoded, the default's 12 tiles observed
        want = CompletionCheck(bundle.space.centre)
        items = list(gdata.load(sd, split="val", decode_meta=False, tile_px=bundle.encoder.tile_px))
        with torch.inference_mode():
            for lo in (0, 3):
                batch = items[lo:lo + 3]
                lr_tok = bundle.encoder.encode_lr(torch.stack([b["lr"] for b in batch]))[0].float()
                full = torch.stack([bundle.encoder.encode_hr(b["hr"].contiguous())[0].float() for b in batch])
                m = EV.select(bundle.sampler(lr_tok).float(), threshold=None, top_k=12)
                want.add(bundle.completer, bundle.predictor_nolr, lr_tok, full, m)
        for k in ("own_lr", "other_lr", "no_lr"):
            assert comp[k] == pytest.approx(want.result()[k], abs=1e-4)
        assert ev.run(rows=("lr_only", "default"), sweep=False)["completion"] is None
    rep = EV.evaluate(md, sd, tmp_path / "rep", split="val", device="cpu", batch_size=3, progress=False,
                      allow_small=True, n_boot=0, budget=12, sweep=False)
    assert rep["completion"]["tiles"] == 5 * 88
    assert "Does the predictor use LR?" in (tmp_path / "rep" / "report.md").read_text()
