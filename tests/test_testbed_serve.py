"""The testbed servers: a real STAC API (rustac) and a real Range HTTP server on 127.0.0.1.

Expectations are computed from the world's item files on disk (footprints intersected with
shapely, datetimes compared), never written down by hand.
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from gl10m.sources.gdalenv import DEFAULTS, gdal_http_env
from gl10m.testbed.serve import ServeError, absolute_href, load_world_stac, parse_range, require_rustac, serve

pystac_client = pytest.importorskip("pystac_client")
rasterio = pytest.importorskip("rasterio")


def _have_rustac() -> bool:
    try:
        require_rustac()
    except ServeError:
        return False
    return True


needs_rustac = pytest.mark.skipif(not _have_rustac(), reason="rustac is not installed (pip install 'gl10m[test]')")


# -- helpers ------------------------------------------------------------------------------------
def _items_on_disk(world: Path) -> list[dict]:
    return load_world_stac(world)[1]


def _when(item: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00"))


def _expected(world: Path, bbox=None, start=None, end=None, collections=None) -> list[str]:
    """Ids of the items on disk matching a bbox / [start, end] / collections search."""
    from shapely.geometry import box, shape

    out = []
    for it in _items_on_disk(world):
        if collections and it["collection"] not in collections:
            continue
        if bbox and not shape(it["geometry"]).intersects(box(*bbox)):
            continue
        t = _when(it)
        if start and t < start or end and t > end:
            continue
        out.append(it["id"])
    return sorted(out)


def _utc(*a) -> dt.datetime:
    return dt.datetime(*a, tzinfo=dt.timezone.utc)


def _get(url: str, headers: dict | None = None, method: str = "GET"):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, u.path or "/", headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _port_open(url: str) -> bool:
    u = urllib.parse.urlsplit(url)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((u.hostname, u.port)) == 0


def _pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie counts as dead)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def _a_tif(world: Path, collection: str) -> tuple[dict, str]:
    it = next(i for i in _items_on_disk(world) if i["collection"] == collection)
    key = sorted(it["assets"])[0]
    return it, it["assets"][key]["href"]


# -- STAC API searches --------------------------------------------------------------------------
def _bbox_of(world: Path, collection: str, shrink: float = 0.25) -> list[float]:
    """A bbox strictly inside the first item of `collection` (hits it and whatever overlaps it)."""
    it = next(i for i in _items_on_disk(world) if i["collection"] == collection)
    w, s, e, n = it["bbox"]
    dx, dy = (e - w) * shrink, (n - s) * shrink
    return [w + dx, s + dy, e - dx, n - dy]


SEARCHES = {
    "bbox-naip": dict(collections=["naip"], bbox="naip"),
    "bbox-s2-june": dict(collections=["sentinel-2-l2a"], bbox="sentinel-2-l2a",
                         start=_utc(2023, 6, 1), end=_utc(2023, 6, 30, 23, 59, 59)),
    "naip-2023": dict(collections=["naip"], start=_utc(2023, 1, 1), end=_utc(2023, 12, 31, 23, 59, 59)),
    "all-2021": dict(start=_utc(2021, 1, 1), end=_utc(2021, 12, 31, 23, 59, 59)),
    "both-collections-bbox": dict(collections=["naip", "sentinel-2-l2a"], bbox="naip"),
    "far-away": dict(bbox=[10.0, 45.0, 10.1, 45.1]),
}


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_search_returns_the_items_on_disk(testbed_server, testbed_world, name):
    q = dict(SEARCHES[name])
    if isinstance(q.get("bbox"), str):
        q["bbox"] = _bbox_of(testbed_world, q["bbox"])
    want = _expected(testbed_world, q.get("bbox"), q.get("start"), q.get("end"), q.get("collections"))
    kw = {}
    if q.get("bbox"):
        kw["bbox"] = q["bbox"]
    if q.get("collections"):
        kw["collections"] = q["collections"]
    if q.get("start"):
        kw["datetime"] = [q["start"], q["end"]]
    client = pystac_client.Client.open(testbed_server.stac_url)
    got = sorted(i.id for i in client.search(**kw).items())
    assert got == want
    if name != "far-away":
        assert got, f"search {name} should hit something in the tiny world"


def test_datetime_string_interval(testbed_server, testbed_world):
    client = pystac_client.Client.open(testbed_server.stac_url)
    got = sorted(i.id for i in client.search(collections=["sentinel-2-l2a"], datetime="2023-06-15/2023-12-31").items())
    assert got == _expected(testbed_world, None, _utc(2023, 6, 15), _utc(2023, 12, 31, 23, 59, 59), ["sentinel-2-l2a"])
    assert 0 < len(got) < len(_expected(testbed_world, collections=["sentinel-2-l2a"]))


def test_collections_are_served(testbed_server, testbed_world):
    client = pystac_client.Client.open(testbed_server.stac_url)
    on_disk = {c["id"] for c in load_world_stac(testbed_world)[0]}
    assert {c.id for c in client.get_collections()} == on_disk == {"naip", "sentinel-2-l2a"}


def test_paging_with_a_small_limit_returns_every_item(testbed_server, testbed_world):
    client = pystac_client.Client.open(testbed_server.stac_url)
    search = client.search(limit=2)
    pages = list(search.pages_as_dicts())
    ids = [f["id"] for p in pages for f in p["features"]]
    assert all(len(p["features"]) <= 2 for p in pages)
    assert len(pages) >= 3
    assert sorted(ids) == sorted(i["id"] for i in _items_on_disk(testbed_world))
    assert len(ids) == len(set(ids))


def test_asset_hrefs_are_absolute_urls_on_loopback_and_the_world_is_untouched(testbed_server, testbed_world):
    client = pystac_client.Client.open(testbed_server.stac_url)
    disk = {i["id"]: i for i in _items_on_disk(testbed_world)}
    served = list(client.search().items())
    assert {i.id for i in served} == set(disk)
    for item in served:
        for key, asset in item.assets.items():
            rel = disk[item.id]["assets"][key]["href"]
            assert "://" not in rel  # the file on disk still has the relative href
            assert asset.href == f"{testbed_server.http_url}/{rel}"
            u = urllib.parse.urlsplit(asset.href)
            assert u.scheme == "http" and u.hostname == "127.0.0.1"
            assert (testbed_world / rel).is_file()


# -- COGs over HTTP -----------------------------------------------------------------------------
@pytest.mark.parametrize("collection", ["naip", "sentinel-2-l2a"])
def test_windowed_read_over_http_equals_the_pixels_on_disk(testbed_server, testbed_world, collection):
    from rasterio.windows import Window

    client = pystac_client.Client.open(testbed_server.stac_url)
    item = next(iter(client.search(collections=[collection], max_items=1).items()))
    key = sorted(k for k in item.assets if k != "SCL")[0]
    href = item.assets[key].href
    rel = href[len(testbed_server.http_url) + 1:]
    with rasterio.open(testbed_world / rel) as local:
        win = Window(local.width // 3, local.height // 4, local.width // 2, local.height // 3)
        want = local.read(window=win)
        want_profile = (local.crs, local.transform, local.count, local.dtypes)
    with rasterio.Env(**gdal_http_env()):
        with rasterio.open(href) as remote:
            assert remote.driver == "GTiff"
            assert (remote.crs, remote.transform, remote.count, remote.dtypes) == want_profile
            got = remote.read(window=win)
            half = (remote.height // 2, remote.width // 2)
            got_ovr = remote.read(1, out_shape=half)  # served from the COG's overview
    with rasterio.open(testbed_world / rel) as local:
        want_ovr = local.read(1, out_shape=half)
    assert got.shape == want.shape and want.size > 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_ovr, want_ovr)


def test_range_requests(testbed_server, testbed_world):
    _, rel = _a_tif(testbed_world, "naip")
    data = (testbed_world / rel).read_bytes()
    size = len(data)
    url = testbed_server.url_for(rel)

    st, h, body = _get(url, {"Range": "bytes=100-1099"})
    assert st == 206 and body == data[100:1100]
    assert h["content-range"] == f"bytes 100-1099/{size}" and h["content-length"] == "1000"
    assert h["accept-ranges"] == "bytes"

    st, h, body = _get(url, {"Range": "bytes=-500"})  # suffix
    assert st == 206 and body == data[-500:] and h["content-range"] == f"bytes {size - 500}-{size - 1}/{size}"

    st, h, body = _get(url, {"Range": f"bytes={size - 10}-"})  # open-ended
    assert st == 206 and body == data[-10:]

    st, h, body = _get(url, {"Range": f"bytes={size - 10}-{size + 1000}"})  # clipped to the end
    assert st == 206 and body == data[-10:] and h["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"

    st, h, body = _get(url, {"Range": f"bytes={size}-{size + 10}"})
    assert st == 416 and h["content-range"] == f"bytes */{size}" and body == b""

    st, h, body = _get(url, {"Range": "bytes=0-9,20-29"})  # several ranges: multipart
    assert st == 206 and h["content-type"].startswith("multipart/byteranges; boundary=")
    boundary = h["content-type"].split("boundary=")[1].encode()
    assert body.count(b"--" + boundary) == 3
    assert f"Content-Range: bytes 0-9/{size}".encode() in body and data[0:10] in body and data[20:30] in body

    st, h, body = _get(url)
    assert st == 200 and body == data and h["content-length"] == str(size) and h["accept-ranges"] == "bytes"

    st, h, body = _get(url, {"Range": "bytes=50-10"})  # invalid: ignored, whole file
    assert st == 200 and body == data

    st, h, body = _get(url, method="HEAD")
    assert st == 200 and body == b"" and h["content-length"] == str(size) and h["accept-ranges"] == "bytes"
    st, h, body = _get(url, {"Range": "bytes=0-99"}, method="HEAD")
    assert st == 206 and body == b"" and h["content-length"] == "100"


def test_missing_files_directories_and_traversal_are_404(testbed_server, testbed_world):
    base = testbed_server.http_url
    assert _get(base + "/naip/nope.tif")[0] == 404
    assert _get(base + "/naip/")[0] == 404  # no listings
    assert _get(base + "/../../../../etc/passwd")[0] == 404
    assert _get(base + "/%2e%2e/%2e%2e/etc/passwd")[0] == 404


def test_concurrent_range_requests(testbed_server, testbed_world):
    rels = [a["href"] for it in _items_on_disk(testbed_world) for a in it["assets"].values()]
    blobs = {r: (testbed_world / r).read_bytes() for r in rels}
    jobs = [(r, (i * 37) % max(1, len(blobs[r]) - 300)) for i, r in enumerate(rels * 4)]

    def one(job):
        r, off = job
        st, h, body = _get(testbed_server.url_for(r), {"Range": f"bytes={off}-{off + 255}"})
        return st == 206 and body == blobs[r][off:off + 256]

    with cf.ThreadPoolExecutor(16) as ex:
        assert all(ex.map(one, jobs))


@pytest.mark.parametrize("header,size,want", [
    ("bytes=0-0", 10, [(0, 0)]),
    ("bytes=2-", 10, [(2, 9)]),
    ("bytes=-3", 10, [(7, 9)]),
    ("bytes=-30", 10, [(0, 9)]),
    ("bytes=5-100", 10, [(5, 9)]),
    ("bytes=0-1, 4-5", 10, [(0, 1), (4, 5)]),
    ("bytes=10-", 10, []),
    ("bytes=-0", 10, []),
    ("bytes=0-1,20-30", 10, [(0, 1)]),
    ("bytes=5-2", 10, None),
    ("items=0-1", 10, None),
    ("bytes=a-b", 10, None),
    ("bytes=", 10, None),
])
def test_parse_range(header, size, want):
    assert parse_range(header, size) == want


def test_absolute_href():
    assert absolute_href("s2/11SLT/20230610/B04.tif", "http://h:1") == "http://h:1/s2/11SLT/20230610/B04.tif"
    assert absolute_href("./a b.tif", "http://h:1/") == "http://h:1/a%20b.tif"
    assert absolute_href("https://x.y/z.tif", "http://h:1") == "https://x.y/z.tif"
    with pytest.raises(ServeError, match="outside the world folder"):
        absolute_href("../secret.tif", "http://h:1")


# -- lifecycle and errors -----------------------------------------------------------------------
def _live_children() -> set[int]:
    """Pids of this process's live (not zombie) children."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.add(int(d.name))
    return out


@needs_rustac
def test_close_stops_both_servers_and_frees_the_ports(testbed_world):
    s = serve(testbed_world)
    pids = [s._http.pid, s._stac.pid]
    tmp = s._tmp
    assert s.alive and _port_open(s.stac_url) and _port_open(s.http_url)
    assert json.loads(_get(s.stac_url + "/")[2])["type"] == "Catalog"
    s.close()
    s.close()  # idempotent
    assert not s.alive
    assert not _port_open(s.stac_url) and not _port_open(s.http_url)
    assert not any(_pid_alive(p) for p in pids)
    assert not tmp.exists()
    # the freed ports can be bound again right away
    for url in (s.stac_url, s.http_url):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", urllib.parse.urlsplit(url).port))


@needs_rustac
def test_a_failed_start_leaves_no_process(testbed_world, tmp_path):
    before = _live_children()
    with socket.socket() as busy:  # hold the STAC port: rustac cannot bind it
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError) as e:
            serve(testbed_world, stac_port=port, timeout=15)
    assert "\n" not in str(e.value) and "rustac" in str(e.value)
    assert _live_children() - before == set()


def test_profile_for_points_the_provider_at_the_api(testbed_server):
    from gl10m import profile as gp

    prof = gp.load()
    p2 = testbed_server.profile_for(prof)
    assert p2.provider.stac_url == testbed_server.stac_url and p2.provider.signing == "none"
    assert p2.provider.name == "stac"
    assert prof.provider.stac_url != testbed_server.stac_url  # the original is unchanged
    assert p2.model_dump(exclude={"provider"}) == prof.model_dump(exclude={"provider"})


def test_write_info(testbed_server, tmp_path):
    p = testbed_server.write_info(tmp_path / "served.json")
    info = json.loads(p.read_text())
    assert info["stac_url"] == testbed_server.stac_url and info["http_url"] == testbed_server.http_url
    assert info["items"] == testbed_server.n_items > 0


def _write_items(world: Path, features, collections=None) -> None:
    (world / "stac").mkdir(parents=True, exist_ok=True)
    (world / "stac" / "naip.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    if collections is not None:
        (world / "stac" / "collections.json").write_text(json.dumps(collections))


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("no-stac", "has no stac/ folder"),
    ("no-items", "has no STAC items"),
    ("not-json", "cannot read"),
    ("not-items", "not a STAC item"),
    ("unknown-collection", "does not define"),
])
def test_bad_world_gives_a_one_line_error(tmp_path, case, message):
    world = tmp_path / "w"
    if case == "file":
        world.write_text("x")
    elif case == "no-stac":
        world.mkdir()
    elif case == "no-items":
        _write_items(world, [])
    elif case == "not-json":
        (world / "stac").mkdir(parents=True)
        (world / "stac" / "naip.json").write_text("{oops")
    elif case == "not-items":
        _write_items(world, [{"type": "Thing"}])
    elif case == "unknown-collection":
        _write_items(world, [{"type": "Feature", "id": "a", "collection": "naip"}],
                     [{"type": "Collection", "id": "sentinel-2-l2a"}])
    with pytest.raises(ServeError) as e:
        serve(world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_rustac_gives_a_one_line_error(testbed_world):
    code = ("import sys; sys.modules['rustac'] = None\n"
            "from gl10m.testbed.serve import serve, ServeError\n"
            "try:\n    serve(sys.argv[1])\nexcept ServeError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, PATH="/nonexistent")
    out = subprocess.run([sys.executable, "-c", code, str(testbed_world)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.stdout.startswith("ERR rustac is not installed"), out.stdout + out.stderr
    assert out.stdout.count("\n") == 1


def wait_for_served(p, info, timeout: float) -> dict:
    """The URLs a `gl10m testbed serve` process `p` writes to `info` (served.json), once there."""
    deadline = time.monotonic() + timeout
    while not info.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline, "served.json never appeared"
        time.sleep(0.05)
    return json.loads(info.read_text())


@needs_rustac
@pytest.mark.parametrize("faults", [False, True])
def test_run_forever_prints_urls_and_stops_on_ctrl_c(testbed_world, tmp_path, faults):
    """`python -m gl10m.testbed.serve`, and `gl10m testbed serve --faults` (the same loop with
    fault proxies in front: the URLs printed and written are the proxies')."""
    info = tmp_path / "served.json"
    cmd = [sys.executable, "-m", "gl10m.testbed.serve", str(testbed_world), "--served-json", str(info)]
    if faults:  # rate 0: the proxies forward everything, so the search below must still see every item
        cmd = [sys.executable, "-m", "gl10m.cli", "testbed", "serve", str(testbed_world), "--served-json",
               str(info), "--faults", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "COLUMNS": "250"})
    try:
        urls = wait_for_served(p, info, 30)
        client = pystac_client.Client.open(urls["stac_url"])
        assert {i.id for i in client.search().items()} == {i["id"] for i in _items_on_disk(testbed_world)}
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert urls["stac_url"] in out and urls["http_url"] in out
    assert ("behind fault proxies" in out and "injected:" in out) == faults
    assert "Traceback" not in err
    assert not info.exists()
    assert not _port_open(urls["stac_url"]) and not _port_open(urls["http_url"])
    assert not any(_pid_alive(pid) for pid in urls["server_pids"])


# -- GDAL HTTP options ----------------------------------------------------------------------------
def test_gdal_http_env_defaults_and_precedence():
    env = gdal_http_env(environ={})
    assert env == DEFAULTS
    assert env["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR" and ".tif" in env["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"]
    assert all(isinstance(v, str) for v in env.values())
    env = gdal_http_env({"GDAL_HTTP_MAX_RETRY": 9, "VSI_CACHE": False, "GDAL_HTTP_VERSION": None},
                        environ={"GDAL_HTTP_MAX_RETRY": "2", "GDAL_HTTP_RETRY_DELAY": "7"})
    assert env["GDAL_HTTP_MAX_RETRY"] == "9" and env["GDAL_HTTP_RETRY_DELAY"] == "7"
    assert env["VSI_CACHE"] == "NO" and "GDAL_HTTP_VERSION" not in env
