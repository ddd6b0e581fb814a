"""`gl10m export` and the georeferencing readers on real shards (gl10m.shards.build of samples
whose meta.json carries the georef block gl10m.geometry.georef_meta writes): GeoTIFFs at the
right place with the sample's pixels, dry runs, one-line errors, nothing half-written, the
loader's georef fields, and verify catching a georef that disagrees with the footprint.

The same checks on samples of the real pipeline (STAC, Earth Engine, the model-scale world) are
in test_pipeline_download.py, test_sources_earthengine.py, test_testbed_scenes.py and
test_fetch.py (placement against the analytic truth the imagery was rendered from)."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest

from gl10m import compose, geometry, samples as smp, shards
from gl10m.export import export_sample, parse_tiles
from tests.fixtures.samples import make_sample

BOUNDS = [(-117.0, 34.0, -116.976, 34.024), (-95.5123, 41.25, -95.4883, 41.274), (-70.01, 44.9, -69.986, 44.924)]


def _meta(key, bounds):
    lr, hr = compose.footprint_grid(bounds, 268), compose.footprint_grid(bounds, 2680)
    return {"key": key, "state": "CA", "footprint": dict(zip(("west", "south", "east", "north"), bounds)),
            "crs": "EPSG:4326", "georef": geometry.georef_meta(lr, hr, 10)}


def _build(root: Path, metas: dict[str, dict], look="ramp") -> Path:
    entries = []
    for i, (key, meta) in enumerate(metas.items()):
        s = make_sample(key, "train", i, look=look, meta=meta)
        entries.append(shards.Entry(key, "train", "CA", smp.write_staged(root, s)))
    out = root / "shards"
    shards.build(entries, out, max_bytes=2_500_000)
    return out


@pytest.fixture(scope="module")
def georef_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("georef")
    return _build(root, {f"CA-g{i}": _meta(f"CA-g{i}", b) for i, b in enumerate(BOUNDS)})


def _sample(shards_dir, key):
    from gl10m import inspect as insp

    return insp.load_sample(shards_dir, key, tiles="all")


def _cli(capsys, *args) -> tuple[int, str, str]:
    from gl10m.cli import main

    try:
        main([str(a) for a in args])
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
    o, e = capsys.readouterr()
    return rc, o, e


@pytest.mark.parametrize("i", range(len(BOUNDS)))
def test_export_writes_geotiffs_at_the_footprint_with_the_samples_pixels(georef_shards, tmp_path, i):
    import rasterio

    key = f"CA-g{i}"
    w, s, e, n = BOUNDS[i]
    res = export_sample(georef_shards, key, tmp_path, tiles=[0, 9, 45, 90, 99])
    assert res.folder == tmp_path / key
    assert [p.name for p in res.paths] == ["lr.tif", "hr_00.tif", "hr_09.tif", "hr_45.tif", "hr_90.tif", "hr_99.tif"]
    assert sorted(p.name for p in res.folder.iterdir()) == sorted(p.name for p in res.paths)  # no temp files
    sample = _sample(georef_shards, key)
    with rasterio.open(res.folder / "lr.tif") as d:
        assert d.crs.to_epsg() == 4326 and (d.width, d.height, d.count) == (268, 268, 3)
        assert tuple(d.bounds) == pytest.approx((w, s, e, n), abs=1e-12)
        assert d.profile["compress"] == "deflate" and [c.name for c in d.colorinterp] == ["red", "green", "blue"]
        np.testing.assert_array_equal(d.read().transpose(1, 2, 0), sample.lr)
    tw, th = (e - w) / 10, (n - s) / 10
    for t in (0, 9, 45, 90, 99):
        r, c = divmod(t, 10)
        with rasterio.open(res.folder / f"hr_{t:02d}.tif") as d:
            assert d.crs.to_epsg() == 4326 and (d.width, d.height) == (268, 268)
            # tile (r, c): row r from the north, column c from the west
            assert tuple(d.bounds) == pytest.approx((w + c * tw, n - (r + 1) * th, w + (c + 1) * tw, n - r * th),
                                                    abs=1e-12)
            assert d.tags()["gl10m_tile"] == str(t)
            img = d.read().transpose(1, 2, 0)
            np.testing.assert_array_equal(img, sample.hr[t])
            assert abs(float(img[..., 1].mean()) - 2 * t) < 2  # the ramp look: each tile's green tells its index


def test_export_all_is_byte_identical_twice_and_dry_run_writes_nothing(georef_shards, tmp_path, capsys):
    a = export_sample(georef_shards, "CA-g1", tmp_path / "a")
    assert len(a.paths) == 101 and {p.name for p in a.folder.iterdir()} == {p.name for p in a.paths}
    b = export_sample(georef_shards, "CA-g1", tmp_path / "b", tiles=[0, 57, 99])
    assert len(b.paths) == 4
    for p in b.paths:
        assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256((a.folder / p.name).read_bytes()).digest()
    export_sample(georef_shards, "CA-g1", tmp_path / "a", tiles=[3])  # again over existing files: replaced whole
    assert {p.name for p in a.folder.iterdir()} == {p.name for p in a.paths}

    rc, out, err = _cli(capsys, "export", "CA-g2", "--shards", georef_shards, "--out", tmp_path / "dry",
                        "--tiles", "5,0,5", "--no-lr", "--dry-run")
    assert rc == 0, err
    assert str(tmp_path / "dry" / "CA-g2" / "hr_05.tif") in out and "hr_00.tif" in out and "lr.tif" not in out
    assert "would write 2 files" in out
    assert not (tmp_path / "dry").exists()
    rc, out, err = _cli(capsys, "export", "CA-g2", "--shards", georef_shards, "--out", tmp_path / "c", "--tiles", "7")
    assert rc == 0 and sorted(p.name for p in (tmp_path / "c" / "CA-g2").iterdir()) == ["hr_07.tif", "lr.tif"]


def test_export_errors_are_one_line_and_exit_2(georef_shards, tmp_path, capsys):
    cases = [
        (("CA-nope",), "unknown sample key 'CA-nope'"),
        (("CA-g1", "--tiles", "1,100"), "tile index 100 is outside 0..99"),
        (("CA-g1", "--tiles", "one"), "--tiles must be 'all' or comma-separated"),
        (("CA-g1", "--tiles", "", "--no-lr"), "nothing to export"),
    ]
    for args, msg in cases:
        rc, out, err = _cli(capsys, "export", *args, "--shards", georef_shards, "--out", tmp_path / "x")
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    rc, _, err = _cli(capsys, "export", "CA-g1", "--shards", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert rc == 2 and "no such shards folder" in err
    assert not (tmp_path / "x").exists()
    assert parse_tiles("all") == list(range(100)) and parse_tiles("3, 1,3") == [3, 1]


def test_missing_shard_and_samples_without_georef_are_one_line_errors(tmp_path, capsys):
    import shutil

    plain = _build(tmp_path / "plain", {"CA-p0": make_sample("CA-p0").meta})  # a hand-made meta: no georef
    rc, _, err = _cli(capsys, "export", "CA-p0", "--shards", plain, "--out", tmp_path / "x")
    assert rc == 2 and "cannot georeference" in err and "no georef" in err
    other = tmp_path / "moved"
    shutil.copytree(_build(tmp_path / "g", {"CA-g0": _meta("CA-g0", BOUNDS[0])}), other)
    for tar in other.glob("*/*.tar"):
        tar.unlink()
    rc, _, err = _cli(capsys, "export", "CA-g0", "--shards", other, "--out", tmp_path / "x")
    assert rc == 2 and "is missing" in err and len(err.strip().splitlines()) == 1


def test_a_bad_tile_stops_the_export_with_whole_files_only(tmp_path, capsys):
    """A tile that does not decode: exit 2 naming it; the files before it are complete GeoTIFFs,
    it and the ones after it are absent, and no temp file is left."""
    import rasterio

    out = _build(tmp_path, {"CA-g0": _meta("CA-g0", BOUNDS[0])})
    idx = shards.read_index(out / shards.INDEX_NAME).iloc[0]
    fields = list(idx["fields"])
    j = fields.index(smp.hr_field(5))
    tar = out / idx["split"] / idx["shard"]
    with open(tar, "r+b") as f:  # garbage in place of hr_05.jpg's bytes (same size: the index still fits)
        f.seek(int(idx["offsets"][j]))
        f.write(b"\x00" * int(idx["sizes"][j]))
    rc, _, err = _cli(capsys, "export", "CA-g0", "--shards", out, "--out", tmp_path / "x")
    assert rc == 2 and "hr_05.jpg does not decode" in err and len(err.strip().splitlines()) == 1
    got = sorted(p.name for p in (tmp_path / "x" / "CA-g0").iterdir())
    assert got == ["hr_00.tif", "hr_01.tif", "hr_02.tif", "hr_03.tif", "hr_04.tif", "lr.tif"]
    for name in got:
        with rasterio.open(tmp_path / "x" / "CA-g0" / name) as d:
            assert d.read().shape == (3, 268, 268)


def test_loader_returns_georef_for_the_returned_tiles(georef_shards):
    from gl10m import data

    seen = 0
    for s in data.load(georef_shards, "train", tiles=[99, 0, 45], georef=True, decode_meta=False):
        i = int(s["key"].split("g")[1])
        w, so, e, n = BOUNDS[i]
        assert "meta" not in s and s["crs"] == "EPSG:4326"
        assert s["bounds"].tolist() == pytest.approx([w, so, e, n], abs=1e-12)
        assert s["transform"].tolist() == pytest.approx([w, (e - w) / 268, 0, n, 0, (so - n) / 268], abs=1e-15)
        assert tuple(s["tile_transform"].shape) == (3, 6) and tuple(s["tile_bounds"].shape) == (3, 4)
        assert s["tile_bounds"][1].tolist() == pytest.approx([w, n - (n - so) / 10, w + (e - w) / 10, n], abs=1e-12)
        assert s["tile_bounds"][0].tolist() == pytest.approx([e - (e - w) / 10, so, e, so + (n - so) / 10], abs=1e-12)
        seen += 1
    assert seen == len(BOUNDS)
    plain = next(iter(data.load(georef_shards, "train", tiles=[0])))
    assert "crs" not in plain and "tile_transform" not in plain


def test_loader_georef_without_a_georef_block_is_a_loader_error(tmp_path):
    from gl10m import data

    out = _build(tmp_path, {"CA-p0": make_sample("CA-p0").meta})
    with pytest.raises(data.LoaderError, match="georef=True but meta.json has no georef"):
        next(iter(data.load(out, "train", georef=True)))


def test_verify_rejects_a_georef_that_disagrees_with_the_footprint(tmp_path, capsys):
    good = _meta("CA-g0", BOUNDS[0])
    assert shards.verify(_build(tmp_path / "ok", {"CA-g0": good}))["samples"] == 1
    moved = copy.deepcopy(good)
    moved["georef"]["hr"]["transform"][3] -= 0.0024  # every tile one row south of where the footprint says
    bad = _build(tmp_path / "bad", {"CA-g0": moved})
    with pytest.raises(shards.VerifyError, match="georef hr transform covers"):
        shards.verify(bad)
    rc, _, err = _cli(capsys, "verify", bad)
    assert rc == 2 and "CA-g0" in err and "georef" in err
    # shards built before samples carried georef are valid, only not georeferenced: verify passes them
    missing = {k: v for k, v in good.items() if k != "georef"}
    assert shards.verify(_build(tmp_path / "missing", {"CA-g0": missing}), decode=False)["samples"] == 1
    broken = copy.deepcopy(good)
    del broken["georef"]["tiles"]
    with pytest.raises(shards.VerifyError, match="georef"):
        shards.verify(_build(tmp_path / "broken", {"CA-g0": broken}), decode=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cards_recipe_gives_every_tiles_transform_from_meta_json_alone(seed):
    """The dataset card's snippet (plain Python on the parsed meta.json, no gl10m) gives the same
    transform as gl10m.geometry.tile_transform for every tile, and those tile the footprint."""
    import json
    import re

    from gl10m import card

    text = "\n".join(card.georef_section())
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    rng = np.random.default_rng(seed)
    lon, lat = rng.uniform(-125, -67), rng.uniform(24, 49)
    b = (lon - 0.012, lat - 0.012, lon + 0.012, lat + 0.012)
    meta = json.loads(smp.encode_meta(_meta("CA-x", b)))  # as a reader gets it: through JSON
    want = geometry.tile_bounds([b], 10)[0]
    for i in range(100):
        ns = {"meta": meta, "i": i}
        exec(code, {}, ns)  # noqa: S102 - the card's own snippet
        gt = ns["tile_gt"]
        assert gt == geometry.tile_transform(meta, i)
        np.testing.assert_allclose(geometry.transform_bounds(gt, 268, 268), want[i], rtol=0, atol=1e-12)
