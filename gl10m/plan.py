"""The plan stage: scene candidates x the catalog -> the scenes to fetch, each with its NAIP
state-year mosaic and its Sentinel-2 window, by local spatial joins (no provider calls).

Rules (GL-10M, values from the profile's ``imagery`` section):

* **NAIP eligibility** - an item is eligible when its ``naip:state`` is the region and its
  acquisition date lies in ``naip.start <= date < naip.end`` (half-open, like Earth Engine's
  ``filterDate`` in the reference builder: 2022-01-01 .. 2024-03-31 in GL-10M).
* **NAIP matching** - items are grouped into state-years (``naip:year``); the newest state-year
  whose eligible quarter-quads intersect *every* one of the ``grid x grid`` HR tiles (positive
  area, not a touching edge) wins. All its quarter-quads intersecting the footprint are
  collected (a mosaic, never ``first()``), sorted by id. ``naip_date`` is the newest acquisition
  date among them. No such state-year: rejection ``no_naip``.
* **Sentinel-2 window** - ``naip_date +- s2.window_days`` clipped to
  ``s2.clip_start .. clip_end`` ("aligned"); if its items (cloud < ``s2.max_cloud_pct``) do not
  cover the *whole* LR footprint, ``s2.fallback_start .. fallback_end`` ("fallback"); if neither
  does: rejection ``no_s2``. Windows are inclusive. Of the items of one datatake on several
  overlapping MGRS tiles, one tile that alone covers the footprint is kept (the
  alphabetically first such tile); otherwise all of them. Items are sorted by (datetime, id).
* **Class-aware subsampling** (:func:`subsample`) - among the scenes that passed, the state's
  target is picked by a class-balancing greedy: repeatedly take the concept with the fewest
  selected scenes so far (ties: the rarer by the profile's ``count`` prior, then the lower id)
  and select its next scene in a seeded hash order. Rare concepts therefore get all their scenes
  before frequent ones get more; co-occurring concepts are counted as they are selected. The
  result depends on the seed and the scene ids only, never on input order. Scenes not selected
  are recorded as ``subsampled_out`` (not an error).
* **Concept subset** (``concepts=``, the CLI's ``--concepts``) - before anything else, the
  candidates are cut to the scenes that hold at least one of the named concepts
  (:func:`gl10m.anchors.filter_by_concepts`); the others are recorded as ``no_named_concept``.
  Matching and subsampling then work within the subset: the state's target is filled from it,
  so a rare named concept never loses scenes it would have won over scenes outside the subset.

Entry points: :func:`plan_region` = :func:`match_region` (NAIP + Sentinel-2 matching and
coverage; any spatial partition of a state's candidates on its own) then :func:`select_rows`
(subsampling, once per state). Outputs (:class:`PlanResult`): ``rows`` in the plan-row schema
(:data:`PLAN_COLUMNS`, sorted by ``key``; hrefs UNSIGNED), ``rejections`` (key, scene_id, state,
reason, detail) and ``stats``.
:func:`estimate` is the dry run: scenes, requests and bytes per state and per concept.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from gl10m import geometry as geo
from gl10m.catalog import CATALOG_COLUMNS
from gl10m.errors import UserError
from gl10m.io import atomic_path
from gl10m.ledger import hash_inputs
from gl10m.sources.base import S2_ASSETS, as_date

NO_NAIP, NO_S2, SUBSAMPLED_OUT = "no_naip", "no_s2", "subsampled_out"
NO_NAMED_CONCEPT = "no_named_concept"  # outside a --concepts subset
REJECTION_REASONS = (NO_NAMED_CONCEPT, NO_NAIP, NO_S2, SUBSAMPLED_OUT)
ALIGNED, FALLBACK = "aligned", "fallback"

COVER_EPS = 1e-6       # a footprint is covered when < this fraction of it is left uncovered

# label columns carried from the candidates (anchors) to the plan rows, when present
LABEL_COLUMNS = ("scene_frac", "rel_frac", "tile_idx", "tile_concept", "tile_frac", "tile_dominant",
                 "hr_px_m_x", "hr_px_m_y", "lr_px_m_x", "lr_px_m_y")
EXTRA_COLUMNS = ("anchor_osm_type", "anchor_osm_id", "anchor_concept")
REQUIRED_CANDIDATE_COLUMNS = ("scene_id", "west", "south", "east", "north", "concepts")

PLAN_SCHEMA = pa.schema([
    ("key", pa.string()), ("scene_id", pa.string()), ("state", pa.string()), ("split", pa.string()),
    ("west", pa.float64()), ("south", pa.float64()), ("east", pa.float64()), ("north", pa.float64()),
    ("lon", pa.float64()), ("lat", pa.float64()),
    ("concepts", pa.list_(pa.int16())),
    ("scene_frac", pa.list_(pa.float32())), ("rel_frac", pa.list_(pa.float32())),
    ("tile_idx", pa.list_(pa.int16())), ("tile_concept", pa.list_(pa.int16())),
    ("tile_frac", pa.list_(pa.float32())), ("tile_dominant", pa.list_(pa.int16())),
    ("hr_px_m_x", pa.float32()), ("hr_px_m_y", pa.float32()),
    ("lr_px_m_x", pa.float32()), ("lr_px_m_y", pa.float32()),
    ("anchor_osm_type", pa.string()), ("anchor_osm_id", pa.int64()), ("anchor_concept", pa.int16()),
    ("naip_year", pa.int64()), ("naip_date", pa.string()), ("naip_items", pa.string()),
    ("s2_window", pa.string()), ("s2_start", pa.string()), ("s2_end", pa.string()), ("s2_items", pa.string()),
    ("provider", pa.string()), ("plan_hash", pa.string()),
])
PLAN_COLUMNS = tuple(f.name for f in PLAN_SCHEMA)
_LIST_DTYPES = {f.name: np.dtype(f.type.value_type.to_pandas_dtype())
                for f in PLAN_SCHEMA if pa.types.is_list(f.type)}
REJECTION_COLUMNS = ("key", "scene_id", "state", "reason", "detail")


class PlanError(UserError, ValueError):
    """Bad input to the plan stage (one line)."""


@dataclass
class PlanResult:
    rows: gpd.GeoDataFrame          # selected scenes, plan-row schema, sorted by key
    rejections: pd.DataFrame        # key, scene_id, state, reason, detail; sorted by key
    stats: dict = field(default_factory=dict)


# -- small helpers ----------------------------------------------------------------------------
def scene_key(state: str, scene_id: str) -> str:
    """``{STATE}-{scene_id}`` with any dot replaced by ``_`` (WebDataset keys must not hold dots)."""
    return f"{state}-{scene_id}".replace(".", "_")


def _iso(d: dt.date) -> str:
    return d.isoformat()


def s2_window(naip_date: dt.date, profile) -> tuple[dt.date, dt.date] | None:
    """The aligned window: ``naip_date +- window_days`` clipped to ``clip_start .. clip_end``
    (inclusive); None when the clip leaves nothing (then only the fallback can serve)."""
    s = profile.imagery.s2
    a = max(naip_date - dt.timedelta(days=s.window_days), s.clip_start)
    b = min(naip_date + dt.timedelta(days=s.window_days), s.clip_end)
    return (a, b) if a <= b else None


def _interiors_meet(geoms: np.ndarray, target) -> np.ndarray:
    """Which of `geoms` overlap `target` with positive area (a shared edge or corner does not count)."""
    if len(geoms) == 0:
        return np.zeros(0, dtype=bool)
    return shapely.intersects(geoms, target) & ~shapely.touches(geoms, target)


def _covers(geoms: np.ndarray, target, target_area: float) -> bool:
    """Do `geoms` together cover `target` (up to COVER_EPS of its area)?"""
    if len(geoms) == 0:
        return False
    if bool(np.any(shapely.covers(geoms, target))):  # the common case: one item covers it all
        return True
    left = shapely.difference(target, shapely.union_all(geoms))
    return float(shapely.area(left)) <= COVER_EPS * target_area


def _json_list(rows: list[dict]) -> str:
    return json.dumps(rows, sort_keys=True, separators=(",", ":"))


# -- catalog preparation ----------------------------------------------------------------------
def _check_catalog(cat: gpd.GeoDataFrame, what: str) -> None:
    missing = [c for c in CATALOG_COLUMNS if c not in cat.columns]
    if missing:
        raise PlanError(f"{what} catalog lacks column(s) {', '.join(missing)}")


def eligible_naip(naip: gpd.GeoDataFrame, profile, state: str) -> gpd.GeoDataFrame:
    """NAIP catalog rows of `state` acquired in ``naip.start <= date < naip.end``."""
    _check_catalog(naip, "NAIP")
    n = profile.imagery.naip
    d = naip["datetime"].map(lambda s: as_date(s) if isinstance(s, str) else None)
    st = naip["naip_state"].astype("object").map(lambda v: str(v).upper() if v is not None and v == v else None)
    ok = (st == state.upper()) & d.map(lambda x: x is not None and n.start <= x < n.end) & naip["naip_year"].notna()
    return naip[ok.to_numpy(dtype=bool)].reset_index(drop=True)


def usable_s2(s2: gpd.GeoDataFrame, profile) -> gpd.GeoDataFrame:
    """Sentinel-2 catalog rows with cloud cover below the threshold. Items lacking one of the
    four assets are kept (their href is None in the plan) so that fetch records the defect as a
    typed rejection instead of the plan hiding it."""
    _check_catalog(s2, "Sentinel-2")
    cc = s2["cloud_cover"].astype("float64")
    ok = cc.notna() & (cc < profile.imagery.s2.max_cloud_pct)
    return s2[ok.to_numpy(dtype=bool)].reset_index(drop=True)


def _naip_entry(row) -> dict:
    hrefs = json.loads(row["hrefs"])
    return {"id": row["id"], "href": hrefs.get("image"), "datetime": row["datetime"],
            "epsg": None if pd.isna(row["epsg"]) else int(row["epsg"]),
            "gsd": None if pd.isna(row["gsd"]) else float(row["gsd"]),
            "state": row["naip_state"], "year": int(row["naip_year"]),
            "bbox": [float(row["west"]), float(row["south"]), float(row["east"]), float(row["north"])]}


def _s2_entry(row) -> dict:
    hrefs = json.loads(row["hrefs"])
    return {"id": row["id"], "datetime": row["datetime"],
            "epsg": None if pd.isna(row["epsg"]) else int(row["epsg"]),
            "mgrs_tile": row["mgrs_tile"], "baseline": row["baseline"],
            "cloud_cover": float(row["cloud_cover"]),
            "hrefs": {k: hrefs.get(k) for k in S2_ASSETS},
            "bbox": [float(row["west"]), float(row["south"]), float(row["east"]), float(row["north"])]}


class IndexedCatalog:
    """A catalog frame with what the per-scene joins need precomputed once: prepared footprints,
    an STR-tree, plan entries, dates, years, datatakes and tiles (row order of the frame)."""

    def __init__(self, gdf: gpd.GeoDataFrame, entry):
        self.frame = gdf
        self.geoms = np.asarray(gdf.geometry.values, dtype=object)
        shapely.prepare(self.geoms)
        self.tree = shapely.STRtree(self.geoms)
        self.entries = [entry(r) for _, r in gdf.iterrows()]
        self.dates = np.asarray([as_date(v) for v in gdf["datetime"]], dtype=object)
        self.years = gdf["naip_year"].fillna(-1).to_numpy(dtype="int64")
        self.datatake = gdf["datatake"].to_numpy(dtype=object)
        self.tile = gdf["mgrs_tile"].to_numpy(dtype=object)

    def hits(self, fps: np.ndarray) -> list[np.ndarray]:
        """For each footprint, the indices of items whose bounding geometry intersects it."""
        out: list[list[int]] = [[] for _ in range(len(fps))]
        if len(fps) and len(self.geoms):
            q, t = self.tree.query(fps, predicate="intersects")
            for a, b in zip(q.tolist(), t.tolist()):
                out[a].append(b)
        return [np.asarray(sorted(v), dtype=np.int64) for v in out]


def match_naip(fp_bounds: np.ndarray, naip: IndexedCatalog, hits: np.ndarray, grid: int) -> dict | None:
    """The newest state-year whose items intersect every HR tile of the footprint
    (``fp_bounds`` = west, south, east, north); None when there is none. `naip` holds the
    eligible items only (:func:`eligible_naip`); `hits` the candidates from ``naip.hits``.

    Returns ``{"year", "date", "items": [naip entries sorted by id]}``."""
    if len(hits) == 0:
        return None
    fp = shapely.box(*fp_bounds)
    hits = hits[_interiors_meet(naip.geoms[hits], fp)]
    if len(hits) == 0:
        return None
    years = naip.years[hits]
    tiles = None
    for year in sorted(set(years.tolist()), reverse=True):
        sel = hits[years == year]
        g = naip.geoms[sel]
        if not _covers(g, fp, float(shapely.area(fp))):
            if tiles is None:
                tiles = geo.boxes(geo.tile_bounds(np.asarray(fp_bounds)[None, :], grid)[0])
            if not bool(np.all(_interiors_meet(tiles, shapely.union_all(g)))):
                continue
        items = sorted((naip.entries[h] for h in sel), key=lambda e: e["id"])
        date = max(as_date(e["datetime"]) for e in items)
        return {"year": int(year), "date": date, "items": items}
    return None


def match_s2(fp_bounds: np.ndarray, s2: IndexedCatalog, hits: np.ndarray,
             window: tuple[dt.date, dt.date] | None) -> list[dict] | None:
    """The usable Sentinel-2 items of `window` over the footprint, when together they cover all
    of it (see the module doc for the per-datatake tile choice); None otherwise."""
    if window is None or len(hits) == 0:
        return None
    a, b = window
    hits = np.asarray([h for h in hits.tolist() if a <= s2.dates[h] <= b], dtype=np.int64)
    if len(hits) == 0:
        return None
    fp = shapely.box(*fp_bounds)
    hits = hits[_interiors_meet(s2.geoms[hits], fp)]
    geoms = s2.geoms[hits]
    if not _covers(geoms, fp, float(shapely.area(fp))):
        return None
    full = shapely.covers(geoms, fp)
    keep: list[int] = []
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hits.tolist()):
        d = s2.datatake[h]
        if d is None or (isinstance(d, float) and math.isnan(d)):
            keep.append(h)
        else:
            groups.setdefault(str(d), []).append(i)
    for _, idx in sorted(groups.items()):
        covering = sorted((str(s2.tile[hits[i]]), int(hits[i])) for i in idx if full[i])
        keep.extend([covering[0][1]] if covering else [int(hits[i]) for i in idx])
    items = [s2.entries[h] for h in sorted(keep)]
    return sorted(items, key=lambda e: (e["datetime"], e["id"]))


# -- subsampling ------------------------------------------------------------------------------
def _hash_order(seed: int, scene_ids: Sequence[str]) -> np.ndarray:
    """A seeded pseudo-random rank of each scene id (independent of input order)."""
    hs = [int.from_bytes(hashlib.sha256(f"{seed}:{s}".encode()).digest()[:8], "big") for s in scene_ids]
    return np.asarray(hs, dtype=np.uint64)


def subsample(scene_ids: Sequence[str], concepts: Sequence[Sequence[int]], target: int,
              priors: Sequence[float], seed: int = 0) -> list[str]:
    """Class-aware subsample of `target` scenes (see the module doc). Returns the selected scene
    ids in selection order. Deterministic given (seed, ids, concepts, priors)."""
    n = len(scene_ids)
    if len(concepts) != n:
        raise PlanError("subsample: scene_ids and concepts differ in length")
    if target < 0:
        raise PlanError(f"subsample: target must be >= 0, got {target}")
    ids = [str(s) for s in scene_ids]
    if len(set(ids)) != n:
        raise PlanError("subsample: scene ids are not unique")
    h = _hash_order(seed, ids)
    order = sorted(range(n), key=lambda i: (int(h[i]), ids[i]))
    if target >= n:
        return [ids[i] for i in order]
    pri = np.asarray(priors, dtype="float64")
    NONE = -1  # scenes without any concept form their own group, served last
    lists: dict[int, list[int]] = {}
    cons: list[list[int]] = []
    for i in order:
        cs = sorted({int(c) for c in concepts[i]}) or [NONE]
        cons.append(cs)  # note: indexed by position in `order` below
    cons_by_scene = {i: c for i, c in zip(order, cons)}
    for i in order:
        for c in cons_by_scene[i]:
            lists.setdefault(c, []).append(i)

    def prio(c: int) -> float:
        return math.inf if c == NONE else (float(pri[c]) if 0 <= c < len(pri) else math.inf)

    count = {c: 0 for c in lists}
    ptr = {c: 0 for c in lists}
    heap = [(0, prio(c), c) for c in lists]
    heapq.heapify(heap)
    chosen: set[int] = set()
    picked: list[int] = []
    while heap and len(picked) < target:
        cnt, p, c = heapq.heappop(heap)
        if cnt != count[c]:
            heapq.heappush(heap, (count[c], p, c))
            continue
        lst = lists[c]
        while ptr[c] < len(lst) and lst[ptr[c]] in chosen:
            ptr[c] += 1
        if ptr[c] >= len(lst):
            continue  # exhausted: drop this concept
        i = lst[ptr[c]]
        ptr[c] += 1
        chosen.add(i)
        picked.append(i)
        for cc in cons_by_scene[i]:
            count[cc] += 1
        heapq.heappush(heap, (count[c], p, c))
    return [ids[i] for i in picked]


def concept_priors(profile) -> np.ndarray:
    return np.asarray([c.count for c in profile.concepts], dtype="float64")


# -- the step ---------------------------------------------------------------------------------
def _check_candidates(c: pd.DataFrame) -> None:
    missing = [k for k in REQUIRED_CANDIDATE_COLUMNS if k not in c.columns]
    if missing:
        raise PlanError(f"candidates lack column(s) {', '.join(missing)}")
    if c["scene_id"].duplicated().any():
        dup = c.loc[c["scene_id"].duplicated(), "scene_id"].iloc[0]
        raise PlanError(f"candidates repeat scene_id {dup!r}")


def _rejections_frame(rej: list[dict] | pd.DataFrame) -> pd.DataFrame:
    df = rej if isinstance(rej, pd.DataFrame) else pd.DataFrame(rej, columns=list(REJECTION_COLUMNS))
    return df[list(REJECTION_COLUMNS)].sort_values("key", kind="mergesort").reset_index(drop=True)


def match_region(candidates: gpd.GeoDataFrame, naip: gpd.GeoDataFrame, s2: gpd.GeoDataFrame, profile,
                 state: str, *, provider: str = "stac") -> tuple[gpd.GeoDataFrame, pd.DataFrame]:
    """NAIP matching, Sentinel-2 window and coverage for candidates of one state (no subsampling).

    Returns (rows in the plan-row schema for every matched scene, sorted by key; rejections
    ``no_naip`` / ``no_s2``). Any spatial partition of a state's candidates can be matched on its
    own: the pipeline may map this over partitions and concatenate before :func:`select_rows`."""
    if state not in profile.regions:
        raise PlanError(f"unknown state {state!r}; the profile has {', '.join(sorted(profile.regions))}")
    _check_candidates(candidates)
    grid = profile.geometry.grid
    cand = candidates.sort_values("scene_id", kind="mergesort").reset_index(drop=True)
    n = len(cand)
    bounds = cand[["west", "south", "east", "north"]].to_numpy(dtype="float64")
    fps = geo.boxes(bounds) if n else np.zeros(0, dtype=object)

    naip_e = IndexedCatalog(eligible_naip(naip, profile, state), _naip_entry)
    s2_u = IndexedCatalog(usable_s2(s2, profile), _s2_entry)
    naip_hits, s2_hits = naip_e.hits(fps), s2_u.hits(fps)
    s = profile.imagery.s2
    fallback = (s.fallback_start, s.fallback_end)
    split = profile.split_of(state)
    sect = profile.section_hash("imagery", "geometry")
    has = set(cand.columns)

    rej: list[dict] = []
    out: list[dict] = []
    for i in range(n):
        sid = str(cand.at[i, "scene_id"])
        key = scene_key(state, sid)
        nm = match_naip(bounds[i], naip_e, naip_hits[i], grid)
        if nm is None:
            rej.append({"key": key, "scene_id": sid, "state": state, "reason": NO_NAIP,
                        "detail": f"no {state} NAIP state-year acquired in {profile.imagery.naip.start}.."
                                  f"{profile.imagery.naip.end} (end excluded) reaches every HR tile"})
            continue
        win = s2_window(nm["date"], profile)
        mode, items, used = ALIGNED, match_s2(bounds[i], s2_u, s2_hits[i], win), win
        if items is None:
            mode, items, used = FALLBACK, match_s2(bounds[i], s2_u, s2_hits[i], fallback), fallback
        if items is None:
            w = f"{win[0]}..{win[1]} and " if win else ""
            rej.append({"key": key, "scene_id": sid, "state": state, "reason": NO_S2,
                        "detail": f"Sentinel-2 items with cloud < {s.max_cloud_pct}% in {w}"
                                  f"{fallback[0]}..{fallback[1]} do not cover the whole LR footprint"})
            continue
        r = cand.iloc[i]
        w, so, e, no = (float(v) for v in bounds[i])
        row = {"key": key, "scene_id": sid, "state": state, "split": split,
               "west": w, "south": so, "east": e, "north": no,
               "lon": float(r["lon"]) if "lon" in has else (w + e) / 2,
               "lat": float(r["lat"]) if "lat" in has else (so + no) / 2,
               "concepts": np.asarray(r["concepts"], dtype="int16")}
        for c in LABEL_COLUMNS + EXTRA_COLUMNS:
            row[c] = r[c] if c in has else None
        naip_json, s2_json = _json_list(nm["items"]), _json_list(items)
        row.update({"naip_year": nm["year"], "naip_date": _iso(nm["date"]), "naip_items": naip_json,
                    "s2_window": mode, "s2_start": _iso(used[0]), "s2_end": _iso(used[1]),
                    "s2_items": s2_json, "provider": provider})
        # identities, not locations: the same items served from another URL plan the same scene
        row["plan_hash"] = hash_inputs(sect, key, [w, so, e, no], row["naip_year"],
                                       [(i["id"], i.get("datetime")) for i in nm["items"]], mode,
                                       row["s2_start"], row["s2_end"],
                                       [(i["id"], i.get("datetime"), i.get("baseline")) for i in items], provider)
        out.append(row)
    return _rows_frame(out), _rejections_frame(rej)


def select_rows(matched: gpd.GeoDataFrame, rejections: pd.DataFrame, profile, state: str, *,
                seed: int = 0, target: int | None = None, concepts: Sequence[int] | None = None) -> PlanResult:
    """Class-aware subsampling of one state's matched rows to its target (the profile's
    ``regions.STATE.target`` unless `target` is given); the others become ``subsampled_out``.
    `concepts`: the concept subset the rows were cut to (recorded in the stats, not applied here)."""
    if state not in profile.regions:
        raise PlanError(f"unknown state {state!r}; the profile has {', '.join(sorted(profile.regions))}")
    target = profile.regions[state].target if target is None else int(target)
    if target < 0:
        raise PlanError(f"target must be >= 0, got {target}")
    if matched["key"].duplicated().any():
        raise PlanError(f"matched rows repeat key {matched.loc[matched['key'].duplicated(), 'key'].iloc[0]!r}")
    sel = set(subsample(matched["scene_id"].astype(str).tolist(), [list(c) for c in matched["concepts"]],
                        target, concept_priors(profile), seed))
    keep = matched["scene_id"].astype(str).isin(sel).to_numpy()
    out = matched[~keep]
    rej = pd.concat([rejections[list(REJECTION_COLUMNS)], pd.DataFrame({
        "key": out["key"].astype(str), "scene_id": out["scene_id"].astype(str), "state": state,
        "reason": SUBSAMPLED_OUT,
        "detail": f"not among the {target} scenes picked by class-aware subsampling (seed {seed})"})],
        ignore_index=True) if len(out) else rejections
    rows = matched[keep].sort_values("key", kind="mergesort").reset_index(drop=True)
    rejections = _rejections_frame(rej)
    stats = {"state": state, "candidates": int(len(matched) + len(rejections) - len(out)),
             "matched": int(len(matched)), "selected": int(len(rows)), "target": target, "seed": seed,
             "concepts": concept_names(profile, concepts),
             "rejected": {r: int((rejections["reason"] == r).sum()) for r in REJECTION_REASONS},
             "s2_window": {m: int((rows["s2_window"] == m).sum()) for m in (ALIGNED, FALLBACK)},
             "naip_years": {str(k): int(v) for k, v in sorted(rows["naip_year"].value_counts().items())}}
    return PlanResult(rows=rows, rejections=rejections, stats=stats)


def concept_subset(candidates: gpd.GeoDataFrame, profile, state: str,
                   concepts: Sequence[int] | None) -> tuple[gpd.GeoDataFrame, pd.DataFrame]:
    """(the candidates holding at least one of the concept ids `concepts`, rejections
    ``no_named_concept`` of the others); every candidate and no rejection when `concepts` is None."""
    from gl10m.anchors import filter_by_concepts

    if concepts is None:
        return candidates, _rejections_frame([])
    _check_candidates(candidates)
    kept = filter_by_concepts(candidates, concepts)
    out = candidates[~candidates.index.isin(kept.index)]
    names = ", ".join(profile.concepts[int(c)].name for c in sorted(set(int(c) for c in concepts)))
    rej = pd.DataFrame({"key": [scene_key(state, str(s)) for s in out["scene_id"]],
                        "scene_id": out["scene_id"].astype(str).to_numpy(), "state": state,
                        "reason": NO_NAMED_CONCEPT, "detail": f"holds none of the concepts {names} (--concepts)"},
                       columns=list(REJECTION_COLUMNS))
    return kept.reset_index(drop=True), _rejections_frame(rej)


def concept_names(profile, concepts: Sequence[int] | None) -> list[str] | None:
    """The names of concept ids `concepts` in id order (None: no subset), as plans and manifests record them."""
    return None if concepts is None else [profile.concepts[int(c)].name for c in sorted({int(c) for c in concepts})]


def plan_region(candidates: gpd.GeoDataFrame, naip: gpd.GeoDataFrame, s2: gpd.GeoDataFrame, profile,
                state: str, *, provider: str = "stac", seed: int = 0, target: int | None = None,
                concepts: Sequence[int] | None = None) -> PlanResult:
    """Cut to the concept subset, match, coverage-check and subsample one state's candidates:
    :func:`concept_subset`, :func:`match_region`, then :func:`select_rows` (see the module doc).
    `target` overrides the profile's per-state target; `concepts` (ids) keeps only the scenes
    holding one of them, before subsampling."""
    if target is not None and int(target) < 0:
        raise PlanError(f"target must be >= 0, got {target}")
    if candidates.index.has_duplicates:
        candidates = candidates.reset_index(drop=True)
    kept, rej0 = concept_subset(candidates, profile, state, concepts)
    matched, rej = match_region(kept, naip, s2, profile, state, provider=provider)
    if len(rej0):
        rej = _rejections_frame(pd.concat([rej0, rej], ignore_index=True))
    return select_rows(matched, rej, profile, state, seed=seed, target=target, concepts=concepts)


def _rows_frame(rows: list[dict]) -> gpd.GeoDataFrame:
    df = pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
    if len(df):
        df = df.sort_values("key", kind="mergesort").reset_index(drop=True)
        geom = geo.boxes(df[["west", "south", "east", "north"]].to_numpy(dtype="float64"))
    else:
        geom = np.zeros(0, dtype=object)
    return gpd.GeoDataFrame(df, geometry=gpd.GeoSeries(geom, crs="EPSG:4326"), crs="EPSG:4326")


# -- dry run ----------------------------------------------------------------------------------
def scene_cost(row, profile) -> dict:
    """Estimated requests and bytes to fetch one plan row.

    Requests: one window read per Sentinel-2 item and asset (B02 B03 B04 SCL, and B08 when
    ``imagery.bands`` is not rgb) plus one per NAIP
    quarter-quad. Bytes: the *uncompressed* pixels of those windows (Sentinel-2 three uint16
    bands at 10 m + SCL uint8 at 20 m per item; NAIP ``len(naip.bands)`` uint8 bands at the
    item's gsd over its share of the footprint). An estimate: real transfers are compressed COG
    blocks, usually smaller, plus a few header reads per file."""
    w, s, e, n = (float(row[k]) for k in ("west", "south", "east", "north"))
    lat = (s + n) / 2
    lon_m, lat_m = (float(v) for v in geo.metres_per_degree(lat))
    wm, hm = (e - w) * lon_m, (n - s) * lat_m
    s2_items = json.loads(row["s2_items"])
    naip_items = json.loads(row["naip_items"])
    px10 = math.ceil(wm / 10.0) * math.ceil(hm / 10.0)
    px20 = math.ceil(wm / 20.0) * math.ceil(hm / 20.0)
    extra = getattr(profile.imagery, "bands", "rgb") != "rgb"  # B08 and NAIP's N band are read too
    s2_bytes = len(s2_items) * ((4 if extra else 3) * px10 * 2 + px20 * 1)
    nb = len(profile.imagery.naip.bands) + (1 if extra else 0)
    naip_bytes = 0
    fp_area = (e - w) * (n - s)
    for it in naip_items:
        bw, bs, be, bn = it["bbox"]
        ix = max(0.0, min(e, be) - max(w, bw))
        iy = max(0.0, min(n, bn) - max(s, bs))
        frac = (ix * iy) / fp_area if fp_area > 0 else 0.0
        gsd = float(it.get("gsd") or 1.0)
        naip_bytes += int(math.ceil(frac * wm * hm / (gsd * gsd))) * nb
    s2_reads = len(s2_items) * (len(S2_ASSETS) - (0 if extra else 1))  # B08 only when read
    return {"s2_reads": s2_reads, "naip_reads": len(naip_items), "requests": s2_reads + len(naip_items),
            "s2_bytes": int(s2_bytes), "naip_bytes": int(naip_bytes), "bytes": int(s2_bytes + naip_bytes)}


ESTIMATE_COLUMNS = ("state", "concept", "scenes", "s2_reads", "naip_reads", "requests", "s2_bytes", "naip_bytes", "bytes")
ALL = "*"


def estimate(rows: pd.DataFrame, profile) -> pd.DataFrame:
    """Dry-run cost of plan rows: one line per state for all its scenes (``concept == "*"``)
    and one per (state, concept) for the scenes holding that concept (a scene counts under
    each of its concepts, so concept lines overlap), sorted by state then concept id."""
    per: list[dict] = []
    names = [c.name for c in profile.concepts]
    acc: dict[tuple[str, int], dict] = {}
    for _, r in rows.iterrows():
        cost = scene_cost(r, profile)
        for c in [-1] + sorted({int(x) for x in r["concepts"]}):
            a = acc.setdefault((str(r["state"]), c), {k: 0 for k in ESTIMATE_COLUMNS[2:]})
            a["scenes"] += 1
            for k, v in cost.items():
                a[k] += v
    for (state, c), a in sorted(acc.items()):
        per.append({"state": state, "concept": ALL if c < 0 else names[c], **a})
    return pd.DataFrame(per, columns=list(ESTIMATE_COLUMNS))


def _human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000.0
    return f"{nbytes:.1f} TB"  # pragma: no cover


def format_estimate(est: pd.DataFrame, rejections: pd.DataFrame | None = None) -> str:
    """A plain-text table of :func:`estimate` (and rejection counts per state, when given)."""
    lines = ["dry run: estimated cost (bytes are uncompressed window pixels, an estimate; "
             "requests = S2 window reads x 4 assets + NAIP quarter-quads)",
             f"{'state':<6} {'concept':<26} {'scenes':>8} {'requests':>10} {'bytes':>10}"]
    for _, r in est.iterrows():
        lines.append(f"{r['state']:<6} {str(r['concept']):<26} {int(r['scenes']):>8} {int(r['requests']):>10} "
                     f"{_human(int(r['bytes'])):>10}")
    tot = est[est["concept"] == ALL]
    if len(tot) > 1:
        lines.append(f"{'total':<6} {ALL:<26} {int(tot['scenes'].sum()):>8} {int(tot['requests'].sum()):>10} "
                     f"{_human(int(tot['bytes'].sum())):>10}")
    if rejections is not None and len(rejections):
        lines.append("not planned:")
        for (st, reason), k in rejections.groupby(["state", "reason"]).size().sort_index().items():
            lines.append(f"  {st:<6} {reason:<16} {int(k):>8}")
    return "\n".join(lines)


# -- I/O --------------------------------------------------------------------------------------
def plan_path(workdir: str | Path, state: str) -> Path:
    """``W/plan/{STATE}.parquet``."""
    return Path(workdir) / "plan" / f"{state}.parquet"


def write_plan(rows: gpd.GeoDataFrame, path: str | Path, stats: dict | None = None) -> None:
    """Write plan rows as GeoParquet (EPSG:4326, footprint geometry) with :data:`PLAN_SCHEMA`,
    atomically; `stats` go into the file metadata."""
    missing = [c for c in PLAN_COLUMNS if c not in rows.columns]
    if missing:
        raise PlanError(f"plan rows lack column(s) {', '.join(missing)}")
    g = rows[list(PLAN_COLUMNS) + ["geometry"]].copy()
    g = gpd.GeoDataFrame(g, geometry="geometry", crs=rows.crs or "EPSG:4326")
    for c in _LIST_DTYPES:  # None -> empty list, arrays as lists for arrow
        g[c] = g[c].map(lambda v: [] if v is None or (isinstance(v, float) and math.isnan(v)) else list(v))
    with atomic_path(path, suffix=".parquet") as tmp:
        g.to_parquet(tmp, index=False)
        t = pq.read_table(tmp)
        meta = {**(t.schema.metadata or {}), b"gl10m": json.dumps(stats or {}, sort_keys=True, default=str).encode()}
        target = pa.schema(list(PLAN_SCHEMA) + [t.schema.field("geometry")], metadata=meta)
        pq.write_table(t.select(list(PLAN_COLUMNS) + ["geometry"]).cast(target), tmp)


def read_plan(path: str | Path) -> gpd.GeoDataFrame:
    """Read plan rows written by :func:`write_plan` (list columns as numpy arrays; the stats in
    ``attrs["stats"]``)."""
    p = Path(path)
    if not p.exists():
        raise PlanError(f"plan {p}: no such file")
    try:
        gdf = gpd.read_parquet(p)
        meta = pq.read_schema(p).metadata or {}
    except Exception as e:
        raise PlanError(f"plan {p}: unreadable ({type(e).__name__}: {e})") from None
    missing = [c for c in PLAN_COLUMNS if c not in gdf.columns]
    if missing:
        raise PlanError(f"plan {p}: missing column(s) {', '.join(missing)}")
    for c, d in _LIST_DTYPES.items():
        gdf[c] = gdf[c].map(lambda v, d=d: np.asarray(v if v is not None else [], dtype=d))
    gdf.attrs["stats"] = json.loads(meta[b"gl10m"]) if b"gl10m" in meta else {}
    return gdf


def read_plan_stats(path: str | Path) -> dict:
    """The stats :func:`write_plan` stored with a plan (its file metadata only; no rows are read).
    ``stats.get("concepts")`` is the concept subset the plan was made for (None: every scene)."""
    p = Path(path)
    try:
        meta = pq.read_schema(p).metadata or {}
    except FileNotFoundError:
        raise PlanError(f"plan {p}: no such file") from None
    except Exception as e:
        raise PlanError(f"plan {p}: unreadable ({type(e).__name__}: {e})") from None
    return json.loads(meta[b"gl10m"]) if b"gl10m" in meta else {}


def write_rejections(rej: pd.DataFrame, path: str | Path) -> None:
    """Write plan rejections as Parquet, atomically."""
    with atomic_path(path, suffix=".parquet") as tmp:
        rej[list(REJECTION_COLUMNS)].to_parquet(tmp, index=False)


def naip_items_of(row) -> list[dict]:
    """The NAIP quarter-quads of a plan row."""
    return json.loads(row["naip_items"])


def s2_items_of(row) -> list[dict]:
    """The Sentinel-2 items of a plan row."""
    return json.loads(row["s2_items"])
