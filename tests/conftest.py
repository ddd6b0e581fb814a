"""Shared pytest fixtures.

`testbed_server` (session scope) serves a world folder with `gl10m.testbed.serve.serve` and
yields the running `Servers`. The world comes from `_world_for_tests`: for now a tiny world made
here (real COGs written with tests.fixtures.cogs, STAC items laid out as `gl10m testbed build` writes
them); switching to the real builder means changing only that function.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from tests.fixtures.cogs import write_cog

# -- the tiny world ---------------------------------------------------------------------------
# (id, state, year, date, utm epsg, west, north) of NAIP-like quarter quads, 1 m, 4-band uint8.
TINY_NAIP = [
    ("ca_m_3411801_ne_11_060_20230612", "CA", 2023, "2023-06-12", 26911, 400000.0, 3763000.0),
    ("ca_m_3411801_nw_11_060_20230612", "CA", 2023, "2023-06-12", 26911, 400200.0, 3763000.0),
    ("ca_m_3411801_ne_11_060_20210704", "CA", 2021, "2021-07-04", 26911, 400050.0, 3762950.0),
]
# (mgrs, date, utm epsg, west, north, cloud %) of Sentinel-2-L2A-like granules.
TINY_S2 = [
    ("11SLT", "2023-06-10", 32611, 399500.0, 3763500.0, 3.5),
    ("11SLT", "2023-06-20", 32611, 399500.0, 3763500.0, 41.0),
    ("11SLT", "2023-08-09", 32611, 399500.0, 3763500.0, 0.2),
]
NAIP_PX, S2_PX = 320, 64  # NAIP 320x320 at 1 m; S2 64x64 at 10 m (SCL 32x32 at 20 m)
_COG = {"blocksize": 128, "overview_resampling": "nearest"}


def _footprint(epsg: int, west: float, north: float, width_m: float, height_m: float):
    from pyproj import Transformer

    tr = Transformer.from_crs(epsg, 4326, always_xy=True)
    xs = [west, west + width_m, west + width_m, west, west]
    ys = [north, north, north - height_m, north - height_m, north]
    lon, lat = tr.transform(xs, ys)
    ring = [[round(x, 7), round(y, 7)] for x, y in zip(lon, lat)]
    bbox = [min(lon), min(lat), max(lon), max(lat)]
    return {"type": "Polygon", "coordinates": [ring]}, [round(v, 7) for v in bbox]


def _collection(cid: str, desc: str) -> dict:
    return {"type": "Collection", "stac_version": "1.0.0", "id": cid, "description": desc,
            "license": "proprietary", "links": [],
            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                       "temporal": {"interval": [["2010-01-01T00:00:00Z", None]]}}}


def make_tiny_world(root: Path) -> Path:
    """Write a tiny but real world into `root` (deterministic) and return it."""
    import numpy as np

    rng = np.random.default_rng(20231)
    naip_items, s2_items = [], []
    for iid, state, year, date, epsg, west, north in TINY_NAIP:
        rel = f"naip/{state}/{year}/{iid[3:]}.tif"
        data = rng.integers(1, 255, size=(4, NAIP_PX, NAIP_PX), dtype=np.uint8)
        write_cog(root / rel, data, epsg, west, north, 1.0, **_COG)
        geom, bbox = _footprint(epsg, west, north, NAIP_PX, NAIP_PX)
        naip_items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": "naip",
            "geometry": geom, "bbox": bbox, "links": [{"rel": "self", "href": f"stac/{iid}.json"}],
            "properties": {"datetime": f"{date}T16:00:00Z", "naip:state": state.lower(), "naip:year": str(year),
                           "gsd": 1.0, "proj:code": f"EPSG:{epsg}", "proj:shape": [NAIP_PX, NAIP_PX]},
            "assets": {"image": {"href": rel, "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                                 "roles": ["data"], "eo:bands": [{"name": b} for b in ("Red", "Green", "Blue", "NIR")]}},
        })
    for mgrs, date, epsg, west, north, cloud in TINY_S2:
        ymd = date.replace("-", "")
        iid = f"S2B_MSIL2A_{ymd}T183919_R070_T{mgrs}_{ymd}T230000"
        assets = {}
        for band in ("B02", "B03", "B04", "SCL"):
            rel = f"s2/{mgrs}/{ymd}/{band}.tif"
            if band == "SCL":
                data = rng.integers(0, 12, size=(S2_PX // 2, S2_PX // 2), dtype=np.uint8)
                write_cog(root / rel, data, epsg, west, north, 20.0, nodata=0, **_COG)
            else:
                data = rng.integers(1000, 4000, size=(S2_PX, S2_PX), dtype=np.uint16)
                write_cog(root / rel, data, epsg, west, north, 10.0, nodata=0, **_COG)
            assets[band] = {"href": rel, "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                            "roles": ["data"], "gsd": 20.0 if band == "SCL" else 10.0}
        geom, bbox = _footprint(epsg, west, north, S2_PX * 10.0, S2_PX * 10.0)
        s2_items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": "sentinel-2-l2a",
            "geometry": geom, "bbox": bbox, "links": [],
            "properties": {"datetime": f"{date}T18:39:19.024000Z", "platform": "Sentinel-2B",
                           "eo:cloud_cover": cloud, "s2:mgrs_tile": mgrs, "s2:processing_baseline": "05.09",
                           "proj:code": f"EPSG:{epsg}"},
            "assets": assets,
        })
    stac = root / "stac"
    stac.mkdir(parents=True, exist_ok=True)
    (stac / "naip.json").write_text(json.dumps({"type": "FeatureCollection", "features": naip_items}))
    (stac / "sentinel-2-l2a.json").write_text(json.dumps({"type": "FeatureCollection", "features": s2_items}))
    (stac / "collections.json").write_text(json.dumps({"collections": [
        _collection("naip", "NAIP-like quarter quads (testbed)"),
        _collection("sentinel-2-l2a", "Sentinel-2 L2A-like granules (testbed)")]}))
    return root


def _world_for_tests(tmp_path_factory) -> Path:
    """The world the served fixtures use. Switch to the real builder here when it exists,
    e.g. ``gl10m.testbed.build.build(spec, out)``."""
    return make_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def testbed_world(tmp_path_factory) -> Path:
    return _world_for_tests(tmp_path_factory)


@pytest.fixture(scope="session")
def testbed_server(testbed_world):
    """A running STAC API + Range HTTP server over the test world (stopped at session end)."""
    pytest.importorskip("rustac", reason="rustac is not installed (pip install 'gl10m[test]')")
    from gl10m.testbed.serve import serve

    with serve(testbed_world) as servers:
        yield servers


# -- a small real world (gl10m.testbed.build) for the end-to-end pipeline tests ----------------
E2E_REGIONS = ("TX", "WA", "AZ")  # train, val, test of the default split


@pytest.fixture(scope="session")
def built_world(tmp_path_factory) -> Path:
    """A real testbed world of three regions (one per split), built once per session: the
    default spec with fewer regions and the three deliberate faults in the val/test regions."""
    import yaml

    from gl10m.testbed import build as tb
    from gl10m.testbed.spec import DEFAULT_SPEC

    root = tmp_path_factory.mktemp("e2e")
    spec = yaml.safe_load(Path(DEFAULT_SPEC).read_text())
    spec["regions"] = {k: v for k, v in spec["regions"].items() if k in E2E_REGIONS}
    spec["region_size_deg"] = 0.048
    spec["profile"] = str((Path(DEFAULT_SPEC).parent / spec["profile"]).resolve())
    spec["imagery"]["faults"] = [
        {"kind": "black_wedge", "state": "AZ", "collection": "naip"},
        {"kind": "missing_href", "state": "WA", "collection": "naip"},
        {"kind": "corrupt_cog", "state": "WA", "collection": "naip"},
    ]
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    tb.build(root / "world", spec_path=path)
    return root / "world"


@pytest.fixture(scope="session")
def built_server(built_world):
    pytest.importorskip("rustac", reason="rustac is not installed (pip install 'gl10m[test]')")
    from gl10m.testbed.serve import serve

    with serve(built_world) as servers:
        yield servers
