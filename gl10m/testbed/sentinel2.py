"""The testbed's Sentinel-2 L2A: the 1 m surface reflectance averaged over 10 x 10 m cells (the exact
10x downsample), seasonally modulated per date, blurred by a Gaussian PSF, plus sensor noise;
then clouds (SCL 8/9/10, bright), cloud shadows (SCL 3, dark) and swath-edge nodata (SCL 0 and
zero reflectance), written as granule COGs (UTM WGS84): B02/B03/B04/B08 (10 m, uint16, reflectance *
10000 plus the +1000 offset from baseline 04.00) and SCL (20 m). B08 (NIR) comes from the same
surfaces (vegetation bright, water dark) through the same steps with its own random numbers, so
B02-B04 are what they were before B08 existed."""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gl10m.testbed.imagery_spec import S2_OFFSET, ImagerySpec, S2Date
from gl10m.testbed.rastergrid import Grid
from gl10m.testbed.surface import SEASON_COEF, rng_for, season_of, subseed, value_noise

def block_mean(a: np.ndarray, k: int, dtype=np.float64) -> np.ndarray:
    """Mean over k x k blocks of the last two axes (shape divisible by k), accumulated in `dtype`
    (float64 by default; float32 is ~3x faster and differs by ~1e-7 relative)."""
    *lead, H, W = a.shape
    if np.dtype(dtype) == np.float32 and a.dtype == np.float32:
        # rows first (contiguous adds of whole rows), then the k columns of each block: ~6x faster
        # than the strided mean; the sums are float32 in another order (same ~1e-7 relative)
        s = a.reshape(*lead, H // k, k, W).sum(axis=-2)
        s = s.reshape(*lead, H // k, W // k, k).sum(axis=-1)
        s *= np.float32(1.0 / (k * k))
        return s
    return a.reshape(*lead, H // k, k, W // k, k).mean(axis=(-3, -1), dtype=dtype).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes, edges replicated."""
    if sigma <= 0:
        return a
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    pad = [(0, 0)] * (a.ndim - 2)
    b = np.pad(a, pad + [(r, r), (0, 0)], mode="edge")
    a = sum(k[i] * b[..., i:i + a.shape[-2], :] for i in range(2 * r + 1))
    b = np.pad(a, pad + [(0, 0), (r, r)], mode="edge")
    return sum(k[i] * b[..., :, i:i + a.shape[-1]] for i in range(2 * r + 1)).astype(np.float32)


def has_offset(baseline: str) -> bool:
    """L2A processing baselines >= 04.00 store reflectance * 10000 + 1000."""
    return tuple(int(p) for p in baseline.split(".")) >= (4, 0)


@dataclass
class S2Base:
    """A region's 10 m ground (exact 10x10 means of the 1 m rendering), in the S2 grid."""
    grid: Grid  # 10 m, UTM WGS84
    refl: np.ndarray  # (3, H, W) R, G, B
    vegrefl: np.ndarray  # (3, H, W) mean of refl * veg (for exact seasonal modulation)
    veg: np.ndarray  # (H, W) vegetation share
    water: np.ndarray  # (H, W) water share
    nir: np.ndarray | None = None  # (H, W) NIR (B08), as refl; None: no B08 rendered
    vegnir: np.ndarray | None = None  # (H, W) mean of NIR * veg


@dataclass
class S2Scene:
    bands: dict[str, np.ndarray]  # B02, B03, B04 (and B08 when the base has NIR) uint16 (H, W); SCL uint8 (H/2, W/2)
    cloud_pct: float
    nodata_pct: float
    valid_geom: Any  # shapely polygon in the grid CRS


def render_s2(base: S2Base, d: S2Date, date: dt.date, lat: float, seed: int, key: str, spec: ImagerySpec,
              baseline: str) -> S2Scene:
    """One granule on one date from the 10 m ground: season, PSF, noise, clouds, shadows, nodata."""
    import shapely
    from rasterio import features as rfeat
    from shapely.geometry import box

    g = base.grid
    H, W = g.height, g.width
    h2, w2 = H // 2, W // 2
    rng = rng_for(seed, "s2", key, date.isoformat())
    season = season_of(date, lat) + float(rng.uniform(-0.08, 0.08))
    coef = SEASON_COEF[[0, 1, 2]]
    refl = base.refl + base.vegrefl * (season * coef)[:, None, None]
    haze = rng.uniform(0.0, 0.01) * np.array([0.5, 0.7, 1.0], np.float32)  # R, G, B
    refl = gaussian_blur(refl, spec.s2_psf_sigma_px) + haze[:, None, None]
    refl = refl + rng.normal(0, spec.s2_noise, refl.shape).astype(np.float32)
    nir = None
    if base.nir is not None:  # B08: the same steps, its own random numbers (B02-B04 stay as they were)
        rng_n = rng_for(seed, "s2-nir", key, date.isoformat())
        nir = base.nir + base.vegnir * np.float32(season * SEASON_COEF[3])
        nir = gaussian_blur(nir, spec.s2_psf_sigma_px) + np.float32(rng_n.uniform(0.0, 0.01) * 0.3)
        nir = nir + rng_n.normal(0, spec.s2_noise, nir.shape).astype(np.float32)

    # swath-edge nodata: a slanted edge on one side of the granule (geometry first, then pixels)
    valid_geom = box(*g.bounds)
    nodata10 = np.zeros((H, W), bool)
    if d.nodata_edge > 0:
        x0, y0, x1, y1 = g.bounds
        wdt = (x1 - x0) * d.nodata_edge
        slant = (x1 - x0) * 0.15
        if rng.random() < 0.5:  # west edge
            cut = shapely.Polygon([(x0 - 1, y0 - 1), (x0 + wdt + slant, y0 - 1), (x0 + wdt - slant, y1 + 1), (x0 - 1, y1 + 1)])
        else:  # east edge
            cut = shapely.Polygon([(x1 + 1, y0 - 1), (x1 - wdt + slant, y0 - 1), (x1 - wdt - slant, y1 + 1), (x1 + 1, y1 + 1)])
        g20 = Grid(g.epsg, g.x0, g.y1, g.res * 2, w2, h2)
        nd20 = rfeat.geometry_mask([cut], out_shape=(h2, w2), transform=g20.transform, invert=True)
        # the item footprint is the union of the valid 20 m cells (what the pixels really hold)
        valid_geom = shapely.union_all([box(*b) for b in _runs_to_boxes(~nd20, g20)]) if (~nd20).any() else shapely.Polygon()
        nodata10 = np.repeat(np.repeat(nd20, 2, 0), 2, 1)

    # clouds at 20 m: thresholded noise to the target share of valid pixels
    scl20 = _land_scl(base)
    nd20 = nodata10[::2, ::2]
    valid20 = ~nd20
    cloud = np.zeros((h2, w2), np.float32)
    cloud_cls = np.zeros((h2, w2), np.uint8)
    if d.cloud_pct > 0 and valid20.any():
        ys = np.arange(h2, dtype=np.float64)
        xs = np.arange(w2, dtype=np.float64)
        k = subseed(seed, "cloud", key, date.isoformat())
        field = value_noise(xs, ys, 22.0, k) + 0.5 * value_noise(xs, ys, 7.0, k + 1) + 0.25 * value_noise(xs, ys, 2.5, k + 2)
        thr = np.quantile(field[valid20], 1 - d.cloud_pct / 100.0)
        is_cloud = (field >= thr) & valid20
        core = field >= thr + 0.35 * (field.max() - thr)
        cirrus = value_noise(xs, ys, 30.0, k + 3) > 0.35
        cloud_cls[is_cloud] = 8
        cloud_cls[is_cloud & core] = 9
        cloud_cls[is_cloud & ~core & cirrus] = 10
        opacity = {8: 0.55, 9: 0.9, 10: 0.25}
        for c, o in opacity.items():
            cloud[cloud_cls == c] = o
        # shadows: the cloud mask shifted away from the sun, where there is no cloud
        dy, dx = int(rng.integers(6, 14)), int(rng.integers(-12, -4))
        sh = np.zeros((h2, w2), bool)
        src = np.isin(cloud_cls, (8, 9))
        ys0, ys1 = max(0, dy), h2 + min(0, dy)
        xs0, xs1 = max(0, dx), w2 + min(0, dx)
        sh[ys0:ys1, xs0:xs1] = src[ys0 - dy:ys1 - dy, xs0 - dx:xs1 - dx]
        sh &= (cloud_cls == 0) & valid20
        scl20 = np.where(sh, np.uint8(3), scl20)
        scl20 = np.where(cloud_cls > 0, cloud_cls, scl20)
        cloud10 = np.repeat(np.repeat(cloud, 2, 0), 2, 1)
        shadow10 = np.repeat(np.repeat(sh, 2, 0), 2, 1)
        white = (0.55 + 0.08 * value_noise(np.arange(W, dtype=float), np.arange(H, dtype=float), 5.0, k + 4)).astype(np.float32)
        refl = refl * (1 - cloud10) + white * cloud10
        refl = np.where(shadow10, refl * np.float32(0.4), refl)
        if nir is not None:
            nir = nir * (1 - cloud10) + white * cloud10
            nir = np.where(shadow10, nir * np.float32(0.4), nir)
    scl20 = np.where(nd20, np.uint8(0), scl20).astype(np.uint8)

    offset = S2_OFFSET if has_offset(baseline) else 0
    dn = np.clip(np.rint(refl * 10000.0) + offset, 1, 65535).astype(np.uint16)
    dn[:, nodata10] = 0
    bands = {"B04": dn[0], "B03": dn[1], "B02": dn[2], "SCL": scl20}
    if nir is not None:
        b08 = np.clip(np.rint(nir * 10000.0) + offset, 1, 65535).astype(np.uint16)
        b08[nodata10] = 0
        bands["B08"] = b08
    n_valid = int(valid20.sum())
    cloudy = int(np.isin(scl20, (8, 9, 10)).sum())
    return S2Scene(
        bands=bands,
        cloud_pct=round(100.0 * cloudy / n_valid, 4) if n_valid else 100.0,
        nodata_pct=round(100.0 * float(nd20.mean()), 4),
        valid_geom=valid_geom)


def _runs_to_boxes(mask: np.ndarray, grid: Grid):
    """Row runs of True cells as (x0, y0, x1, y1) boxes (merged later by union)."""
    out = []
    for r in range(mask.shape[0]):
        row = mask[r]
        if not row.any():
            continue
        d = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
        ytop = grid.y1 - r * grid.res
        for a, b in zip(starts, ends):
            out.append((grid.x0 + a * grid.res, ytop - grid.res, grid.x0 + b * grid.res, ytop))
    return out


def _land_scl(base: S2Base) -> np.ndarray:
    """SCL of the ground at 20 m: 6 water, 4 vegetation, 5 not vegetated."""
    water = block_mean(base.water, 2)
    veg = block_mean(base.veg, 2)
    return np.where(water >= 0.5, 6, np.where(veg >= 0.5, 4, 5)).astype(np.uint8)


def s2_times(seed: int, state: str, lon: float, d: S2Date, jitter: int) -> tuple[dt.datetime, str, int]:
    """Sensing time (10:30 local solar), platform and relative orbit of a region's acquisition."""
    rng = rng_for(seed, "s2-orbit", state)
    shift = int(rng.integers(-jitter, jitter + 1)) if jitter else 0
    day = d.date + dt.timedelta(days=shift)
    hours = 10.5 - lon / 15.0
    t = dt.datetime.combine(day, dt.time(0), tzinfo=dt.timezone.utc) + dt.timedelta(hours=hours)
    t = t.replace(microsecond=24000 * (1 + int(rng.integers(0, 40))))
    platform = "Sentinel-2A" if (day.toordinal() // 5) % 2 == 0 else "Sentinel-2B"
    orbit = 1 + int((lon + 180) * 143 / 360 * 7) % 143
    return t, platform, orbit


class Acc10:
    """10 m means of the 1 m rendering, on the master's own 10 m cells (edges on 60 m)."""

    def __init__(self, master: Grid):
        h, w = master.height // 10, master.width // 10
        self.refl = np.empty((3, h, w), np.float32)
        self.vegrefl = np.empty((3, h, w), np.float32)
        self.veg = np.empty((h, w), np.float32)
        self.water = np.empty((h, w), np.float32)
        self.nir = np.empty((h, w), np.float32)
        self.vegnir = np.empty((h, w), np.float32)

    def add(self, r0: int, r1: int, refl: np.ndarray, veg: np.ndarray, water: np.ndarray) -> None:
        q0, q1 = r0 // 10, r1 // 10
        self.refl[:, q0:q1] = block_mean(refl[:3], 10)
        self.vegrefl[:, q0:q1] = block_mean(refl[:3] * veg, 10)
        self.veg[q0:q1] = block_mean(veg, 10)
        self.water[q0:q1] = block_mean(water, 10)
        self.nir[q0:q1] = block_mean(refl[3], 10)
        self.vegnir[q0:q1] = block_mean(refl[3] * veg, 10)
