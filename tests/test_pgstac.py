"""The pipeline's STAC client against pgstac, the stack Planetary Computer runs.

The testbed items are loaded into a throwaway PostgreSQL + PostGIS + pgstac cluster, served by
`rustac serve --pgstac`, and every search must return the same items as the in-memory rustac
server of `gl10m testbed serve` (and as the item files on disk). Skipped where PostgreSQL /
PostGIS / pypgstac are missing, unless GL10M_REQUIRE_PGSTAC=1 (CI sets it after
`bash .ci/pgstac.sh .venv`), where that is a failure.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import urllib.parse

import pytest

from gl10m.testbed import pgstac
from gl10m.testbed.serve import load_world_stac

pystac_client = pytest.importorskip("pystac_client")
pytestmark = pytest.mark.pgstac

WHY_NOT = pgstac.missing()
if WHY_NOT and os.environ.get("GL10M_REQUIRE_PGSTAC") != "1":
    pytest.skip(f"pgstac not available: {WHY_NOT} (bash .ci/pgstac.sh .venv installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def pg_server(testbed_server, testbed_world):
    if WHY_NOT:
        pytest.fail(f"GL10M_REQUIRE_PGSTAC=1 but {WHY_NOT}")
    with pgstac.serve_world(testbed_world, testbed_server.http_url) as s:
        yield s


def _utc(*a) -> dt.datetime:
    return dt.datetime(*a, tzinfo=dt.timezone.utc)


def _items(world):
    return load_world_stac(world)[1]


def _inside(world, collection, shrink=0.25):
    it = next(i for i in _items(world) if i["collection"] == collection)
    w, s, e, n = it["bbox"]
    dx, dy = (e - w) * shrink, (n - s) * shrink
    return [w + dx, s + dy, e - dx, n - dy]


def _expected(world, bbox=None, start=None, end=None, collections=None, ids=None):
    from shapely.geometry import box, shape

    out = []
    for it in _items(world):
        t = dt.datetime.fromisoformat(it["properties"]["datetime"].replace("Z", "+00:00"))
        if (collections and it["collection"] not in collections or ids and it["id"] not in ids
                or bbox and not shape(it["geometry"]).intersects(box(*bbox))
                or start and t < start or end and t > end):
            continue
        out.append(it["id"])
    return sorted(out)


def _search(url, **kw):
    client = pystac_client.Client.open(url)
    return {i.id: {k: a.href for k, a in i.assets.items()} for i in client.search(**kw).items()}


CASES = {
    "everything": {},
    "collections-naip": dict(collections=["naip"]),
    "bbox-naip": dict(bbox="naip"),
    "bbox-s2": dict(bbox="sentinel-2-l2a", collections=["sentinel-2-l2a"]),
    "datetime-june-2023": dict(datetime=(_utc(2023, 6, 1), _utc(2023, 6, 30, 23, 59, 59))),
    "datetime-2021-naip": dict(datetime=(_utc(2021, 1, 1), _utc(2021, 12, 31, 23, 59, 59)), collections=["naip"]),
    "bbox-and-datetime": dict(bbox="naip", datetime=(_utc(2023, 1, 1), _utc(2023, 12, 31, 23, 59, 59))),
    "ids": dict(ids="two"),
    "far-away": dict(bbox=[10.0, 45.0, 10.1, 45.1]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pgstac_and_in_memory_return_the_same_items(pg_server, testbed_server, testbed_world, name):
    case = dict(CASES[name])
    if isinstance(case.get("bbox"), str):
        case["bbox"] = _inside(testbed_world, case["bbox"])
    if case.get("ids") == "two":
        case["ids"] = sorted(i["id"] for i in _items(testbed_world))[1::3][:2]
    start, end = case.get("datetime", (None, None))
    want = _expected(testbed_world, case.get("bbox"), start, end, case.get("collections"), case.get("ids"))
    kw = {k: v for k, v in case.items() if k != "datetime"}
    if "datetime" in case:
        kw["datetime"] = list(case["datetime"])
    from_pg = _search(pg_server.stac_url, **kw)
    in_mem = _search(testbed_server.stac_url, **kw)
    assert sorted(from_pg) == sorted(in_mem) == want
    assert from_pg == in_mem  # the same asset hrefs, pointing at the same HTTP server
    if name != "far-away":
        assert want


def test_pgstac_pages_with_a_small_limit(pg_server, testbed_world):
    client = pystac_client.Client.open(pg_server.stac_url)
    pages = list(client.search(limit=2).pages_as_dicts())
    ids = [f["id"] for p in pages for f in p["features"]]
    assert len(pages) >= 3 and all(len(p["features"]) <= 2 for p in pages)
    assert sorted(ids) == sorted(i["id"] for i in _items(testbed_world)) and len(ids) == len(set(ids))


@pytest.mark.filterwarnings("ignore::pystac_client.warnings.DoesNotConformTo")  # rustac --pgstac does not list them
def test_pgstac_honours_query_and_sortby(pg_server, testbed_world):
    """What the in-memory server ignores works on the Planetary Computer stack."""
    s2 = [i for i in _items(testbed_world) if i["collection"] == "sentinel-2-l2a"]
    limit = sorted(i["properties"]["eo:cloud_cover"] for i in s2)[len(s2) // 2]
    client = pystac_client.Client.open(pg_server.stac_url)
    got = [i.id for i in client.search(collections=["sentinel-2-l2a"], query={"eo:cloud_cover": {"lt": limit}},
                                       sortby="-properties.datetime").items()]
    want = sorted((i for i in s2 if i["properties"]["eo:cloud_cover"] < limit),
                  key=lambda i: i["properties"]["datetime"], reverse=True)
    assert got == [i["id"] for i in want] and got


def test_close_stops_postgres_and_the_api_and_removes_the_folder(testbed_world, testbed_server):
    items = [i for i in _items(testbed_world) if i["collection"] == "naip"][:2]
    collections = [c for c in load_world_stac(testbed_world)[0] if c["id"] == "naip"]
    s = pgstac.start(collections, items)
    assert sorted(_search(s.stac_url)) == sorted(i["id"] for i in items)
    tmp, api, pg_port = s.tmp, s.stac_url, s.pg_port
    s.close()
    s.close()
    assert not tmp.exists()
    for port in (urllib.parse.urlsplit(api).port, pg_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
