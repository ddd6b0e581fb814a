"""compose: grids and tile convention, harmonisation by baseline, SCL masking, median, stretch,
NAIP warping and mosaicking (real GDAL warps on small synthetic UTM rasters)."""
from __future__ import annotations

import numpy as np
import pytest
from pyproj import Transformer
from rasterio.transform import from_origin

from gl10m import compose, profile as profile_mod

BOUNDS = (-117.0, 34.0, -116.976, 34.024)


@pytest.fixture(scope="module")
def prof():
    return profile_mod.load()


# -- grids -----------------------------------------------------------------------------------------
def test_grids_nw_origin_and_size(prof):
    lr, hr = compose.lr_grid(BOUNDS, prof), compose.hr_grid(BOUNDS, prof)
    assert (lr.width, lr.height, hr.width, hr.height) == (268, 268, 2680, 2680)
    assert lr.transform * (0, 0) == (BOUNDS[0], BOUNDS[3])  # pixel (0, 0) corner is the NW corner
    x, y = hr.transform * (2680, 2680)
    assert x == pytest.approx(BOUNDS[2], abs=1e-12) and y == pytest.approx(BOUNDS[1], abs=1e-12)


def test_tiles_tessellate_and_match_hr_blocks(prof):
    hr = compose.hr_grid(BOUNDS, prof)
    tb = compose.tile_bounds(BOUNDS, 10)
    assert len(tb) == 100
    assert tb[0][0] == BOUNDS[0] and tb[0][3] == BOUNDS[3]      # tile 0: north-west
    assert tb[9][2] == BOUNDS[2] and tb[9][3] == BOUNDS[3]      # tile 9: north-east
    assert tb[90][0] == BOUNDS[0] and tb[90][1] == BOUNDS[1]    # tile 90: south-west
    area = sum((e - w) * (n - s) for w, s, e, n in tb)
    assert area == pytest.approx((BOUNDS[2] - BOUNDS[0]) * (BOUNDS[3] - BOUNDS[1]), rel=1e-12)
    for i in (0, 9, 37, 90, 99):
        r, c = divmod(i, 10)
        x0, y0 = hr.transform * (c * 268, r * 268)
        x1, y1 = hr.transform * ((c + 1) * 268, (r + 1) * 268)
        assert tb[i] == pytest.approx((x0, y1, x1, y0), abs=1e-12)
        if c < 9:
            assert tb[i][2] == tb[i + 1][0]  # shared edges are the same float
        if r < 9:
            assert tb[i][1] == tb[i + 10][3]


def test_cut_tiles_index_convention_and_join():
    r = np.repeat(np.arange(10), 4)[:, None].repeat(40, 1)
    c = np.repeat(np.arange(10), 4)[None, :].repeat(40, 0)
    mosaic = np.stack([r, c, r * 10 + c], -1).astype(np.uint8)
    tiles = compose.cut_tiles(mosaic, 10)
    assert tiles.shape == (100, 4, 4, 3)
    for i in range(100):
        assert (tiles[i, ..., 2] == i).all() and (tiles[i, ..., 0] == i // 10).all() and (tiles[i, ..., 1] == i % 10).all()
    assert np.array_equal(compose.join_tiles(tiles), mosaic)
    planar = np.ascontiguousarray(np.moveaxis(mosaic, -1, 0))  # band-sequential, seen as [H, W, C]
    assert np.array_equal(compose.cut_tiles(np.moveaxis(planar, 0, -1), 10), tiles)
    assert np.array_equal(compose.cut_tiles(np.moveaxis(planar[:1], 0, -1), 10), tiles[..., :1])
    with pytest.raises(ValueError, match="does not split"):
        compose.cut_tiles(mosaic[:39], 10)


def test_ground_pixel_size_is_anisotropic(prof):
    x, y = compose.ground_px_m(compose.lr_grid(BOUNDS, prof))
    assert y == pytest.approx(0.024 * 110_950 / 268, rel=0.01)
    assert x == pytest.approx(y * np.cos(np.radians(34.012)), rel=0.01)


def test_bad_footprint_is_one_line_error():
    with pytest.raises(ValueError, match="west, south, east, north"):
        compose.footprint_grid((10, 5, 9, 6), 268)


# -- Sentinel-2 ------------------------------------------------------------------------------------
def test_harmonise_by_baseline_only(prof):
    dn = np.array([[0, 1000, 1500, 4000]], np.uint16)
    new = compose.harmonise(dn, "05.09", prof)
    old = compose.harmonise(dn, "03.01", prof)
    edge = compose.harmonise(dn, "04.00", prof)
    assert np.isnan(new[0, 0]) and np.isnan(old[0, 0])  # DN 0 is no data
    assert new[0, 1:].tolist() == pytest.approx([0.0, 0.05, 0.3])
    assert old[0, 1:].tolist() == pytest.approx([0.1, 0.15, 0.4])
    assert np.array_equal(new, edge, equal_nan=True)
    assert compose.offset_for("02.14", prof) == 0 and compose.offset_for("04.00", prof) == 1000
    with pytest.raises(ValueError, match="baseline None is unknown"):
        compose.harmonise(dn, None, prof)
    off = prof.model_copy(update={"imagery": prof.imagery.model_copy(
        update={"s2": prof.imagery.s2.model_copy(update={"harmonize": False})})})
    assert np.array_equal(compose.harmonise(dn, "05.09", off), old, equal_nan=True)


def test_harmonise_clips_below_zero(prof):
    assert compose.harmonise(np.array([[900]], np.uint16), "05.00", prof)[0, 0] == 0.0


def test_scl_masking_keeps_clouds_out_of_the_median(prof):
    classes = prof.imagery.s2.scl_mask
    clear = np.full((3, 4, 4), 0.1, np.float32)
    cloudy = np.full((3, 4, 4), 0.1, np.float32)
    cloudy[:, :2] = 0.9
    scl_clear = np.full((4, 4), 4, np.uint8)
    scl_cloudy = scl_clear.copy()
    scl_cloudy[:2] = 9
    rgb, count = compose.s2_composite([(clear, scl_clear), (cloudy, scl_cloudy)], classes, (0.0, 0.3))
    assert (rgb == 85).all()  # 0.1 / 0.3 * 255 everywhere: the cloud did not leak
    assert count[:2].tolist() == [[1] * 4] * 2 and (count[2:] == 2).all()
    leaky, _ = compose.s2_composite([(clear, scl_clear), (cloudy, scl_clear)], classes, (0.0, 0.3))
    assert (leaky[:2] == 255).all()  # the same data without the SCL flag: the test can fail


def test_mask_scl_every_class_and_joint_bands(prof):
    refl = np.full((3, 1, 12), 0.2, np.float32)
    refl[1, 0, 4] = np.nan  # one band missing -> the whole pixel is dropped
    scl = np.arange(12, dtype=np.uint8)[None]
    out = compose.mask_scl(refl, scl, prof.imagery.s2.scl_mask)
    dropped = np.isnan(out).any(axis=0)[0]
    assert np.flatnonzero(dropped).tolist() == [0, 1, 3, 4, 8, 9, 10]
    assert (np.isnan(out).all(axis=0) == np.isnan(out).any(axis=0)).all()


def test_median_of_three_dates():
    stack = np.stack([np.full((3, 2, 2), v, np.float32) for v in (0.3, 0.1, 0.2)])
    stack[0, :, 0, 0] = np.nan
    med, count = compose.median_composite(stack)
    assert med[:, 1, 1].tolist() == pytest.approx([0.2] * 3)
    assert med[:, 0, 0].tolist() == pytest.approx([0.15] * 3)  # median of the two remaining
    assert count.tolist() == [[2, 3], [3, 3]]
    allnan = np.full((2, 3, 1, 1), np.nan, np.float32)
    med, count = compose.median_composite(allnan)
    assert np.isnan(med).all() and count[0, 0] == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_median_is_nanmedian(seed):
    """The sort-and-pick median is np.nanmedian's, bit for bit: odd and even valid counts, per
    band holes, pixels with no valid date."""
    import warnings

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    stack = rng.uniform(0, 0.5, (n, 3, 40, 50)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.3] = np.nan
    stack[:, :, rng.random((40, 50)) < 0.1] = np.nan
    med, count = compose.median_composite(stack)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(stack, axis=0).astype(np.float32)
    assert np.array_equal(med, ref, equal_nan=True) and np.isnan(med).any()
    assert np.array_equal(count, (~np.isnan(stack[:, 0])).sum(axis=0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reflectance_warp_matches_gdal_with_no_data(seed):
    """Textured S2 bands with masked holes warped onto the LR grid: no-data exactly where the
    source pixel under the LR pixel's centre (projected exactly) is no-data, as in GDAL's warp (a
    hole stays its own size); the values agree with GDAL's exact (tolerance 0) bilinear warp
    with a NaN no-data within 1e-3 reflectance where both have one (GDAL widens its kernel a
    little when the source window is larger than the grid: white noise would differ more); a
    band with holes of its own gets its own."""
    from rasterio.enums import Resampling
    from rasterio.warp import reproject
    from rasterio.warp import transform as crs_transform

    rng = np.random.default_rng(seed)
    lon0, lat0 = -117.0 + rng.uniform(-2, 2), 34.0 + rng.uniform(-1, 1)
    tr = Transformer.from_crs(4326, 32611, always_xy=True)
    xs, ys = tr.transform([lon0, lon0 + 0.024, lon0, lon0 + 0.024], [lat0, lat0, lat0 + 0.024, lat0 + 0.024])
    x0, y1 = np.floor(min(xs) / 10) * 10 - 30, np.ceil(max(ys) / 10) * 10 + 30
    w, h = int((max(xs) - x0) / 10) + 4, int((y1 - min(ys)) / 10) + 4
    refl = (_textured(rng, 3, h, w) / np.float32(1000.0)).astype(np.float32)
    refl[:, rng.random((h, w)) < 0.05] = np.nan
    r, c = int(rng.integers(20, h - 60)), int(rng.integers(20, w - 60))
    refl[:, r:r + 40, c:c + 30] = np.nan  # a masked cloud
    refl[2, :10] = np.nan  # band 3 alone lacks a strip
    st = from_origin(x0, y1, 10, 10)
    g = compose.footprint_grid((lon0, lat0, lon0 + 0.024, lat0 + 0.024), 268)
    out = compose.warp_reflectance(refl, st, "EPSG:32611", g)
    cols, rows = np.meshgrid(np.arange(268) + 0.5, np.arange(268) + 0.5)
    lon, lat = g.transform * (cols.ravel(), rows.ravel())
    sx, sy = crs_transform(g.crs, "EPSG:32611", lon, lat)
    sc, sr = ~st * (np.asarray(sx), np.asarray(sy))
    clear = (np.abs(sc - np.round(sc)) > 0.01) & (np.abs(sr - np.round(sr)) > 0.01)  # not on a pixel edge
    assert clear.mean() > 0.95
    under = np.isnan(refl)[:, np.floor(sr).astype(int), np.floor(sc).astype(int)]
    assert np.array_equal(np.isnan(out).reshape(3, -1)[:, clear], under[:, clear])
    ref = np.full(out.shape, np.nan, np.float32)
    reproject(refl, ref, src_transform=st, src_crs="EPSG:32611", dst_transform=g.transform, dst_crs=g.crs,
              resampling=Resampling.bilinear, src_nodata=np.nan, dst_nodata=np.nan, num_threads=1, tolerance=0)
    for b in range(3):
        assert (np.isnan(out[b]) == np.isnan(ref[b])).mean() > 0.99
        both = ~np.isnan(out[b]) & ~np.isnan(ref[b])
        assert np.abs(out[b][both] - ref[b][both]).max() < 1e-3
    assert np.isnan(out[2]).sum() > np.isnan(out[0]).sum() + 100 and 0.05 < np.isnan(out[0]).mean() < 0.2


def test_stretch_range_order_and_rounding():
    refl = np.zeros((3, 1, 5), np.float32)
    refl[0] = [0.0, 0.15, 0.3, 0.5, np.nan]
    refl[1] = 0.3
    out = compose.stretch(refl, 0.0, 0.3)
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    assert (out[0, :, 1] == 255).all() and (out[0, :, 2] == 0).all()  # B04, B03, B02 -> R, G, B


def test_warp_scl_is_nearest_and_masks_before_bilinear(prof):
    """SCL stays a class map after the warp; a cloud masked on the native grid never bleeds into
    its neighbours through the bilinear kernel."""
    tr = Transformer.from_crs(4326, 32611, always_xy=True)
    x0, y1 = tr.transform(BOUNDS[0], BOUNDS[3])
    x0, y1 = np.floor(x0 / 20) * 20 - 400, np.ceil(y1 / 20) * 20 + 400
    scl = np.full((180, 180), 4, np.uint8)
    scl[60:90, 60:90] = 9
    scl[100:120, 10:40] = 6
    g = compose.lr_grid(BOUNDS, prof)
    out = compose.warp_scl(scl, from_origin(x0, y1, 20, 20), "EPSG:32611", g)
    assert set(np.unique(out)) == {4, 6, 9}
    dn = np.full((360, 360), 2000, np.uint16)
    dn[120:180, 120:180] = 9500  # the cloud in the 10 m bands, same place as SCL 9
    refl = compose.harmonise(dn, "05.09", prof)
    native = compose.scl_to_band_grid(scl, from_origin(x0, y1, 20, 20), dn.shape, from_origin(x0, y1, 10, 10), "EPSG:32611")
    assert (native[120:180, 120:180] == 9).all() and (native[:120] != 9).all()
    compose.mask_native(refl, native, prof.imagery.s2.scl_mask)
    warped = compose.warp_reflectance(refl, from_origin(x0, y1, 10, 10), "EPSG:32611", g)
    valid = warped[~np.isnan(warped)]
    assert valid.size > 0.8 * warped.size and np.allclose(valid, 0.1, atol=1e-5)


# -- NAIP ------------------------------------------------------------------------------------------
def _qq(x0, w, h, y1, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 220, size=(3, 1, 1), dtype=np.uint8)
    return np.broadcast_to(base, (3, h, w)).copy(), from_origin(x0, y1, 1.0, 1.0)


def test_naip_mosaic_fills_collars_without_black_seams():
    """Two overlapping quarter-quads; the west one has a black wedge in the overlap. The mosaic
    is covered everywhere and nowhere black; the east QQ shows only where the west has none."""
    tr = Transformer.from_crs(4326, 26911, always_xy=True)
    b = (-117.0, 34.0, -116.997, 34.003)
    xs, ys = tr.transform([b[0], b[2], b[0], b[2]], [b[1], b[1], b[3], b[3]])
    x0, x1, y0, y1 = np.floor(min(xs)) - 5, np.ceil(max(xs)) + 5, np.floor(min(ys)) - 5, np.ceil(max(ys)) + 5
    mid = int((x0 + x1) / 2)
    h = int(y1 - y0)
    west, wt = _qq(x0, int(mid + 40 - x0), h, y1, 1)
    east, et = _qq(mid - 40, int(x1 - mid + 40), h, y1, 2)
    cols = np.arange(west.shape[2])[None, :]
    rows = np.arange(h)[:, None]
    wedge = cols > west.shape[2] - 40 + rows * 40 // h - 1
    west[:, wedge] = 0
    g = compose.footprint_grid(b, 300)
    lw = compose.warp_naip(west, compose.naip_valid(west), wt, "EPSG:26911", g)
    le = compose.warp_naip(east, compose.naip_valid(east), et, "EPSG:26911", g)
    rgb, covered = compose.mosaic([lw, le])
    assert covered.all()
    assert np.count_nonzero(rgb.max(axis=-1) <= 5) == 0
    colours = {tuple(p) for p in rgb.reshape(-1, 3)}
    w_col, e_col = tuple(west[:, 0, 0]), tuple(east[:, 0, 0])
    assert w_col in colours and e_col in colours
    # without the collar treated as no data, the wedge would be black (the test can fail)
    bad = compose.warp_naip(west, np.ones(west.shape[1:], bool), wt, "EPSG:26911", g)
    rgb_bad, _ = compose.mosaic([bad, le])
    assert np.count_nonzero(rgb_bad.max(axis=-1) <= 5) > 0


def test_naip_warp_takes_any_band_count_and_declared_masks():
    """The warp is band-count agnostic: each band of a 4-band window comes out as that band alone
    would, with the same coverage; what the reader picks (R, G, B) is the reader's business."""
    rng = np.random.default_rng(3)
    pix = rng.integers(1, 256, size=(4, 50, 60), dtype=np.uint8)
    pix[:, :, 50:] = 0  # a collar: the premultiplied blocks too
    valid = compose.naip_valid(pix)
    x, y = Transformer.from_crs(4326, 26911, always_xy=True).transform(-117.0, 34.0004)
    t = from_origin(np.floor(x) - 3, np.ceil(y) + 3, 1.0, 1.0)
    g = compose.footprint_grid((-117.0, 33.9999, -116.9994, 34.0004), 37)
    four = compose.warp_naip(pix, valid, t, "EPSG:26911", g, block=16)
    assert four.shape == (5, 37, 37) and (four[4] == 255).any() and (four[4] == 0).any()
    for b in range(4):
        one = compose.warp_naip(pix[b:b + 1], valid, t, "EPSG:26911", g, block=16)
        assert np.array_equal(one[0], four[b]) and np.array_equal(one[1], four[4])
    with pytest.raises(ValueError, match="uint8"):
        compose.warp_naip(pix.astype(np.float32), valid, t, "EPSG:26911", g)
    with pytest.raises(ValueError, match="band"):
        compose.Mosaic((37, 37)).add(four)  # a 4-band layer in an RGB mosaic
    rgb = np.full((3, 2, 2), 50, np.uint8)
    masks = np.full((3, 2, 2), 255, np.uint8)
    masks[2, 0, 0] = 0
    assert compose.naip_valid(rgb, masks).tolist() == [[False, True], [True, True]]


def _layer(value, coverage):
    cov = np.asarray(coverage, np.uint8)
    return np.concatenate([np.full((3, *cov.shape), value, np.uint8), cov[None]])


def test_mosaic_priority_and_uncovered():
    a = _layer(10, [[255, 0], [0, 0]])
    b = _layer(20, [[255, 255], [255, 0]])
    rgb, covered = compose.mosaic(iter([a, b]))
    assert rgb[..., 0].tolist() == [[10, 20], [20, 0]]
    assert covered.tolist() == [[True, True], [True, False]]
    # a pixel covered fully by a later layer beats one covered in part by an earlier one; in
    # part is better than nothing
    c = _layer(30, [[128, 128], [0, 0]])
    d = _layer(40, [[255, 0], [0, 0]])
    rgb, covered = compose.mosaic([c, d])
    assert rgb[..., 0].tolist() == [[40, 30], [0, 0]] and covered.tolist() == [[True, True], [False, False]]
    # a layer covering its window fully: the first one there wins, a later one fills only what
    # is left open
    full = [[255, 255], [255, 255]]
    rgb, covered = compose.mosaic([_layer(50, full), _layer(60, full)])
    assert (rgb[..., 0] == 50).all() and covered.all()
    rgb, _ = compose.mosaic([_layer(10, [[255, 0], [0, 0]]), _layer(70, [[128, 0], [0, 0]]), _layer(20, full)])
    assert rgb[..., 0].tolist() == [[10, 20], [20, 20]]
    rgb, _ = compose.mosaic([_layer(70, [[0, 128], [0, 0]]), _layer(20, full)])
    assert rgb[..., 0].tolist() == [[20, 20], [20, 20]]  # full beats an earlier part
    m = compose.Mosaic((3, 3))
    m.add(_layer(5, full), 1, 1)
    m.add(_layer(6, [[255] * 3] * 3))
    assert m.result()[0][..., 0].tolist() == [[6, 6, 6], [6, 5, 5], [6, 5, 5]]
    with pytest.raises(ValueError, match="no NAIP layer"):
        compose.mosaic([])


def test_sub_grid_pixels_are_the_parent_pixels(prof):
    g = compose.hr_grid(BOUNDS, prof)
    sub, r0, c0 = compose.sub_grid(g, (-116.99, 34.005, -116.98, 34.2), pad=0)
    assert r0 == 0 and sub.height == 2680 - r0 - (2680 - round((34.024 - 34.005) / 0.024 * 2680))
    x, y = g.transform * (c0, r0)
    assert sub.transform.c == pytest.approx(x, abs=1e-12) and sub.transform.f == pytest.approx(y, abs=1e-12)
    assert sub.transform.a == pytest.approx(g.transform.a, rel=1e-9)
    assert compose.sub_grid(g, (10.0, 10.0, 11.0, 11.0)) is None
    a = _layer(7, np.full((2, 2), 255))
    rgb, covered = compose.mosaic([(a, 1, 1)], (4, 4))
    assert covered.sum() == 4 and covered[1:3, 1:3].all() and rgb[1, 1, 0] == 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_naip_warp_keeps_colours_next_to_no_data_and_matches_gdal(seed):
    """A quarter-quad window with a black collar (no data) of random width: pixels next to it
    keep their colour (no darkening by the kernel), the uncovered part is marked so, and the
    colours match GDAL's masked bilinear warp of the same window within one level."""
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    rng = np.random.default_rng(seed)
    tr = Transformer.from_crs(4326, 26911, always_xy=True)
    b = (-117.0, 34.0, -116.997, 34.003)
    xs, ys = tr.transform([b[0], b[2], b[0], b[2]], [b[1], b[1], b[3], b[3]])
    x0, y1 = np.floor(min(xs)) - 5, np.ceil(max(ys)) + 5
    w, h = int(np.ceil(max(xs)) + 5 - x0), int(y1 - np.floor(min(ys)) + 5)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([40 + xx * 0.3 + yy * 0.1, 60 + yy * 0.4, np.full((h, w), 120.0)]).clip(1, 255).astype(np.uint8)
    collar = int(rng.integers(20, w // 2))
    rgb[:, :, w - collar:] = 0
    src_t = from_origin(x0, y1, 1.0, 1.0)
    g = compose.footprint_grid(b, int(rng.integers(200, 340)))
    layer = compose.warp_naip(rgb, compose.naip_valid(rgb), src_t, "EPSG:26911", g)
    cov = layer[3]
    assert (cov == 255).mean() > 0.3 and (cov == 0).mean() > 0.1  # the collar side is uncovered
    assert (layer[2][cov > 0] == 120).all()  # a constant band stays constant up to the collar's edge
    f = rgb.astype(np.float32)
    f[:, ~compose.naip_valid(rgb)] = np.nan
    ref = np.full((3, g.height, g.width), np.nan, np.float32)
    reproject(f, ref, src_transform=src_t, src_crs="EPSG:26911", dst_transform=g.transform, dst_crs=g.crs,
              resampling=Resampling.bilinear, src_nodata=np.nan, dst_nodata=np.nan, num_threads=1)
    both = (cov > 0) & ~np.isnan(ref).any(axis=0)
    assert both.sum() > 0.9 * (cov > 0).sum()
    diff = np.abs(np.floor(ref[:, both] + 0.5) - layer[:3, both])
    assert diff.max() <= 1 and diff.mean() < 0.05
    # with the N band (imagery.bands rgbn/raw): R, G, B and coverage are the 3-band layer's, and
    # N goes through the same warp (a copy of R as N comes out as R)
    rgbn = np.concatenate([rgb, rgb[:1]])
    layer4 = compose.warp_naip(rgbn, compose.naip_valid(rgbn), src_t, "EPSG:26911", g)
    assert layer4.shape == (5, g.height, g.width)
    assert np.array_equal(layer4[[0, 1, 2, 4]], layer) and np.array_equal(layer4[3], layer[0])
    m4 = compose.Mosaic(g.shape, 4)
    m4.add(layer4)
    m3 = compose.Mosaic(g.shape)
    m3.add(layer)
    (a4, c4), (a3, c3) = m4.result(), m3.result()
    assert a4.shape[-1] == 4 and np.array_equal(a4[..., :3], a3) and np.array_equal(c4, c3)


def _textured(rng, bands, h, w):
    """Smooth random texture: a few random sinusoids per band, 1..255 (sub-pixel placement and
    rounding both show)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((bands, h, w), np.float64)
    for b in range(bands):
        acc = np.full((h, w), 128.0)
        for _ in range(4):
            period, ang, ph = rng.uniform(6, 40), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            acc += 30 * np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period + ph)
        out[b] = acc
    return np.clip(np.floor(out + 0.5), 1, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_naip_warp_from_cog_matches_exact_reproject(tmp_path, seed):
    """A textured 1 m COG read like fetch reads it (compose.source_window), warped onto a finer
    degree grid that runs past the raster's east edge: colours within one level of GDAL's exact
    (tolerance 0) float bilinear reproject of the same window, mean error < 0.05, no bias; the
    part beyond the raster is uncovered, the rest fully covered."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    from tests.fixtures.cogs import write_cog

    rng = np.random.default_rng(seed)
    lon0, lat0 = -117.0 + rng.uniform(-1.5, 1.5), 34.0 + rng.uniform(-0.5, 0.5)  # off the central meridian too
    zone_epsg = 26911
    tr = Transformer.from_crs(4326, zone_epsg, always_xy=True)
    side = 0.004
    xs, ys = tr.transform([lon0, lon0 + side, lon0, lon0 + side], [lat0, lat0, lat0 + side, lat0 + side])
    x0, y1 = np.floor(min(xs)) - 8, np.ceil(max(ys)) + 8
    w = int(np.ceil(max(xs)) - x0) - int(rng.integers(40, 90))  # the raster stops short of the footprint's east edge
    h = int(y1 - np.floor(min(ys))) + 8
    data = _textured(rng, 3, h, w)
    path = write_cog(tmp_path / "naip.tif", data, zone_epsg, x0, y1, 1.0)
    n = int(rng.integers(520, 600))  # ~0.7 m pixels: finer than the source in both directions
    g = compose.footprint_grid((lon0, lat0, lon0 + side, lat0 + side), n)
    with rasterio.open(path) as ds:
        win = compose.source_window(ds, g.bounds)
        pix, st = ds.read([1, 2, 3], window=win), ds.window_transform(win)
    layer = compose.warp_naip(pix, compose.naip_valid(pix), st, f"EPSG:{zone_epsg}", g, block=64)
    ref = np.full((3, n, n), np.nan, np.float32)
    reproject(pix.astype(np.float32), ref, src_transform=st, src_crs=f"EPSG:{zone_epsg}", dst_transform=g.transform,
              dst_crs=g.crs, resampling=Resampling.bilinear, src_nodata=np.nan, dst_nodata=np.nan, num_threads=1,
              tolerance=0)
    cov = layer[3]
    have = ~np.isnan(ref).any(axis=0)
    assert 0.05 < (cov == 0).mean() < 0.4 and ((cov == 255) == have).mean() > 0.99
    both = (cov == 255) & have
    diff = layer[:3, both].astype(np.float64) - ref[:, both]
    assert np.abs(diff).max() <= 1.0
    assert np.abs(diff).mean() < 0.3 and abs(diff.mean()) < 0.02  # rounded, not truncated
    rounded = np.floor(ref[:, both] + 0.5) - layer[:3, both]
    assert (rounded == 0).mean() > 0.97


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_naip_warp_fast_and_premultiplied_blocks_agree(seed):
    """The two ways a block is resampled agree: marking one source pixel invalid sends every
    block whose kernel reads it through the premultiplied path; away from that pixel the colours
    are the same as the plain path's (up to float rounding at a .5), and the coverage is full."""
    rng = np.random.default_rng(seed)
    x, y = Transformer.from_crs(4326, 26911, always_xy=True).transform(-117.0, 34.003)
    t = from_origin(np.floor(x) - 5, np.ceil(y) + 5, 1.0, 1.0)
    pix = _textured(rng, 3, 350, 300)
    g = compose.footprint_grid((-117.0, 34.0, -116.997, 34.003), int(rng.integers(250, 330)))
    valid = np.ones(pix.shape[1:], bool)
    plain = compose.warp_naip(pix, valid, t, "EPSG:26911", g, block=32)
    r, c = int(rng.integers(100, 250)), int(rng.integers(100, 200))
    valid[r, c] = False
    pre = compose.warp_naip(pix, valid, t, "EPSG:26911", g, block=32)
    # output pixels whose kernel could read (r, c): within 2 source px of it
    cols, rows = np.meshgrid(np.arange(g.width) + 0.5, np.arange(g.height) + 0.5)
    from rasterio.warp import transform as crs_transform

    lon, lat = g.transform * (cols.ravel(), rows.ravel())
    sx, sy = crs_transform(g.crs, "EPSG:26911", lon, lat)
    sc, sr = ~t * (np.asarray(sx), np.asarray(sy))
    near = ((np.abs(sc - (c + 0.5)) < 2) & (np.abs(sr - (r + 0.5)) < 2)).reshape(g.shape)
    assert near.any() and (pre[3][near] < 255).any()  # the premultiplied path ran and saw the hole
    far = ~near & (plain[3] == 255)
    d = np.abs(plain[:3, far].astype(int) - pre[:3, far].astype(int))
    assert d.max() <= 1 and (d == 0).mean() > 0.999
    assert (pre[3][far] == 255).all()
