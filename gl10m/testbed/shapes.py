"""Geometry helpers of the layout and its recipes (local metres, UTM), and cached CRS transformers."""
from __future__ import annotations

import functools
import math

import numpy as np


def _shp():
    import shapely
    from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
    return shapely, LineString, MultiPolygon, Point, Polygon, box


def blob(rect, rng, n=28, rough=0.22, fill=0.96):
    """A smooth, irregular polygon inscribed in rect (x0, y0, x1, y1)."""
    from shapely.geometry import Polygon
    x0, y0, x1, y1 = rect
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * fill, (y1 - y0) / 2 * fill
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    noise = np.zeros(n)
    for k in (2, 3, 5):
        noise += rng.uniform(0, 1) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) / k
    noise = (noise - noise.min()) / max(np.ptp(noise), 1e-9)
    f = 1 - rough * noise
    # squarish superellipse so blobs fill their parcels like real land cover
    c, s = np.cos(t), np.sin(t)
    e = 0.6
    px = cx + rx * f * np.sign(c) * np.abs(c) ** e
    py = cy + ry * f * np.sign(s) * np.abs(s) ** e
    return Polygon(np.column_stack([px, py]).round(2))


def jrect(rect, rng, j=4.0):
    """A rectangle with its corners jittered inward by up to j metres."""
    from shapely.geometry import Polygon
    x0, y0, x1, y1 = rect
    d = rng.uniform(0, j, size=8)
    return Polygon([(x0 + d[0], y0 + d[1]), (x1 - d[2], y0 + d[3]), (x1 - d[4], y1 - d[5]), (x0 + d[6], y1 - d[7])])


def box(x0, y0, x1, y1):
    """An axis-aligned shapely box from two corners in any order."""
    from shapely.geometry import box as shapely_box
    return shapely_box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def sub_rect(rect, fx0, fy0, fx1, fy1):
    """The part of rect (x0, y0, x1, y1) between the fractions fx0..fx1 and fy0..fy1 of its width and height."""
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    return (x0 + fx0 * w, y0 + fy0 * h, x0 + fx1 * w, y0 + fy1 * h)


def lines_across(poly, spacing, angle_deg, rng):
    """Parallel lines across a polygon (crop rows, solar rows, parking stripes), clipped to it."""
    from shapely.geometry import MultiLineString
    from shapely import affinity
    x0, y0, x1, y1 = poly.bounds
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = math.hypot(x1 - x0, y1 - y0) / 2 + spacing
    off = rng.uniform(0, spacing)
    ys = np.arange(-r + off, r, spacing)
    ml = MultiLineString([[(cx - r, cy + y), (cx + r, cy + y)] for y in ys])
    ml = affinity.rotate(ml, angle_deg, origin=(cx, cy))
    return ml.intersection(poly)


@functools.lru_cache(maxsize=64)
def transformer(src, dst):
    """A cached always_xy pyproj Transformer (building one costs ~5 ms)."""
    from pyproj import Transformer
    return Transformer.from_crs(src, dst, always_xy=True)


@functools.lru_cache(maxsize=32)
def transformer_from_4326(crs):
    """A cached always_xy pyproj Transformer from EPSG:4326 to `crs` (any form pyproj reads)."""
    from pyproj import CRS, Transformer
    return Transformer.from_crs(4326, CRS.from_user_input(crs), always_xy=True)


def to_crs(geoms, crs):
    """An array of shapely geometries in EPSG:4326 transformed to `crs`."""
    import shapely
    tr = transformer_from_4326(crs)

    def f(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])
    return shapely.transform(np.asarray(geoms, dtype=object), f)
