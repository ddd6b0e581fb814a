"""The osm stage: one OSM PBF -> concept features (GeoParquet, EPSG:4326).

`extract(pbf, profile)` reads the file with pyosmium (libosmium) and maps every object to the
profile's concepts with the compiled rules of gl10m.concepts (`TriggerIndex` evaluates only the
rules an object's tags can trigger; tests check it agrees with `ConceptMatcher` everywhere):

* area  = closed ways (ring of >= 4 node refs, first == last) and multipolygon/boundary
  relations, for concepts whose `kinds` contain "area". Relations are assembled by osmium's
  multipolygon assembler; closed ways are built here from their node locations so that an
  invalid ring (a figure eight) can be repaired with `shapely.make_valid` (polygonal parts kept).
* line  = open ways, and closed ways for the concepts of the way that take no areas (a closed
  highway loop is a line, not a polygon). Buffered by `buffer_m.line` (half-width, metres).
  A concept with `line_as: ends` (tunnel_opening) takes the way's two end nodes instead: they
  become rows of the end *nodes* (osm_type "node", kind "point"), buffered by `buffer_m.point`.
* point = nodes, buffered by `buffer_m.point` (radius, metres).

Buffers are applied in the UTM zone of each feature (vectorised per zone with shapely 2 and
pyproj); `area_m2` is measured in the WGS 84 equal-area CRS EPSG:6933. A line or point whose
concepts have different buffers gives one row per distinct buffer, so each row's geometry is
right for all of its concepts; rows for the same (object, kind, buffer) are merged.

Reading: pass 1 reads relations only (area candidates for osmium's assembler); pass 2 reads the
whole file once, storing node locations in the chosen index, assembling the candidate relations
and handing tagged objects to Python. A C++ pre-filter keeps objects out of Python: a KeyFilter
on the rules' trigger keys, or, when a rule reads a key prefix (marina's `mooring*`), an
EmptyTagFilter (untagged objects only). stats["read"] counts the objects Python saw.

Node locations: `sparse_file_array` (the profile default) keeps them in a memory-mapped file
under `tmpdir` (16 bytes per node, ~3 GB for California, paged by the OS, not held in RAM);
`flex_mem` keeps them in RAM and is faster for small extracts.

Output columns, sorted by (osm_type, osm_id, kind) then buffer:
osm_type str, osm_id int64, kind str, concepts list<int16>, geometry (Polygon/MultiPolygon),
area_m2 float64.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import shapely
from pyproj import Transformer

from gl10m.concepts import compile_rule
from gl10m.errors import UserError
from gl10m.io import atomic_path

COLUMNS = ["osm_type", "osm_id", "kind", "concepts", "geometry", "area_m2"]
EQUAL_AREA_EPSG = 6933
AREA_RELATION_TYPES = frozenset({"multipolygon", "boundary"})
QUAD_SEGS = 8  # circle = 32 segments
_FILE_INDEXES = {"sparse_file_array", "dense_file_array"}
CONCEPTS_TYPE = pa.list_(pa.int16())


class OsmError(UserError, ValueError):
    """A PBF or option the osm stage cannot use (one line)."""


@dataclass
class OsmResult:
    features: "object"  # geopandas.GeoDataFrame
    stats: dict = field(default_factory=dict)


# -- rule analysis ---------------------------------------------------------------------------
# A trigger is (key, values): the tag `key` with one of `values` (None: any value). A key ending
# in "*" is a prefix. A rule's triggers are a set of which at least one holds whenever the rule
# holds, so an object need only be tested against the rules its tags trigger.
Trigger = tuple[str, frozenset | None]


def _triggers(rule) -> set[Trigger] | None:
    """Necessary triggers of `rule` (one of them holds whenever it holds); None when the rule
    can hold without any (a rule that is only a negation)."""
    if not isinstance(rule, dict):
        return None
    best: set[Trigger] | None = None
    for key, spec in rule.items():  # a conjunction: any one conjunct's triggers are necessary
        if key == "any":
            subs = [_triggers(r) for r in spec]
            cand = None if any(x is None for x in subs) else set().union(*subs)
        elif key == "all":
            cand = None
            for r in spec:
                x = _triggers(r)
                if x is not None and (cand is None or _weight(x) < _weight(cand)):
                    cand = x
        elif key == "not":
            cand = None
        elif isinstance(spec, (str, int, float)) and spec != "*" and not key.endswith("*"):
            cand = {(key, frozenset([str(spec)]))}
        elif isinstance(spec, list):
            cand = {(key, frozenset(str(v) for v in spec))}
        else:  # "*", {token: ...} or a prefix key
            cand = {(key, None)}
        if cand is not None and (best is None or _weight(cand) < _weight(best)):
            best = cand
    return best


def _weight(trig: set[Trigger]) -> int:
    """Prefer exact values over any-value keys, and few triggers over many."""
    return sum(1 if v is not None else 100 for _, v in trig)


def _trigger_keys(rule) -> set[str] | None:
    t = _triggers(rule)
    if t is None or any(k.endswith("*") for k, _ in t):
        return None
    return {k for k, _ in t}


def prefilter_keys(concepts) -> list[str] | None:
    """The tag keys a C++ KeyFilter may pre-select on (sorted), or None when some rule needs
    every tagged object (then only untagged objects are skipped before Python)."""
    keys: set[str] = set()
    for c in concepts:
        k = _trigger_keys(c.rule)
        if k is None:
            return None
        keys |= k
    return sorted(keys)


class TriggerIndex:
    """Which concepts a tag set may match, from the rules' triggers; `match` then evaluates
    only those rules (ConceptMatcher semantics, in class-index order)."""

    def __init__(self, concepts):
        self.preds = {c.id: compile_rule(c.rule) for c in concepts}
        self.by_key: dict[str, list[tuple[frozenset | None, int]]] = {}
        self.by_prefix: list[tuple[str, int]] = []
        self.always: list[int] = []
        for c in concepts:
            trig = _triggers(c.rule)
            if trig is None:
                self.always.append(c.id)
                continue
            for key, values in sorted(trig, key=lambda t: (t[0], sorted(t[1] or ()))):
                if key.endswith("*"):
                    self.by_prefix.append((key[:-1], c.id))
                else:
                    self.by_key.setdefault(key, []).append((values, c.id))
        self.prefixes = tuple(sorted({p for p, _ in self.by_prefix}))

    def match(self, taglist) -> list[int]:
        """Concept ids (sorted) whose rule holds for an osmium TagList (or (k, v) objects)."""
        by_key, prefixes = self.by_key, self.prefixes
        cand: set[int] | None = None
        tags: dict[str, str] = {}
        for t in taglist:
            k, v = t.k, t.v
            tags[k] = v
            hits = by_key.get(k)
            if hits:
                for values, cid in hits:
                    if values is None or v in values:
                        if cand is None:
                            cand = set()
                        cand.add(cid)
            if prefixes and k.startswith(prefixes):
                for p, cid in self.by_prefix:
                    if k.startswith(p):
                        if cand is None:
                            cand = set()
                        cand.add(cid)
        if cand is None and not self.always:
            return []
        ids = sorted((cand or set()).union(self.always))
        preds = self.preds
        return [cid for cid in ids if preds[cid](tags)]


# -- node index ------------------------------------------------------------------------------
def _index_spec(kind: str, tmpdir: Path) -> tuple[str, Path | None]:
    """(osmium map spec, its file or None) of a node-index kind; the map is not created here, so
    the caller can remove the file even when creating the map fails (a full disk)."""
    import osmium

    name, _, arg = kind.partition(",")
    known = osmium.index.map_types()
    if name not in known:
        raise OsmError(f"node index {kind!r} is not one of {', '.join(sorted(known))}")
    if name in _FILE_INDEXES and not arg:
        arg = str(Path(tmpdir) / f"{name}.nodes")
        kind = f"{name},{arg}"
    return kind, (Path(arg) if name in _FILE_INDEXES else None)


class OsmIOError(OsmError):
    """The machine, not the PBF: the node index or the output could not be written (a full disk,
    a quota, a folder that cannot be created). One line like any OsmError, but transient: the
    pipeline records it as failed and retries it on the next run."""

    transient = True


_STRERRORS = sorted({os.strerror(c) for c in errno.errorcode}, key=len, reverse=True)


def _system_error(msg: str) -> bool:
    """Does an osmium (libosmium) error message end in an OS error text (``Could not resize
    file: No space left on device``, a ``std::system_error``), rather than describe the PBF?"""
    return any(msg.endswith(": " + t) for t in _STRERRORS)


# -- the scan --------------------------------------------------------------------------------
class _Collector:
    """Accumulates matched objects during the scan (geometry as WKB or flat coordinates)."""

    def __init__(self, profile):
        import osmium

        self.concepts = list(profile.concepts)
        self.index = TriggerIndex(self.concepts)
        self.takes_area = {c.id for c in self.concepts if "area" in c.kinds}
        self.takes_line = {c.id for c in self.concepts if "line" in c.kinds}
        self.takes_point = {c.id for c in self.concepts if "point" in c.kinds}
        self.line_buf = {c.id: c.buffer_m.line for c in self.concepts}
        self.point_buf = {c.id: c.buffer_m.point for c in self.concepts}
        self.ends = {c.id for c in self.concepts if c.line_as == "ends"}
        self.wkb = osmium.geom.WKBFactory()
        # areas: (osm_type, id, concepts, geometry source)
        self.area_rows: list[tuple[str, int, tuple[int, ...]]] = []
        self.area_wkb: list[bytes | None] = []
        # buffered: key (osm_type, id, kind, dist) -> [concept set, geometry index]
        self.buffered: dict[tuple[str, int, str, float], set[int]] = {}
        self.buf_geom: dict[tuple[str, int, str, float], int] = {}
        self.line_wkb: list[bytes | None] = []  # geometry pool for lines (index)
        self.points: list[tuple[float, float]] = []  # geometry pool for points (index)
        self.point_pool_of_node: dict[int, int] = {}
        self.rel_candidates: dict[int, tuple[int, ...]] = {}
        self.stats = dict(read=0, matched=0, relations_read=0, area_relations=0, assembled=0,
                          repaired=0, dropped=0, dropped_unassembled=0, dropped_geometry=0,
                          missing_locations=0)

    def _match(self, taglist) -> list[int]:
        return self.index.match(taglist)

    # pass 1: relations. Return True to drop (not an area candidate).
    def relation(self, r) -> bool:
        self.stats["relations_read"] += 1
        self.stats["read"] += 1
        if r.tags.get("type") not in AREA_RELATION_TYPES:
            return True
        cids = tuple(c for c in self._match(r.tags) if c in self.takes_area)
        if not cids:
            return True
        self.stats["matched"] += 1
        self.rel_candidates[r.id] = cids
        return False

    def _add_buffered(self, key, cids, geom_index):
        s = self.buffered.get(key)
        if s is None:
            self.buffered[key] = set(cids)
            self.buf_geom[key] = geom_index
        else:
            s.update(cids)

    def _point_index(self, node_id: int, lon: float, lat: float) -> int:
        i = self.point_pool_of_node.get(node_id)
        if i is None:
            i = len(self.points)
            self.points.append((lon, lat))
            self.point_pool_of_node[node_id] = i
        return i

    def node(self, n) -> None:
        self.stats["read"] += 1
        cids = [c for c in self._match(n.tags) if c in self.takes_point]
        if not cids:
            return
        self.stats["matched"] += 1
        loc = n.location
        if not loc.valid():
            self.stats["dropped"] += 1
            self.stats["dropped_geometry"] += 1
            return
        gi = self._point_index(n.id, loc.lon, loc.lat)
        for d, group in _group_by(cids, self.point_buf):
            self._add_buffered(("node", n.id, "point", d), group, gi)

    def way(self, w) -> None:
        self.stats["read"] += 1
        cids = self._match(w.tags)
        if not cids:
            return
        nodes = w.nodes
        closed = len(nodes) >= 4 and nodes[0].ref == nodes[-1].ref
        area_c = [c for c in cids if c in self.takes_area] if closed else []
        rest = [c for c in cids if c in self.takes_line and c not in area_c]
        if not area_c and not rest:
            return
        self.stats["matched"] += 1
        if area_c:
            self.area_rows.append(("way", w.id, tuple(area_c)))
            self.area_wkb.append(self._way_wkb(w, ring=True))
        line_c = [c for c in rest if c not in self.ends]
        end_c = [c for c in rest if c in self.ends]
        if line_c:
            gi = len(self.line_wkb)
            self.line_wkb.append(self._way_wkb(w, ring=False))
            for d, group in _group_by(line_c, self.line_buf):
                self._add_buffered(("way", w.id, "line", d), group, gi)
        if end_c:
            for nd in {nodes[0].ref: nodes[0], nodes[-1].ref: nodes[-1]}.values():
                loc = nd.location
                if not loc.valid():
                    self.stats["missing_locations"] += 1
                    continue
                gi = self._point_index(nd.ref, loc.lon, loc.lat)
                for d, group in _group_by(end_c, self.point_buf):
                    self._add_buffered(("node", nd.ref, "point", d), group, gi)

    def _way_wkb(self, w, ring: bool) -> bytes | None:
        """Linestring WKB of a way (osmium, C++); nodes without a location are skipped."""
        try:
            return bytes.fromhex(self.wkb.create_linestring(w.nodes))
        except Exception:  # a missing location or < 2 distinct points: go node by node
            pass
        pts = []
        for nd in w.nodes:
            loc = nd.location
            if loc.valid():
                pts.append((loc.lon, loc.lat))
            else:
                self.stats["missing_locations"] += 1
        if ring and len(pts) >= 3 and pts[0] != pts[-1]:
            pts.append(pts[0])
        if len(pts) < 2:
            return None
        return shapely.to_wkb(shapely.linestrings(pts))

    def area(self, a) -> None:
        rid = a.orig_id()
        cids = self.rel_candidates.get(rid)
        if cids is None or a.from_way():
            return
        self.stats["assembled"] += 1
        try:
            wkb = bytes.fromhex(self.wkb.create_multipolygon(a))
        except Exception:  # osmium produced an empty (invalid) area
            wkb = None
        self.area_rows.append(("relation", rid, cids))
        self.area_wkb.append(wkb)


def _group_by(cids, dist_of) -> list[tuple[float, tuple[int, ...]]]:
    """Group concept ids by their buffer distance: [(distance, (ids...)), ...] sorted."""
    groups: dict[float, list[int]] = {}
    for c in cids:
        groups.setdefault(float(dist_of[c]), []).append(c)
    return sorted((d, tuple(sorted(g))) for d, g in groups.items())


def _scan(pbf: Path, col: _Collector, index_kind: str, tmpdir: Path) -> None:
    import osmium

    am = osmium.area.AreaManager()
    class _Relations:  # pass-1 filter: only area candidates reach the assembler
        relation = staticmethod(col.relation)

    with osmium.io.Reader(str(pbf), osmium.osm.RELATION) as rd:
        osmium.apply(rd, _Relations(), am.first_pass_handler())
    col.stats["area_relations"] = len(col.rel_candidates)

    spec, idx_file = _index_spec(index_kind, tmpdir)
    idx = None
    try:
        idx = osmium.index.create_map(spec)
        lh = osmium.NodeLocationsForWays(idx)
        lh.ignore_errors()
        area_ids = osmium.filter.IdFilter([2 * r + 1 for r in col.rel_candidates])
        area_ids.enable_for(osmium.osm.AREA)
        buf = osmium.BufferIterator(area_ids)
        second = am.second_pass_to_buffer(buf)
        keys = prefilter_keys(col.concepts)
        pre = osmium.filter.KeyFilter(*keys) if keys else osmium.filter.EmptyTagFilter()
        only = osmium.filter.EntityFilter(osmium.osm.NODE | osmium.osm.WAY)
        node, way, area = col.node, col.way, col.area
        with osmium.io.Reader(str(pbf)) as rd:
            it = osmium.OsmFileIterator(rd, lh, second, only, pre)
            for o in it:
                t = o.type_str()
                if t == "n":
                    node(o)
                elif t == "w":
                    way(o)
                if buf:
                    for a in buf:
                        area(a)
        if buf:
            for a in buf:
                area(a)
    finally:
        del idx
        if idx_file is not None:
            with contextlib.suppress(FileNotFoundError):
                idx_file.unlink()


# -- geometry ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _transformer(src: int, dst: int) -> Transformer:
    """A cached always_xy Transformer (building one costs ~5 ms; a scene build asks for a few)."""
    return Transformer.from_crs(src, dst, always_xy=True)


def _transform(geoms: np.ndarray, src: int, dst: int) -> np.ndarray:
    tr = _transformer(src, dst)

    def f(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms, f)


def utm_epsg(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """EPSG code of the WGS 84 UTM zone of each (lon, lat)."""
    zone = np.clip(np.floor((np.asarray(lon) + 180.0) / 6.0).astype(int) + 1, 1, 60)
    return np.where(np.asarray(lat) >= 0, 32600, 32700) + zone


def buffer_m(geoms: np.ndarray, dist_m: np.ndarray) -> np.ndarray:
    """Buffer lon/lat geometries by metres, in each geometry's UTM zone (vectorised per zone)."""
    geoms = np.asarray(geoms, dtype=object)
    out = np.empty(len(geoms), dtype=object)
    if len(geoms) == 0:
        return out
    c = shapely.get_coordinates(shapely.centroid(geoms))
    codes = utm_epsg(c[:, 0], c[:, 1])
    for code in np.unique(codes):
        sel = codes == code
        proj = _transform(geoms[sel], 4326, int(code))
        buf = shapely.buffer(proj, np.asarray(dist_m)[sel], quad_segs=QUAD_SEGS)
        out[sel] = _transform(buf, int(code), 4326)
    return out


def area_m2(geoms) -> np.ndarray:
    """Area of lon/lat geometries in square metres (EPSG:6933, equal-area)."""
    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) == 0:
        return np.zeros(0)
    return shapely.area(_transform(geoms, 4326, EQUAL_AREA_EPSG)).astype("float64")


def _polygonal(g):
    """Keep the polygonal parts of a geometry (Polygon/MultiPolygon) or None."""
    if g is None or g.is_empty:
        return None
    t = g.geom_type
    if t in ("Polygon", "MultiPolygon"):
        return g
    parts = [p for p in shapely.get_parts(g) if p.geom_type in ("Polygon", "MultiPolygon")]
    polys = []
    for p in parts:
        polys.extend(shapely.get_parts(p) if p.geom_type == "MultiPolygon" else [p])
    polys = [p for p in polys if not p.is_empty]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


def _area_geoms(col: _Collector) -> tuple[np.ndarray, int, int]:
    """Areas as valid (Multi)Polygons: way rings -> polygons, relation WKB -> multipolygons.
    Returns (geometries, repaired, dropped); a dropped geometry is None."""
    n = len(col.area_rows)
    geoms = np.empty(n, dtype=object)
    is_way = np.array([r[0] == "way" for r in col.area_rows], dtype=bool)
    have = np.array([w is not None for w in col.area_wkb], dtype=bool)
    if have.any():
        geoms[have] = shapely.from_wkb(np.array([w for w in col.area_wkb if w is not None], dtype=object))
    # closed ways: linestring -> ring -> polygon (vectorised)
    sel = np.flatnonzero(is_way & have)
    if len(sel):
        coords, idx = shapely.get_coordinates(geoms[sel], return_index=True)
        counts = np.bincount(idx, minlength=len(sel))
        ok = counts >= 4
        polys = np.empty(len(sel), dtype=object)
        if ok.any():
            keep = ok[idx]
            new_idx = np.cumsum(ok)[idx[keep]] - 1
            rings = shapely.linearrings(coords[keep], indices=new_idx)
            polys[ok] = shapely.polygons(rings)
        geoms[sel] = polys
    repaired = dropped = 0
    valid = np.array([g is not None for g in geoms], dtype=bool)
    if valid.any():
        v = np.flatnonzero(valid)
        bad = v[~shapely.is_valid(geoms[v])]
        for i in bad:  # rare: repair one by one, keeping polygonal parts
            fixed = _polygonal(shapely.make_valid(geoms[i]))
            if fixed is not None and fixed.area > 0:
                geoms[i] = fixed
                repaired += 1
            else:
                geoms[i] = None
    for i in range(n):
        g = geoms[i]
        if g is not None and (g.is_empty or g.area <= 0):
            geoms[i] = None
        if geoms[i] is None:
            dropped += 1
    return geoms, repaired, dropped


def _empty_frame():
    import geopandas as gpd

    return gpd.GeoDataFrame(
        {"osm_type": pd.Series([], dtype=object), "osm_id": pd.Series([], dtype="int64"),
         "kind": pd.Series([], dtype=object), "concepts": pd.Series([], dtype=object),
         "area_m2": pd.Series([], dtype="float64")},
        geometry=gpd.GeoSeries([], crs="EPSG:4326"), crs="EPSG:4326")[COLUMNS]


def _build_frame(col: _Collector):
    import geopandas as gpd

    stats = col.stats
    area_geoms, repaired, dropped = _area_geoms(col)
    stats["repaired"] += repaired
    stats["dropped_geometry"] += dropped
    stats["dropped"] += dropped

    # buffered rows
    keys = sorted(col.buffered)
    line_pool = np.empty(len(col.line_wkb), dtype=object)
    have = [i for i, w in enumerate(col.line_wkb) if w is not None]
    if have:
        line_pool[have] = shapely.from_wkb(np.array([col.line_wkb[i] for i in have], dtype=object))
    pts = np.array(col.points, dtype="float64").reshape(-1, 2)
    point_pool = shapely.points(pts) if len(pts) else np.empty(0, dtype=object)
    src = np.empty(len(keys), dtype=object)
    dist = np.zeros(len(keys))
    for j, k in enumerate(keys):
        gi = col.buf_geom[k]
        src[j] = point_pool[gi] if k[2] == "point" else line_pool[gi]
        dist[j] = k[3]
    ok = np.array([g is not None and not g.is_empty for g in src], dtype=bool)
    nbad = int((~ok).sum())
    stats["dropped_geometry"] += nbad
    stats["dropped"] += nbad
    buf_geoms = np.empty(len(keys), dtype=object)
    if ok.any():
        buf_geoms[ok] = buffer_m(src[ok], dist[ok])

    rows_type, rows_id, rows_kind, rows_c, rows_d, geoms = [], [], [], [], [], []
    for (t, i, cids), g in zip(col.area_rows, area_geoms):
        if g is None:
            continue
        rows_type.append(t); rows_id.append(i); rows_kind.append("area")
        rows_c.append(sorted(cids)); rows_d.append(0.0); geoms.append(g)
    for k, g in zip(keys, buf_geoms):
        if g is None or g.is_empty:
            continue
        rows_type.append(k[0]); rows_id.append(k[1]); rows_kind.append(k[2])
        rows_c.append(sorted(col.buffered[k])); rows_d.append(k[3]); geoms.append(g)
    if not geoms:
        return _empty_frame()
    df = pd.DataFrame({"osm_type": rows_type, "osm_id": np.array(rows_id, dtype="int64"),
                       "kind": rows_kind, "concepts": rows_c, "_d": rows_d})
    geo = np.empty(len(geoms), dtype=object)
    geo[:] = geoms
    df["area_m2"] = area_m2(geo)
    df["geometry"] = geo
    df = df.sort_values(["osm_type", "osm_id", "kind", "_d"], kind="stable").reset_index(drop=True)
    gdf = gpd.GeoDataFrame(df.drop(columns="_d"), geometry="geometry", crs="EPSG:4326")
    return gdf[COLUMNS]


def extract(pbf: str | Path, profile, *, node_index: str | None = None, tmpdir=None) -> OsmResult:
    """Read one PBF and return its concept features (see module doc) and counts.

    node_index: osmium location index (default: profile.osm.node_index); file-based indexes
    (sparse_file_array, dense_file_array) put their file in `tmpdir` (default: a temp dir).
    """
    pbf = Path(pbf)
    if not pbf.is_file():
        raise OsmError(f"{pbf}: no such PBF file")
    if not os.access(pbf, os.R_OK):
        raise OsmError(f"{pbf}: not readable")
    kind = node_index or profile.osm.node_index
    col = _Collector(profile)
    with contextlib.ExitStack() as stack:
        if tmpdir is None:
            tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gl10m-osm-"))
        Path(tmpdir).mkdir(parents=True, exist_ok=True)
        try:
            _scan(pbf, col, kind, Path(tmpdir))
        except OsmError:
            raise
        except RuntimeError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if _system_error(msg):  # the node index file, not the PBF
                raise OsmIOError(f"{pbf}: osm stage could not write its node index in {tmpdir} ({msg})") from None
            raise OsmError(f"{pbf}: cannot read as OSM PBF ({msg})") from None
        except OSError as e:
            raise OsmIOError(f"{pbf}: osm stage I/O error in {tmpdir} ({e.strerror or e})") from None
    unassembled = len(col.rel_candidates) - col.stats["assembled"]
    col.stats["dropped_unassembled"] = unassembled
    col.stats["dropped"] += unassembled
    gdf = _build_frame(col)
    st = col.stats
    st["rows"] = int(len(gdf))
    kinds = gdf["kind"].value_counts()
    for k, name in (("area", "areas"), ("line", "lines"), ("point", "points")):
        st[name] = int(kinds.get(k, 0))
    return OsmResult(features=gdf, stats={k: int(v) for k, v in sorted(st.items())})


# -- files -----------------------------------------------------------------------------------
def write_features(gdf, path: str | Path) -> Path:
    """Write features as GeoParquet (EPSG:4326; concepts as list<int16>), atomically."""
    missing = [c for c in COLUMNS if c not in gdf.columns]
    if missing:
        raise OsmError(f"features lack column(s) {', '.join(missing)}")
    out = gdf[COLUMNS].copy()
    # numpy int16 arrays make pyarrow write list<int16> (and geopandas keeps the geo metadata)
    cc = np.empty(len(out), dtype=object)
    cc[:] = [np.asarray(c, dtype="int16") for c in out["concepts"]]
    out["concepts"] = cc
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            out.to_parquet(tmp, index=False, compression="zstd", schema_version="1.0.0")
    except OSError as e:  # full disk, quota, a parent that is a file: nothing is left behind
        raise OsmIOError(f"{path}: cannot write the features ({e.strerror or str(e).splitlines()[0]})") from None
    return path


def read_features(path: str | Path):
    """Read features written by `write_features` (concepts as lists of int)."""
    import geopandas as gpd

    path = Path(path)
    if not path.is_file():
        raise OsmError(f"{path}: no such features file")
    try:
        gdf = gpd.read_parquet(path)
    except Exception as e:  # not parquet, or no geo metadata
        raise OsmError(f"{path}: not a GeoParquet features file ({str(e).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in gdf.columns]
    if missing:
        raise OsmError(f"{path}: missing column(s) {', '.join(missing)}")
    gdf["concepts"] = [[int(x) for x in c] for c in gdf["concepts"]]
    gdf["osm_id"] = gdf["osm_id"].astype("int64")
    return gdf[COLUMNS]


def yield_report(gdf, profile) -> pd.DataFrame:
    """Per concept: rows standing for it (count), their total area (m2), and zero-yield flag."""
    n = profile.n_concepts
    count = np.zeros(n, dtype="int64")
    area = np.zeros(n, dtype="float64")
    if len(gdf):
        lens = np.fromiter((len(c) for c in gdf["concepts"]), dtype="int64", count=len(gdf))
        ids = np.fromiter((int(x) for c in gdf["concepts"] for x in c), dtype="int64", count=int(lens.sum()))
        areas = np.repeat(gdf["area_m2"].to_numpy(dtype="float64"), lens)
        bad = (ids < 0) | (ids >= n)
        if bad.any():
            raise OsmError(f"features name concept id {int(ids[bad][0])}, the profile has 0..{n - 1}")
        count = np.bincount(ids, minlength=n)
        area = np.bincount(ids, weights=areas, minlength=n)
    return pd.DataFrame({"id": [c.id for c in profile.concepts], "name": [c.name for c in profile.concepts],
                         "count": count.astype("int64"), "area_m2": area.astype("float64"),
                         "zero": count == 0})
