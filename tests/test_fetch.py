"""fetch_scene end to end on a small real world: UTM COGs on disk and behind a real Range HTTP
server on 127.0.0.1 (the testbed's handler, with fault injection for 403/404/429/5xx).

The world: one 0.024-degree footprint near 34N 117W; a smooth "true" reflectance field
defined in UTM metres renders both the NAIP quarter-quads (uint8 = refl / 0.3 * 255, band 4 a
constant N value that must never show up) and the Sentinel-2 granules (DN = refl * 10000, plus
1000 at baseline 05.09), so a downsampled HR mosaic must match the LR composite.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from pyproj import Transformer

from gl10m import fetch, profile as profile_mod, samples
from gl10m.sources.retry import TransientError
from tests.fixtures.cogs import write_cog

BOUNDS = (-117.0, 34.0, -116.976, 34.024)
N_VALUE = 77  # NAIP band 4 (N): a constant that must never appear as a colour


def truth(x, y):
    """Reflectance [3, ...] (R, G, B) at UTM x, y metres: smooth, 0.03..0.25."""
    r = 0.04 + 0.18 * (0.5 + 0.5 * np.sin(x / 170.0) * np.cos(y / 230.0))
    g = 0.05 + 0.15 * (0.5 + 0.5 * np.sin((x + y) / 260.0))
    b = 0.03 + 0.12 * (0.5 + 0.5 * np.cos((x - 0.5 * y) / 200.0))
    return np.stack([r, g, b]).astype(np.float32)


def _utm_box(epsg):
    tr = Transformer.from_crs(4326, epsg, always_xy=True)
    w, s, e, n = BOUNDS
    xs, ys = tr.transform([w, e, w, e], [s, s, n, n])
    return min(xs), min(ys), max(xs), max(ys)


def _grid_xy(west, north, res, w, h):
    x = west + (np.arange(w) + 0.5) * res
    y = north - (np.arange(h) + 0.5) * res
    return np.meshgrid(x, y)


def make_naip(root: Path, name, x0, x1, y0, y1, *, wedge=False, dark=None, res=1.0):
    """A 4-band uint8 QQ over UTM [x0, x1] x [y0, y1]; `wedge`: black (0) triangle in its east
    part; `dark`: (x0, x1, y0, y1) painted (3, 3, 3), dark but valid data."""
    w, h = int((x1 - x0) / res), int((y1 - y0) / res)
    X, Y = _grid_xy(x0, y1, res, w, h)
    rgb = np.clip(np.floor(truth(X, Y) / 0.3 * 255 + 0.5), 1, 255).astype(np.uint8)
    data = np.concatenate([rgb, np.full((1, h, w), N_VALUE, np.uint8)])
    if wedge:  # triangle in the eastern 150 m, full height at the east edge
        tri = (X - (x1 - 150)) > (Y - y0) * 150 / (y1 - y0)
        data[:, tri] = 0
    if dark is not None:
        dx0, dx1, dy0, dy1 = dark
        m = (X >= dx0) & (X < dx1) & (Y >= dy0) & (Y < dy1)
        data[:3, m] = 3
    return write_cog(root / "naip" / f"{name}.tif", data, 26911, x0, y1, res)


def make_s2(root: Path, name, *, offset=1000, cloud=None, cloud_class=9, nodata_west_m=0.0, scl_all=None):
    """B02/B03/B04 (10 m) + SCL (20 m) granule over the footprint (+600 m margin).
    `cloud` (x0, x1, y0, y1): bright DN and SCL `cloud_class` there."""
    x0, y0, x1, y1 = _utm_box(32611)
    x0, y1 = np.floor(x0 / 20) * 20 - 600, np.ceil(y1 / 20) * 20 + 600
    w10, h10 = int((x1 + 600 - x0) / 20) * 2, int((y1 - (y0 - 600)) / 20) * 2
    X, Y = _grid_xy(x0, y1, 10.0, w10, h10)
    refl = truth(X, Y)
    dn = (np.floor(refl * 10000 + 0.5) + offset).astype(np.uint16)
    scl = np.full((h10 // 2, w10 // 2), 4, np.uint8)  # vegetation
    Xs, Ys = _grid_xy(x0, y1, 20.0, w10 // 2, h10 // 2)
    if cloud is not None:
        cx0, cx1, cy0, cy1 = cloud
        dn[:, (X >= cx0) & (X < cx1) & (Y >= cy0) & (Y < cy1)] = 9000 + offset
        scl[(Xs >= cx0) & (Xs < cx1) & (Ys >= cy0) & (Ys < cy1)] = cloud_class
    if scl_all is not None:
        scl[:] = scl_all
    if nodata_west_m:
        dn[:, X < x0 + nodata_west_m] = 0
        scl[Xs < x0 + nodata_west_m] = 0
    hrefs = {}
    for i, band in enumerate(("B04", "B03", "B02")):
        hrefs[band] = write_cog(root / "s2" / name / f"{band}.tif", dn[i], 32611, x0, y1, 10.0, nodata=0)
    hrefs["SCL"] = write_cog(root / "s2" / name / "SCL.tif", scl, 32611, x0, y1, 20.0, nodata=0)
    return hrefs


def s2_item(iid, date, baseline, hrefs, cloud_cover=0.5):
    return {"id": iid, "datetime": f"{date}T18:39:19Z", "epsg": 32611, "mgrs_tile": "11SLT", "baseline": baseline,
            "cloud_cover": cloud_cover, "hrefs": dict(hrefs), "bbox": list(BOUNDS)}


def naip_item(iid, href, date="2023-06-12"):
    return {"id": iid, "href": href, "datetime": f"{date}T16:00:00Z", "epsg": 26911, "gsd": 1.0, "state": "CA",
            "year": 2023, "bbox": list(BOUNDS)}


def plan_row(s2_items, naip_items, key="CA-000001"):
    w, s, e, n = BOUNDS
    return {"key": key, "scene_id": key.split("-", 1)[1], "state": "CA", "split": "train",
            "west": w, "south": s, "east": e, "north": n, "lon": (w + e) / 2, "lat": (s + n) / 2,
            "concepts": [3, 29], "scene_frac": [0.0] * 66, "rel_frac": [],
            "tile_idx": [0, 0, 57], "tile_concept": [3, 29, 29], "tile_frac": [0.25, 0.5, 1.0],
            "tile_dominant": [29] * 100, "naip_year": 2023, "naip_date": "2023-06-12",
            "naip_items": json.dumps(naip_items), "s2_window": "aligned", "s2_start": "2023-01-01",
            "s2_end": "2023-12-31", "s2_items": json.dumps(s2_items), "provider": "stac", "plan_hash": "abc123"}


@pytest.fixture(scope="module")
def prof():
    return profile_mod.load()


@pytest.fixture(scope="module")
def small(prof):
    """The same profile on a 32-px LR grid and 320-px HR grid (fast paths that reject)."""
    return prof.model_copy(update={"geometry": prof.geometry.model_copy(update={"tile_px": 32, "lr_px": 32})})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch-world")
    x0, y0, x1, y1 = _utm_box(26911)
    x0, y0, x1, y1 = np.floor(x0) - 20, np.floor(y0) - 20, np.ceil(x1) + 20, np.ceil(y1) + 20
    mid = round((x0 + x1) / 2)
    ux0, uy0, ux1, uy1 = (round(v / 20) * 20 for v in _utm_box(32611))  # on the 20 m SCL grid
    cloud = (ux0 + 300, ux0 + 900, uy0 + 400, uy0 + 1000)
    tile_w, tile_h = (x1 - x0) / 10, (y1 - y0) / 10
    w = {
        "root": root,
        # west QQ reaches 150 m past the middle, with a black wedge there; east QQ overlaps it
        "qq_w": make_naip(root, "qq_w", x0, mid + 150, y0, y1, wedge=True),
        "qq_e": make_naip(root, "qq_e", mid - 150, x1, y0, y1),
        "qq_w_only": make_naip(root, "qq_w_only", x0, mid + 150, y0, y1, wedge=True),
        # a dark (3,3,3) block covering the middle of one tile (row 2, col 2 in NW convention)
        "qq_dark": make_naip(root, "qq_dark", x0, x1, y0, y1,
                             dark=(x0 + 2.1 * tile_w, x0 + 2.9 * tile_w, y1 - 2.9 * tile_h, y1 - 2.1 * tile_h)),
        "s2_a": make_s2(root, "a"),
        "s2_b": make_s2(root, "b", cloud=cloud, cloud_class=9),
        "s2_c": make_s2(root, "c", cloud=cloud, cloud_class=8, nodata_west_m=700),
        "s2_old": make_s2(root, "old", offset=0),
        "s2_allcloud": make_s2(root, "allcloud", scl_all=9),
        "cloud": cloud,
    }
    corrupt = root / "corrupt" / "B04.tif"
    corrupt.parent.mkdir(parents=True)
    data = Path(w["s2_a"]["B04"]).read_bytes()
    corrupt.write_bytes(data[: len(data) * 2 // 3])
    w["corrupt"] = str(corrupt)
    return w


def _good_row(world, **kw):
    s2 = [s2_item("S2A_20230501", "2023-05-01", "05.09", world["s2_a"]),
          s2_item("S2B_20230601", "2023-06-01", "05.09", world["s2_b"]),
          s2_item("S2A_20230701", "2023-07-01", "05.10", world["s2_c"])]
    naip = [naip_item("ca_m_qq_e", world["qq_e"]), naip_item("ca_m_qq_w", world["qq_w"])]
    return plan_row(s2, naip, **kw)


# -- the good path -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(world, prof, tmp_path_factory):
    out = tmp_path_factory.mktemp("W")
    row = _good_row(world)
    res = fetch.fetch_scene(row, prof, out)
    return row, res, out


def test_good_scene_is_staged_with_provenance(good, prof):
    row, res, out = good
    assert res.status == "ok", res
    assert res.path == out / "staged" / "train" / "CA-000001"
    s = samples.read_staged(res.path)
    assert s.lr.shape == (268, 268, 3) and s.hr.shape == (100, 268, 268, 3)
    assert s.labels.tolist() == [1 if i in (3, 29) else 0 for i in range(66)]
    assert s.tile_frac[0, 3] == np.float16(0.25) and s.tile_frac[57, 29] == 1.0 and s.tile_frac.sum() == np.float16(1.75)
    m = s.meta
    assert [it["id"] for it in m["s2"]["items"]] == ["S2A_20230501", "S2B_20230601", "S2A_20230701"]
    assert all(it["offset_subtracted"] == 1000 for it in m["s2"]["items"])
    assert sorted(it["id"] for it in m["naip"]["items"]) == ["ca_m_qq_e", "ca_m_qq_w"]
    assert m["footprint"] == dict(zip(("west", "south", "east", "north"), BOUNDS))
    assert m["profile"]["hash"] == prof.hash() and m["builder"]["name"] == "gl10m"
    assert m["s2"]["window"] == "aligned" and m["concepts"] == ["swimming_pool", "forest"]
    assert m["lr"]["px_m_x"] < m["lr"]["px_m_y"]  # anisotropic degree pixels at 34N
    assert m["qc"]["s2_composite"]["min_obs"] >= 1
    # the cloudy dates have cloud in their SCL statistics; the clear one does not
    clouds = [it["scl"]["cloud"] for it in m["s2"]["items"]]
    assert clouds[0] == 0 and clouds[1] > 0.02 and clouds[2] > 0.02
    assert "http" not in res.path.joinpath("meta.json").read_text()


def test_hr_mosaic_matches_lr_composite(good):
    """Downsampled HR (10x10 block means) against LR: same place, same colours."""
    _, res, _ = good
    s = samples.read_staged(res.path)
    from gl10m.compose import join_tiles

    hr = join_tiles(s.hr).astype(np.float32)
    down = hr.reshape(268, 10, 268, 10, 3).mean(axis=(1, 3))
    lr = s.lr.astype(np.float32)
    for c in range(3):
        r = np.corrcoef(down[..., c].ravel(), lr[..., c].ravel())[0, 1]
        assert r > 0.95, (c, r)
    assert np.abs(down - lr).mean() < 4.0  # the offset was removed: no 85-level shift


def test_no_black_seam_and_no_n_band(good):
    _, res, _ = good
    s = samples.read_staged(res.path)
    from gl10m.compose import join_tiles

    hr = join_tiles(s.hr)
    assert np.count_nonzero(hr.max(axis=-1) <= 5) == 0  # the wedge was filled by the east QQ
    # band 4 (a constant) never replaced a colour channel
    assert all(hr[..., c].std() > 10 for c in range(3))


def test_clouds_do_not_leak(good, world):
    """Two of three dates are cloudy (SCL 9 and 8, DN 9000) over a block; the median there must
    equal the clear date's reflectance, not the cloud's (which would be ~255)."""
    _, res, _ = good
    s = samples.read_staged(res.path)
    from gl10m.compose import join_tiles

    down = join_tiles(s.hr).astype(np.float32).reshape(268, 10, 268, 10, 3).mean(axis=(1, 3))
    diff = np.abs(down - s.lr).max(axis=-1)
    assert s.lr.max() < 200  # true reflectance <= 0.22 -> <= 187; a cloud would be 255
    assert diff.max() < 12  # nowhere, not even at the cloud's edge, does LR depart from HR


def test_rewrite_is_byte_identical(good, world, prof):
    row, res, out = good
    before = {p.name: p.read_bytes() for p in res.path.iterdir()}
    again = fetch.fetch_scene(row, prof, out)
    assert again.status == "ok"
    after = {p.name: p.read_bytes() for p in again.path.iterdir()}
    assert before == after


# -- harmonisation driven by the baseline -------------------------------------------------------
def test_old_baseline_keeps_its_dn(world, small, tmp_path, monkeypatch):
    """A 2022 granule at baseline 03.01 has no offset: the result must equal the one from a
    05.09 granule with the offset (same scene), and must not be darkened by 1000 DN."""
    written = []
    monkeypatch.setattr(samples, "write_staged", lambda root, s: written.append(s) or Path(root))
    naip = [naip_item("ca_m_qq_e", world["qq_e"]), naip_item("ca_m_qq_w", world["qq_w"])]
    old = plan_row([s2_item("S2A_20220110", "2022-01-10", "03.01", world["s2_old"])], naip, key="CA-old")
    new = plan_row([s2_item("S2A_20230501", "2023-05-01", "05.09", world["s2_a"])], naip, key="CA-new")
    assert fetch.fetch_scene(old, small, tmp_path).status == "ok"
    assert fetch.fetch_scene(new, small, tmp_path).status == "ok"
    a, b = written
    assert np.array_equal(a.lr, b.lr) and 40 < a.lr.mean() < 160
    assert a.meta["s2"]["items"][0]["offset_subtracted"] == 0
    assert b.meta["s2"]["items"][0]["offset_subtracted"] == 1000


# -- typed rejections (small grids: fast) ---------------------------------------------------------
def _small_row(world, s2=None, naip=None):
    s2 = s2 if s2 is not None else [s2_item("S2A_20230501", "2023-05-01", "05.09", world["s2_a"])]
    naip = naip if naip is not None else [naip_item("ca_m_qq_e", world["qq_e"]), naip_item("ca_m_qq_w", world["qq_w"])]
    return plan_row(s2, naip)


def test_small_grid_good_path_passes_qc(world, small, tmp_path, monkeypatch):
    # the small profile cannot write a 268-px sample; check the composition passes all QC
    written = []
    monkeypatch.setattr(samples, "write_staged", lambda root, s: written.append(s) or Path(root))
    res = fetch.fetch_scene(_small_row(world), small, tmp_path)
    assert res.status == "ok" and written[0].hr.shape == (100, 32, 32, 3)


def test_missing_asset(world, small, tmp_path):
    hrefs = dict(world["s2_a"], SCL=str(Path(world["root"]) / "nope" / "SCL.tif"))
    res = fetch.fetch_scene(_small_row(world, s2=[s2_item("S2X", "2023-05-01", "05.09", hrefs)]), small, tmp_path)
    assert (res.status, res.reason) == ("rejected", "asset_missing")
    assert res.detail["item"] == "S2X" and res.detail["asset"] == "SCL"
    assert not (tmp_path / "staged").exists()


def test_corrupt_asset(world, small, tmp_path):
    hrefs = dict(world["s2_a"], B04=world["corrupt"])
    res = fetch.fetch_scene(_small_row(world, s2=[s2_item("S2X", "2023-05-01", "05.09", hrefs)]), small, tmp_path)
    assert (res.status, res.reason) == ("rejected", "asset_corrupt")
    assert res.detail["asset"] == "B04"


def test_all_cloudy_is_s2_masked(world, small, tmp_path):
    res = fetch.fetch_scene(_small_row(world, s2=[s2_item("S2X", "2023-05-01", "05.09", world["s2_allcloud"])]),
                            small, tmp_path)
    assert (res.status, res.reason) == ("rejected", "s2_masked")
    assert res.detail["composite"]["uncovered"] == 1.0


def test_unknown_baseline_is_excluded_not_guessed(world, small, tmp_path):
    s2 = [s2_item("S2X", "2023-05-01", None, world["s2_a"])]
    res = fetch.fetch_scene(_small_row(world, s2=s2), small, tmp_path)
    assert (res.status, res.reason) == ("rejected", "s2_masked")
    assert res.detail["excluded"][0]["id"] == "S2X"


def test_wedge_without_neighbour_leaves_black_tiles(world, small, tmp_path):
    # uncovered pixels stay black and the black-pixel QC rejects the tiles they fill (GL-10M rule)
    res = fetch.fetch_scene(_small_row(world, naip=[naip_item("ca_m_w", world["qq_w_only"])]), small, tmp_path)
    assert (res.status, res.reason) == ("rejected", "hr_black")
    assert 0.3 < res.detail["uncovered"] < 0.6
    assert len(res.detail["tiles"]) >= 25


def test_dark_tile_is_hr_black(world, small, tmp_path):
    res = fetch.fetch_scene(_small_row(world, naip=[naip_item("ca_m_dark", world["qq_dark"])]), small, tmp_path)
    assert (res.status, res.reason) == ("rejected", "hr_black")
    assert res.detail["tiles"] == [22]  # row 2, col 2 from the north-west


def test_bad_row_is_one_line_error(small, tmp_path):
    with pytest.raises(ValueError, match="lacks field"):
        fetch.fetch_scene({"key": "CA-1"}, small, tmp_path)


# -- over HTTP: a real Range server with faults ----------------------------------------------------
class FaultServer:
    """The testbed's Range HTTP handler over `root`, plus scripted faults per path substring."""

    def __init__(self, root):
        from gl10m.testbed.serve import make_http_server

        self.root = Path(root)
        self.faults: list[list] = []  # [substring, status, remaining, headers]
        self.hits: list[str] = []
        srv = make_http_server(root)
        orig = srv.RequestHandlerClass._serve
        me = self

        def _serve(handler, body):
            me.hits.append(handler.path)
            for f in me.faults:
                sub, status, left, headers = f
                if sub in handler.path and left != 0:
                    f[2] = left - 1
                    handler.send_response(status)
                    for k, v in headers.items():
                        handler.send_header(k, v)
                    handler.send_header("Content-Length", "0")
                    handler.end_headers()
                    return
            handler.path = handler.path.split("?", 1)[0]
            return orig(handler, body)

        srv.RequestHandlerClass._serve = _serve
        self.srv = srv
        self.url = f"http://127.0.0.1:{srv.server_address[1]}"
        self.thread = threading.Thread(target=srv.serve_forever, daemon=True)
        self.thread.start()

    def href(self, local: str) -> str:
        return self.url + "/" + str(Path(local).relative_to(self.root))

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def http(world):
    s = FaultServer(world["root"])
    yield s
    s.close()


FAST = {"gdal_env": {"GDAL_HTTP_MAX_RETRY": 0}, "retry_opts": {"attempts": 3, "base_delay": 0.01, "max_delay": 0.05}}


def _http_row(world, http, s2_name="s2_a"):
    hrefs = {k: http.href(v) for k, v in world[s2_name].items()}
    naip = [naip_item("ca_m_qq_e", http.href(world["qq_e"])), naip_item("ca_m_qq_w", http.href(world["qq_w"]))]
    return _small_row(world, s2=[s2_item("S2A_20230501", "2023-05-01", "05.09", hrefs)], naip=naip)


def test_http_good_and_limiter_held_per_read(world, http, small, tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "write_staged", lambda root, s: Path(root))

    class Counting:
        def __init__(self):
            self.n, self.active, self.max_active = 0, 0, 0

        def __enter__(self):
            self.n += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)

        def __exit__(self, *exc):
            self.active -= 1

    lim = Counting()
    res = fetch.fetch_scene(_http_row(world, http), small, tmp_path, limiter=lim, **FAST)
    assert res.status == "ok", res
    # 4 S2 assets + 2 QQs, one acquisition each, and one entry per batch (LR, HR) in the calling
    # thread that binds the limiter before the I/O threads share it
    assert lim.n == 6 + 2 and lim.active == 0


def test_http_404_is_asset_missing(world, http, small, tmp_path):
    row = _http_row(world, http)
    items = json.loads(row["s2_items"])
    items[0]["hrefs"]["B03"] = http.url + "/s2/a/NOPE.tif"
    row["s2_items"] = json.dumps(items)
    res = fetch.fetch_scene(row, small, tmp_path, **FAST)
    assert (res.status, res.reason) == ("rejected", "asset_missing") and res.detail["status"] == 404


def test_http_503_with_retry_after_is_retried(world, http, small, tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "write_staged", lambda root, s: Path(root))
    http.faults.append(["/s2/a/B02.tif", 503, 1, {"Retry-After": "0"}])
    res = fetch.fetch_scene(_http_row(world, http), small, tmp_path, **FAST)
    assert res.status == "ok" and http.faults[0][2] == 0


def test_http_persistent_500_raises_transient(world, http, small, tmp_path):
    http.faults.append(["/s2/a/SCL.tif", 500, -1, {}])
    with pytest.raises(TransientError, match="SCL"):
        fetch.fetch_scene(_http_row(world, http), small, tmp_path, **FAST)
    assert sum("/s2/a/SCL.tif" in h for h in http.hits) >= 3  # every attempt went to the server


def test_http_403_resigns_once(world, http, small, tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "write_staged", lambda root, s: Path(root))
    http.faults.append(["tok=old", 403, -1, {}])
    calls = []

    def sign(h):
        calls.append(("sign", h))
        return h + "?tok=old"

    def resign(h):
        calls.append(("resign", h))
        return h + "?tok=new"

    res = fetch.fetch_scene(_http_row(world, http), small, tmp_path, sign=sign, resign=resign, **FAST)
    assert res.status == "ok"
    assert sum(c[0] == "resign" for c in calls) == 6  # each asset re-signed once after its 403
    assert all("?" not in c[1] for c in calls)  # the plan's hrefs stay unsigned


def test_http_403_after_resign_raises(world, http, small, tmp_path):
    http.faults.append(["/s2/", 403, -1, {}])
    with pytest.raises(fetch.AccessDenied):
        fetch.fetch_scene(_http_row(world, http), small, tmp_path, **FAST)


def test_unobserved_lr_pixels_are_black_and_the_black_ratio_decides(world, small, tmp_path, monkeypatch):
    # one date with a cloud and a no-data strip: those LR pixels have no valid observation
    written = []
    monkeypatch.setattr(samples, "write_staged", lambda root, s: written.append(s) or Path(root))
    res = fetch.fetch_scene(_small_row(world, s2=[s2_item("S2C", "2023-07-01", "05.10", world["s2_c"])]),
                            small, tmp_path)
    assert res.status == "ok", res.detail
    lr = written[0].lr
    black = ((lr[..., 0] | lr[..., 1] | lr[..., 2]) == 0).mean()
    assert 0 < black < small.qc.max_black_ratio
    assert res.detail["s2_min_obs"] == 0


# -- the provider reads and the one assembler -----------------------------------------------------
def _block_mean_corr(hr_rgb, lr_rgb, factor=10):
    h, w, _ = lr_rgb.shape
    down = hr_rgb.astype(np.float32).reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
    return [np.corrcoef(down[..., c].ravel(), lr_rgb[..., c].astype(np.float32).ravel())[0, 1] for c in range(3)]


def test_stac_provider_reads_lr_and_hr_on_the_footprint_grids(world, prof):
    """read_lr / read_hr of the STAC provider: the composite and the mosaic of the row's COG
    windows on the LR and HR grids, with what was used; nothing is checked or written."""
    from gl10m import compose
    from gl10m.sources.base import ReadContext
    from gl10m.sources.stac import StacProvider

    row = fetch.parse_row(_good_row(world))
    lrg, hrg = compose.lr_grid(BOUNDS, prof), compose.hr_grid(BOUNDS, prof)
    p = StacProvider("http://127.0.0.1:9/stac")  # hrefs are files: the API is never asked
    lr = p.read_lr(row, lrg, prof, ReadContext())
    hr = p.read_hr(row, hrg, prof, ReadContext())
    assert lr.rgb.shape == (268, 268, 3) and lr.rgb.dtype == np.uint8 and lr.n_dates == 3
    assert lr.count.shape == (268, 268) and 1 <= lr.count.min() and lr.count.max() == 3  # the cloud block: fewer
    assert [i["id"] for i in lr.info["items"]] == ["S2A_20230501", "S2B_20230601", "S2A_20230701"]
    assert hr.rgb.shape == (2680, 2680, 3) and hr.rgb.dtype == np.uint8 and hr.covered.all()
    assert sorted(i["id"] for i in hr.info["items"]) == ["ca_m_qq_e", "ca_m_qq_w"]
    assert min(_block_mean_corr(hr.rgb, lr.rgb)) > 0.95
    assert lr.meta == {} and hr.meta == {}  # the stac provider adds nothing to the metadata


def test_stac_provider_read_rejects_a_missing_asset(world, prof):
    from gl10m import compose
    from gl10m.sources.base import ASSET_MISSING, ReadContext, Rejection
    from gl10m.sources.stac import StacProvider

    row = fetch.parse_row(_small_row(world, naip=[naip_item("ca_m_gone", str(world["root"] / "nope.tif"))]))
    with pytest.raises(Rejection) as ei:
        StacProvider("http://127.0.0.1:9/stac").read_hr(row, compose.hr_grid(BOUNDS, prof), prof, ReadContext())
    assert ei.value.reason == ASSET_MISSING and ei.value.detail["item"] == "ca_m_gone"


def _reads(prof, *, lr_black=False, uncovered=False, dark_tile=None, seed=0):
    """LR and HR reads as a provider returns them: a smooth field, consistent across scales."""
    from gl10m.sources.base import HRImage, LRImage

    rng = np.random.default_rng(seed)
    n = prof.geometry.lr_px
    base = rng.integers(40, 200, size=(n, n, 3), dtype=np.uint8)
    lr = LRImage(np.zeros_like(base) if lr_black else base, np.full((n, n), 2, np.int32), 2,
                 {"items": [{"id": "s2-a"}, {"id": "s2-b"}], "excluded": []},
                 {"provider": "someprovider", "s2": {"collection": "S2/COLL"}})
    hr_rgb = np.repeat(np.repeat(base, 10, axis=0), 10, axis=1)
    covered = np.ones(hr_rgb.shape[:2], bool)
    if uncovered:
        hr_rgb[:], covered[:] = 0, False
    if dark_tile is not None:
        r, c = divmod(dark_tile, prof.geometry.grid)
        t = prof.geometry.tile_px
        hr_rgb[r * t:(r + 1) * t, c * t:(c + 1) * t] = 2
    return lr, HRImage(hr_rgb, covered, {"items": [{"id": "naip-a"}]}, {"naip": {"collection": "NAIP/COLL"}})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assemble_stages_any_providers_reads(prof, tmp_path, seed):
    """One assembler for every provider: QC, tiles (row*grid + col from the north-west), the
    metadata with the provider's additions merged one level deep, the staged sample."""
    from gl10m.compose import join_tiles

    lr, hr = _reads(prof, seed=seed)
    row = fetch.parse_row(plan_row([{"id": "s2-a"}], [{"id": "naip-a"}]))
    res = fetch.assemble(row, prof, lr, hr, tmp_path)
    assert res.status == "ok" and res.detail["s2_items"] == 2 and res.detail["naip_items"] == 1
    s = samples.read_staged(res.path)
    np.testing.assert_array_equal(s.lr, lr.rgb)
    assert np.abs(join_tiles(s.hr).astype(int) - hr.rgb.astype(int)).mean() < 3  # JPEG
    m = s.meta
    assert m["provider"] == "someprovider" and m["s2"]["collection"] == "S2/COLL"
    assert m["naip"]["collection"] == "NAIP/COLL" and m["naip"]["year"] == 2023  # merged, not replaced
    assert m["s2"]["items"] == [{"id": "s2-a"}, {"id": "s2-b"}] and m["qc"]["lr_black_ratio"] == 0.0


def test_assemble_rejections_are_the_same_for_every_provider(prof, tmp_path):
    from gl10m.sources.base import ASSET_MISSING, Rejection
    from gl10m.sources.retry import TransientError

    row = fetch.parse_row(plan_row([{"id": "s2-a"}], [{"id": "naip-a"}]))
    calls = []

    def hr_of(reads):
        def read():
            calls.append("hr")
            return reads[1]
        return read

    res = fetch.assemble(row, prof, _reads(prof, lr_black=True)[0], hr_of(_reads(prof)), tmp_path)
    assert res.label == "rejected:s2_masked" and res.detail["black_ratio"] == 1.0
    assert calls == []  # rejected on its LR: the HR is never read
    assert fetch.assemble(row, prof, *_reads(prof, uncovered=True), tmp_path).label == "rejected:naip_gap"
    res = fetch.assemble(row, prof, *_reads(prof, dark_tile=57), tmp_path)
    assert res.label == "rejected:hr_black" and res.detail["tiles"] == [57]

    def missing():
        raise Rejection(ASSET_MISSING, "x B04: gone?sig=secret", item="x", asset="B04")

    res = fetch.assemble(row, prof, missing, hr_of(_reads(prof)), tmp_path)
    assert res.label == "rejected:asset_missing" and "secret" not in json.dumps(res.detail)
    no_s2 = dict(row, s2_items=[])
    assert fetch.assemble(no_s2, prof, missing, missing, tmp_path).label == "rejected:s2_masked"
    no_naip = dict(row, naip_items=[])
    assert fetch.assemble(no_naip, prof, _reads(prof)[0], missing, tmp_path).label == "rejected:naip_gap"

    def flaky():
        raise TransientError("HTTP 503")

    with pytest.raises(TransientError):
        fetch.assemble(row, prof, flaky, missing, tmp_path)
    assert not (tmp_path / "staged").exists()


def _read_hr_in_worker(row, prof, limiter):
    from gl10m import compose
    from gl10m.sources.base import ReadContext
    from gl10m.sources.cog import CogReader

    hr = CogReader(io_threads=4).read_hr(fetch.parse_row(row), compose.hr_grid(BOUNDS, prof), prof,
                                         ReadContext(limiter=limiter))
    return bool(hr.covered.all()), hr.rgb.shape


def test_concurrent_reads_hold_a_dask_semaphore_inside_a_worker_process(world, small):
    """The reads of a scene run in threads; the pipeline's limiter is a distributed.Semaphore,
    which finds its worker only from the task's own thread: used first from a pool thread it
    fails ('NoneType' object has no attribute 'asyncio_loop')."""
    distributed = pytest.importorskip("distributed")
    row = _small_row(world, naip=[naip_item("ca_m_qq_e", world["qq_e"]), naip_item("ca_m_qq_w", world["qq_w"]),
                                  naip_item("ca_m_qq_w2", world["qq_w_only"], date="2023-06-11")])
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        sem = distributed.Semaphore(max_leases=2, name="gl10m-test-reads")
        covered, shape = client.submit(_read_hr_in_worker, row, small, sem, pure=False).result(timeout=120)
    assert covered and shape == (320, 320, 3)


def _held_until(event: threading.Event, slow: set, seen: list):
    """A signer under which a read of an href in `slow` waits for `event` (at most 10 s) and
    records whether it was set: whether the caller composed earlier windows meanwhile."""
    def sign(href):
        if href in slow:
            seen.append(event.wait(10))
        return href
    return sign


def _setting(event: threading.Event, fn):
    def wrapped(*a, **k):
        event.set()
        return fn(*a, **k)
    return wrapped


def test_hr_warps_a_window_while_the_next_is_still_read(world, small, monkeypatch):
    """The NAIP windows of a scene are read concurrently and each is warped as soon as it and
    those before it are in: the first quarter-quad's warp starts while the second is being read
    (reading both before warping either waited 10 s here and recorded False)."""
    from gl10m import compose
    from gl10m.sources.base import ReadContext
    from gl10m.sources.cog import CogReader

    event, seen = threading.Event(), []
    monkeypatch.setattr(compose, "warp_naip", _setting(event, compose.warp_naip))
    row = fetch.parse_row(_small_row(world))  # qq_e first (same date, id order), then qq_w
    reader = CogReader(_held_until(event, {world["qq_w"]}, seen), io_threads=4)
    hr = reader.read_hr(row, compose.hr_grid(BOUNDS, small), small, ReadContext())
    assert seen == [True]
    assert hr.covered.all() and [i["id"] for i in hr.info["items"]] == ["ca_m_qq_e", "ca_m_qq_w"]


def test_lr_composes_a_date_while_later_ones_are_still_read(world, small, monkeypatch):
    """Each Sentinel-2 date is warped as soon as its windows are in, while later dates are read;
    the composite is the one of reading everything first (io_threads=1 reads one after another)."""
    from gl10m import compose
    from gl10m.sources.base import ReadContext
    from gl10m.sources.cog import CogReader

    row = fetch.parse_row(_good_row(world))
    grid = compose.lr_grid(BOUNDS, small)
    serial = CogReader(io_threads=1).read_lr(row, grid, small, ReadContext())
    event, seen = threading.Event(), []
    monkeypatch.setattr(compose, "warp_reflectance", _setting(event, compose.warp_reflectance))
    last = set(world["s2_c"].values())  # the third date's assets
    lr = CogReader(_held_until(event, last, seen), io_threads=4).read_lr(row, grid, small, ReadContext())
    assert seen and all(seen)
    assert np.array_equal(lr.rgb, serial.rgb) and np.array_equal(lr.count, serial.count)
    assert [i["id"] for i in lr.info["items"]] == [i["id"] for i in serial.info["items"]]


def _reading_threads(world, small, seen: list):
    """read_hr of the small row with a signer that records the thread of each read."""
    from gl10m import compose
    from gl10m.sources.base import ReadContext
    from gl10m.sources.cog import CogReader

    def sign(href):
        seen.append(threading.current_thread())
        return href
    return CogReader(sign, io_threads=2).read_hr(fetch.parse_row(_small_row(world)), compose.hr_grid(BOUNDS, small),
                                                 small, ReadContext())


def test_reads_of_successive_scenes_run_on_the_same_threads(world, small):
    """A calling thread keeps its I/O threads from scene to scene (a thread started per batch
    starts cold in GDAL: ~0.06 CPU s a scene more on the bench); another calling thread has its
    own, and a forked child makes its own instead of waiting on threads it does not have."""
    first, second, other = [], [], []
    _reading_threads(world, small, first)
    _reading_threads(world, small, second)
    assert len(first) == len(second) == 2 and threading.current_thread() not in first
    assert all(any(t is u for u in first) for t in second)  # the same Thread objects
    th = threading.Thread(target=_reading_threads, args=(world, small, other))
    th.start()
    th.join()
    assert len(other) == 2 and not any(t is u for t in other for u in first)
    # A forked child (another pid) makes its own pool instead of waiting on threads it does not
    # have: checked through the pid the pools record, not by a real fork (forking the suite's
    # process, with its other threads, once deadlocked in the child: CI, 1 run in 3).
    import gl10m.sources.cog as cog
    cog._POOLS.pools.pid = -1  # as if these pools had been made in a parent process
    child = []
    assert _reading_threads(world, small, child).rgb.shape == (320, 320, 3)
    assert len(child) == 2 and not any(t is u for t in child for u in first)


def _truth_error(img: np.ndarray, transform, epsg: int) -> float:
    """Mean |pixel - truth| of an [3, H, W] image whose pixel centres `transform` (EPSG:4326)
    places, the truth evaluated in the UTM zone (`epsg`) the COGs were rendered in."""
    _, h, w = img.shape
    rows, cols = np.mgrid[0:h, 0:w]
    lon = transform.c + (cols + 0.5) * transform.a
    lat = transform.f + (rows + 0.5) * transform.e
    x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(lon, lat)
    want = np.clip(np.floor(truth(x, y) / 0.3 * 255 + 0.5), 0, 255)
    return float(np.abs(img.astype(np.float32) - want).mean())


def test_exported_geotiffs_sit_where_the_imagery_was_rendered(good, tmp_path):
    """Placement against the truth: the LR image and HR tiles exported from a fetched sample's
    shard (gl10m export) have, at every pixel their GeoTIFF transform locates, the colour the
    analytic field that rendered the COGs has there; a neighbouring tile's place does not."""
    import rasterio
    from affine import Affine

    from gl10m import geometry, shards
    from gl10m.export import export_sample

    row, res, _ = good
    shards.build([shards.Entry(row["key"], "train", "CA", res.path)], tmp_path / "shards")
    out = export_sample(tmp_path / "shards", row["key"], tmp_path / "geo", tiles=[0, 22, 57, 99])
    meta = samples.read_staged(res.path).meta
    assert geometry.georef_problems(meta, lr_size=268, tile_size=268) == []
    with rasterio.open(out.folder / "lr.tif") as d:
        assert tuple(d.bounds) == pytest.approx(BOUNDS, abs=1e-12)
        assert _truth_error(d.read(), d.transform, 32611) < 2.0  # the S2 granules' zone
    for t, other in ((0, 1), (22, 32), (57, 56), (99, 89)):
        with rasterio.open(out.folder / f"hr_{t:02d}.tif") as d:
            img, tr = d.read(), d.transform
        assert _truth_error(img, tr, 26911) < 2.0, t  # the NAIP quarter-quads' zone
        wrong = Affine.from_gdal(*geometry.tile_transform(meta, other))
        assert _truth_error(img, wrong, 26911) > 10.0, (t, other)
