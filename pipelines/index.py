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

from gl10m.io import atomic_path, atomic_write_text, ensure_dir
from gl10m.ledger import FAILED, OK, REJECTED, Ledger, hash_inputs
from gl10m.outcomes import failure
from gl10m.pipelines.runner import error_label, map_units
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
    outcomes: dict[tuple[str, str], str] = field(default_factory=dict)  # (stage, region) -> label
    errors: dict[tuple[str, str], object] = field(default_factory=dict)  # of the units that did not finish

    def failures(self):
        """Failed units and rejected regions (:mod:`gl10m.outcomes`)."""
        from gl10m.outcomes import region_failures

        return region_failures(self.outcomes, self.errors)


def osm_path(workdir: Path, region: str) -> Path:
    return Path(workdir) / "osm" / f"{region}.parquet"


def anchors_path(workdir: Path, region: str) -> Path:
    return Path(workdir) / "anchors" / f"{region}.parquet"


# -- input hashes --------------------------------------------------------------------------
def _is_url(source: str) -> bool:
    return "://" in source


def osm_input_hash(profile: Profile, region: str) -> str:
    """What the osm output of a region depends on: the PBF bytes and the concept rules."""
    from gl10m.pbf import file_digest

    source = profile.pbf_source(region)
    if _is_url(source):
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
    return {"features": int(len(res.features)), "stats": _jsonable(res.stats), "zero_yield": zero}


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
    stats = _jsonable(dict(counts))
    stats["scenes"] = int(len(cand))
    stats["late_dropped"] = int(stats.get("kept", 0) - len(cand))
    atomic_write_text(wd / "anchors" / f"{region}.stats.json", json.dumps(stats, indent=1, sort_keys=True))
    return stats


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# -- the pipeline --------------------------------------------------------------------------
def plan(profile: Profile, workdir: Path, regions: Sequence[str], stages: Sequence[str],
         ledger: Ledger, force: bool = False) -> list[Plan]:
    """Decide per stage and region whether to run, without running anything."""
    plans = []
    for region in regions:
        oh = osm_input_hash(profile, region)
        if "osm" in stages:
            run, why = ledger.decide("osm", region, oh)
            if not run and not osm_path(workdir, region).exists():
                run, why = True, "output missing"
            plans.append(Plan("osm", region, oh, run or force, "forced" if force else why))
        if "anchors" in stages:
            ah = anchors_input_hash(profile, region, oh)
            run, why = ledger.decide("anchors", region, ah)
            if not run and not anchors_path(workdir, region).exists():
                run, why = True, "output missing"
            plans.append(Plan("anchors", region, ah, run or force, "forced" if force else why))
    return plans


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
        result.plans = plan(profile, workdir, regions, stages, ledger, force)
        if dry_run:
            return result
        for stage in STAGES:
            if stage not in stages:
                continue
            todo = [p for p in result.plans if p.stage == stage and p.run]
            for p in result.plans:
                if p.stage == stage and not p.run:
                    result.outcomes[(stage, p.region)] = f"skipped ({p.why})"
            if stage == "anchors":
                # anchors need a good osm output of the same inputs
                ready = []
                for p in todo:
                    o = ledger.get("osm", p.region)
                    if o is None or o.status != OK or o.input_hash != osm_input_hash(profile, p.region):
                        result.outcomes[("anchors", p.region)] = "waiting for osm"
                    else:
                        ready.append(p)
                todo = ready
            if not todo:
                continue
            by_region = {p.region: p for p in todo}

            def record(stage, region, res, err):
                p = by_region[region]
                if err is None:
                    ledger.record(stage, region, OK, p.input_hash, detail=res)
                    result.outcomes[(stage, region)] = OK
                else:
                    status = REJECTED if _is_user_error(err) else FAILED
                    label = error_label(err)
                    ledger.record(stage, region, status, p.input_hash, reason=label)
                    result.outcomes[(stage, region)] = f"{status}:{label}"
                    result.errors[(stage, region)] = failure(stage, region, f"{status}:{label}", err)

            if stage == "osm":
                args = [(p.region, profile.pbf_source(p.region), profile.regions[p.region].sha256,
                         profile, str(workdir)) for p in todo]
                map_units(client, osm_step, args, keys=[p.region for p in todo], description="osm",
                          quiet=quiet, on_result=lambda r, res, err: record("osm", r, res, err))
            else:
                _run_anchors(client, profile, workdir, [p.region for p in todo], n_partitions, quiet,
                             lambda r, res, err: record("anchors", r, res, err))
    return result


def _run_anchors(client, profile, workdir, regions, n_partitions, quiet, record) -> None:
    """Thin per region, map scene statistics over spatial partitions, write per region."""
    selected: dict[str, tuple[list, dict]] = {}

    def on_select(region, res, err):
        if err is not None:
            record(region, None, err)
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
            record(region, None, failed[region])
            continue
        parts = [stats_parts[region][i] for i in sorted(stats_parts[region])]
        try:
            res, err = anchors_write_step(region, parts, selected[region][1], str(workdir)), None
        except Exception as e:
            res, err = None, e
        record(region, res, err)


def _is_user_error(err: BaseException) -> bool:
    """Bad input (recorded as rejected); a transient UserError (full disk, network) is failed."""
    from gl10m.errors import is_rejection

    return is_rejection(err)
