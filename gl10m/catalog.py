"""The catalog stage: a provider's Sentinel-2 and NAIP item footprints and properties, fetched once
per state and collection (not once per scene) and kept as GeoParquet for the plan's local joins.

Steps (plain functions of explicit inputs):

* :func:`search_range` - the dates to search: NAIP from 4 years before the profile's NAIP window
  to 1 year after it (older and newer state-years stay visible, so the plan can say *why* an
  area has no eligible NAIP and the dry run can show it; the plan decides eligibility);
  Sentinel-2 the union of every window the plan can use (the aligned windows are clipped to
  ``s2.clip_start .. clip_end``, the fallback is ``fallback_start .. fallback_end``: in GL-10M
  both are 2023).
* :func:`items_to_frame` - normalised items -> GeoDataFrame (:data:`CATALOG_COLUMNS`).
* :func:`drop_reprocessed` - Sentinel-2 reprocessing duplicates: items of the same datatake and
  MGRS tile are one granule processed several times; the newest processing baseline is kept
  (ties: the later generation time in the id / properties, then the larger id).
* :func:`filter_cloud` - the scene cloud filter ``eo:cloud_cover < s2.max_cloud_pct``, applied
  HERE, locally, after duplicate removal (so the kept reprocessing's own cloud cover decides).
  Servers are never asked to filter (rustac ignores ``query``; results must not depend on the
  server). Items without a cloud cover are dropped (unknown is not "clear"). The plan checks the
  threshold again, so a catalog built with a looser threshold is still safe to plan from.
* :func:`catalog_region` - search + normalise + the two filters for one state and collection.
* :func:`write_catalog` / :func:`read_catalog` - GeoParquet, atomic; the stats (searched,
  duplicates, cloudy, kept, the search window, the provider) ride in the file's metadata.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Iterable

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
from shapely.geometry import shape

from gl10m.errors import UserError
from gl10m.io import atomic_path
from gl10m.sources.base import as_date

NAIP_YEARS_BEFORE = 4
NAIP_YEARS_AFTER = 1
META_KEY = b"gl10m"

# column -> pandas dtype (geometry last, not listed)
CATALOG_COLUMNS: dict[str, str] = {
    "id": "object", "collection": "object", "provider": "object", "datetime": "object",
    "date": "object", "epsg": "Int64", "gsd": "float64", "cloud_cover": "float64",
    "mgrs_tile": "object", "baseline": "object", "datatake": "object",
    "naip_state": "object", "naip_year": "Int64",
    "west": "float64", "south": "float64", "east": "float64", "north": "float64",
    "hrefs": "object", "properties": "object",
}


class CatalogError(UserError):
    """A catalog that cannot be built or read (bad collection, unreadable file, wrong schema)."""


# -- what to search ---------------------------------------------------------------------------
def collection_kind(profile, collection: str) -> str:
    """``"naip"`` or ``"s2"``: which of the profile's collections `collection` is."""
    im = profile.imagery
    if collection == im.naip.collection:
        return "naip"
    if collection == im.s2.collection:
        return "s2"
    raise CatalogError(f"collection {collection!r} is neither imagery.naip.collection "
                       f"({im.naip.collection!r}) nor imagery.s2.collection ({im.s2.collection!r})")


def _shift_years(d: dt.date, years: int) -> dt.date:
    try:
        return d.replace(year=d.year + years)
    except ValueError:  # 29 February
        return d.replace(year=d.year + years, day=28)


def search_range(profile, collection: str) -> tuple[dt.date, dt.date]:
    """Inclusive date range searched for `collection` (see the module doc)."""
    kind = collection_kind(profile, collection)
    if kind == "naip":
        n = profile.imagery.naip
        return _shift_years(n.start, -NAIP_YEARS_BEFORE), _shift_years(n.end, NAIP_YEARS_AFTER)
    s = profile.imagery.s2
    return min(s.clip_start, s.fallback_start), max(s.clip_end, s.fallback_end)


# -- frames -----------------------------------------------------------------------------------
def empty_catalog() -> gpd.GeoDataFrame:
    df = pd.DataFrame({c: pd.Series(dtype=t) for c, t in CATALOG_COLUMNS.items()})
    return gpd.GeoDataFrame(df, geometry=gpd.GeoSeries([], crs="EPSG:4326"), crs="EPSG:4326")


def items_to_frame(items: Iterable[dict]) -> gpd.GeoDataFrame:
    """Normalised items (:mod:`gl10m.sources.base`) as a catalog frame, sorted by (datetime, id).
    ``hrefs`` and ``properties`` become JSON strings (sorted keys)."""
    rows, geoms = [], []
    for it in items:
        g = it.get("geometry")
        if g is None and it.get("bbox") is not None:
            geom = shapely.box(*it["bbox"][:4])
        elif g is None:
            continue  # an item with no footprint cannot be joined; nothing to keep
        else:
            geom = shape(g)
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        w, s, e, n = geom.bounds
        rows.append({
            "id": str(it["id"]), "collection": it.get("collection"), "provider": it.get("provider"),
            "datetime": it.get("datetime"), "date": (it.get("datetime") or "")[:10] or None,
            "epsg": it.get("epsg"), "gsd": it.get("gsd"), "cloud_cover": it.get("cloud_cover"),
            "mgrs_tile": it.get("mgrs_tile"), "baseline": it.get("baseline"), "datatake": it.get("datatake"),
            "naip_state": it.get("naip_state"), "naip_year": it.get("naip_year"),
            "west": w, "south": s, "east": e, "north": n,
            "hrefs": json.dumps(it.get("hrefs") or {}, sort_keys=True),
            "properties": json.dumps(it.get("properties") or {}, sort_keys=True, default=str),
        })
        geoms.append(geom)
    if not rows:
        return empty_catalog()
    df = pd.DataFrame(rows, columns=list(CATALOG_COLUMNS))
    for c, t in CATALOG_COLUMNS.items():
        df[c] = df[c].astype(t)
    gdf = gpd.GeoDataFrame(df, geometry=geoms, crs="EPSG:4326")
    gdf = gdf.drop_duplicates("id", keep="first")
    return _sorted(gdf)


def _sorted(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    return gdf.sort_values(["datetime", "id"], kind="mergesort", na_position="last").reset_index(drop=True)


_GEN_TIME = re.compile(r"_(\d{8}T\d{6})$")


def _baseline_key(b) -> tuple[int, ...]:
    if b is None or (isinstance(b, float) and np.isnan(b)):
        return (-1,)
    try:
        return tuple(int(x) for x in str(b).split("."))
    except ValueError:
        return (-1,)


def _generation(row) -> str:
    """When this processing was made: ``s2:generation_time`` / the PC id's last timestamp /
    the Earth Search id's sequence number; '' when unknown."""
    try:
        props = json.loads(row["properties"]) if isinstance(row["properties"], str) else {}
    except ValueError:
        props = {}
    g = props.get("s2:generation_time") or props.get("s2:processing_time")
    if g:
        return str(g)
    m = _GEN_TIME.search(str(row["id"]))
    if m:
        return m.group(1)
    m = re.search(r"_(\d+)_L2A$", str(row["id"]))
    return m.group(1).zfill(6) if m else ""


def drop_reprocessed(gdf: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, int]:
    """Keep one item per (datatake, MGRS tile): the newest processing baseline (ties: the newest
    generation, then the largest id). Items without a datatake or tile are kept as they are.
    Returns (kept items sorted by datetime and id, number dropped)."""
    if gdf.empty:
        return gdf, 0
    key_ok = gdf["datatake"].notna() & gdf["mgrs_tile"].notna()
    cand = gdf[key_ok]
    if cand.empty:
        return gdf, 0
    rank = pd.DataFrame({
        "datatake": cand["datatake"].astype(str), "tile": cand["mgrs_tile"].astype(str),
        "b": [_baseline_key(b) for b in cand["baseline"]],
        "g": [_generation(r) for _, r in cand[["id", "properties"]].iterrows()],
        "id": cand["id"].astype(str)}, index=cand.index)
    rank = rank.sort_values(["datatake", "tile", "b", "g", "id"], kind="mergesort")
    keep = rank.groupby(["datatake", "tile"], sort=False).tail(1).index
    dropped = len(cand) - len(keep)
    out = pd.concat([gdf[~key_ok], gdf.loc[keep]])
    return _sorted(gpd.GeoDataFrame(out, geometry="geometry", crs=gdf.crs)), int(dropped)


def filter_cloud(gdf: gpd.GeoDataFrame, max_cloud_pct: float) -> tuple[gpd.GeoDataFrame, int]:
    """Keep items with ``cloud_cover < max_cloud_pct`` (strict, as the reference's ``< 2 %``);
    items without a cloud cover are dropped. Returns (kept, number dropped)."""
    cc = gdf["cloud_cover"].astype("float64")
    ok = cc.notna() & (cc < float(max_cloud_pct))
    return gdf[ok].reset_index(drop=True), int((~ok).sum())


# -- the step ---------------------------------------------------------------------------------
def catalog_region(provider, profile, state: str, collection: str, *,
                   bbox: tuple[float, float, float, float] | None = None) -> gpd.GeoDataFrame:
    """Every item of `collection` over the state's bbox (or `bbox`) and the search range, as a
    catalog frame. Sentinel-2: reprocessing duplicates removed, then the cloud filter. NAIP: all
    items (every state-year; neighbouring states' items too: the plan filters on
    ``naip:state``). ``gdf.attrs["stats"]`` says what was searched and dropped."""
    if state not in profile.regions:
        raise CatalogError(f"unknown state {state!r}; the profile has {', '.join(sorted(profile.regions))}")
    kind = collection_kind(profile, collection)
    start, end = search_range(profile, collection)
    box = tuple(float(v) for v in (bbox or profile.regions[state].bbox))
    # providers whose items carry no state (Earth Engine's NAIP) label them with the searched one
    kw = {"state": state} if getattr(provider, "wants_state", False) else {}
    items = list(provider.search_items(collection, box, start, end, **kw))
    gdf = items_to_frame(items)
    stats = {"state": state, "collection": collection, "kind": kind, "provider": getattr(provider, "name", "?"),
             "source": getattr(provider, "describe", lambda: {})(), "bbox": list(box),
             "start": start.isoformat(), "end": end.isoformat(), "searched": int(len(gdf)),
             "duplicates": 0, "cloudy": 0, "max_cloud_pct": None}
    if kind == "s2":
        gdf, stats["duplicates"] = drop_reprocessed(gdf)
        mc = profile.imagery.s2.max_cloud_pct
        gdf, stats["cloudy"] = filter_cloud(gdf, mc)
        stats["max_cloud_pct"] = mc
    gdf = _sorted(gdf)
    stats["kept"] = int(len(gdf))
    gdf.attrs["stats"] = stats
    return gdf


# -- I/O --------------------------------------------------------------------------------------
def catalog_path(workdir: str | Path, state: str, collection: str) -> Path:
    """``W/catalog/{STATE}/{collection}.parquet``."""
    return Path(workdir) / "catalog" / state / f"{collection}.parquet"


def write_catalog(gdf: gpd.GeoDataFrame, path: str | Path) -> None:
    """Write a catalog frame as GeoParquet (EPSG:4326), atomically, with ``attrs["stats"]`` in
    the file metadata."""
    missing = [c for c in CATALOG_COLUMNS if c not in gdf.columns]
    if missing:
        raise CatalogError(f"catalog lacks column(s) {', '.join(missing)}")
    g = gpd.GeoDataFrame(gdf[list(CATALOG_COLUMNS)], geometry=gdf.geometry.values, crs=gdf.crs or "EPSG:4326")
    if g.crs.to_epsg() != 4326:
        raise CatalogError("catalog must be in EPSG:4326")
    stats = json.dumps(gdf.attrs.get("stats", {}), sort_keys=True, default=str).encode()
    with atomic_path(path, suffix=".parquet") as tmp:
        g.to_parquet(tmp, index=False)
        t = pq.read_table(tmp)
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), META_KEY: stats})
        pq.write_table(t, tmp)


def read_catalog(path: str | Path) -> gpd.GeoDataFrame:
    """Read a catalog written by :func:`write_catalog` (stats back in ``attrs["stats"]``)."""
    p = Path(path)
    if not p.exists():
        raise CatalogError(f"catalog {p}: no such file")
    try:
        gdf = gpd.read_parquet(p)
        meta = pq.read_schema(p).metadata or {}
    except Exception as e:  # corrupt / not parquet
        raise CatalogError(f"catalog {p}: unreadable ({type(e).__name__}: {e})") from None
    missing = [c for c in CATALOG_COLUMNS if c not in gdf.columns]
    if missing:
        raise CatalogError(f"catalog {p}: missing column(s) {', '.join(missing)}")
    for c, t in CATALOG_COLUMNS.items():
        gdf[c] = gdf[c].astype(t)
    gdf.attrs["stats"] = json.loads(meta[META_KEY]) if META_KEY in meta else {}
    return gdf


def catalog_hrefs(row) -> dict[str, str]:
    """The unsigned asset hrefs of one catalog row."""
    return json.loads(row["hrefs"]) if isinstance(row["hrefs"], str) else dict(row["hrefs"] or {})


def dates(gdf: gpd.GeoDataFrame) -> pd.Series:
    """Acquisition dates of a catalog frame as ``datetime.date`` objects."""
    return gdf["datetime"].map(lambda s: as_date(s) if isinstance(s, str) else None)
