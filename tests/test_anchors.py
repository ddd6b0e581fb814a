"""gl10m.anchors: anchors, class-aware thinning, scene/tile fractions, partitions, I/O."""
from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely

from gl10m import anchors as A
from gl10m import geometry as geo
from gl10m import profile as P

FP = 0.024
TENNIS, SHIPYARD, WIND, FARMLAND, FOREST, PARK, POND = 0, 17, 19, 28, 29, 32, 63


@pytest.fixture(scope="module")
def prof():
    # the synthetic layouts sit around (-100, 40); give CO a box that holds them (the region-box
    # filter itself is tested in test_footprints_leaving_the_region_box_are_dropped_first)
    p = P.load()
    co = p.regions["CO"].model_copy(update={"bbox": (-110.0, 30.0, -90.0, 45.0)})
    return p.model_copy(update={"regions": {**p.regions, "CO": co}})


def with_geometry(profile, **kw):
    return profile.model_copy(update={"geometry": profile.geometry.model_copy(update=kw)})


def square(lon, lat, side_m):
    mx, my = geo.metres_per_degree(lat)
    hx, hy = side_m / 2 / mx, side_m / 2 / my
    return shapely.box(lon - hx, lat - hy, lon + hx, lat + hy)


def feats(rows):
    """rows: (osm_type, osm_id, [concepts], geometry)."""
    t, i, c, g = zip(*rows) if rows else ((), (), (), ())
    return gpd.GeoDataFrame({
        "osm_type": list(t), "osm_id": np.asarray(i, dtype="int64"), "kind": "area",
        "concepts": [np.asarray(x, dtype="int16") for x in c],
        "area_m2": 0.0,
    }, geometry=list(g), crs="EPSG:4326")


def random_features(n, seed, span=0.12, n_concepts=66, lon0=-105.0, lat0=39.6):
    rng = np.random.default_rng(seed)
    lon = lon0 + rng.uniform(0, span, n)
    lat = lat0 + rng.uniform(0, span, n)
    side = rng.uniform(20, 400, n)
    conc = [sorted(set(rng.integers(0, n_concepts, rng.integers(1, 3)).tolist())) for _ in range(n)]
    types = rng.choice(["node", "way", "relation"], n)
    return feats([(types[k], 1000 + k, conc[k], square(lon[k], lat[k], side[k])) for k in range(n)])


def ids(gdf):
    return sorted(A.scene_ids(gdf["anchor_osm_type"], gdf["anchor_osm_id"]))


# -- anchors ----------------------------------------------------------------------------------
def test_anchor_points_one_per_object_rarest_concept_inside(prof):
    c_shape = shapely.Polygon([(0, 0), (3, 0), (3, 1), (1, 1), (1, 2), (3, 2), (3, 3), (0, 3)])
    c_shape = shapely.affinity.translate(shapely.affinity.scale(c_shape, 0.001, 0.001, origin=(0, 0)), -100, 40)
    assert not c_shape.contains(c_shape.centroid)
    f = feats([
        ("way", 5, [FOREST], square(-100.1, 40.0, 500)),
        ("way", 5, [SHIPYARD], square(-100.1, 40.0, 50)),      # same object, second row
        ("relation", 5, [TENNIS, FOREST], square(-100.2, 40.0, 30)),  # same id, other type
        ("way", 7, [PARK], c_shape),
    ])
    a = A.anchor_points(f, prof)
    assert len(a) == 3
    got = dict(zip(A.scene_ids(a["anchor_osm_type"], a["anchor_osm_id"]), range(3)))
    assert set(got) == {"w5", "r5", "w7"}
    w5, r5, w7 = a.iloc[got["w5"]], a.iloc[got["r5"]], a.iloc[got["w7"]]
    assert list(w5["concepts"]) == [SHIPYARD, FOREST] and w5["anchor_concept"] == SHIPYARD
    assert w5["anchor_count"] == prof.concepts[SHIPYARD].count
    assert r5["anchor_concept"] == TENNIS  # tennis (15920) rarer than forest (51903)
    assert square(-100.1, 40.0, 500).contains(shapely.Point(w5["lon"], w5["lat"]))
    assert c_shape.contains(shapely.Point(w7["lon"], w7["lat"]))
    assert a.crs.to_epsg() == 4326


def test_bad_features_fail_with_one_line(prof):
    good = feats([("way", 1, [FOREST], square(-100, 40, 50))])
    with pytest.raises(A.AnchorsError, match="lack column"):
        A.anchor_points(good.drop(columns=["concepts"]), prof)
    bad = good.copy()
    bad["osm_type"] = ["area"]
    with pytest.raises(A.AnchorsError, match="osm_type must be"):
        A.anchor_points(bad, prof)
    with pytest.raises(A.AnchorsError, match="EPSG:4326"):
        A.anchor_points(good.to_crs(3857), prof)
    bad = good.copy()
    bad["concepts"] = [np.array([66], dtype="int16")]
    with pytest.raises(A.AnchorsError, match="concept ids"):
        A.anchor_points(bad, prof)
    with pytest.raises(A.AnchorsError, match="state") as info:
        A.build_candidates(good, prof, "C.O")
    assert "\n" not in str(info.value)


# -- thinning ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_overlap", [0.0, 0.3])
def test_thinning_bounds_overlap_and_is_maximal(prof, max_overlap):
    p = with_geometry(prof, max_overlap=max_overlap)
    a = A.anchor_points(random_features(600, seed=1), p)
    status, counts = A.thin_status(a, p)
    assert counts["kept"] + counts["thinned_overlap"] + counts["dropped_min_concepts"] == len(a) == counts["anchors"]
    assert counts["dropped_min_concepts"] == 0  # no features given: no validity rule
    b = geo.footprint_bounds(a["lon"].to_numpy(), a["lat"].to_numpy(), FP)
    kept, gone = np.flatnonzero(status == 1), np.flatnonzero(status == 2)
    assert 5 < len(kept) < len(a)
    ov = geo.overlap_fraction(b[kept][:, None], b[kept][None, :])
    np.fill_diagonal(ov, 0)
    assert ov.max() <= max_overlap + 1e-9
    # maximal: every thinned anchor overlaps a kept one by more than max_overlap
    ov2 = geo.overlap_fraction(b[gone][:, None], b[kept][None, :])
    assert (ov2.max(axis=1) > max_overlap).all()
    if max_overlap == 0.0:
        assert (geo.overlap_fraction(b[gone][:, None], b[kept][None, :]) > 0.3).any(axis=1).mean() < 1
    # the reference's 0.01-degree floor cells would keep overlapping footprints; ours never
    cells = set(zip(np.floor(a["lon"] / 0.01), np.floor(a["lat"] / 0.01)))
    assert len(kept) < len(cells)


def test_thinning_independent_of_input_order(prof):
    f = random_features(500, seed=2)
    base_cand, base_stats = A.build_candidates(f, prof, "CO")
    base_thin = ids(A.thin(A.anchor_points(f, prof), prof))
    for seed in (0, 1):
        g = f.sample(frac=1.0, random_state=seed)
        assert ids(A.thin(A.anchor_points(g, prof), prof)) == base_thin
        cand, stats = A.build_candidates(g, prof, "CO")
        assert stats == base_stats
        pd.testing.assert_frame_equal(pd.DataFrame(cand.drop(columns="geometry")),
                                      pd.DataFrame(base_cand.drop(columns="geometry")))


@pytest.mark.parametrize("rare_id,common_id", [(1, 2), (2, 1), (900001, 3)])
def test_rare_concept_wins_a_conflict(prof, rare_id, common_id):
    f = feats([
        ("way", common_id, [TENNIS], square(-100.0, 40.0, 40)),
        ("way", rare_id, [WIND], square(-100.006, 40.003, 40)),
    ])
    kept = A.thin(A.anchor_points(f, prof), prof)
    assert ids(kept) == [f"w{rare_id}"]
    assert kept["anchor_concept"].tolist() == [WIND]


def test_invalid_rare_anchor_does_not_remove_valid_neighbour(prof):
    # A (rare, alone in its footprint) overlaps B (common); B's footprint also holds C (forest),
    # which lies outside A's footprint. Thinning first would keep A, then drop it for having a
    # single concept, losing B too.
    f = feats([
        ("node", 1, [SHIPYARD], square(-100.000, 40.0, 30)),
        ("node", 2, [TENNIS], square(-99.985, 40.0, 30)),
        ("node", 3, [FOREST], square(-99.9745, 40.0, 300)),
    ])
    anchors = A.anchor_points(f, prof)
    assert ids(A.thin(anchors, prof)) == ["n1", "n3"]  # overlap only: rare A kept
    cand, stats = A.build_candidates(f, prof, "CO")
    assert cand["scene_id"].tolist() == ["n2"]
    assert list(cand["concepts"][0]) == [TENNIS, FOREST]
    assert stats["dropped_min_concepts"] == 1 and stats["thinned_overlap"] == 1 and stats["kept"] == 1


def test_lazy_validation_equals_filter_then_thin(prof):
    """build_candidates == thin(the anchors whose scenes pass min-concepts), computed by brute force."""
    p = with_geometry(prof, min_concepts=3)
    f = random_features(700, seed=3, span=0.5)
    anchors = A.anchor_points(f, p)
    allstats = A.scene_stats(anchors, f, p, "CO", min_concepts_filter=False)
    valid_ids = set(allstats.loc[allstats["concepts"].map(len) >= 3, "scene_id"])
    assert 0 < len(valid_ids) < len(anchors)
    valid = anchors[np.isin(A.scene_ids(anchors["anchor_osm_type"], anchors["anchor_osm_id"]), list(valid_ids))]
    want = ids(A.thin(valid, p))
    naive = [i for i in ids(A.thin(anchors, p)) if i in valid_ids]  # thin first, filter after
    assert naive != want  # the layout tells the two orders apart
    cand, stats = A.build_candidates(f, p, "CO")
    assert cand["scene_id"].tolist() == want
    assert stats["validated"] < len(anchors)  # validity measured lazily, not for every anchor
    assert stats["kept"] + stats["thinned_overlap"] + stats["dropped_min_concepts"] == len(anchors)
    # the statistics are those of the same scenes measured on their own
    ref = allstats.set_index("scene_id").loc[want]
    for col in ("concepts", "scene_frac", "tile_idx", "tile_frac", "tile_dominant"):
        for x, y in zip(cand[col], ref[col]):
            np.testing.assert_array_equal(x, y)


# -- fractions --------------------------------------------------------------------------------
def _one_scene(prof, extra_rows, anchor=("node", 1, [TENNIS], 40.0), lon=-100.0, lat=40.0):
    t, i, c, side = anchor
    af = feats([(t, i, c, square(lon, lat, side))])
    a = A.anchor_points(af, prof)
    b = geo.footprint_bounds(a["lon"].to_numpy(), a["lat"].to_numpy(), FP)
    tiles = geo.tile_bounds(b, 10)[0]
    rows = extra_rows(tiles, b[0])
    f = pd.concat([af, feats(rows)], ignore_index=True)
    return a, b[0], tiles, f


def _tiles_of(row, concept):
    m = np.asarray(row["tile_concept"]) == concept
    return dict(zip(np.asarray(row["tile_idx"])[m].tolist(), np.asarray(row["tile_frac"])[m].tolist()))


def test_fractions_one_tile_layout(prof):
    a, b, tiles, f = _one_scene(prof, lambda t, b: [("way", 10, [FOREST], geo.boxes(t[23]))])
    out = A.scene_stats(a, f, prof, "CO")
    assert len(out) == 1
    r = out.iloc[0]
    assert r["scene_id"] == "n1" and r["state"] == "CO"
    assert list(r["concepts"]) == [TENNIS, FOREST]
    forest = _tiles_of(r, FOREST)
    assert list(forest) == [23] and forest[23] == pytest.approx(1.0, abs=1e-6)
    want = float(geo.box_area_m2(tiles[23]) / geo.box_area_m2(b))
    assert r["scene_frac"][FOREST] == pytest.approx(want, rel=1e-5)
    assert r["scene_frac"][FOREST] == pytest.approx(0.01, rel=1e-3)
    tennis_area = float(shapely.area(geo.to_equal_area(np.array([square(-100, 40, 40)]))[0]))
    assert r["scene_frac"][TENNIS] == pytest.approx(tennis_area / float(geo.box_area_m2(b)), rel=1e-4)
    # the tennis court sits on the centre: the four central tiles, a quarter each
    tennis = _tiles_of(r, TENNIS)
    assert sorted(tennis) == [44, 45, 54, 55]
    assert sum(tennis[t] * float(geo.box_area_m2(tiles[t])) for t in tennis) == pytest.approx(tennis_area, rel=1e-4)
    dom = np.asarray(r["tile_dominant"])
    assert len(dom) == 100 and dom[23] == FOREST
    assert (dom[[44, 45, 54, 55]] == TENNIS).all()
    assert (dom[np.setdiff1d(np.arange(100), [23, 44, 45, 54, 55])] == -1).all()
    sf, rf = np.asarray(r["scene_frac"]), np.asarray(r["rel_frac"])
    assert sf.shape == rf.shape == (66,) and sf.dtype == np.float32
    assert rf.sum() == pytest.approx(1.0, rel=1e-5)
    assert rf[FOREST] == pytest.approx(sf[FOREST] / (sf[FOREST] + sf[TENNIS]), rel=1e-5)
    assert np.count_nonzero(rf) == 2
    # ground pixel size at the scene latitude
    hx, hy = geo.pixel_size_m(r["lat"], FP, 2680)
    lx, ly = geo.pixel_size_m(r["lat"], FP, 268)
    assert (r["hr_px_m_x"], r["hr_px_m_y"], r["lr_px_m_x"], r["lr_px_m_y"]) == pytest.approx((hx, hy, lx, ly), rel=1e-6)
    assert shapely.equals(r["geometry"], geo.boxes(b))
    assert (r["west"], r["south"], r["east"], r["north"]) == tuple(b)


def test_union_of_same_concept_counts_once(prof):
    def rows(t, b):
        left = shapely.box(t[11][0], t[11][1], t[12][2], t[12][3])    # tiles 11 + 12
        right = shapely.box(t[12][0], t[12][1], t[13][2], t[13][3])   # tiles 12 + 13
        return [("way", 10, [FOREST], left), ("way", 11, [FOREST], right),
                ("way", 12, [PARK], geo.boxes(t[12]))]                # another concept on 12
    a, b, tiles, f = _one_scene(prof, rows)
    r = A.scene_stats(a, f, prof, "CO").iloc[0]
    three = float(geo.box_area_m2(tiles[[11, 12, 13]]).sum() / geo.box_area_m2(b))
    assert r["scene_frac"][FOREST] == pytest.approx(three, rel=1e-5)  # not 4 tiles
    forest = _tiles_of(r, FOREST)
    assert sorted(forest) == [11, 12, 13]
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in forest.values())
    assert _tiles_of(r, PARK) == {12: pytest.approx(1.0, abs=1e-6)}
    assert list(r["concepts"]) == [TENNIS, FOREST, PARK]
    assert np.asarray(r["tile_dominant"])[12] == FOREST  # tie on area: lower id


@pytest.mark.parametrize("side_m,kept", [(3.0, False), (6.0, True)])
def test_min_concepts_and_min_area(prof, side_m, kept):
    # a second concept of 9 m^2 (< 20) does not count; 36 m^2 does
    a, b, tiles, f = _one_scene(prof, lambda t, b: [("node", 20, [POND], square(-99.995, 40.005, side_m))])
    out = A.scene_stats(a, f, prof, "CO")
    assert len(out) == int(kept)
    full = A.scene_stats(a, f, prof, "CO", min_concepts_filter=False).iloc[0]
    assert list(full["concepts"]) == ([TENNIS, POND] if kept else [TENNIS])
    assert full["scene_frac"][POND] > 0  # measured either way
    cand, stats = A.build_candidates(f, prof, "CO")
    assert len(cand) == int(kept) and stats["dropped_min_concepts"] == int(not kept) * (1 + int(not kept))


def test_scene_near_big_feature_is_clipped(prof):
    # a huge forest around the scene fills it: fraction 1, every tile forest-dominant
    a, b, tiles, f = _one_scene(prof, lambda t, b: [("relation", 30, [FOREST], shapely.box(-101, 39, -99, 41))])
    r = A.scene_stats(a, f, prof, "CO").iloc[0]
    assert r["scene_frac"][FOREST] == pytest.approx(1.0, abs=1e-6)
    assert (np.asarray(r["tile_dominant"]) == FOREST).all()
    assert sorted(_tiles_of(r, FOREST)) == list(range(100))


# -- the stage, partitions, I/O ---------------------------------------------------------------
def test_build_candidates_partitions_and_roundtrip(prof, tmp_path):
    f = random_features(600, seed=4, span=0.3)
    one, s1 = A.build_candidates(f, prof, "CO", n_partitions=1)
    four, s4 = A.build_candidates(f, prof, "CO", n_partitions=4)
    assert s4["partitions"] == 4 and s1["partitions"] == 1
    assert len(one) > 10
    pd.testing.assert_frame_equal(pd.DataFrame(one.drop(columns="geometry")), pd.DataFrame(four.drop(columns="geometry")))
    assert one["scene_id"].is_monotonic_increasing and one["scene_id"].is_unique
    assert not one["scene_id"].str.contains(r"\.").any()
    assert (one["concepts"].map(len) >= prof.geometry.min_concepts).all()
    path = tmp_path / "c" / "CO.parquet"
    A.write_candidates(one, path)
    schema = pq.read_schema(path)
    for fld in A.CANDIDATE_SCHEMA:
        assert schema.field(fld.name).type == fld.type, fld.name
    assert b"geo" in schema.metadata
    back = A.read_candidates(path)
    assert back.crs.to_epsg() == 4326 and len(back) == len(one)
    for col in ("scene_id", "lon", "anchor_osm_id", "anchor_concept", "hr_px_m_x"):
        assert back[col].tolist() == one[col].tolist()
    for col in ("concepts", "scene_frac", "tile_idx", "tile_frac", "tile_dominant"):
        for x, y in zip(back[col], one[col]):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype
    assert back.geometry.geom_equals(one.geometry).all()
    assert not list(path.parent.glob(".*tmp*"))
    with pytest.raises(A.AnchorsError, match="no such file"):
        A.read_candidates(tmp_path / "missing.parquet")


def test_empty_input(prof, tmp_path):
    cand, stats = A.build_candidates(feats([]), prof, "CO")
    assert len(cand) == 0 and stats["anchors"] == 0
    A.write_candidates(cand, tmp_path / "e.parquet")
    assert len(A.read_candidates(tmp_path / "e.parquet")) == 0
    assert pq.read_schema(tmp_path / "e.parquet").field("concepts").type == A.CANDIDATE_SCHEMA.field("concepts").type


def test_partitions_cover_once_and_are_deterministic(prof):
    a = A.anchor_points(random_features(400, seed=5, span=1.0, lat0=39.5), prof)
    parts = A.partitions(a, 4)
    assert len(parts) == 4 and sum(map(len, parts)) == len(a)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sorted(sum((ids(p) for p in parts), [])) == ids(a)
    shuffled = A.partitions(a.sample(frac=1.0, random_state=1), 4)
    assert [ids(p) for p in shuffled] == [ids(p) for p in parts]
    # compact: the partitions' bounding boxes cover much less than 4x the whole box
    area = lambda p: (p["lon"].max() - p["lon"].min()) * (p["lat"].max() - p["lat"].min())
    assert sum(area(p) for p in parts) < 2.0 * area(a)
    cells = A.partitions(a, cell_deg=0.5)
    assert sum(map(len, cells)) == len(a) and len(cells) == 4
    for p in cells:
        assert len(set(zip(np.floor(p["lon"] / 0.5), np.floor(p["lat"] / 0.5)))) == 1
    with pytest.raises(A.AnchorsError, match="exactly one"):
        A.partitions(a)
    # a partition task needs only the features that meet its footprints
    f = random_features(400, seed=5, span=1.0, lat0=39.5)
    sub = A.features_for(parts[0], f, prof)
    assert 0 < len(sub) < len(f)
    pd.testing.assert_frame_equal(
        pd.DataFrame(A.scene_stats(parts[0], sub, prof, "CO").drop(columns="geometry")),
        pd.DataFrame(A.scene_stats(parts[0], f, prof, "CO").drop(columns="geometry")))


# -- end to end from a real PBF ---------------------------------------------------------------
def test_end_to_end_from_pbf(prof, tmp_path):
    pbfgen = pytest.importorskip("tests.fixtures.pbf")
    osm = pytest.importorskip("gl10m.osm")
    b = pbfgen.PbfBuilder()
    lon, lat = -105.0, 39.7
    # scene 1: tennis court (area) in a park (area), with a pool node
    b.area(pbfgen.square(lon, lat, 36), {"leisure": "pitch", "sport": "tennis"})
    b.area(pbfgen.square(lon, lat, 600), {"leisure": "park"})
    b.node(*pbfgen.offset(lon, lat, 150, 150), {"leisure": "swimming_pool"})
    # a lone pond far away: one concept only, dropped
    b.area(pbfgen.square(lon + 0.5, lat, 80), {"natural": "water", "water": "pond"})
    # a rare wind turbine overlapping scene 1 wins the conflict
    b.node(*pbfgen.offset(lon, lat, 500, 0), {"man_made": "wind_turbine"})
    path = b.write(tmp_path / "t.osm.pbf")
    feats_ = osm.extract(path, prof, tmpdir=tmp_path / "tmp").features
    cand, stats = A.build_candidates(feats_, prof, "CO")
    assert stats["anchors"] == len(feats_) == 5
    assert len(cand) == 1
    r = cand.iloc[0]
    assert r["anchor_concept"] == WIND and r["scene_id"].startswith("n")
    assert list(r["concepts"]) == [TENNIS, 3, WIND, PARK]
    assert stats["dropped_min_concepts"] == 1 and stats["thinned_overlap"] == 3


def test_footprints_leaving_the_region_box_are_dropped_first(prof):
    # two valid scenes; the rarer one's footprint crosses the region box's east edge, so it is
    # dropped before thinning and the common one survives instead of being thinned away
    edge = -90.0 - 0.005
    box = prof.regions["CO"].bbox
    assert box[2] == -90.0
    f = feats([
        ("node", 1, [SHIPYARD], square(edge, 40.0, 30)),
        ("node", 2, [FOREST], square(edge + 0.002, 40.0, 200)),
        ("node", 3, [TENNIS], square(edge - 0.015, 40.0, 30)),
        ("node", 4, [FOREST], square(edge - 0.02, 40.0, 200)),
    ])
    cand, stats = A.build_candidates(f, prof, "CO")
    assert stats["outside_region"] == 2
    assert stats["anchors"] == stats["outside_region"] + stats["kept"] + stats["thinned_overlap"] + stats["dropped_min_concepts"]
    assert set(cand["scene_id"]) <= {"n3", "n4"} and len(cand) == 1
    assert (cand["east"] <= box[2]).all()
