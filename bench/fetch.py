"""Benchmark: fetch_scene scenes/s against a served world vs the bare window reads of the same COGs.

    .venv/bin/python bench/fetch.py [--scenes 6] [--workers 1,2] [--keep DIR | --world BUILT_TESTBED] [--json PATH]

The world is served like the testbed (``gl10m.testbed.serve.serve``: the Range HTTP server and
the rustac STAC API on 127.0.0.1); every read goes through ``/vsicurl/`` over loopback. It is a
small world written here (two overlapping NAIP quarter-quads, 1 m, 4-band uint8, NAD83 UTM, and
three Sentinel-2 dates with B02/B03/B04/SCL, +1000 offset, cloud blocks), with STAC items laid
out as a testbed world folder; plan rows are built from the items the STAC API returns.

For 1 and 2 worker processes it prints, measured in the same run:
  * bare: open each asset of every scene and read the window over the footprint (no warp,
    no composite, no encode) -> scenes/s;
  * fetch: ``fetch_scene`` per scene (reads + warps + composite + mosaic + QC + JPEG/PNG +
    atomic staging) -> scenes/s;
  * the ratio fetch/bare time per scene (how much the step costs beyond reading its inputs).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _results import add_json_arg, record, write_json

SIZE = 0.024
ORIGIN = (-117.0, 34.0)  # SW corner of the covered area


def _truth(x, y):
    r = 0.04 + 0.18 * (0.5 + 0.5 * np.sin(x / 170.0) * np.cos(y / 230.0))
    g = 0.05 + 0.15 * (0.5 + 0.5 * np.sin((x + y) / 260.0))
    b = 0.03 + 0.12 * (0.5 + 0.5 * np.cos((x - 0.5 * y) / 200.0))
    return np.stack([r, g, b]).astype(np.float32)


def _cog(path: Path, data, epsg, west, north, res, nodata=None):
    import rasterio
    from rasterio.transform import from_origin

    from gl10m.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    data = data[None] if data.ndim == 2 else data
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                           dtype=data.dtype, crs=f"EPSG:{epsg}", transform=from_origin(west, north, res, res),
                           nodata=nodata, blocksize=512, compress="deflate") as dst:
            dst.write(data)


def _bbox_geom(epsg, x0, y0, x1, y1):
    from pyproj import Transformer

    tr = Transformer.from_crs(epsg, 4326, always_xy=True)
    lon, lat = tr.transform([x0, x1, x1, x0, x0], [y1, y1, y0, y0, y1])
    bbox = [min(lon), min(lat), max(lon), max(lat)]
    return {"type": "Polygon", "coordinates": [[[a, b] for a, b in zip(lon, lat)]]}, bbox


def build_world(root: Path, cols: int, rows: int) -> Path:
    """Two NAIP QQs + three S2 dates covering `cols` x `rows` footprints; STAC items in stac/."""
    from pyproj import Transformer

    w, s = ORIGIN
    e, n = w + cols * SIZE, s + rows * SIZE
    items = []
    tr = Transformer.from_crs(4326, 26911, always_xy=True)
    xs, ys = tr.transform([w, e, w, e], [s, s, n, n])
    x0, y0, x1, y1 = math.floor(min(xs)) - 30, math.floor(min(ys)) - 30, math.ceil(max(xs)) + 30, math.ceil(max(ys)) + 30
    mid = (x0 + x1) // 2
    for name, a, b in (("qq_w", x0, mid + 150), ("qq_e", mid - 150, x1)):
        wpx, hpx = b - a, y1 - y0
        X, Y = np.meshgrid(a + np.arange(wpx) + 0.5, y1 - np.arange(hpx) - 0.5)
        rgb = np.clip(np.floor(_truth(X, Y) / 0.3 * 255 + 0.5), 1, 255).astype(np.uint8)
        data = np.concatenate([rgb, np.full((1, hpx, wpx), 90, np.uint8)])
        rel = f"naip/ca/2023/{name}.tif"
        _cog(root / rel, data, 26911, a, y1, 1.0)
        geom, bbox = _bbox_geom(26911, a, y0, b, y1)
        items.append({"type": "Feature", "stac_version": "1.0.0", "id": f"ca_m_{name}_20230612", "collection": "naip",
                      "geometry": geom, "bbox": bbox, "links": [],
                      "properties": {"datetime": "2023-06-12T16:00:00Z", "naip:state": "ca", "naip:year": "2023",
                                     "gsd": 1.0, "proj:code": "EPSG:26911"},
                      "assets": {"image": {"href": rel, "type": "image/tiff; application=geotiff"}}})
    tr = Transformer.from_crs(4326, 32611, always_xy=True)
    xs, ys = tr.transform([w, e, w, e], [s, s, n, n])
    x0, y0 = math.floor(min(xs) / 20) * 20 - 600, math.floor(min(ys) / 20) * 20 - 600
    x1, y1 = math.ceil(max(xs) / 20) * 20 + 600, math.ceil(max(ys) / 20) * 20 + 600
    w10, h10 = (x1 - x0) // 10, (y1 - y0) // 10
    X, Y = np.meshgrid(x0 + (np.arange(w10) + 0.5) * 10, y1 - (np.arange(h10) + 0.5) * 10)
    for k, date in enumerate(("2023-05-01", "2023-06-01", "2023-07-01")):
        dn = (np.floor(_truth(X, Y) * 10000 + 0.5) + 1000).astype(np.uint16)
        scl = np.full((h10 // 2, w10 // 2), 4, np.uint8)
        if k:
            dn[:, 100 * k:100 * k + 60, 80:160] = 9000
            scl[50 * k:50 * k + 30, 40:80] = 9
        ymd = date.replace("-", "")
        assets = {}
        for i, band in enumerate(("B04", "B03", "B02")):
            rel = f"s2/11SLT/{ymd}/{band}.tif"
            _cog(root / rel, dn[i], 32611, x0, y1, 10.0, nodata=0)
            assets[band] = {"href": rel, "type": "image/tiff; application=geotiff"}
        rel = f"s2/11SLT/{ymd}/SCL.tif"
        _cog(root / rel, scl, 32611, x0, y1, 20.0, nodata=0)
        assets["SCL"] = {"href": rel, "type": "image/tiff; application=geotiff"}
        geom, bbox = _bbox_geom(32611, x0, y0, x1, y1)
        items.append({"type": "Feature", "stac_version": "1.0.0", "id": f"S2A_MSIL2A_{ymd}T183919_R070_T11SLT_{ymd}T230000",
                      "collection": "sentinel-2-l2a", "geometry": geom, "bbox": bbox, "links": [],
                      "properties": {"datetime": f"{date}T18:39:19Z", "eo:cloud_cover": 0.5, "s2:mgrs_tile": "11SLT",
                                     "s2:processing_baseline": "05.09", "proj:code": "EPSG:32611"},
                      "assets": assets})
    stac = root / "stac"
    stac.mkdir(parents=True, exist_ok=True)
    coll = lambda c: {"type": "Collection", "stac_version": "1.0.0", "id": c, "description": c, "license": "other",  # noqa: E731
                      "links": [], "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                              "temporal": {"interval": [["2010-01-01T00:00:00Z", None]]}}}
    (stac / "collections.json").write_text(json.dumps({"collections": [coll("naip"), coll("sentinel-2-l2a")]}))
    (stac / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return root


def plan_rows(stac_url: str, cols: int, rows: int, n: int) -> list[dict]:
    """Plan rows for `n` footprints, items from the served STAC API (hrefs absolute, unsigned)."""
    import requests

    feats = requests.get(f"{stac_url}/search", params={"limit": 100}, timeout=30).json()["features"]
    naip = sorted((f for f in feats if f["collection"] == "naip"), key=lambda f: f["id"])
    s2 = sorted((f for f in feats if f["collection"] == "sentinel-2-l2a"), key=lambda f: f["properties"]["datetime"])
    naip_items = [{"id": f["id"], "href": f["assets"]["image"]["href"], "datetime": f["properties"]["datetime"],
                   "epsg": 26911, "gsd": 1.0, "state": "CA", "year": 2023, "bbox": f["bbox"]} for f in naip]
    s2_items = [{"id": f["id"], "datetime": f["properties"]["datetime"], "epsg": 32611, "mgrs_tile": "11SLT",
                 "baseline": f["properties"]["s2:processing_baseline"], "cloud_cover": 0.5,
                 "hrefs": {b: f["assets"][b]["href"] for b in ("B02", "B03", "B04", "SCL")}, "bbox": f["bbox"]}
                for f in s2]
    out = []
    for i in range(n):
        c, r = i % cols, (i // cols) % rows
        jitter = (i // (cols * rows)) * 0.001
        w, s = ORIGIN[0] + c * SIZE + jitter, ORIGIN[1] + r * SIZE + jitter
        # a jittered footprint in the last column (row) is moved west (south) to stay inside the
        # world; only along that axis: moving both put CA-000005 111 m south of the NAIP cover
        # (margin 30 m) and fetch rejected it as hr_black
        if jitter and c == cols - 1:
            w -= 2 * jitter
        if jitter and r == rows - 1:
            s -= 2 * jitter
        key = f"CA-{i:06d}"
        out.append({"key": key, "scene_id": f"{i:06d}", "state": "CA", "split": "train",
                    "west": w, "south": s, "east": w + SIZE, "north": s + SIZE, "lon": w + SIZE / 2,
                    "lat": s + SIZE / 2, "concepts": [3, 29], "tile_idx": [0], "tile_concept": [3],
                    "tile_frac": [0.5], "naip_year": 2023, "naip_date": "2023-06-12",
                    "naip_items": json.dumps(naip_items), "s2_window": "aligned", "s2_start": "2023-01-01",
                    "s2_end": "2023-12-31", "s2_items": json.dumps(s2_items), "provider": "stac", "plan_hash": "bench"})
    return out


# -- the two tasks (module-level: picklable for worker processes) --------------------------------
def bare_read(row: dict) -> int:
    """Open every asset of the scene over HTTP and read its window over the footprint."""
    import rasterio

    from gl10m import compose
    from gl10m.sources.gdalenv import gdal_http_env

    grid = compose.footprint_grid((row["west"], row["south"], row["east"], row["north"]), 268)
    hrefs = [it["href"] for it in json.loads(row["naip_items"])]
    hrefs += [h for it in json.loads(row["s2_items"]) for h in it["hrefs"].values()]
    px = 0
    with rasterio.Env(**gdal_http_env()):
        for h in hrefs:
            try:
                with rasterio.open(h) as ds:
                    win = compose.source_window(ds, grid.bounds)
                    idx = [1, 2, 3] if ds.count >= 3 else 1
                    px += ds.read(idx, window=win).size if win is not None else 0
            except rasterio.errors.RasterioIOError:
                continue  # a testbed fault (missing or truncated COG): fetch rejects it too
    return px


def do_fetch(args: tuple) -> str:
    from gl10m import fetch, profile

    row, out, *prof = args
    return fetch.fetch_scene(row, profile.load(prof[0] if prof else None), out).label


def testbed_rows(world: Path, stac_url: str, wd: Path, n: int) -> list[dict]:
    """Plan rows of a built testbed world, made by the real index, catalog and plan stages."""
    from gl10m import plan as planmod
    from gl10m import profile
    from gl10m.pipelines import download, index

    p = profile.load(world / "profile.yaml")
    index.run_index(p, wd, quiet=True)
    download.run_download(p, wd, stages=("catalog", "plan"), stac_url=stac_url, quiet=True)
    rows = []
    for r in sorted(p.regions):
        if planmod.plan_path(wd, r).exists():
            rows += planmod.read_plan(planmod.plan_path(wd, r)).drop(columns="geometry").to_dict("records")
    return rows[:n]


def timed(fn, items, workers: int) -> float:
    if workers == 1:
        t = time.perf_counter()
        res = [fn(x) for x in items]
    else:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(fn, items[:workers]))  # warm the workers (imports), not timed
            t = time.perf_counter()
            res = list(ex.map(fn, items))
    dt = time.perf_counter() - t
    if fn is do_fetch and any(r != "ok" for r in res) and len(items[0]) == 2:
        raise SystemExit(f"bench: some scenes did not come out ok: {res}")
    return dt


def _records(w: int, n: int, tb: float, tf: float, first: dict) -> list[dict]:
    """JSON records of one worker count: fetch vs bare reads, and vs the first worker count."""
    out = [record(f"fetch_scene, {w} worker(s)", tf / n, "s/scene", f"bare window reads, {w} worker(s)", tb / n,
                  tf / tb, False, "fetch / bare-read time per scene: the cost of the step beyond reading its inputs")]
    if first and first["w"] != w:
        out.append(record(f"fetch_scene, {w} worker(s)", n / tf, "scenes/s", f"fetch_scene, {first['w']} worker(s)",
                          first["sps"], None, True, f"scenes/s with {w} workers / with {first['w']}: parallel speed-up"))
    first.setdefault("w", w)
    first.setdefault("sps", n / tf)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--keep", type=Path, default=None, help="build the world here and keep it")
    ap.add_argument("--world", type=Path, default=None,
                    help="a world built by `gl10m testbed build`: plan rows come from the real index/catalog/plan "
                         "stages, and scenes hit its deliberate faults like a real run (rejections are timed too)")
    add_json_arg(ap)
    a = ap.parse_args(argv)
    if a.world:
        return main_world(a)
    from gl10m.testbed.serve import serve

    cols, rows = 2, 2
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        world = a.keep or Path(tmp) / "world"
        t = time.perf_counter()
        if not (world / "stac" / "items.json").exists():
            build_world(world, cols, rows)
        print(f"world: {world} ({time.perf_counter() - t:.1f} s to build)")
        with serve(world) as servers:
            scenes = plan_rows(servers.stac_url, cols, rows, a.scenes)
            bare_read(scenes[0])  # warm this process
            do_fetch((scenes[0], str(Path(tmp) / "warm")))
            print(f"{a.scenes} scenes, each 2 NAIP QQs + 3 S2 dates x 4 assets over HTTP (127.0.0.1)")
            print(f"{'workers':>7} {'bare scenes/s':>14} {'fetch scenes/s':>15} {'fetch/bare time':>16}")
            recs, first = [], {}
            for w in (int(x) for x in a.workers.split(",")):
                tb = timed(bare_read, scenes, w)
                tf = timed(do_fetch, [(r, str(Path(tmp) / f"W{w}")) for r in scenes], w)
                print(f"{w:>7} {a.scenes / tb:>14.2f} {a.scenes / tf:>15.2f} {tf / tb:>15.1f}x")
                recs += _records(w, a.scenes, tb, tf, first)
    write_json(a.json, "fetch", recs, mode="synthetic world", scenes=a.scenes, workers=a.workers)
    return 0


def main_world(a) -> int:
    from gl10m.testbed.serve import serve

    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp, serve(a.world) as servers:
        prof = str(a.world / "profile.yaml")
        scenes = testbed_rows(a.world, servers.stac_url, Path(tmp) / "plan", a.scenes)
        bare_read(scenes[0])
        do_fetch((scenes[0], str(Path(tmp) / "warm"), prof))
        print(f"testbed world {a.world}: {len(scenes)} planned scenes over HTTP (127.0.0.1)")
        print(f"{'workers':>7} {'bare scenes/s':>14} {'fetch scenes/s':>15} {'fetch/bare time':>16}")
        recs, first = [], {}
        for w in (int(x) for x in a.workers.split(",")):
            tb = timed(bare_read, scenes, w)
            tf = timed(do_fetch, [(r, str(Path(tmp) / f"W{w}"), prof) for r in scenes], w)
            print(f"{w:>7} {len(scenes) / tb:>14.2f} {len(scenes) / tf:>15.2f} {tf / tb:>15.1f}x")
            recs += _records(w, len(scenes), tb, tf, first)
    write_json(a.json, "fetch", recs, mode=f"testbed world {a.world}", scenes=len(scenes), workers=a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
