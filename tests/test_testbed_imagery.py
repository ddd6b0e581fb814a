"""Testbed imagery, STAC items and the world build (gl10m.testbed.imagery / stac_items / build).

A small real world is built once per module (three regions, imagery over their central
0.014-degree square): real COGs, a real PBF, real STAC item collections. The default world is
built only by the slow test.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from gl10m.profile import DEFAULT_PROFILE
from gl10m.testbed import imagery as I

SMALL_SPEC = {
    "name": "testbed-small", "seed": 11, "profile": str(DEFAULT_PROFILE),
    "region_size_deg": 0.048, "cell_m": 200.0, "street_margin_m": 18.0,
    "frequency": {"scale": 0.0005, "min_per_concept": 1, "max_per_concept": 8},
    "regions": {
        "CA": {"center": [-119.205, 34.185], "biome": "coastal_plain", "coast": "west", "town_cells": [4, 3]},
        "AZ": {"center": [-111.925, 33.415], "biome": "desert", "coast": "none", "town_cells": [4, 3]},
        "WA": {"center": [-122.445, 47.245], "biome": "forest_coast", "coast": "north", "town_cells": [4, 3]},
    },
    "imagery": {
        "extent_deg": 0.014,
        "naip_states": {
            "CA": [{"year": 2021, "date": "2021-06-01"}, {"year": 2023, "date": "2023-06-14", "gsd": 0.6}],
            "AZ": [{"year": 2021, "date": "2021-05-30"}, {"year": 2023, "date": "2023-06-11"}],
            "WA": [{"year": 2023, "date": "2023-08-02"}],
        },
        "faults": [{"kind": "black_wedge", "state": "CA"},
                   {"kind": "missing_href", "state": "AZ", "collection": "sentinel-2-l2a"},
                   {"kind": "corrupt_cog", "state": "WA", "collection": "naip"}],
    },
}


def _write_spec(d: Path, spec=SMALL_SPEC) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from gl10m.testbed.build import build
    d = tmp_path_factory.mktemp("tb")
    res = build(d / "world", _write_spec(d))
    return res


def _items(root: Path, coll: str) -> list[dict]:
    return json.loads((root / "stac" / f"{coll}.json").read_text())["features"]


def _faulty(root: Path) -> set[str]:
    return {f["href"] for f in json.loads((root / "world.json").read_text())["faults"]
            if f["kind"] in ("missing_href", "corrupt_cog")}


# -------------------------------------------------------------------------------------------
# pure helpers
# -------------------------------------------------------------------------------------------
def test_value_noise_depends_on_place_not_grid():
    xs = np.arange(400000.5, 400100.5, 1.0)
    ys = np.arange(3763999.5, 3763899.5, -1.0)
    a = I.value_noise(xs, ys, 4.0, 123)
    b = I.value_noise(xs[30:70], ys[10:50], 4.0, 123)  # a window of the same place, asked separately
    assert np.allclose(a[10:50, 30:70], b, atol=1e-6)
    assert a.std() > 0.1 and np.abs(a).max() <= 1.0 + 1e-6
    assert not np.allclose(a, I.value_noise(xs, ys, 4.0, 124))


def test_mgrs_tile_known_places():
    assert I.mgrs_tile(-118.25, 34.05) == "11SLT"  # Los Angeles
    assert I.mgrs_tile(-122.33, 47.61) == "10TET"  # Seattle


def test_quarter_quads_tile_the_bbox_with_unique_names():
    bbox = (-119.23, 34.16, -119.18, 34.21)
    qqs = I.quarter_quads(bbox, 11, 1.0)
    names = [q.name for q in qqs]
    assert len(set(names)) == len(names) == 4  # the bbox straddles a 3.75' line both ways
    for q in qqs:
        w, s, e, n = q.cell
        assert math.isclose(e - w, 3.75 / 60) and math.isclose(n - s, 3.75 / 60)
        assert q.name.startswith("m_34119") and q.name.endswith("_11_100")
    assert {q.name.split("_")[2] for q in qqs} == {"ne", "nw", "se", "sw"}


def test_imagery_spec_one_line_errors():
    with pytest.raises(I.ImagerySpecError, match=r"testbed imagery: bogus: unknown key"):
        I.imagery_spec({"bogus": 1})
    with pytest.raises(I.ImagerySpecError, match=r"s2_dates\.0\.baseline"):
        I.imagery_spec({"s2_dates": [{"date": "2023-01-01", "cloud_pct": 1, "baseline": "5.1"}]})
    with pytest.raises(I.ImagerySpecError, match=r"not in year 2022"):
        I.imagery_spec({"naip_years": [{"year": 2022, "date": "2023-01-01"}]})
    assert I.imagery_spec(None) == I.imagery_spec({})


def test_s2_offset_rule():
    assert not I.has_offset("03.01") and not I.has_offset("02.14")
    assert I.has_offset("04.00") and I.has_offset("05.10")


# -------------------------------------------------------------------------------------------
# the built world
# -------------------------------------------------------------------------------------------
def test_layout_profile_and_world_json(world):
    from gl10m import profile as P
    root = world.out_dir
    meta = json.loads((root / "world.json").read_text())
    assert meta["seed"] == 11 and sorted(r["code"] for r in meta["regions"]) == ["AZ", "CA", "WA"]
    prof = P.load(root / "profile.yaml")
    assert sorted(prof.regions) == ["AZ", "CA", "WA"]
    assert prof.provider.name == "stac" and prof.provider.stac_url.startswith("http://127.0.0.1")
    assert prof.split_of("WA") == "val" and prof.split_of("AZ") == "test" and prof.split_of("CA") == "train"
    for code in prof.regions:
        pbf = Path(prof.pbf_source(code))
        assert pbf.is_file() and pbf.parent == root / "osm"
        assert hashlib.sha256(pbf.read_bytes()).hexdigest() == prof.regions[code].sha256
        assert (root / "truth" / f"{code}.tif").is_file()
    assert not list(root.parent.glob(f".{root.name}.*"))  # no temp folders left


def test_cogs_valid_and_where_items_say(world):
    from pyproj import Transformer
    from rio_cogeo.cogeo import cog_validate
    from shapely.geometry import Point, shape
    root = world.out_dir
    bad = _faulty(root)
    n = 0
    for coll in ("naip", "sentinel-2-l2a"):
        for it in _items(root, coll):
            for key, a in it["assets"].items():
                if a["href"] in bad:
                    continue
                path = root / a["href"]
                ok, errors, _ = cog_validate(str(path), quiet=True)
                assert ok, (a["href"], errors)
                shp = a.get("proj:shape") or it["properties"]["proj:shape"]
                tr = a.get("proj:transform") or it["properties"]["proj:transform"]
                with rasterio.open(path) as src:
                    assert src.crs.to_epsg() == it["properties"]["proj:epsg"]
                    assert [src.height, src.width] == shp
                    assert np.allclose(list(src.transform)[:6], tr, atol=1e-6)
                    cx, cy = src.xy(src.height // 2, src.width // 2)
                    lon, lat = Transformer.from_crs(src.crs, 4326, always_xy=True).transform(cx, cy)
                    assert shape(it["geometry"]).buffer(0.002).contains(Point(lon, lat))
                n += 1
    assert n > 20


def test_naip_bands_and_resolutions(world):
    root = world.out_dir
    items = _items(root, "naip")
    gsds = {(i["properties"]["naip:state"], i["properties"]["naip:year"]): i["properties"]["gsd"] for i in items}
    assert gsds[("ca", "2023")] == 0.6 and gsds[("ca", "2021")] == 1.0
    it = next(i for i in items if i["properties"]["naip:state"] == "az")
    with rasterio.open(root / it["assets"]["image"]["href"]) as src:
        assert src.count == 4 and src.dtypes[0] == "uint8" and src.crs.to_epsg() == 26912
        assert src.overviews(1)  # internal overviews
        a = src.read()
    assert a.reshape(4, -1).std(axis=1).min() > 5  # textured, not flat
    # looks differ per year over the same ground
    y21 = [i for i in items if i["properties"]["naip:state"] == "az" and i["properties"]["naip:year"] == "2021"]
    y23 = [i for i in items if i["properties"]["naip:state"] == "az" and i["properties"]["naip:year"] == "2023"]
    a21, a23 = (_read_window(root / y[0]["assets"]["image"]["href"]) for y in (sorted(y21, key=lambda i: i["id"]),
                                                                              sorted(y23, key=lambda i: i["id"])))
    assert a21.shape == a23.shape and np.abs(a21.astype(int) - a23.astype(int)).mean() > 2


def _read_window(path):
    with rasterio.open(path) as src:
        return src.read(window=((0, 200), (0, 200)))


def test_s2_offset_baselines_and_reprocessing(world):
    root = world.out_dir
    bad = _faulty(root)
    items = _items(root, "sentinel-2-l2a")
    by_take: dict[tuple, list[dict]] = {}
    for it in items:
        p = it["properties"]
        by_take.setdefault((p["s2:mgrs_tile"], p["datetime"]), []).append(it)
    dups = [v for v in by_take.values() if len(v) > 1]
    assert len(dups) >= 3  # one reprocessed datatake per region and date with a reprocessing
    pair_offsets = set()
    for v in dups:
        v = sorted(v, key=lambda i: i["properties"]["s2:processing_baseline"])
        old, new = v[0], v[1]
        assert old["properties"]["s2:datatake_id"].rsplit("_", 1)[0] == new["properties"]["s2:datatake_id"].rsplit("_", 1)[0]
        assert old["properties"]["s2:generation_time"] < new["properties"]["s2:generation_time"]
        if old["assets"]["B04"]["href"] in bad or new["assets"]["B04"]["href"] in bad:
            continue
        a = rasterio.open(root / old["assets"]["B04"]["href"]).read(1).astype(int)
        b = rasterio.open(root / new["assets"]["B04"]["href"]).read(1).astype(int)
        valid = a > 0
        diff = np.unique(b[valid] - a[valid])
        assert len(diff) == 1
        pair_offsets.add(int(diff[0]))
        want = (1000 if I.has_offset(new["properties"]["s2:processing_baseline"]) else 0) - \
               (1000 if I.has_offset(old["properties"]["s2:processing_baseline"]) else 0)
        assert diff[0] == want
    assert pair_offsets == {0, 1000}  # 03.01 -> 05.00 adds the offset, 05.09 -> 05.10 does not
    # without offset there are dark pixels below 1000 DN; with it none
    for it in items:
        href = it["assets"]["B04"]["href"]
        if href in bad:
            continue
        a = rasterio.open(root / href).read(1)
        v = a[a > 0]
        if I.has_offset(it["properties"]["s2:processing_baseline"]):
            assert v.min() >= 1000
        else:
            assert v.min() < 1000


def test_scl_clouds_shadows_and_nodata(world):
    root = world.out_dir
    bad = _faulty(root)
    items = [i for i in _items(root, "sentinel-2-l2a") if not ({a["href"] for a in i["assets"].values()} & bad)]
    covers = [i["properties"]["eo:cloud_cover"] for i in items]
    assert max(covers) > 2.0 and min(covers) < 2.0
    seen_edge = seen_cloud = False
    for it in items:
        with rasterio.open(root / it["assets"]["SCL"]["href"]) as src:
            scl = src.read(1)
            assert src.res == (20.0, 20.0) and src.dtypes[0] == "uint8"
        assert set(np.unique(scl)) <= {0, 3, 4, 5, 6, 8, 9, 10}
        valid = scl > 0
        cloudy = np.isin(scl, (8, 9, 10))
        assert it["properties"]["eo:cloud_cover"] == pytest.approx(100 * cloudy.sum() / valid.sum(), abs=1e-3)
        b02 = rasterio.open(root / it["assets"]["B02"]["href"]).read(1)
        scl10 = np.repeat(np.repeat(scl, 2, 0), 2, 1)
        assert ((b02 == 0) == (scl10 == 0)).all()  # nodata edges: zero reflectance exactly where SCL 0
        if (scl == 0).any():
            seen_edge = True
            assert it["properties"]["s2:nodata_pixel_percentage"] > 5
        if it["properties"]["eo:cloud_cover"] > 5:
            seen_cloud = True
            clear = np.isin(scl10, (4, 5, 6))
            core = scl10 == 9
            assert b02[core].mean() > b02[clear].mean() + 2000  # clouds are bright
            if (scl10 == 3).any():
                assert b02[scl10 == 3].mean() < b02[clear].mean()  # shadows are dark
    assert seen_edge and seen_cloud


def _naip_on_s2_grid(root: Path, state: str, s2_item: dict) -> np.ndarray:
    """Newest 1 m NAIP year of a state, averaged onto the granule's 10 m grid (real reprojection)."""
    from rasterio.warp import Resampling, reproject
    a = s2_item["assets"]["B04"]
    h, w = a["proj:shape"]
    dst = np.zeros((3, h, w), np.float32)
    got = np.zeros((h, w), bool)
    items = [i for i in _items(root, "naip") if i["properties"]["naip:state"] == state.lower()
             and i["properties"]["gsd"] == 1.0]
    year = max(i["properties"]["naip:year"] for i in items)
    for it in sorted((i for i in items if i["properties"]["naip:year"] == year), key=lambda i: i["id"]):
        with rasterio.open(root / it["assets"]["image"]["href"]) as src:
            tmp = np.zeros((3, h, w), np.float32)
            reproject(src.read([1, 2, 3]).astype(np.float32), tmp, src_transform=src.transform, src_crs=src.crs,
                      dst_transform=rasterio.Affine(*a["proj:transform"]),
                      dst_crs=f"EPSG:{s2_item['properties']['proj:epsg']}", resampling=Resampling.average,
                      src_nodata=-1, dst_nodata=0)
            ok = tmp.min(axis=0) > 0
            # only cells the quarter quad covers completely (partial edge cells average too few pixels)
            inner = ok.copy()
            inner[1:-1, 1:-1] &= ok[:-2, 1:-1] & ok[2:, 1:-1] & ok[1:-1, :-2] & ok[1:-1, 2:]
            inner[[0, -1], :] = False
            inner[:, [0, -1]] = False
            take = inner & ~got
            dst[:, take] = tmp[:, take]
            got |= take
    dst[:, ~got] = np.nan
    return dst


def test_hr_lr_consistency(world):
    root = world.out_dir
    bad = _faulty(root)
    s2 = [i for i in _items(root, "sentinel-2-l2a") if i["properties"]["s2:mgrs_tile"].startswith("12")
          and not ({a["href"] for a in i["assets"].values()} & bad) and i["properties"]["eo:cloud_cover"] < 2
          and i["properties"]["s2:nodata_pixel_percentage"] == 0]
    it = sorted(s2, key=lambda i: i["properties"]["eo:cloud_cover"])[0]
    hr = _naip_on_s2_grid(root, "AZ", it)
    scl = rasterio.open(root / it["assets"]["SCL"]["href"]).read(1)
    clear = np.repeat(np.repeat(np.isin(scl, (4, 5, 6)), 2, 0), 2, 1) & ~np.isnan(hr[0])
    assert clear.sum() > 1000
    off = 1000 if I.has_offset(it["properties"]["s2:processing_baseline"]) else 0
    rs = []
    for k, b in enumerate(("B04", "B03", "B02")):
        lr = (rasterio.open(root / it["assets"][b]["href"]).read(1).astype(np.float32) - off) / 10000
        r = np.corrcoef(hr[k][clear], lr[clear])[0, 1]
        rs.append(r)
        # against the same scene turned upside down the agreement collapses: the match is place by
        # place, not in distribution
        both = clear & clear[::-1, ::-1]
        r_flip = np.corrcoef(hr[k][both], lr[::-1, ::-1][both])[0, 1]
        assert r_flip < r - 0.3, (r, r_flip)
    assert min(rs) > 0.8, rs


def test_small_objects_visible_at_1m_not_at_10m(world):
    from rasterio import features as rfeat
    from shapely.geometry import shape
    from gl10m.testbed.classes import CID
    root = world.out_dir
    pool = CID["swimming_pool"]
    meta = json.loads((root / "world.json").read_text())
    checked = 0
    ratios = []
    for reg in meta["regions"]:
        with rasterio.open(root / reg["truth"]) as t:
            truth, ttr = t.read(1), t.transform
        mask = truth == pool
        if not mask.any():
            continue
        naip = [i for i in _items(root, "naip") if i["properties"]["naip:state"] == reg["code"].lower()
                and i["properties"]["gsd"] == 1.0 and i["assets"]["image"]["href"] not in _faulty(root)]
        s2 = [i for i in _items(root, "sentinel-2-l2a") if i["properties"]["s2:mgrs_tile"]
              and i["properties"]["eo:cloud_cover"] < 1 and i["properties"]["s2:nodata_pixel_percentage"] == 0
              and not ({a["href"] for a in i["assets"].values()} & _faulty(root))
              and abs(i["bbox"][0] - reg["bbox"][0]) < 0.1]
        if not naip or not s2:
            continue
        s2it = s2[0]
        off = 1000 if I.has_offset(s2it["properties"]["s2:processing_baseline"]) else 0
        lr = {b: (rasterio.open(root / s2it["assets"][b]["href"]).read(1).astype(float) - off) / 1e4 for b in ("B02", "B04")}
        lr_tr = rasterio.Affine(*s2it["assets"]["B02"]["proj:transform"])
        for geom, _ in rfeat.shapes(mask.astype(np.uint8), mask=mask, transform=ttr):
            g = shape(geom)
            if g.area > 80:  # private pools only (a public pool can fill a 10 m cell)
                continue
            x, y = g.centroid.x, g.centroid.y
            for it in naip:
                with rasterio.open(root / it["assets"]["image"]["href"]) as src:
                    l, b, r, t_ = src.bounds
                    if not (l + 20 < x < r - 20 and b + 20 < y < t_ - 20):
                        continue
                    row, col = src.index(x, y)
                    a = src.read([1, 3], window=((row - 12, row + 13), (col - 12, col + 13))).astype(float)
                    m = rfeat.geometry_mask([g], (25, 25), src.window_transform(((row - 12, row + 13), (col - 12, col + 13))), invert=True)
                    ring = rfeat.geometry_mask([g.buffer(9).difference(g.buffer(3))], (25, 25),
                                               src.window_transform(((row - 12, row + 13), (col - 12, col + 13))), invert=True)
                    bmr = a[1] - a[0]  # blue minus red, NAIP DN
                    hr_contrast = (bmr[m].mean() - np.median(bmr[ring])) / I.DN_PER_REFL
                    break
            else:
                continue
            rr, cc = rasterio.transform.rowcol(lr_tr, x, y)
            lb = lr["B02"] - lr["B04"]
            near = lb[rr - 3:rr + 4, cc - 3:cc + 4]
            lr_contrast = lb[rr - 1:rr + 2, cc - 1:cc + 2].max() - np.median(near)
            assert hr_contrast > 25 / I.DN_PER_REFL  # a pool is plainly visible at 1 m
            ratios.append(lr_contrast / hr_contrast)
            checked += 1
    assert checked >= 2
    assert np.median(ratios) < 0.5, ratios  # ... and diluted into its 10 m cell


def test_faults_present_and_typed(world):
    root = world.out_dir
    faults = {f["kind"]: f for f in json.loads((root / "world.json").read_text())["faults"]}
    assert set(faults) == {"black_wedge", "missing_href", "corrupt_cog"}
    # missing: the item still names the file
    f = faults["missing_href"]
    it = next(i for i in _items(root, f["collection"]) if i["id"] == f["item_id"])
    assert it["assets"][f["asset"]]["href"] == f["href"] and not (root / f["href"]).exists()
    # corrupt: opens (header intact) but its pixels cannot all be read
    f = faults["corrupt_cog"]
    with pytest.raises(rasterio.errors.RasterioError):
        with rasterio.open(root / f["href"]) as src:
            src.read()
    # wedge: a real black (<= 5 in every band) area in one quarter quad, none elsewhere
    f = faults["black_wedge"]
    with rasterio.open(root / f["href"]) as src:
        a = src.read()
    black = (a.max(axis=0) <= 5).mean()
    assert black > 0.1 and black == pytest.approx(f["black_fraction"], abs=0.02)
    other = next(i for i in _items(root, "naip") if i["id"] != f["item_id"]
                 and i["assets"]["image"]["href"] not in _faulty(root))
    with rasterio.open(root / other["assets"]["image"]["href"]) as src:
        assert (src.read().max(axis=0) <= 5).mean() < 0.001


def test_stac_items_read_by_pystac(world):
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    root = world.out_dir
    colls = json.loads((root / "stac" / "collections.json").read_text())["collections"]
    assert sorted(c["id"] for c in colls) == ["naip", "sentinel-2-l2a"]
    for c in colls:
        pystac.Collection.from_dict(c)
    for coll in ("naip", "sentinel-2-l2a"):
        items = _items(root, coll)
        assert [i["id"] for i in items] == sorted(i["id"] for i in items)
        for d in items:
            it = pystac.Item.from_dict(d)
            assert it.collection_id == coll and it.datetime is not None
            assert ProjectionExtension.ext(it).epsg == d["properties"]["proj:epsg"]
            for a in it.assets.values():
                assert not Path(a.href).is_absolute() and "://" not in a.href
            if coll == "naip":
                assert {"naip:state", "naip:year", "gsd", "proj:transform", "proj:shape", "proj:bbox"} <= set(d["properties"])
                assert [b["common_name"] for b in d["assets"]["image"]["eo:bands"]] == ["red", "green", "blue", "nir"]
            else:
                p = d["properties"]
                assert {"eo:cloud_cover", "s2:mgrs_tile", "s2:processing_baseline", "s2:datatake_id",
                        "s2:product_uri"} <= set(p)
                assert p["s2:product_uri"].split("_")[3] == "N" + p["s2:processing_baseline"].replace(".", "")
                assert set(d["assets"]) == {"B02", "B03", "B04", "B08", "SCL"}
                assert d["assets"]["SCL"]["gsd"] == 20.0 and d["assets"]["B02"]["gsd"] == 10.0
    baselines = {i["properties"]["s2:processing_baseline"] for i in _items(root, "sentinel-2-l2a")}
    assert "03.01" in baselines and any(I.has_offset(b) for b in baselines)


def test_rebuild_is_identical_and_atomic(world, tmp_path):
    from gl10m.testbed.build import build

    class Boom(RuntimeError):
        pass

    spec = _write_spec(tmp_path)
    # same spec and seed, one process instead of two: byte-identical files
    again = build(tmp_path / "again", spec, workers=1)

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = digests(world.out_dir), digests(again.out_dir)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []

    # a build that dies half-way leaves the existing world untouched and no temp folder
    before = digests(again.out_dir)

    def explode(msg):
        if msg.startswith("rendered"):
            raise Boom(msg)

    with pytest.raises(Boom):
        build(tmp_path / "again", spec, seed=99, progress=explode, workers=1)
    assert digests(again.out_dir) == before
    assert not list(tmp_path.glob(".again.*"))


@pytest.mark.slow
def test_default_world_budget(tmp_path):
    """The default world (manifests/testbed.yaml): < 300 MB on disk; prints the build time."""
    from gl10m.testbed.build import build, render_preview
    res = build(tmp_path / "world")
    du = sum(p.stat().st_size for p in res.out_dir.rglob("*") if p.is_file())
    print(f"\ndefault world: {du / 1e6:.1f} MB, {res.seconds:.1f} s, {res.n_naip} NAIP items, {res.n_s2} S2 items")
    assert du < 300e6
    png = render_preview(res.out_dir, "CA", tmp_path / "ca.png")
    assert png.stat().st_size > 10000
