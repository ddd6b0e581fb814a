"""`gl10m testbed scenes`: a model-scale synthetic world straight to shards.

    DIR/staged/{split}/{key}/   one staged sample per scene (gl10m.samples)
    DIR/ledger.sqlite           stage ``scenes``, one unit per scene index
    DIR/truth/{key}.npy         with truth=True: the 1 m truth class map of each scene
    DIR/shards/                 exactly what `gl10m shard` writes (gl10m.shards.build + the card)

The step (gl10m.testbed.scenes.build_scene) is a plain function of a scene plan; this module
only maps it over the plan on a Dask cluster (a LocalCluster, or ``scheduler``) and records the
outcomes in the ledger (the driver alone writes it). A rerun skips the scenes the ledger has as
done with the same inputs and whose staged sample is there, so a run killed at any point (kill -9)
reruns to the same bytes. A rerun that renders nothing and whose shards were written from the
same inputs (stage ``scenes-shards`` in the ledger: a hash of every scene's input hash, the
manifest fields and the shard size, and the files it wrote, by size and checksum) leaves the
shards as they are. Public entry point: :func:`build_world`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gl10m.errors import UserError

STAGE = "scenes"
SHARD_STAGE = "scenes-shards"


@dataclass
class WorldResult:
    out_dir: Path
    shards_dir: Path
    n_scenes: int
    seed: int
    samples: dict[str, int] = field(default_factory=dict)  # per split
    built: int = 0  # scenes rendered in this run
    skipped: int = 0  # scenes already staged by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # scene index -> error
    seconds: float = 0.0  # the scenes' step (layout .. staged), wall clock
    shard_seconds: float = 0.0  # gl10m.shards.build + card
    manifest: dict = field(default_factory=dict)
    shards_up_to_date: bool = False  # the shards were already written from the same inputs: left as they were

    @property
    def scenes_per_s(self) -> float:
        return self.built / self.seconds if self.seconds > 0 else 0.0


def _unit(i: int) -> str:
    return f"{i:07d}"


def build_world(out: str | Path, n: int, seed: int, workers: int | None = None, *,
                scheduler: str | None = None, states: str | Sequence[str] | None = None, truth: bool = False,
                profile=None, quiet: bool = True, card: bool = True, use_dask: bool = True,
                max_bytes: int | None = None) -> WorldResult:
    """Build (or finish) a world of `n` synthetic scenes of `seed` under `out`; return what it did.

    out/shards/ then holds the shards, index, manifest and dataset card of `gl10m shard`, so
    gl10m.data.load(out/"shards", split) reads it. workers: Dask workers of the local cluster
    (default min(2, cores)); scheduler: an existing cluster (its workers must see `out`);
    states: restrict to these profile regions (comma list or list); truth: also write
    out/truth/{key}.npy; use_dask=False runs every scene in this process (tests, debugging).
    Raises UserError (one line) for bad input: n <= 0, an unwritable out, an unknown state.
    """
    from gl10m import __version__, shards
    from gl10m import profile as prof_mod
    from gl10m.io import clean_temp, ensure_dir
    from gl10m.ledger import FAILED, OK, Ledger, hash_inputs
    from gl10m.pipelines.runner import ClusterOptions, dask_client
    from gl10m.pipelines.stage import Recorded, Stage, Unit, decide, run_stage
    from gl10m.samples import clean_staged_temp
    from gl10m.testbed import scenes as S

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"--scenes must be a positive number of scenes, got {n}")
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    profile = profile or prof_mod.load()
    plans = S.plan_world(n, int(seed), profile, states)  # validates states before anything is written
    out = ensure_dir(Path(out), "output folder").resolve()
    clean_staged_temp(out)
    sh_dir = out / "shards"
    if sh_dir.is_dir():
        clean_temp(sh_dir)
    truth_dir = ensure_dir(out / "truth", "truth folder") if truth else None
    res = WorldResult(out_dir=out, shards_dir=sh_dir, n_scenes=n, seed=int(seed))
    with Ledger.for_workdir(out) as ledger:
        units = [Unit(_unit(p.index), hash_inputs(STAGE, S.GENERATOR_VERSION, p.seed, n, p.index, p.state, p.split,
                                                  p.lon, p.lat, p.biome, p.coast, list(p.town_cells),
                                                  sorted(p.budget.items()), profile.hash(), bool(truth)),
                      (p, profile, str(out), n), {"truth_dir": str(truth_dir) if truth_dir else None})
                 for p in plans]
        hashes = {int(u.key): u.input_hash for u in units}

        def staged(u: Unit, o) -> bool:  # the staged sample (and truth map) of a scene done earlier
            return bool(o.detail) and (out / o.detail.get("folder", "-")).is_dir() \
                and (not truth or (truth_dir / f"{o.detail['key']}.npy").exists())

        stage = Stage(STAGE, units, step=S.build_scene, output_ok=staged, regions=False, rate_unit="scenes",
                      result=lambda info: Recorded(OK, None, {**info, "folder": Path(info["folder"])
                                                              .relative_to(out).as_posix()}))
        decisions = decide(stage, ledger)
        t0 = time.perf_counter()
        if use_dask and any(d.run for d in decisions):
            with dask_client(ClusterOptions(workers=workers, scheduler=scheduler), quiet=quiet) as client:
                summary = run_stage(stage, ledger, client=client, quiet=quiet, decisions=decisions)
        else:
            summary = run_stage(stage, ledger, quiet=quiet, decisions=decisions)
        res.seconds = time.perf_counter() - t0
        res.failed = {f.unit: f.label.split(":", 1)[1] for f in summary.failures}
        res.built, res.skipped = summary.done, sum(summary.skipped.values())
        done: dict[int, dict] = {}
        for u in units:
            o = ledger.get(STAGE, u.key)
            if o is not None and o.status == OK and o.input_hash == u.input_hash:
                done[int(u.key)] = o.detail
    t1 = time.perf_counter()
    entries = [shards.Entry(d["key"], d["split"], d["state"], out / d["folder"]) for _, d in sorted(done.items())]
    extra = {"profile": {"name": profile.name, "version": profile.version, "hash": profile.hash()},
             "builder": {"name": "gl10m", "version": __version__},
             "split_scheme": profile.splits.scheme,
             "concepts": [{"id": c.id, "name": c.name, "label": c.label} for c in profile.concepts],
             "dropped_border": 0, "not_fetched": len(res.failed),
             "synthetic": {"generator": S.GENERATOR, "generator_version": S.GENERATOR_VERSION, "seed": int(seed),
                           "n_scenes": n, "states": sorted({p.state for p in plans}),
                           "note": "synthetic scenes of the gl10m testbed world (gl10m testbed scenes)"}}
    max_bytes = max_bytes or shards.DEFAULT_SHARD_BYTES
    shard_hash = hash_inputs(SHARD_STAGE, [(i, hashes[i], d["key"], d["split"], d["folder"])
                                           for i, d in sorted(done.items())], extra, max_bytes, bool(card))
    written: dict = {}
    with Ledger.for_workdir(out) as ledger:
        shard_stage = Stage(
            SHARD_STAGE, [Unit("all", shard_hash, (entries, sh_dir, max_bytes, extra, profile, card))],
            step=_shard_step, output_ok=lambda u, o: _shards_intact(sh_dir, o.detail or {}), progress=False,
            raise_errors=True, result=lambda manifest: Recorded(OK, None, _shard_files(sh_dir)),
            # until the files are all there, the ledger says the shards are being written
            before=lambda units: ledger.record(SHARD_STAGE, "all", FAILED, shard_hash, reason="writing"),
            on_ok=lambda u, manifest: written.update(manifest))
        # scenes rendered in this run: the shards are rewritten even if their inputs hash the same
        summary = run_stage(shard_stage, ledger, force=res.built > 0, quiet=True)
        res.shards_up_to_date = bool(summary.skipped)
        res.manifest = json.loads((sh_dir / shards.MANIFEST_NAME).read_text()) if not written else written
    res.shard_seconds = time.perf_counter() - t1
    res.samples = res.manifest["samples"]
    return res


def _shard_step(entries, sh_dir: Path, max_bytes: int, extra: dict, profile, card: bool) -> dict:
    """The shards, index and manifest of the scenes (and the dataset card); returns the manifest."""
    from gl10m import card as cardmod
    from gl10m import shards

    manifest = shards.build(entries, sh_dir, max_bytes=max_bytes, manifest_extra=extra)
    if card:
        cardmod.write_card(sh_dir, profile)
    return manifest


def _shard_files(sh_dir: Path) -> dict:
    """What the shard step wrote: {relative path: [size, sha256 of the small files or ""]}. The tars
    are checked by size (their sample checksums are in the index, whose sha256 is recorded)."""
    out = {}
    for p in sorted(sh_dir.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            big = p.suffix == ".tar"
            out[p.relative_to(sh_dir).as_posix()] = [p.stat().st_size,
                                                     "" if big else hashlib.sha256(p.read_bytes()).hexdigest()]
    return {"files": out}


def _shards_intact(sh_dir: Path, detail: dict) -> bool:
    """The files of the last shard step are all there, unchanged (sizes; checksums of the small ones)."""
    want = detail.get("files")
    if not want:
        return False
    try:
        return _shard_files(sh_dir)["files"] == want
    except OSError:
        return False
