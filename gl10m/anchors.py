"""The anchors stage: concept features -> thinned scene candidates with concept fractions.

Steps (plain functions of explicit inputs):

1. :func:`anchor_points` - one anchor per OSM object: a point on the feature's surface
   (GEOS point-on-surface, always inside the polygon, unlike a centroid), the feature's rarest
   concept (smallest ``count`` prior in the profile) as its ``anchor_concept``, and a stable
   64-bit hash of ``(osm_type, osm_id)``.
2. :func:`thin` - greedy thinning in priority order: rarest anchor concept first, ties broken by
   the stable hash (never by input order, so the result does not depend on it). An anchor is
   kept when its footprint overlaps no already-kept footprint by more than
   ``geometry.max_overlap`` (fraction of the smaller footprint, measured in the equal-area
   EPSG:6933) and, when features are given, when its scene passes the min-concepts rule.
   The min-concepts rule is applied *before* thinning, in effect: the result equals thinning
   the set of valid anchors only, so an anchor whose scene would be dropped never removes a
   valid neighbour. Thinning first and filtering after would lose both. To avoid computing
   scene statistics for every anchor, validity is computed lazily (in vectorised batches of
   candidates that do not yet conflict with a kept scene), which gives the same result.
3. :func:`scene_stats` - per scene statistics, one spatial partition at a time. A pipeline maps
   ``scene_stats(part, features_for(part, features, profile), profile, state)`` over
   ``partitions(kept, n)``; :func:`build_candidates` does the whole stage in-process. Concept areas with the features of one concept unioned
   first (overlaps of the same concept count once), per-tile fractions, dominant concepts and
   ground pixel sizes.

Definitions (scene areas in m^2 in the equal-area EPSG:6933: features are clipped to the
footprint in degrees and the pieces projected vertex by vertex):
- ``scene_frac[c]`` (absolute): area of the union of concept ``c``'s features inside the
  footprint / footprint area. Concepts can overlap each other (a tennis court inside a park),
  so the 66 absolute fractions can sum to more than 1.
- a concept is *present* when its area in the footprint >= ``geometry.min_concept_area_m2``;
  ``concepts`` lists the present ones (ascending ids). A scene is kept only with at least
  ``geometry.min_concepts`` present concepts.
- ``rel_frac[c]`` (relative): ``scene_frac[c] / sum(scene_frac[present])`` for present
  concepts, 0 otherwise; it sums to 1 over the present concepts (a label distribution).
- per tile (sparse): ``tile_idx``, ``tile_concept``, ``tile_frac`` = area of the concept's
  union inside the tile / tile area (measured in the tile's own degree grid, which agrees with
  the equal-area fraction to ~1e-5 over a 0.0024-degree tile), for every (tile, concept) with a fraction > 1e-6, sorted
  by (tile, concept). ``tile_dominant[t]``: the concept with the largest area in tile ``t``
  among those with area >= ``min_concept_area_m2`` there (ties: lower id), -1 when none.
- ``hr_px_m_x/y``: ground size of one HR pixel (footprint / (grid * tile_px)); ``lr_px_m_x/y``
  the same for the LR image (footprint / lr_px), at the scene centre latitude, WGS84.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from gl10m import geometry as geo
from gl10m.errors import UserError
from gl10m.io import atomic_path

TYPE_CODE = {"node": 1, "way": 2, "relation": 3}
TYPE_INITIAL = {"node": "n", "way": "w", "relation": "r"}
FEATURE_COLUMNS = ("osm_type", "osm_id", "concepts", "geometry")
TILE_FRAC_MIN = 1e-6
VALIDATE_BATCH = 512
STATS_CHUNK = 512

CANDIDATE_SCHEMA = pa.schema([
    ("scene_id", pa.string()),
    ("state", pa.string()),
    ("lon", pa.float64()), ("lat", pa.float64()),
    ("west", pa.float64()), ("south", pa.float64()), ("east", pa.float64()), ("north", pa.float64()),
    ("anchor_osm_type", pa.string()),
    ("anchor_osm_id", pa.int64()),
    ("anchor_concept", pa.int16()),
    ("concepts", pa.list_(pa.int16())),
    ("scene_frac", pa.list_(pa.float32())),
    ("rel_frac", pa.list_(pa.float32())),
    ("tile_idx", pa.list_(pa.int16())),
    ("tile_concept", pa.list_(pa.int16())),
    ("tile_frac", pa.list_(pa.float32())),
    ("tile_dominant", pa.list_(pa.int16())),
    ("hr_px_m_x", pa.float32()), ("hr_px_m_y", pa.float32()),
    ("lr_px_m_x", pa.float32()), ("lr_px_m_y", pa.float32()),
])
_LIST_DTYPES = {f.name: np.dtype(f.type.value_type.to_pandas_dtype())
                for f in CANDIDATE_SCHEMA if pa.types.is_list(f.type)}


class AnchorsError(UserError, ValueError):
    """Bad input to the anchors stage (one line)."""


# -- helpers --------------------------------------------------------------------------------
def stable_hash(osm_type, osm_id) -> np.ndarray:
    """Stable 64-bit hash of (osm_type, osm_id) pairs (splitmix64 of id*4 + type code)."""
    codes = pd.Series(np.asarray(osm_type, dtype=object)).map(TYPE_CODE)
    if codes.isna().any():
        bad = sorted({str(t) for t in np.asarray(osm_type, dtype=object)[codes.isna().to_numpy()]})
        raise AnchorsError(f"osm_type must be node, way or relation, got {', '.join(bad[:3])}")
    ids = np.asarray(osm_id, dtype="int64")
    with np.errstate(over="ignore"):
        z = (ids.astype("uint64") << np.uint64(2)) | codes.to_numpy().astype("uint64")
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def scene_ids(osm_type, osm_id) -> np.ndarray:
    """Scene ids without dots: type initial + id (``w123456``)."""
    t = pd.Series(np.asarray(osm_type, dtype=object)).map(TYPE_INITIAL)
    return (t + pd.Series(np.asarray(osm_id, dtype="int64")).astype(str)).to_numpy(dtype=object)


def concept_priors(profile) -> np.ndarray:
    """The per-concept ``count`` prior (scenes with the concept in GL-10M); smaller = rarer."""
    return np.array([c.count for c in profile.concepts], dtype="int64")


def _flat_concepts(col, n_concepts: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1], flat int16 concept ids, sorted and unique per row) of concept lists."""
    arrs = [np.asarray(v, dtype="int64").ravel() for v in col]
    lengths = np.fromiter((len(a) for a in arrs), dtype="int64", count=len(arrs))
    flat = np.concatenate(arrs) if arrs else np.zeros(0, dtype="int64")
    if flat.size and (flat.min() < 0 or flat.max() >= n_concepts):
        raise AnchorsError(f"concept ids must be 0..{n_concepts - 1}, got {int(flat.min())}..{int(flat.max())}")
    key = np.unique(np.repeat(np.arange(len(arrs), dtype="int64"), lengths) * n_concepts + flat)
    offsets = np.zeros(len(arrs) + 1, dtype="int64")
    np.cumsum(np.bincount(key // n_concepts, minlength=len(arrs)), out=offsets[1:])
    return offsets, (key % n_concepts).astype("int16")


def _gather(offsets: np.ndarray, flat: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row index, its list elements: (position of the row in `rows`, element)."""
    starts = offsets[rows]
    lens = offsets[rows + 1] - starts
    owner = np.repeat(np.arange(len(rows)), lens)
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    return owner, flat[starts[owner] + within]


def _check_features(features) -> None:
    if not isinstance(features, gpd.GeoDataFrame):
        raise AnchorsError(f"features must be a GeoDataFrame, got {type(features).__name__}")
    missing = [c for c in FEATURE_COLUMNS if c not in features.columns]
    if missing:
        raise AnchorsError(f"features lack column(s) {', '.join(missing)}")
    if features.crs is not None and features.crs.to_epsg() != 4326:
        raise AnchorsError(f"features must be in EPSG:4326, got {features.crs.to_string()}")


def _check_state(state) -> None:
    if not isinstance(state, str) or not state or "." in state or "/" in state:
        raise AnchorsError(f"state must be a non-empty name without dots or slashes, got {state!r}")


def _check_profile_geometry(profile) -> None:
    g = profile.geometry
    if g.footprint_deg <= 0 or g.grid < 1:
        raise AnchorsError("profile geometry: footprint and grid must be positive")


@dataclass
class _FeatureIndex:
    """Features prepared for bulk queries: polygons, an STRtree and CSR concept lists."""
    geoms: np.ndarray
    tree: shapely.STRtree
    offsets: np.ndarray
    flat: np.ndarray

    @classmethod
    def build(cls, features: gpd.GeoDataFrame, n_concepts: int) -> "_FeatureIndex":
        _check_features(features)
        g = np.asarray(features.geometry.values, dtype=object)
        if len(g):
            if shapely.is_missing(g).any() or shapely.is_empty(g).any():
                raise AnchorsError("features: a feature has no geometry")
            bad = ~shapely.is_valid(g)
            if bad.any():
                g = g.copy()
                g[bad] = shapely.make_valid(g[bad])
        offsets, flat = _flat_concepts(features["concepts"].to_numpy(), n_concepts)
        return cls(g, shapely.STRtree(g), offsets, flat)


# -- 1. anchors -----------------------------------------------------------------------------
def anchor_points(features: gpd.GeoDataFrame, profile) -> gpd.GeoDataFrame:
    """One anchor per OSM object (point on its surface), with its rarest concept and priority.

    Columns: anchor_osm_type, anchor_osm_id, anchor_concept (int16), anchor_count (the prior of
    that concept), concepts (all concepts of the object), hash (uint64), lon, lat, geometry
    (Point, EPSG:4326). Rows sorted by (osm_type, osm_id). Several rows of one OSM object are
    merged (their concepts unioned, the largest geometry anchors it).
    """
    _check_features(features)
    priors = concept_priors(profile)
    nc = len(priors)
    df = pd.DataFrame({
        "osm_type": features["osm_type"].astype(str).to_numpy(),
        "osm_id": features["osm_id"].astype("int64").to_numpy(),
        "_row": np.arange(len(features)),
    })
    geoms = np.asarray(features.geometry.values, dtype=object)
    if len(df):
        if shapely.is_missing(geoms).any() or shapely.is_empty(geoms).any():
            raise AnchorsError("features: a feature has no geometry")
        stable_hash(df["osm_type"], df["osm_id"])  # validates osm_type
    offsets, flat = _flat_concepts(features["concepts"].to_numpy(), nc)
    if len(df) and (np.diff(offsets) == 0).any():
        raise AnchorsError("features: a feature has no concept")
    df["_area"] = shapely.area(geoms) if len(df) else np.zeros(0)
    df = df.sort_values(["osm_type", "osm_id", "_area", "_row"], ascending=[True, True, False, True],
                        kind="mergesort")
    first = ~df.duplicated(["osm_type", "osm_id"], keep="first")
    # group id of every row (one per OSM object), in sorted order
    gid = np.cumsum(first.to_numpy()) - 1
    rows = df["_row"].to_numpy()
    owner, conc = _gather(offsets, flat, rows)
    obj = gid[owner]
    # unique (object, concept) pairs -> sorted concept lists per object
    key = np.unique(obj.astype("int64") * nc + conc)
    obj_u, conc_u = key // nc, (key % nc).astype("int16")
    n_obj = int(first.sum())
    cnt = np.bincount(obj_u, minlength=n_obj)
    concepts = np.split(conc_u, np.cumsum(cnt)[:-1]) if n_obj else []
    # rarest concept: smallest prior, ties -> lowest id (conc_u ascending within an object)
    rank = priors[conc_u] * (nc + 1) + conc_u
    order = np.lexsort((rank, obj_u))
    firsts = order[np.r_[0, np.cumsum(cnt)[:-1]]] if n_obj else np.zeros(0, dtype="int64")
    anchor_concept = conc_u[firsts].astype("int16")
    lead = df[first.to_numpy()]
    lon, lat = geo.representative_points(geoms[lead["_row"].to_numpy()])
    out = gpd.GeoDataFrame({
        "anchor_osm_type": lead["osm_type"].to_numpy(dtype=object),
        "anchor_osm_id": lead["osm_id"].to_numpy(dtype="int64"),
        "anchor_concept": anchor_concept,
        "anchor_count": priors[anchor_concept.astype("int64")] if n_obj else np.zeros(0, "int64"),
        "concepts": pd.Series(concepts, dtype=object),
        "hash": stable_hash(lead["osm_type"], lead["osm_id"]) if n_obj else np.zeros(0, "uint64"),
        "lon": lon, "lat": lat,
    }, geometry=gpd.points_from_xy(lon, lat), crs="EPSG:4326")
    return out.reset_index(drop=True)


def priority_order(anchors: gpd.GeoDataFrame) -> np.ndarray:
    """Row positions of `anchors` in thinning priority: rarest anchor concept first, then the
    stable hash, then (osm_type, osm_id) for the astronomically unlikely hash tie."""
    return np.lexsort((
        anchors["anchor_osm_id"].to_numpy(dtype="int64"),
        anchors["anchor_osm_type"].to_numpy(dtype=object).astype(str),
        anchors["hash"].to_numpy(dtype="uint64"),
        anchors["anchor_count"].to_numpy(dtype="int64"),
    ))


# -- 2. thinning ------------------------------------------------------------------------------
def _greedy(order: np.ndarray, lon: np.ndarray, lat: np.ndarray, size_deg: float, max_overlap: float,
            validate: Callable[[np.ndarray], np.ndarray] | None = None,
            batch: int = VALIDATE_BATCH) -> tuple[np.ndarray, dict]:
    """Greedy independent set in `order`: keep an anchor when its footprint overlaps no kept one
    by more than `max_overlap` and `validate` (if any) accepts it. Returns (status, counts) with
    status 1 kept, 2 thinned (overlap), 3 dropped (invalid)."""
    n = len(order)
    status = np.zeros(len(lon), dtype="int8")
    if n == 0:
        return status, {"validated": 0}
    bnd = geo.equal_area_bounds(geo.footprint_bounds(lon, lat, size_deg))
    x0, y0, x1, y1 = (bnd[:, k].tolist() for k in range(4))
    area = ((bnd[:, 2] - bnd[:, 0]) * (bnd[:, 3] - bnd[:, 1])).tolist()
    cx = np.floor(lon / size_deg).astype("int64").tolist()
    cy = np.floor(lat / size_deg).astype("int64").tolist()
    thr = max_overlap + 1e-9
    kept_in: dict[tuple[int, int], list[int]] = {}
    valid = bytearray(len(lon))  # 0 not measured yet, 1 valid, 2 invalid
    n_validated = 0
    order_l = order.tolist()

    def conflicts(i: int, cells: dict) -> bool:
        a0, b0, a1, b1, ar = x0[i], y0[i], x1[i], y1[i], area[i]
        ci, cj = cx[i], cy[i]
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                lst = cells.get((ci + dx, cj + dy))
                if not lst:
                    continue
                for j in lst:
                    iw = min(a1, x1[j]) - max(a0, x0[j])
                    if iw <= 0:
                        continue
                    ih = min(b1, y1[j]) - max(b0, y0[j])
                    if ih <= 0:
                        continue
                    if iw * ih / min(ar, area[j]) > thr:
                        return True
        return False

    st = bytearray(len(lon))  # 0 undecided, 1 kept, 2 thinned, 3 invalid
    for k, i in enumerate(order_l):
        if st[i] == 2 or conflicts(i, kept_in):
            st[i] = 2
            continue
        if validate is not None:
            if not valid[i]:
                # Speculative batch: i and the next undecided candidates that conflict neither
                # with a kept scene (those are thinned now: the kept set only grows) nor with an
                # earlier member of the batch (likely to lose to it). Which ones are validated
                # ahead of time only affects speed, never the result: a miss starts a new batch.
                todo = [i]
                tcells: dict[tuple[int, int], list[int]] = {(cx[i], cy[i]): [i]}
                for j in itertools.islice(order_l, k + 1, None):
                    if len(todo) >= batch:
                        break
                    if st[j] == 2 or valid[j]:
                        continue
                    if conflicts(j, kept_in):
                        st[j] = 2
                        continue
                    if conflicts(j, tcells):
                        continue
                    todo.append(j)
                    tcells.setdefault((cx[j], cy[j]), []).append(j)
                ok = np.asarray(validate(np.array(todo, dtype="int64")), dtype=bool)
                for j, v in zip(todo, ok.tolist()):
                    valid[j] = 1 if v else 2
                n_validated += len(todo)
            if valid[i] == 2:
                st[i] = 3
                continue
        st[i] = 1
        kept_in.setdefault((cx[i], cy[i]), []).append(i)
    status[:] = np.frombuffer(bytes(st), dtype="int8")
    return status, {"validated": n_validated}


def thin_status(anchors: gpd.GeoDataFrame, profile, features: gpd.GeoDataFrame | None = None,
                _index: "_FeatureIndex | None" = None) -> tuple[np.ndarray, dict]:
    """Thinning decision per anchor row: 1 kept, 2 thinned (overlaps a kept footprint), 3 dropped
    (its scene has fewer than min_concepts present; only checked when `features` is given), and
    counts. Deterministic and independent of row order."""
    _check_profile_geometry(profile)
    g = profile.geometry
    validate = None
    if features is not None or _index is not None:
        idx = _index if _index is not None else _FeatureIndex.build(features, profile.n_concepts)
        lon_a = anchors["lon"].to_numpy(dtype="float64")
        lat_a = anchors["lat"].to_numpy(dtype="float64")

        def validate(rows: np.ndarray) -> np.ndarray:
            b = geo.footprint_bounds(lon_a[rows], lat_a[rows], g.footprint_deg)
            return _present_counts(b, idx, profile) >= g.min_concepts

    order = priority_order(anchors)
    status, extra = _greedy(order, anchors["lon"].to_numpy(dtype="float64"),
                            anchors["lat"].to_numpy(dtype="float64"), g.footprint_deg, g.max_overlap, validate)
    counts = {
        "anchors": int(len(anchors)),
        "kept": int((status == 1).sum()),
        "thinned_overlap": int((status == 2).sum()),
        "dropped_min_concepts": int((status == 3).sum()),
        "validated": int(extra["validated"]),
    }
    return status, counts


def thin(anchors: gpd.GeoDataFrame, profile, features: gpd.GeoDataFrame | None = None) -> gpd.GeoDataFrame:
    """Kept anchors (see :func:`thin_status`), sorted by (osm_type, osm_id)."""
    status, _ = thin_status(anchors, profile, features)
    kept = anchors[status == 1]
    return kept.sort_values(["anchor_osm_type", "anchor_osm_id"], kind="mergesort").reset_index(drop=True)


# -- 3. scene statistics --------------------------------------------------------------------
@dataclass
class _Groups:
    """Per (scene, concept) group inside a chunk of footprints."""
    scene: np.ndarray     # scene position in the chunk
    concept: np.ndarray   # concept id
    area: np.ndarray      # m^2 (union of the concept's pieces inside the footprint)
    part_group: np.ndarray | None = None  # disjoint parts of the groups (degrees): group of each
    parts: np.ndarray | None = None       # part geometry, EPSG:4326, clipped to the footprint


def _pieces(bounds: np.ndarray, idx: _FeatureIndex):
    """Features clipped to footprints: (scene pos, feature row, piece in EPSG:4326)."""
    fp = geo.boxes(bounds)
    s, f = idx.tree.query(fp, predicate="intersects")
    if len(s) == 0:
        e = np.zeros(0, dtype="int64")
        return e, e, np.zeros(0, dtype=object)
    pieces = shapely.intersection(idx.geoms[f], fp[s])
    ok = shapely.area(pieces) > 0
    return s[ok], f[ok], pieces[ok]


def _concept_groups(bounds: np.ndarray, idx: _FeatureIndex, n_concepts: int, *, exact: bool,
                    threshold: float = 0.0, with_parts: bool = False) -> _Groups:
    """Area of each (scene, concept) with the concept's pieces unioned first.

    Only groups whose pieces intersect each other need a union (found with one STRtree bulk
    query); for the others the area is the sum of the pieces. With exact=False only presence
    (area >= threshold) matters: an overlapping group whose largest piece reaches the threshold
    is present, one whose pieces sum below it is absent, and only the rest are unioned.
    with_parts: also return disjoint parts per group (the pieces, or the union) for tiling.
    """
    s, f, pieces = _pieces(bounds, idx)
    pieces_ea = shapely.area(geo.to_equal_area(pieces)) if len(pieces) else np.zeros(0)
    owner, conc = _gather(idx.offsets, idx.flat, f)  # owner: piece position
    key = s[owner].astype("int64") * n_concepts + conc
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    ukey, start, cnt = np.unique(key, return_index=True, return_counts=True)
    n_g = len(ukey)
    gid = np.repeat(np.arange(n_g), cnt)  # group of each (sorted) entry
    parea = pieces_ea[owner]
    area = np.add.reduceat(parea, start) if n_g else np.zeros(0)
    # groups with pieces that meet each other
    overlapping = np.zeros(n_g, dtype=bool)
    m = np.flatnonzero(np.repeat(cnt > 1, cnt))
    if len(m):
        # move every group to its own place (x + group id, after taking the footprint's
        # south-west corner to 0) so that one bulk query only finds pairs within a group
        sub, gm = pieces[owner[m]], gid[m]
        _, ci = shapely.get_coordinates(sub, return_index=True)
        sw = bounds[s[owner[m]]][ci]
        shift = np.column_stack([gm[ci] - sw[:, 0], -sw[:, 1]])
        sub = shapely.transform(sub, lambda xy: xy + shift)
        i, j = shapely.STRtree(sub).query(sub, predicate="intersects")
        same = i < j
        overlapping[gm[i[same]]] = True
    need = overlapping.copy()
    if not exact:
        biggest = np.maximum.reduceat(parea, start) if n_g else np.zeros(0)
        sure = need & (biggest >= threshold)
        area[sure] = biggest[sure]  # a lower bound, enough for presence
        need &= ~sure & (area >= threshold)
    unions = None
    gneed = np.flatnonzero(need)
    if len(gneed):
        sel = np.flatnonzero(np.repeat(need, cnt))  # entries of the groups in `gneed`, in order
        grp = np.repeat(np.arange(len(gneed)), cnt[gneed])
        gcs = shapely.geometrycollections(pieces[owner[sel]], indices=grp)
        unions = shapely.union_all(gcs[:, None], axis=1)
        area[gneed] = shapely.area(geo.to_equal_area(unions))
    out = _Groups(scene=(ukey // n_concepts).astype("int64"), concept=(ukey % n_concepts).astype("int16"),
                  area=area)
    if with_parts:
        plain = ~np.repeat(need, cnt)
        out.part_group = np.concatenate([gid[plain], gneed]).astype("int64")
        out.parts = np.concatenate([pieces[owner[plain]], unions if unions is not None else np.zeros(0, object)])
    return out


def _present_counts(bounds: np.ndarray, idx: _FeatureIndex, profile) -> np.ndarray:
    """Number of present concepts per footprint (area >= min_concept_area_m2)."""
    thr = profile.geometry.min_concept_area_m2
    gr = _concept_groups(bounds, idx, profile.n_concepts, exact=False, threshold=thr)
    return np.bincount(gr.scene[gr.area >= thr], minlength=len(bounds))


def _tile_fracs(gr: _Groups, bounds: np.ndarray, grid: int):
    """(group, tile index, fraction of the tile) for every tile the group covers.

    The parts are mapped to grid coordinates (u east, v north, in tiles: the footprint is
    [0, grid]^2 and every tile a unit square), so clipping to columns then rows is 2 * grid
    vectorised clip_by_rect calls with the same rectangle for every scene. The fraction of a
    tile in grid coordinates is its fraction in degrees (within ~1e-5 of the equal-area one:
    the scale varies by that little across a 0.0024-degree tile).
    """
    if gr.parts is None or len(gr.parts) == 0:
        e = np.zeros(0, dtype="int64")
        return e, e, np.zeros(0)
    sc = gr.scene[gr.part_group]
    w, s = bounds[sc, 0], bounds[sc, 1]
    tw = (bounds[sc, 2] - bounds[sc, 0]) / grid
    th = (bounds[sc, 3] - bounds[sc, 1]) / grid
    _, cidx = shapely.get_coordinates(gr.parts, return_index=True)
    cw, cs, ctw, cth = w[cidx], s[cidx], tw[cidx], th[cidx]

    def to_grid(xy):
        return np.column_stack([(xy[:, 0] - cw) / ctw, (xy[:, 1] - cs) / cth])

    uv = shapely.transform(gr.parts, to_grid)
    b = shapely.bounds(uv)
    eps = 1e-9
    c0 = np.clip(np.floor(b[:, 0] + eps), 0, grid - 1).astype("int64")
    c1 = np.clip(np.ceil(b[:, 2] - eps) - 1, 0, grid - 1).astype("int64")
    r0 = np.clip(np.floor(b[:, 1] + eps), 0, grid - 1).astype("int64")   # rows from the south
    r1 = np.clip(np.ceil(b[:, 3] - eps) - 1, 0, grid - 1).astype("int64")
    c1 = np.maximum(c0, c1)
    r1 = np.maximum(r0, r1)
    # stage 1: columns
    one = c0 == c1
    sp, scol, strips = [np.flatnonzero(one)], [c0[one]], [uv[one]]
    for c in range(grid):
        sel = np.flatnonzero(~one & (c0 <= c) & (c1 >= c))
        if len(sel):
            sp.append(sel)
            scol.append(np.full(len(sel), c))
            strips.append(shapely.clip_by_rect(uv[sel], c, -1.0, c + 1, grid + 1.0))
    sp, scol, strips = np.concatenate(sp), np.concatenate(scol), np.concatenate(strips)
    # stage 2: rows (recomputing the row span of each strip)
    sb = shapely.bounds(strips)
    keep = ~np.isnan(sb[:, 0])
    sp, scol, strips, sb = sp[keep], scol[keep], strips[keep], sb[keep]
    q0 = np.clip(np.floor(sb[:, 1] + eps), 0, grid - 1).astype("int64")
    q1 = np.maximum(q0, np.clip(np.ceil(sb[:, 3] - eps) - 1, 0, grid - 1).astype("int64"))
    one = q0 == q1
    tp, trow, tarea = [sp[one]], [q0[one]], [shapely.area(strips[one])]
    tcol = [scol[one]]
    for r in range(grid):
        sel = np.flatnonzero(~one & (q0 <= r) & (q1 >= r))
        if len(sel):
            tp.append(sp[sel])
            tcol.append(scol[sel])
            trow.append(np.full(len(sel), r))
            tarea.append(shapely.area(shapely.clip_by_rect(strips[sel], -1.0, r, grid + 1.0, r + 1)))
    tp, tcol, trow, tarea = (np.concatenate(x) for x in (tp, tcol, trow, tarea))
    g = gr.part_group[tp]
    tile = (grid - 1 - trow) * grid + tcol  # row 0 = north
    # parts of a group are disjoint: add them up per (group, tile)
    k = g * (grid * grid) + tile
    uk, inv = np.unique(k, return_inverse=True)
    frac = np.bincount(inv, weights=tarea, minlength=len(uk))
    return uk // (grid * grid), uk % (grid * grid), frac


def _list_col(values: np.ndarray, counts: np.ndarray, n: int) -> list:
    if n == 0:
        return []
    return np.split(values, np.cumsum(counts)[:-1])


def _empty_candidates() -> gpd.GeoDataFrame:
    tbl = CANDIDATE_SCHEMA.empty_table().to_pandas()
    for c, dt in _LIST_DTYPES.items():
        tbl[c] = pd.Series([], dtype=object)
    return gpd.GeoDataFrame(tbl, geometry=gpd.GeoSeries([], crs="EPSG:4326"), crs="EPSG:4326")


def _stats_chunk(sc: gpd.GeoDataFrame, idx: _FeatureIndex, profile, state: str) -> gpd.GeoDataFrame:
    g = profile.geometry
    nc = profile.n_concepts
    grid = g.grid
    ntiles = grid * grid
    thr = g.min_concept_area_m2
    n = len(sc)
    lon = sc["lon"].to_numpy(dtype="float64")
    lat = sc["lat"].to_numpy(dtype="float64")
    bounds = geo.footprint_bounds(lon, lat, g.footprint_deg)
    fp_area = geo.box_area_m2(bounds)
    gr = _concept_groups(bounds, idx, nc, exact=True, with_parts=True)
    # scene level
    absolute = np.zeros((n, nc))
    absolute[gr.scene, gr.concept] = gr.area / fp_area[gr.scene]
    present = np.zeros((n, nc), dtype=bool)
    present[gr.scene, gr.concept] = gr.area >= thr
    psum = np.where(present, absolute, 0).sum(1)
    rel = np.where(present, absolute / np.where(psum > 0, psum, 1)[:, None], 0.0)
    # tile level
    gi, tidx, tfrac = _tile_fracs(gr, bounds, grid)
    tile_m2 = geo.box_area_m2(geo.tile_bounds(bounds, grid))  # [n, grid*grid]
    tarea = tfrac * tile_m2[gr.scene[gi], tidx]
    keep = tfrac > TILE_FRAC_MIN
    ts, tt, tc, tf, ta = gr.scene[gi][keep], tidx[keep], gr.concept[gi][keep], tfrac[keep], tarea[keep]
    o = np.lexsort((tc, tt, ts))
    ts, tt, tc, tf, ta = ts[o], tt[o], tc[o], tf[o], ta[o]
    tcount = np.bincount(ts, minlength=n)
    dominant = np.full((n, ntiles), -1, dtype="int16")
    elig = ta >= thr
    es, et, ec, ea = ts[elig], tt[elig], tc[elig], ta[elig]
    o = np.lexsort((ec, -ea, et, es))  # per (scene, tile): largest area first, then lower id
    es, et, ec = es[o], et[o], ec[o]
    first = np.ones(len(es), dtype=bool)
    first[1:] = (es[1:] != es[:-1]) | (et[1:] != et[:-1])
    dominant[es[first], et[first]] = ec[first]
    hx, hy = geo.pixel_size_m(lat, g.footprint_deg, grid * g.tile_px)
    lx, ly = geo.pixel_size_m(lat, g.footprint_deg, g.lr_px)
    pres_lists = [np.flatnonzero(r).astype("int16") for r in present]
    out = gpd.GeoDataFrame({
        "scene_id": scene_ids(sc["anchor_osm_type"], sc["anchor_osm_id"]),
        "state": np.full(n, state, dtype=object),
        "lon": lon, "lat": lat,
        "west": bounds[:, 0], "south": bounds[:, 1], "east": bounds[:, 2], "north": bounds[:, 3],
        "anchor_osm_type": sc["anchor_osm_type"].to_numpy(dtype=object),
        "anchor_osm_id": sc["anchor_osm_id"].to_numpy(dtype="int64"),
        "anchor_concept": sc["anchor_concept"].to_numpy(dtype="int16"),
        "concepts": pd.Series(pres_lists, dtype=object),
        "scene_frac": pd.Series(list(absolute.astype("float32")), dtype=object),
        "rel_frac": pd.Series(list(rel.astype("float32")), dtype=object),
        "tile_idx": pd.Series(_list_col(tt.astype("int16"), tcount, n), dtype=object),
        "tile_concept": pd.Series(_list_col(tc.astype("int16"), tcount, n), dtype=object),
        "tile_frac": pd.Series(_list_col(tf.astype("float32"), tcount, n), dtype=object),
        "tile_dominant": pd.Series(list(dominant), dtype=object),
        "hr_px_m_x": hx.astype("float32"), "hr_px_m_y": hy.astype("float32"),
        "lr_px_m_x": lx.astype("float32"), "lr_px_m_y": ly.astype("float32"),
    }, geometry=geo.boxes(bounds), crs="EPSG:4326")
    return out


def scene_stats(scenes: gpd.GeoDataFrame, features: gpd.GeoDataFrame, profile, state: str, *,
                min_concepts_filter: bool = True, _index: "_FeatureIndex | None" = None) -> gpd.GeoDataFrame:
    """Scene candidates (the output schema, sorted by scene_id) for anchors `scenes` (rows of
    :func:`anchor_points`/:func:`thin`), measured against `features` (at least those that meet
    the footprints). Scenes with fewer than min_concepts present concepts are left out unless
    `min_concepts_filter` is False. Memory is bounded by working in chunks of scenes."""
    _check_profile_geometry(profile)
    for c in ("lon", "lat", "anchor_osm_type", "anchor_osm_id", "anchor_concept"):
        if c not in scenes.columns:
            raise AnchorsError(f"scenes lack column {c} (expected rows of anchor_points/thin)")
    _check_state(state)
    idx = _index if _index is not None else _FeatureIndex.build(features, profile.n_concepts)
    parts = []
    for a in range(0, len(scenes), STATS_CHUNK):
        parts.append(_stats_chunk(scenes.iloc[a:a + STATS_CHUNK].reset_index(drop=True), idx, profile, state))
    if not parts:
        return _empty_candidates()
    out = pd.concat(parts, ignore_index=True)
    out = gpd.GeoDataFrame(out, geometry="geometry", crs="EPSG:4326")
    if min_concepts_filter:
        n_present = out["concepts"].map(len).to_numpy()
        out = out[n_present >= profile.geometry.min_concepts]
    return out.sort_values("scene_id", kind="mergesort").reset_index(drop=True)


# -- partitions -----------------------------------------------------------------------------
def partitions(scenes: gpd.GeoDataFrame, n: int | None = None, *, cell_deg: float | None = None
               ) -> list[gpd.GeoDataFrame]:
    """Split scenes into spatially compact subsets: `n` near-equal runs along a Hilbert curve,
    or one subset per `cell_deg` grid cell (cells sorted south-west first). Deterministic:
    independent of row order. Empty subsets are not returned."""
    if (n is None) == (cell_deg is None):
        raise AnchorsError("partitions: give exactly one of n or cell_deg")
    if len(scenes) == 0:
        return []
    lon = scenes["lon"].to_numpy(dtype="float64")
    lat = scenes["lat"].to_numpy(dtype="float64")
    tie = scene_ids(scenes["anchor_osm_type"], scenes["anchor_osm_id"]).astype(str)
    if n is not None:
        if n < 1:
            raise AnchorsError(f"partitions: n must be >= 1, got {n}")
        pts = gpd.GeoSeries(gpd.points_from_xy(lon, lat))
        b = (lon.min(), lat.min(), lon.max(), lat.max())
        h = pts.hilbert_distance(total_bounds=b, level=16).to_numpy()
        order = np.lexsort((tie, h))
        return [scenes.iloc[o].reset_index(drop=True) for o in np.array_split(order, min(n, len(order)))]
    if cell_deg <= 0:
        raise AnchorsError(f"partitions: cell_deg must be > 0, got {cell_deg}")
    cxy = np.floor(lon / cell_deg).astype("int64"), np.floor(lat / cell_deg).astype("int64")
    order = np.lexsort((tie, cxy[0], cxy[1]))
    key = np.stack([cxy[1][order], cxy[0][order]], 1)
    cut = np.flatnonzero((np.diff(key, axis=0) != 0).any(1)) + 1
    return [scenes.iloc[o].reset_index(drop=True) for o in np.split(order, cut)]


def features_for(scenes: gpd.GeoDataFrame, features: gpd.GeoDataFrame, profile) -> gpd.GeoDataFrame:
    """The features that meet the scenes' footprints (what a partition task needs)."""
    _check_features(features)
    b = geo.footprint_bounds(scenes["lon"].to_numpy(dtype="float64"), scenes["lat"].to_numpy(dtype="float64"),
                             profile.geometry.footprint_deg)
    tree = shapely.STRtree(np.asarray(features.geometry.values, dtype=object))
    rows = np.unique(tree.query(geo.boxes(b), predicate="intersects")[1])
    return features.iloc[rows]


# -- the whole stage --------------------------------------------------------------------------
def inside_region(anchors: gpd.GeoDataFrame, profile, state: str) -> np.ndarray:
    """Mask of anchors whose whole footprint lies inside the region's bounding box.

    A footprint that leaves the box certainly leaves the state (a state's box holds all of it),
    so its scene would straddle a border; dropping such anchors before thinning lets a valid
    neighbour take the place. For a real state this trims a thin band along the box edges only.
    """
    w, s, e, n = profile.regions[state].bbox
    b = geo.footprint_bounds(anchors["lon"].to_numpy(dtype="float64"), anchors["lat"].to_numpy(dtype="float64"),
                             profile.geometry.footprint_deg)
    return (b[:, 0] >= w) & (b[:, 1] >= s) & (b[:, 2] <= e) & (b[:, 3] <= n)


def select_anchors(features: gpd.GeoDataFrame, profile, state: str, *, _index: "_FeatureIndex | None" = None
                   ) -> tuple[gpd.GeoDataFrame, dict]:
    """Anchor points of one region, those whose footprint leaves the region's box removed, then
    thinned (with the min-concepts rule). Returns (kept anchors, counts); counts add up:
    anchors = outside_region + kept + thinned_overlap + dropped_min_concepts."""
    pts = anchor_points(features, profile)
    if state in profile.regions:
        inside = inside_region(pts, profile, state)
    else:
        inside = np.ones(len(pts), bool)
    n_all = len(pts)
    pts = pts[inside].reset_index(drop=True)
    status, counts = thin_status(pts, profile, features if _index is None else None, _index=_index)
    counts = {**counts, "anchors": int(n_all), "outside_region": int(n_all - len(pts))}
    return pts[status == 1].reset_index(drop=True), counts


def build_candidates(features: gpd.GeoDataFrame, profile, state: str, *, n_partitions: int = 1
                     ) -> tuple[gpd.GeoDataFrame, dict]:
    """The anchors stage in-process: anchors -> thinning (with the min-concepts rule) -> scene
    statistics per spatial partition. Returns (candidates sorted by scene_id, counts):
    features, anchors (OSM objects), outside_region, thinned_overlap, dropped_min_concepts, kept,
    validated (scenes whose concepts were measured while thinning), partitions. anchors =
    outside_region + kept + thinned_overlap + dropped_min_concepts; an anchor overlapping a kept
    scene counts as thinned whatever its own validity."""
    if n_partitions < 1:
        raise AnchorsError(f"n_partitions must be >= 1, got {n_partitions}")
    _check_state(state)
    _check_features(features)
    idx = _FeatureIndex.build(features, profile.n_concepts)
    kept, counts = select_anchors(features, profile, state, _index=idx)
    parts = partitions(kept, n_partitions) if len(kept) else []
    outs = [scene_stats(p, None, profile, state, _index=idx) for p in parts]
    cand = (gpd.GeoDataFrame(pd.concat(outs, ignore_index=True), geometry="geometry", crs="EPSG:4326")
            if outs else _empty_candidates())
    cand = cand.sort_values("scene_id", kind="mergesort").reset_index(drop=True)
    stats = {"features": int(len(features)), **counts, "partitions": len(parts),
             "scenes": int(len(cand)), "late_dropped": int(counts["kept"] - len(cand))}
    return cand, stats


# -- I/O --------------------------------------------------------------------------------------
def filter_by_concepts(candidates: gpd.GeoDataFrame, ids) -> gpd.GeoDataFrame:
    """The candidates whose scene holds at least one of the concept `ids` (by its ``concepts``
    column: the present concepts, as computed by :func:`scene_stats`), in their input order with
    their index. ``ids`` None keeps every candidate (no subset). A subset of the candidates of the
    full index, never a re-thinning: each kept scene is exactly the full run's scene."""
    if ids is None:
        return candidates
    want = np.asarray(sorted({int(i) for i in ids}), dtype=np.int64)
    if "concepts" not in candidates.columns:
        raise AnchorsError("candidates lack the column concepts")
    keep = np.fromiter((bool(np.isin(np.asarray(c, dtype=np.int64), want).any()) for c in candidates["concepts"]),
                       dtype=bool, count=len(candidates))
    return candidates[keep]


def write_candidates(gdf: gpd.GeoDataFrame, path: str | Path) -> None:
    """Write candidates as GeoParquet (EPSG:4326, footprint geometry) with the fixed schema, atomically."""
    missing = [f.name for f in CANDIDATE_SCHEMA if f.name not in gdf.columns]
    if missing:
        raise AnchorsError(f"candidates lack column(s) {', '.join(missing)}")
    cols = [f.name for f in CANDIDATE_SCHEMA] + ["geometry"]
    g = gdf[cols]
    if g.crs is None or g.crs.to_epsg() != 4326:
        raise AnchorsError("candidates must be in EPSG:4326")
    with atomic_path(path, suffix=".parquet") as tmp:
        g.to_parquet(tmp, index=False)
        t = pq.read_table(tmp)
        target = pa.schema(list(CANDIDATE_SCHEMA) + [t.schema.field("geometry")], metadata=t.schema.metadata)
        pq.write_table(t.cast(target), tmp)


def read_candidates(path: str | Path) -> gpd.GeoDataFrame:
    """Read candidates written by :func:`write_candidates` (list columns as numpy arrays)."""
    p = Path(path)
    if not p.exists():
        raise AnchorsError(f"candidates {p}: no such file")
    gdf = gpd.read_parquet(p)
    for c, dt in _LIST_DTYPES.items():
        gdf[c] = gdf[c].map(lambda v, dt=dt: np.asarray(v, dtype=dt))
    return gdf
