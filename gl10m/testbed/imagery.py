"""The testbed's imagery: NAIP-like and Sentinel-2-L2A-like COGs rendered from the truth.

Everything starts from one 1 m surface-reflectance rendering of a region (bands R, G, B, NIR),
made from the truth raster (class id per pixel, gl10m.testbed.classes.TRUTH_CLASSES) and its
detail layer of thin markings (MARK_NAMES), with textures that are functions of *world*
coordinates (hashed value-noise lattices), so any grid of the same place renders the same
ground:

* NAIP: per state-year, the 1 m reflectance with that year's look (season of the vegetation,
  sun direction and cast shadows of tall classes, colour balance, haze, sensor noise) as 4-band
  uint8 (R, G, B, NIR), cut into quarter-quad COGs (3.75' x 3.75' cells plus an overlap, like
  DOQQs, UTM NAD83). A state-year with another ground sample distance (0.6 m) is rendered
  directly on its own grid from a truth rasterised at that resolution.
* Sentinel-2 L2A: the *same* 1 m reflectance averaged over 10 x 10 m cells (the exact 10x
  downsample), seasonally modulated per date, blurred by a Gaussian PSF, plus sensor noise;
  then clouds (SCL 8/9/10, bright), cloud shadows (SCL 3, dark) and swath-edge nodata (SCL 0 and
  zero reflectance). Bands B02/B03/B04/B08 are uint16 reflectance * 10000, plus the +1000 offset when
  the processing baseline is >= 04.00 (never otherwise); SCL is uint8 at 20 m. UTM WGS84.
  (PROJ treats NAD83 and WGS84 UTM coordinates as identical to ~0.1 mm, so the 10 m cells are
  exact blocks of the 1 m grid.)

The parts: :mod:`gl10m.testbed.imagery_spec` (the spec), :mod:`gl10m.testbed.surface` (the 1 m
reflectance), :mod:`gl10m.testbed.naip`, :mod:`gl10m.testbed.sentinel2` and
:mod:`gl10m.testbed.rastergrid` (grids, cells, COG writing). This module re-exports their
public names.

`render_region` does one region end to end and returns plain-dict descriptions of what it wrote
(gl10m.testbed.stac_items turns them into STAC items); gl10m.testbed.build runs it per region.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

from gl10m.testbed.imagery_spec import (DN_PER_REFL, NAIP_BANDS, NAIP_MIN_DN, S2_BANDS, S2_OFFSET,  # noqa: F401
                                        Fault, ImagerySpec, ImagerySpecError, NaipYear, S2Date, imagery_spec)
from gl10m.testbed.naip import (STRIP, YearLook, apply_wedge, clip_grid, naip_dn, naip_item_id,  # noqa: F401
                                pick_wedge_qq, render_master, render_naip_grid, shadow_mask,
                                write_quarter_quads, year_look)
from gl10m.testbed.rastergrid import (QQ_DEG, Grid, QuarterQuad, footprint_ll, mgrs_tile,  # noqa: F401
                                      proj_bounds, quarter_quads, region_grid, snapped_grid, write_cog)
from gl10m.testbed.sentinel2 import (Acc10, S2Base, S2Scene, block_mean, gaussian_blur, has_offset,  # noqa: F401
                                     render_s2, s2_times)
from gl10m.testbed.surface import (MATERIAL_LOOKS, SEASON_COEF, Look, Tables, build_tables,  # noqa: F401
                                   default_tables, key_of, look_for, pixel_centres, rng_for, season_of,
                                   subseed, surface_reflectance, value_noise)


# ------------------------------------------------------------------------------------------
# One region, end to end
# ------------------------------------------------------------------------------------------
def imagery_bbox(bbox, spec: ImagerySpec) -> tuple[float, float, float, float]:
    """The part of a region bbox that gets imagery (all of it unless spec.extent_deg is set)."""
    if not spec.extent_deg:
        return tuple(bbox)
    w, s, e, n = bbox
    cx, cy, h = (w + e) / 2, (s + n) / 2, spec.extent_deg / 2
    return (round(max(w, cx - h), 7), round(max(s, cy - h), 7), round(min(e, cx + h), 7), round(min(n, cy + h), 7))


def imagery_region(region, spec: ImagerySpec):
    """The region with its bbox cut to `imagery_bbox` (truth outside it is nodata)."""
    import dataclasses
    bb = imagery_bbox(region.bbox, spec)
    return region if tuple(bb) == tuple(region.bbox) else dataclasses.replace(region, bbox=bb)


def region_parts(region, spec: ImagerySpec) -> list[str]:
    """Independent work units of a region: "base" (truth, 1 m NAIP years, Sentinel-2) and one
    "naip:{year}" per state-year at another GSD (rendered on its own grid)."""
    return ["base"] + [f"naip:{y.year}" for y in spec.years_for(region.code) if abs(y.gsd - 1.0) > 1e-9]


def render_region(region, spec: ImagerySpec, out_dir: str | Path, seed: int, part: str = "all",
                  rasterize: Callable | None = None, tables: Tables | None = None,
                  wedge: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Render one region's truth, NAIP and Sentinel-2 COGs under out_dir; describe what was written.

    region: a gl10m.testbed.layout.RegionWorld (code, bbox, utm_epsg_nad83, utm_epsg_wgs84,
    base_cover). part: "all", or one of `region_parts` (so a build can spread a region over
    processes). rasterize(region, crs, transform, shape) -> {"classes", "marks", "material"}
    (uint8 layers) defaults to raster.rasterize_layers. wedge: put the black no-data wedge fault
    into one NAIP quarter quad of the region's newest state-year. Returns {"state", "truth",
    "naip": [...], "s2": [...], "faults": [...]} with hrefs relative to out_dir.
    """
    if rasterize is None:
        from gl10m.testbed.raster import rasterize_layers as rasterize
    tables = tables or default_tables()
    region = imagery_region(region, spec)
    parts = region_parts(region, spec) if part == "all" else [part]
    out: dict = {"state": region.code, "truth": None, "naip": [], "s2": [], "faults": []}
    for p in parts:
        if p == "base":
            r = _render_base(region, spec, Path(out_dir), seed, rasterize, tables, wedge, progress)
        elif p.startswith("naip:"):
            year = int(p.split(":", 1)[1])
            ys = [y for y in spec.years_for(region.code) if y.year == year]
            if not ys:
                raise ValueError(f"region {region.code} has no NAIP year {year}")
            r = render_naip_grid(region, spec, Path(out_dir), seed, rasterize, tables, ys, wedge, progress)
        else:
            raise ValueError(f"unknown part {p!r}")
        out["truth"] = out["truth"] or r.get("truth")
        for k in ("naip", "s2", "faults"):
            out[k] += r.get(k, [])
    out["naip"].sort(key=lambda d: d["id"])
    out["s2"].sort(key=lambda d: (d["datetime"], d["processed"]))
    return out


def merge_parts(results: list[dict]) -> dict:
    """Merge render_region results of the parts of one region."""
    out: dict = {"state": results[0]["state"], "truth": None, "naip": [], "s2": [], "faults": []}
    for r in results:
        out["truth"] = out["truth"] or r.get("truth")
        for k in ("naip", "s2", "faults"):
            out[k] += r.get(k, [])
    out["naip"].sort(key=lambda d: d["id"])
    out["s2"].sort(key=lambda d: (d["datetime"], d["processed"]))
    return out


def _render_base(region, spec, out_dir, seed, rasterize, tables, wedge, progress) -> dict:
    from gl10m.testbed.classes import NODATA, TRUTH_CLASSES
    say = progress or (lambda s: None)
    code = region.code
    w, s, e, n = region.bbox
    lon_c, lat_c = (w + e) / 2, (s + n) / 2
    master = region_grid(region.bbox, region.utm_epsg_nad83, spec.margin_m, 1.0)
    say(f"{code}: truth {master.width}x{master.height}")
    layers = rasterize(region, f"EPSG:{master.epsg}", master.transform, master.shape)
    truth_rel = f"truth/{code}.tif"
    write_cog(out_dir / truth_rel, layers["classes"], master, compress="DEFLATE", nodata=NODATA, resampling="mode",
              blocksize=spec.blocksize, tags={"classes": ",".join(TRUTH_CLASSES), "region": code})
    one_m = [y for y in spec.years_for(code) if abs(y.gsd - 1.0) <= 1e-9]
    acc = Acc10(master)
    naip = render_master(region, master, layers, one_m, spec, seed, tables, acc)
    del layers
    res = write_quarter_quads(region, spec, out_dir, master, naip, one_m, wedge, progress)
    del naip

    # Sentinel-2: the granule grid = master extent, relabelled as UTM WGS84 (same coordinates)
    g10 = Grid(region.utm_epsg_wgs84, master.x0, master.y1, 10.0, master.width // 10, master.height // 10)
    base = S2Base(g10, acc.refl, acc.vegrefl, acc.veg, acc.water, acc.nir, acc.vegnir)
    tile = mgrs_tile(lon_c, lat_c, region.utm_epsg_wgs84 % 100)
    s2_out: list[dict] = []
    for d in spec.s2_dates:
        t, platform, orbit = s2_times(seed, code, lon_c, d, spec.s2_date_jitter_days)
        versions = [(d.baseline, False)] + ([(d.reprocessed_baseline, True)] if d.reprocessed_baseline else [])
        for baseline, again in versions:
            scene = render_s2(base, d, t.date(), lat_c, seed, code, spec, baseline)
            folder = f"s2/{tile}/{t:%Y%m%d}" + (f"_N{baseline.replace('.', '')}" if again else "")
            assets = {}
            for b in ("B02", "B03", "B04", "B08", "SCL"):
                arr = scene.bands[b]
                gb = g10 if b != "SCL" else Grid(g10.epsg, g10.x0, g10.y1, 20.0, g10.width // 2, g10.height // 2)
                rel = f"{folder}/{b}.tif"
                write_cog(out_dir / rel, arr, gb, compress="DEFLATE", predictor=2, nodata=0,
                          resampling="nearest" if b == "SCL" else "average", blocksize=spec.blocksize)
                assets[b] = {"href": rel, "gsd": gb.res, "epsg": gb.epsg, "transform": list(gb.transform)[:6],
                             "shape": [gb.height, gb.width], "bbox_xy": list(gb.bounds)}
            # processing time: hours after sensing; a reprocessing (new baseline) much later
            proc = t + (dt.timedelta(days=420, hours=7) if again else dt.timedelta(hours=9, minutes=17))
            s2_out.append({"state": code, "mgrs": tile, "datetime": t.isoformat().replace("+00:00", "Z"),
                           "platform": platform, "relative_orbit": orbit, "baseline": baseline,
                           "offset": S2_OFFSET if has_offset(baseline) else 0,
                           "processed": proc.strftime("%Y%m%dT%H%M%S"), "reprocessed": again,
                           "cloud_pct": scene.cloud_pct, "nodata_pct": scene.nodata_pct, "epsg": g10.epsg,
                           "geometry": footprint_ll(g10, scene.valid_geom), "assets": assets})
        say(f"{code}: s2 {t:%Y-%m-%d}")
    res["truth"] = {"href": truth_rel, "epsg": master.epsg, "transform": list(master.transform)[:6],
                    "shape": [master.height, master.width]}
    res["s2"] = s2_out
    return res
