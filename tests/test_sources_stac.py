"""The `stac` provider and the retry helper, against real servers on 127.0.0.1.

Also the STAC item builders the catalog and plan tests share (Planetary-Computer-shaped items).
"""
from __future__ import annotations

import datetime as dt
import json
import threading
import time
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from gl10m.sources.base import ITEM_FIELDS, Provider, ProviderLike, iso_utc
from gl10m.sources.retry import (PermanentHTTPError, TransientError, check_response, is_transient,
                                 parse_retry_after, retry, retry_after_of)
from gl10m.sources.stac import (PlanetaryComputerSigner, StacProvider, date_chunks, normalise_item,
                                provider_from_profile)


# -- item builders (shared with test_catalog / test_plan) -------------------------------------
def _poly(bbox):
    w, s, e, n = bbox
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def pc_s2_item(mgrs: str, when: str, bbox, cloud: float, *, baseline: str = "05.09", sat: str = "S2B",
               gen: str | None = None, rel: bool = True) -> dict:
    """A Planetary-Computer-shaped Sentinel-2 L2A item (`when` like 2023-06-10T18:39:19)."""
    sensing = when.replace("-", "").replace(":", "")
    gen = gen or sensing[:8] + "T230000"
    iid = f"{sat}_MSIL2A_{sensing}_R070_T{mgrs}_{gen}"
    base = f"s2/{mgrs}/{sensing}/{gen}" if rel else f"https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/{mgrs}/{sensing}"
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": "sentinel-2-l2a",
        "geometry": _poly(bbox), "bbox": list(bbox), "links": [],
        "properties": {"datetime": f"{when}.024000Z", "platform": f"Sentinel-2{sat[-1]}",
                       "eo:cloud_cover": cloud, "s2:mgrs_tile": mgrs, "s2:processing_baseline": baseline,
                       "s2:datatake_id": f"G{sat}_{sensing}_032763_N{baseline}",
                       "s2:product_uri": f"{sat}_MSIL2A_{sensing}_N{baseline.replace('.', '')}_R070_T{mgrs}_{gen}.SAFE",
                       "proj:epsg": 32611},
        "assets": {b: {"href": f"{base}/{b}.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                       "roles": ["data"], "gsd": 20.0 if b == "SCL" else 10.0}
                   for b in ("B02", "B03", "B04", "SCL", "B08")},
    }


def pc_naip_item(iid: str, state: str, year: int, date: str, bbox, *, gsd: float = 0.6, epsg: int = 26911) -> dict:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": "naip",
        "geometry": _poly(bbox), "bbox": list(bbox), "links": [],
        "properties": {"datetime": f"{date}T16:00:00Z", "naip:state": state.lower(), "naip:year": str(year),
                       "gsd": gsd, "proj:code": f"EPSG:{epsg}"},
        "assets": {"image": {"href": f"naip/{iid}.tif", "type": "image/tiff", "roles": ["data"]}},
    }


def write_world(root: Path, items: list[dict]) -> Path:
    """A served-world folder (stac/collections.json + stac/items.json) holding `items`."""
    stac = root / "stac"
    stac.mkdir(parents=True, exist_ok=True)
    cols = sorted({it["collection"] for it in items})
    (stac / "collections.json").write_text(json.dumps({"collections": [
        {"type": "Collection", "stac_version": "1.0.0", "id": c, "description": c, "license": "proprietary",
         "links": [], "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                 "temporal": {"interval": [["2010-01-01T00:00:00Z", None]]}}} for c in cols]}))
    (stac / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return root


# -- tiny real HTTP servers -------------------------------------------------------------------
class _Script:
    """Answers scripted per path: a list of (status, headers, body) consumed in order, the last
    one repeated. Records every request (path, method, headers)."""

    def __init__(self, routes: dict[str, list[tuple[int, dict, bytes]]]):
        self.routes = routes
        self.hits: list[tuple[str, str, dict, float]] = []
        self.lock = threading.Lock()

    def answer(self, path: str):
        with self.lock:
            key = path.split("?", 1)[0]
            seq = self.routes.get(key)
            if not seq:
                return 404, {}, b"{}"
            return seq.pop(0) if len(seq) > 1 else seq[0]


@pytest.fixture
def scripted():
    servers = []

    def start(routes):
        script = _Script(routes)

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _do(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                script.hits.append((self.path, self.command, dict(self.headers), time.monotonic()))
                st, hdrs, body = script.answer(self.path)
                if callable(body):
                    body = body(self)
                self.send_response(st)
                for k, v in hdrs.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _do

        srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", script

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


# -- retry ------------------------------------------------------------------------------------
def test_retry_honours_retry_after_seconds_against_a_real_server(scripted):
    url, script = scripted({"/x": [(429, {"Retry-After": "1"}, b"slow down"), (200, {}, b"ok")]})
    t0 = time.monotonic()
    resp = retry(lambda: check_response(requests.get(url + "/x", timeout=5)), base_delay=0.01, max_delay=0.05)
    assert resp.text == "ok"
    assert len(script.hits) == 2
    gap = script.hits[1][3] - script.hits[0][3]
    assert gap >= 0.95, f"second attempt came {gap:.2f}s after the 429, Retry-After said 1 s"
    assert time.monotonic() - t0 < 10


def test_retry_honours_retry_after_http_date(scripted):
    when = format_datetime(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2), usegmt=True)
    url, script = scripted({"/x": [(503, {"Retry-After": when}, b""), (200, {}, b"ok")]})
    retry(lambda: check_response(requests.get(url + "/x", timeout=5)), base_delay=0.01, max_delay=0.05)
    gap = script.hits[1][3] - script.hits[0][3]
    assert gap >= 0.9  # the HTTP date is second-resolution: at least ~1 s of the 2 s remains


def test_retry_does_not_retry_permanent_4xx_and_gives_up_after_attempts(scripted):
    url, script = scripted({"/missing": [(404, {}, b"no")], "/down": [(502, {}, b"")]})
    with pytest.raises(PermanentHTTPError):
        retry(lambda: check_response(requests.get(url + "/missing", timeout=5)), base_delay=0.0)
    assert len(script.hits) == 1
    with pytest.raises(TransientError):
        retry(lambda: check_response(requests.get(url + "/down", timeout=5)), attempts=3, base_delay=0.001)
    assert len(script.hits) == 4


def test_retry_backoff_is_exponential_jittered_and_capped():
    sleeps: list[float] = []
    calls = {"n": 0}

    def boom():
        calls["n"] += 1
        raise TransientError("x")

    import random

    with pytest.raises(TransientError):
        retry(boom, attempts=6, base_delay=1.0, max_delay=4.0, sleep=sleeps.append, rng=random.Random(3))
    assert calls["n"] == 6 and len(sleeps) == 5
    caps = [1, 2, 4, 4, 4]
    assert all(0 <= s <= c for s, c in zip(sleeps, caps))
    assert len(set(sleeps)) == 5  # jittered, not constant
    sleeps.clear()
    with pytest.raises(TransientError):
        retry(lambda: (_ for _ in ()).throw(TransientError("y", retry_after=7.0)), attempts=2,
              base_delay=0.1, max_delay=0.2, sleep=sleeps.append)
    assert sleeps == [7.0]


def test_classifier():
    from pystac_client.exceptions import APIError
    import rasterio.errors

    assert is_transient(requests.exceptions.ConnectionError("reset"))
    assert is_transient(requests.exceptions.ReadTimeout("slow"))
    assert is_transient(ConnectionResetError())
    e = APIError("x")
    e.status_code = 503
    assert is_transient(e)
    e.status_code = 403
    assert not is_transient(e)
    try:  # pystac-client wraps connection errors in APIError without a status: follow the chain
        try:
            raise requests.exceptions.ConnectTimeout("t")
        except Exception as inner:
            raise APIError(str(inner))
    except APIError as wrapped:
        assert is_transient(wrapped)
    assert is_transient(rasterio.errors.RasterioIOError("CURL error: HTTP response code: 429"))
    assert not is_transient(rasterio.errors.RasterioIOError("HTTP response code: 404"))
    assert not is_transient(ValueError("bad"))
    assert parse_retry_after("12") == 12.0 and parse_retry_after("soon") is None
    assert retry_after_of(TransientError("x", retry_after=3)) == 3.0


# -- normalisation ----------------------------------------------------------------------------
def test_planetary_computer_item_normalised():
    it = normalise_item(pc_s2_item("11SLT", "2023-06-10T18:39:19", (-118.1, 34.0, -117.9, 34.2), 1.5,
                                   baseline="04.00", rel=False), "stac")
    assert set(it) == set(ITEM_FIELDS)
    assert it["mgrs_tile"] == "11SLT" and it["baseline"] == "04.00" and it["epsg"] == 32611
    assert it["datatake"] == "S2B_20230610T183919"
    assert it["datetime"] == "2023-06-10T18:39:19Z" and it["cloud_cover"] == 1.5
    assert set(it["hrefs"]) == {"B02", "B03", "B04", "B08", "SCL"}
    assert it["hrefs"]["B04"].endswith("/B04.tif") and "?" not in it["hrefs"]["B04"]
    n = normalise_item(pc_naip_item("ca_m_1", "ca", 2022, "2022-05-20", (-118.1, 34.0, -118.0, 34.1)))
    assert (n["naip_state"], n["naip_year"], n["epsg"], n["gsd"]) == ("CA", 2022, 26911, 0.6)
    assert n["hrefs"] == {"image": "naip/ca_m_1.tif"} and n["mgrs_tile"] is None


def test_earth_search_item_normalised():
    es = {  # shaped like Earth Search v1 sentinel-2-l2a
        "type": "Feature", "stac_version": "1.0.0", "id": "S2B_11SLT_20230610_1_L2A", "collection": "sentinel-2-l2a",
        "bbox": [-118.1, 34.0, -117.9, 34.2], "geometry": _poly((-118.1, 34.0, -117.9, 34.2)),
        "links": [{"rel": "self", "href": "https://earth-search.aws.element84.com/v1/collections/sentinel-2-l2a/items/S2B_11SLT_20230610_1_L2A"}],
        "properties": {"datetime": "2023-06-10T18:49:12.123Z", "platform": "sentinel-2b", "eo:cloud_cover": 0.7,
                       "mgrs:utm_zone": 11, "mgrs:latitude_band": "S", "mgrs:grid_square": "LT",
                       "s2:processing_baseline": "05.09", "s2:datatake_id": "GS2B_20230610T183919_032763_N05.09",
                       "proj:epsg": 32611, "earthsearch:boa_offset_applied": True},
        "assets": {k: {"href": f"https://sentinel-cogs.s3.us-west-2.amazonaws.com/x/{k}.tif", "gsd": 10}
                   for k in ("red", "green", "blue", "scl", "red-jp2", "visual")},
    }
    it = normalise_item(es, "earth_search")
    assert it["mgrs_tile"] == "11SLT" and it["baseline"] == "05.09" and it["epsg"] == 32611
    assert it["datatake"] == "S2B_20230610T183919"
    assert it["hrefs"] == {"B02": es["assets"]["blue"]["href"], "B03": es["assets"]["green"]["href"],
                           "B04": es["assets"]["red"]["href"], "SCL": es["assets"]["scl"]["href"]}
    assert it["datetime"] == "2023-06-10T18:49:12Z"
    # older names: sentinel:* and no datatake id -> platform + time
    es2 = json.loads(json.dumps(es))
    p = es2["properties"]
    for k in ("mgrs:utm_zone", "mgrs:latitude_band", "mgrs:grid_square", "s2:datatake_id", "s2:processing_baseline"):
        p.pop(k)
    p.update({"sentinel:utm_zone": 9, "sentinel:latitude_band": "u", "sentinel:grid_square": "xa",
              "sentinel:product_id": "S2B_MSIL2A_20230610T183919_N0400_R070_T09UXA_20230611T000000"})
    it2 = normalise_item(es2)
    assert it2["mgrs_tile"] == "09UXA" and it2["baseline"] == "04.00" and it2["datatake"] == "S2B_20230610T183919"


def test_iso_utc_and_date_chunks():
    assert iso_utc("2023-06-10T20:39:19.1234567+02:00") == "2023-06-10T18:39:19Z"
    ch = date_chunks(dt.date(2023, 1, 1), dt.date(2023, 12, 31), 92)
    assert ch[0][0] == dt.date(2023, 1, 1) and ch[-1][1] == dt.date(2023, 12, 31)
    assert all((b - a).days < 92 for a, b in ch)
    assert all(ch[i + 1][0] - ch[i][1] == dt.timedelta(days=1) for i in range(len(ch) - 1))


# -- search against rustac --------------------------------------------------------------------
def _grid_items(n: int) -> list[dict]:
    items = []
    for k in range(n):
        day = dt.date(2023, 1, 1) + dt.timedelta(days=7 * k)
        x = -118.5 + 0.01 * k
        items.append(pc_s2_item("11SLT", f"{day.isoformat()}T18:39:19", (x, 34.0, x + 0.2, 34.2), float(k % 5)))
    items.append(pc_s2_item("11SLT", "2022-12-20T18:39:19", (-118.5, 34.0, -118.3, 34.2), 0.0))  # outside dates
    items.append(pc_s2_item("12SUA", "2023-03-01T18:39:19", (-100.5, 34.0, -100.3, 34.2), 0.0))  # outside bbox
    items.append(pc_naip_item("ca_m_x", "ca", 2022, "2022-06-01", (-118.4, 34.05, -118.3, 34.1)))
    return items


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("rustac")
    from gl10m.testbed.serve import serve

    world = write_world(tmp_path_factory.mktemp("stac-world"), _grid_items(23))
    with serve(world) as s:
        yield s


def test_search_pages_through_everything(served):
    p = StacProvider(served.stac_url, page_size=4, chunk_days=None)
    got = list(p.search_items("sentinel-2-l2a", (-119, 33.5, -117, 34.5), dt.date(2023, 1, 1), dt.date(2023, 12, 31)))
    ids = [g["id"] for g in got]
    assert len(ids) == 23 == len(set(ids))
    assert all(g["collection"] == "sentinel-2-l2a" and g["hrefs"]["B04"].startswith(served.http_url) for g in got)
    assert p.n_requests >= 6  # landing page + 6 pages of 4
    # chunked by month gives the same set
    q = StacProvider(served.stac_url, page_size=1000, chunk_days=31)
    got2 = list(q.search_items("sentinel-2-l2a", (-119, 33.5, -117, 34.5), dt.date(2023, 1, 1), dt.date(2023, 12, 31)))
    assert sorted(g["id"] for g in got2) == sorted(ids)
    naip = list(p.search_items("naip", (-119, 33.5, -117, 34.5), dt.date(2018, 1, 1), dt.date(2025, 4, 1)))
    assert [n["id"] for n in naip] == ["ca_m_x"] and naip[0]["naip_state"] == "CA"


def test_provider_interface_and_factory(served):
    from gl10m import profile as prof

    p = provider_from_profile(served.profile_for(prof.load()))
    assert isinstance(p, Provider) and isinstance(p, ProviderLike)
    assert p.sign("http://127.0.0.1/x.tif") == "http://127.0.0.1/x.tif"
    pc = provider_from_profile(prof.load())
    assert pc.signing == "planetary_computer" and pc.flavour == "planetary_computer"
    assert pc.max_concurrency == prof.load().provider.max_concurrency
    import pickle

    p2 = pickle.loads(pickle.dumps(p))
    assert p2.url == p.url and p2._client is None
    pc2 = pickle.loads(pickle.dumps(pc))  # Dask ships providers to workers, signer included
    assert pc2._signer is not None and pc2._signer._cache == {} and pc2.sign("http://127.0.0.1/a") == "http://127.0.0.1/a"


def test_search_retries_a_429_from_the_stac_api(scripted):
    item = pc_s2_item("11SLT", "2023-06-10T18:39:19", (-118.1, 34.0, -117.9, 34.2), 0.5)

    def landing(h):
        base = f"http://127.0.0.1:{h.server.server_address[1]}"
        return json.dumps({"type": "Catalog", "id": "t", "description": "t", "stac_version": "1.0.0",
                           "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                          "https://api.stacspec.org/v1.0.0/item-search"],
                           "links": [{"rel": "search", "href": base + "/search", "method": "POST",
                                      "type": "application/geo+json"},
                                     {"rel": "self", "href": base + "/"}]}).encode()

    page = json.dumps({"type": "FeatureCollection", "features": [item], "links": []}).encode()
    url, script = scripted({"/": [(200, {"Content-Type": "application/json"}, landing)],
                            "/search": [(429, {"Retry-After": "1"}, b"{}"), (503, {}, b"{}"),
                                        (200, {"Content-Type": "application/geo+json"}, page)]})
    p = StacProvider(url, chunk_days=None, retry_kw={"base_delay": 0.01, "max_delay": 0.02})
    got = list(p.search_items("sentinel-2-l2a", (-119, 33, -117, 35), dt.date(2023, 1, 1), dt.date(2023, 12, 31)))
    assert [g["id"] for g in got] == [item["id"]]
    searches = [h for h in script.hits if h[0].startswith("/search")]
    assert len(searches) == 3 and searches[1][3] - searches[0][3] >= 0.95


# -- Planetary Computer signing ---------------------------------------------------------------
def test_pc_signing_caches_refreshes_and_resigns(scripted):
    state = {"n": 0}
    ttl = {"s": 3600}

    def token(h):
        state["n"] += 1
        exp = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=ttl["s"])
        return json.dumps({"token": f"st=a&se=b&sig=T{state['n']}", "msft:expiry": exp.isoformat()}).encode()

    url, script = scripted({"/token/acct/cont": [(200, {}, token)]})
    s = PlanetaryComputerSigner(url + "/token", "SECRET-KEY", min_ttl_s=60)
    href = "https://acct.blob.core.windows.net/cont/a/b/B04.tif"
    one = s.sign(href)
    assert one == href + "?st=a&se=b&sig=T1"
    assert s.sign(href.replace("B04", "B03")).endswith("sig=T1")  # cached per container
    assert len(script.hits) == 1
    assert script.hits[0][2].get("Ocp-Apim-Subscription-Key") == "SECRET-KEY"
    assert "SECRET" not in repr(s) and "SECRET" not in repr(StacProvider("http://x", signing="planetary_computer",
                                                                          signer=s))
    assert s.resign(one) == href + "?st=a&se=b&sig=T2"  # after a 403: fresh token, old query dropped
    assert len(script.hits) == 2
    ttl["s"] = 30  # tokens now expire within min_ttl: every sign fetches anew
    s.resign(href)
    s.sign(href)
    assert len(script.hits) == 4
    assert s.sign("http://127.0.0.1:9/x.tif") == "http://127.0.0.1:9/x.tif"  # not a blob: unchanged
    assert len(script.hits) == 4
