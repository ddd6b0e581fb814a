"""STAC items and collections for the testbed, shaped like Planetary Computer's.

Input: the plain-dict descriptions `gl10m.testbed.imagery.render_region` returns. Output: plain
dicts (GeoJSON FeatureCollections of STAC 1.0 items; pystac reads them), with asset hrefs
relative to the world folder (the server rewrites them to its URL).

naip items: id ``{state}_m_{quad}_{quadrant}_{zone}_{res}_{yyyymmdd}``, properties datetime,
gsd, naip:state, naip:year, proj:epsg/shape/transform/bbox/centroid; asset ``image`` (4 bands).
sentinel-2-l2a items: id ``S2B_MSIL2A_{sensing}_R{orbit}_T{tile}_{processing}``; properties
datetime, platform, eo:cloud_cover, s2:mgrs_tile, s2:processing_baseline, s2:product_uri,
s2:datatake_id, s2:granule_id, s2:nodata_pixel_percentage, sat:relative_orbit, proj:epsg;
assets B02/B03/B04/B08 (10 m) and SCL (20 m) with their own proj:shape/transform/bbox and gsd.
A reprocessed granule shares its datatake id with the original and has a newer baseline and
processing time.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from gl10m.io import atomic_write_text

STAC_VERSION = "1.0.0"
EXT_PROJ = "https://stac-extensions.github.io/projection/v1.1.0/schema.json"
EXT_EO = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
EXT_RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
EXT_SAT = "https://stac-extensions.github.io/sat/v1.0.0/schema.json"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"

NAIP_BANDS = [
    {"name": "Red", "common_name": "red", "description": "visible red"},
    {"name": "Green", "common_name": "green", "description": "visible green"},
    {"name": "Blue", "common_name": "blue", "description": "visible blue"},
    {"name": "NIR", "common_name": "nir", "description": "near-infrared"},
]
S2_BANDS = {
    "B02": {"name": "B02", "common_name": "blue", "description": "Band 2 - Blue - 10m", "center_wavelength": 0.49,
            "full_width_half_max": 0.098},
    "B03": {"name": "B03", "common_name": "green", "description": "Band 3 - Green - 10m", "center_wavelength": 0.56,
            "full_width_half_max": 0.045},
    "B04": {"name": "B04", "common_name": "red", "description": "Band 4 - Red - 10m", "center_wavelength": 0.665,
            "full_width_half_max": 0.038},
    "B08": {"name": "B08", "common_name": "nir", "description": "Band 8 - NIR - 10m", "center_wavelength": 0.842,
            "full_width_half_max": 0.145},
}
S2_TITLES = {"B02": "Band 2 - Blue - 10m", "B03": "Band 3 - Green - 10m", "B04": "Band 4 - Red - 10m",
             "B08": "Band 8 - NIR - 10m",
             "SCL": "Scene classfication map (SCL)"}


def _bbox(geom: dict) -> list[float]:
    import shapely.geometry
    return [round(v, 7) for v in shapely.geometry.shape(geom).bounds]


def _centroid(geom: dict) -> dict:
    import shapely.geometry
    c = shapely.geometry.shape(geom).centroid
    return {"lat": round(c.y, 5), "lon": round(c.x, 5)}


def _r(v: list[float]) -> list[float]:
    return [round(float(x), 6) for x in v]


def naip_item(p: dict) -> dict:
    """A Planetary-Computer-shaped `naip` item from one quarter-quad description."""
    date = dt.date.fromisoformat(p["date"])
    return {
        "type": "Feature", "stac_version": STAC_VERSION, "stac_extensions": [EXT_EO, EXT_PROJ],
        "id": p["id"], "collection": "naip",
        "geometry": p["geometry"], "bbox": _bbox(p["geometry"]),
        "properties": {
            "datetime": f"{date.isoformat()}T16:00:00Z", "gsd": p["gsd"],
            "naip:state": p["state"].lower(), "naip:year": str(p["year"]),
            "proj:epsg": p["epsg"], "proj:shape": p["shape"], "proj:transform": _r(p["transform"]),
            "proj:bbox": _r(p["bbox_xy"]), "proj:centroid": _centroid(p["geometry"]),
            "providers": [{"name": "USDA Farm Service Agency (testbed)", "roles": ["producer", "licensor"]}],
        },
        "links": [{"rel": "collection", "href": "./collections.json", "type": "application/json"}],
        "assets": {
            "image": {"href": p["href"], "type": COG, "roles": ["data"], "title": "RGBIR COG tile",
                      "eo:bands": NAIP_BANDS},
        },
    }


def s2_ids(p: dict) -> dict[str, str]:
    """id, product_uri, datatake_id and granule_id of a granule description (ESA naming)."""
    sense = p["datetime"][:19].replace("-", "").replace(":", "")  # YYYYMMDDTHHMMSS
    sat = "S2A" if p["platform"].endswith("2A") else "S2B"
    orbit = f"R{p['relative_orbit']:03d}"
    base_n = "N" + p["baseline"].replace(".", "")
    proc = p["processed"]
    abs_orbit = 30000 + (dt.date.fromisoformat(p["datetime"][:10]).toordinal() - 738000) * 14 + p["relative_orbit"]
    return {
        "id": f"{sat}_MSIL2A_{sense}_{orbit}_T{p['mgrs']}_{proc}",
        "product_uri": f"{sat}_MSIL2A_{sense}_{base_n}_{orbit}_T{p['mgrs']}_{proc}.SAFE",
        # as ESA writes it: the acquisition (same for a reprocessing) plus the baseline
        "datatake_id": f"G{sat}_{sense}_{abs_orbit:06d}_N{p['baseline']}",
        "granule_id": f"{sat}_OPER_MSI_L2A_TL_TESTBED_{proc}_A{abs_orbit:06d}_T{p['mgrs']}_{base_n}",
    }


def s2_item(p: dict) -> dict:
    """A Planetary-Computer-shaped `sentinel-2-l2a` item from one granule description."""
    ids = s2_ids(p)
    assets = {}
    for b, a in sorted(p["assets"].items()):
        asset = {"href": a["href"], "type": COG, "roles": ["data"], "title": S2_TITLES.get(b, b), "gsd": a["gsd"],
                 "proj:shape": a["shape"], "proj:transform": _r(a["transform"]), "proj:bbox": _r(a["bbox_xy"])}
        if b in S2_BANDS:
            asset["eo:bands"] = [S2_BANDS[b]]
            # like Planetary Computer: no offset here; it follows from s2:processing_baseline
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "bits_per_sample": 15,
                                      "spatial_resolution": a["gsd"], "scale": 0.0001}]
        else:
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint8", "spatial_resolution": a["gsd"]}]
        assets[b] = asset
    return {
        "type": "Feature", "stac_version": STAC_VERSION, "stac_extensions": [EXT_EO, EXT_SAT, EXT_PROJ, EXT_RASTER],
        "id": ids["id"], "collection": "sentinel-2-l2a",
        "geometry": p["geometry"], "bbox": _bbox(p["geometry"]),
        "properties": {
            "datetime": p["datetime"], "platform": p["platform"], "constellation": "Sentinel 2",
            "instruments": ["msi"], "eo:cloud_cover": p["cloud_pct"],
            "s2:mgrs_tile": p["mgrs"], "s2:processing_baseline": p["baseline"],
            "s2:product_type": "S2MSI2A", "s2:product_uri": ids["product_uri"],
            "s2:datatake_id": ids["datatake_id"], "s2:granule_id": ids["granule_id"],
            "s2:generation_time": dt.datetime.strptime(p["processed"], "%Y%m%dT%H%M%S").strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
            "s2:nodata_pixel_percentage": p["nodata_pct"],
            "sat:relative_orbit": p["relative_orbit"], "sat:orbit_state": "descending",
            "proj:epsg": p["epsg"],
        },
        "links": [{"rel": "collection", "href": "./collections.json", "type": "application/json"}],
        "assets": assets,
    }


def feature_collection(items: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": sorted(items, key=lambda i: i["id"])}


def collections(naip_items: list[dict], s2_items: list[dict]) -> list[dict]:
    """The two STAC collections, with extents over the items."""
    def extent(items):
        if not items:
            return {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}}
        bb = [i["bbox"] for i in items]
        times = sorted(i["properties"]["datetime"] for i in items)
        return {"spatial": {"bbox": [[min(b[0] for b in bb), min(b[1] for b in bb), max(b[2] for b in bb),
                                       max(b[3] for b in bb)]]},
                "temporal": {"interval": [[times[0], times[-1]]]}}

    common = {"type": "Collection", "stac_version": STAC_VERSION, "license": "proprietary", "links": []}
    return [
        {**common, "id": "naip", "title": "NAIP (gl10m testbed)",
         "description": "NAIP-like 4-band quarter-quad COGs rendered from the testbed world.",
         "stac_extensions": [EXT_EO, EXT_PROJ], "extent": extent(naip_items),
         "item_assets": {"image": {"type": COG, "roles": ["data"], "eo:bands": NAIP_BANDS}},
         "summaries": {"gsd": sorted({i["properties"]["gsd"] for i in naip_items}),
                       "naip:state": sorted({i["properties"]["naip:state"] for i in naip_items}),
                       "naip:year": sorted({i["properties"]["naip:year"] for i in naip_items})}},
        {**common, "id": "sentinel-2-l2a", "title": "Sentinel-2 Level-2A (gl10m testbed)",
         "description": "Sentinel-2-L2A-like granule COGs rendered from the testbed world (not harmonised: "
                        "baselines >= 04.00 carry the +1000 offset).",
         "stac_extensions": [EXT_EO, EXT_SAT, EXT_PROJ, EXT_RASTER], "extent": extent(s2_items),
         "item_assets": {b: {"type": COG, "roles": ["data"], "title": S2_TITLES[b]} for b in S2_TITLES},
         "summaries": {"platform": sorted({i["properties"]["platform"] for i in s2_items}),
                       "s2:processing_baseline": sorted({i["properties"]["s2:processing_baseline"] for i in s2_items})}},
    ]


def build_items(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """(naip items, sentinel-2 items) from render_region results, each sorted by id."""
    naip = [naip_item(p) for r in results for p in r["naip"]]
    s2 = [s2_item(p) for r in results for p in r["s2"]]
    return sorted(naip, key=lambda i: i["id"]), sorted(s2, key=lambda i: i["id"])


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=False) + "\n"


def write_stac(world_dir: str | Path, naip: list[dict], s2: list[dict]) -> dict[str, Path]:
    """Write DIR/stac/{naip,sentinel-2-l2a,collections}.json atomically; return the paths."""
    d = Path(world_dir) / "stac"
    out = {"naip": d / "naip.json", "sentinel-2-l2a": d / "sentinel-2-l2a.json", "collections": d / "collections.json"}
    atomic_write_text(out["naip"], dumps(feature_collection(naip)))
    atomic_write_text(out["sentinel-2-l2a"], dumps(feature_collection(s2)))
    atomic_write_text(out["collections"], dumps({"collections": collections(naip, s2)}))
    return out
