"""Scene geometry: footprints, the 10x10 tile grid, ground pixel sizes, equal-area helpers.

Conventions (GL-10M):
- A scene footprint is a square box of ``profile.geometry.footprint_deg`` degrees (0.024) in
  EPSG:4326, centred on the scene's anchor point. Bounds are ``(west, south, east, north)``.
- The footprint is split into ``grid x grid`` tiles (10 x 10). Tile index = ``row * grid + col``
  with row 0 = north (top) and col 0 = west: tile 0 is the north-west corner, tile 9 the
  north-east, tile 90 the south-west, tile 99 the south-east. Tile edges are shared exactly
  (the same float for both neighbours, the outer edges are the footprint's own), so the tiles
  tessellate the footprint with no gap and no overlap.
- Degree footprints have anisotropic ground pixels: 0.024 degrees of longitude is ~2.42 km at
  25N and ~1.75 km at 49N, while 0.024 degrees of latitude is ~2.66 km everywhere.
  :func:`pixel_size_m` gives the ground size of one pixel along x and y on the WGS84 ellipsoid.
- Areas and overlaps are measured in EPSG:6933 (WGS84 / NSIDC EASE-Grid 2.0 Global), a
  cylindrical equal-area projection: x is linear in longitude and y depends on latitude only,
  so a longitude/latitude box is exactly an axis-aligned rectangle there and its area is exact.

All functions are pure and vectorised over numpy arrays where it matters.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import shapely
from pyproj import CRS, Transformer

EQUAL_AREA_EPSG = 6933
WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)


# -- footprints and the tile grid ----------------------------------------------------------
def footprint_bounds(lon, lat, size_deg: float) -> np.ndarray:
    """Bounds ``[..., (west, south, east, north)]`` of square boxes of `size_deg` centred on points."""
    lon = np.asarray(lon, dtype="float64")
    lat = np.asarray(lat, dtype="float64")
    if size_deg <= 0:
        raise ValueError(f"footprint size must be > 0 degrees, got {size_deg}")
    h = size_deg / 2.0
    return np.stack([lon - h, lat - h, lon + h, lat + h], axis=-1)


def boxes(bounds) -> np.ndarray:
    """Shapely polygons for bounds ``[..., 4]`` (west, south, east, north)."""
    b = np.asarray(bounds, dtype="float64")
    return shapely.box(b[..., 0], b[..., 1], b[..., 2], b[..., 3])


def grid_edges(bounds, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile edges of footprints ``[n, 4]``: (x_edges ``[n, grid+1]`` west->east, y_edges
    ``[n, grid+1]`` north->south). The outer edges are the footprint bounds exactly."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    b = np.atleast_2d(np.asarray(bounds, dtype="float64"))
    t = np.arange(grid + 1, dtype="float64") / grid
    w, s, e, n = b[:, 0:1], b[:, 1:2], b[:, 2:3], b[:, 3:4]
    xe = w + (e - w) * t
    ye = n - (n - s) * t
    xe[:, 0], xe[:, -1] = b[:, 0], b[:, 2]
    ye[:, 0], ye[:, -1] = b[:, 3], b[:, 1]
    return xe, ye


def tile_bounds(bounds, grid: int) -> np.ndarray:
    """Bounds of the tiles of footprints ``[n, 4]`` -> ``[n, grid*grid, 4]`` in tile-index order
    (index = row*grid + col, row 0 = north, col 0 = west)."""
    xe, ye = grid_edges(bounds, grid)
    n = xe.shape[0]
    col = np.tile(np.arange(grid), grid)  # index -> col
    row = np.repeat(np.arange(grid), grid)  # index -> row
    out = np.empty((n, grid * grid, 4), dtype="float64")
    out[:, :, 0] = xe[:, col]
    out[:, :, 2] = xe[:, col + 1]
    out[:, :, 3] = ye[:, row]
    out[:, :, 1] = ye[:, row + 1]
    return out


def tile_index(row, col, grid: int) -> np.ndarray:
    """Tile index of (row from north, col from west)."""
    row, col = np.asarray(row), np.asarray(col)
    if np.any((row < 0) | (row >= grid) | (col < 0) | (col >= grid)):
        raise ValueError(f"row/col outside a {grid}x{grid} grid")
    return row * grid + col


def tile_row_col(index, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(row from north, col from west) of tile indices."""
    index = np.asarray(index)
    return index // grid, index % grid


def tile_of_point(lon, lat, bounds, grid: int) -> np.ndarray:
    """Index of the tile of each footprint that holds each point; -1 outside the footprint.
    Points on a shared edge belong to the tile to their south / east (the outer north/west
    edges belong to the first row/col, the outer south/east edges to the last)."""
    lon = np.asarray(lon, dtype="float64")
    lat = np.asarray(lat, dtype="float64")
    b = np.asarray(bounds, dtype="float64")
    w, s, e, n = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    col = np.floor((lon - w) / (e - w) * grid).astype("int64")
    row = np.floor((n - lat) / (n - s) * grid).astype("int64")
    inside = (lon >= w) & (lon <= e) & (lat >= s) & (lat <= n)
    col = np.clip(col, 0, grid - 1)
    row = np.clip(row, 0, grid - 1)
    return np.where(inside, row * grid + col, -1)


# -- ground size --------------------------------------------------------------------------
def metres_per_degree(lat) -> tuple[np.ndarray, np.ndarray]:
    """Length in metres of one degree of longitude (along the parallel) and of latitude (along
    the meridian) at latitude `lat`, on the WGS84 ellipsoid."""
    phi = np.radians(np.asarray(lat, dtype="float64"))
    s2 = np.sin(phi) ** 2
    w = np.sqrt(1.0 - WGS84_E2 * s2)
    lon_m = np.pi / 180.0 * WGS84_A * np.cos(phi) / w
    lat_m = np.pi / 180.0 * WGS84_A * (1.0 - WGS84_E2) / w**3
    return lon_m, lat_m


def pixel_size_m(lat, span_deg: float, n_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground size (x metres, y metres) of one pixel when `span_deg` degrees (both axes) are
    rendered as `n_px` pixels, at latitude `lat`. x shrinks with cos(lat); y barely changes."""
    if n_px < 1:
        raise ValueError(f"n_px must be >= 1, got {n_px}")
    lon_m, lat_m = metres_per_degree(lat)
    return lon_m * span_deg / n_px, lat_m * span_deg / n_px


# -- equal-area projection ----------------------------------------------------------------
@lru_cache(maxsize=4)
def _transformer(epsg: int) -> Transformer:
    return Transformer.from_crs(CRS.from_epsg(4326), CRS.from_epsg(epsg), always_xy=True)


def to_equal_area_xy(lon, lat, epsg: int = EQUAL_AREA_EPSG) -> tuple[np.ndarray, np.ndarray]:
    """Project longitude/latitude arrays to the equal-area CRS (metres)."""
    x, y = _transformer(epsg).transform(np.asarray(lon, dtype="float64"), np.asarray(lat, dtype="float64"))
    return np.asarray(x), np.asarray(y)


def to_equal_area(geoms, epsg: int = EQUAL_AREA_EPSG) -> np.ndarray:
    """Project EPSG:4326 shapely geometries (array) to the equal-area CRS, vertex by vertex."""
    tr = _transformer(epsg)

    def f(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(np.asarray(geoms, dtype=object), f)


def equal_area_bounds(bounds, epsg: int = EQUAL_AREA_EPSG) -> np.ndarray:
    """Bounds ``[..., 4]`` in degrees -> the same boxes in the equal-area CRS ``[..., 4]``.
    Exact for EPSG:6933 (cylindrical: a lon/lat box is a rectangle there)."""
    b = np.asarray(bounds, dtype="float64")
    x0, y0 = to_equal_area_xy(b[..., 0], b[..., 1], epsg)
    x1, y1 = to_equal_area_xy(b[..., 2], b[..., 3], epsg)
    return np.stack([x0, y0, x1, y1], axis=-1)


def box_area_m2(bounds, epsg: int = EQUAL_AREA_EPSG) -> np.ndarray:
    """Area in m^2 of lon/lat boxes ``[..., 4]`` (exact: EPSG:6933 is equal-area on the WGS84 ellipsoid)."""
    p = equal_area_bounds(bounds, epsg)
    return (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])


def overlap_fraction(bounds_a, bounds_b, epsg: int = EQUAL_AREA_EPSG) -> np.ndarray:
    """Overlap of box pairs as a fraction of the smaller box, measured in the equal-area CRS.

    0 when the boxes are disjoint or only share an edge; 1 when one contains the other.
    Broadcasts over leading dimensions of ``[..., 4]`` bounds.
    """
    a = equal_area_bounds(bounds_a, epsg)
    b = equal_area_bounds(bounds_b, epsg)
    return overlap_fraction_projected(a, b)


def overlap_fraction_projected(a, b) -> np.ndarray:
    """`overlap_fraction` for boxes already in projected (equal-area) coordinates."""
    a = np.asarray(a, dtype="float64")
    b = np.asarray(b, dtype="float64")
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.minimum(area_a, area_b)


# -- representative points ----------------------------------------------------------------
def representative_points(geoms) -> tuple[np.ndarray, np.ndarray]:
    """A point guaranteed inside each (multi)polygon (GEOS point-on-surface, not the centroid,
    which can fall outside a C-shaped or multi-part feature). Returns (lon, lat) arrays."""
    g = np.asarray(geoms, dtype=object)
    if len(g) and shapely.is_empty(g).any():
        raise ValueError("representative_points: an empty geometry has no point on its surface")
    pts = shapely.point_on_surface(g)
    return shapely.get_x(pts), shapely.get_y(pts)
