"""The demo: the whole chain on the offline testbed, end to end, on one machine.

build the world (once) -> serve it (STAC API + Range HTTP, stopped afterwards) -> index ->
download -> shard -> verify -> a picture of one region and of one sample -> the model, briefly
(bootstrap encoder, feature cache, sampler, predictor stage I). Every stage is the
real one (same functions as `gl10m index/download/shard`), so a rerun skips what is done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gl10m.errors import UserError
from gl10m.pipelines.runner import ClusterOptions, console, dask_client

DEMO_ENCODER_STEPS = 30  # a bootstrap encoder that has seen the data, in about a minute on 2 cores


@dataclass
class DemoResult:
    workdir: Path
    world: Path
    shards: Path
    samples: dict[str, int] = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


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
            _check(ix.outcomes, "index")
            dl = step("download", lambda: download.run_download(p, wd, client=client, stac_url=servers.stac_url,
                                                                 quiet=quiet))
            _check(dl.outcomes, "download")
    sh = step("shard", lambda: shard.run_shard(p, wd, quiet=quiet))
    res.samples = dict(sh.samples)
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
        res.model = step("model", lambda: _demo_model(res.shards, wd, world / "profile.yaml", quiet))
    return res


def _demo_model(shards_dir: Path, wd: Path, profile_path: Path, quiet: bool) -> dict:
    """Bootstrap encoder -> feature cache -> sampler and predictor stage I, briefly, on CPU."""
    import json

    from gl10m.model.features import write_features
    from gl10m.model.pretrain import cli_pretrain_encoder
    from gl10m.model.train import train

    say = (lambda m: None) if quiet else (lambda m: console.print(f"[dim]{m}[/dim]"))
    configs = Path(__file__).resolve().parent.parent / "model" / "configs"
    enc = cli_pretrain_encoder(shards_dir, wd / "model" / "encoder", steps=DEMO_ENCODER_STEPS, batch_size=4,
                               profile=str(profile_path), echo=say)
    write_features(shards_dir, wd / "model" / "features", enc)
    out = {}
    for name, cfg in (("sampler", "demo-sampler.yaml"), ("predictor", "demo-predictor.yaml")):
        r = train(configs / cfg, wd / "model" / "features", wd / "model" / name)
        losses = [json.loads(line)["loss"] for line in (wd / "model" / name / "metrics.jsonl").open()]
        k = max(1, len(losses) // 10)
        out[name] = {"checkpoint": str(r["checkpoint"]), "loss_first": round(sum(losses[:k]) / k, 4),
                     "loss_last": round(sum(losses[-k:]) / k, 4)}
        say(f"{name}: loss {out[name]['loss_first']} -> {out[name]['loss_last']} (mean of first/last {k} steps)")
    return out


def _check(outcomes: dict, what: str) -> None:
    bad = [f"{s}/{u}: {v}" for (s, u), v in sorted(outcomes.items()) if v.startswith("failed")]
    if bad:
        raise UserError(f"{what}: {bad[0]} (and {len(bad) - 1} more)" if len(bad) > 1 else f"{what}: {bad[0]}")
