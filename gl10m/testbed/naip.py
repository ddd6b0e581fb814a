"""The testbed's NAIP: per state-year looks (season, sun and cast shadows, colour balance, haze,
noise) applied to the 1 m surface reflectance as 4-band uint8 (R, G, B, NIR), cut into
quarter-quad COGs (3.75' x 3.75' cells plus an overlap, like DOQQs, UTM NAD83)."""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np

from gl10m.testbed.imagery_spec import DN_PER_REFL, NAIP_MIN_DN, ImagerySpec, NaipYear
from gl10m.testbed.rastergrid import (QQ_DEG, Grid, QuarterQuad, footprint_ll, proj_bounds, quarter_quads,
                                      region_grid, snapped_grid, write_cog)
from gl10m.testbed.sentinel2 import Acc10
from gl10m.testbed.surface import (SEASON_COEF, Tables, key_of, pixel_centres, rng_for, season_of, subseed,
                                   surface_reflectance)

# ------------------------------------------------------------------------------------------
# NAIP: per-year look
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class YearLook:
    gains: tuple[float, float, float, float]
    haze: tuple[float, float, float, float]
    season: float  # vegetation browning, -0.3 (lush) .. 0.8 (dry)
    sun_azimuth: float  # degrees from north, clockwise
    sun_elevation: float  # degrees



def year_look(seed: int, state: str, ny: NaipYear, lat: float) -> YearLook:
    rng = rng_for(seed, "naip-look", state, ny.year)
    g = 1.0 + rng.uniform(-0.07, 0.07, 3)
    bright = rng.uniform(0.92, 1.08)
    gains = tuple(float(x * bright) for x in g) + (float(bright * rng.uniform(0.95, 1.05)),)
    haze = tuple(float(x) for x in rng.uniform(0.0, 0.012, 1)[0] * np.array([0.6, 0.8, 1.0, 0.3]))
    season = season_of(ny.date, lat) + float(rng.uniform(-0.1, 0.1))
    doy = ny.date.timetuple().tm_yday
    elev = 90 - abs(lat - 23.44 * math.sin(2 * math.pi * (doy - 81) / 365.0)) - float(rng.uniform(8, 20))
    return YearLook(gains, haze, season, float(rng.uniform(120, 165)), max(20.0, elev))


def shadow_mask(key: np.ndarray, tables: Tables, look: YearLook, gsd: float) -> np.ndarray:
    """Cast shadows of tall surfaces away from the sun (bool, never on the tall pixels themselves)."""
    classes = key
    h = tables.height[key]
    tall = h > 0
    if not tall.any():
        return np.zeros(classes.shape, bool)
    az = math.radians(look.sun_azimuth)
    ux, uy = -math.sin(az), math.cos(az)  # away from the sun; rows grow southwards
    k = 1.0 / math.tan(math.radians(look.sun_elevation)) / gsd  # shadow px per metre of height
    out = np.zeros(classes.shape, bool)
    H, W = classes.shape
    for tier in (4.0, 10.0, 25.0):
        src = h >= tier
        if not src.any():
            continue
        n = max(1, int(round(tier * k)))
        step = max(1, n // 8)
        for s in range(step, n + 1, step):
            dx = int(round(s * ux))
            dy = int(round(-s * uy))
            ys0, ys1 = max(0, dy), H + min(0, dy)
            xs0, xs1 = max(0, dx), W + min(0, dx)
            if ys1 <= ys0 or xs1 <= xs0:
                continue
            out[ys0:ys1, xs0:xs1] |= src[ys0 - dy:ys1 - dy, xs0 - dx:xs1 - dx]
    out &= ~tall
    return out


def naip_dn(refl: np.ndarray, veg: np.ndarray, shadow: np.ndarray, look: YearLook,
            rng: np.random.Generator, noise_dn: int) -> np.ndarray:
    """(4, H, W) reflectance -> (4, H, W) uint8 NAIP digital numbers with the year's look (or
    (3, H, W) R, G, B -> the same three bands)."""
    out = np.empty(refl.shape, np.uint8)
    shade = np.where(shadow, np.float32(0.45), np.float32(1.0)) if shadow is not None else None
    for b in range(refl.shape[0]):
        x = veg * np.float32(look.season * SEASON_COEF[b])
        x += 1.0
        x *= refl[b]
        x *= np.float32(look.gains[b] * DN_PER_REFL)
        if shade is not None:
            x *= shade
        x += np.float32(look.haze[b] * DN_PER_REFL)
        if noise_dn:
            x += rng.integers(-noise_dn, noise_dn + 1, size=x.shape, dtype=np.int8)
        np.clip(x, NAIP_MIN_DN, 255, out=x)
        out[b] = x  # float -> uint8 truncation after clipping
    return out


STRIP = 600  # rows per block of the 1 m rendering (a multiple of 60)

def naip_item_id(state: str, qq_name: str, date: dt.date) -> str:
    return f"{state.lower()}_{qq_name}_{date:%Y%m%d}"

def render_master(region, grid: Grid, layers: dict, years: list[NaipYear], spec: ImagerySpec, seed: int,
                   tables: Tables, acc: Acc10 | None) -> dict[int, np.ndarray]:
    """NAIP uint8 (4, H, W) per year over a whole grid, rendered in strips of rows."""
    code = region.code
    lat_c = (region.bbox[1] + region.bbox[3]) / 2
    key = key_of(layers["classes"], layers.get("material"), tables, int(region.base_cover))
    marks = layers["marks"]
    looks = {y.year: year_look(seed, code, y, lat_c) for y in years}
    out = {y.year: np.empty((4,) + grid.shape, np.uint8) for y in years}
    shadows = {y.year: shadow_mask(key, tables, looks[y.year], grid.res) for y in years}
    tex_seed = subseed(seed, "texture")
    xs = pixel_centres(grid.transform, grid.shape)[0]
    for r0 in range(0, grid.height, STRIP):
        r1 = min(grid.height, r0 + STRIP)
        k = key[r0:r1]
        ys = pixel_centres(grid.transform, grid.shape, r0, r1 - r0)[1]
        refl = surface_reflectance(k, marks[r0:r1], xs, ys, tables, tex_seed)
        veg = tables.veg[k]
        for y in years:
            rng = rng_for(seed, "naip-noise", code, y.year, r0)
            out[y.year][:, r0:r1] = naip_dn(refl, veg, shadows[y.year][r0:r1], looks[y.year], rng, spec.naip_noise_dn)
        if acc is not None:
            acc.add(r0, r1, refl, veg, tables.water[k])
    return out


def render_naip_grid(region, spec, out_dir, seed, rasterize, tables, years, wedge, progress) -> dict:
    """State-years at another GSD: truth rasterised and rendered on their own master grid."""
    gsd = years[0].gsd
    master = region_grid(region.bbox, region.utm_epsg_nad83, spec.margin_m, gsd)
    layers = rasterize(region, f"EPSG:{master.epsg}", master.transform, master.shape)
    naip = render_master(region, master, layers, years, spec, seed, tables, None)
    del layers
    return write_quarter_quads(region, spec, out_dir, master, naip, years, wedge, progress)


def write_quarter_quads(region, spec, out_dir, master: Grid, naip: dict[int, np.ndarray], years: list[NaipYear],
                         wedge: bool, progress) -> dict:
    say = progress or (lambda s: None)
    code = region.code
    w, s, e, n = region.bbox
    lon_c, lat_c = (w + e) / 2, (s + n) / 2
    zone = region.utm_epsg_nad83 % 100
    newest = spec.years_for(code)[-1].year
    naip_out, faults = [], []
    for y in years:
        qqs = quarter_quads(region.bbox, zone, y.gsd)
        wedge_qq = pick_wedge_qq(qqs, lon_c, lat_c) if (wedge and y.year == newest) else None
        for qq in qqs:
            cell = proj_bounds(qq.cell, master.epsg)
            ov = spec.naip_overlap_m
            want = (cell[0] - ov, cell[1] - ov, cell[2] + ov, cell[3] + ov)
            mb = master.bounds
            clip = (max(want[0], mb[0]), max(want[1], mb[1]), min(want[2], mb[2]), min(want[3], mb[3]))
            if clip[2] - clip[0] < 10 * y.gsd or clip[3] - clip[1] < 10 * y.gsd:
                continue
            g = clip_grid(snapped_grid(clip, master.epsg, y.gsd, y.gsd), master)
            r, c0 = master.window_of(g)
            img = naip[y.year][:, r:r + g.height, c0:c0 + g.width]
            fname = f"{qq.name}_{y.date:%Y%m%d}"
            rel = f"naip/{code}/{y.year}/{fname}.tif"
            item_id = naip_item_id(code, qq.name, y.date)
            if qq is wedge_qq:
                img = img.copy()
                poly = apply_wedge(img, g, lon_c, lat_c)
                faults.append({"kind": "black_wedge", "collection": "naip", "state": code, "item_id": item_id,
                               "asset": "image", "href": rel,
                               "black_fraction": round(float((img.max(axis=0) <= 5).mean()), 4),
                               "wedge": footprint_ll(g, poly)})
            write_cog(out_dir / rel, np.ascontiguousarray(img), g, compress=spec.naip_compress,
                      quality=spec.naip_quality, resampling="average", blocksize=spec.blocksize,
                      band_names=("Red", "Green", "Blue", "NIR"))
            naip_out.append({"id": item_id, "state": code, "year": y.year, "date": y.date.isoformat(), "gsd": y.gsd,
                             "epsg": g.epsg, "transform": list(g.transform)[:6], "shape": [g.height, g.width],
                             "bbox_xy": list(g.bounds), "href": rel, "cell": list(qq.cell), "quad": qq.name,
                             "geometry": footprint_ll(g)})
            say(f"{code}: naip {fname}")
    return {"naip": naip_out, "faults": faults}


def clip_grid(g: Grid, master: Grid) -> Grid:
    """Shrink a grid to lie inside the master extent (whole pixels)."""
    mb = master.bounds
    x0 = g.x0 + max(0, math.ceil((mb[0] - g.x0) / g.res - 1e-9)) * g.res
    y1 = g.y1 - max(0, math.ceil((g.y1 - mb[3]) / g.res - 1e-9)) * g.res
    x1 = min(g.bounds[2], mb[2])
    y0 = max(g.bounds[1], mb[1])
    return Grid(g.epsg, x0, y1, g.res, int(math.floor((x1 - x0) / g.res + 1e-9)), int(math.floor((y1 - y0) / g.res + 1e-9)))


def pick_wedge_qq(qqs: list[QuarterQuad], lon: float, lat: float) -> QuarterQuad | None:
    """The quarter quad whose cell holds the point (else the nearest)."""
    if not qqs:
        return None
    return min(qqs, key=lambda q: (abs(q.lon0 + QQ_DEG / 2 - lon) + abs(q.lat0 + QQ_DEG / 2 - lat), q.name))


def apply_wedge(img: np.ndarray, g: Grid, lon: float, lat: float):
    """Black out a triangular wedge at the image corner nearest (lon, lat); returns it (CRS of g)."""
    import shapely
    from pyproj import Transformer
    from rasterio import features as rfeat
    x, y = Transformer.from_crs(4326, g.epsg, always_xy=True).transform(lon, lat)
    x0, y0, x1, y1 = g.bounds
    cx = x0 if abs(x - x0) <= abs(x - x1) else x1
    cy = y0 if abs(y - y0) <= abs(y - y1) else y1
    lx = (x1 - x0) * 0.6 * (1 if cx == x0 else -1)
    ly = (y1 - y0) * 0.6 * (1 if cy == y0 else -1)
    poly = shapely.Polygon([(cx, cy), (cx + lx, cy), (cx, cy + ly)])
    m = rfeat.geometry_mask([poly], out_shape=g.shape, transform=g.transform, invert=True)
    img[:, m] = 0
    return poly
