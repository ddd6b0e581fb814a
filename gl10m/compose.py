"""Pixels of a scene: footprint grids, the Sentinel-2 median composite, the NAIP mosaic.

Plain array/raster functions, no I/O of their own beyond reading a window from an already open
rasterio dataset (opening, signing, retrying and typed rejections live in ``gl10m.fetch``).

Grids. A scene footprint ``(west, south, east, north)`` in EPSG:4326 gets two pixel grids: the
LR grid (268 x 268) and the HR grid (2680 x 2680), both north-up, pixel (0, 0) at the north-west
corner. The HR grid cut into 10 x 10 blocks of 268 x 268 gives the tiles, index ``row*10 + col``
with row 0 at the north and col 0 at the west; the tiles tessellate the LR footprint exactly.
Degree pixels are anisotropic on the ground: :func:`ground_px_m` says by how much.

Sentinel-2 LR. Each selected granule contributes its B04/B03/B02 (10 m) and SCL (20 m) windows
over the footprint, read in the granule's own UTM grid and reprojected to the LR grid (bilinear
for reflectance, nearest for SCL). DN 0 is L2A no-data. Harmonisation subtracts the profile's
offset (+1000) only when the item's processing baseline (item metadata, never the date) is at or
above the profile's ``offset_baseline`` (04.00), then divides by 10000 and clips at 0 (as a
harmonised collection does). Pixels whose SCL class is in the profile mask are dropped, and the
per-pixel median over the remaining dates (the same dates for all three bands) is stretched from
reflectance ``stretch[0]..stretch[1]`` to 0..255 (R, G, B = B04, B03, B02).

NAIP HR. Quarter-quads of one state-year are read as bands 1, 2, 3 (R, G, B; band 4, the N
band, only when the profile's ``imagery.bands`` asks for it: it is carried through the same warp
and mosaic as an extra band and never touches R, G, B), reprojected bilinearly (float32, rounded
to uint8) straight onto the HR grid with their coverage (no-data = declared nodata / internal
mask, and pixels black in all three bands, the DOQQ collar; it never darkens a valid neighbour),
and mosaicked first-valid-wins (a pixel a
quarter-quad covers fully before one it covers in part), so overlapping quarter-quads fill each
other's collars and no black seam can appear where one ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds as window_from_bounds

WGS84 = CRS.from_epsg(4326)
S2_NODATA_DN = 0          # L2A: DN 0 is no-data in every band
SCL_NODATA = 0            # SCL class 0 = no data
S2_SCALE = 10000.0        # L2A reflectance = DN / 10000 (after the offset)
RGB_BANDS = (1, 2, 3)     # NAIP band order R, G, B, N: these three always
RGBN_BANDS = (1, 2, 3, 4)  # ... and N when imagery.bands is rgbn or raw

Bounds = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid in EPSG:4326 over a footprint."""

    bounds: Bounds
    width: int
    height: int

    @property
    def transform(self) -> Affine:
        from gl10m.geometry import grid_transform  # the one definition (meta.json's georef uses it too)

        return Affine.from_gdal(*grid_transform(self.bounds, self.width, self.height))

    @property
    def crs(self) -> CRS:
        return WGS84

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def px_deg(self) -> tuple[float, float]:
        w, s, e, n = self.bounds
        return ((e - w) / self.width, (n - s) / self.height)


def _check_bounds(bounds: Bounds) -> Bounds:
    w, s, e, n = (float(v) for v in bounds)
    if not (all(math.isfinite(v) for v in (w, s, e, n)) and -180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise ValueError(f"footprint {bounds!r} is not (west, south, east, north) in degrees")
    return (w, s, e, n)


def footprint_grid(bounds: Bounds, size: int) -> Grid:
    """A ``size x size`` grid over `bounds` (west, south, east, north)."""
    if int(size) <= 0:
        raise ValueError(f"grid size must be positive, got {size}")
    return Grid(_check_bounds(bounds), int(size), int(size))


def lr_grid(bounds: Bounds, profile) -> Grid:
    return footprint_grid(bounds, profile.geometry.lr_px)


def hr_grid(bounds: Bounds, profile) -> Grid:
    return footprint_grid(bounds, profile.geometry.hr_px)


def tile_bounds(bounds: Bounds, grid: int) -> list[Bounds]:
    """The `grid` x `grid` tile footprints, index ``row*grid + col`` (row 0 north, col 0 west);
    :func:`gl10m.geometry.tile_bounds` for one footprint (shared edges are the same floats)."""
    from gl10m.geometry import tile_bounds as _tb

    return [tuple(float(v) for v in b) for b in _tb([_check_bounds(bounds)], grid)[0]]


def cut_tiles(mosaic: np.ndarray, grid: int) -> np.ndarray:
    """[H, W, C] -> [grid*grid, H/grid, W/grid, C], index ``row*grid + col`` from the north-west.
    A band-sequential mosaic (a [C, H, W] array seen as [H, W, C], :meth:`Mosaic.result`) is
    copied band by band: one interleaving pass, ~4x faster than a general transposed copy."""
    h, w, c = mosaic.shape
    if h % grid or w % grid:
        raise ValueError(f"mosaic {h}x{w} does not split into a {grid}x{grid} grid")
    th, tw = h // grid, w // grid
    blocks = mosaic.reshape(grid, th, grid, tw, c)  # splits axes: a view, whatever the strides
    if c == 1 or mosaic.strides[2] == mosaic.itemsize:
        return np.ascontiguousarray(blocks.swapaxes(1, 2).reshape(grid * grid, th, tw, c))
    out = np.empty((grid, grid, th, tw, c), mosaic.dtype)
    for k in range(c):
        out[..., k] = blocks[..., k].swapaxes(1, 2)
    return out.reshape(grid * grid, th, tw, c)


def join_tiles(tiles: np.ndarray) -> np.ndarray:
    """Inverse of :func:`cut_tiles`: [grid*grid, th, tw, C] -> [grid*th, grid*tw, C]."""
    n, th, tw, c = tiles.shape
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
        raise ValueError(f"{n} tiles do not form a square grid")
    return np.ascontiguousarray(tiles.reshape(grid, grid, th, tw, c).swapaxes(1, 2).reshape(grid * th, grid * tw, c))


def sub_grid(grid: Grid, bounds: Bounds, pad: int = 1) -> tuple[Grid, int, int] | None:
    """The part of `grid` (whole pixels, plus `pad`) that covers `bounds` (EPSG:4326), as
    (sub-grid, row offset, col offset); None when they do not overlap. The sub-grid's pixels
    are the parent's pixels."""
    w, s, e, n = grid.bounds
    dx, dy = grid.px_deg
    c0 = max(math.floor((bounds[0] - w) / dx) - pad, 0)
    c1 = min(math.ceil((bounds[2] - w) / dx) + pad, grid.width)
    r0 = max(math.floor((n - bounds[3]) / dy) - pad, 0)
    r1 = min(math.ceil((n - bounds[1]) / dy) + pad, grid.height)
    if c1 <= c0 or r1 <= r0:
        return None
    sb = (w + (e - w) * c0 / grid.width, n - (n - s) * r1 / grid.height,
          w + (e - w) * c1 / grid.width, n - (n - s) * r0 / grid.height)
    return Grid(sb, c1 - c0, r1 - r0), r0, c0


def ground_px_m(grid: Grid) -> tuple[float, float]:
    """Ground size (metres) of one pixel along x (east) and y (north) at the footprint's centre
    latitude (:func:`gl10m.geometry.pixel_size_m` on the WGS84 ellipsoid)."""
    from gl10m.geometry import metres_per_degree

    w, s, e, n = grid.bounds
    lon_m, lat_m = metres_per_degree((s + n) / 2)
    return (float(lon_m) * (e - w) / grid.width, float(lat_m) * (n - s) / grid.height)


# ---------------------------------------------------------------------------------------------
# Reading a window of an open dataset and putting it on a grid
# ---------------------------------------------------------------------------------------------
def source_window(ds, bounds: Bounds, pad: int = 3) -> Window | None:
    """The window of open dataset `ds` covering the EPSG:4326 `bounds` (plus `pad` pixels for
    the resampling kernel), clipped to the dataset; None when they do not overlap."""
    b = transform_bounds(WGS84, ds.crs, *bounds, densify_pts=21)
    win = window_from_bounds(*b, transform=ds.transform)
    c0 = math.floor(win.col_off) - pad
    r0 = math.floor(win.row_off) - pad
    c1 = math.ceil(win.col_off + win.width) + pad
    r1 = math.ceil(win.row_off + win.height) + pad
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, ds.width), min(r1, ds.height)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


WARP_BLOCK = 268     # HR pixels per side of a block mapped exactly (bilinear in between: < 0.001 px off)
LR_WARP_BLOCK = 27   # the same ground size on the LR grid


def warp_to_grid(src: np.ndarray, src_transform: Affine, src_crs, grid: Grid, resampling: Resampling,
                 *, nodata) -> np.ndarray:
    """Reproject [B, h, w] (or [h, w]) onto `grid`; pixels without a source stay `nodata`.

    Single-threaded GDAL warp: the result does not depend on how many threads a machine has.
    """
    squeeze = src.ndim == 2
    s = src[None] if squeeze else src
    dst = np.full((s.shape[0], grid.height, grid.width), nodata, dtype=s.dtype)
    reproject(s, dst, src_transform=src_transform, src_crs=src_crs, dst_transform=grid.transform,
              dst_crs=grid.crs, resampling=resampling, src_nodata=nodata, dst_nodata=nodata, num_threads=1)
    return dst[0] if squeeze else dst


# ---------------------------------------------------------------------------------------------
# Sentinel-2
# ---------------------------------------------------------------------------------------------
def parse_baseline(baseline) -> tuple[int, int] | None:
    """'05.09' -> (5, 9); None or anything unparseable -> None."""
    if baseline is None:
        return None
    try:
        major, minor = str(baseline).strip().split(".")
        return (int(major), int(minor))
    except (ValueError, AttributeError):
        return None


def _s2(profile):
    return profile.imagery.s2 if hasattr(profile, "imagery") else profile


def offset_for(baseline, profile) -> int:
    """The DN offset to subtract for an item of processing `baseline` (0 when none is due).

    Raises ValueError when harmonisation is on and the baseline is unknown: the offset is read
    from item metadata, never guessed from the acquisition date.
    """
    s2 = _s2(profile)
    if not s2.harmonize:
        return 0
    b = parse_baseline(baseline)
    if b is None:
        raise ValueError(f"processing baseline {baseline!r} is unknown: cannot tell whether the +{s2.offset} offset applies")
    return int(s2.offset) if b >= parse_baseline(s2.offset_baseline) else 0


def harmonise(dn: np.ndarray, baseline, profile) -> np.ndarray:
    """DN (uint16) -> float32 surface reflectance; NaN where DN is 0 (no data).

    Subtracts the profile offset only when `baseline` >= the profile's ``offset_baseline``
    (see :func:`offset_for`); reflectance below 0 after the subtraction is clipped to 0.
    """
    off = offset_for(baseline, profile)
    x = dn.astype(np.float32)
    nod = dn == S2_NODATA_DN
    if off:
        x -= off
        np.maximum(x, 0, out=x)
    x /= S2_SCALE
    x[nod] = np.nan
    return x


def warp_reflectance(refl: np.ndarray, src_transform: Affine, src_crs, grid: Grid, *,
                     block: int = LR_WARP_BLOCK) -> np.ndarray:
    """Float reflectance [B, h, w] or [h, w] (NaN = no data) in the granule grid -> [B, H, W] (or
    [H, W]) float32 on the LR grid, bilinear over the valid pixels, as GDAL's warp with a no-data value: NaN where the
    source pixel under the LR pixel's centre has no data (a masked cloud stays its own size) or
    the centre falls outside the window; elsewhere each band with its no-data as 0 and its
    validity are resampled and the band divided by the valid part of its kernel. Pillow's mesh
    transform, as :func:`warp_naip` (`block`-pixel blocks whose corners are projected exactly)."""
    from PIL import Image

    refl = np.asarray(refl, dtype=np.float32)
    if refl.ndim == 2:
        return warp_reflectance(refl[None], src_transform, src_crs, grid, block=block)[0]
    nb, h, w = refl.shape
    size = (grid.width, grid.height)
    mesh = _block_mesh(grid, src_transform, src_crs, block)

    def warp(plane: np.ndarray, mode: str = "F", resample=Image.Resampling.BILINEAR) -> np.ndarray:
        im = Image.frombuffer(mode, (w, h), plane, "raw", mode, 0, 1)
        return np.asarray(im.transform(size, Image.Transform.MESH, mesh, resample=resample))

    out = np.full((nb, grid.height, grid.width), np.nan, np.float32)
    nan = np.isnan(refl)
    cov = seen = None
    for b in range(nb):
        if cov is None or not np.array_equal(nan[b], nan[b - 1]):  # the bands share it, as a rule
            ok = ~nan[b]
            cov = warp(np.ascontiguousarray(ok, dtype=np.float32))
            seen = warp(ok.view(np.uint8) * np.uint8(255), "L", Image.Resampling.NEAREST) != 0
        np.divide(warp(np.where(nan[b], np.float32(0.0), refl[b])), cov, out=out[b], where=seen)
    return out


def warp_scl(scl: np.ndarray, src_transform: Affine, src_crs, grid: Grid) -> np.ndarray:
    """SCL classes (uint8, 20 m) -> the LR grid, nearest; 0 (no data) outside the granule."""
    return warp_to_grid(scl.astype(np.uint8, copy=False), src_transform, src_crs, grid,
                        Resampling.nearest, nodata=SCL_NODATA)


def scl_to_band_grid(scl: np.ndarray, scl_transform: Affine, band_shape: tuple[int, int],
                     band_transform: Affine, crs) -> np.ndarray:
    """SCL (20 m) onto a band window's own grid (10 m, same CRS), nearest; 0 where absent."""
    dst = np.full(band_shape, SCL_NODATA, dtype=np.uint8)
    reproject(scl.astype(np.uint8, copy=False), dst, src_transform=scl_transform, src_crs=crs,
              dst_transform=band_transform, dst_crs=crs, resampling=Resampling.nearest,
              src_nodata=SCL_NODATA, dst_nodata=SCL_NODATA, num_threads=1)
    return dst


def mask_native(refl: np.ndarray, scl_native: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Reflectance in the granule grid with NaN where SCL (on the same grid) is masked, in place.

    Masking before the bilinear warp keeps masked pixels (bright clouds) out of the resampling
    kernel; masking only after it would leak a cloud's edge into its neighbours."""
    refl[np.isin(scl_native, np.asarray(sorted(classes), dtype=np.uint8))] = np.nan
    return refl


def mask_scl(refl: np.ndarray, scl: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Copy of [3, H, W] reflectance with every band NaN where SCL is in `classes` or where any
    band has no data (a pixel is valid in all bands or in none)."""
    bad = np.isin(scl, np.asarray(sorted(classes), dtype=scl.dtype)) | np.isnan(refl).any(axis=0)
    out = refl.astype(np.float32, copy=True)
    out[:, bad] = np.nan
    return out


def median_composite(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel median over dates of [N, 3, H, W] (NaN = masked), as ``np.nanmedian``: the
    middle valid value, or the mean of the two middle ones for an even count.

    Returns (median [3, H, W] float32, NaN where no date is valid; count [H, W] int16 of valid
    dates per pixel). One sort over the dates (NaN sorts last) and a pick by count: no masked
    arrays (``np.nanmedian`` takes them for a short date axis, ~10x slower)."""
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim != 4 or stack.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, bands, H, W] stack, got shape {stack.shape}")
    srt = np.sort(stack, axis=0)
    valid = ~np.isnan(srt)
    n = valid.sum(axis=0)  # per band and pixel
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
    hi = np.take_along_axis(srt, (n // 2)[None], axis=0)[0]
    med = np.where(n % 2 == 1, lo, (lo + hi) * np.float32(0.5)).astype(np.float32)
    med[n == 0] = np.nan
    count = (~np.isnan(stack[:, 0])).sum(axis=0).astype(np.int16)
    return med, count


def stretch(refl: np.ndarray, lo: float = 0.0, hi: float = 0.3) -> np.ndarray:
    """[3, H, W] reflectance -> [H, W, 3] uint8, ``lo..hi`` linearly to 0..255 (rounded, clipped);
    NaN -> 0."""
    x = (np.asarray(refl, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    x = np.nan_to_num(x, nan=0.0)
    np.clip(np.floor(x + 0.5), 0, 255, out=x)
    return np.ascontiguousarray(np.moveaxis(x.astype(np.uint8), 0, -1))


def s2_median(observations: Iterable[tuple[np.ndarray, np.ndarray]],
              mask_classes: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """(reflectance [B, H, W], SCL [H, W]) per date on the LR grid -> (masked per-pixel median
    [B, H, W], NaN where no date is valid; valid-date count [H, W])."""
    masked = [mask_scl(r, s, mask_classes) for r, s in observations]
    if not masked:
        raise ValueError("no Sentinel-2 observation to composite")
    return median_composite(np.stack(masked))


def s2_composite(observations: Iterable[tuple[np.ndarray, np.ndarray]], mask_classes: Iterable[int],
                 stretch_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(reflectance [3, H, W] in B04, B03, B02 order, SCL [H, W]) per date on the LR grid ->
    (RGB uint8 [H, W, 3], valid-date count [H, W])."""
    med, count = s2_median(observations, mask_classes)
    return stretch(med, *stretch_range), count


def reflectance_dn(refl: np.ndarray) -> np.ndarray:
    """[B, H, W] harmonised reflectance -> [H, W, B] uint16 ``round(reflectance * 10000)`` (the
    extra bands' storage: scale 1e-4, offset 0); NaN (no valid observation) -> 0."""
    x = np.asarray(refl, dtype=np.float64) * S2_SCALE
    x = np.nan_to_num(x, nan=0.0)
    np.clip(np.floor(x + 0.5), 0, 65535, out=x)
    return np.ascontiguousarray(np.moveaxis(x.astype(np.uint16), 0, -1))


# ---------------------------------------------------------------------------------------------
# NAIP
# ---------------------------------------------------------------------------------------------
def naip_valid(rgb: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """Valid pixels of a NAIP window [3, h, w]: inside the dataset mask (if given, [3, h, w] or
    [h, w], 0 = no data) and not black in all three bands (the DOQQ collar)."""
    valid = (rgb[0] | rgb[1] | rgb[2]) != 0
    if masks is not None:
        m = masks if masks.ndim == 2 else np.logical_and.reduce(masks > 0, axis=0)
        valid &= m > 0
    return valid




def _block_mesh(grid: Grid, src_transform: Affine, src_crs, block: int) -> list:
    """Pillow MESH data: each `block` x `block` block of `grid` with the source quadrilateral its
    corners fall on (source pixel coordinates, corners projected exactly by GDAL's transformer,
    the one ``reproject`` uses)."""
    from rasterio.warp import transform as crs_transform

    cols = sorted({*range(0, grid.width, block), grid.width})
    rows = sorted({*range(0, grid.height, block), grid.height})
    C, R = np.meshgrid(np.asarray(cols, float), np.asarray(rows, float))
    lon, lat = grid.transform * (C.ravel(), R.ravel())
    x, y = crs_transform(grid.crs, src_crs, lon, lat)
    sc, sr = ~src_transform * (np.asarray(x), np.asarray(y))
    sc, sr = sc.reshape(C.shape), sr.reshape(C.shape)
    mesh = []
    for i in range(len(rows) - 1):
        for j in range(len(cols) - 1):
            quad = (sc[i, j], sr[i, j], sc[i + 1, j], sr[i + 1, j],          # upper left, lower left,
                    sc[i + 1, j + 1], sr[i + 1, j + 1], sc[i, j + 1], sr[i, j + 1])  # lower right, upper right
            mesh.append(((cols[j], rows[i], cols[j + 1], rows[i + 1]), tuple(float(v) for v in quad)))
    return mesh


def _kernel_box(quad: tuple, w: int, h: int) -> tuple[int, int, int, int]:
    """(c0, r0, c1, r1): the source pixels a bilinear kernel reads for points inside `quad` (the
    pixels under it and one more each side), clipped to the window [0, w) x [0, h)."""
    xs, ys = quad[0::2], quad[1::2]
    c0, r0 = math.floor(min(xs) - 0.5), math.floor(min(ys) - 0.5)
    c1, r1 = math.floor(max(xs) - 0.5) + 2, math.floor(max(ys) - 0.5) + 2
    return max(c0, 0), max(r0, 0), min(c1, w), min(r1, h)


def warp_naip(pixels: np.ndarray, valid: np.ndarray, src_transform: Affine, src_crs, grid: Grid, *,
              block: int = WARP_BLOCK) -> np.ndarray:
    """NAIP window [C, h, w] uint8 (any number of bands C) + validity [h, w] -> a layer on `grid`:
    uint8 [C + 1, H, W], the C bands (bilinear over the valid pixels only) and their coverage
    (0 none, 255 every contributing pixel valid, 1..254 in part).

    Straight onto the grid, once, with Pillow's bilinear quad transform, block by block: the
    grid is cut into `block`-pixel blocks whose corners are projected exactly, bilinear in
    between (within 0.001 px of the projection); each band is resampled in float32 from the
    source pixels under the block and rounded (``floor(x + 0.5)``). A block whose kernel reads
    only valid pixels inside the window (nearly every block) is resampled as it is: the 0.5 is
    added to the source (the kernel's weights sum to 1) and Pillow's float-to-uint8 conversion
    truncates. A block that reads no-data or leaves the window is resampled premultiplied: each
    band times validity and the validity itself, the band divided by the valid part of its
    kernel, so invalid pixels (collar, wedge) never darken their valid neighbours."""
    from PIL import Image

    if pixels.ndim != 3 or pixels.dtype != np.uint8 or valid.shape != pixels.shape[1:]:
        raise ValueError(f"NAIP pixels must be uint8 [bands, h, w] with validity [h, w], got {pixels.dtype} "
                         f"{pixels.shape} and {valid.shape}")
    nb, h, w = pixels.shape
    out = np.zeros((nb + 1, grid.height, grid.width), np.uint8)
    every = bool(valid.all())
    quad_t, bilinear = Image.Transform.QUAD, Image.Resampling.BILINEAR
    for (x0, y0, x1, y1), quad in _block_mesh(grid, src_transform, src_crs, block):
        c0, r0, c1, r1 = _kernel_box(quad, w, h)
        if c1 <= c0 or r1 <= r0:
            continue  # the block falls outside the window: uncovered
        size, src = (x1 - x0, y1 - y0), (c1 - c0, r1 - r0)
        local = tuple(q - (c0 if i % 2 == 0 else r0) for i, q in enumerate(quad))
        inside = min(quad[0::2]) >= 0 and min(quad[1::2]) >= 0 and max(quad[0::2]) < w and max(quad[1::2]) < h
        v = valid[r0:r1, c0:c1]
        dst = out[:, y0:y1, x0:x1]

        def warp(plane: np.ndarray) -> Image.Image:
            return Image.frombuffer("F", src, plane, "raw", "F", 0, 1).transform(size, quad_t, local, resample=bilinear)

        if inside and (every or v.all()):
            for b in range(nb):
                plane = np.add(pixels[b, r0:r1, c0:c1], np.float32(0.5), dtype=np.float32)
                dst[b] = np.frombuffer(warp(plane).convert("L").tobytes(), np.uint8).reshape(size[1], size[0])
            dst[nb] = 255
            continue
        vf = v.astype(np.float32)
        cov = np.asarray(warp(vf))
        seen = cov > np.float32(1e-3)
        inv = np.zeros_like(cov)
        np.divide(np.float32(1.0), cov, out=inv, where=seen)
        for b in range(nb):
            c = np.asarray(warp(np.multiply(pixels[b, r0:r1, c0:c1], vf, dtype=np.float32))) * inv
            c += np.float32(0.5)
            np.clip(c, 0, 255, out=c)
            dst[b] = c  # truncates: floor(x + 0.5)
        a = dst[nb]
        a[seen] = np.clip(cov[seen] * np.float32(254.0), 1, 254).astype(np.uint8)
        a[cov >= np.float32(1.0 - 1e-5)] = 255
    return out


class Mosaic:
    """First-valid-wins mosaic of :func:`warp_naip` layers of `bands` bands on a grid of `shape`
    (H, W), added in priority order: a pixel takes the first layer that covers it fully
    (coverage 255); a pixel no layer covers fully takes the first that covers it in part.
    :meth:`todo` says which part of a window still needs a layer, so nothing is warped where the
    mosaic is already complete."""

    def __init__(self, shape: tuple[int, int], bands: int = len(RGB_BANDS)):
        self.acc = np.zeros((bands, *shape), np.uint8)
        self.state = np.zeros(shape, np.uint8)  # 0 uncovered, 1 in part, 2 fully

    def todo(self, r0: int, c0: int, h: int, w: int) -> tuple[int, int, int, int] | None:
        """The bounding box (r0, c0, h, w) of the pixels of the window not yet fully covered."""
        open_ = self.state[r0:r0 + h, c0:c0 + w] < 2
        rows, cols = np.flatnonzero(open_.any(axis=1)), np.flatnonzero(open_.any(axis=0))
        if not rows.size:
            return None
        return r0 + int(rows[0]), c0 + int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)

    def add(self, layer: np.ndarray, r0: int = 0, c0: int = 0) -> None:
        if layer.shape[0] != self.acc.shape[0] + 1:
            raise ValueError(f"a layer of {layer.shape[0] - 1} band(s) in a mosaic of {self.acc.shape[0]}")
        h, w = layer.shape[1:]
        st = self.state[r0:r0 + h, c0:c0 + w]
        a = layer[-1]
        if (a == 255).all() and not st.any():  # the common case: a full layer on a fresh part
            self.acc[:, r0:r0 + h, c0:c0 + w] = layer[:-1]
            st[...] = 2
            return
        full = (a == 255) & (st < 2)
        part = (a != 0) & (a != 255) & (st == 0)
        np.copyto(self.acc[:, r0:r0 + h, c0:c0 + w], layer[:-1], where=(full | part)[None])
        st[part] = 1
        st[full] = 2

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [H, W, bands], a view of band-sequential memory; covered bool [H, W]);
        uncovered pixels are 0."""
        return np.moveaxis(self.acc, 0, -1), self.state > 0


def window_grid(grid: Grid, r0: int, c0: int, h: int, w: int) -> Grid:
    """The pixels (r0.., c0..) h x w of `grid` as a grid of their own (the same pixels)."""
    W, S, E, N = grid.bounds
    return Grid((W + (E - W) * c0 / grid.width, N - (N - S) * (r0 + h) / grid.height,
                 W + (E - W) * (c0 + w) / grid.width, N - (N - S) * r0 / grid.height), w, h)


def mosaic(layers: Iterable, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:class:`Mosaic` of :func:`warp_naip` layers (uint8 [C + 1, h, w]: the bands, coverage) in
    priority order. A layer is an array over the whole grid, or ``(array, row_off, col_off)`` for
    a part of a grid of `shape` (H, W). Returns :meth:`Mosaic.result`."""
    m = None
    for layer in layers:
        arr, r0, c0 = layer if isinstance(layer, tuple) else (layer, 0, 0)
        if m is None:
            m = Mosaic(shape or arr.shape[1:], arr.shape[0] - 1)
        m.add(arr, r0, c0)
    if m is None:
        raise ValueError("no NAIP layer to mosaic")
    return m.result()
