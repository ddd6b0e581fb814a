"""The earthengine provider: the real earthengine-api client against the testbed's stand-in
(gl10m.testbed.eeserver) on 127.0.0.1: catalog, the expressions it builds (collections, filters,
SCL mask, median, mosaic, projection and grid), request splitting, errors, and a provider parity
check: a download through `--provider earthengine` gives the stac provider's samples."""
from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ee = pytest.importorskip("ee", reason="earthengine-api is not installed (pip install 'gl10m[ee]')")

from gl10m import geometry  # noqa: E402
from gl10m import plan as planmod  # noqa: E402
from gl10m import profile as prof  # noqa: E402
from gl10m import samples  # noqa: E402
from gl10m.errors import UserError  # noqa: E402
from gl10m.ledger import Ledger  # noqa: E402
from gl10m.pipelines import download, index  # noqa: E402
from gl10m.sources import earthengine as E  # noqa: E402
from gl10m.sources.stac import StacProvider  # noqa: E402
from gl10m.testbed.eeserver import functions_in, invocations, serve_ee  # noqa: E402

pytestmark = pytest.mark.timeout(900)


# -- pure parts ---------------------------------------------------------------------------------
def test_blocks_cover_the_grid_within_the_limits():
    assert E.blocks(2680, 2680, 3) == [(0, 0, 2680, 2680)]          # 21.5 MB: one request
    for w, h, bpp, mb, mpx in ((2680, 2680, 3, 4_000_000, 10_000), (2680, 2680, 3, 10**9, 1000),
                               (268, 268, 32, 100_000, 10_000), (7, 5, 1, 6, 3)):
        bl = E.blocks(w, h, bpp, mb, mpx)
        cover = np.zeros((h, w), int)
        for r0, c0, rows, cols in bl:
            assert rows <= mpx and cols <= mpx and rows * cols * bpp <= mb
            cover[r0:r0 + rows, c0:c0 + cols] += 1
        assert (cover == 1).all()
    with pytest.raises(ValueError):
        E.blocks(10, 10, 4, 3)


def test_grid_spec_is_the_footprint_grid():
    g = E.grid_spec((-120.0, 35.0, -119.976, 35.024), 268, 268)
    at = g["affineTransform"]
    assert g["crsCode"] == "EPSG:4326" and g["dimensions"] == {"width": 268, "height": 268}
    assert at["translateX"] == -120.0 and at["translateY"] == 35.024
    assert at["scaleX"] == pytest.approx(0.024 / 268) and at["scaleY"] == pytest.approx(-0.024 / 268)
    b = E.grid_spec((-120.0, 35.0, -119.976, 35.024), 2680, 2680, col0=100, row0=200, cols=50, rows=60)
    assert b["dimensions"] == {"width": 50, "height": 60}
    assert b["affineTransform"]["translateX"] == pytest.approx(-120.0 + 100 * 0.024 / 2680)
    assert b["affineTransform"]["translateY"] == pytest.approx(35.024 - 200 * 0.024 / 2680)


def test_items_are_normalised_from_earth_engine_properties():
    props = {"system:index": "S2B_x", "system:time_start": 1686422359000, "CLOUDY_PIXEL_PERCENTAGE": 0.5,
             "MGRS_TILE": "11SLT", "PROCESSING_BASELINE": "05.09",
             "PRODUCT_ID": "S2B_MSIL2A_20230610T183919_N0509_R070_T11SLT_20230610T221103",
             "system:footprint": {"type": "LinearRing", "coordinates": [[-120, 35], [-119, 35], [-119, 36], [-120, 35]]}}
    it = E.s2_item(props, "sentinel-2-l2a")
    assert it["datetime"] == "2023-06-10T18:39:19Z" and it["epsg"] == 32611 and it["baseline"] == "05.09"
    assert it["datatake"] == "S2B_20230610T183919" and it["geometry"]["type"] == "Polygon"
    assert it["hrefs"]["B02"].startswith("ee://COPERNICUS/S2_SR_HARMONIZED/") and "system:footprint" not in it["properties"]
    n = E.naip_item({"system:index": "m_1", "system:time_start": 1653350400000, "system:footprint": None}, "naip", "ca")
    assert n["naip_state"] == "CA" and n["naip_year"] == 2022


def test_configuration_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="needs a Cloud project"):
        E.EarthEngineProvider(None)
    p = E.EarthEngineProvider("p", key_file=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="key file not found"):
        p.ee()
    bad = tmp_path / "key.json"
    bad.write_text(json.dumps({"type": "authorized_user"}))
    with pytest.raises(UserError, match="not a service-account key"):
        E.EarthEngineProvider("p", key_file=str(bad)).ee()
    with pytest.raises(UserError, match="no Earth Engine collection"):
        E.EarthEngineProvider("p").kind_of("landsat")
    d = E.EarthEngineProvider("p", key_file=str(bad)).describe()
    assert "key" not in json.dumps(d)  # no credentials in provenance


# -- against the stand-in -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stand_in(built_world):
    with serve_ee(built_world) as srv:
        yield srv


def _provider(srv, p, **kw):
    im = p.imagery
    return E.EarthEngineProvider("testbed", url=srv.url, collections={
        im.s2.collection: E.S2_COLLECTION, im.naip.collection: E.NAIP_COLLECTION}, **kw)


def test_catalog_matches_the_stac_providers_items_in_batches(stand_in, built_world, built_server):
    p = prof.load(built_world / "profile.yaml")
    box, start, end = p.regions["TX"].bbox, dt.date(2023, 1, 1), dt.date(2023, 12, 31)
    before = len(stand_in.requests)
    got = list(_provider(stand_in, p, batch=2).search_items(p.imagery.s2.collection, box, start, end))
    ref = list(StacProvider(built_server.stac_url).search_items(p.imagery.s2.collection, box, start, end))
    assert got and sorted(i["id"] for i in got) == sorted(i["id"] for i in ref)
    by_id = {i["id"]: i for i in ref}
    for it in got:
        r = by_id[it["id"]]
        for k in ("datetime", "cloud_cover", "mgrs_tile", "baseline", "datatake", "epsg"):
            assert it[k] == r[k], (it["id"], k)
        assert it["provider"] == "earthengine"
    calls = [r for r in stand_in.requests[before:] if r["path"].endswith("/value:compute")]
    assert len(calls) == 1 + math.ceil(len(got) / 2)       # size, then one call per batch of 2
    fns = functions_in(calls[1]["body"]["expression"])
    assert {"ImageCollection.load", "Filter.intersects", "Filter.dateRangeContains", "Collection.toList",
            "AggregateFeatureCollection.array"} <= set(fns)
    blob = json.dumps(calls[1]["body"])
    assert '"COPERNICUS/S2_SR_HARMONIZED"' in blob and '"2024-01-01"' in blob  # end date inclusive
    naip = list(_provider(stand_in, p).search_items(p.imagery.naip.collection, box, dt.date(2020, 1, 1),
                                                  dt.date(2024, 12, 31), state="TX"))
    nref = list(StacProvider(built_server.stac_url).search_items(p.imagery.naip.collection, box,
                                                                 dt.date(2020, 1, 1), dt.date(2024, 12, 31)))
    assert sorted(i["id"] for i in naip) == sorted(i["id"] for i in nref)
    assert {i["naip_state"] for i in naip} == {"TX"} and all(i["naip_year"] for i in naip)


@pytest.fixture(scope="module")
def runs(built_world, built_server, stand_in, tmp_path_factory):
    """The same scenes downloaded twice: the stac provider (API) and Earth Engine (the CLI)."""
    p = prof.load(built_world / "profile.yaml")
    wd = tmp_path_factory.mktemp("ee-stac")
    ix = index.run_index(p, wd, quiet=True)
    assert set(ix.outcomes.values()) == {"ok"}
    wd_ee = tmp_path_factory.mktemp("ee-ee")
    shutil.copytree(wd, wd_ee, dirs_exist_ok=True)
    download.run_download(p, wd, stac_url=built_server.stac_url, max_scenes=2, quiet=True)
    before = len(stand_in.requests)
    exe = str(Path(sys.executable).with_name("gl10m"))
    cli = subprocess.run([exe, "download", "-p", str(built_world / "profile.yaml"), "-w", str(wd_ee),
                          "--provider", "earthengine", "--ee-project", "testbed", "--ee-url", stand_in.url,
                          "--max-scenes", "2", "--no-dask", "-q"], capture_output=True, text=True, timeout=800)
    return {"p": p, "stac": wd, "ee": wd_ee, "cli": cli, "requests": stand_in.requests[before:]}


def _calls(expr: dict, name: str) -> list[dict]:
    """The argument nodes of every invocation of `name` in a serialized expression."""
    return [args for _, args in invocations(expr, name)]


def _outcomes(wd):
    with Ledger.for_workdir(wd) as led:
        return {o.unit: o for o in led.outcomes("fetch")}


def test_download_through_earthengine_gives_the_stac_samples(runs):
    cli = runs["cli"]
    assert cli.returncode in (0, 1), cli.stderr   # 1: the deliberate faults are rejections
    assert "Traceback" not in cli.stderr
    a, b = _outcomes(runs["stac"]), _outcomes(runs["ee"])
    assert a and set(a) == set(b)
    ok = sorted(k for k in a if a[k].status == "ok" and b[k].status == "ok")
    assert len(ok) >= 2, {k: (a[k].label, b[k].label) for k in a}
    for k in a:  # every scene is ok or a typed rejection in both, and the same one
        assert b[k].status in ("ok", "rejected"), (k, b[k].label)
        assert (a[k].status, a[k].reason) == (b[k].status, b[k].reason), (k, a[k].label, b[k].label)
    rows = {}
    for r in sorted(runs["p"].regions):
        rows.update({x["key"]: x for x in planmod.read_plan(planmod.plan_path(runs["stac"], r)).to_dict("records")})
    for k in ok:
        sa = samples.read_staged(samples.staged_dir(runs["stac"], rows[k]["split"], k))
        sb = samples.read_staged(samples.staged_dir(runs["ee"], rows[k]["split"], k))
        lr = np.abs(sa.lr.astype(int) - sb.lr.astype(int))
        hr = np.abs(sa.hr.astype(int) - sb.hr.astype(int))
        # same scenes, same grids; only resampling and mask edges differ
        assert lr.mean() < 3.0 and np.quantile(lr, 0.95) <= 10, (k, lr.mean())
        assert hr.mean() < 3.0 and np.quantile(hr, 0.95) <= 10, (k, hr.mean())
        np.testing.assert_array_equal(sa.labels, sb.labels)
        m = sb.meta
        assert m["provider"] == "earthengine" and m["s2"]["collection"] == E.S2_COLLECTION
        assert {i["id"] for i in m["s2"]["items"]} == {i["id"] for i in sa.meta["s2"]["items"]}
        assert all(i["asset"].startswith("USDA/NAIP/DOQQ/") for i in m["naip"]["items"])
        # georeferenced like the STAC provider's samples: the same grids over the same footprint
        assert m["georef"] == sa.meta["georef"] and geometry.georef_problems(m, lr_size=268, tile_size=268) == []


def test_fetch_expressions_mask_median_and_mosaic_on_the_footprint_grid(runs):
    p = runs["p"]
    pix = [r["body"] for r in runs["requests"] if r["path"].endswith("/image:computePixels")]
    assert pix
    lr = [b for b in pix if "reduce.median" in functions_in(b["expression"])]
    hr = [b for b in pix if "ImageCollection.mosaic" in functions_in(b["expression"])]
    assert lr and hr and len(lr) + len(hr) == len(pix)
    for b in lr:
        fns = functions_in(b["expression"])
        assert {"Filter.listContains", "Filter.lessThan", "Image.remap", "Image.updateMask", "Image.resample",
                "Collection.map", "reduce.count"} <= set(fns)
        blob = json.dumps(b["expression"])
        assert '"COPERNICUS/S2_SR_HARMONIZED"' in blob and '"CLOUDY_PIXEL_PERCENTAGE"' in blob
        (remap,) = _calls(b["expression"], "Image.remap")
        assert remap["from"]["constantValue"] == list(p.imagery.s2.scl_mask)     # SCL classes masked
        assert set(remap["to"]["constantValue"]) == {0} and remap["defaultValue"]["constantValue"] == 1
        (lt,) = _calls(b["expression"], "Filter.lessThan")
        assert lt["rightValue"]["constantValue"] == p.imagery.s2.max_cloud_pct
        assert [c["mode"]["constantValue"] for c in _calls(b["expression"], "Image.resample")] == ["bilinear"]
        assert b["grid"]["crsCode"] == "EPSG:4326" and b["grid"]["dimensions"] == {"width": 268, "height": 268}
        assert b["fileFormat"] == "NPY" and b["bandIds"] == ["B4", "B3", "B2", "n_obs"]
    for b in hr:
        fns = functions_in(b["expression"])
        assert "Collection.first" not in fns and "Collection.limit" in fns  # sorted, then mosaic
        assert '"USDA/NAIP/DOQQ"' in json.dumps(b["expression"]) and '"system:time_start"' in json.dumps(b["expression"])
        assert b["grid"]["dimensions"] == {"width": 2680, "height": 2680} and b["bandIds"] == ["R", "G", "B"]


def test_split_requests_reassemble_exactly(stand_in, runs):
    p = runs["p"]
    row = next(r for r in planmod.read_plan(planmod.plan_path(runs["ee"], "TX")).drop(columns="geometry")
               .to_dict("records"))
    ids = [i["id"] for i in json.loads(row["naip_items"])]
    b = (row["west"], row["south"], row["east"], row["north"])
    one = _provider(stand_in, p)
    many = _provider(stand_in, p, max_request_bytes=3 * 2680 * 700, max_request_px=2000)
    before = len(stand_in.requests)
    small = many.compute_pixels(many.naip_image(ids), b, 2680, 2680, E.NAIP_BANDS, 3)
    n_req = sum(1 for r in stand_in.requests[before:] if r["path"].endswith("/image:computePixels"))
    assert n_req == len(E.blocks(2680, 2680, 3, 3 * 2680 * 700, 2000)) > 1
    whole = one.compute_pixels(one.naip_image(ids), b, 2680, 2680, E.NAIP_BANDS, 3)
    np.testing.assert_array_equal(small, whole)


def test_quota_errors_are_retried(built_world):
    p = prof.load(built_world / "profile.yaml")
    with serve_ee(built_world, throttle_every=2) as srv:     # every 2nd call: 429 "Too many concurrent"
        prov = _provider(srv, p, retry_opts={"base_delay": 0.01, "max_delay": 0.05})
        items = list(prov.search_items(p.imagery.s2.collection, p.regions["AZ"].bbox, dt.date(2023, 1, 1),
                                       dt.date(2023, 12, 31)))
        assert items
        codes = [r for r in srv.requests if r["path"].endswith("/value:compute")]
        assert len(codes) > 1 + math.ceil(len(items) / prov.batch)  # some were answered 429 and retried


def test_unknown_functions_fail_loudly(stand_in, built_world):
    p = prof.load(built_world / "profile.yaml")
    prov = _provider(stand_in, p)
    e = prov.ee()
    with pytest.raises(e.EEException, match="does not implement"):
        e.ImageCollection(E.S2_COLLECTION).first().getInfo()


def test_cli_serves_the_stand_in_next_to_the_testbed(built_world, tmp_path):
    import signal
    import time
    import urllib.request

    info = tmp_path / "served.json"
    exe = str(Path(sys.executable).with_name("gl10m"))
    proc = subprocess.Popen([exe, "testbed", "serve", str(built_world), "--earthengine", "--served-json", str(info)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**__import__("os").environ,
                                                                                             "COLUMNS": "250"})
    try:
        deadline = time.monotonic() + 60
        while not info.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("Earth Engine:"))
    url = line.split()[2]
    assert url.startswith("http://127.0.0.1:") and "--ee-url" in line
    with pytest.raises(OSError):  # stopped with the rest
        urllib.request.urlopen(url + "/$discovery/rest?version=v1", timeout=2)


# -- the provider reads, assembled by gl10m.fetch like the stac provider's -------------------------
def _rows(runs):
    rows = []
    for r in sorted(runs["p"].regions):
        rows += planmod.read_plan(planmod.plan_path(runs["stac"], r)).drop(columns="geometry").to_dict("records")
    return rows


def test_read_lr_and_read_hr_match_the_stac_providers(runs, stand_in, built_server):
    from gl10m import compose, fetch
    from gl10m.sources.base import ReadContext

    p = runs["p"]
    outcomes = _outcomes(runs["stac"])
    row = fetch.parse_row(next(r for r in _rows(runs) if outcomes[r["key"]].status == "ok"))
    b = fetch.row_bounds(row)
    lrg, hrg = compose.lr_grid(b, p), compose.hr_grid(b, p)
    ee_p, st = _provider(stand_in, p), StacProvider(built_server.stac_url)
    lr, ref_lr = ee_p.read_lr(row, lrg, p, ReadContext()), st.read_lr(row, lrg, p, ReadContext())
    hr, ref_hr = ee_p.read_hr(row, hrg, p, ReadContext()), st.read_hr(row, hrg, p, ReadContext())
    assert lr.rgb.shape == ref_lr.rgb.shape == (268, 268, 3) and lr.rgb.dtype == np.uint8
    assert hr.rgb.shape == ref_hr.rgb.shape == (2680, 2680, 3) and hr.covered.shape == (2680, 2680)
    assert np.abs(lr.rgb.astype(int) - ref_lr.rgb.astype(int)).mean() < 3.0
    assert np.abs(hr.rgb.astype(int) - ref_hr.rgb.astype(int)).mean() < 3.0
    assert lr.count.max() <= lr.n_dates == len(row["s2_items"])
    assert lr.meta["provider"] == "earthengine" and lr.meta["s2"]["collection"] == E.S2_COLLECTION
    assert hr.meta["naip"]["collection"] == E.NAIP_COLLECTION
    assert {i["id"] for i in lr.info["items"]} == {i["id"] for i in ref_lr.info["items"]}


def test_one_assembler_gives_both_providers_the_same_outcomes(runs, stand_in, built_server, tmp_path):
    """fetch_scene with either provider object: the same outcome class per scene (an ok one and
    a rejected one at least), through the one assembler."""
    from gl10m import fetch

    p = runs["p"]
    outcomes = _outcomes(runs["stac"])
    rows = _rows(runs)
    pick = [next(r for r in rows if outcomes[r["key"]].status == "ok"),
            next(r for r in rows if outcomes[r["key"]].status == "rejected")]
    for row in pick:
        a = fetch.fetch_scene(row, p, tmp_path / "stac", StacProvider(built_server.stac_url))
        b = fetch.fetch_scene(row, p, tmp_path / "ee", _provider(stand_in, p))
        assert a.label == b.label == outcomes[row["key"]].label, (row["key"], a.label, b.label)
        assert set(a.detail) == set(b.detail) or a.status != "ok"


def test_a_permanent_error_on_an_asset_is_its_rejection(stand_in, built_world):
    from gl10m.sources.base import ASSET_CORRUPT, ASSET_MISSING, Rejection

    prov = _provider(stand_in, prof.load(built_world / "profile.yaml"))
    for msg, reason in (("Image.load: Image asset 'USDA/NAIP/DOQQ/x' not found.", ASSET_MISSING),
                        ("Image asset 'x' is corrupt.", ASSET_CORRUPT)):
        def fail(msg=msg):
            raise ee.EEException(msg)

        with pytest.raises(Rejection) as ei:
            prov.pixels_or_rejection(fail)
        assert ei.value.reason == reason and ei.value.detail == {"error": msg}
    with pytest.raises(ee.EEException):  # not about an asset: not a rejection
        prov.pixels_or_rejection(lambda: (_ for _ in ()).throw(ee.EEException("User memory limit exceeded.")))
