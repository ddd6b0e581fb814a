"""``gl10m model pretrain-encoder|features|train|fit|eval``: the cross-scale model from the command
line. A typer sub-app (``app``), registered in gl10m/cli.py like MapSR's; each command imports torch
and its module when it runs, so ``gl10m --help`` stays fast."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gl10m.lock import enclosing_lock

app = typer.Typer(help="The cost-aware cross-scale model: encoders, feature cache, training.",
                  no_args_is_help=True)

out = Console(soft_wrap=False)

ProfileOpt = typer.Option(None, "--profile", "-p", help="Profile YAML (default: manifests/gl10m-66.yaml).")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")


def _echo(msg: str) -> None:
    out.print(msg, highlight=False)


@app.command("pretrain-encoder")
def model_pretrain(shards_dir: Path = typer.Argument(..., help="A shards folder (W/shards)."),
                   out_dir: Path = typer.Argument(..., help="Where encoder.pt and its config go."),
                   config: Optional[Path] = typer.Option(None, "--config", help="Encoder/pretraining YAML."),
                   steps: Optional[int] = typer.Option(None, "--steps"),
                   batch_size: Optional[int] = typer.Option(None, "--batch-size"),
                   device: Optional[str] = DeviceOpt, seed: Optional[int] = typer.Option(None, "--seed"),
                   profile: Optional[Path] = ProfileOpt,
                   novel: Optional[str] = typer.Option(
                       None, "--novel", help="Comma-separated concepts (names or ids) held out of pretraining "
                       "(default: the profile's novel: true concepts).")):
    """Bootstrap a small ViT tile encoder on the shards (SigLIP: HR tiles vs concept text)."""
    from gl10m.model.crossscale.pretrain import cli_pretrain_encoder

    cli_pretrain_encoder(shards_dir, out_dir, config, steps=steps, batch_size=batch_size, device=device,
                         seed=seed, profile=str(profile) if profile else None,
                         novel=None if novel is None else [x.strip() for x in novel.split(",") if x.strip()],
                         echo=_echo)


@app.command("features")
def model_features(shards_dir: Path = typer.Argument(..., help="A shards folder (W/shards)."),
                   out_dir: Path = typer.Argument(..., help="The feature cache folder."),
                   encoder: Path = typer.Option(..., "--encoder", help="Saved encoder dir, encoder.pt or a YAML."),
                   split: Optional[str] = typer.Option(None, "--split"),
                   batch_size: int = typer.Option(8, "--batch-size"), device: str = typer.Option("cpu", "--device"),
                   shard_mb: float = typer.Option(256, "--shard-mb"),
                   num_workers: int = typer.Option(0, "--num-workers"),
                   no_resume: bool = typer.Option(False, "--no-resume"), profile: Optional[Path] = ProfileOpt):
    """Run the frozen encoders once over the shards; write features keyed like the samples."""
    from gl10m.model.crossscale.features import cli_features

    with enclosing_lock(out_dir, what="feature cache folder"):
        cli_features(shards_dir, out_dir, encoder, split=split, batch_size=batch_size, device=device,
                     shard_mb=shard_mb, resume=not no_resume, num_workers=num_workers,
                     profile=str(profile) if profile else None, echo=_echo)


@app.command("train")
def model_train(config: Path = typer.Option(..., "--config", help="Training YAML (task: sampler, predictor, ...)."),
                features: Path = typer.Option(..., "--features", help="The feature cache folder."),
                out_dir: Path = typer.Option(..., "--out", help="Checkpoints and metrics.jsonl go here."),
                resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
                max_steps: Optional[int] = typer.Option(None, "--max-steps"), device: Optional[str] = DeviceOpt):
    """Train the sampler or the predictor (stage I / II) on cached features; torchrun for DDP."""
    from gl10m.model.crossscale.train import cli_train

    cli_train(config, features, out_dir, resume=resume, max_steps=max_steps, device=device, echo=_echo)


@app.command("fit")
def model_fit(shards: Path = typer.Option(..., "--shards", help="A shards folder (W/shards)."),
              out_dir: Path = typer.Option(..., "--out", help="The model dir (what `gl10m model eval` reads)."),
              config: Optional[Path] = typer.Option(
                  None, "--config", help="Fit YAML (default: model/configs/fit-cpu.yaml; fit-gpu.yaml on a GPU)."),
              encoder: Optional[Path] = typer.Option(
                  None, "--encoder", help="A saved encoder folder: skip the bootstrap and use these weights."),
              device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (default: the config's)."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Say which parts would run or resume; run nothing.")):
    """Train the whole model from image shards: encoder bootstrap, feature cache, sampler (+ the
    ablation samplers the config names: coverage and structural), predictor stage I (+ no-LR ablation) and stage II, and the scene head
    every evaluation row is scored through, with novel concepts held out everywhere. Reruns skip finished parts, resume unfinished ones and redo what changed."""
    from gl10m.model.crossscale.fit import cli_fit

    if dry_run:
        return cli_fit(shards, out_dir, config, encoder=encoder, device=device, dry_run=True, echo=_echo)
    with enclosing_lock(out_dir, what="model dir"):
        cli_fit(shards, out_dir, config, encoder=encoder, device=device, dry_run=dry_run, echo=_echo)


@app.command("eval")
def model_eval(checkpoint: Optional[Path] = typer.Option(
                   None, "--checkpoint", help="Model dir: encoder/, sampler/, predictor/ (optional predictor-nolr/, "
                   "predictor-stage2/, sampler-<variant>/); each part can also be given below."),
               shards: Path = typer.Option(..., "--shards", help="The shards folder (W/shards) or its URL."),
               split: str = typer.Option("test", "--split", help="Which split to evaluate."),
               out_dir: Path = typer.Option(..., "--out", help="Report dir: report.json, report.md, sweep.png."),
               encoder: Optional[Path] = typer.Option(None, "--encoder", help="A saved encoder (folder)."),
               sampler: Optional[Path] = typer.Option(None, "--sampler", help="Sampler run dir or checkpoint."),
               predictor: Optional[Path] = typer.Option(None, "--predictor", help="Predictor run dir or checkpoint."),
               predictor_nolr: Optional[Path] = typer.Option(
                   None, "--predictor-nolr", help="A predictor trained without LR context (ablation row)."),
               predictor_stage2: Optional[Path] = typer.Option(
                   None, "--predictor-stage2", help="A stage II predictor (row scored by its SigLIP head)."),
               variant: Optional[list[str]] = typer.Option(
                   None, "--variant", help="VARIANT=RUN: a sampler trained on another supervision variant "
                   "(multiplicative, structural, semantic, additive, coverage); repeatable."),
               novel: Optional[str] = typer.Option(
                   None, "--novel", help="Comma-separated novel concepts (names or ids), reported apart from base."),
               threshold: Optional[float] = typer.Option(
                   None, "--threshold", help="Default selection threshold on sigmoid(sampler logit), strict: "
                   "1.0 selects nothing (default: the sampler's config, 0.55)."),
               target_obr: Optional[float] = typer.Option(
                   None, "--target-obr", help="Calibrate the shared threshold on the val split to this OBR "
                   "(e.g. 0.12); the threshold and the val OBR go in the report."),
               allow_small: bool = typer.Option(
                   False, "--allow-small", help="Report mAP on a split of fewer than 100 scenes anyway."),
               n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95 % intervals."),
               top_k: Optional[int] = typer.Option(None, "--top-k", help="The sweep's top-k point (default: 12)."),
               budget: Optional[int] = typer.Option(
                   None, "--budget", help="Per-scene budget: every scene gets its K best tiles (OBR K/100 on "
                   "every split) instead of a threshold; not with --threshold/--target-obr."),
               batch_size: int = typer.Option(32, "--batch-size", help="Scenes per batch."),
               limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N scenes."),
               no_sweep: bool = typer.Option(False, "--no-sweep", help="Skip the threshold sweep."),
               seed: int = typer.Option(0, "--seed", help="Seed of the random-tiles baseline."),
               device: Optional[str] = DeviceOpt,
               dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be evaluated, run nothing.")):
    """Evaluate the sampler + predictor on a split: mAP@20/100 (all, base, novel), OBR and time per
    scene for the default pipeline, its baselines and ablations, and the threshold sweep."""
    from gl10m.model.crossscale.evaluate import EvalError, describe, evaluate, summary_table

    variants = {}
    for v in variant or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--variant {v!r}: expected VARIANT=RUN_DIR")
        variants[name.strip()] = Path(path)
    paths = dict(encoder=encoder, sampler=sampler, predictor=predictor, predictor_nolr=predictor_nolr,
                 predictor_stage2=predictor_stage2, variants=variants)
    if dry_run:
        d = describe(checkpoint, shards, split=split, **paths)
        t = Table("part", "file", title=f"gl10m model eval --dry-run: {d['scenes']} scenes of split {d['split']!r}")
        for k, v in d["parts"].items():
            t.add_row(k, v)
        out.print(t)
        out.print(f"rows: {', '.join(d['rows'])}; sweep: {'no' if no_sweep else 'yes'}; report -> {out_dir}")
        return
    novel_list = [x for x in (novel or "").split(",") if x.strip()]
    rep = evaluate(checkpoint, shards, out_dir, split=split, device=device or "auto", batch_size=batch_size,
                   seed=seed, threshold=threshold, target_obr=target_obr, top_k=top_k, budget=budget, novel=novel_list,
                   limit=limit, sweep=not no_sweep, allow_small=allow_small, n_boot=n_boot, **paths)
    sel = rep["selection"]
    how = sel["source"] if sel.get("budget") else f"threshold {sel['threshold']:.4g} ({sel['source']})"
    t = Table("row", "OBR", "mAP@100 [95 %]", "ms/scene", title=f"{rep['scenes']} scenes of {split!r}, {how}")
    for r in summary_table(rep):
        t.add_row(*r)
    out.print(t)
    if rep["small_split"]:
        out.print(f"{rep['scenes']} scenes only: these numbers are not meaningful (--allow-small)")
    out.print(f"report: {out_dir / 'report.md'}")

