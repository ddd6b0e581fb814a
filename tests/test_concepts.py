"""Every concept rule of the GL-10M profile: one tag set that matches, one near miss that does not.

The rules are data (manifests/gl10m-66.yaml) compiled by gl10m.concepts; this table is the
reference rule text (shared/reference/gl10m-facts.md) written out as tags. tests/test_osm.py
reuses CASES to put one feature of every concept into a real PBF.
"""
from __future__ import annotations

import pytest

from gl10m import profile as profile_mod
from gl10m.concepts import ConceptMatcher, RuleError, compile_rule, sport_tokens

# name -> (tags that match, near-miss tags that must not match this concept)
CASES: dict[str, tuple[dict, dict]] = {
    "tennis": ({"leisure": "pitch", "sport": "tennis"}, {"leisure": "sports_centre", "sport": "tennis"}),
    "skate_park": ({"leisure": "pitch", "sport": "basketball;skateboard"}, {"leisure": "pitch", "sport": "skateboarding"}),
    "american_football": ({"leisure": "pitch", "sport": "soccer,american_football"}, {"leisure": "pitch", "sport": "football"}),
    "swimming_pool": ({"leisure": "swimming_pool"}, {"leisure": "water_park"}),
    "golf_course": ({"leisure": "golf_course"}, {"leisure": "miniature_golf"}),
    "baseball_field": ({"leisure": "pitch", "sport": "baseball | softball"}, {"leisure": "pitch", "sport": "softball"}),
    "stadium": ({"leisure": "stadium"}, {"building": "stadium"}),
    "roundabout": ({"highway": "primary", "junction": "roundabout"}, {"highway": "primary", "junction": "circular"}),
    "airport": ({"aeroway": "aerodrome"}, {"aeroway": "apron"}),
    "port": ({"landuse": "harbour"}, {"landuse": "port", "leisure": "marina"}),
    "railway_station": ({"public_transport": "station"}, {"railway": "halt"}),
    "runway": ({"aeroway": "runway"}, {"aeroway": "taxiway"}),
    "airport_hangar": ({"building": "hangar"}, {"building": "garage"}),
    "airport_terminal": ({"aeroway": "terminal"}, {"aeroway": "gate"}),
    "helipad": ({"aeroway": "helipad"}, {"aeroway": "heliport"}),
    "dam": ({"waterway": "dam"}, {"waterway": "weir"}),
    "electric_substation": ({"power": "substation"}, {"power": "transformer"}),
    "shipyard": ({"industrial": "shipyard", "landuse": "industrial"}, {"man_made": "shipyard"}),
    "solar_farm": ({"power": "generator", "generator:source": "solar"}, {"power": "generator", "plant:source": "solar"}),
    "wind_farm": ({"power": "generator", "generator:method": "wind_turbine"}, {"power": "plant", "generator:source": "wind"}),
    "surface_mine": ({"landuse": "quarry"}, {"landuse": "mine"}),
    "waste_disposal": ({"amenity": "waste_disposal"}, {"amenity": "waste_basket"}),
    "water_treatment_facility": ({"man_made": "wastewater_plant"}, {"man_made": "water_tower"}),
    "marina": ({"mooring:left": "yes"}, {"mooring": "no"}),
    "beach": ({"natural": "beach"}, {"natural": "coastline"}),
    "parking_garage": ({"amenity": "parking", "parking": "multi-storey"}, {"amenity": "parking", "parking": "surface"}),
    "parking_lot": ({"amenity": "parking", "parking": "surface"}, {"amenity": "parking_space", "parking": "surface"}),
    "soccer": ({"leisure": "stadium", "sport": "soccer"}, {"leisure": "park", "sport": "soccer"}),
    "farmland": ({"landuse": "farmland"}, {"landuse": "farmyard"}),
    "forest": ({"natural": "wood"}, {"natural": "tree_row"}),
    "lake": ({"natural": "water", "water": "lake"}, {"natural": "water", "water": "reservoir"}),
    "wetland": ({"natural": "wetland"}, {"wetland": "marsh"}),
    "park": ({"leisure": "park"}, {"leisure": "garden"}),
    "river": ({"waterway": "riverbank"}, {"waterway": "stream"}),
    "desert": ({"natural": "desert"}, {"natural": "sand"}),
    "meadow": ({"landuse": "meadow"}, {"landuse": "grass"}),
    "bareland": ({"natural": "scree"}, {"natural": "rock"}),
    "chaparral": ({"natural": "scrub"}, {"natural": "heath"}),
    "industrial": ({"landuse": "industrial"}, {"building": "industrial"}),
    "aquaculture": ({"aquaculture": "shrimp"}, {"landuse": "fishing"}),
    "construction_site": ({"landuse": "construction"}, {"building": "construction"}),
    "nature_reserve": ({"boundary": "protected_area"}, {"boundary": "national_park"}),
    "school": ({"amenity": "school"}, {"amenity": "kindergarten"}),
    "university": ({"building": "university"}, {"amenity": "college"}),
    "hospital": ({"healthcare": "hospital"}, {"healthcare": "clinic"}),
    "supermarket": ({"shop": "supermarket"}, {"shop": "convenience"}),
    "shopping_mall": ({"building": "mall"}, {"shop": "department_store"}),
    "warehouse": ({"building": "warehouse"}, {"landuse": "warehouse"}),
    "office": ({"building": "office"}, {"office": "company"}),
    "religious_building": ({"building": "chapel"}, {"building": "monastery"}),
    "fire_station": ({"amenity": "fire_station"}, {"emergency": "fire_hydrant"}),
    "police_station": ({"amenity": "police"}, {"police": "checkpoint"}),
    "prison": ({"landuse": "prison"}, {"amenity": "courthouse"}),
    "gas_station": ({"amenity": "fuel"}, {"amenity": "charging_station"}),
    "barn": ({"building": "barn"}, {"building": "farm_auxiliary"}),
    "car_dealership": ({"shop": "car"}, {"shop": "car_repair"}),
    "railroad": ({"railway": "narrow_gauge"}, {"railway": "abandoned"}),
    "highway": ({"highway": "trunk"}, {"highway": "trunk", "bridge": "yes"}),
    "overpass": ({"bridge": "yes", "railway": "rail"}, {"bridge": "yes", "waterway": "canal"}),
    "viaduct": ({"bridge": "viaduct", "railway": "rail"}, {"bridge": "aqueduct"}),
    "tower": ({"man_made": "tower"}, {"man_made": "mast"}),
    "toll_booth": ({"highway": "toll_gantry"}, {"barrier": "gate"}),
    "tunnel_opening": ({"tunnel": "yes", "highway": "motorway"}, {"tunnel": "yes", "highway": "residential"}),
    "pond": ({"natural": "water", "water": "pond"}, {"natural": "water", "water": "basin"}),
    "sand": ({"natural": "sand"}, {"natural": "beach"}),
    "cemetery": ({"amenity": "grave_yard"}, {"amenity": "funeral_hall"}),
}

# a few extra cases where a rule has several branches or an exclusion
EXTRA: list[tuple[str, dict, bool]] = [
    ("skate_park", {"leisure": "skate_park"}, True),
    ("port", {"industrial": "port"}, True),
    ("port", {"landuse": "port", "harbour": "marina"}, False),
    ("railway_station", {"railway": "station"}, True),
    ("airport_hangar", {"aeroway": "hangar"}, True),
    ("airport_terminal", {"building": "terminal"}, True),
    ("dam", {"man_made": "dam"}, True),
    ("shipyard", {"man_made": "shipyard", "building": "yes"}, True),
    ("shipyard", {"man_made": "shipyard", "building": "no"}, False),
    ("shipyard", {"man_made": "shipyard", "man_made:x": "works"}, False),
    ("solar_farm", {"power": "plant", "plant:source": "solar"}, True),
    ("wind_farm", {"man_made": "wind_turbine"}, True),
    ("wind_farm", {"power": "plant", "plant:source": "wind"}, True),
    ("wind_farm", {"power": "generator", "generator:source": "wind"}, True),
    ("waste_disposal", {"landuse": "landfill"}, True),
    ("water_treatment_facility", {"man_made": "water_works"}, True),
    ("marina", {"leisure": "marina"}, True),
    ("marina", {"harbour": "marina"}, True),
    ("marina", {"waterway": "marina"}, True),
    ("marina", {"mooring": "yes"}, True),
    ("parking_garage", {"amenity": "parking", "parking": "underground"}, True),
    ("soccer", {"leisure": "sports_centre", "sport": "soccer;tennis"}, True),
    ("soccer", {"leisure": "pitch", "sport": "soccer_7"}, False),
    ("forest", {"landuse": "forest"}, True),
    ("river", {"waterway": "river"}, True),
    ("river", {"water": "river"}, True),
    ("bareland", {"natural": "bare_rock"}, True),
    ("bareland", {"natural": "shingle"}, True),
    ("aquaculture", {"landuse": "aquaculture"}, True),
    ("aquaculture", {"man_made": "fish_farm"}, True),
    ("nature_reserve", {"leisure": "nature_reserve"}, True),
    ("university", {"amenity": "university"}, True),
    ("hospital", {"amenity": "hospital"}, True),
    ("shopping_mall", {"shop": "mall"}, True),
    ("religious_building", {"amenity": "place_of_worship"}, True),
    ("religious_building", {"building": "mosque"}, True),
    ("prison", {"amenity": "prison"}, True),
    ("prison", {"building": "prison"}, True),
    ("car_dealership", {"amenity": "car_dealer"}, True),
    ("railroad", {"railway": "light_rail"}, True),
    ("railroad", {"railway": "subway"}, True),
    ("railroad", {"railway": "tram"}, True),
    ("railroad", {"railway": "monorail"}, True),
    ("highway", {"highway": "motorway", "tunnel": "yes"}, False),
    ("highway", {"highway": "primary", "junction": "roundabout"}, False),
    ("highway", {"highway": "tertiary", "bridge": "no"}, True),
    ("overpass", {"bridge": "yes", "highway": "primary"}, True),
    ("overpass", {"bridge": "viaduct", "highway": "primary"}, False),
    ("toll_booth", {"barrier": "toll_booth"}, True),
    ("toll_booth", {"highway": "toll_booth"}, True),
    ("tunnel_opening", {"tunnel": "yes", "railway": "subway"}, True),
    ("tunnel_opening", {"tunnel": "culvert", "highway": "motorway"}, False),
    ("cemetery", {"landuse": "cemetery"}, True),
    ("tennis", {"leisure": "pitch", "sport": "Table_Tennis"}, False),
    ("tennis", {"leisure": "pitch", "sport": "TENNIS"}, True),
]


@pytest.fixture(scope="module")
def prof():
    return profile_mod.load()


@pytest.fixture(scope="module")
def matcher(prof):
    return ConceptMatcher(prof.concepts)


def _id(prof, name):
    return next(c.id for c in prof.concepts if c.name == name)


def test_table_covers_every_concept(prof):
    assert sorted(CASES) == sorted(c.name for c in prof.concepts)
    assert prof.n_concepts == 66


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_and_near_miss_does_not(prof, matcher, name):
    good, miss = CASES[name]
    cid = _id(prof, name)
    assert cid in matcher.match(good), f"{name} should match {good}"
    assert cid not in matcher.match(miss), f"{name} should not match near miss {miss}"
    # the pre-filter never hides a matching object
    assert matcher.could_match(good.keys())


@pytest.mark.parametrize("name,tags,expect", EXTRA, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(EXTRA)])
def test_rule_branches(prof, matcher, name, tags, expect):
    assert (_id(prof, name) in matcher.match(tags)) is expect


def test_match_is_sorted_and_multi(prof, matcher):
    tags = {"leisure": "pitch", "sport": "soccer;american_football;tennis"}
    ids = matcher.match(tags)
    assert ids == sorted(ids)
    assert {_id(prof, n) for n in ("tennis", "american_football", "soccer")} <= set(ids)


def test_untagged_and_irrelevant_match_nothing(matcher):
    assert matcher.match({}) == []
    assert matcher.match({"building": "yes", "name": "x"}) == []
    assert not matcher.could_match(["name", "addr:street"])


def test_sport_tokens():
    assert sport_tokens(" Soccer; american_football ,tennis|golf  x") == {
        "soccer", "american_football", "tennis", "golf", "x"}


@pytest.mark.parametrize("bad", [[], {}, {"any": []}, {"k": True}, {"k": {"tok": "x"}}, {"pre*": "x"}, {"k": []}])
def test_bad_rules_raise(bad):
    with pytest.raises(RuleError):
        compile_rule(bad)


def _taglist(tags):
    from types import SimpleNamespace

    return [SimpleNamespace(k=k, v=v) for k, v in tags.items()]


def test_trigger_index_agrees_with_matcher(prof, matcher):
    """gl10m.osm only evaluates the rules an object's tags trigger: same answers, always."""
    import random

    from gl10m.osm import TriggerIndex

    idx = TriggerIndex(prof.concepts)
    sets = [t for good, miss in CASES.values() for t in (good, miss)] + [t for _, t, _ in EXTRA]
    pool = sorted({(k, v) for t in sets for k, v in t.items()} | {("building", "yes"), ("name", "x"),
                                                                  ("mooring:right", "yes"), ("aquaculture:fish", "x")})
    rng = random.Random(0)
    for _ in range(3000):
        sets.append(dict(rng.sample(pool, rng.randint(1, 4))))
    for t in sets:
        assert idx.match(_taglist(t)) == matcher.match(t), t
