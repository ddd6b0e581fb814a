"""gl10m.geometry: footprints, the 10x10 grid convention, ground sizes, equal-area overlap."""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from pyproj import Geod

from gl10m import geometry as geo

FP = 0.024
GRID = 10


def test_footprint_centred_and_sized():
    b = geo.footprint_bounds([-100.0, 10.5], [40.0, -3.25], FP)
    assert b.shape == (2, 4)
    np.testing.assert_allclose((b[:, 0] + b[:, 2]) / 2, [-100.0, 10.5])
    np.testing.assert_allclose((b[:, 1] + b[:, 3]) / 2, [40.0, -3.25])
    np.testing.assert_allclose(b[:, 2] - b[:, 0], FP)
    np.testing.assert_allclose(b[:, 3] - b[:, 1], FP)
    with pytest.raises(ValueError, match="footprint size"):
        geo.footprint_bounds(0, 0, 0)


@pytest.mark.parametrize("lon,lat", [(-100.0, 40.0), (-117.123456789, 33.987654321), (-69.2, 46.9)])
def test_tiles_tessellate_footprint(lon, lat):
    b = geo.footprint_bounds(lon, lat, FP)[None]
    t = geo.tile_bounds(b, GRID)[0]
    assert t.shape == (100, 4)
    fp = geo.boxes(b[0])
    tiles = geo.boxes(t)
    # union is the footprint, areas add up (no overlap, no gap)
    assert shapely.union_all(tiles).symmetric_difference(fp).area == pytest.approx(0, abs=1e-18)
    assert shapely.area(tiles).sum() == pytest.approx(fp.area, rel=1e-12)
    inter = shapely.area(shapely.intersection(tiles[:, None], tiles[None, :]))
    np.fill_diagonal(inter, 0)
    assert inter.max() == pytest.approx(0, abs=1e-20)
    # neighbours share their edge exactly (same float), outer edges are the footprint's
    for r in range(GRID):
        for c in range(GRID - 1):
            assert t[r * GRID + c, 2] == t[r * GRID + c + 1, 0]
    for r in range(GRID - 1):
        assert t[r * GRID, 1] == t[(r + 1) * GRID, 3]
    assert t[:, 0].min() == b[0, 0] and t[:, 2].max() == b[0, 2]
    assert t[:, 1].min() == b[0, 1] and t[:, 3].max() == b[0, 3]
    # equal-area: the projected tiles add up to the projected footprint
    assert geo.box_area_m2(t).sum() == pytest.approx(float(geo.box_area_m2(b[0])), rel=1e-12)


def test_tile_index_convention_row0_north_col0_west():
    b = geo.footprint_bounds(-100.0, 40.0, FP)[None]
    t = geo.tile_bounds(b, GRID)[0]
    w, s, e, n = b[0]
    cx = (t[:, 0] + t[:, 2]) / 2
    cy = (t[:, 1] + t[:, 3]) / 2
    # tile 0 NW, 9 NE, 90 SW, 99 SE
    assert t[0, 0] == w and t[0, 3] == n
    assert t[9, 2] == e and t[9, 3] == n
    assert t[90, 0] == w and t[90, 1] == s
    assert t[99, 2] == e and t[99, 1] == s
    # index = row*10 + col: along a row x grows (west -> east), down a column y falls
    assert np.all(np.diff(cx.reshape(GRID, GRID), axis=1) > 0)
    assert np.all(np.diff(cy.reshape(GRID, GRID), axis=0) < 0)
    rows, cols = geo.tile_row_col(np.arange(100), GRID)
    assert (geo.tile_index(rows, cols, GRID) == np.arange(100)).all()
    assert geo.tile_index(9, 0, GRID) == 90
    with pytest.raises(ValueError):
        geo.tile_index(10, 0, GRID)
    # the tile holding each tile centre is that tile; points outside give -1
    assert (geo.tile_of_point(cx, cy, b[0], GRID) == np.arange(100)).all()
    assert geo.tile_of_point(w - 1e-6, cy[0], b[0], GRID) == -1
    assert geo.tile_of_point(w, n, b[0], GRID) == 0 and geo.tile_of_point(e, s, b[0], GRID) == 99


def test_pixel_ground_size_25n_vs_49n():
    geod = Geod(ellps="WGS84")
    hx, hy = geo.pixel_size_m([25.0, 49.0], FP, 2680)
    lx, ly = geo.pixel_size_m([25.0, 49.0], FP, 268)
    # independent check: geodesic lengths of the footprint's centre lines
    for k, lat in enumerate((25.0, 49.0)):
        _, _, wx = geod.inv(-100 - FP / 2, lat, -100 + FP / 2, lat)
        _, _, wy = geod.inv(-100, lat - FP / 2, -100, lat + FP / 2)
        assert lx[k] * 268 == pytest.approx(wx, rel=1e-5)
        assert ly[k] * 268 == pytest.approx(wy, rel=1e-5)
        assert hx[k] * 2680 == pytest.approx(wx, rel=1e-5)
    # the facts: ~2.42 km wide at 25N, ~1.75 km at 49N; ~2.66 km tall at both
    assert lx[0] * 268 == pytest.approx(2420, rel=0.01)
    assert lx[1] * 268 == pytest.approx(1750, rel=0.01)
    assert ly[0] * 268 == pytest.approx(ly[1] * 268, rel=0.005)
    assert hx[1] < hx[0] and hx[1] / hx[0] == pytest.approx(np.cos(np.radians(49)) / np.cos(np.radians(25)), rel=0.01)
    # anisotropic: x pixel smaller than y pixel, more so at 49N
    assert hx[0] / hy[0] > hx[1] / hy[1]
    with pytest.raises(ValueError):
        geo.pixel_size_m(40.0, FP, 0)


def test_equal_area_box_matches_geodesic_area():
    geod = Geod(ellps="WGS84")
    for lat in (25.0, 37.5, 49.0):
        b = geo.footprint_bounds(-100.0, lat, FP)
        w, s, e, n = b
        area, _ = geod.polygon_area_perimeter([w, e, e, w], [s, s, n, n])
        assert float(geo.box_area_m2(b)) == pytest.approx(abs(area), rel=1e-4)
    a25 = float(geo.box_area_m2(geo.footprint_bounds(-100, 25, FP)))
    a49 = float(geo.box_area_m2(geo.footprint_bounds(-100, 49, FP)))
    assert a49 / a25 == pytest.approx(np.cos(np.radians(49)) / np.cos(np.radians(25)), rel=0.01)


def test_overlap_fraction():
    a = geo.footprint_bounds(-100.0, 40.0, FP)
    assert geo.overlap_fraction(a, a) == pytest.approx(1.0)
    half = geo.footprint_bounds(-100.0 + FP / 2, 40.0, FP)
    assert geo.overlap_fraction(a, half) == pytest.approx(0.5, rel=1e-6)
    quarter = geo.footprint_bounds(-100.0 + FP / 2, 40.0 + FP / 2, FP)
    assert geo.overlap_fraction(a, quarter) == pytest.approx(0.25, rel=1e-3)
    touching = geo.footprint_bounds(-100.0 + FP, 40.0, FP)
    assert geo.overlap_fraction(a, touching) == pytest.approx(0.0, abs=1e-9)
    far = geo.footprint_bounds(-99.0, 41.0, FP)
    assert geo.overlap_fraction(a, far) == 0.0
    # against shapely on the projected polygons, many random pairs (vectorised)
    rng = np.random.default_rng(7)
    p = rng.uniform([-100, 40], [-99.97, 40.03], size=(200, 2))
    q = rng.uniform([-100, 40], [-99.97, 40.03], size=(200, 2))
    ba, bb = geo.footprint_bounds(p[:, 0], p[:, 1], FP), geo.footprint_bounds(q[:, 0], q[:, 1], FP)
    fa, fb = geo.to_equal_area(geo.boxes(ba)), geo.to_equal_area(geo.boxes(bb))
    want = shapely.area(shapely.intersection(fa, fb)) / np.minimum(shapely.area(fa), shapely.area(fb))
    np.testing.assert_allclose(geo.overlap_fraction(ba, bb), want, rtol=1e-6, atol=1e-12)


def test_representative_point_inside_c_shape():
    # a C open to the east: its centroid lies in the empty mouth
    c = shapely.Polygon([(0, 0), (3, 0), (3, 1), (1, 1), (1, 2), (3, 2), (3, 3), (0, 3)])
    assert not c.contains(c.centroid)
    ring = shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (3, 1), (3, 3), (1, 3)]])
    assert not ring.contains(ring.centroid)
    multi = shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(5, 0, 6, 1)])
    assert not multi.contains(multi.centroid)
    geoms = np.array([c, ring, multi], dtype=object)
    x, y = geo.representative_points(geoms)
    assert shapely.contains_xy(geoms, x, y).all()
    with pytest.raises(ValueError, match="empty"):
        geo.representative_points(np.array([shapely.Polygon()], dtype=object))


def test_to_equal_area_geometry_area():
    b = geo.footprint_bounds(-90.0, 30.0, FP)
    poly = geo.boxes(b)
    assert float(shapely.area(geo.to_equal_area(np.array([poly]))[0])) == pytest.approx(float(geo.box_area_m2(b)), rel=1e-9)


# -- georeferencing (meta.json's georef block) -------------------------------------------------
def _grids(bounds, lr_px=268, hr_px=2680):
    from gl10m import compose

    return compose.footprint_grid(bounds, lr_px), compose.footprint_grid(bounds, hr_px)


def _georef_sample(bounds, grid=GRID):
    lr, hr = _grids(bounds)
    return {"footprint": dict(zip(("west", "south", "east", "north"), bounds)),
            "georef": geo.georef_meta(lr, hr, grid)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_georef_transforms_are_the_grids_and_tile_the_footprint(seed):
    """LR and HR transforms are rasterio's for the footprint grids; tile i's transform (the rule)
    is rasterio's window transform of block (row, col) of the HR mosaic; the tiles tile the
    footprint: tile 0 at its north-west corner, tile 99 at its south-east, neighbours share edges."""
    from rasterio.transform import from_bounds
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    rng = np.random.default_rng(seed)
    for _ in range(20):
        lon, lat = rng.uniform(-125, -67), rng.uniform(24, 49)
        b = tuple(float(v) for v in geo.footprint_bounds(lon, lat, FP))
        m = _georef_sample(b)
        g = m["georef"]
        assert g["crs"] == "EPSG:4326"
        assert geo.lr_transform(m) == list(from_bounds(*b, 268, 268).to_gdal())
        hr = from_bounds(*b, 2680, 2680)
        assert g["hr"]["transform"] == list(hr.to_gdal())
        assert geo.image_bounds(m, "lr") == pytest.approx(b, abs=1e-12)
        want = geo.tile_bounds([b], GRID)[0]
        for i in range(100):
            r, c = divmod(i, GRID)
            np.testing.assert_allclose(geo.tile_transform(m, i),
                                       window_transform(Window(c * 268, r * 268, 268, 268), hr).to_gdal(),
                                       rtol=0, atol=1e-12)
            np.testing.assert_allclose(geo.image_bounds(m, i), want[i], rtol=0, atol=1e-12)
        w, s, e, n = b
        assert geo.image_bounds(m, 0)[0] == w and geo.image_bounds(m, 0)[3] == n  # NW corner, exactly
        assert geo.image_bounds(m, 99)[1:3] == pytest.approx((s, e), abs=1e-12)  # SE corner
        assert geo.image_bounds(m, 9)[2:] == pytest.approx((e, n), abs=1e-12)    # NE
        assert geo.image_bounds(m, 90)[:2] == pytest.approx((w, s), abs=1e-12)   # SW
        assert geo.georef_problems(m, lr_size=268, tile_size=268) == []


def test_georef_problems_name_what_disagrees_with_the_footprint():
    b = tuple(float(v) for v in geo.footprint_bounds(-100.0, 40.0, FP))
    good = _georef_sample(b)
    assert geo.georef_problems(good) == []

    def bad(edit):
        import copy

        m = copy.deepcopy(good)
        edit(m)
        return geo.georef_problems(m, lr_size=268, tile_size=268)

    def shift_hr(m):  # the mosaic (so every tile) one tile east
        m["georef"]["hr"]["transform"][0] += FP / GRID

    assert any("hr transform" in p for p in bad(shift_hr))
    assert any("lr transform" in p for p in bad(lambda m: m["georef"]["lr"]["transform"].__setitem__(3, 40.5)))
    assert any("crs" in p for p in bad(lambda m: m["georef"].__setitem__("crs", "EPSG:3857")))
    assert any("lr size" in p for p in bad(lambda m: m["georef"]["lr"].update(width=134, height=134)))
    assert any("do not make" in p for p in bad(lambda m: m["georef"]["tiles"].update(width=134)))
    assert any("no georef" in p for p in bad(lambda m: m.pop("georef")))
    assert any("malformed" in p for p in bad(lambda m: m["georef"]["hr"].pop("transform")))
    with pytest.raises(ValueError, match="outside"):
        geo.tile_transform(good, 100)
