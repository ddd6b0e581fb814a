"""Grids of the testbed's rasters (north-up, metres in a UTM CRS), NAIP quarter-quad cells,
MGRS tile names, and the COG writer every testbed raster goes through."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QQ_DEG = 3.75 / 60.0  # a quarter quad is 3.75' x 3.75'


# ------------------------------------------------------------------------------------------
# Grids, quarter quads, MGRS
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    epsg: int
    x0: float  # west
    y1: float  # north
    res: float
    width: int
    height: int

    @property
    def transform(self):
        from affine import Affine
        return Affine(self.res, 0.0, self.x0, 0.0, -self.res, self.y1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y1 - self.height * self.res, self.x0 + self.width * self.res, self.y1)

    def window_of(self, other: "Grid") -> tuple[int, int]:
        """(row, col) offset of `other` (same CRS and resolution, aligned) inside this grid."""
        col = (other.x0 - self.x0) / self.res
        row = (self.y1 - other.y1) / self.res
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise ValueError("grids are not aligned")
        return int(round(row)), int(round(col))


def proj_bounds(bbox_ll, epsg: int, densify: int = 21) -> tuple[float, float, float, float]:
    from pyproj import Transformer
    tr = Transformer.from_crs(4326, epsg, always_xy=True)
    w, s, e, n = bbox_ll
    t = np.linspace(0, 1, densify)
    lon = np.concatenate([w + (e - w) * t, np.full(densify, e), e - (e - w) * t, np.full(densify, w)])
    lat = np.concatenate([np.full(densify, s), s + (n - s) * t, np.full(densify, n), n - (n - s) * t])
    x, y = tr.transform(lon, lat)
    return float(np.min(x)), float(np.min(y)), float(np.max(x)), float(np.max(y))


def snapped_grid(bounds, epsg: int, res: float, snap: float) -> Grid:
    """The north-up grid at `res` covering `bounds`, its edges on multiples of `snap` metres."""
    x0 = math.floor(bounds[0] / snap) * snap
    y0 = math.floor(bounds[1] / snap) * snap
    x1 = math.ceil(bounds[2] / snap) * snap
    y1 = math.ceil(bounds[3] / snap) * snap
    return Grid(epsg, x0, y1, res, int(round((x1 - x0) / res)), int(round((y1 - y0) / res)))


def region_grid(bbox_ll, epsg: int, margin_m: float, res: float = 1.0) -> Grid:
    """The region's master grid: bbox + margin, edges on 60 m (so 10 m and 20 m cells nest)."""
    b = proj_bounds(bbox_ll, epsg)
    return snapped_grid((b[0] - margin_m, b[1] - margin_m, b[2] + margin_m, b[3] + margin_m), epsg, res, 60.0)


@dataclass(frozen=True)
class QuarterQuad:
    lat0: float  # south edge of the 3.75' cell
    lon0: float  # west edge
    name: str  # m_AAOOOQQ_qd_ZZ_RRR (date appended per year)

    @property
    def cell(self) -> tuple[float, float, float, float]:
        return (self.lon0, self.lat0, self.lon0 + QQ_DEG, self.lat0 + QQ_DEG)


def quarter_quads(bbox_ll, zone: int, gsd: float) -> list[QuarterQuad]:
    """DOQQ cells (3.75' x 3.75') meeting the bbox, with DOQQ-style names.

    Name: m_{lat}{lon}{quad}_{quadrant}_{zone}_{res}: the 1-degree block by its south-east
    corner (degrees N and W), the 7.5' quad numbered 01..64 from the block's north-west corner
    row by row, the quadrant (nw/ne/sw/se) of the quad, the UTM zone and the resolution in cm.
    """
    w, s, e, n = bbox_ll
    eps = 1e-9
    out = []
    for j in range(math.floor(s / QQ_DEG + eps), math.ceil(n / QQ_DEG - eps)):
        for i in range(math.floor(w / QQ_DEG + eps), math.ceil(e / QQ_DEG - eps)):
            lat0, lon0 = j * QQ_DEG, i * QQ_DEG
            clat, clon = lat0 + QQ_DEG / 2, lon0 + QQ_DEG / 2
            blat, blon = math.floor(clat), math.floor(-clon)  # block: SE corner (lat N, lon W)
            row = 7 - int((clat - blat) // 0.125)  # from the north
            col = int((-clon - blon) // 0.125)  # from the east ...
            col = 7 - col  # ... numbered from the west
            quad = row * 8 + col + 1
            ns = "n" if (clat - blat) % 0.125 >= 0.0625 else "s"
            ew = "w" if (-clon - blon) % 0.125 >= 0.0625 else "e"
            res = f"{int(round(gsd * 100)):03d}"
            out.append(QuarterQuad(round(lat0, 9), round(lon0, 9),
                                   f"m_{blat:02d}{blon:03d}{quad:02d}_{ns}{ew}_{zone:02d}_{res}"))
    return out


_MGRS_BANDS = "CDEFGHJKLMNPQRSTUVWX"
_MGRS_COLS = ("STUVWXYZ", "ABCDEFGH", "JKLMNPQR")  # zone % 3 == 0, 1, 2
_MGRS_ROWS = "ABCDEFGHJKLMNPQRSTUV"


def mgrs_tile(lon: float, lat: float, zone: int | None = None) -> str:
    """MGRS 100 km grid square of a point, e.g. '11SLT' (WGS84, AA lettering as Sentinel-2 uses)."""
    from pyproj import Transformer
    zone = zone or int(math.floor((lon + 180) / 6)) + 1
    tr = Transformer.from_crs(4326, 32600 + zone if lat >= 0 else 32700 + zone, always_xy=True)
    x, y = tr.transform(lon, lat)
    band = _MGRS_BANDS[min(int((lat + 80) // 8), len(_MGRS_BANDS) - 1)]
    col = _MGRS_COLS[zone % 3][int(x // 100000) - 1]
    row = _MGRS_ROWS[(int(y // 100000) + (5 if zone % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{col}{row}"


# ------------------------------------------------------------------------------------------
# COG writing
# ------------------------------------------------------------------------------------------
def write_cog(path: str | Path, data: np.ndarray, grid: Grid, *, compress: str = "DEFLATE", quality: int = 85,
              nodata: float | None = None, resampling: str = "average", blocksize: int = 512,
              tags: dict | None = None, band_names: tuple[str, ...] | None = None, predictor: int | None = None) -> Path:
    """Write (bands, H, W) as a Cloud-Optimised GeoTIFF (tiled, overviews), atomically."""
    import rasterio
    from gl10m.io import atomic_path

    if data.ndim == 2:
        data = data[None]
    if data.shape[1:] != grid.shape:
        raise ValueError(f"array {data.shape[1:]} does not match grid {grid.shape}")
    path = Path(path)
    opts: dict[str, Any] = dict(compress=compress, blocksize=blocksize, overview_resampling=resampling,
                                num_threads=1, bigtiff="NO")
    if compress == "JPEG":
        opts["quality"] = quality
    elif predictor:
        opts["predictor"] = predictor
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", driver="COG", width=grid.width, height=grid.height, count=data.shape[0],
                           dtype=data.dtype, crs=f"EPSG:{grid.epsg}", transform=grid.transform, nodata=nodata,
                           **opts) as dst:
            dst.write(data)
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})
            if band_names:
                for i, nm in enumerate(band_names, 1):
                    dst.set_band_description(i, nm)
        os.chmod(tmp, 0o644)  # a published dataset file, not a private temp file
    return path


def footprint_ll(grid: Grid, geom_xy=None) -> dict:
    """GeoJSON polygon (lon/lat) of a grid's extent, or of a shapely geometry in its CRS."""
    import shapely
    from pyproj import Transformer
    from shapely.geometry import box, mapping
    g = box(*grid.bounds) if geom_xy is None else geom_xy
    g = shapely.segmentize(g, max(grid.width, grid.height) * grid.res / 8)
    tr = Transformer.from_crs(grid.epsg, 4326, always_xy=True)

    def f(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.round(np.column_stack([x, y]), 7)
    g = shapely.transform(g, f)
    return mapping(shapely.normalize(g.simplify(0)))
