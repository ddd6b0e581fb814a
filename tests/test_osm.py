"""The osm stage on real PBFs written with osmium.SimpleWriter (tests/fixtures/pbf.py)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from gl10m import osm
from gl10m import profile as profile_mod
from tests.fixtures.pbf import PbfBuilder, bowtie, line, offset, square
from tests.test_concepts import CASES

LON, LAT = -120.0, 37.0


@pytest.fixture(scope="module")
def prof():
    return profile_mod.load()


def cid(prof, name):
    return next(c.id for c in prof.concepts if c.name == name)


def at(i, j=0):
    """Well-separated spots (about 900 m apart)."""
    return LON + 0.01 * i, LAT + 0.01 * j


def row(gdf, osm_type, osm_id, kind=None):
    sel = (gdf.osm_type == osm_type) & (gdf.osm_id == osm_id)
    if kind:
        sel &= gdf.kind == kind
    return gdf[sel]


# -- the scenario world ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, prof):
    b = PbfBuilder()
    ids = {}
    # noise: untagged and irrelevant objects
    for k in range(30):
        b.node(*offset(*at(0, 9), k, k))
        b.area(square(*offset(*at(1, 9), 30 * k, 0), 10), {"building": "yes"})
    b.way(line(*at(2, 9), 300, 4), {"highway": "residential"})
    for k in range(5):
        b.node(*offset(*at(3, 9), 10 * k, 0), {"place": "locality", "name": f"spot {k}"})
    # points
    ids["tower"] = b.node(*at(0, 0), {"man_made": "tower"})
    ids["tower_north"] = b.node(LON, 47.0, {"man_made": "tower"})
    ids["tower_south"] = b.node(LON, 25.0, {"man_made": "tower"})
    ids["same_buf"] = b.node(*at(1, 0), {"amenity": "police", "building": "office"})  # 20 m both
    ids["two_buf"] = b.node(*at(2, 0), {"amenity": "school", "man_made": "tower"})  # 50 m and 8 m
    ids["area_only_node"] = b.node(*at(3, 0), {"leisure": "golf_course"})
    # lines
    ids["rail"] = b.way(line(*at(0, 1), 1000, 5), {"railway": "rail"})
    ids["rail_viaduct"] = b.way(line(*at(1, 1), 500), {"railway": "rail", "bridge": "viaduct"})
    ids["loop"] = b.area(square(*at(2, 1), 200), {"highway": "primary"})
    ids["open_golf"] = b.way(line(*at(3, 1), 300), {"leisure": "golf_course"})
    ids["rail_missing_node"] = b.way([*line(*at(4, 1), 400, 3)[:2], 999_999, line(*at(4, 1), 400, 3)[2]],
                                     {"railway": "rail"})
    # tunnel: its end nodes become points; the rail tunnel also stays a railroad line
    tpts = line(*at(5, 1), 2000, 6, bearing="north")
    ids["tunnel"] = b.way(tpts, {"tunnel": "yes", "highway": "motorway"})
    ids["tunnel_ends"] = (b.ways[ids["tunnel"]][0][0], b.ways[ids["tunnel"]][0][-1])
    ids["rail_tunnel"] = b.way(line(*at(6, 1), 1000, 3), {"tunnel": "yes", "railway": "rail"})
    ids["rail_tunnel_ends"] = (b.ways[ids["rail_tunnel"]][0][0], b.ways[ids["rail_tunnel"]][0][-1])
    # areas
    ids["park"] = b.area(square(*at(0, 2), 300), {"leisure": "park"})
    ids["roundabout"] = b.area(square(*at(1, 2), 40), {"highway": "primary", "junction": "roundabout"})
    ids["barn_bowtie"] = b.area(bowtie(*at(2, 2), 40), {"building": "barn"})
    ids["wood_mp"] = b.multipolygon([square(*at(3, 2), 400)], [square(*at(3, 2), 100)], {"natural": "wood"})
    ids["reserve_boundary"] = b.multipolygon([square(*at(4, 2), 500)], tags={"boundary": "protected_area"},
                                             rel_type="boundary")
    ids["unclosed_mp"] = b.multipolygon([square(*at(5, 2), 300)], tags={"landuse": "farmland"}, closed=False)
    ids["route"] = b.relation([("w", ids["rail"], "")], {"type": "route", "route": "train", "railway": "rail"})
    ids["missing_member"] = b.relation([("w", 888_888, "outer")], {"type": "multipolygon", "landuse": "meadow"})
    path = b.write(tmp_path_factory.mktemp("world") / "world.osm.pbf")
    res = osm.extract(path, prof, node_index="flex_mem")
    return path, ids, res


def test_schema_and_order(world):
    _, _, res = world
    g = res.features
    assert list(g.columns) == osm.COLUMNS
    assert g.crs.to_epsg() == 4326
    assert str(g.osm_id.dtype) == "int64" and str(g.area_m2.dtype) == "float64"
    assert set(g.kind) == {"area", "line", "point"}
    assert set(g.osm_type) == {"node", "way", "relation"}
    keys = list(zip(g.osm_type, g.osm_id, g.kind))
    assert keys == sorted(keys)
    assert set(g.geometry.geom_type) <= {"Polygon", "MultiPolygon"}
    assert shapely.is_valid(g.geometry.values).all()
    assert (g.area_m2 > 0).all()
    for c in g.concepts:
        assert c == sorted(set(c)) and all(isinstance(x, int) for x in c)


def test_points_are_buffered_in_metres(world, prof):
    _, ids, res = world
    g = res.features
    r = 8.0  # tower radius in the profile
    poly = math.pi * r * r * (16 * 2 * math.sin(math.pi / 32) * math.cos(math.pi / 32)) / math.pi  # 32-gon
    for key in ("tower", "tower_north", "tower_south"):
        t = row(g, "node", ids[key], "point")
        assert len(t) == 1 and t.concepts.iloc[0] == [cid(prof, "tower")]
        assert t.area_m2.iloc[0] == pytest.approx(poly, rel=0.01)
    # the same metric disc is wider in degrees of longitude at 47N than at 25N
    wn = np.ptp(shapely.get_coordinates(row(g, "node", ids["tower_north"]).geometry.iloc[0])[:, 0])
    ws = np.ptp(shapely.get_coordinates(row(g, "node", ids["tower_south"]).geometry.iloc[0])[:, 0])
    assert wn / ws == pytest.approx(math.cos(math.radians(25)) / math.cos(math.radians(47)), rel=0.01)


def test_one_row_per_distinct_buffer(world, prof):
    _, ids, res = world
    g = res.features
    same = row(g, "node", ids["same_buf"])
    assert len(same) == 1 and same.concepts.iloc[0] == sorted([cid(prof, "police_station"), cid(prof, "office")])
    two = row(g, "node", ids["two_buf"])
    assert sorted(map(tuple, two.concepts)) == sorted([(cid(prof, "school"),), (cid(prof, "tower"),)])
    by = {tuple(c): a for c, a in zip(two.concepts, two.area_m2)}
    assert by[(cid(prof, "school"),)] / by[(cid(prof, "tower"),)] == pytest.approx((50 / 8) ** 2, rel=0.01)
    via = row(g, "way", ids["rail_viaduct"], "line")
    assert sorted(map(tuple, via.concepts)) == [(cid(prof, "railroad"),), (cid(prof, "viaduct"),)]


def test_lines_are_buffered(world, prof):
    _, ids, res = world
    g = res.features
    rail = row(g, "way", ids["rail"])
    assert list(rail.kind) == ["line"] and rail.concepts.iloc[0] == [cid(prof, "railroad")]
    assert rail.area_m2.iloc[0] == pytest.approx(1000 * 2 * 4 + math.pi * 16, rel=0.01)
    # a closed highway loop is a line (highway takes no areas): a band, not a filled square
    loop = row(g, "way", ids["loop"])
    assert list(loop.kind) == ["line"] and loop.concepts.iloc[0] == [cid(prof, "highway")]
    assert loop.area_m2.iloc[0] == pytest.approx(4 * 200 * 2 * 10, rel=0.03)
    assert loop.geometry.iloc[0].interiors  # the ring stays a ring
    # a way with a node missing from the extract keeps the nodes it has
    miss = row(g, "way", ids["rail_missing_node"])
    assert len(miss) == 1 and miss.area_m2.iloc[0] == pytest.approx(400 * 8 + math.pi * 16, rel=0.02)
    assert res.stats["missing_locations"] >= 1


def test_area_kinds(world, prof):
    _, ids, res = world
    g = res.features
    park = row(g, "way", ids["park"])
    assert list(park.kind) == ["area"] and park.area_m2.iloc[0] == pytest.approx(300 * 300, rel=0.01)
    # a closed roundabout takes area: it is an area, not also a line; highway excludes roundabouts
    rb = row(g, "way", ids["roundabout"])
    assert list(rb.kind) == ["area"] and rb.concepts.iloc[0] == [cid(prof, "roundabout")]
    # area-only concepts on open ways or nodes give nothing
    assert row(g, "way", ids["open_golf"]).empty
    assert row(g, "node", ids["area_only_node"]).empty


def test_multipolygons_assembled_by_osmium(world, prof):
    _, ids, res = world
    g = res.features
    wood = row(g, "relation", ids["wood_mp"])
    assert list(wood.kind) == ["area"] and wood.concepts.iloc[0] == [cid(prof, "forest")]
    assert wood.area_m2.iloc[0] == pytest.approx(400 ** 2 - 100 ** 2, rel=0.01)
    poly = shapely.get_parts(wood.geometry.iloc[0])[0]
    assert len(poly.interiors) == 1
    res_b = row(g, "relation", ids["reserve_boundary"])
    assert res_b.concepts.iloc[0] == [cid(prof, "nature_reserve")]
    assert res_b.area_m2.iloc[0] == pytest.approx(500 ** 2, rel=0.01)
    # a route relation is not an area; its rail member is already a line
    assert row(g, "relation", ids["route"]).empty


def test_broken_geometry_repaired_or_dropped(world):
    _, ids, res = world
    g = res.features
    barn = row(g, "way", ids["barn_bowtie"])
    assert len(barn) == 1 and barn.area_m2.iloc[0] == pytest.approx(40 * 40 / 2, rel=0.02)
    assert res.stats["repaired"] == 1
    assert row(g, "relation", ids["unclosed_mp"]).empty
    assert row(g, "relation", ids["missing_member"]).empty
    assert res.stats["dropped_unassembled"] == 1  # the relation whose member way is missing
    assert res.stats["dropped"] == res.stats["dropped_unassembled"] + res.stats["dropped_geometry"]
    assert res.stats["dropped"] >= 2


def test_tunnel_ends_are_points(world, prof):
    _, ids, res = world
    g = res.features
    t = cid(prof, "tunnel_opening")
    assert row(g, "way", ids["tunnel"]).empty  # a motorway tunnel is no highway line and no overpass
    for n in ids["tunnel_ends"]:
        r = row(g, "node", n, "point")
        assert len(r) == 1 and r.concepts.iloc[0] == [t]
        assert r.area_m2.iloc[0] == pytest.approx(math.pi * 15 ** 2, rel=0.01)
    rail = row(g, "way", ids["rail_tunnel"])
    assert list(rail.kind) == ["line"] and rail.concepts.iloc[0] == [cid(prof, "railroad")]
    for n in ids["rail_tunnel_ends"]:
        assert row(g, "node", n).concepts.iloc[0] == [t]


def test_stats_counts(world):
    _, _, res = world
    s = res.stats
    g = res.features
    assert s["rows"] == len(g)
    assert s["areas"] + s["lines"] + s["points"] == len(g)
    assert s["areas"] == int((g.kind == "area").sum())
    assert s["read"] > s["matched"] > 0
    assert s["area_relations"] == 4  # wood, reserve, unclosed, missing member (not the route)


def test_write_read_roundtrip(world, tmp_path):
    _, _, res = world
    p = osm.write_features(res.features, tmp_path / "out" / "f.parquet")
    schema = pq.read_schema(p)
    t = schema.field("concepts").type
    assert pa.types.is_list(t) and t.value_type == pa.int16()
    assert b"geo" in schema.metadata
    back = osm.read_features(p)
    assert list(back.columns) == osm.COLUMNS and back.crs.to_epsg() == 4326
    assert list(back.concepts) == list(res.features.concepts)
    assert list(back.osm_id) == list(res.features.osm_id)
    assert shapely.equals_exact(back.geometry.values, res.features.geometry.values, tolerance=0).all()
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_deterministic_across_node_indexes(world, prof, tmp_path):
    path, _, res = world
    again = osm.extract(path, prof, node_index="sparse_file_array", tmpdir=tmp_path)
    a, b = res.features, again.features
    assert list(zip(a.osm_type, a.osm_id, a.kind)) == list(zip(b.osm_type, b.osm_id, b.kind))
    assert list(a.concepts) == list(b.concepts)
    assert shapely.to_wkb(a.geometry.values).tolist() == shapely.to_wkb(b.geometry.values).tolist()
    assert list(tmp_path.iterdir()) == []  # the index file is removed
    assert res.stats == again.stats


def test_every_concept_yields_and_near_misses_do_not(prof, tmp_path):
    b = PbfBuilder()
    good, miss = {}, {}
    for i, c in enumerate(prof.concepts):
        yes, no = CASES[c.name]
        spot = at(i % 10, i // 10)
        for tags, where, dy in ((yes, good, 0), (no, miss, 400)):
            p = offset(*spot, 0, dy)
            if "area" in c.kinds:
                where[c.id] = ("way", b.area(square(*p, 60), tags))
            elif "line" in c.kinds:
                where[c.id] = ("way", b.way(line(*p, 200, 3), tags))
            else:
                where[c.id] = ("node", b.node(*p, tags))
    path = b.write(tmp_path / "all.osm.pbf")
    res = osm.extract(path, prof, node_index="flex_mem")
    g = res.features
    rep = osm.yield_report(g, prof)
    assert list(rep.columns) == ["id", "name", "count", "area_m2", "zero"]
    assert not rep.zero.any(), list(rep.name[rep.zero])
    for c in prof.concepts:
        t, i = good[c.id]
        if c.line_as == "ends":
            ends = b.ways[i][0][0], b.ways[i][0][-1]
            assert all(c.id in row(g, "node", n).concepts.iloc[0] for n in ends)
        else:
            assert any(c.id in cc for cc in row(g, t, i).concepts), c.name
        t, i = miss[c.id]
        assert all(c.id not in cc for cc in row(g, t, i).concepts), c.name


def test_yield_report_sums(world, prof):
    _, _, res = world
    g = res.features
    rep = osm.yield_report(g, prof)
    assert list(rep.id) == list(range(prof.n_concepts))
    rr = cid(prof, "railroad")
    mask = [rr in c for c in g.concepts]
    assert rep.loc[rr, "count"] == sum(mask)
    assert rep.loc[rr, "area_m2"] == pytest.approx(g.area_m2[mask].sum())
    assert rep.loc[cid(prof, "golf_course"), "zero"]
    assert not rep.loc[rr, "zero"]


def test_keyfilter_path_gives_same_features(world, prof):
    """Without prefix rules the C++ pre-filter is a KeyFilter: same result as the default path."""
    assert osm.prefilter_keys(prof.concepts) is None  # marina/aquaculture read key prefixes
    data = prof.model_dump(mode="json", exclude={"source"})
    for c in data["concepts"]:
        if c["name"] == "marina":
            c["rule"] = {"any": [{"leisure": "marina"}, {"harbour": "marina"}]}
        if c["name"] == "aquaculture":
            c["rule"] = {"landuse": "aquaculture"}
    p2 = profile_mod.from_dict(data)
    keys = osm.prefilter_keys(p2.concepts)
    assert keys and "building" in keys and "mooring" not in keys and "name" not in keys
    path, _, res = world
    other = osm.extract(path, p2, node_index="flex_mem")
    assert list(other.features.concepts) == list(res.features.concepts)
    assert list(other.features.osm_id) == list(res.features.osm_id)
    assert other.stats["read"] < res.stats["read"]  # irrelevant tagged objects never reach Python


def test_bad_inputs(prof, tmp_path, world):
    with pytest.raises(osm.OsmError, match="no such PBF"):
        osm.extract(tmp_path / "nope.osm.pbf", prof)
    junk = tmp_path / "junk.osm.pbf"
    junk.write_bytes(b"this is not a pbf" * 10)
    with pytest.raises(osm.OsmError) as e:
        osm.extract(junk, prof, node_index="flex_mem")
    assert "\n" not in str(e.value)
    with pytest.raises(osm.OsmError, match="node index"):
        osm.extract(world[0], prof, node_index="no_such_index")
    with pytest.raises(osm.OsmError, match="no such features"):
        osm.read_features(tmp_path / "missing.parquet")
    with pytest.raises(osm.OsmError, match="not a GeoParquet"):
        osm.read_features(junk)


def test_empty_pbf(prof, tmp_path):
    b = PbfBuilder()
    b.node(LON, LAT, {"name": "nothing"})
    res = osm.extract(b.write(tmp_path / "e.osm.pbf"), prof, node_index="flex_mem")
    assert len(res.features) == 0 and list(res.features.columns) == osm.COLUMNS
    back = osm.read_features(osm.write_features(res.features, tmp_path / "e.parquet"))
    assert len(back) == 0 and list(back.columns) == osm.COLUMNS
    assert osm.yield_report(back, prof).zero.all()
