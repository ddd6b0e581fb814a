"""The `gl10m` command line: build stages, standalone tools, the offline testbed."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gl10m.errors import UserError
from gl10m.outcomes import EXIT_CODES_HELP

app = typer.Typer(
    help="Build GL-10M-style paired Sentinel-2 / NAIP datasets from OpenStreetMap concepts.\n\n"
         "Stages: index (osm -> anchors), then download and shard. Try it offline first:\n"
         "`gl10m testbed build --out W/world` and `gl10m testbed serve W/world`.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
testbed_app = typer.Typer(help="The offline testbed world: build it, serve it, look at it.",
                          no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")
profile_app = typer.Typer(help="Inspect and validate dataset profiles.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")
# The models' command groups live with the models, each a typer app registered here the same way
# (their commands import torch when they run): the cross-scale model and MapSR (land-cover map
# super-resolution). An install without gl10m.model has neither; any other import error is a bug.
for _name, _module, _attr in (("model", "gl10m.model.crossscale.cli", "app"),
                              ("mapsr", "gl10m.model.mapsr.cli", "mapsr_app")):
    try:
        app.add_typer(getattr(importlib.import_module(_module), _attr), name=_name)
    except ModuleNotFoundError as e:  # pragma: no cover - a data-only install
        if not (e.name or "").startswith("gl10m.model"):
            raise

out = Console(soft_wrap=False)
err = Console(stderr=True, soft_wrap=True)

ProfileOpt = typer.Option(None, "--profile", "-p", help="Profile YAML (default: manifests/gl10m-66.yaml).")
WorkdirOpt = typer.Option(..., "--workdir", "-w", help="Work dir: one folder per stage, the ledger, downloads.")
StatesOpt = typer.Option(None, "--states", help="Comma-separated region codes, e.g. CA,TX (default: all).")
WorkersOpt = typer.Option(None, "--workers", help="Dask workers of the local cluster (default: min(2, cores)).")
ThreadsOpt = typer.Option(1, "--threads", help="Threads per Dask worker.")
SchedulerOpt = typer.Option(None, "--scheduler", help="Use an existing Dask cluster (tcp://host:port).")
NoDaskOpt = typer.Option(False, "--no-dask", help="Run every step in this process, in order (debugging).")

BboxOpt = typer.Option(None, "--bbox", help="A regional subset: west,south,east,north in degrees; each selected "
                       "region is clipped to it (pass the same --bbox to every stage).")

ConceptsOpt = typer.Option(
    None, "--concepts", help="A concept subset: comma-separated concept names of the profile, e.g. "
    "swimming_pool,tennis (case and spaces/hyphens for _ do not matter). Only scenes holding at least one of "
    "them are planned, fetched and sharded, and the class-aware subsampling target is filled from that "
    "subset. The index is the full one (index only reports the subset's size); the subset is taken at plan. "
    "Pass the same --concepts to plan/download and shard.")


def _regions(prof, states: Optional[str], bbox: Optional[str]):
    """(profile, regions) for --states and --bbox."""
    regions = prof.select_regions(states)
    if bbox is None:
        return prof, regions
    parts = [p.strip() for p in bbox.split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise UserError(f"--bbox must be four numbers west,south,east,north, got {bbox!r}")
    return prof.subset(box, regions)


def _writer_lock(workdir: Path, *, create: bool = True, what: str = "work dir"):
    """The work dir's one-writer lock (gl10m.lock) for a command that writes into it."""
    from gl10m.lock import workdir_lock

    return workdir_lock(workdir, create=create, what=what)


def _profile(path: Optional[Path]):
    from gl10m import profile as prof

    return prof.load(path)


def _client_opts(workers, threads, scheduler):
    from gl10m.pipelines.runner import ClusterOptions

    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    if threads < 1:
        raise UserError("--threads must be at least 1")
    return ClusterOptions(workers=workers, threads=threads, scheduler=scheduler)


@app.command(epilog=EXIT_CODES_HELP)
def index(profile: Optional[Path] = ProfileOpt, workdir: Path = WorkdirOpt, states: Optional[str] = StatesOpt,
          bbox: Optional[str] = BboxOpt, concepts: Optional[str] = ConceptsOpt,
          stage: Optional[str] = typer.Option(None, "--stage", help="Run one stage only: osm or anchors."),
          force: bool = typer.Option(False, "--force", help="Redo even what the ledger says is done."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Say what would run, run nothing."),
          workers: Optional[int] = WorkersOpt, threads: int = ThreadsOpt,
          scheduler: Optional[str] = SchedulerOpt, no_dask: bool = NoDaskOpt,
          partitions: int = typer.Option(4, "--partitions", help="Spatial partitions per region for anchors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Index stages: PBF -> concept features (osm) -> thinned scene candidates (anchors)."""
    from gl10m.pipelines import index as ix
    from gl10m.pipelines.runner import dask_client

    prof, regions = _regions(_profile(profile), states, bbox)
    subset = prof.select_concepts(concepts)
    stages = ix.STAGES if stage is None else (stage,)
    if stage is not None and stage not in ix.STAGES:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(ix.STAGES)}")
    if dry_run:
        res = ix.run_index(prof, workdir, regions=regions, stages=stages, force=force, dry_run=True)
        t = Table("stage", "region", "would", "why", "source", title="gl10m index --dry-run")
        for p in res.plans:
            t.add_row(p.stage, p.region, "run" if p.run else "skip", p.why,
                      prof.pbf_source(p.region) if p.stage == "osm" else str(ix.osm_path(workdir, p.region)))
        out.print(t)
        return
    if partitions < 1:  # option values before the work dir is locked (and so created)
        raise UserError(f"--partitions must be at least 1, got {partitions!r}")
    opts = None if no_dask else _client_opts(workers, threads, scheduler)
    with _writer_lock(workdir):
        if no_dask:
            res = ix.run_index(prof, workdir, regions=regions, stages=stages, force=force, quiet=quiet,
                               n_partitions=partitions)
        else:
            with dask_client(opts, quiet=quiet) as client:
                res = ix.run_index(prof, workdir, regions=regions, stages=stages, client=client, force=force,
                                   quiet=quiet, n_partitions=partitions)
        ran = [k for k, v in res.outcomes.items() if not v.startswith("skipped")]
        if not ran:
            out.print("nothing to do: every requested stage is up to date (use --force to redo)")
        _print_summary(workdir, stages=list(stages), run=res.summaries)
        if subset is not None:
            _print_subset_size(prof, workdir, regions, subset)
        _finish(workdir, "index", res.failures())


def _print_subset_size(prof, workdir: Path, regions, subset) -> None:
    """index --concepts: how many of each region's candidates the subset keeps."""
    from gl10m import anchors
    from gl10m.pipelines.index import anchors_path

    names = ",".join(prof.concepts[i].name for i in subset)
    for r in regions:
        p = anchors_path(workdir, r)
        if p.exists():
            cand = anchors.read_candidates(p)
            n = len(anchors.filter_by_concepts(cand, subset))
            out.print(f"--concepts {names}: {n} of {len(cand)} {r} candidates hold one of them", highlight=False,
                      soft_wrap=True)


StacUrlOpt = typer.Option(None, "--stac-url", help="Override the profile's provider.stac_url (e.g. the testbed's).")
MaxScenesOpt = typer.Option(None, "--max-scenes", help="At most this many scenes per state (caps the profile target).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the class-aware subsampling.")
ProviderOpt = typer.Option(None, "--provider", help="Imagery provider: stac or earthengine (default: the profile's).")
EeProjectOpt = typer.Option(None, "--ee-project", help="earthengine: the Cloud project (ee.Initialize(project=...)).")
EeKeyOpt = typer.Option(None, "--ee-key-file", help="earthengine: a service-account key file (default: stored "
                        "credentials or GOOGLE_APPLICATION_CREDENTIALS).")
EeUrlOpt = typer.Option(None, "--ee-url", help="earthengine: another API endpoint (the testbed's stand-in).")


def _with_provider(prof, provider: Optional[str], ee_project: Optional[str], ee_key_file: Optional[Path],
                   ee_url: Optional[str]):
    """The profile with its provider section overridden from the command line (validated)."""
    over = {k: v for k, v in (("name", provider), ("project", ee_project),
                              ("key_file", str(ee_key_file) if ee_key_file else None), ("ee_url", ee_url)) if v}
    if not over:
        return prof
    from pydantic import ValidationError

    from gl10m.profile import Provider, format_validation_error

    try:
        new = Provider.model_validate({**prof.provider.model_dump(), **over})
    except ValidationError as e:
        raise UserError(f"provider: {format_validation_error(e)}") from None
    return prof.model_copy(update={"provider": new})


def _print_dry_run(prof, workdir, regions, stac_url, max_scenes, seed, quiet, subset=None) -> None:
    from gl10m import plan as planmod
    from gl10m.pipelines import download as dl

    res = dl.run_download(prof, workdir, regions=regions, stac_url=stac_url, max_scenes=max_scenes,
                          seed=seed, dry_run=True, quiet=quiet, concepts=subset)
    out.print(planmod.format_estimate(res.estimate, res.rejections), highlight=False)


@app.command(epilog=EXIT_CODES_HELP)
def plan(profile: Optional[Path] = ProfileOpt, workdir: Path = WorkdirOpt, states: Optional[str] = StatesOpt,
         bbox: Optional[str] = BboxOpt, concepts: Optional[str] = ConceptsOpt,
         stac_url: Optional[str] = StacUrlOpt, max_scenes: Optional[int] = MaxScenesOpt, seed: int = SeedOpt,
         provider: Optional[str] = ProviderOpt, ee_project: Optional[str] = EeProjectOpt,
         ee_key_file: Optional[Path] = EeKeyOpt, ee_url: Optional[str] = EeUrlOpt,
         dry_run: bool = typer.Option(False, "--dry-run", help="Search and plan in memory, write nothing, print the cost."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Catalog the providers' items and plan the scenes to fetch; print scenes, requests and bytes."""
    from gl10m import plan as planmod
    from gl10m.pipelines import download as dl

    prof, regions = _regions(_with_provider(_profile(profile), provider, ee_project, ee_key_file, ee_url), states, bbox)
    subset = prof.select_concepts(concepts)
    if dry_run:
        return _print_dry_run(prof, workdir, regions, stac_url, max_scenes, seed, quiet, subset)
    with _writer_lock(workdir, create=False):
        res = dl.run_download(prof, workdir, regions=regions, stages=("catalog", "plan"), stac_url=stac_url,
                              max_scenes=max_scenes, seed=seed, quiet=quiet, concepts=subset)
        import pandas as pd

        rows = [planmod.read_plan(planmod.plan_path(workdir, r)) for r in regions
                if planmod.plan_path(workdir, r).exists()]
        if rows:
            out.print(planmod.format_estimate(planmod.estimate(pd.concat(rows, ignore_index=True), prof)),
                      highlight=False)
        _print_summary(workdir, stages=["catalog", "plan", "plan-scene"], run=res.summaries)
        _finish(workdir, "plan", res.failures())


@app.command(epilog=EXIT_CODES_HELP)
def download(profile: Optional[Path] = ProfileOpt, workdir: Path = WorkdirOpt, states: Optional[str] = StatesOpt,
             bbox: Optional[str] = BboxOpt, concepts: Optional[str] = ConceptsOpt,
             stac_url: Optional[str] = StacUrlOpt, max_scenes: Optional[int] = MaxScenesOpt, seed: int = SeedOpt,
             provider: Optional[str] = ProviderOpt, ee_project: Optional[str] = EeProjectOpt,
             ee_key_file: Optional[Path] = EeKeyOpt, ee_url: Optional[str] = EeUrlOpt,
             dry_run: bool = typer.Option(False, "--dry-run", help="Plan only and print what would be fetched."),
             force: bool = typer.Option(False, "--force", help="Redo even what the ledger says is done."),
             workers: Optional[int] = WorkersOpt, threads: int = ThreadsOpt,
             scheduler: Optional[str] = SchedulerOpt, no_dask: bool = NoDaskOpt,
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Catalog, plan and fetch: one staged sample (LR composite + 100 HR tiles) per scene, from a
    STAC provider (COG windows) or Earth Engine (`--provider earthengine`: computePixels)."""
    from gl10m.pipelines import download as dl
    from gl10m.pipelines.runner import dask_client

    prof, regions = _regions(_with_provider(_profile(profile), provider, ee_project, ee_key_file, ee_url), states, bbox)
    subset = prof.select_concepts(concepts)
    if dry_run:
        return _print_dry_run(prof, workdir, regions, stac_url, max_scenes, seed, quiet, subset)
    if max_scenes is not None and max_scenes < 0:  # before a Dask cluster is started for nothing
        raise UserError(f"--max-scenes must be >= 0, got {max_scenes}")
    opts = None if no_dask else _client_opts(workers, threads, scheduler)
    with _writer_lock(workdir, create=False):
        if prof.provider.name == "stac" and (Path(workdir) / "ledger.sqlite").is_file():
            stac_url = dl.preflight(prof, stac_url)  # an unreachable provider: one line, before Dask starts
        kw = dict(regions=regions, stac_url=stac_url, max_scenes=max_scenes, seed=seed, force=force, quiet=quiet,
                  concepts=subset)
        if no_dask:
            res = dl.run_download(prof, workdir, **kw)
        else:
            with dask_client(opts, quiet=quiet) as client:
                res = dl.run_download(prof, workdir, client=client, **kw)
        fetched = res.summaries.get("fetch")
        if fetched is not None and fetched.skipped and not fetched.ran:
            out.print("nothing to fetch: every planned scene is done (use --force to redo)")
        _print_summary(workdir, stages=["catalog", "plan", "fetch"], run=res.summaries)
        _finish(workdir, "download", res.failures())


@app.command(epilog=EXIT_CODES_HELP)
def shard(profile: Optional[Path] = ProfileOpt, workdir: Path = WorkdirOpt, states: Optional[str] = StatesOpt,
          bbox: Optional[str] = BboxOpt, concepts: Optional[str] = ConceptsOpt,
          shard_mb: Optional[int] = typer.Option(None, "--shard-mb", help="Target shard size in MB (default 768)."),
          force: bool = typer.Option(False, "--force", help="Rewrite even if nothing changed."),
          no_card: bool = typer.Option(False, "--no-card", help="Skip the dataset card and its plots."),
          allow_incomplete: bool = typer.Option(
              False, "--allow-incomplete", help="Shard even while planned scenes are failed or not fetched "
              "(the manifest and the card list them); without it such a build stops with exit code 3."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """Write WebDataset shards per split (byte copies of the staged samples), the index and the card."""
    from gl10m.pipelines import shard as sh

    prof, regions = _regions(_profile(profile), states, bbox)
    subset = prof.select_concepts(concepts)
    if shard_mb is not None and shard_mb < 1:
        raise UserError("--shard-mb must be at least 1")
    with _writer_lock(workdir, create=False):
        res = sh.run_shard(prof, workdir, regions=regions, max_bytes=shard_mb * 1024 * 1024 if shard_mb else None,
                           force=force, quiet=quiet, card=not no_card, allow_incomplete=allow_incomplete,
                           concepts=subset)
        if res.status.startswith("skipped"):
            out.print(f"nothing to do: shards are up to date ({res.status})")
        counts = ", ".join(f"{k} {v}" for k, v in res.samples.items()) or "no samples"
        out.print(f"shards in {res.out_dir}: {counts}", highlight=False)
        out.print(res.summary(), highlight=False)
        if res.missing:
            out.print(f"incomplete (--allow-incomplete): {len(res.missing)} planned scenes are not in the shards; "
                      "the manifest and the card list them", highlight=False)


@app.command()
def verify(shards_dir: Path = typer.Argument(..., help="A shards folder (W/shards)."),
           no_decode: bool = typer.Option(False, "--no-decode", help="Checksums and layout only; skip image decoding.")):
    """Check every shard against the index (checksums, fields, offsets, image sizes, labels)."""
    from gl10m import shards

    if not shards_dir.exists():
        raise UserError(f"{shards_dir}: no such folder")
    try:
        res = shards.verify(shards_dir, decode=not no_decode)
    except shards.VerifyError as e:  # one line per bad shard, then exit 2
        from rich.markup import escape

        for line in e.problems:
            err.print(f"[red]error:[/red] verify failed: {escape(line)}", highlight=False)
        raise typer.Exit(2) from None
    except shards.ShardError as e:
        raise UserError(f"verify failed: {e}") from None
    out.print(f"ok: {res['samples']} samples in {res['shards']} shards match the index")


@app.command()
def stats(shards_dir: Path = typer.Argument(..., help="A shards folder (W/shards)."),
          profile: Optional[Path] = ProfileOpt):
    """Samples per split and state, concept counts, shard sizes (from the index; no decoding)."""
    from gl10m import inspect as insp

    prof = _profile(profile) if profile else None
    out.print(insp.format_stats(insp.stats(shards_dir, prof)), highlight=False)


@app.command()
def show(key: str = typer.Argument(..., help="Sample key, e.g. CA-w20000019."),
         shards_dir: Path = typer.Option(..., "--shards", help="A shards folder (W/shards)."),
         output: Path = typer.Option(..., "--output", "-o", help="PNG to write."),
         mode: str = typer.Option("dominant", "--mode", help="dominant (per-tile dominant concept) or outlines."),
         profile: Optional[Path] = ProfileOpt):
    """Draw one sample: the LR image, the 10x10 HR mosaic and its per-tile concepts."""
    from gl10m import inspect as insp

    if mode not in ("dominant", "outlines"):
        raise UserError(f"--mode must be dominant or outlines, got {mode!r}")
    prof = _profile(profile) if profile else None
    insp.show(key, shards_dir, output, mode=mode, profile=prof)
    out.print(f"wrote {output}")


@app.command()
def export(key: str = typer.Argument(..., help="Sample key, e.g. CA-w20000019."),
           shards_dir: Path = typer.Option(..., "--shards", help="A shards folder (W/shards, with index.parquet)."),
           out_dir: Path = typer.Option(..., "--out", "-o", help="Where to write: the files go to OUT/KEY/."),
           tiles: str = typer.Option("all", "--tiles", help="HR tiles to write: all, or indices like 0,11,99 "
                                                            "(row*10 + col, row 0 north, col 0 west)."),
           lr: bool = typer.Option(True, "--lr/--no-lr", help="Write the LR image (lr.tif) too."),
           dry_run: bool = typer.Option(False, "--dry-run", help="List the files it would write; write nothing.")):
    """Write one sample as GeoTIFFs, OUT/KEY/lr.tif and OUT/KEY/hr_XX.tif (RGB uint8, deflate,
    EPSG:4326, the transforms from the sample's meta.json georef), that open in QGIS or rasterio
    where the scene is. KEY is found through the shards' index; only its needed members are read.
    Each file is written to a temp file and renamed into place. Exit 2 (one line on stderr) for
    an unknown key, a missing shards folder or shard, or a sample without georeferencing."""
    from gl10m.export import export_sample

    res = export_sample(shards_dir, key, out_dir, tiles=tiles, lr=lr, dry_run=dry_run)
    if dry_run:
        for p in res.paths:
            out.print(str(p), highlight=False, soft_wrap=True)
        out.print(f"dry run: would write {len(res.paths)} files to {res.folder}", highlight=False, soft_wrap=True)
    else:
        out.print(f"wrote {len(res.paths)} GeoTIFFs to {res.folder}", highlight=False, soft_wrap=True)


@app.command(epilog=EXIT_CODES_HELP)
def demo(workdir: Path = typer.Option(Path("work/demo"), "--workdir", "-w", help="Where the world and outputs go."),
         workers: Optional[int] = WorkersOpt,
         rebuild: bool = typer.Option(False, "--rebuild", help="Regenerate the testbed world even if it exists."),
         no_model: bool = typer.Option(False, "--no-model", help="Stop after the data (skip encoder and training)."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """The whole chain offline: build and serve the testbed, index, download, shard, verify, draw,
    then train the model briefly and evaluate it on the test split (W/model/eval/report.md)."""
    from gl10m.pipelines.demo import run_demo

    with _writer_lock(workdir):
        res = run_demo(workdir, workers=workers, quiet=quiet, rebuild=rebuild, model=not no_model)
    counts = ", ".join(f"{k} {v}" for k, v in res.samples.items())
    out.print(f"\n[bold]demo done[/bold] in {sum(res.seconds.values()):.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in res.seconds.items())})")
    out.print(f"shards:        {res.shards}  ({counts})")
    out.print(f"scenes:        {res.shard_summary}", highlight=False)
    out.print(f"dataset card:  {res.shards / 'README.md'}")
    out.print(f"pictures:      {', '.join(str(p) for p in res.pictures)}")
    if res.model:
        out.print(f"model:         {res.workdir / 'model'}  (training loss, mean of the first -> last tenth)")
    for name, m in res.model.items():
        out.print(f"  {name + ':':<19} {m['loss_first']} -> {m['loss_last']}")
    if res.report:
        t = Table("row", "OBR", "mAP@100", "ms/scene", title=f"model eval: {res.report['scenes']} test scenes")
        for name, r in res.report["rows"].items():
            m = r["map100"]["all"]
            t.add_row(name, f"{r['obr']:.3f}", "n/a" if m is None else f"{m:.3f}",
                      f"{1000 * r['time']['per_scene_s']:.0f}")
        out.print(t)
        out.print(f"[yellow]{res.report['scenes']} test scenes: the demo's numbers are not meaningful "
                  "(a smoke test of the pipeline, not a result)[/yellow]")
        out.print(f"eval report:   {res.report['report']}")
    out.print(f"ledger:        {_self_cmd()} status -w {res.workdir}", highlight=False)


def _self_cmd() -> str:
    """How to call this gl10m again: `gl10m` when that is on PATH, else the script's own path
    (e.g. .venv/bin/gl10m when the venv is not activated)."""
    import os
    import shutil

    me = Path(sys.argv[0])
    found = shutil.which("gl10m")
    if me.name == "gl10m" and (found is None or Path(found).resolve() != me.resolve()):
        try:
            return os.path.relpath(me)
        except ValueError:  # pragma: no cover - another drive
            return str(me)
    return "gl10m"


def _finish(workdir: Path, command: str, failures) -> None:
    """One line per failed unit (the first few), tracebacks to W/logs/, the closing line, the exit
    code (gl10m.outcomes)."""
    from rich.markup import escape

    from gl10m.outcomes import verdict, write_log

    fails = list(failures)
    v = verdict(fails, command=command, log=write_log(Path(workdir), command, fails))
    for line in v.lines:
        err.print(f"[red]{escape(line)}[/red]", highlight=False)
    if v.last:
        err.print(escape(v.last), highlight=False)
    if v.code:
        raise typer.Exit(v.code)


def _print_summary(workdir: Path, stages: list[str] | None = None, run: dict | None = None) -> None:
    """The ledger's counts per stage and outcome (every run so far), then one line per stage of this
    run (`run`: stage -> gl10m.pipelines.stage.StageSummary)."""
    from gl10m.ledger import Ledger

    path = Path(workdir) / "ledger.sqlite"
    if not path.exists():
        raise UserError(f"{workdir}: no ledger here (nothing has run in this work dir)")
    with Ledger(path) as led:
        rows = [r for r in led.summary() if stages is None or r[0] in stages]
    t = Table("stage", "outcome", "units", title=f"ledger {path}")
    for s, label, n in rows:
        t.add_row(s, label, str(n))
    out.print(t)
    for summary in (run or {}).values():
        out.print(f"this run: {summary.line()}", highlight=False)


@app.command()
def status(workdir: Path = WorkdirOpt,
           detail: bool = typer.Option(False, "--detail", help="One line per unit, not counts.")):
    """Print the ledger's summary: per stage, how many units passed and why the others did not."""
    if not detail:
        _print_summary(workdir)
        return
    from gl10m.ledger import Ledger

    if not (Path(workdir) / "ledger.sqlite").is_file():
        raise UserError(f"{workdir}: no ledger here (run `gl10m index` first)")
    with Ledger(Path(workdir) / "ledger.sqlite") as led:
        t = Table("stage", "unit", "outcome", "attempts", "updated")
        for o in led.outcomes():
            t.add_row(o.stage, o.unit, o.label, str(o.attempts), o.updated)
    out.print(t)


@app.command("osm")
def osm_cmd(pbf: Path = typer.Argument(..., help="Any .osm.pbf file."),
            output: Path = typer.Option(..., "--output", "-o", help="GeoParquet to write."),
            profile: Optional[Path] = ProfileOpt,
            report: Optional[Path] = typer.Option(None, "--report", help="Also write the yield report (CSV).")):
    """Standalone: extract the profile's concept features from any PBF into GeoParquet."""
    if not pbf.exists():
        raise UserError(f"{pbf}: no such file")
    prof = _profile(profile)
    from gl10m import osm

    res = osm.extract(pbf, prof)
    osm.write_features(res.features, output)
    rep = osm.yield_report(res.features, prof)
    if report:
        from gl10m.io import atomic_path

        with atomic_path(report) as t:
            rep.to_csv(t, index=False)
    out.print(f"{len(res.features)} features -> {output}")
    out.print(" ".join(f"{k}={v}" for k, v in sorted(res.stats.items())))
    zero = list(rep.loc[rep["zero"], "name"]) if "zero" in rep else []
    if zero:
        out.print(f"[yellow]zero yield: {', '.join(zero)}[/yellow]")


@profile_app.command("check")
def profile_check(path: Optional[Path] = typer.Argument(None, help="Profile YAML (default: gl10m-66).")):
    """Validate a profile and print what it defines."""
    prof = _profile(path)
    scheme = prof.splits.schemes[prof.splits.scheme]
    out.print(f"{prof.name} v{prof.version}: {prof.n_concepts} concepts, {len(prof.regions)} regions, "
              f"footprint {prof.geometry.footprint_deg} deg, {prof.geometry.grid}x{prof.geometry.grid} tiles "
              f"of {prof.geometry.tile_px} px; split '{prof.splits.scheme}' train={','.join(scheme.train)} "
              f"val={','.join(scheme.val)} test={','.join(scheme.test)}; hash {prof.hash()}")


# -- testbed ---------------------------------------------------------------------------------
@testbed_app.command("build")
def testbed_build(out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the world into."),
                  spec: Optional[Path] = typer.Option(None, "--spec", help="World spec (default: manifests/testbed.yaml)."),
                  seed: Optional[int] = typer.Option(None, "--seed", help="Override the spec's seed.")):
    """Generate the offline world: OSM PBF, NAIP and Sentinel-2 COGs, STAC items, a ready profile."""
    from gl10m.testbed import build as tb

    res = tb.build(out_dir, spec_path=spec, seed=seed, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    out.print(f"world written to {res.out_dir}: regions {', '.join(res.regions)}, {res.n_naip} NAIP and "
              f"{res.n_s2} Sentinel-2 items, {res.bytes / 1e6:.0f} MB in {res.seconds:.0f} s (seed {res.seed}); "
              f"deliberate faults: {', '.join(f.get('kind', '?') for f in res.faults) or 'none'}")
    out.print(f"next: gl10m testbed serve {out_dir}")


@testbed_app.command("serve")
def testbed_serve(world: Path = typer.Argument(..., help="A folder written by `gl10m testbed build`."),
                  served_json: Optional[Path] = typer.Option(
                      None, "--served-json", help="Where to record the URLs (default: WORLD/served.json, which "
                      "`gl10m plan`/`download` read for the world's profile; removed on exit)."),
                  port: int = typer.Option(0, "--port", help="Port of the STAC API (default: a free one)."),
                  files_port: int = typer.Option(0, "--files-port", help="Port of the files (default: a free one)."),
                  earthengine: bool = typer.Option(
                      False, "--earthengine", help="Also serve the Earth Engine stand-in (its URL is for "
                      "`gl10m download --provider earthengine --ee-project testbed --ee-url URL`)."),
                  faults: Optional[float] = typer.Option(
                      None, "--faults", help="Serve behind fault proxies: this fraction of requests fails "
                      "(429 with Retry-After, 5xx, bodies cut mid-way); as many are delayed."),
                  fault_seed: int = typer.Option(0, "--fault-seed", help="Seed of the injected faults.")):
    """Serve a built world: a STAC API and a Range-capable HTTP server on 127.0.0.1 (Ctrl-C stops).
    The URLs go to WORLD/served.json, so `gl10m plan`/`download -p WORLD/profile.yaml` need no --stac-url."""
    from gl10m.testbed import serve

    for name, v in (("--port", port), ("--files-port", files_port)):
        if not 0 <= v <= 65535:
            raise UserError(f"{name} must be a port number (1-65535, 0 for a free one), got {v}")
    info = served_json or world / "served.json"
    spec = None
    if faults is not None:
        from gl10m.testbed.faults import FaultSpec

        spec = FaultSpec.mixed(faults, seed=fault_seed)
    kw = dict(info_path=info, faults=spec, stac_port=port, http_port=files_port)
    if not earthengine:
        serve.run_forever(world, **kw)
        return
    from gl10m.testbed.eeserver import serve_ee

    with serve_ee(world) as ee_srv:
        out.print(f"Earth Engine: {ee_srv.url}  (stand-in: --provider earthengine --ee-project testbed "
                  f"--ee-url {ee_srv.url})", highlight=False)
        serve.run_forever(world, extra={"ee_url": ee_srv.url}, **kw)


@testbed_app.command("scenes")
def testbed_scenes(out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write into (DIR/shards/ is the dataset)."),
                   scenes: int = typer.Option(..., "--scenes", "-n", help="Number of scenes (> 0)."),
                   seed: int = typer.Option(..., "--seed", help="World seed: the same seed and N give the same bytes."),
                   states: Optional[str] = StatesOpt, workers: Optional[int] = WorkersOpt,
                   scheduler: Optional[str] = SchedulerOpt,
                   truth: bool = typer.Option(False, "--truth", help="Also write DIR/truth/{key}.npy, the 1 m truth "
                                              "class map of each scene (gl10m.testbed.classes.TRUTH_CLASSES)."),
                   no_card: bool = typer.Option(False, "--no-card", help="Skip the dataset card and its plots."),
                   quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")):
    """A model-scale synthetic world: N scenes laid out by the testbed's recipes, rendered by its
    renderer and labelled by the osm and anchors stages, written as the shards `gl10m shard` writes."""
    from gl10m.pipelines.scenes import build_world

    with _writer_lock(out_dir, what="output folder"):
        res = build_world(out_dir, scenes, seed, workers, scheduler=scheduler, states=states, truth=truth,
                          quiet=quiet, card=not no_card)
    counts = ", ".join(f"{k} {v}" for k, v in res.samples.items()) or "no samples"
    if res.shards_up_to_date:
        out.print(f"shards in {res.shards_dir} are up to date (same inputs hash, files unchanged): "
                  f"not re-sharded; {res.skipped} scenes already staged", highlight=False)
    else:
        out.print(f"shards in {res.shards_dir}: {counts}; rendered {res.built} scenes in {res.seconds:.0f} s "
                  f"({res.scenes_per_s:.2f} scenes/s), {res.skipped} already staged; shards and card "
                  f"{res.shard_seconds:.0f} s", highlight=False)
    if res.failed:
        unit, why = sorted(res.failed.items())[0]
        err.print(f"{len(res.failed)} scenes failed (rerun to retry them); first: scene {int(unit)}: {why}")
        raise typer.Exit(3)


@testbed_app.command("preview")
def testbed_preview(world: Path = typer.Argument(..., help="A folder written by `gl10m testbed build`."),
                    state: str = typer.Option(..., "--state", help="Region code, e.g. CA."),
                    output: Path = typer.Option(..., "--output", "-o", help="PNG to write.")):
    """Draw one region: the HR mosaic with OSM outlines next to the LR view."""
    from gl10m.testbed import build as tb

    tb.render_preview(world, state.upper(), output)
    out.print(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, no traceback."""
    from rich.markup import escape

    try:
        rc = app(args=argv, standalone_mode=False)
    except UserError as e:  # bad input: exit 2 (an IncompleteError, transient trouble upstream: 3)
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(getattr(e, "exit_code", 2))
    except FileNotFoundError as e:
        err.print(f"[red]error:[/red] {escape(str(e.filename or e))}: no such file or directory", highlight=False)
        sys.exit(2)
    except PermissionError as e:
        err.print(f"[red]error:[/red] {escape(str(e.filename or e))}: permission denied", highlight=False)
        sys.exit(2)
    except OSError as e:  # a full disk, a path under a regular file, ...: one line, no traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        err.print(f"[red]error:[/red] {escape(where + (e.strerror or str(e)))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # usage errors of the CLI framework (typer vendors click): print them as click would
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise
    # standalone_mode=False: click returns the exit code of `raise typer.Exit(n)` instead of exiting
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
