"""The download stages: catalog (per state and collection) -> plan (per state) -> fetch (per scene).

    W/catalog/{STATE}/{collection}.parquet   provider item footprints + properties
    W/plan/{STATE}.parquet                    the scenes to fetch (plan-row schema)
    W/plan/{STATE}.rejections.parquet         no_naip / no_s2 / subsampled_out, per scene
    W/staged/{split}/{key}/                   one staged sample per fetched scene

Ledger units: ``{STATE}/{collection}`` for catalog, ``{STATE}`` for plan (plus one row per scene
under the stage ``plan-scene``), the scene key for fetch. Input hashes name content, not
location: the fetch hash is built from item ids, baselines, the footprint and the profile values
fetch depends on, so a provider reached at another URL (a testbed served on another port) does
not refetch anything.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gl10m.errors import UserError
from gl10m.io import ensure_dir, jsonable
from gl10m.ledger import OK, REJECTED, Ledger, hash_inputs
from gl10m.pipelines.stage import Recorded, Stage, StageSummary, Unit, run_stage
from gl10m.profile import Profile
from gl10m.samples import staged_dir

STAGES = ("catalog", "plan", "fetch")
STAGE_VERSION = {"catalog": 1, "plan": 2, "fetch": 2}
CATALOG_BUDGET_S = 300.0  # seconds one catalog unit (a state's collection) may spend retrying


@dataclass
class DownloadResult:
    summaries: dict[str, StageSummary] = field(default_factory=dict)  # stage -> how its units ended
    estimate: object = None        # plan.estimate() frame of the planned rows
    rejections: object = None      # plan rejections of the states planned in this run

    @property
    def outcomes(self) -> dict[tuple[str, str], str]:
        """(stage, unit) -> label of the region stages (catalog, plan; fetch: "waiting for plan")."""
        return {(s, k): v for s, summ in self.summaries.items() for k, v in summ.units.items()}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """stage -> label -> units (:meth:`StageSummary.counts`)."""
        return {s: summ.counts() for s, summ in self.summaries.items()}

    def failures(self):
        """Failed units (catalog, plan, fetch) and rejected regions (:mod:`gl10m.outcomes`)."""
        return [f for summ in self.summaries.values() for f in summ.failures]

    def add(self, summary: StageSummary) -> None:
        """Merge a stage's summary into this result's."""
        have = self.summaries.get(summary.stage)
        self.summaries[summary.stage] = summary if have is None else have + summary


def collections(profile: Profile) -> tuple[str, str]:
    return profile.imagery.naip.collection, profile.imagery.s2.collection


# -- input hashes --------------------------------------------------------------------------
def catalog_hash(profile: Profile, provider, state: str, collection: str) -> str:
    return hash_inputs("catalog", STAGE_VERSION["catalog"], provider.describe() if hasattr(provider, "describe")
                       else provider.name, state, collection, profile.regions[state].bbox,
                       profile.imagery.model_dump(mode="json"))


def plan_hash(profile: Profile, state: str, anchors_hash: str, cat_hashes: Sequence[str], target: int,
              seed: int, concepts: Sequence[int] | None = None) -> str:
    """What a state's plan depends on; a concept subset (``--concepts``, ids) adds its ids and names
    (no subset leaves the hash as it was before subsets existed)."""
    subset = () if concepts is None else (
        {"concepts": [[int(c), profile.concepts[int(c)].name] for c in sorted({int(c) for c in concepts})]},)
    return hash_inputs("plan", STAGE_VERSION["plan"], state, anchors_hash, list(cat_hashes), target, seed,
                       profile.imagery.model_dump(mode="json"), profile.geometry.model_dump(mode="json"),
                       [c.count for c in profile.concepts], profile.splits.model_dump(mode="json"), *subset)


def fetch_hash(profile: Profile, row) -> str:
    """What a staged sample depends on: identities of its inputs, never their URLs."""
    naip = [(i["id"], i.get("datetime")) for i in json.loads(row["naip_items"])]
    s2 = [(i["id"], i.get("datetime"), i.get("baseline")) for i in json.loads(row["s2_items"])]
    return hash_inputs("fetch", STAGE_VERSION["fetch"], str(row["key"]), str(row["split"]),
                       str(row.get("plan_hash") or ""),  # written into meta.json: keep them in step
                       [float(row[c]) for c in ("west", "south", "east", "north")],
                       [int(c) for c in row["concepts"]], naip, s2, str(row["s2_window"]),
                       profile.imagery.model_dump(mode="json"), profile.qc.model_dump(mode="json"),
                       profile.geometry.model_dump(mode="json"))


# -- steps (plain functions; run on workers) -------------------------------------------------
def catalog_step(provider, profile: Profile, state: str, collection: str, workdir: str) -> dict:
    from gl10m import catalog
    from gl10m.sources.retry import retry, unit_budget

    # each request is retried by the provider; a search that still breaks (pystac re-reading a
    # landing page cut short, a page that is not JSON) is redone whole within the unit's budget
    gdf = retry(lambda: catalog.catalog_region(provider, profile, state, collection), attempts=None,
                budget=unit_budget(CATALOG_BUDGET_S), base_delay=1.0, max_delay=10.0)
    catalog.write_catalog(gdf, catalog.catalog_path(workdir, state, collection))
    return dict(gdf.attrs.get("stats", {}))


def plan_step(profile: Profile, state: str, workdir: str, *, target: int | None, seed: int,
              provider_name: str, write: bool = True, concepts: Sequence[int] | None = None):
    from gl10m import anchors, catalog, plan
    from gl10m.pipelines.index import anchors_path

    wd = Path(workdir)
    cand = anchors.read_candidates(anchors_path(wd, state))
    naip_c, s2_c = collections(profile)
    naip = catalog.read_catalog(catalog.catalog_path(wd, state, naip_c))
    s2 = catalog.read_catalog(catalog.catalog_path(wd, state, s2_c))
    res = plan.plan_region(cand, naip, s2, profile, state, provider=provider_name, seed=seed, target=target,
                           concepts=concepts)
    if write:
        plan.write_plan(res.rows, plan.plan_path(wd, state), stats=res.stats)
        plan.write_rejections(res.rejections, wd / "plan" / f"{state}.rejections.parquet")
    return res


def fetch_step(row: dict, profile: Profile, workdir: str, stac_url: str | None, limiter=None, provider=None):
    """Fetch one scene through `provider` (default: the profile's, pointed at `stac_url`); a
    stale staged sample of a rejected scene is removed."""
    from gl10m import fetch
    from gl10m.sources.stac import provider_from_profile

    if provider is None:
        provider = provider_from_profile(profile, stac_url=stac_url)
    out = fetch.fetch_scene(row, profile, workdir, provider, limiter=limiter)
    if out.status != OK:
        stale = staged_dir(Path(workdir), str(row["split"]), str(row["key"]))
        if stale.exists():
            shutil.rmtree(stale)
    return {"status": out.status, "reason": out.reason, "detail": out.detail}


# -- the pipeline ----------------------------------------------------------------------------
def _limiter(client, provider_name: str, max_leases: int):
    """A cap on concurrent provider requests shared by every Dask worker."""
    if client is None:
        return None
    import distributed

    return distributed.Semaphore(max_leases=max_leases, name=f"gl10m-provider-{provider_name}")


def run_download(profile: Profile, workdir: str | Path, *, regions: Sequence[str] | None = None,
                 stages: Sequence[str] = STAGES, client=None, stac_url: str | None = None,
                 max_scenes: int | None = None, seed: int = 0, dry_run: bool = False, force: bool = False,
                 quiet: bool = False, provider=None, concepts: Sequence[int] | None = None) -> DownloadResult:
    """Run catalog, plan and fetch for the regions (all by default). With dry_run, catalog and plan
    run in memory only (nothing is written, no imagery is read) and the estimate is returned.
    `concepts` (ids, :meth:`Profile.select_concepts`): plan only the scenes holding one of them
    (gl10m.plan.concept_subset, before subsampling); the catalog does not depend on it, and a
    scene planned under several subsets keeps its fetch hash, so switching subsets refetches
    only scenes not fetched before."""
    from gl10m import catalog as catmod
    from gl10m import plan as planmod
    from gl10m.pipelines.index import anchors_path
    from gl10m.sources.stac import provider_from_profile

    workdir = Path(workdir).resolve()
    regions = list(regions) if regions else profile.select_regions(None)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    if max_scenes is not None and max_scenes < 0:
        raise UserError("--max-scenes must be >= 0")
    if not (workdir / "ledger.sqlite").is_file():  # nothing indexed here: create nothing either
        raise UserError(f"region {regions[0]}: run `gl10m index` first (no ledger in {workdir})")
    if provider is None and profile.provider.name == "stac":
        stac_url = preflight(profile, stac_url)
    provider = provider or provider_from_profile(profile, stac_url=stac_url)
    pname = getattr(provider, "name", "stac")
    result = DownloadResult()
    ensure_dir(workdir, "work dir")
    with Ledger.for_workdir(workdir) as ledger:
        # anchors must be done for every region we download
        anchors_h = {}
        for r in regions:
            o = ledger.get("anchors", r)
            if o is None or o.status != OK or not anchors_path(workdir, r).exists():
                raise UserError(f"region {r}: run `gl10m index` first (no anchors in {workdir})")
            anchors_h[r] = o.input_hash
        if dry_run:
            # in memory: search into a throwaway folder, nothing written under W
            import tempfile

            tmp = Path(tempfile.mkdtemp(prefix="gl10m-dry-"))
            try:
                return _dry_run(profile, provider, regions, workdir, tmp, max_scenes, seed, pname, result, concepts)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        # ---- catalog: one unit per state and collection ----
        if "catalog" in stages:
            result.add(run_stage(Stage(
                "catalog", [Unit(f"{r}/{c}", catalog_hash(profile, provider, r, c),
                                 (provider, profile, r, c, str(workdir)))
                            for r in regions for c in collections(profile)],
                step=catalog_step,
                output_ok=lambda u, o: catmod.catalog_path(workdir, *u.key.split("/", 1)).exists()),
                ledger, client=client, force=force, quiet=quiet))

        # ---- plan: one unit per state, once its catalogs are done ----
        plan_h: dict[str, str] = {}
        for r in regions:
            cats = [ledger.get("catalog", f"{r}/{c}") for c in collections(profile)]
            if all(o is not None and o.status == OK for o in cats):
                plan_h[r] = plan_hash(profile, r, anchors_h[r], [o.input_hash for o in cats],
                                      _target(profile, r, max_scenes), seed, concepts)
        if "plan" in stages:
            def on_plan(u: Unit, res) -> None:  # the plan's verdict on each candidate scene
                state = u.key
                rows = [(k, OK, plan_h[state], None, None) for k in res.rows["key"]]
                rows += [(k, REJECTED, plan_h[state], reason, None)
                         for k, reason in zip(res.rejections["key"], res.rejections["reason"])]
                ledger.forget("plan-scene", _keys_of_state(ledger, "plan-scene", state))
                ledger.record_many("plan-scene", rows)

            result.add(run_stage(Stage(
                "plan", [Unit(r, plan_h.get(r), (profile, r, str(workdir)),
                              dict(target=_target(profile, r, max_scenes), seed=seed, provider_name=pname,
                                   concepts=concepts))
                         for r in regions],
                step=plan_step, output_ok=lambda u, o: planmod.plan_path(workdir, u.key).exists(),
                blocked=lambda u: None if u.key in plan_h else "waiting for catalog",
                result=lambda res: Recorded(OK, None, jsonable(res.stats or {})), on_ok=on_plan),
                ledger, client=client, force=force, quiet=quiet))

        # ---- fetch: one unit per planned scene of the states whose plan is current ----
        if "fetch" not in stages:
            return result
        rows, waiting = [], StageSummary("fetch")
        for r in regions:
            o = ledger.get("plan", r)
            if o is None or o.status != OK or o.input_hash != plan_h.get(r):
                waiting.note(r, "waiting for plan", "waiting")
                continue
            rows.extend(planmod.read_plan(planmod.plan_path(workdir, r)).drop(columns="geometry")
                        .to_dict("records"))
        result.add(waiting)
        limiter = _limiter(client, pname, getattr(provider, "max_concurrency", 8)) if rows else None

        def clean(units) -> None:  # leftovers of a killed run are never samples
            from gl10m import samples

            samples.clean_staged_temp(workdir)

        result.add(run_stage(Stage(
            "fetch", [Unit(str(row["key"]), fetch_hash(profile, row), (row, profile, str(workdir), stac_url, limiter, provider))
                      for row in rows],
            step=fetch_step, regions=False, before=clean,
            output_ok=lambda u, o: o.status != OK or staged_dir(workdir, str(u.args[0]["split"]), u.key).exists(),
            result=lambda res: Recorded(OK if res["status"] == OK else REJECTED, res["reason"], res["detail"])),
            ledger, client=client, force=force, quiet=quiet))
    return result


def preflight(profile: Profile, stac_url: str | None) -> str | None:
    """The STAC URL to use (``--stac-url``, the profile's, or the served testbed's), checked to
    answer: an unreachable provider is one line (exit 2) within seconds, not minutes of retries."""
    from gl10m.sources.reach import check_reachable, resolve_stac_url, served_json_of

    url = resolve_stac_url(profile, stac_url)
    if url is not None:
        via = served_json_of(profile) if not stac_url and url != profile.provider.stac_url else None
        check_reachable(url, served_from=via)
    return url


def _dry_run(profile, provider, regions, workdir, tmp, max_scenes, seed, pname, result, concepts=None):
    import pandas as pd

    from gl10m import catalog as catmod
    from gl10m import plan as planmod
    from gl10m.pipelines.index import anchors_path

    ests, rejs = [], []
    for r in regions:
        for c in collections(profile):
            cached = catmod.catalog_path(workdir, r, c)
            gdf = catmod.read_catalog(cached) if cached.exists() else catmod.catalog_region(provider, profile, r, c)
            catmod.write_catalog(gdf, catmod.catalog_path(tmp, r, c))
        (tmp / "anchors").mkdir(exist_ok=True)
        shutil.copy(anchors_path(workdir, r), anchors_path(tmp, r))
        res = plan_step(profile, r, str(tmp), target=_target(profile, r, max_scenes), seed=seed,
                        provider_name=pname, write=False, concepts=concepts)
        ests.append(planmod.estimate(res.rows, profile))
        rejs.append(res.rejections)
    result.estimate = pd.concat(ests, ignore_index=True) if ests else None
    result.rejections = pd.concat(rejs, ignore_index=True) if rejs else None
    return result


def _target(profile: Profile, state: str, max_scenes: int | None) -> int:
    t = profile.regions[state].target
    return t if max_scenes is None else min(t, max_scenes)


def _keys_of_state(ledger: Ledger, stage: str, state: str) -> list[str]:
    return [o.unit for o in ledger.outcomes(stage) if o.unit.startswith(f"{state}-")]
