"""The GL-10M profile: facts reproduced as data, and strict validation with one clear error."""
import copy

import pytest
import yaml

from gl10m import profile as prof
from gl10m.profile import ProfileError

FACT_TARGETS = {"CA": 35000, "TX": 34000, "FL": 29000, "WA": 20947, "IL": 24330, "PA": 25000,
                "NC": 24000, "GA": 24973, "CO": 28000, "AZ": 14000, "ME": 14000}


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(prof.DEFAULT_PROFILE.read_text())


def load_mutated(tmp_path, raw, mutate):
    data = copy.deepcopy(raw)
    mutate(data)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return prof.load(p)


def test_default_profile_reproduces_the_facts():
    p = prof.load()
    assert p.n_concepts == 66
    names = [c.name for c in p.concepts]
    assert names[0] == "tennis" and names[3] == "swimming_pool" and names[65] == "cemetery"
    assert names[56:58] == ["railroad", "highway"]
    assert p.geometry.footprint_deg == pytest.approx(0.024)
    assert p.geometry.grid == 10 and p.geometry.tile_px == 268 and p.geometry.hr_px == 2680
    assert {k: r.target for k, r in p.regions.items()} == FACT_TARGETS
    assert sum(FACT_TARGETS.values()) == 273250
    s2 = p.imagery.s2
    assert s2.scl_mask == [0, 1, 3, 8, 9, 10] and s2.max_cloud_pct == 2.0 and s2.window_days == 183
    assert tuple(s2.stretch) == (0.0, 0.3)
    assert str(p.imagery.naip.start) == "2022-01-01" and str(p.imagery.naip.end) == "2024-04-01"
    assert p.qc.black_level == 5 and p.qc.max_black_ratio == 0.25
    paper, ref = p.splits.schemes["paper"], p.splits.schemes["reference"]
    assert paper.val == ["WA"] and ref.val == ["CO"] and paper.test == ref.test == ["AZ", "ME"]
    assert p.split_of("WA") == "val" and p.split_of("CO") == "train"


def test_line_and_point_concepts_declare_buffers():
    p = prof.load()
    by = {c.name: c for c in p.concepts}
    for name in ("railroad", "highway", "runway", "overpass", "viaduct", "river"):
        assert "line" in by[name].kinds and by[name].buffer_m.line > 0
    for name in ("tower", "helipad", "toll_booth", "wind_farm", "swimming_pool"):
        assert "point" in by[name].kinds and by[name].buffer_m.point > 0
    assert by["tunnel_opening"].line_as == "ends" and by["tunnel_opening"].buffer_m.point > 0


def test_reference_split_is_selectable(tmp_path, raw):
    p = load_mutated(tmp_path, raw, lambda d: d["splits"].update(scheme="reference"))
    assert p.split_of("CO") == "val" and p.split_of("WA") == "train"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(colour="red"), "colour: unknown key"),
    (lambda d: d["geometry"].update(tile_pxx=3), "geometry.tile_pxx: unknown key"),
    (lambda d: d["concepts"][3].pop("rule"), "concepts.3.rule"),
    (lambda d: d["imagery"]["naip"].update(start="2022-13-45"), "imagery.naip.start"),
    (lambda d: d["qc"].update(max_black_ratio=-0.1), "qc.max_black_ratio"),
    (lambda d: d["geometry"].update(max_overlap=-1), "geometry.max_overlap"),
    (lambda d: d["regions"]["CA"].update(target=-5), "regions.CA.target"),
    (lambda d: d["splits"].update(scheme="nope"), "splits"),
    (lambda d: d["concepts"][0].update(rule={"any": []}), "concepts.0.rule"),
    (lambda d: d["concepts"][56].update(buffer_m={}), "concepts.56"),
    (lambda d: d["imagery"]["s2"].update(scl_mask=[0, 12]), "imagery.s2.scl_mask"),
])
def test_bad_values_give_one_error_naming_the_field(tmp_path, raw, mutate, field):
    with pytest.raises(ProfileError) as e:
        load_mutated(tmp_path, raw, mutate)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("profile p.yaml: ")
    assert field in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ProfileError, match="no such file"):
        prof.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        prof.load(bad)


def test_hash_is_stable_and_tracks_sections(tmp_path, raw):
    a, b = prof.load(), prof.load()
    assert a.hash() == b.hash() and a.section_hash("geometry") == b.section_hash("geometry")
    c = load_mutated(tmp_path, raw, lambda d: d["geometry"].update(max_overlap=0.1))
    assert c.hash() != a.hash()
    assert c.section_hash("geometry") != a.section_hash("geometry")
    assert c.section_hash("concepts") == a.section_hash("concepts")


def test_select_regions_and_pbf_sources(tmp_path, raw):
    p = prof.load()
    assert p.select_regions(None) == sorted(FACT_TARGETS)
    assert p.select_regions("tx, ca") == ["CA", "TX"]
    with pytest.raises(ProfileError, match="unknown state ZZ"):
        p.select_regions("CA,ZZ")
    for empty in ("", ",", " , ", []):  # an unset shell variable must not mean "all 11 states"
        with pytest.raises(ProfileError, match="names no state"):
            p.select_regions(empty)
    assert p.pbf_source("CA") == "https://download.geofabrik.de/north-america/us/california-240101.osm.pbf"
    q = load_mutated(tmp_path, raw, lambda d: d["regions"]["ME"].update(pbf="osm/me.pbf"))
    assert q.pbf_source("ME") == str((tmp_path / "osm" / "me.pbf").resolve())


def test_select_concepts_names_case_spaces_and_suggestions():
    p = prof.load()
    assert p.select_concepts(None) is None
    assert p.select_concepts("tennis") == [0]
    # case, surrounding space, spaces or hyphens for _, repeats: the same subset, sorted ids
    assert p.select_concepts(" Swimming Pool,TENNIS , swimming-pool") == [0, 3]
    assert p.select_concepts(["wind_farm", "tennis"]) == [0, 19]
    with pytest.raises(ProfileError) as e:
        p.select_concepts("swiming_pool")
    assert str(e.value) == "unknown concept 'swiming_pool' (did you mean: swimming_pool?)"
    with pytest.raises(ProfileError) as e:
        p.select_concepts("tennis,parking lots,zzzqqq")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unknown concepts 'parking_lots' (did you mean: parking_lot")
    assert "'zzzqqq' (no close match among the profile's 66 concept names)" in msg
    for empty in ("", ",", " , ", []):  # an unset shell variable must not mean "every scene"
        with pytest.raises(ProfileError, match="names no concept"):
            p.select_concepts(empty)


def test_dump_roundtrip(tmp_path):
    p = prof.load()
    prof.dump(p, tmp_path / "out.yaml")
    q = prof.load(tmp_path / "out.yaml")
    assert q.hash() == p.hash()


def test_the_sample_format_has_the_default_profiles_geometry():
    """gl10m.samples holds the grid constants every other module (loader, verify, model) uses;
    they are the default profile's geometry."""
    from gl10m import samples
    from gl10m import profile as profile_mod

    g = profile_mod.load().geometry
    assert (samples.GRID, samples.N_TILES, samples.TILE_PX) == (g.grid, g.grid * g.grid, g.tile_px)
    assert samples.TILE_PX == g.lr_px and g.hr_px == samples.GRID * samples.TILE_PX
