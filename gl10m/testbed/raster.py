"""The truth raster: a region's features burnt into class, mark and material layers on a grid.

classes: truth id per pixel (classes.TRUTH_CLASSES); marks: thin detail markings (MARK_NAMES) that
the imagery renderer paints so small objects are recognisable at 1 m; material: what the top
feature is made of (MATERIALS). Ways are drawn buffered to `width_m` (ground width); nodes as
discs of diameter `width_m`; a tunnel way (tunnel=yes) is drawn only as its two portals.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gl10m.testbed import classes as C
from gl10m.testbed.classes import NODATA
from gl10m.testbed.shapes import to_crs

if TYPE_CHECKING:
    from gl10m.testbed.layout import RegionWorld


def draw_shapes(region: RegionWorld, crs) -> tuple[list, np.ndarray, np.ndarray]:
    """The features as drawable polygons in `crs` (metric), in draw order; plus cover, z and material."""
    import shapely
    df = region.features
    order = np.lexsort((df["fid"].to_numpy(), df["z"].to_numpy()))
    df = df.iloc[order]
    geoms = to_crs(df.geometry.to_numpy(), crs)
    width = df["width_m"].to_numpy()
    kinds = shapely.get_type_id(geoms)  # 0 point, 1 linestring, 3 polygon, 6 multipolygon
    out = np.empty(len(geoms), dtype=object)
    is_area = (kinds == 3) | (kinds == 6)
    out[is_area] = geoms[is_area]
    pts = kinds == 0
    out[pts] = shapely.buffer(geoms[pts], np.maximum(width[pts], 1.0) / 2, quad_segs=6)
    lines = (kinds == 1) | (kinds == 5)
    tunnel = np.array([t.get("tunnel") == "yes" for t in df["tags"]])
    plain = lines & ~tunnel
    out[plain] = shapely.buffer(geoms[plain], np.maximum(width[plain], 1.0) / 2, quad_segs=4, cap_style="flat")
    for i in np.nonzero(lines & tunnel)[0]:
        g = geoms[i]
        a, b = shapely.get_point(g, 0), shapely.get_point(g, -1)
        out[i] = shapely.union(shapely.buffer(a, width[i] / 2, cap_style="square"),
                               shapely.buffer(b, width[i] / 2, cap_style="square"))
    return list(out), df["cover"].to_numpy(), df["z"].to_numpy(), df["material"].to_numpy()


def rasterio_bounds(transform, height: int, width: int) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a north-up grid."""
    return (transform.c, transform.f + height * transform.e, transform.c + width * transform.a, transform.f)


def rasterize_truth(region: RegionWorld, crs, transform, shape) -> tuple[np.ndarray, np.ndarray]:
    """Burn the region into a grid: (classes uint8 [H, W], marks uint8 [H, W]).

    classes: truth id per pixel (C.TRUTH_CLASSES), the region's base cover where nothing is
    mapped, 255 outside the region's bbox. marks: MARK id of thin markings (0 none), only where
    the feature they belong to is on top.
    """
    layers = rasterize_layers(region, crs, transform, shape)
    return layers["classes"], layers["marks"]


def _index_dtype(n: int) -> str:
    """The narrowest burn dtype for feature indices 1..n (half the memory traffic of int32)."""
    return "uint16" if n < 65535 else "int32"


def rasterize_layers(region: RegionWorld, crs, transform, shape) -> dict[str, np.ndarray]:
    """rasterize_truth's layers plus `material` (uint8 MATERIALS id per pixel, 0 outside the region):
    what the top feature is made of (a church is class religious_building, material roof)."""
    from rasterio import features as rfeat
    import shapely
    from shapely.geometry import box

    H, W = int(shape[0]), int(shape[1])
    shapes, cover, z, mat = draw_shapes(region, crs)
    # one burn of feature indices in draw order (later shapes overwrite earlier ones)
    idx = rfeat.rasterize(((g, i + 1) for i, g in enumerate(shapes) if g is not None and not g.is_empty),
                          out_shape=(H, W), transform=transform, fill=0, dtype=_index_dtype(len(shapes)))
    lut_c = np.concatenate([[region.base_cover], cover]).astype(np.uint8)
    lut_z = np.concatenate([[0], z]).astype(np.int16)
    classes = np.take(lut_c, idx)
    material = np.take(np.concatenate([[C.CLASS_MATERIAL[region.base_cover]], mat]).astype(np.uint8), idx)
    bbox = to_crs([box(*region.bbox)], crs)[0]
    if not bbox.contains(box(*rasterio_bounds(transform, H, W))):  # else every pixel is inside the region
        inside = rfeat.rasterize([(bbox, 1)], out_shape=(H, W), transform=transform, fill=0, dtype="uint8")
        classes[inside == 0] = NODATA
        material[inside == 0] = 0
    marks = np.zeros((H, W), dtype=np.uint8)
    m = region.marks
    if m is not None and len(m):
        mo = np.lexsort((np.arange(len(m)), m["z"].to_numpy()))
        mg = to_crs(m.geometry.to_numpy()[mo], crs)
        mid = m["mark"].to_numpy()[mo]
        mz = m["z"].to_numpy()[mo]
        j = rfeat.rasterize(((g, i + 1) for i, g in enumerate(mg) if g is not None and not g.is_empty),
                            out_shape=(H, W), transform=transform, fill=0, dtype=_index_dtype(len(mg)),
                            all_touched=False)
        at = np.flatnonzero(j != 0)  # marks are thin: work on their pixels only
        ja = j.ravel()[at]
        keep = (np.concatenate([[0], mz]).astype(np.int16)[ja] >= lut_z[idx.ravel()[at]]) \
            & (classes.ravel()[at] != NODATA)
        marks.ravel()[at[keep]] = np.concatenate([[0], mid]).astype(np.uint8)[ja[keep]]
    del idx
    return {"classes": classes, "marks": marks, "material": material}


def truth_grid(region: RegionWorld, res_m: float = 1.0, crs: int | None = None):
    """(crs, transform, shape) of a north-up grid covering the region's bbox at res_m in its UTM zone."""
    from pyproj import Transformer
    from rasterio.transform import from_origin
    crs = crs or region.utm_epsg_nad83
    tr = Transformer.from_crs(4326, crs, always_xy=True)
    w, s, e, n = region.bbox
    xs, ys = tr.transform([w, e, e, w], [s, s, n, n])
    x0 = math.floor(min(xs) / res_m) * res_m
    y1 = math.ceil(max(ys) / res_m) * res_m
    x1 = math.ceil(max(xs) / res_m) * res_m
    y0 = math.floor(min(ys) / res_m) * res_m
    shape = (int(round((y1 - y0) / res_m)), int(round((x1 - x0) / res_m)))
    return crs, from_origin(x0, y1, res_m, res_m), shape


def write_truth(region: RegionWorld, path: str | Path, res_m: float = 1.0, classes: np.ndarray | None = None) -> Path:
    """Write the region's truth classes on truth_grid(region, res_m) as a uint8 COG (nodata 255), atomically.

    Pass `classes` when already rasterised on that same grid (the imagery renderer does) to skip a burn.
    """
    import rasterio
    from gl10m.io import atomic_path
    crs, transform, shape = truth_grid(region, res_m)
    if classes is None:
        classes, _ = rasterize_truth(region, crs, transform, shape)
    elif classes.shape != shape or classes.dtype != np.uint8:
        raise ValueError(f"classes must be uint8 {shape} (truth_grid at {res_m} m), got {classes.dtype} {classes.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", driver="COG", width=shape[1], height=shape[0], count=1, dtype="uint8",
                           crs=f"EPSG:{crs}", transform=transform, nodata=NODATA, compress="deflate",
                           blocksize=512, overview_resampling="mode") as dst:
            dst.write(classes, 1)
            dst.update_tags(classes=",".join(C.TRUTH_CLASSES), region=region.code)
    return path
