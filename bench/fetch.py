"""Benchmark: fetch_scene scenes/s against a served world vs the bare window reads of the same COGs.

    .venv/bin/python bench/fetch.py [--scenes 6] [--workers 1,2] [--io-threads N] [--keep DIR | --world BUILT_TESTBED]
                                    [--no-ee] [--json PATH]

The world is served like the testbed (``gl10m.testbed.serve.serve``: the Range HTTP server and
the rustac STAC API on 127.0.0.1); every read goes through ``/vsicurl/`` over loopback. It is a
small world written here (two overlapping NAIP quarter-quads, 1 m, 4-band uint8, NAD83 UTM, and
three Sentinel-2 dates with B02/B03/B04/SCL, +1000 offset, cloud blocks), with STAC items laid
out as a testbed world folder; plan rows are built from the items the STAC API returns.

For 1 and 2 worker processes it prints, measured in the same run:
  * bare: open each asset of every scene and read the window over the footprint (no warp,
    no composite, no encode) -> scenes/s;
  * fetch: ``fetch_scene`` per scene (reads + warps + composite + mosaic + QC + JPEG/PNG +
    atomic staging) -> scenes/s, and the peak RSS of a worker process;
  * the ratio fetch/bare time per scene (how much the step costs beyond reading its inputs);
  * CPU seconds per scene: of the bare reads and of fetch in their workers (I/O threads
    included), of the servers (the Range HTTP server and the STAC API, child processes of this
    one) during fetch, and the cores the fetch run kept busy on average ((workers + servers) CPU
    / wall): on a machine with as many cores as workers, that bounds the parallel speed-up.

Then what bounds the 2-worker speed-up: fetch's speed-up beside the bare reads' own, and the
ceiling the CPU puts on it (the machine's cores / the CPU seconds a scene takes with 2 workers,
servers included, against the 1-worker scenes/s), and how much more CPU the same single-threaded
step (the NAIP warp of a fixed window) takes with 2 processes at once than with one alone (shared
cores and caches: what the machine takes back when all its cores are busy).

Then where the time of ``fetch_scene`` goes (seconds per scene per part, from
:class:`gl10m.sources.base.Timings`: reads (the time the composing thread waited for a read not
yet in: each window is composed as soon as it and those before it are in, so the rest of the
reading hides behind the composing), S2 warps + SCL masking, median + stretch, NAIP warp, NAIP
mosaic, tiling, QC, JPEG/PNG encode, staging writes; "other" is the rest): wall seconds with 1
worker, and the composing thread's CPU seconds per part with each worker count (the same
single-threaded code: CPU seconds that rise with more workers are the machine's contention,
cores and caches shared with the other workers, their I/O threads and the servers, not more
work), with the I/O threads' CPU (the reads' decoding) on a line of its own. Then the LR/HR
agreement of the staged samples (per sample, the mean over R, G, B of the correlation between
the 10 x 10 block means of the HR mosaic and the LR image), and the same for the Earth Engine
path through the testbed's stand-in (``gl10m.testbed.eeserver``), measured against the raw
``computePixels`` answer time. Workers call :func:`gl10m.memory.keep_freed_memory` first, as the
pipeline's do (``pipelines.runner.run_unit``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
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


# -- the tasks (module-level: picklable for worker processes) ------------------------------------
def _worker_setup() -> None:
    from gl10m.memory import keep_freed_memory

    keep_freed_memory()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def bare_read(row: dict) -> dict:
    """Open every asset of the scene over HTTP and read its window over the footprint."""
    import rasterio

    from gl10m import compose
    from gl10m.sources.gdalenv import gdal_http_env

    _worker_setup()
    c0 = time.process_time()
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
    return {"label": "ok", "px": px, "rss_mb": _peak_rss_mb(), "cpu": time.process_time() - c0, "pid": os.getpid()}


_PROVIDERS: dict = {}


def do_fetch(args: tuple) -> dict:
    """``fetch_scene`` of one row -> its label, seconds per part and in all, the worker's peak RSS.
    args: (row, out, profile path or None, Earth Engine stand-in URL or None, I/O threads or None)."""
    from gl10m import fetch, profile
    from gl10m.sources.base import Timings

    _worker_setup()
    row, out, prof, ee_url, io_threads = (*args, None, None, None)[:5]
    p = profile.load(prof)
    provider = None
    if io_threads and not ee_url:
        from gl10m.sources.cog import CogReader

        provider = CogReader(io_threads=io_threads)
    if ee_url:
        from gl10m.sources import earthengine as E

        if ee_url not in _PROVIDERS:
            _PROVIDERS[ee_url] = E.EarthEngineProvider("bench", url=ee_url, collections={
                "naip": E.NAIP_COLLECTION, "sentinel-2-l2a": E.S2_COLLECTION,
                p.imagery.naip.collection: E.NAIP_COLLECTION, p.imagery.s2.collection: E.S2_COLLECTION})
        provider = _PROVIDERS[ee_url]
    t = Timings()
    t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
    res = fetch.fetch_scene(row, p, out, provider, timings=t)
    total = time.perf_counter() - t0
    return {"label": res.label, "seconds": dict(t.seconds), "cpu_parts": dict(t.cpu), "total": total,
            "rss_mb": _peak_rss_mb(), "path": str(res.path) if res.path else None,
            "cpu": time.process_time() - c0, "main_cpu": time.thread_time() - m0, "pid": os.getpid()}


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


def _children_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each live child process of this one (Linux /proc): the
    servers, and the pool's workers while a pool is open."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[1]) == os.getpid():  # field 4, ppid
            out[int(d.name)] = (int(f[11]) + int(f[12])) / tick  # fields 14, 15: utime, stime
    return out


def timed(fn, items: list, workers: int, *, strict: bool) -> tuple[float, list[dict], float]:
    """Wall time of `fn` over `items` in `workers` fresh worker processes (warmed by one untimed
    call each: imports, GDAL), the results (each with the CPU seconds its task took in its
    worker, I/O threads included), and the CPU seconds the servers (this process's other
    children: the Range HTTP server, the STAC API) spent meanwhile."""
    with ProcessPoolExecutor(workers) as ex:
        warm = [(dict(x[0], key=f"{x[0]['key'][:3]}999{i:03d}"), *x[1:]) if isinstance(x, tuple) else x
                for i, x in enumerate(items[:workers])]
        list(ex.map(fn, warm))
        before = _children_cpu()
        t = time.perf_counter()
        res = list(ex.map(fn, items))
        dt = time.perf_counter() - t
        after = _children_cpu()
    if strict and any(r["label"] != "ok" for r in res):
        raise SystemExit(f"bench: some scenes did not come out ok: {[r['label'] for r in res]}")
    pool = {r["pid"] for r in res}
    servers = sum(after[k] - before[k] for k in after.keys() & before.keys() if k not in pool)
    return dt, res, servers


PART_ORDER = ("reads", "s2 warp + scl mask", "s2 median + stretch", "s2 composite", "naip warp", "naip mosaic",
              "ee block reassembly", "tiling", "qc", "encode", "staging writes")


def breakdown(results: list[dict], field: str = "seconds", total: str = "total") -> dict[str, float]:
    """Mean seconds per scene of each part (and "other": the rest of fetch_scene's time); with
    ``field="cpu_parts", total="main_cpu"`` the composing thread's CPU seconds instead."""
    n = len(results)
    parts: dict[str, float] = {}
    for r in results:
        for k, v in r[field].items():
            parts[k] = parts.get(k, 0.0) + v / n
    out = {k: parts[k] for k in PART_ORDER if k in parts}
    out.update({k: v for k, v in parts.items() if k not in out})
    out["other"] = max(0.0, sum(r[total] for r in results) / n - sum(out.values()))
    return out


def _print_cpu_parts(wall: dict[str, float], by_workers: dict[int, list[dict]]) -> list[dict]:
    """Per part: wall seconds (first worker count) and the composing thread's CPU seconds per
    scene for each worker count, the last count's CPU against the first's; then the I/O threads'."""
    ws = list(by_workers)
    cpu = {w: breakdown(res, "cpu_parts", "main_cpu") for w, res in by_workers.items()}
    io = {w: sum(r["cpu"] - r["main_cpu"] for r in res) / len(res) for w, res in by_workers.items()}
    head = "".join(f"  cpu {w}w" for w in ws)
    print(f"  {'part':<22} wall {ws[0]}w{head}" + (f"  cpu {ws[-1]}w/{ws[0]}w" if len(ws) > 1 else ""))
    recs = []
    rows = [(k, wall.get(k, 0.0), {w: cpu[w].get(k, 0.0) for w in ws}) for k in [*wall, *(
        k for k in cpu[ws[-1]] if k not in wall)]]
    rows.append(("(I/O threads)", float("nan"), io))
    for k, v, c in rows:
        ratio = c[ws[-1]] / c[ws[0]] if len(ws) > 1 and c[ws[0]] > 0.002 else float("nan")
        print(f"  {k:<22} " + (f"{v:7.3f}" if math.isfinite(v) else " " * 7) + "".join(f" {c[w]:7.3f}" for w in ws)
              + (f" {ratio:10.2f}x" if len(ws) > 1 and math.isfinite(ratio) else ""))
        if len(ws) > 1 and math.isfinite(ratio):
            recs.append(record(f"CPU of fetch_scene part: {k}, {ws[-1]} worker(s)", c[ws[-1]], "cpu-s/scene",
                               f"the same, {ws[0]} worker(s)", c[ws[0]], ratio, False,
                               "the same code's CPU seconds with more workers: above 1 is the machine's contention"))
    return recs


def agreement(results: list[dict]) -> list[float]:
    """Per staged sample: mean over R, G, B of corr(10 x 10 block means of the HR mosaic, LR)."""
    from gl10m import samples
    from gl10m.compose import join_tiles

    out = []
    for r in results:
        if not r.get("path"):
            continue
        s = samples.read_staged(r["path"])
        hr = join_tiles(s.hr).astype(np.float32)
        h, w, _ = s.lr.shape
        f = hr.shape[0] // h
        down = hr.reshape(h, f, w, f, 3).mean(axis=(1, 3))
        lr = s.lr.astype(np.float32)
        out.append(float(np.mean([np.corrcoef(down[..., c].ravel(), lr[..., c].ravel())[0, 1] for c in range(3)])))
    return out


def _print_breakdown(title: str, parts: dict[str, float], total: float, base_name: str, base: float) -> None:
    print(f"{title}: {total:.3f} s/scene; {base_name} {base:.3f} s/scene")
    for k, v in parts.items():
        print(f"  {k:<22} {v:7.3f} s  {100 * v / total:5.1f} %")


def _run(a, scenes: list[dict], tmp: Path, prof: str | None, mode: str, ee_url: str | None) -> int:
    print(f"{'workers':>7} {'bare scenes/s':>14} {'fetch scenes/s':>15} {'fetch/bare time':>16} {'peak RSS/worker':>16}"
          f"  CPU s/scene: {'bare':>5} {'fetch':>6} {'servers':>8} {'cores busy':>10}")
    recs, first, one, runs = [], {}, None, {}
    strict = prof is None
    n = len(scenes)
    for w in (int(x) for x in a.workers.split(",")):
        tb, bres, bsrv = timed(bare_read, scenes, w, strict=False)
        tf, res, fsrv = timed(do_fetch, [(r, str(tmp / f"W{w}"), prof, None, a.io_threads) for r in scenes], w,
                              strict=strict)
        rss = max(r["rss_mb"] for r in res)
        bcpu, fcpu = sum(r["cpu"] for r in bres) / n, sum(r["cpu"] for r in res) / n
        busy = (fcpu + fsrv / n) * n / tf
        print(f"{w:>7} {n / tb:>14.2f} {n / tf:>15.2f} {tf / tb:>15.1f}x {rss:>13.0f} MB"
              f"  {'':>11}{bcpu:>5.3f} {fcpu:>6.3f} {fsrv / n:>8.3f} {busy:>10.2f}")
        recs += _records(w, n, tb, tf, first)
        recs.append(record(f"peak RSS of a fetch worker, {w} worker(s)", rss, "MB", None, None, None, False,
                           "the largest resident set of a worker process (target < 1500 MB)"))
        recs.append(record(f"CPU of fetch_scene, {w} worker(s)", fcpu, "cpu-s/scene",
                           f"CPU of the bare window reads, {w} worker(s)", bcpu, None, False,
                           "CPU seconds per scene in the worker (I/O threads included) / the bare reads' (the "
                           f"servers spent {fsrv / n:.3f} s/scene more during fetch; cores busy {busy:.2f})"))
        runs[w] = {"tb": tb, "tf": tf, "res": res, "cpu": fcpu + fsrv / n, "busy": busy}
        if one is None:
            one = (w, tb, tf, res)
    recs += _scaling(runs, n)
    w, tb, tf, res = one
    parts = breakdown(res)
    total = sum(r["total"] for r in res) / n
    _print_breakdown(f"where fetch_scene's time goes ({w} worker)", parts, total, "bare window reads", tb / n)
    for k, v in parts.items():
        recs.append(record(f"fetch_scene part: {k}", v, "s/scene", "fetch_scene in all", total, v / total, False,
                           "share of fetch_scene's time per scene (1 worker)"))
    print("the composing thread's CPU seconds per scene and part, by worker count (the same code each time):")
    recs += _print_cpu_parts(parts, {k: v["res"] for k, v in runs.items()})
    agree = agreement(res)
    if agree:
        print(f"LR/HR agreement: corr(block-mean HR, LR) mean {np.mean(agree):.6f}, min {np.min(agree):.6f} "
              f"over {len(agree)} samples")
        recs.append(record("LR/HR agreement (mean corr of block-mean HR vs LR)", float(np.mean(agree)), "r",
                           "its minimum over the samples", float(np.min(agree)), None, True,
                           "per staged sample, mean over R, G, B of corr(10x10 block means of HR, LR); must not drop"))
    if ee_url:
        te, eres, _ = timed(do_fetch, [(r, str(tmp / "EE"), prof, ee_url) for r in scenes], 1, strict=strict)
        eparts = breakdown(eres)
        etotal = sum(r["total"] for r in eres) / n
        raw = eparts.get("reads", 0.0)
        _print_breakdown("earthengine (stand-in), 1 worker", eparts, etotal, "raw computePixels answers", raw)
        print(f"  fetch / raw answer time: {etotal / raw:.2f}x" if raw else "  (no answer time)")
        recs.append(record("fetch_scene via Earth Engine stand-in, 1 worker", etotal, "s/scene",
                           "raw computePixels answers (the stand-in's answer time)", raw, None, False,
                           "fetch / raw answer time per scene: the cost of the step beyond its answers"))
        eagree = agreement(eres)
        if eagree:
            print(f"  LR/HR agreement (earthengine): mean {np.mean(eagree):.6f}, min {np.min(eagree):.6f}")
    write_json(a.json, "fetch", recs, mode=mode, scenes=len(scenes), workers=a.workers,
               load_avg=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def contention_task(seconds: float) -> float:
    """CPU seconds per run of a fixed single-threaded step (the NAIP warp of a synthetic 1 m
    window onto a 1340 x 1340 grid, as fetch's), repeated for `seconds` of wall time."""
    from rasterio.transform import from_origin
    from rasterio.warp import transform_bounds

    from gl10m import compose

    _worker_setup()
    w, s = ORIGIN
    grid = compose.footprint_grid((w, s, w + SIZE / 2, s + SIZE / 2), 1340)
    x0, y0, x1, y1 = (math.floor(v) for v in transform_bounds(compose.WGS84, "EPSG:26911", *grid.bounds))
    x0, y0, x1, y1 = x0 - 5, y0 - 5, x1 + 5, y1 + 5
    pixels = np.random.default_rng(0).integers(1, 256, (3, y1 - y0, x1 - x0), dtype=np.uint8)
    valid = np.ones(pixels.shape[1:], bool)
    tr = from_origin(x0, y1, 1.0, 1.0)
    crs = compose.CRS.from_epsg(26911)
    compose.warp_naip(pixels, valid, tr, crs, grid)
    n, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        compose.warp_naip(pixels, valid, tr, crs, grid)
        n += 1
    return (time.thread_time() - c0) / n


def contention(workers: int, seconds: float = 2.0, rounds: int = 2) -> float:
    """The CPU seconds of the same single-threaded step with `workers` processes at once / with
    one alone (alternated `rounds` times): above 1 is what the machine takes back when its cores
    are all busy."""
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_worker_setup_task, range(workers)))
        alone, together = [], []
        for _ in range(rounds):
            alone.append(ex.submit(contention_task, seconds).result())
            together += list(ex.map(contention_task, [seconds] * workers))
    return float(np.mean(together) / np.mean(alone))


def _worker_setup_task(_: int) -> None:
    _worker_setup()


def _scaling(runs: dict[int, dict], n: int) -> list[dict]:
    """What bounds the speed-up of the last worker count over the first: fetch's against the bare
    reads' own, and the ceiling the CPU sets (the machine's cores / the CPU seconds per scene of
    that run, workers' and servers', against the first run's scenes/s)."""
    ws = sorted(runs)
    if len(ws) < 2:
        return []
    w0, w1 = ws[0], ws[-1]
    f0, f1 = runs[w0], runs[w1]
    fetch_x, bare_x = f0["tf"] / f1["tf"], f0["tb"] / f1["tb"]
    cores = os.cpu_count() or 1
    ceiling = min(cores, w1) / f1["cpu"] / (n / f0["tf"])
    print(f"{w1} workers vs {w0}: fetch {fetch_x:.2f}x the scenes/s, the bare reads {bare_x:.2f}x "
          f"(fetch / bare scaling {fetch_x / bare_x:.2f}); CPU ceiling on this {cores}-core machine "
          f"{ceiling:.2f}x ({min(cores, w1)} cores / {f1['cpu']:.3f} cpu-s per scene, servers included, vs "
          f"{f0['cpu']:.3f} with {w0}, which kept {f0['busy']:.2f} cores busy); fetch reached {fetch_x / ceiling:.0%} "
          "of it")
    slow = contention(w1)
    print(f"  the same single-threaded step (the NAIP warp of a fixed window) takes {slow:.2f}x the CPU seconds "
          f"with {w1} processes at once as with one alone: on a CPU-bound step {w1} workers reach at most "
          f"{min(cores, w1) / slow:.2f}x of 1")
    return [record(f"CPU of a fixed single-threaded step, {w1} processes at once", slow, "x", None, None, None, False,
                   "CPU seconds of the same work with all workers busy / with one alone: the machine's contention"),
            record(f"fetch speed-up, {w1} vs {w0} worker(s)", fetch_x, "x", "the bare reads' speed-up", bare_x,
                   fetch_x / bare_x, True, "fetch's parallel speed-up / the bare reads' own"),
            record(f"fetch speed-up, {w1} vs {w0} worker(s)", fetch_x, "x",
                   f"the CPU ceiling on {cores} cores", ceiling, fetch_x / ceiling, True,
                   "the speed-up / what the machine's cores allow at that run's CPU seconds per scene")]


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
    ap.add_argument("--no-ee", action="store_true", help="skip the Earth Engine stand-in part")
    ap.add_argument("--io-threads", type=int, default=None,
                    help="concurrent reads per scene (gl10m.sources.cog.CogReader's io_threads; default: its own)")
    add_json_arg(ap)
    a = ap.parse_args(argv)
    from gl10m.testbed.serve import serve

    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        tmp = Path(tmp)
        if a.world:
            world, prof, cols, rows = a.world, str(a.world / "profile.yaml"), None, None
        else:
            cols, rows, prof = 2, 2, None
            world = a.keep or tmp / "world"
            t = time.perf_counter()
            if not (world / "stac" / "items.json").exists():
                build_world(world, cols, rows)
            print(f"world: {world} ({time.perf_counter() - t:.1f} s to build)")
        with serve(world) as servers, _ee_stand_in(world, a.no_ee) as ee:
            if a.world:
                scenes = testbed_rows(world, servers.stac_url, tmp / "plan", a.scenes)
                print(f"testbed world {world}: {len(scenes)} planned scenes over HTTP (127.0.0.1)")
                mode = f"testbed world {world}"
            else:
                scenes = plan_rows(servers.stac_url, cols, rows, a.scenes)
                print(f"{a.scenes} scenes, each 2 NAIP QQs + 3 S2 dates x 4 assets over HTTP (127.0.0.1)")
                mode = "synthetic world"
            return _run(a, scenes, tmp, prof, mode, ee.url if ee is not None else None)


def _ee_stand_in(world: Path, skip: bool):
    import contextlib

    if skip:
        return contextlib.nullcontext(None)
    try:
        import ee  # noqa: F401
    except ImportError:
        print("earthengine-api is not installed: no Earth Engine part")
        return contextlib.nullcontext(None)
    from gl10m.testbed.eeserver import serve_ee

    return serve_ee(world)


if __name__ == "__main__":
    sys.exit(main())
