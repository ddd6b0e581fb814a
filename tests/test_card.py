"""The dataset card: README.md sections, counts equal to the index, valid plots, determinism."""
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from gl10m import card
from gl10m import profile as prof_mod
from gl10m import shards
from gl10m.errors import UserError
from tests.test_inspect import make_shards

SECTIONS = ["## At a glance", "## How it was built", "## Samples per split and state", "## Sample schema",
            "## Concepts", "## Quality control", "## Examples", "## Loading", "## Licences and attribution"]


@pytest.fixture(scope="module")
def profile():
    return prof_mod.load()


@pytest.fixture(scope="module")
def written(tmp_path_factory, profile):
    root, made = make_shards(tmp_path_factory.mktemp("card"))
    readme = card.write_card(root, profile, n_examples=2)
    first = {p.name: p.read_bytes() for p in (root / "card").glob("*.png")}
    return root, made, readme, readme.read_text(), first


def _table_after(text, heading_re):
    """Rows (lists of cells) of the first markdown table after the line matching heading_re."""
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if re.match(heading_re, ln))
    while not lines[i].startswith("|"):
        i += 1
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return header, rows


def test_card_has_every_section_and_valid_plots(written):
    root, made, readme, text, _ = written
    assert readme == root / "README.md"
    pos = [text.index(s) for s in SECTIONS]
    assert pos == sorted(pos)
    names = sorted(p.name for p in (root / "card").glob("*.png"))
    assert names == ["example_0.png", "example_1.png", "label_frequency.png", "qc.png"]
    for n in names:
        assert f"](card/{n})" in text
        with Image.open(root / "card" / n) as im:
            im.verify()
        with Image.open(root / "card" / n) as im:
            assert im.format == "PNG" and min(im.size) > 300
            px = np.asarray(im.convert("L"))
            assert px.std() > 5  # something is drawn
    for field in ["`lr.png`", "`hr_00.jpg` .. `hr_99.jpg`", "`labels.npy`", "`tile_frac.npy`", "`meta.json`"]:
        assert field in text
    assert "row*10 + col" in text and "row 0 = north" in text
    assert "uint8" in text and "float16" in text and "[100, 66]" in text


def test_card_names_licences_and_provenance(written, profile):
    root, _, _, text, _ = written
    assert "OpenStreetMap contributors" in text and "ODbL" in text and "1.0" in text
    assert "NAIP" in text and "public domain" in text.lower() and "FSA" in text
    assert "Contains modified Copernicus Sentinel data [2023]" in text
    assert f"`{profile.name}` version {profile.version}" in text
    assert "gl10m 0.1.0" in text and "0123456789abcdef" in text
    assert "Imagery provider(s): stac" in text
    assert "webdataset" in text and "load_dataset(\"webdataset\"" in text


def test_card_counts_equal_the_index(written, profile):
    root, made, _, text, _ = written
    idx = shards.read_index(root / "index.parquet")
    header, rows = _table_after(text, r"^## Concepts")
    assert header[:3] == ["id", "name", "label"] and header[-2] == "GL-10M count"
    splits = header[3:header.index("total")]
    assert splits == ["train", "val", "test"]
    assert len(rows) == profile.n_concepts
    labels = {s: np.stack([np.asarray(x, int) for x in idx.loc[idx["split"] == s, "labels"]]).sum(0) for s in splits}
    for r in rows:
        c = int(r[0])
        assert r[1] == f"`{profile.concepts[c].name}`"
        got = [int(v) for v in r[3:3 + len(splits)]]
        assert got == [int(labels[s][c]) for s in splits]
        assert int(r[3 + len(splits)]) == sum(got)
        assert r[-2].replace(",", "") == str(profile.concepts[c].count)
    _, glance = _table_after(text, r"^## At a glance")
    samples = dict(zip(["train", "val", "test", "total"], [int(v) for v in glance[0][1:]]))
    assert samples == {"train": 4, "val": 2, "test": 2, "total": len(idx)}
    _, per_state = _table_after(text, r"^## Samples per split and state")
    got = {(r[0], r[1]): int(r[3]) for r in per_state}
    want = idx.groupby(["split", "state"]).size().to_dict()
    assert got == {k: int(v) for k, v in want.items()}


def test_qc_table_skips_missing_keys_and_matches_meta(written):
    root, made, _, text, _ = written
    _, rows = _table_after(text, r"^QC statistics from")
    by = {r[0]: r for r in rows}
    with_qc = [s for s in made.values() if "qc" in s.meta]
    assert len(with_qc) == len(made) - 1  # the fixture has one sample without qc/s2
    lr = [s.meta["qc"]["lr_black_ratio"] for s in with_qc]
    assert int(by["LR black ratio"][1]) == len(lr)
    assert float(by["LR black ratio"][5]) == pytest.approx(max(lr), rel=1e-3)
    assert int(by["NAIP year"][1]) == len(made)  # naip present in every sample
    modes = {"aligned": 0, "fallback": 0}
    for s in with_qc:
        modes[s.meta["s2"]["window"]] += 1
    assert by["S2 window mode"][2] == f"aligned: {modes['aligned']}, fallback: {modes['fallback']}"
    vals = card.qc_values([("k", {"split": "train", "naip": {"year": 2023}})])
    assert list(vals) == ["NAIP year"] and vals["NAIP year"] == {"train": ["2023"]}


def test_rewrite_is_identical_and_drops_stale_examples(written, profile):
    root, _, readme, text, first = written
    card.write_card(root, profile, n_examples=2)
    assert readme.read_text() == text
    for name, data in first.items():
        assert (root / "card" / name).read_bytes() == data, name
    card.write_card(root, profile, n_examples=1, max_qc_samples=3)
    assert not (root / "card" / "example_1.png").exists()
    assert (root / "card" / "example_0.png").read_bytes() == first["example_0.png"]
    assert "QC statistics from the samples' `meta.json` (3 of 8 samples" in readme.read_text()


def test_bad_inputs_are_user_errors(written, profile, tmp_path):
    root, *_ = written
    with pytest.raises(UserError, match="no such shards folder"):
        card.write_card(tmp_path / "missing", profile)
    small = profile.model_copy(update={"concepts": profile.concepts[:10]})
    copy = tmp_path / "s"
    shutil.copytree(root, copy)
    with pytest.raises(UserError, match="66 labels but profile .* has 10 concepts"):
        card.write_card(copy, small)


def test_an_empty_build_gets_a_card_that_says_so(profile, tmp_path):
    out = tmp_path / "shards"
    shards.build([], out)
    (out / "card").mkdir()
    (out / "card" / "qc.png").write_bytes(b"stale")
    readme = card.write_card(out, profile)
    assert "holds no samples" in readme.read_text()
    assert not list((out / "card").glob("*.png"))


def test_anchor_and_pbf_wording_follows_the_profile(tmp_path, profile):
    """Anchors are points on the surface (not centroids); the OSM source is what the profile says:
    dated Geofabrik extracts for gl10m-66, the PBF files it names for a profile that pins them."""
    text = card.write_card(make_shards(tmp_path / "a")[0], profile, n_examples=1).read_text()
    assert "point on the surface" in text and "centroid" not in text.replace("unlike a centroid", "")
    assert "geofabrik" in text.lower() and "PBF files the profile names" not in text
    regions = {k: r.model_copy(update={"pbf": f"osm/{k}.osm.pbf"}) for k, r in profile.regions.items()}
    pinned = profile.model_copy(update={"regions": regions})
    text = card.write_card(make_shards(tmp_path / "b")[0], pinned, n_examples=1).read_text()
    assert "PBF files the profile names" in text and "-osm.pbf`" not in text
    assert "<state>-" not in text
