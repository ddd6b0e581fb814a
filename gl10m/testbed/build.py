"""Build the testbed world folder: `build(out_dir)` and the region picture `render_preview`.

Layout of a built world DIR (hrefs in the STAC items are relative to DIR):

    DIR/osm/{STATE}.osm.pbf                 OSM extract per region (gl10m.testbed.layout, pbfwrite)
    DIR/truth/{STATE}.tif                   1 m truth classes (uint8, 255 = nodata), UTM NAD83
    DIR/naip/{STATE}/{year}/m_*.tif         NAIP-like quarter-quad COGs
    DIR/s2/{MGRS}/{YYYYMMDD}[_Nxxxx]/{B02,B03,B04,B08,SCL}.tif   Sentinel-2 granules (_Nxxxx: reprocessing)
    DIR/stac/naip.json, sentinel-2-l2a.json, collections.json
    DIR/profile.yaml                        a gl10m profile pointing the pipeline at the world
    DIR/world.json                          seed, spec hash, regions, faults, counts

The build writes into a temp sibling folder and renames it into place at the end, so a crashed
build leaves nothing half-built; the same spec and seed give byte-identical files.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gl10m.errors import UserError
from gl10m.io import atomic_write_bytes, atomic_write_text

STAC_PLACEHOLDER_URL = "http://127.0.0.1:0/"
REGION_TARGET = 20  # scenes wanted per testbed region


class BuildError(UserError, RuntimeError):
    """The world cannot be built (bad output folder, ...)."""


@dataclass
class BuildResult:
    out_dir: Path
    seed: int
    regions: list[str]
    n_naip: int
    n_s2: int
    faults: list[dict] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


# Regions reach forked workers by inheritance, not by pickling: a pickled-and-restored
# RegionWorld has been seen to rasterise its marks differently (see the lead's notes), which
# would break byte-identical rebuilds.
_REGIONS: dict[str, object] = {}


def _work(args):
    code, spec, out_dir, seed, part, wedge = args
    from gl10m.testbed.imagery import render_region
    return render_region(_REGIONS[code], spec, out_dir, seed, part=part, wedge=wedge)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def build(out_dir: str | Path, spec_path: str | Path | None = None, seed: int | None = None,
          progress: Callable[[str], None] | None = None, workers: int = 2) -> BuildResult:
    """Generate the world of `spec_path` (default manifests/testbed.yaml) into `out_dir`."""
    from gl10m.testbed.imagery import imagery_spec, region_parts
    from gl10m.testbed.layout import generate
    from gl10m.testbed.pbfwrite import write_pbfs
    from gl10m.testbed.spec import load_spec
    from gl10m.testbed.stac_items import build_items, write_stac

    t0 = time.perf_counter()
    say = progress or (lambda s: None)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"output {out_dir} exists and is not a folder")
    spec = load_spec(spec_path)
    seed = spec.seed if seed is None else int(seed)
    img = imagery_spec(spec.imagery)
    say(f"generating world (seed {seed})")
    regions = generate(spec, seed)
    codes = [r.code for r in regions]
    faults_spec = {f.kind: f for f in img.faults}

    def fault_state(kind: str) -> str | None:
        f = faults_spec.get(kind)
        if f is None:
            return None
        return f.state if f.state in codes else codes[0]

    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        wedge_state = fault_state("black_wedge")
        tasks = []
        for r in regions:
            for part in region_parts(r, img):
                tasks.append((r.code, img, str(tmp), seed, part, r.code == wedge_state))
        tasks.sort(key=lambda t: (t[4] == "base", t[0], t[4]))  # heavy direct-GSD parts first
        _REGIONS.clear()
        _REGIONS.update({r.code: r for r in regions})
        can_fork = "fork" in mp.get_all_start_methods()
        results_by_task: dict[tuple[str, str], dict] = {}
        n_workers = max(1, min(workers, len(tasks))) if can_fork else 1
        if n_workers > 1:
            with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("fork")) as ex:
                futs = {ex.submit(_work, t): (t[0], t[4]) for t in tasks}
                say("writing OSM extracts")
                write_pbfs(regions, tmp / "osm")
                for fut in cf.as_completed(futs):
                    results_by_task[futs[fut]] = fut.result()
                    say(f"rendered {futs[fut][0]} {futs[fut][1]}")
        else:
            write_pbfs(regions, tmp / "osm")
            for t in tasks:
                results_by_task[(t[0], t[4])] = _work(t)
                say(f"rendered {t[0]} {t[4]}")
        from gl10m.testbed.imagery import merge_parts
        results = [merge_parts([results_by_task[k] for k in sorted(results_by_task) if k[0] == c]) for c in codes]

        faults = [f for r in results for f in r["faults"]]
        faults += _apply_file_faults(tmp, results, fault_state("missing_href"), faults_spec.get("missing_href"),
                                     fault_state("corrupt_cog"), faults_spec.get("corrupt_cog"))
        faults.sort(key=lambda f: (f["kind"], f["state"]))
        naip_items, s2_items = build_items(results)
        write_stac(tmp, naip_items, s2_items)
        _write_profile(tmp, spec, regions)
        meta = {
            "name": spec.name, "seed": seed, "spec_sha256": _spec_hash(spec),
            "imagery": img.model_dump(mode="json"),
            "regions": [{"code": r.code, "bbox": list(r.bbox), "split": r.split, "biome": r.biome,
                         "utm_epsg_nad83": r.utm_epsg_nad83, "utm_epsg_wgs84": r.utm_epsg_wgs84,
                         "truth": res["truth"]["href"], "pbf": f"osm/{r.code}.osm.pbf",
                         "n_features": int(len(r.features)),
                         "naip_items": len(res["naip"]), "s2_items": len(res["s2"])}
                        for r, res in zip(regions, results)],
            "faults": faults,
            "counts": {"naip_items": len(naip_items), "s2_items": len(s2_items)},
        }
        atomic_write_text(tmp / "world.json", json.dumps(meta, indent=1) + "\n")
        for p in tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        nbytes = _dir_bytes(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _REGIONS.clear()
    secs = time.perf_counter() - t0
    say(f"world written to {out_dir} ({nbytes / 1e6:.1f} MB, {secs:.1f} s)")
    return BuildResult(out_dir, seed, codes, len(naip_items), len(s2_items), faults, nbytes, secs)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _spec_hash(spec) -> str:
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _apply_file_faults(root: Path, results: list[dict], missing_state, missing, corrupt_state, corrupt) -> list[dict]:
    """Delete one asset's file (the item keeps its href) and truncate one COG; describe both."""
    out = []
    by_state = {r["state"]: r for r in results}
    if missing is not None and missing_state in by_state:
        item_id, asset, href = _pick_victim(by_state[missing_state], missing.collection, "B03")
        (root / href).unlink()
        out.append({"kind": "missing_href", "collection": missing.collection, "state": missing_state,
                    "item_id": item_id, "asset": asset, "href": href})
    if corrupt is not None and corrupt_state in by_state:
        item_id, asset, href = _pick_victim(by_state[corrupt_state], corrupt.collection, "B04", avoid=out)
        data = (root / href).read_bytes()
        cut = int(len(data) * 0.45)
        atomic_write_bytes(root / href, data[:cut])
        out.append({"kind": "corrupt_cog", "collection": corrupt.collection, "state": corrupt_state,
                    "item_id": item_id, "asset": asset, "href": href, "bytes_kept": cut, "bytes_full": len(data)})
    return out


def _pick_victim(res: dict, collection: str, s2_band: str, avoid=()) -> tuple[str, str, str]:
    """A file the pipeline will read: NAIP of the newest year (a mid-sized quarter quad) or the
    clearest 2023 Sentinel-2 granule that is not a reprocessing."""
    from gl10m.testbed.stac_items import s2_ids
    taken = {f["href"] for f in avoid}
    if collection == "naip":
        newest = max(p["year"] for p in res["naip"])
        cands = [p for p in res["naip"] if p["year"] == newest and p["href"] not in taken]
        cands = [p for p in cands if not any(f.get("item_id") == p["id"] for f in res["faults"])] or cands
        areas = sorted(cands, key=lambda p: (p["shape"][0] * p["shape"][1], p["id"]))
        big = areas[-1]["shape"][0] * areas[-1]["shape"][1]
        p = next(p for p in areas if p["shape"][0] * p["shape"][1] >= 0.25 * big)
        return p["id"], "image", p["href"]
    cands = [p for p in res["s2"] if p["datetime"].startswith("2023") and not p["reprocessed"]
             and p["assets"][s2_band]["href"] not in taken]
    cands.sort(key=lambda p: (p["cloud_pct"] >= 2.0, p["nodata_pct"] > 0, -int(p["datetime"][5:7]), p["datetime"]))
    p = cands[0]
    return s2_ids(p)["id"], s2_band, p["assets"][s2_band]["href"]


def _write_profile(root: Path, spec, regions) -> Path:
    """DIR/profile.yaml: the spec's profile with the testbed regions, splits and local STAC provider."""
    from gl10m import profile as P
    base = spec.load_profile()
    data = base.model_dump(mode="json", exclude={"source"})
    data["name"] = f"{base.name}-testbed"
    data["description"] = f"gl10m testbed world ({spec.name}); serve it with `gl10m testbed serve`."
    codes = [r.code for r in regions]
    new_regions = {}
    for r in regions:
        known = base.regions.get(r.code)
        pbf = root / "osm" / f"{r.code}.osm.pbf"
        new_regions[r.code] = {"name": known.name if known else r.code,
                               "slug": known.slug if known else r.code.lower(),
                               "target": REGION_TARGET, "bbox": [float(v) for v in r.bbox],
                               "pbf": f"osm/{r.code}.osm.pbf",
                               "sha256": _sha256(pbf) if pbf.exists() else None}
    data["regions"] = new_regions
    if spec.max_overlap is not None:
        data["geometry"]["max_overlap"] = float(spec.max_overlap)
    for sch in data["splits"]["schemes"].values():
        for k in ("train", "val", "test"):
            sch[k] = [c for c in sch[k] if c in codes]
    data["provider"] = {"name": "stac", "stac_url": STAC_PLACEHOLDER_URL, "signing": "none",
                        "max_concurrency": 4, "project": None}
    prof = P.from_dict(data, root / "profile.yaml")
    P.dump(prof, root / "profile.yaml")
    return root / "profile.yaml"


# ------------------------------------------------------------------------------------------
# The picture of one region
# ------------------------------------------------------------------------------------------
def render_preview(world_dir: str | Path, state: str, out_png: str | Path, hr_res_m: float = 4.0) -> Path:
    """PNG of one region: the newest NAIP state-year mosaic (downsampled) with OSM outlines, next
    to the clearest Sentinel-2 view (harmonised by its processing baseline, 0..0.3 stretch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling

    from gl10m.testbed.imagery import has_offset

    root = Path(world_dir)
    state = state.upper()
    try:
        meta = json.loads((root / "world.json").read_text())
        naip = json.loads((root / "stac" / "naip.json").read_text())["features"]
        s2 = json.loads((root / "stac" / "sentinel-2-l2a.json").read_text())["features"]
    except FileNotFoundError as e:
        raise BuildError(f"{root} is not a built testbed world ({e.filename} missing)") from None
    reg = next((r for r in meta["regions"] if r["code"] == state), None)
    if reg is None:
        raise BuildError(f"no region {state} in {root}; it has {', '.join(r['code'] for r in meta['regions'])}")
    items = [i for i in naip if i["properties"]["naip:state"] == state.lower()]
    in_window = [i for i in items if "2022-01-01" <= i["properties"]["datetime"][:10] <= "2024-04-01"] or items
    year = max(i["properties"]["naip:year"] for i in in_window)
    items = sorted((i for i in in_window if i["properties"]["naip:year"] == year), key=lambda i: i["id"])

    with rasterio.open(root / reg["truth"]) as t:
        x0, y0, x1, y1 = t.bounds
        crs = t.crs
    W, H = int((x1 - x0) / hr_res_m), int((y1 - y0) / hr_res_m)
    hr = np.zeros((3, H, W), np.uint8)
    for it in items:
        try:
            with rasterio.open(root / it["assets"]["image"]["href"]) as src:
                l, b, r, t_ = src.bounds
                c0, c1 = int((l - x0) / hr_res_m), int((r - x0) / hr_res_m)
                r0, r1 = int((y1 - t_) / hr_res_m), int((y1 - b) / hr_res_m)
                c0, r0 = max(c0, 0), max(r0, 0)
                c1, r1 = min(c1, W), min(r1, H)
                a = src.read([1, 2, 3], out_shape=(3, r1 - r0, c1 - c0), resampling=Resampling.average)
                hole = hr[:, r0:r1, c0:c1].max(axis=0) == 0
                hr[:, r0:r1, c0:c1][:, hole] = a[:, hole]
        except (rasterio.errors.RasterioError, OSError):
            continue  # a deliberately corrupt or missing file: leave its area black

    cands = [i for i in s2 if i["properties"]["s2:mgrs_tile"] and i["bbox"][0] <= reg["bbox"][2]
             and i["bbox"][2] >= reg["bbox"][0] and i["bbox"][1] <= reg["bbox"][3] and i["bbox"][3] >= reg["bbox"][1]]
    cands.sort(key=lambda i: (i["properties"]["s2:nodata_pixel_percentage"] > 0, i["properties"]["eo:cloud_cover"], i["id"]))
    lr, lr_title = None, "no Sentinel-2"
    for it in cands:
        try:
            bands = []
            for b in ("B04", "B03", "B02"):
                with rasterio.open(root / it["assets"][b]["href"]) as src:
                    bands.append(src.read(1).astype(np.float32))
                    ext = src.bounds
            off = 1000 if has_offset(it["properties"]["s2:processing_baseline"]) else 0
            refl = (np.stack(bands, -1) - off) / 10000.0
            lr = (np.clip(refl / 0.3, 0, 1) * 255).astype(np.uint8)
            lr_title = f"Sentinel-2 {it['properties']['datetime'][:10]} (10 m, cloud {it['properties']['eo:cloud_cover']:.1f} %)"
            break
        except (rasterio.errors.RasterioError, OSError, KeyError):
            continue

    fig, axes = plt.subplots(1, 2, figsize=(14, 7.2), dpi=110)
    ax = axes[0]
    ax.imshow(hr.transpose(1, 2, 0), extent=(x0, x1, y0, y1))
    _draw_osm(ax, root / reg["pbf"], crs, reg["bbox"])
    ax.set_title(f"{state}: NAIP {year} mosaic ({hr_res_m:g} m shown) + OSM outlines")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax2 = axes[1]
    if lr is not None:
        ax2.imshow(lr, extent=(ext.left, ext.right, ext.bottom, ext.top), interpolation="nearest")
    ax2.set_title(lr_title)
    ax2.set_xlim(x0, x1)
    ax2.set_ylim(y0, y1)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


def _draw_osm(ax, pbf: Path, crs, bbox) -> None:
    """Outlines of the PBF's areas and ways, in the map's CRS."""
    import osmium
    import shapely
    from pyproj import Transformer
    from shapely import wkb

    tr = Transformer.from_crs(4326, crs, always_xy=True)
    fab = osmium.geom.WKBFactory()
    polys, lines = [], []
    try:
        fp = osmium.FileProcessor(str(pbf)).with_areas().with_locations()
        for o in fp:
            try:
                if o.is_area():
                    polys.append(wkb.loads(fab.create_multipolygon(o), hex=True))
                elif o.is_way() and not o.is_closed():
                    lines.append(wkb.loads(fab.create_linestring(o), hex=True))
            except Exception:  # noqa: BLE001 - a feature osmium cannot assemble: skip it
                continue
    except (OSError, RuntimeError):
        return

    def f(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    import numpy as np
    for g in shapely.transform(np.array(polys, dtype=object), f) if polys else []:
        for p in getattr(g, "geoms", [g]):
            xs, ys = p.exterior.xy
            ax.plot(xs, ys, color="yellow", lw=0.4, alpha=0.9)
    for g in shapely.transform(np.array(lines, dtype=object), f) if lines else []:
        xs, ys = g.xy
        ax.plot(xs, ys, color="cyan", lw=0.3, alpha=0.7)
