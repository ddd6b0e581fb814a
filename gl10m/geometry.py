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


# -- georeferencing: the transforms of a sample's images -----------------------------------
# A sample's meta.json carries a ``georef`` block (written by :func:`georef_meta`, read by
# :func:`tile_transform` / :func:`image_bounds`; documented in the dataset card):
#
#   "georef": {"crs": "EPSG:4326", "transform_order": GDAL_ORDER,
#              "lr": {"transform": [6 floats], "width": 268, "height": 268},
#              "hr": {"transform": [6 floats], "width": 2680, "height": 2680},   # the HR mosaic
#              "tiles": {"grid": 10, "width": 268, "height": 268, "index": ..., "rule": TILE_RULE}}
#
# Tile transforms are not stored one by one: tile i is the block (row, col) = divmod(i, grid) of
# the HR mosaic, so its transform is the mosaic's with the origin moved by whole tiles (TILE_RULE).
# That is exact by construction (the tiles ARE those blocks of the mosaic's pixels), one line for
# any reader, and 100 stored transforms would add ~10 KB of JSON to every meta.json (more than
# the rest of it) that could only repeat the mosaic's.
GEOREF_CRS = "EPSG:4326"
GDAL_ORDER = ("GDAL geotransform: [x_origin (west edge), pixel_width, row_rotation (0), "
              "y_origin (north edge), column_rotation (0), pixel_height (negative: north-up)]; "
              "x = lon, y = lat of a pixel's corner: x = t[0] + col*t[1], y = t[3] + row*t[5]")
TILE_RULE = ("tile i: row, col = divmod(i, grid); transform = [hr[0] + col*width*hr[1], hr[1], 0.0, "
             "hr[3] + row*height*hr[5], 0.0, hr[5]] with hr = georef.hr.transform")
GEOREF_TOL_DEG = 1e-9  # ~0.1 mm: how far a transform's edges may sit from the footprint's in float


def grid_transform(bounds, width: int, height: int) -> list[float]:
    """The GDAL geotransform of a north-up ``width x height`` grid over `bounds` (west, south,
    east, north): pixel (0, 0) at the north-west corner. The same numbers as rasterio's
    ``from_bounds(*bounds, width, height).to_gdal()``."""
    w, s, e, n = (float(v) for v in bounds)
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"grid size must be positive, got {width} x {height}")
    return [w, (e - w) / int(width), 0.0, n, 0.0, (s - n) / int(height)]


def transform_bounds(transform, width: int, height: int) -> tuple[float, float, float, float]:
    """(west, south, east, north) covered by a north-up ``width x height`` image with this GDAL
    geotransform."""
    t = [float(v) for v in transform]
    if len(t) != 6 or t[2] != 0.0 or t[4] != 0.0:
        raise ValueError(f"not a north-up GDAL geotransform: {transform!r}")
    return (t[0], t[3] + int(height) * t[5], t[0] + int(width) * t[1], t[3])


def georef_meta(lr_grid, hr_grid, grid: int) -> dict:
    """The ``georef`` block of a sample's meta.json from its LR and HR grids (anything with
    ``bounds``, ``width`` and ``height``, e.g. :class:`gl10m.compose.Grid`) and the tile grid
    (`grid` x `grid` tiles cut from the HR grid)."""
    grid = int(grid)
    if hr_grid.width % grid or hr_grid.height % grid:
        raise ValueError(f"HR grid {hr_grid.width}x{hr_grid.height} does not split into {grid}x{grid} tiles")
    return {"crs": GEOREF_CRS, "transform_order": GDAL_ORDER,
            "lr": {"transform": grid_transform(lr_grid.bounds, lr_grid.width, lr_grid.height),
                   "width": int(lr_grid.width), "height": int(lr_grid.height)},
            "hr": {"transform": grid_transform(hr_grid.bounds, hr_grid.width, hr_grid.height),
                   "width": int(hr_grid.width), "height": int(hr_grid.height)},
            "tiles": {"grid": grid, "width": int(hr_grid.width) // grid, "height": int(hr_grid.height) // grid,
                      "index": "row*grid + col, row 0 = north, col 0 = west", "rule": TILE_RULE}}


def _georef(meta: dict) -> dict:
    g = meta.get("georef") if isinstance(meta, dict) else None
    if not isinstance(g, dict):
        raise ValueError("meta.json has no georef block (a sample built before gl10m wrote georeferencing?)")
    return g


def lr_transform(meta: dict) -> list[float]:
    """The LR image's GDAL geotransform from a sample's meta.json."""
    return [float(v) for v in _georef(meta)["lr"]["transform"]]


def tile_transform(meta: dict, i: int) -> list[float]:
    """HR tile `i`'s GDAL geotransform from a sample's meta.json (the block's ``tiles.rule``)."""
    g = _georef(meta)
    t, hr = g["tiles"], [float(v) for v in g["hr"]["transform"]]
    grid = int(t["grid"])
    if not 0 <= int(i) < grid * grid:
        raise ValueError(f"tile index {i} is outside 0..{grid * grid - 1}")
    row, col = divmod(int(i), grid)
    return [hr[0] + col * int(t["width"]) * hr[1], hr[1], 0.0, hr[3] + row * int(t["height"]) * hr[5], 0.0, hr[5]]


def image_bounds(meta: dict, image: str | int) -> tuple[float, float, float, float]:
    """(west, south, east, north) of ``"lr"``, ``"hr"`` (the mosaic) or HR tile `image` (an int)."""
    g = _georef(meta)
    if isinstance(image, str):
        if image not in ("lr", "hr"):
            raise ValueError(f"image must be 'lr', 'hr' or a tile index, got {image!r}")
        return transform_bounds(g[image]["transform"], g[image]["width"], g[image]["height"])
    return transform_bounds(tile_transform(meta, image), g["tiles"]["width"], g["tiles"]["height"])


def georef_problems(meta: dict, *, lr_size: int | None = None, tile_size: int | None = None,
                    tol: float = GEOREF_TOL_DEG) -> list[str]:
    """What is wrong with a sample's ``georef`` block against its own footprint ([] when nothing):
    the CRS, north-up transforms, the LR image and the HR mosaic covering the footprint exactly,
    the tiles (by the rule) tiling it (tile 0 at the north-west corner, the last at the
    south-east, neighbours sharing edges), and the sizes against the decoded images when given."""
    try:
        g = _georef(meta)
        fp = meta["footprint"]
        foot = tuple(float(fp[k]) for k in ("west", "south", "east", "north"))
    except (ValueError, KeyError, TypeError) as e:
        return [str(e) if isinstance(e, ValueError) else f"meta.json has no usable footprint ({e})"]
    out: list[str] = []

    def near(a, b) -> bool:
        return all(abs(x - y) <= tol for x, y in zip(a, b))

    try:
        if g.get("crs") != GEOREF_CRS:
            out.append(f"georef crs {g.get('crs')!r} is not {GEOREF_CRS}")
        for name in ("lr", "hr"):
            b = image_bounds(meta, name)
            if not near(b, foot):
                out.append(f"georef {name} transform covers {b}, not the footprint {foot}")
        t = g["tiles"]
        grid, tw, th = int(t["grid"]), int(t["width"]), int(t["height"])
        if (tw * grid, th * grid) != (int(g["hr"]["width"]), int(g["hr"]["height"])):
            out.append(f"georef tiles {grid}x{grid} of {tw}x{th} px do not make the HR mosaic")
        if lr_size is not None and (int(g["lr"]["width"]), int(g["lr"]["height"])) != (lr_size, lr_size):
            out.append(f"georef lr size {g['lr']['width']}x{g['lr']['height']} is not the image's {lr_size}")
        if tile_size is not None and (tw, th) != (tile_size, tile_size):
            out.append(f"georef tile size {tw}x{th} is not the tiles' {tile_size}")
        want = tile_bounds([foot], grid)[0]
        for i in range(grid * grid):
            b = image_bounds(meta, i)
            if not near(b, want[i]):
                out.append(f"georef tile {i} covers {b}, not its part of the footprint {tuple(want[i])}")
                break
    except (KeyError, TypeError, ValueError) as e:
        out.append(f"georef block is malformed ({type(e).__name__}: {e})")
    return out
