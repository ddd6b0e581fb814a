"""The demo: the whole chain on the offline testbed, end to end, on one machine.

build the world (once) -> serve it (STAC API + Range HTTP, stopped afterwards) -> index ->
download -> shard -> verify -> a picture of one region and of one sample -> the model, briefly
(bootstrap encoder, feature cache, samplers, predictors) -> its evaluation on the test split
(`gl10m model eval`: report.md with the baselines, ablations and the threshold sweep). Every stage
is the real one (same functions as `gl10m index/download/shard/model ...`), so a rerun skips what
the data stages have done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gl10m.errors import UserError
from gl10m.pipelines.runner import ClusterOptions, console, dask_client

DEMO_ENCODER_STEPS = 30  # a bootstrap encoder that has seen the data, in about a minute on 2 cores
# The demo's held-out ("novel") concepts: stage II never sees their labels, and the report lists
# them apart from the base concepts. The paper's own Novel split is not published with its numbers.
DEMO_NOVEL = ("Golf course", "Stadium", "Helipad", "Dam", "Solar farm", "Wind farm", "Marina", "Prison",
              "Toll booth", "Cemetery")


@dataclass
class DemoResult:
    workdir: Path
    world: Path
    shards: Path
    samples: dict[str, int] = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    shard_summary: str = ""  # what became of the planned scenes, rejections by reason


def run_demo(workdir: str | Path, *, workers: int | None = None, quiet: bool = False,
             spec: str | Path | None = None, rebuild: bool = False, model: bool = True) -> DemoResult:
    from gl10m import profile as prof
    from gl10m import shards
    from gl10m.pipelines import download, index, shard
    from gl10m.testbed import build as tb
    from gl10m.testbed import serve

    wd = Path(workdir).resolve()
    world = wd / "world"
    res = DemoResult(workdir=wd, world=world, shards=shard.shards_dir(wd))

    def step(name, fn):
        t0 = time.perf_counter()
        if not quiet:
            console.rule(f"[bold]{name}")
        out = fn()
        res.seconds[name] = round(time.perf_counter() - t0, 1)
        return out

    if rebuild or not (world / "profile.yaml").exists():
        step("testbed build", lambda: tb.build(world, spec_path=spec,
                                               progress=None if quiet else (lambda m: console.print(f"[dim]{m}"))))
    p = prof.load(world / "profile.yaml")
    with serve.serve(world) as servers:
        if not quiet:
            console.print(f"[dim]serving: STAC {servers.stac_url}, files {servers.http_url}[/dim]")
        with dask_client(ClusterOptions(workers=workers), quiet=quiet) as client:
            ix = step("index", lambda: index.run_index(p, wd, client=client, quiet=quiet))
            _check(ix, "index", wd)
            dl = step("download", lambda: download.run_download(p, wd, client=client, stac_url=servers.stac_url,
                                                                 quiet=quiet))
            _check(dl, "download", wd)
    sh = step("shard", lambda: shard.run_shard(p, wd, quiet=quiet))
    res.samples = dict(sh.samples)
    res.shard_summary = sh.summary()
    if not sum(res.samples.values()):
        raise UserError("the demo produced no samples; see `gl10m status -w " + str(wd) + "`")
    step("verify", lambda: shards.verify(res.shards))
    pics = wd / "pictures"
    pics.mkdir(exist_ok=True)

    def draw():
        from gl10m import inspect as insp

        region = sorted(p.regions)[0]
        out = [tb.render_preview(world, region, pics / f"region-{region}.png")]
        key = insp.read_index(res.shards)["key"].iloc[0]
        out.append(insp.show(key, res.shards, pics / f"sample-{key}.png", profile=p))
        return out

    res.pictures = step("pictures", draw)
    if model:
        done = _model_done(res.shards, wd)
        if done is not None:  # the model of these very shards is trained and evaluated
            res.model, res.report = done["model"], done["report"]
            if not quiet:
                console.print(f"[dim]model: up to date ({wd / 'model' / DEMO_MODEL_STAMP})[/dim]")
        else:
            import shutil

            shutil.rmtree(wd / "model", ignore_errors=True)  # a partial or stale model: start over
            import os

            import torch

            # the Dask cluster leaves OMP_NUM_THREADS=1 behind in this process: the model uses every core
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                      else (os.cpu_count() or 1)))
            res.model = step("model", lambda: _demo_model(res.shards, wd, world / "profile.yaml", quiet))
            res.report = step("eval", lambda: _demo_eval(res.shards, wd, quiet))
            _model_stamp(res.shards, wd, res.model, res.report)
    return res


DEMO_MODEL_STAMP = "demo.json"


def _shards_digest(shards_dir: Path) -> str:
    import hashlib

    from gl10m.shards import MANIFEST_NAME

    return hashlib.sha256((shards_dir / MANIFEST_NAME).read_bytes()).hexdigest()


def _model_done(shards_dir: Path, wd: Path) -> dict | None:
    """The stamp of a finished demo model (trained and evaluated on these shards), else None."""
    import json

    p = wd / "model" / DEMO_MODEL_STAMP
    try:
        st = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(st, dict) and st.get("shards") == _shards_digest(shards_dir) and {"model", "report"} <= set(st)
    return st if ok else None


def _model_stamp(shards_dir: Path, wd: Path, model: dict, report: dict) -> None:
    import json

    from gl10m.io import atomic_write_text

    atomic_write_text(wd / "model" / DEMO_MODEL_STAMP, json.dumps(
        {"shards": _shards_digest(shards_dir), "model": model, "report": report}, indent=1, default=str) + "\n")


def _demo_model(shards_dir: Path, wd: Path, profile_path: Path, quiet: bool) -> dict:
    """Bootstrap encoder -> feature cache -> the samplers (multiplicative and structural
    supervision) and predictors (stage I, stage I without LR, stage II), briefly, on CPU: the
    model dir ``W/model`` that `gl10m model eval --checkpoint W/model` reads."""
    import json

    from gl10m.model.encoders import concept_labels
    from gl10m.model.crossscale.features import write_features
    from gl10m.model.crossscale.pretrain import cli_pretrain_encoder
    from gl10m.model.crossscale.train import checkpoint_paths, load_config, train

    say = (lambda m: None) if quiet else (lambda m: console.print(f"[dim]{m}[/dim]"))
    configs = Path(__file__).resolve().parent.parent / "model" / "configs"
    md = wd / "model"
    labels = [lab.lower() for lab in concept_labels(str(profile_path))]
    novel = [labels.index(c.lower()) for c in DEMO_NOVEL]
    # the novel concepts are held out of the encoder's pretraining; the feature cache records it and
    # the samplers' s_gain and stage II hold out the same concepts (their default)
    enc = cli_pretrain_encoder(shards_dir, md / "encoder", steps=DEMO_ENCODER_STEPS, batch_size=4,
                               profile=str(profile_path), novel=novel, echo=say)
    write_features(shards_dir, md / "features", enc)

    def cfg(name: str, **over) -> dict:
        c = {k: v for k, v in load_config(configs / name).items() if k != "_given"}
        return {**c, **over}

    sampler = cfg("demo-sampler.yaml")
    predictor = cfg("demo-predictor.yaml")
    runs = [("sampler", sampler),
            ("sampler-structural", {**sampler, "supervision": {**sampler["supervision"], "variant": "structural"}}),
            ("predictor", predictor),
            ("predictor-nolr", {**predictor, "model": {**predictor["model"], "use_lr": False}})]
    out = {}
    for name, c in runs + [("predictor-stage2", None)]:
        if c is None:  # stage II starts from the stage I weights and holds the novel concepts out
            c = {**predictor, "task": "predictor_stage2", "steps": 100, "ckpt_every": 100, "lr": 5e-4,
                 "init_from": str(checkpoint_paths(md / "predictor")[-1]), "novel_concepts": novel}
        r = train(c, md / "features", md / name)
        losses = [json.loads(line)["loss"] for line in (md / name / "metrics.jsonl").open()]
        k = max(1, len(losses) // 10)
        out[name] = {"checkpoint": str(r["checkpoint"]), "loss_first": round(sum(losses[:k]) / k, 4),
                     "loss_last": round(sum(losses[-k:]) / k, 4)}
        say(f"{name}: loss {out[name]['loss_first']} -> {out[name]['loss_last']} (mean of first/last {k} steps)")
    return out


def _demo_eval(shards_dir: Path, wd: Path, quiet: bool) -> dict:
    """`gl10m model eval` of the demo's model dir on the test split -> W/model/eval/report.*"""
    from gl10m.model.crossscale.evaluate import evaluate

    # a handful of test scenes: allow_small, and the report and the CLI say the numbers mean nothing
    rep = evaluate(wd / "model", shards_dir, wd / "model" / "eval", split="test", device="cpu",
                   progress=not quiet, allow_small=True)
    return {"report": str(wd / "model" / "eval" / "report.md"), "rows": rep["rows"], "sweep": rep["sweep"],
            "scenes": rep["scenes"]}


def _check(res, what: str, workdir: Path) -> None:
    """Stop the demo when units of a stage failed: exit 3 (transient: rerun) or 2 (a rejected
    region), one line naming the first, tracebacks in W/logs/."""
    from gl10m.outcomes import FailedUnits, verdict, write_log

    fails = res.failures()
    if not fails:
        return
    v = verdict(fails, command="demo", log=write_log(workdir, f"demo-{what}", fails))
    msg = f"{what}: {v.lines[0]}" + (f" (and {len(fails) - 1} more)" if len(fails) > 1 else "") + f"; {v.last}"
    raise (FailedUnits if v.code == 3 else UserError)(msg)
