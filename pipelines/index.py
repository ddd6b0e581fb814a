"""The index stages: osm (PBF -> concept features) and anchors (features -> scene candidates).

One Dask task per region for osm; anchors thins per region and maps the per-scene statistics
over spatial partitions. Outputs under the work dir, one file per region, written atomically:

    W/osm/{STATE}.parquet         concept features (GeoParquet)
    W/osm/{STATE}.yield.csv       per-concept yield report
    W/anchors/{STATE}.parquet     scene candidates (GeoParquet)
    W/anchors/{STATE}.stats.json  counts (anchors, thinned, dropped for < min concepts, kept)

The ledger records per region and stage the hash of the inputs used; a rerun with the same
inputs does nothing and says so, a changed rule or parameter reruns only what depends on it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gl10m.io import atomic_path, atomic_write_text, ensure_dir, is_url, jsonable
from gl10m.ledger import OK, Ledger, hash_inputs
from gl10m.pipelines.runner import map_units
from gl10m.pipelines.stage import Stage, StageSummary, Unit, decide, run_stage
from gl10m.profile import Profile

STAGES = ("osm", "anchors")
# Bump when a stage's code changes its output for the same inputs.
STAGE_VERSION = {"osm": 1, "anchors": 2}


@dataclass
class Plan:
    stage: str
    region: str
    input_hash: str
    run: bool
    why: str


@dataclass
class IndexResult:
    plans: list[Plan] = field(default_factory=list)
    summaries: dict[str, StageSummary] = field(default_factory=dict)  # stage -> how its regions ended

    @property
    def outcomes(self) -> dict[tuple[str, str], str]:
        """(stage, region) -> label: ok, skipped (why), rejected:..., failed:..., waiting for ..."""
        return {(s, k): v for s, summ in self.summaries.items() for k, v in summ.units.items()}

    def failures(self):
        """Failed units and rejected regions (:mod:`gl10m.outcomes`)."""
        return [f for summ in self.summaries.values() for f in summ.failures]


def osm_path(workdir: Path, region: str) -> Path:
    return Path(workdir) / "osm" / f"{region}.parquet"


def anchors_path(workdir: Path, region: str) -> Path:
    return Path(workdir) / "anchors" / f"{region}.parquet"


# -- input hashes --------------------------------------------------------------------------
def osm_input_hash(profile: Profile, region: str) -> str:
    """What the osm output of a region depends on: the PBF bytes and the concept rules."""
    from gl10m.pbf import file_digest

    source = profile.pbf_source(region)
    if is_url(source):
        # a dated extract URL names immutable content; a pinned sha256 makes it explicit
        pbf_id = {"url": source, "sha256": profile.regions[region].sha256}
    else:
        if not Path(source).exists():
            pbf_id = {"missing": source}
        else:
            pbf_id = {"sha256": file_digest(source)}
    rules = [c.model_dump(mode="json", include={"id", "rule", "kinds", "buffer_m", "line_as"})
             for c in profile.concepts]
    return hash_inputs("osm", STAGE_VERSION["osm"], pbf_id, rules)


def anchors_input_hash(profile: Profile, region: str, osm_hash: str) -> str:
    """Anchors depend on the osm output, the geometry parameters and the concept priors."""
    priors = [c.count for c in profile.concepts]
    return hash_inputs("anchors", STAGE_VERSION["anchors"], region, osm_hash,
                       profile.geometry.model_dump(mode="json"), priors,
                       profile.regions[region].bbox)


# -- steps (run on workers; plain functions of explicit inputs) -----------------------------
def osm_step(region: str, source: str, sha256: str | None, profile: Profile, workdir: str) -> dict:
    from gl10m import osm, pbf

    wd = Path(workdir)
    pbf_path = pbf.fetch_pbf(source, wd / "downloads", sha256=sha256)
    tmp = wd / "tmp" / f"osm-{region}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        res = osm.extract(pbf_path, profile, tmpdir=tmp)
    finally:  # the node index lived here; nothing of this step's scratch outlives it
        shutil.rmtree(tmp, ignore_errors=True)
    osm.write_features(res.features, osm_path(wd, region))
    report = osm.yield_report(res.features, profile)
    with atomic_path(wd / "osm" / f"{region}.yield.csv") as t:
        report.to_csv(t, index=False)
    zero = [str(n) for n in report.loc[report["zero"], "name"]] if "zero" in report else []
    return {"features": int(len(res.features)), "stats": jsonable(res.stats), "zero_yield": zero}


def anchors_select_step(region: str, profile: Profile, workdir: str, n_partitions: int):
    """Anchor points and thinning of one region; returns (spatial partitions of kept anchors, counts)."""
    from gl10m import anchors, osm

    feats = osm.read_features(osm_path(Path(workdir), region))
    kept, counts = anchors.select_anchors(feats, profile, region)
    parts = anchors.partitions(kept, n_partitions) if len(kept) else []
    counts = {"features": int(len(feats)), **counts, "partitions": len(parts)}
    return parts, counts


def anchors_stats_step(part, region: str, profile: Profile, workdir: str):
    """Scene statistics of one spatial partition, against the features that meet it."""
    from gl10m import anchors, osm

    feats = osm.read_features(osm_path(Path(workdir), region))
    return anchors.scene_stats(part, anchors.features_for(part, feats, profile), profile, region)


def anchors_write_step(region: str, parts: list, counts: dict, workdir: str) -> dict:
    """Concatenate the partitions' candidates, write them and the counts atomically."""
    import geopandas as gpd
    import pandas as pd

    from gl10m import anchors

    wd = Path(workdir)
    if parts:
        cand = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry="geometry", crs="EPSG:4326")
        cand = cand.sort_values("scene_id", kind="mergesort").reset_index(drop=True)
    else:
        cand = anchors._empty_candidates()
    anchors.write_candidates(cand, anchors_path(wd, region))
    stats = jsonable(dict(counts))
    stats["scenes"] = int(len(cand))
    stats["late_dropped"] = int(stats.get("kept", 0) - len(cand))
    atomic_write_text(wd / "anchors" / f"{region}.stats.json", json.dumps(stats, indent=1, sort_keys=True))
    return stats


# -- the pipeline --------------------------------------------------------------------------
def _stages(profile: Profile, workdir: Path, regions: Sequence[str], stages: Sequence[str], ledger: Ledger,
            n_partitions: int = 4) -> list[Stage]:
    """The requested index stages over `regions`, in order."""
    oh = {r: osm_input_hash(profile, r) for r in regions}
    out = []
    if "osm" in stages:
        out.append(Stage(
            "osm", [Unit(r, oh[r], (r, profile.pbf_source(r), profile.regions[r].sha256, profile, str(workdir)))
                    for r in regions],
            step=osm_step, output_ok=lambda u, o: osm_path(workdir, u.key).exists()))
    if "anchors" in stages:
        def blocked(u: Unit) -> str | None:  # anchors need a good osm output of the same inputs
            o = ledger.get("osm", u.key)
            return None if o is not None and o.status == OK and o.input_hash == oh[u.key] else "waiting for osm"

        out.append(Stage(
            "anchors", [Unit(r, anchors_input_hash(profile, r, oh[r])) for r in regions],
            output_ok=lambda u, o: anchors_path(workdir, u.key).exists(), blocked=blocked,
            mapper=lambda client, units, on_result, quiet: _run_anchors(
                client, profile, workdir, [u.key for u in units], n_partitions, quiet, on_result)))
    return out


def plan(profile: Profile, workdir: Path, regions: Sequence[str], stages: Sequence[str],
         ledger: Ledger, force: bool = False) -> list[Plan]:
    """Decide per stage and region whether to run, without running anything."""
    return _plans(_stages(profile, workdir, regions, stages, ledger), regions, ledger, force)


def _plans(stages: Sequence[Stage], regions: Sequence[str], ledger: Ledger, force: bool) -> list[Plan]:
    plans = [Plan(st.name, d.unit.key, d.unit.input_hash, d.run, d.why)
             for st in stages for d in decide(st, ledger, force=force)]
    return sorted(plans, key=lambda p: (list(regions).index(p.region), STAGES.index(p.stage)))


def run_index(profile: Profile, workdir: str | Path, *, regions: Sequence[str] | None = None,
              stages: Sequence[str] = STAGES, client=None, force: bool = False,
              dry_run: bool = False, quiet: bool = False, n_partitions: int = 4) -> IndexResult:
    workdir = Path(workdir).resolve()
    regions = list(regions) if regions else profile.select_regions(None)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        from gl10m.errors import UserError
        raise UserError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    if not isinstance(n_partitions, int) or n_partitions < 1:
        from gl10m.errors import UserError
        raise UserError(f"--partitions must be at least 1, got {n_partitions!r}")
    ensure_dir(workdir, "work dir")
    result = IndexResult()
    with Ledger.for_workdir(workdir) as ledger:
        sts = _stages(profile, workdir, regions, stages, ledger, n_partitions)  # hashes each PBF once
        result.plans = _plans(sts, regions, ledger, force)
        if dry_run:
            return result
        for st in sts:  # each decided again when it starts: anchors see the osm outcomes of this run
            result.summaries[st.name] = run_stage(st, ledger, client=client, force=force, quiet=quiet)
    return result


def _run_anchors(client, profile, workdir, regions, n_partitions, quiet, on_result) -> None:
    """Thin per region, map scene statistics over spatial partitions, write per region;
    on_result(region, stats, error) once per region."""
    selected: dict[str, tuple[list, dict]] = {}

    def on_select(region, res, err):
        if err is not None:
            on_result(region, None, err)
        else:
            selected[region] = res

    map_units(client, anchors_select_step, [(r, profile, str(workdir), n_partitions) for r in regions],
              keys=regions, description="anchors: thin", quiet=quiet, on_result=on_select)
    jobs = [(region, i) for region in sorted(selected) for i in range(len(selected[region][0]))]
    stats_parts: dict[str, dict[int, object]] = {r: {} for r in selected}
    failed: dict[str, BaseException] = {}

    def on_stats(key, res, err):
        region, i = key.rsplit("/", 1)
        if err is not None:
            failed.setdefault(region, err)
        else:
            stats_parts[region][int(i)] = res

    map_units(client, anchors_stats_step,
              [(selected[r][0][i], r, profile, str(workdir)) for r, i in jobs],
              keys=[f"{r}/{i}" for r, i in jobs], description="anchors: scene stats", quiet=quiet,
              on_result=on_stats)
    for region in sorted(selected):
        if region in failed:
            on_result(region, None, failed[region])
            continue
        parts = [stats_parts[region][i] for i in sorted(stats_parts[region])]
        try:
            res, err = anchors_write_step(region, parts, selected[region][1], str(workdir)), None
        except Exception as e:
            res, err = None, e
        on_result(region, res, err)
