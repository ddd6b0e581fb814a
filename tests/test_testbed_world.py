"""The testbed's vector world (spec, layout, pbfwrite, raster): spec validation, the PBF it writes, frequencies, truth raster."""
from __future__ import annotations

import collections
import copy

import numpy as np
import osmium
import pytest
import yaml
from rasterio.transform import rowcol
from shapely.geometry import box

from gl10m import profile as prof_mod
from gl10m.concepts import ConceptMatcher
from gl10m.testbed import classes as C
from gl10m.testbed import layout, pbfwrite, raster
from gl10m.testbed import spec as tbspec


@pytest.fixture(scope="module")
def spec():
    return tbspec.load_spec()


@pytest.fixture(scope="module")
def profile():
    return prof_mod.load()


@pytest.fixture(scope="module")
def regions(spec):
    return layout.generate(spec)


@pytest.fixture(scope="module")
def pbfs(regions, tmp_path_factory):
    d = tmp_path_factory.mktemp("osm")
    return pbfwrite.write_pbfs(regions, d)


def _read_pbf(path):
    """(type, id, tags) of every tagged object, plus counts by type, read with pyosmium."""
    out = []
    types = collections.Counter()
    for o in osmium.FileProcessor(str(path)):
        t = {"n": "node", "w": "way", "r": "relation"}[o.type_str()]
        types[t] += 1
        tags = {tag.k: tag.v for tag in o.tags}
        if tags:
            out.append((t, o.id, tags))
    return out, types


def _raw_spec():
    return yaml.safe_load(tbspec.DEFAULT_SPEC.read_text())


# -- spec ------------------------------------------------------------------------------------
def test_default_spec_regions_inside_their_states_and_cover_every_split(spec, profile):
    scheme = profile.splits.schemes[profile.splits.scheme]
    codes = set(spec.regions)
    for split in ("train", "val", "test"):
        assert codes & set(getattr(scheme, split)), split
    for code in spec.regions:
        w, s, e, n = spec.region_bbox(code)
        sw, ss, se, sn = profile.regions[code].bbox
        assert sw <= w < e <= se and ss <= s < n <= sn
        assert e - w >= 2 * profile.geometry.footprint_deg


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["regions"]["CA"].update(center=[-100.0, 40.0]), "regions.CA"),   # Nebraska, not California
    (lambda d: d.update(region_size_deg=0.03), "region_size_deg"),
    (lambda d: d.update(colour="red"), "colour: unknown key"),
    (lambda d: d["regions"].pop("WA"), "val split"),
    (lambda d: d["regions"].update(ZZ={"center": [0.0, 0.0], "biome": "desert"}), "regions.ZZ"),
    (lambda d: d["regions"]["TX"].update(biome="tundra"), "regions.TX.biome"),
    (lambda d: d["frequency"].update(scale=-1), "frequency.scale"),
])
def test_bad_spec_is_one_clear_error(mutate, needle):
    data = copy.deepcopy(_raw_spec())
    mutate(data)
    with pytest.raises(tbspec.TestbedSpecError) as ei:
        tbspec.spec_from_dict(data, tbspec.DEFAULT_SPEC)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg and msg.startswith("testbed spec testbed.yaml:")


def test_missing_spec_file(tmp_path):
    with pytest.raises(tbspec.TestbedSpecError, match="no such file"):
        tbspec.load_spec(tmp_path / "nope.yaml")


# -- world -----------------------------------------------------------------------------------
def test_truth_classes_start_with_the_profile_concepts(profile):
    assert C.TRUTH_CLASSES[:66] == [c.name for c in profile.concepts]
    assert len(C.TRUTH_CLASSES) == len(set(C.TRUTH_CLASSES)) < 255


def test_regions_and_features_stay_inside_bbox(regions, spec, profile):
    assert [r.code for r in regions] == sorted(spec.regions)
    fids = np.concatenate([r.features["fid"].to_numpy() for r in regions])
    assert len(np.unique(fids)) == len(fids)
    for r in regions:
        assert r.features.crs.to_epsg() == 4326
        assert 26901 <= r.utm_epsg_nad83 <= 26923 and r.utm_epsg_wgs84 == r.utm_epsg_nad83 - 26900 + 32600
        region = box(*r.bbox)
        assert r.features.geometry.within(region.buffer(1e-9)).all(), r.code
        assert r.marks.geometry.within(region.buffer(1e-9)).all(), r.code
        assert r.features.geometry.is_valid.all()
        assert r.split == profile.split_of(r.code)
        # geometry kinds as mapped
        kinds = r.features.geometry.geom_type
        assert set(kinds[r.features.osm_type == "node"]) == {"Point"}
        assert set(kinds[r.features.osm_type == "relation"]) <= {"Polygon", "MultiPolygon"}


def test_pbf_parses_and_yields_every_concept(pbfs, regions, profile):
    matcher = ConceptMatcher(profile.concepts)
    per_concept = collections.Counter()
    per_region = collections.defaultdict(set)
    kinds = collections.defaultdict(set)
    for code, path in pbfs.items():
        objs, types = _read_pbf(path)
        assert types["node"] > 0 and types["way"] > 0 and types["relation"] > 0
        region = next(r for r in regions if r.code == code)
        assert len(objs) == len(region.features)  # every feature, and only features, carry tags
        for t, oid, tags in objs:
            for cid in matcher.match(tags):
                per_concept[cid] += 1
                per_region[cid].add(code)
                kinds[cid].add(t)
    missing = [c.name for c in profile.concepts if per_concept[c.id] < 3]
    assert not missing, f"concepts with fewer than 3 objects: {missing}"
    # the kinds the real rules match are all used
    cid = {c.name: c.id for c in profile.concepts}
    assert "node" in kinds[cid["tower"]] and "node" in kinds[cid["wind_farm"]] and "node" in kinds[cid["toll_booth"]]
    assert kinds[cid["railroad"]] == {"way"} and kinds[cid["highway"]] == {"way"}
    assert "relation" in kinds[cid["forest"]] and "relation" in kinds[cid["lake"]]
    # most concepts appear in more than one region
    multi = sum(len(per_region[c.id]) >= 2 for c in profile.concepts)
    assert multi >= 0.8 * len(profile.concepts)


def test_pbf_areas_assemble_and_match_the_dataframe(pbfs, regions):
    """osmium's area assembler builds every multipolygon relation; node locations round-trip."""
    region = next(r for r in regions if r.code == "CA")
    path = pbfs["CA"]
    rel_areas, n_rel = 0, int((region.features.osm_type == "relation").sum())
    nodes = {}
    for o in osmium.FileProcessor(str(path)).with_areas():
        if o.type_str() == "a" and not o.from_way():
            rel_areas += 1
        elif o.type_str() == "n" and len(o.tags):
            nodes[o.id] = (o.location.lon, o.location.lat)
    assert rel_areas == n_rel > 0
    pts = region.features[region.features.osm_type == "node"]
    for oid, g in zip(pts.osm_id, pts.geometry):
        assert nodes[int(oid)] == pytest.approx((g.x, g.y), abs=1.5e-7)


def test_frequencies_are_long_tailed_like_gl10m(regions, profile):
    counts = collections.Counter()
    for r in regions:
        for cid, n in r.concept_counts().items():
            counts[cid] += n
    # Line concepts (roads, rails, bridges, rivers...) are left out: GL-10M's counts for them are
    # low because its reference builder reads closed areas only (gl10m-facts.md), while a real
    # region is full of them (and they are split into many ways).
    cons = [c for c in profile.concepts if "line" not in c.kinds]
    ours = np.array([counts[c.id] for c in cons], dtype=float)
    ref = np.array([c.count for c in cons], dtype=float)
    assert len(cons) > 50 and ours.max() >= 10 * ours.min()
    # rank correlation with the GL-10M scene counts (Spearman, no ties handling needed for a check)
    rank = lambda a: np.argsort(np.argsort(a)).astype(float)  # noqa: E731
    rho = np.corrcoef(rank(ours), rank(ref))[0, 1]
    assert rho > 0.6, rho
    # the ten most common GL-10M concepts are, on average, far more common here than the ten rarest
    order = np.argsort(ref)
    assert ours[order[-10:]].mean() > 5 * ours[order[:10]].mean()


def test_scenes_hold_several_concepts(regions, profile):
    """Non-overlapping 0.024-degree scenes tiled over each region contain >= 2 concepts."""
    fp = profile.geometry.footprint_deg
    per_scene = []
    for r in regions:
        w, s, e, n = r.bbox
        feats = r.features[r.features.concept >= 0]
        sidx = feats.sindex
        for x in np.arange(w, e - fp + 1e-9, fp):
            for y in np.arange(s, n - fp + 1e-9, fp):
                hits = sidx.query(box(x, y, x + fp, y + fp), predicate="intersects")
                per_scene.append(len(set(feats.concept.to_numpy()[hits])))
    assert len(per_scene) >= 4 * len(regions)
    assert min(per_scene) >= 2 and np.median(per_scene) >= 8, per_scene


def test_same_seed_same_bytes_other_seed_differs(spec, tmp_path):
    a = pbfwrite.write_pbf(layout.generate(spec, seed=7)[:2], tmp_path / "a.osm.pbf")
    b = pbfwrite.write_pbf(layout.generate(spec, seed=7)[:2], tmp_path / "b.osm.pbf")
    c = pbfwrite.write_pbf(layout.generate(spec, seed=8)[:2], tmp_path / "c.osm.pbf")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


# -- truth raster ----------------------------------------------------------------------------
def _grid_around(region, geom_ll, half_m=60.0, res=0.5, crs=None):
    from pyproj import Transformer
    from rasterio.transform import from_origin
    crs = crs or region.utm_epsg_nad83
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(geom_ll.centroid.x, geom_ll.centroid.y)
    n = int(2 * half_m / res)
    return crs, from_origin(x - half_m, y + half_m, res, res), (n, n), (n // 2, n // 2)


def _pick(region, concept, osm_type=None):
    f = region.features
    sel = f[(f.concept == C.CID[concept])]
    if osm_type:
        sel = sel[sel.osm_type == osm_type]
    assert len(sel), concept
    return sel.iloc[0]


@pytest.mark.parametrize("concept, osm_type", [("swimming_pool", None), ("tower", "node"),
                                               ("helipad", None), ("wind_farm", "node")])
def test_truth_puts_small_objects_where_they_are(regions, concept, osm_type):
    region = next(r for r in regions if (r.features.concept == C.CID[concept]).any()
                  and (osm_type is None or ((r.features.concept == C.CID[concept])
                                            & (r.features.osm_type == osm_type)).any()))
    feat = _pick(region, concept, osm_type)
    crs, tr, shape, (ci, cj) = _grid_around(region, feat.geometry)
    classes, marks = raster.rasterize_truth(region, crs, tr, shape)
    assert classes.dtype == np.uint8 and marks.dtype == np.uint8 and classes.shape == shape
    px = classes[ci - 1:ci + 2, cj - 1:cj + 2]
    assert (px == C.CID[concept]).all(), (concept, np.unique(px))
    area_m2 = (classes == C.CID[concept]).sum() * 0.25
    assert 2 <= area_m2 < 400  # visible at 1 m, smaller than 4 Sentinel-2 pixels
    # 50 m away in some direction the object is gone
    assert (classes[:10, :10] != C.CID[concept]).all()


def test_truth_draw_order_marks_and_nodata(regions):
    region = next(r for r in regions if r.code == "CA")
    f = region.features
    # a church building sits on top of the town's residential landuse
    church = _pick(region, "religious_building")
    crs, tr, shape, (ci, cj) = _grid_around(region, church.geometry, half_m=40)
    classes, marks = raster.rasterize_truth(region, crs, tr, shape)
    p = church.geometry.representative_point()
    from pyproj import Transformer
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(p.x, p.y)
    row, col = rowcol(tr, x, y)
    assert classes[row, col] == C.CID["religious_building"]
    # the material layer tells the roof from the ground around it
    layers = raster.rasterize_layers(region, crs, tr, shape)
    assert (layers["classes"] == classes).all() and (layers["marks"] == marks).all()
    assert layers["material"][row, col] == C.MATERIAL["roof"]
    assert C.MATERIAL["roof"] not in layers["material"][classes == C.BG["residential"]]
    assert (classes == C.BG["residential"]).any()
    # a parking lot carries stripes; a tennis court its lines
    lot = _pick(region, "parking_lot")
    crs, tr, shape, _ = _grid_around(region, lot.geometry, half_m=50, res=0.25)
    classes, marks = raster.rasterize_truth(region, crs, tr, shape)
    on_lot = classes == C.CID["parking_lot"]
    assert (marks[on_lot] == C.MARK["parking_stripe"]).mean() > 0.05
    stripes = marks == C.MARK["parking_stripe"]
    assert np.isin(classes[stripes], [C.CID["parking_lot"], C.CID["parking_garage"]]).all()
    # the full-region grid: nodata outside the bbox, base cover where nothing is mapped
    crs, tr, shape = raster.truth_grid(region, res_m=10.0)
    classes, marks = raster.rasterize_truth(region, crs, tr, shape)
    assert (classes == C.NODATA).any() and (classes != C.NODATA).mean() > 0.9
    assert classes[0, 0] == C.NODATA or classes[-1, -1] == C.NODATA
    present = set(np.unique(classes).tolist()) - {C.NODATA}
    assert {C.BG["sea"], C.CID["highway"], C.CID["farmland"], C.BG["building"]} <= present


def test_tunnel_is_drawn_as_portals_only(regions):
    region = next(r for r in regions if r.features.tags.map(lambda t: t.get("tunnel") == "yes").any())
    f = region.features
    tun = f[f.tags.map(lambda t: t.get("tunnel") == "yes")].iloc[0]
    assert tun.concept == C.CID["tunnel_opening"]
    line = tun.geometry
    mid = line.interpolate(0.5, normalized=True)
    end = line.interpolate(0.0, normalized=True)
    for pt, expect in ((end, True), (mid, False)):
        crs, tr, shape, (ci, cj) = _grid_around(region, pt, half_m=20, res=1.0)
        classes, _ = raster.rasterize_truth(region, crs, tr, shape)
        assert (classes[ci, cj] == C.CID["tunnel_opening"]) == expect


def test_write_truth_cog(regions, tmp_path):
    import rasterio
    region = min(regions, key=lambda r: len(r.features))
    path = raster.write_truth(region, tmp_path / "truth" / f"{region.code}.tif", res_m=8.0)
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == region.utm_epsg_nad83 and ds.nodata == C.NODATA and ds.dtypes == ("uint8",)
        assert ds.res == (8.0, 8.0) and ds.overviews(1)
        a = ds.read(1)
    assert (a != C.NODATA).mean() > 0.9 and a[a != C.NODATA].max() < len(C.TRUTH_CLASSES)


def test_write_truth_takes_precomputed_classes_on_its_grid(regions, tmp_path):
    import rasterio
    region = regions[0]
    crs, tr, shape = raster.truth_grid(region, res_m=20.0)
    classes, _ = raster.rasterize_truth(region, crs, tr, shape)
    path = raster.write_truth(region, tmp_path / "t.tif", res_m=20.0, classes=classes)
    with rasterio.open(path) as ds:
        assert (ds.read(1) == classes).all()
    with pytest.raises(ValueError, match="classes must be uint8"):
        raster.write_truth(region, tmp_path / "u.tif", res_m=10.0, classes=classes)
    assert not (tmp_path / "u.tif").exists()


def test_osm_stage_extracts_every_concept_from_the_pbfs(pbfs, profile):
    """The pipeline's own reader (gl10m.osm.extract) finds all 66 concepts, dropping nothing."""
    from gl10m import osm
    seen = collections.Counter()
    for code, path in sorted(pbfs.items()):
        res = osm.extract(path, profile)
        assert res.stats["dropped_unassembled"] == 0 and res.stats["missing_locations"] == 0, code
        for ids in res.features["concepts"]:
            seen.update(ids)
    assert sorted(seen) == list(range(66))


def test_importing_the_testbed_loads_no_profile():
    """The profile-derived tables (CONCEPT_NAMES, CID, TRUTH_CLASSES, BG, CLASS_MATERIAL) are made
    on first use, not at import."""
    import subprocess
    import sys

    code = ("import gl10m.profile as P\n"
            "calls = []\n"
            "real = P.load\n"
            "P.load = lambda *a, **k: calls.append(a) or real(*a, **k)\n"
            "import gl10m.cli, gl10m.testbed.layout, gl10m.testbed.scenes, gl10m.testbed.build\n"
            "import gl10m.testbed.imagery, gl10m.testbed.visibility\n"
            "assert calls == [], calls\n"
            "from gl10m.testbed.classes import CID, TRUTH_CLASSES\n"
            "from gl10m.testbed.classes import CONCEPT_NAMES\n"
            "assert len(calls) == 1 and CID[CONCEPT_NAMES[3]] == 3 and TRUTH_CLASSES[:66] == CONCEPT_NAMES\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
