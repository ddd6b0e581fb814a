"""`gl10m model fit`: the whole model from real (tiny) shards in one resumable command."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gl10m.errors import UserError  # noqa: E402
from gl10m.model.crossscale import fit as F  # noqa: E402
from gl10m.model.crossscale import train as T  # noqa: E402

TINY_ENC = dict(backend="vit", width=32, depth=1, heads=2, patch=8, hr_size=32, lr_size=80, pool=2, embed_dim=16)
TINY_PRED = {"dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "pool": 2, "use_lr": True,
             "grad_checkpointing": False}
BASE = {"batch_size": 2, "steps": 4, "warmup_steps": 1, "ckpt_every": 2}
PARTS = ["encoder", "features", "sampler", "sampler-structural", "predictor", "predictor-nolr", "predictor-stage2",
         "scene-head"]


def tiny_config(**over) -> dict:
    cfg = {"device": "cpu", "novel": ["Tennis", "Pool"],
           "encoder": {"base": "encoder-bootstrap.yaml", "encoder": TINY_ENC,
                       "train": {"steps": 2, "batch_size": 2, "tiles_per_scene": 2}},
           "features": {"batch_size": 4},
           "sampler": {"base": "sampler-train.yaml", "model": {"hidden": 8, "kernel": 3, "layers": 1}, **BASE},
           "variants": ["structural"],
           "predictor": {"base": "train-predictor.yaml", "model": TINY_PRED, **BASE, "num_workers": 0},
           "stage2": {"base": "train-predictor-stage2.yaml", "model": TINY_PRED, **BASE, "num_workers": 0},
           "scene_head": {"steps": 20, "batch_size": 4, "forward_batch": 4, "log_every": 10}}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.fixtures.samples import build_shards

    return build_shards(tmp_path_factory.mktemp("fit"), n_train=6, n_val=4)


@pytest.fixture(scope="module")
def fitted(shards, tmp_path_factory):
    md = tmp_path_factory.mktemp("fitted") / "model"
    res = F.fit(shards, md, tiny_config(), echo=lambda m: None)
    return md, res


def _mtimes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_fit_writes_the_model_dir_that_eval_reads(fitted, shards):
    from gl10m.model.crossscale.evaluate import resolve_parts

    md, res = fitted
    assert list(res["parts"]) == PARTS and all(v["status"] == "done" for v in res["parts"].values())
    parts = resolve_parts(md)
    assert set(parts) == {"encoder", "sampler", "sampler-structural", "predictor", "predictor-nolr",
                          "predictor-stage2", "scene-head"}
    st = json.loads((md / F.STATE_NAME).read_text())["parts"]
    assert set(st) == set(PARTS) and all(v["status"] == "done" for v in st.values())
    assert st["features"]["scenes"] == 10  # every split encoded
    # stage II starts from stage I and holds the novel concepts out
    s2 = T.load_checkpoint(T.checkpoint_paths(md / "predictor-stage2")[-1])["config"]
    assert s2["task"] == "predictor_stage2" and s2["init_from"] == str(T.checkpoint_paths(md / "predictor")[-1])
    labels = [lab.lower() for lab in __import__("gl10m.model.encoders", fromlist=["x"]).concept_labels()]
    assert s2["novel_concepts"] == sorted([labels.index("tennis"), labels.index("pool")]) == res["novel"]
    # the predictors train on masks from the trained sampler; the no-LR ablation really has no LR
    p = T.load_checkpoint(T.checkpoint_paths(md / "predictor")[-1])["config"]
    assert p["sampler_checkpoint"] == str(T.checkpoint_paths(md / "sampler")[-1])
    nolr = T.load_checkpoint(T.checkpoint_paths(md / "predictor-nolr")[-1])["config"]
    assert nolr["model"]["use_lr"] is False and p["model"]["use_lr"] is True
    sv = T.load_checkpoint(T.checkpoint_paths(md / "sampler-structural")[-1])["config"]
    assert sv["supervision"]["variant"] == "structural"


def test_rerun_skips_what_is_done_and_redoes_only_what_changed(fitted, shards, tmp_path):
    md = tmp_path / "model"
    shutil.copytree(fitted[0], md)  # copy2: mtimes kept; the module's model stays as fitted
    before = _mtimes(md)
    res = F.fit(shards, md, tiny_config(), echo=lambda m: None)
    assert all(v["status"].startswith("done (up to date)") for v in res["parts"].values())
    assert _mtimes(md) == before  # nothing rewritten
    # a new predictor setting: the predictors and stage II are redone, nothing upstream
    cfg = tiny_config()
    cfg["predictor"] = {**cfg["predictor"], "lr": 5e-4}
    res = F.fit(shards, md, cfg, echo=lambda m: None)
    st = {k: v["status"] for k, v in res["parts"].items()}
    assert st == {"encoder": "done (up to date)", "features": "done (up to date)", "sampler": "done (up to date)",
                  "sampler-structural": "done (up to date)", "predictor": "done", "predictor-nolr": "done",
                  "predictor-stage2": "done", "scene-head": "done"}
    after = _mtimes(md)
    for part in ("encoder", "features", "sampler"):
        assert {k: v for k, v in after.items() if k.startswith(part + "/")} == \
            {k: v for k, v in before.items() if k.startswith(part + "/")}
    assert T.load_checkpoint(T.checkpoint_paths(md / "predictor")[-1])["config"]["lr"] == 5e-4


def test_an_interrupted_part_resumes_to_the_same_run(shards, tmp_path, monkeypatch, fitted):
    """A crash in the middle of a training part (after a checkpoint): the rerun continues that run
    from its checkpoint and ends with the losses an uninterrupted fit logs."""
    md = tmp_path / "model"
    real = T.train
    crashed = []

    def crash_once(cfg, feats, out, **kw):
        if Path(out).name == "predictor" and not crashed:
            real(cfg, feats, out, **{**kw, "max_steps": 2})
            crashed.append(out)
            raise KeyboardInterrupt  # killed after its step-2 checkpoint
        return real(cfg, feats, out, **kw)

    monkeypatch.setattr(T, "train", crash_once)
    with pytest.raises(KeyboardInterrupt):
        F.fit(shards, md, tiny_config(), echo=lambda m: None)
    st = json.loads((md / F.STATE_NAME).read_text())["parts"]
    assert st["predictor"]["status"] == "running" and "predictor-nolr" not in st
    msgs = []
    res = F.fit(shards, md, tiny_config(), echo=msgs.append)
    assert any(m.startswith("predictor: resuming") for m in msgs)
    assert res["parts"]["sampler"]["status"].startswith("done (up to date)")
    ref, _ = fitted
    assert _losses(md / "predictor") == _losses(ref / "predictor")
    assert _losses(md / "predictor-stage2") == _losses(ref / "predictor-stage2")


def test_given_encoder_weights_skip_the_bootstrap(fitted, shards, tmp_path):
    md, _ = fitted
    msgs = []
    res = F.fit(shards, tmp_path / "m2", tiny_config(variants=[], predictor_nolr=False, stage2=False, scene_head=False),
                encoder=md / "encoder", echo=msgs.append)
    assert list(res["parts"]) == ["encoder", "features", "sampler", "predictor"]
    assert res["parts"]["encoder"]["source"] == str(md / "encoder")
    assert not any("encoder: step" in m for m in msgs)  # no pretraining steps ran
    assert (tmp_path / "m2" / "encoder" / "encoder.pt").read_bytes() == (md / "encoder" / "encoder.pt").read_bytes()


def test_dry_run_writes_nothing(fitted, shards, tmp_path):
    md, _ = fitted
    res = F.fit(shards, tmp_path / "new", tiny_config(), dry_run=True, echo=lambda m: None)
    assert {v["status"] for v in res["parts"].values()} == {"would run"}
    assert not (tmp_path / "new").exists()
    res = F.fit(shards, md, tiny_config(), dry_run=True, echo=lambda m: None)
    assert all(v["status"].startswith("done (up to date)") for v in res["parts"].values())


@pytest.mark.parametrize("cfg, msg", [
    ({"bogus": 1}, "unknown section 'bogus'"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda"),
    ({"novel": ["Not a concept"]}, "is not one of the 66 concepts"),
    ({"novel": [66]}, "outside 0..65"),
    ({"variants": ["nope"]}, "unknown sampler variant 'nope'"),
    ({"sampler": {"base": "no-such.yaml"}}, "no-such.yaml: not found"),
])
def test_bad_configs_are_one_line_errors(shards, tmp_path, cfg, msg):
    with pytest.raises(UserError, match=msg):
        F.fit(shards, tmp_path / "m", tiny_config(**cfg), echo=lambda m: None)
    assert not (tmp_path / "m").exists()


def test_cli_fit_errors_and_dry_run(shards, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    cli = [sys.executable, "-m", "gl10m.cli", "model", "fit"]
    r = subprocess.run(cli + ["--shards", str(tmp_path), "--out", str(tmp_path / "m")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "not a shards folder" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    cfgf = tmp_path / "fit.yaml"
    cfgf.write_text(json.dumps(tiny_config()))  # JSON is YAML
    r = subprocess.run(cli + ["--shards", str(shards), "--out", str(tmp_path / "m"), "--config", str(cfgf),
                              "--dry-run"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "predictor-stage2: would run" in r.stdout and "novel concepts held out: Tennis, Pool" in r.stdout
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["fit-cpu.yaml", "fit-gpu.yaml"])
def test_shipped_fit_configs_resolve(name, shards, tmp_path):
    """The bundled configs load, name real concepts, and build valid encoders and parts."""
    from gl10m.model.encoders import EncoderConfig, concept_labels

    cfg = F.load_fit_config(F.CONFIGS / name)
    EncoderConfig.from_dict(cfg["encoder"]["config"]["encoder"])
    assert len(F.resolve_novel(cfg["novel"], concept_labels())) == 10
    plans, info = F.plan(shards, tmp_path / "m", F.CONFIGS / name, device="cpu", echo=lambda m: None)
    assert [p.name for p in plans] == PARTS[:3] + ["sampler-coverage"] + PARTS[3:]
    assert not (tmp_path / "m").exists()
    # the default sampler learns the paper's G*; coverage and structural are ablation rows
    assert cfg["sampler"]["supervision"]["variant"] == "multiplicative"
    assert cfg["variants"] == ["coverage", "structural"]
