"""The plan step: NAIP matching, Sentinel-2 windows and coverage, subsampling, dry run, I/O."""
from __future__ import annotations

import datetime as dt
import json
import random

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest

from gl10m import catalog as cat
from gl10m import plan as pl
from gl10m import profile as prof
from gl10m.sources.stac import normalise_item
from tests.test_sources_stac import pc_naip_item, pc_s2_item

FP = 0.024
NC = 66


@pytest.fixture(scope="module")
def profile():
    return prof.load()


def candidates(rows, state="CA") -> gpd.GeoDataFrame:
    """rows: (scene_id, lon, lat, concepts). Label columns shaped like the anchors stage's."""
    recs = []
    for sid, lon, lat, concepts in rows:
        sf = np.zeros(NC, dtype="float32")
        sf[list(concepts)] = 0.1
        recs.append({"scene_id": sid, "state": state, "lon": lon, "lat": lat,
                     "west": lon - FP / 2, "south": lat - FP / 2, "east": lon + FP / 2, "north": lat + FP / 2,
                     "concepts": np.asarray(sorted(concepts), dtype="int16"), "scene_frac": sf,
                     "rel_frac": sf / max(sf.sum(), 1e-9), "tile_idx": np.asarray([0, 55], dtype="int16"),
                     "tile_concept": np.asarray([concepts[0], concepts[-1]], dtype="int16"),
                     "tile_frac": np.asarray([0.5, 0.25], dtype="float32"),
                     "tile_dominant": np.full(100, concepts[0], dtype="int16"),
                     "hr_px_m_x": np.float32(0.82), "hr_px_m_y": np.float32(0.99),
                     "lr_px_m_x": np.float32(8.2), "lr_px_m_y": np.float32(9.9)})
    df = pd.DataFrame(recs)
    import shapely

    return gpd.GeoDataFrame(df, geometry=shapely.box(df.west, df.south, df.east, df.north), crs="EPSG:4326")


def frame(items):
    return cat.items_to_frame([normalise_item(i) for i in items])


def around(lon, lat, half):
    return (lon - half, lat - half, lon + half, lat + half)


# scene A at (-118.0, 34.0); its footprint is [-118.012, 33.988, -117.988, 34.012]
A = (-118.0, 34.0)
BIG_S2 = around(*A, 0.5)


def s2_all_year(bbox=BIG_S2, tile="11SLT", days=("2023-03-05", "2023-06-10", "2023-09-20")):
    return [pc_s2_item(tile, f"{d}T18:39:19", bbox, 0.5) for d in days]


def test_newest_eligible_naip_year_wins_and_all_quarter_quads_are_collected(profile):
    lon, lat = A
    naip = frame([
        pc_naip_item("ca_2021_full", "ca", 2021, "2021-07-04", around(lon, lat, 0.05)),
        # 2023: two quarter-quads, west and east halves, overlapping a little, different dates
        pc_naip_item("ca_2023_w", "ca", 2023, "2023-06-12", (lon - 0.05, lat - 0.05, lon + 0.001, lat + 0.05)),
        pc_naip_item("ca_2023_e", "ca", 2023, "2023-07-02", (lon - 0.001, lat - 0.05, lon + 0.05, lat + 0.05)),
        # 2023 quad that only touches the footprint's east edge: not part of the mosaic
        pc_naip_item("ca_2023_touch", "ca", 2023, "2023-07-02", (lon + FP / 2, lat - 0.05, lon + 0.1, lat + 0.05)),
        # 2024 acquired in June 2024: after the window, not eligible
        pc_naip_item("ca_2024_full", "ca", 2024, "2024-06-10", around(lon, lat, 0.05)),
        # a neighbouring state's newer year over the same place
        pc_naip_item("nv_2023_full", "nv", 2023, "2023-08-01", around(lon, lat, 0.05)),
    ])
    res = pl.plan_region(candidates([("s1", lon, lat, [3, 29])]), naip, frame(s2_all_year()), profile, "CA")
    assert len(res.rows) == 1 and res.rejections.empty
    r = res.rows.iloc[0]
    assert r["naip_year"] == 2023
    items = json.loads(r["naip_items"])
    assert [i["id"] for i in items] == ["ca_2023_e", "ca_2023_w"]
    assert r["naip_date"] == "2023-07-02"  # newest acquisition used
    assert set(items[0]) == {"id", "href", "datetime", "epsg", "gsd", "state", "year", "bbox"}
    assert all(i["state"] == "CA" and i["year"] == 2023 and i["gsd"] == 0.6 for i in items)


def test_partial_newer_year_loses_to_a_complete_older_one_and_nothing_gives_no_naip(profile):
    lon, lat = A
    naip = frame([
        pc_naip_item("ca_2023_w", "ca", 2023, "2023-06-12", (lon - 0.05, lat - 0.05, lon - 0.001, lat + 0.05)),
        pc_naip_item("ca_2022_full", "ca", 2022, "2022-05-20", around(lon, lat, 0.05)),
    ])
    far = (-117.5, 34.0)  # S2 there, NAIP only in 2021
    naip_far = frame([pc_naip_item("ca_2021", "ca", 2021, "2021-06-01", around(*far, 0.05))])
    res = pl.plan_region(candidates([("s1", lon, lat, [3, 29]), ("s2", far[0], far[1], [3, 29])]),
                         pd.concat([naip, naip_far], ignore_index=True), frame(s2_all_year(around(-117.75, 34, 0.5))),
                         profile, "CA")
    assert res.rows["scene_id"].tolist() == ["s1"]
    assert res.rows.iloc[0]["naip_year"] == 2022
    assert [i["id"] for i in json.loads(res.rows.iloc[0]["naip_items"])] == ["ca_2022_full"]
    rej = res.rejections.set_index("scene_id")
    assert rej.loc["s2", "reason"] == pl.NO_NAIP and rej.loc["s2", "key"] == "CA-s2"


def test_footprint_half_outside_sentinel2_is_no_s2(profile):
    lon, lat = A
    naip = frame([pc_naip_item("ca_2023", "ca", 2023, "2023-06-12", around(lon, lat, 0.05))])
    s2 = frame(s2_all_year(bbox=(lon - 0.5, lat - 0.5, lon, lat + 0.5)))  # ends at the footprint's centre
    res = pl.plan_region(candidates([("s1", lon, lat, [3, 29])]), naip, s2, profile, "CA")
    assert res.rows.empty
    assert res.rejections.to_dict("records")[0]["reason"] == pl.NO_S2
    # two granules (different tiles, same dates) whose union covers it: accepted
    s2b = frame(s2_all_year(bbox=(lon - 0.5, lat - 0.5, lon, lat + 0.5))
                + s2_all_year(bbox=(lon - 0.01, lat - 0.5, lon + 0.5, lat + 0.5), tile="11SLU"))
    res2 = pl.plan_region(candidates([("s1", lon, lat, [3, 29])]), naip, s2b, profile, "CA")
    assert len(res2.rows) == 1
    its = json.loads(res2.rows.iloc[0]["s2_items"])
    assert {i["mgrs_tile"] for i in its} == {"11SLT", "11SLU"} and len(its) == 6


def test_windows_aligned_fallback_and_cloud(profile):
    lon, lat = A
    # NAIP 2022-08-01: the aligned window is 2023-01-01 .. 2023-01-31 after clipping
    naip = frame([pc_naip_item("ca_2022", "ca", 2022, "2022-08-01", around(lon, lat, 0.05))])
    cands = candidates([("s1", lon, lat, [3, 29])])
    only_june = frame([pc_s2_item("11SLT", "2023-06-10T18:39:19", BIG_S2, 0.5)])
    r = pl.plan_region(cands, naip, only_june, profile, "CA").rows.iloc[0]
    assert (r["s2_window"], r["s2_start"], r["s2_end"]) == ("fallback", "2023-01-01", "2023-12-31")
    jan = frame([pc_s2_item("11SLT", "2023-01-15T18:39:19", BIG_S2, 1.99),
                 pc_s2_item("11SLT", "2023-01-20T18:39:19", BIG_S2, 2.0),   # not < 2 %
                 pc_s2_item("11SLT", "2023-06-10T18:39:19", BIG_S2, 0.5)])  # outside the aligned window
    r = pl.plan_region(cands, naip, jan, profile, "CA").rows.iloc[0]
    assert (r["s2_window"], r["s2_start"], r["s2_end"]) == ("aligned", "2023-01-01", "2023-01-31")
    its = json.loads(r["s2_items"])
    assert [i["datetime"][:10] for i in its] == ["2023-01-15"]
    assert set(its[0]["hrefs"]) == {"B02", "B03", "B04", "B08", "SCL"} and its[0]["baseline"] == "05.09"
    # an item that lacks an asset stays in the plan with a None href: fetch rejects it, typed
    broken = pc_s2_item("11SLT", "2023-01-15T18:39:19", BIG_S2, 0.5)
    del broken["assets"]["SCL"]
    r = pl.plan_region(cands, naip, frame([broken]), profile, "CA").rows.iloc[0]
    assert json.loads(r["s2_items"])[0]["hrefs"]["SCL"] is None
    # NAIP mid-2023: +-183 days covers almost all 2023; items sorted by datetime
    naip23 = frame([pc_naip_item("ca_2023", "ca", 2023, "2023-06-12", around(lon, lat, 0.05))])
    r = pl.plan_region(cands, naip23, frame(list(reversed(s2_all_year()))), profile, "CA").rows.iloc[0]
    assert (r["s2_window"], r["s2_start"], r["s2_end"]) == ("aligned", "2023-01-01", "2023-12-12")
    its = json.loads(r["s2_items"])
    assert [i["datetime"] for i in its] == sorted(i["datetime"] for i in its) and len(its) == 3


def test_one_tile_per_datatake_when_it_covers(profile):
    lon, lat = A
    naip = frame([pc_naip_item("ca_2023", "ca", 2023, "2023-06-12", around(lon, lat, 0.05))])
    s2 = frame(s2_all_year(tile="11SLU") + s2_all_year(tile="11SLT"))  # both tiles cover, same datatakes
    its = json.loads(pl.plan_region(candidates([("s1", lon, lat, [3, 29])]), naip, s2, profile, "CA")
                     .rows.iloc[0]["s2_items"])
    assert len(its) == 3 and {i["mgrs_tile"] for i in its} == {"11SLT"}


def _many(n_rare=5, n_common=40):
    rows = [(f"r{k:02d}", -118.0 + 0.03 * k, 34.0, [19, 29]) for k in range(n_rare)]          # wind farm (rare)
    rows += [(f"c{k:02d}", -118.0 + 0.03 * k, 34.1, [28, 29]) for k in range(n_common)]       # farmland + forest
    return rows


def test_subsample_rare_first_deterministic_and_order_independent(profile):
    rows = _many()
    priors = pl.concept_priors(profile)
    ids = [r[0] for r in rows]
    cons = [r[3] for r in rows]
    sel = pl.subsample(ids, cons, 10, priors, seed=1)
    assert len(sel) == 10 == len(set(sel))
    assert {s for s in sel if s.startswith("r")} == {f"r{k:02d}" for k in range(5)}  # every rare scene kept
    perm = list(range(len(rows)))
    random.Random(7).shuffle(perm)
    again = pl.subsample([ids[i] for i in perm], [cons[i] for i in perm], 10, priors, seed=1)
    assert again == sel
    other = pl.subsample(ids, cons, 10, priors, seed=2)
    assert {s for s in other if s.startswith("c")} != {s for s in sel if s.startswith("c")}
    assert pl.subsample(ids, cons, 100, priors, seed=1) and len(pl.subsample(ids, cons, 100, priors)) == len(ids)
    # rarer concept first even when both have few scenes: wind farm (15) before port (203)
    two = pl.subsample(["a", "b"], [[9], [19]], 1, priors)
    assert two == ["b"]


def test_plan_region_subsampling_rows_and_rejections(profile, tmp_path):
    rows = _many()
    big = around(-117.4, 34.05, 0.8)
    naip = frame([pc_naip_item("ca_2023", "ca", 2023, "2023-06-12", big)])
    s2 = frame(s2_all_year(bbox=big))
    cands = candidates(rows)
    res = pl.plan_region(cands, naip, s2, profile, "CA", target=12, seed=3)
    assert len(res.rows) == 12 and (res.rejections["reason"] == pl.SUBSAMPLED_OUT).sum() == len(rows) - 12
    assert res.rows["key"].tolist() == sorted(res.rows["key"]) and res.rows["key"].str.contains(r"\.").sum() == 0
    assert set(res.rows["scene_id"]) >= {f"r{k:02d}" for k in range(5)}
    assert (res.rows["split"] == profile.split_of("CA")).all()
    assert res.stats["rejected"][pl.SUBSAMPLED_OUT] == len(rows) - 12 and res.stats["selected"] == 12
    # deterministic and independent of input order
    shuffled = cands.sample(frac=1.0, random_state=5)
    res2 = pl.plan_region(shuffled, naip, s2, profile, "CA", target=12, seed=3)
    assert res2.rows["key"].tolist() == res.rows["key"].tolist()
    assert res2.rows["plan_hash"].tolist() == res.rows["plan_hash"].tolist()
    # matching partitions separately, then selecting once, gives the same plan
    parts = [pl.match_region(cands[cands["lat"] < 34.05], naip, s2, profile, "CA"),
             pl.match_region(cands[cands["lat"] >= 34.05], naip, s2, profile, "CA")]
    merged = pl.select_rows(pd.concat([p[0] for p in parts], ignore_index=True),
                            pd.concat([p[1] for p in parts], ignore_index=True), profile, "CA", target=12, seed=3)
    assert merged.rows["plan_hash"].tolist() == res.rows["plan_hash"].tolist()
    assert merged.rejections["key"].tolist() == res.rejections["key"].tolist()
    # write / read
    path = pl.plan_path(tmp_path, "CA")
    pl.write_plan(res.rows, path, res.stats)
    back = pl.read_plan(path)
    assert tuple(c for c in back.columns if c != "geometry") == pl.PLAN_COLUMNS
    assert back["key"].tolist() == res.rows["key"].tolist()
    assert back.iloc[0]["concepts"].dtype == np.int16 and back.iloc[0]["scene_frac"].dtype == np.float32
    assert len(back.iloc[0]["tile_dominant"]) == 100
    assert back.attrs["stats"]["selected"] == 12 and back.crs.to_epsg() == 4326
    assert np.allclose(back.geometry.bounds.to_numpy(), back[["west", "south", "east", "north"]].to_numpy())
    # a changed S2 catalog changes the plan hash of the rows it touches
    s2b = frame(s2_all_year(bbox=big, days=("2023-03-05", "2023-06-10")))
    res3 = pl.plan_region(cands, naip, s2b, profile, "CA", target=12, seed=3)
    assert (res3.rows["plan_hash"] != res.rows["plan_hash"]).all()


def test_dry_run_numbers_match_the_plan(profile):
    rows = _many(3, 6)
    big = around(-117.4, 34.05, 0.8)
    naip = frame([pc_naip_item("ca_2023_a", "ca", 2023, "2023-06-12", big),
                  pc_naip_item("ca_2023_b", "ca", 2023, "2023-06-12", (-118.2, 33.9, -118.0, 34.2))])
    s2 = frame(s2_all_year(bbox=big))
    res = pl.plan_region(candidates(rows), naip, s2, profile, "CA")
    est = pl.estimate(res.rows, profile)
    tot = est[est["concept"] == pl.ALL].iloc[0]
    n_s2 = sum(len(json.loads(x)) for x in res.rows["s2_items"])
    n_naip = sum(len(json.loads(x)) for x in res.rows["naip_items"])
    assert tot["scenes"] == len(res.rows) == 9
    assert tot["requests"] == 4 * n_s2 + n_naip and tot["s2_reads"] == 4 * n_s2
    assert tot["bytes"] == tot["s2_bytes"] + tot["naip_bytes"]
    # per concept: the scenes holding it, and their summed cost
    wind = est[est["concept"] == "wind_farm"].iloc[0]
    forest = est[est["concept"] == "forest"].iloc[0]
    assert wind["scenes"] == 3 and forest["scenes"] == 9
    assert forest["bytes"] == tot["bytes"]
    costs = [pl.scene_cost(r, profile) for _, r in res.rows.iterrows()]
    assert wind["bytes"] == sum(c["bytes"] for c, (_, r) in zip(costs, res.rows.iterrows()) if 19 in r["concepts"])
    # magnitudes: an S2 item read is ~3 uint16 bands of the ~(lr_px)^2 footprint (+ SCL)
    one = costs[0]
    per_item = one["s2_bytes"] / (one["s2_reads"] / 4)
    assert 0.5 * 3 * 2 * 268 ** 2 < per_item < 1.5 * (3 * 2 * 268 ** 2 + 134 ** 2)
    # NAIP: 3 bands at 0.6 m over each quad's share of the footprint; scene c00 (centred at
    # -118.0) is covered by quad a and half covered by quad b: 1.5 footprints of pixels
    c00 = costs[res.rows["scene_id"].tolist().index("c00")]
    fp_m2 = (0.024 * 92_300) * (0.024 * 110_900)  # metres per degree at 34 N
    assert c00["naip_reads"] == 2
    assert c00["naip_bytes"] == pytest.approx(1.5 * 3 * fp_m2 / 0.36, rel=0.02)
    text = pl.format_estimate(est, res.rejections)
    assert "wind_farm" in text and "estimate" in text


def test_bad_input_is_one_line(profile):
    c = candidates([("s1", *A, [3, 29])])
    empty = cat.items_to_frame([])
    with pytest.raises(pl.PlanError, match="unknown state"):
        pl.plan_region(c, empty, empty, profile, "ZZ")
    with pytest.raises(pl.PlanError, match="concepts"):
        pl.plan_region(c.drop(columns=["concepts"]), empty, empty, profile, "CA")
    with pytest.raises(pl.PlanError, match="repeat"):
        pl.plan_region(pd.concat([c, c]), empty, empty, profile, "CA")
    res = pl.plan_region(c, empty, empty, profile, "CA")
    assert res.rows.empty and res.rejections["reason"].tolist() == [pl.NO_NAIP]


# -- end to end over the served testbed (the `testbed_server` fixture) ------------------------
def _world_items(world, collection):
    from gl10m.testbed.serve import load_world_stac

    return [normalise_item(i) for i in load_world_stac(world)[1] if i.get("collection") == collection]


def _world_profile(servers):
    path = servers.world / "profile.yaml"
    return servers.profile_for(prof.load(path if path.exists() else None))


def test_catalog_and_plan_against_the_served_testbed(testbed_server):
    import requests
    import shapely
    from shapely.geometry import shape

    from gl10m.sources.stac import provider_from_profile

    servers = testbed_server
    profile = _world_profile(servers)
    provider = provider_from_profile(profile)
    naip_disk = _world_items(servers.world, profile.imagery.naip.collection)
    states = sorted({i["naip_state"] for i in naip_disk if i["naip_state"] in profile.regions})
    assert states, "the served world has no NAIP item of a profile region"
    planned = 0
    for state in states:
        bbox = profile.regions[state].bbox
        naip = cat.catalog_region(provider, profile, state, profile.imagery.naip.collection)
        s2 = cat.catalog_region(provider, profile, state, profile.imagery.s2.collection)
        # the catalog holds exactly the world's items over the bbox and dates, less duplicates and clouds
        box = shapely.box(*bbox)
        a, b = cat.search_range(profile, profile.imagery.s2.collection)
        disk = [i for i in _world_items(servers.world, profile.imagery.s2.collection)
                if shape(i["geometry"]).intersects(box) and a <= dt.date.fromisoformat(i["datetime"][:10]) <= b]
        st = s2.attrs["stats"]
        assert st["searched"] == len(disk) and st["kept"] == len(s2)
        dedup, n_dup = cat.drop_reprocessed(cat.items_to_frame(disk))
        assert st["duplicates"] == n_dup
        assert (s2["cloud_cover"] < profile.imagery.s2.max_cloud_pct).all()
        # a candidate inside (newest eligible NAIP year) x (usable S2), one well outside S2
        elig = pl.eligible_naip(naip, profile, state)
        usable = pl.usable_s2(s2, profile)
        if elig.empty or usable.empty:
            continue
        newest = elig[elig["naip_year"] == elig["naip_year"].max()]
        region = shapely.intersection(shapely.union_all(newest.geometry.values), shapely.union_all(usable.geometry.values))
        if region.is_empty or region.area == 0:
            continue
        p = region.representative_point()
        h = profile.geometry.footprint_deg / 2
        while not region.contains(shapely.box(p.x - h, p.y - h, p.x + h, p.y + h)) and h > 1e-6:
            h /= 2
        far = (bbox[0] - 5.0, bbox[1] - 5.0)
        cands = candidates([("inside", p.x, p.y, [3, 29]), ("far", far[0], far[1], [3, 29])], state=state)
        for c in ("west", "south", "east", "north"):
            cands.loc[0, c] = {"west": p.x - h, "south": p.y - h, "east": p.x + h, "north": p.y + h}[c]
        res = pl.plan_region(cands, naip, s2, profile, state, provider=provider.name, target=10)
        assert res.rejections.set_index("scene_id").loc["far", "reason"] in (pl.NO_NAIP, pl.NO_S2)
        assert res.rows["scene_id"].tolist() == ["inside"]
        row = res.rows.iloc[0]
        fp = shapely.box(row["west"], row["south"], row["east"], row["north"])
        assert row["naip_year"] == int(newest["naip_year"].iloc[0])
        for it in json.loads(row["naip_items"]):
            assert it["state"] == state and shapely.box(*it["bbox"]).intersects(fp)
            assert requests.head(it["href"], timeout=10).status_code == 200  # unsigned, readable as planned
        s2_items = json.loads(row["s2_items"])
        assert s2_items and all(i["cloud_cover"] < profile.imagery.s2.max_cloud_pct for i in s2_items)
        assert all(row["s2_start"] <= i["datetime"][:10] <= row["s2_end"] for i in s2_items)
        assert requests.head(s2_items[0]["hrefs"]["B04"], timeout=10).status_code == 200
        est = pl.estimate(res.rows, profile)
        assert est.loc[est["concept"] == pl.ALL, "requests"].iloc[0] == 4 * len(s2_items) + len(json.loads(row["naip_items"]))
        planned += 1
    assert planned, "no state of the served world could be planned"


def _subset_world():
    """5 wind-farm scenes (rare), 10 pool scenes (pool + farmland), 40 farmland + forest scenes."""
    rows = _many()
    rows += [(f"p{k:02d}", -118.0 + 0.03 * k, 34.2, [3, 28]) for k in range(10)]  # swimming_pool + farmland
    return rows


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_concept_subset_is_cut_before_subsampling(profile, seed):
    """--concepts: the target is filled from the subset. Cutting the full subsample to the subset
    instead would keep only the few pool scenes the full greedy happened to choose (fewer than the
    target) and lose wind-farm scenes to farmland ones."""
    rows = _subset_world()
    big = around(-117.4, 34.1, 0.8)
    naip = frame([pc_naip_item("ca_2023", "ca", 2023, "2023-06-12", big)])
    s2 = frame(s2_all_year(bbox=big))
    cands = candidates(rows)
    pools = {r[0] for r in rows if 3 in r[3]}
    res = pl.plan_region(cands, naip, s2, profile, "CA", target=6, seed=seed, concepts=[3])
    assert len(res.rows) == 6 and set(res.rows["scene_id"]) <= pools
    full = pl.plan_region(cands, naip, s2, profile, "CA", target=6, seed=seed)
    assert len(set(full.rows["scene_id"]) & pools) < 6  # what filtering after subsampling would give
    reasons = dict(zip(res.rejections["scene_id"], res.rejections["reason"]))
    assert {s for s, r in reasons.items() if r == pl.NO_NAMED_CONCEPT} == {r[0] for r in rows} - pools
    assert {s for s, r in reasons.items() if r == pl.SUBSAMPLED_OUT} == pools - set(res.rows["scene_id"])
    assert res.stats["concepts"] == ["swimming_pool"] and full.stats["concepts"] is None
    assert res.stats["rejected"][pl.NO_NAMED_CONCEPT] == len(rows) - len(pools)
    assert res.stats["candidates"] == len(rows)
    # balanced within the subset: a rare named concept gets all its scenes before a frequent one
    # gets more than it has
    two = pl.plan_region(cands, naip, s2, profile, "CA", target=10, seed=seed, concepts=[19, 3])
    got = set(two.rows["scene_id"])
    assert len(got) == 10 and {f"r{k:02d}" for k in range(5)} <= got and got <= pools | {f"r{k:02d}" for k in range(5)}
    # the same subset, the same plan: order of names and of candidates does not matter
    again = pl.plan_region(cands.sample(frac=1.0, random_state=seed), naip, s2, profile, "CA", target=10, seed=seed,
                           concepts=[3, 19, 3])
    assert again.rows["key"].tolist() == two.rows["key"].tolist()
    assert again.rows["plan_hash"].tolist() == two.rows["plan_hash"].tolist()
    # a scene's plan row (and so its fetch) does not depend on the subset it was planned in
    both = set(res.rows["key"]) & set(full.rows["key"])
    by = dict(zip(full.rows["key"], full.rows["plan_hash"]))
    assert all(by[k] == h for k, h in zip(res.rows["key"], res.rows["plan_hash"]) if k in both)


def test_filter_by_concepts_keeps_the_scenes_holding_a_named_concept():
    from gl10m import anchors

    c = candidates([("a", -118.0, 34.0, [3, 29]), ("b", -118.1, 34.0, [28, 29]), ("c", -118.2, 34.0, [19, 28])])
    assert anchors.filter_by_concepts(c, None) is c
    assert anchors.filter_by_concepts(c, [3])["scene_id"].tolist() == ["a"]
    assert anchors.filter_by_concepts(c, {19, 3})["scene_id"].tolist() == ["a", "c"]
    assert anchors.filter_by_concepts(c, [28])["scene_id"].tolist() == ["b", "c"]
    assert anchors.filter_by_concepts(c, [64]).empty
