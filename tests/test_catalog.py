"""The catalog step: search once per state and collection, duplicates, local cloud filter, I/O."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from gl10m import catalog as cat
from gl10m import profile as prof
from gl10m.sources.stac import StacProvider, normalise_item
from tests.test_sources_stac import pc_naip_item, pc_s2_item, write_world

BOX = (-118.10, 34.00, -117.90, 34.20)


@pytest.fixture(scope="module")
def profile():
    return prof.load()


def _frame(items):
    return cat.items_to_frame([normalise_item(i) for i in items])


def test_reprocessing_duplicates_keep_the_newest_baseline():
    old = pc_s2_item("11SLT", "2023-06-10T18:39:19", BOX, 1.0, baseline="04.00", gen="20230611T000000")
    new = pc_s2_item("11SLT", "2023-06-10T18:39:19", BOX, 1.2, baseline="05.09", gen="20240301T000000")
    other_tile = pc_s2_item("11SLU", "2023-06-10T18:39:19", BOX, 1.0, baseline="04.00")  # same datatake, other tile
    other_day = pc_s2_item("11SLT", "2023-06-20T18:39:19", BOX, 1.0, baseline="04.00")
    for order in ([old, new, other_tile, other_day], [other_day, new, other_tile, old]):
        kept, n = cat.drop_reprocessed(_frame(order))
        assert n == 1
        assert sorted(kept["id"]) == sorted([new["id"], other_tile["id"], other_day["id"]])
        assert list(kept["datetime"]) == sorted(kept["datetime"])
    # same baseline twice: the later generation wins
    a = pc_s2_item("11SLT", "2023-07-10T18:39:19", BOX, 1.0, baseline="05.09", gen="20230711T000000")
    b = pc_s2_item("11SLT", "2023-07-10T18:39:19", BOX, 1.0, baseline="05.09", gen="20230801T000000")
    kept, n = cat.drop_reprocessed(_frame([b, a]))
    assert n == 1 and list(kept["id"]) == [b["id"]]


def test_cloud_filter_is_local_and_strict():
    items = [pc_s2_item("11SLT", f"2023-0{m}-10T18:39:19", BOX, c) for m, c in ((1, 0.0), (2, 1.99), (3, 2.0), (4, 50.0))]
    nocloud = pc_s2_item("11SLT", "2023-05-10T18:39:19", BOX, 0.0)
    nocloud["properties"].pop("eo:cloud_cover")
    kept, n = cat.filter_cloud(_frame(items + [nocloud]), 2.0)
    assert n == 3 and sorted(kept["cloud_cover"].tolist()) == [0.0, 1.99]


def test_search_range(profile):
    a, b = cat.search_range(profile, "naip")
    assert a < profile.imagery.naip.start and b > profile.imagery.naip.end
    assert cat.search_range(profile, "sentinel-2-l2a") == (dt.date(2023, 1, 1), dt.date(2023, 12, 31))
    with pytest.raises(cat.CatalogError, match="neither"):
        cat.search_range(profile, "landsat")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("rustac")
    from gl10m.testbed.serve import serve

    items = [
        pc_s2_item("11SLT", "2023-06-10T18:39:19", BOX, 1.0, baseline="04.00", gen="20230611T000000"),
        pc_s2_item("11SLT", "2023-06-10T18:39:19", BOX, 1.0, baseline="05.09", gen="20240301T000000"),  # reprocessed
        pc_s2_item("11SLT", "2023-06-20T18:39:19", BOX, 35.0),  # cloudy
        pc_s2_item("11SLT", "2023-08-09T18:39:19", BOX, 0.2),
        pc_s2_item("11SLT", "2022-08-09T18:39:19", BOX, 0.2),  # not in the S2 range
        pc_naip_item("ca_a_2021", "ca", 2021, "2021-07-04", (-118.05, 34.05, -118.0, 34.1)),
        pc_naip_item("ca_a_2023", "ca", 2023, "2023-06-12", (-118.05, 34.05, -118.0, 34.1)),
        pc_naip_item("nv_a_2023", "nv", 2023, "2023-06-12", (-118.05, 34.05, -118.0, 34.1)),
        pc_naip_item("ca_a_2010", "ca", 2010, "2010-06-12", (-118.05, 34.05, -118.0, 34.1)),  # too old to search
    ]
    with serve(write_world(tmp_path_factory.mktemp("cat-world"), items)) as s:
        yield s, items


def test_catalog_region_against_a_stac_api(served, profile, tmp_path):
    servers, items = served
    p = StacProvider(servers.stac_url, page_size=2)
    s2 = cat.catalog_region(p, profile, "CA", "sentinel-2-l2a", bbox=(-119, 33, -117, 35))
    st = s2.attrs["stats"]
    assert (st["searched"], st["duplicates"], st["cloudy"], st["kept"]) == (4, 1, 1, 2)
    assert list(s2["id"]) == [items[1]["id"], items[3]["id"]]
    assert s2.crs.to_epsg() == 4326 and s2["baseline"].tolist() == ["05.09", "05.09"]
    naip = cat.catalog_region(p, profile, "CA", "naip", bbox=(-119, 33, -117, 35))
    assert sorted(naip["id"]) == ["ca_a_2021", "ca_a_2023", "nv_a_2023"]  # the plan filters states and years
    assert naip.attrs["stats"]["duplicates"] == 0

    path = cat.catalog_path(tmp_path, "CA", "sentinel-2-l2a")
    cat.write_catalog(s2, path)
    back = cat.read_catalog(path)
    assert list(back["id"]) == list(s2["id"]) and back.attrs["stats"] == json.loads(json.dumps(st))
    assert json.loads(back.loc[0, "hrefs"])["B04"].startswith(servers.http_url)
    assert back.geometry.equals(s2.geometry)
    assert not [q for q in path.parent.iterdir() if q.name.startswith(".")]  # no temp left behind


def test_catalog_errors(profile, tmp_path):
    with pytest.raises(cat.CatalogError, match="unknown state"):
        cat.catalog_region(None, profile, "ZZ", "naip")
    with pytest.raises(cat.CatalogError, match="no such file"):
        cat.read_catalog(tmp_path / "nope.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(cat.CatalogError, match="unreadable"):
        cat.read_catalog(tmp_path / "bad.parquet")
    empty = cat.items_to_frame([])
    cat.write_catalog(empty, tmp_path / "e.parquet")
    assert len(cat.read_catalog(tmp_path / "e.parquet")) == 0
