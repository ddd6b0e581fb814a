"""samples: the format round trip, byte-identical rewrites, partial tile decoding, atomic staging,
one-line errors for bad samples."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gl10m import samples
from gl10m.samples import Sample, SampleError
from tests.fixtures.samples import make_sample as fixture_sample


def make_sample(key="CA-000042", split="train", seed=0) -> Sample:
    return fixture_sample(key, split, seed, look="waves")


@pytest.fixture(scope="module")
def sample():
    return make_sample()


@pytest.fixture(scope="module")
def staged(sample, tmp_path_factory):
    w = tmp_path_factory.mktemp("W")
    return w, samples.write_staged(w, sample)


def test_staged_folder_holds_exactly_the_fields(staged):
    w, path = staged
    assert path == w / "staged" / "train" / "CA-000042"
    assert sorted(p.name for p in path.iterdir()) == sorted(samples.FIELDS)
    assert len(samples.FIELDS) == 104 and "hr_00.jpg" in samples.FIELDS and "hr_99.jpg" in samples.FIELDS
    assert [p.name for p in path.parent.iterdir()] == ["CA-000042"]  # no temp folder left


def test_round_trip(staged, sample):
    _, path = staged
    s = samples.read_staged(path)
    assert (s.key, s.split) == (sample.key, sample.split)
    assert np.array_equal(s.lr, sample.lr)  # PNG is lossless
    assert s.hr.shape == (100, 268, 268, 3)
    assert np.abs(s.hr.astype(int) - sample.hr).mean() < 1.5  # JPEG q95
    assert s.labels.dtype == np.uint8 and s.labels.tolist() == sample.labels.tolist()
    assert s.tile_frac.dtype == np.float16 and np.array_equal(s.tile_frac, sample.tile_frac)
    assert s.tile_frac[99, 65] == np.float16(1 / 3)
    assert s.meta["s2"] == sample.meta["s2"] and s.meta["key"] == "CA-000042"
    np.load(path / "labels.npy", allow_pickle=False)


def test_rewrite_is_byte_identical(staged, sample, tmp_path):
    _, path = staged
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    again = samples.write_staged(tmp_path, make_sample())  # rebuilt from scratch, another root
    assert {p.name: p.read_bytes() for p in again.iterdir()} == before
    samples.write_staged(tmp_path, make_sample())  # over an existing sample
    assert {p.name: p.read_bytes() for p in again.iterdir()} == before


def test_meta_json_is_sorted_and_stable(staged):
    _, path = staged
    text = (path / "meta.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=1) + "\n"


def test_partial_decode_equals_full_decode(staged):
    _, path = staged
    full = samples.read_staged(path)
    pick = [57, 0, 99, 12]
    part = samples.read_staged(path, tiles=pick)
    assert part.tiles == tuple(pick) and part.hr.shape == (4, 268, 268, 3)
    for j, i in enumerate(pick):
        assert np.array_equal(part.hr[j], full.hr[i])
    fields = samples.read_fields(path, [samples.hr_field(i) for i in pick] + ["lr.png", "labels.npy",
                                                                              "tile_frac.npy", "meta.json"])
    assert np.array_equal(samples.decode_sample(fields, tiles=pick).hr, part.hr)
    with pytest.raises(SampleError, match="missing field"):
        samples.decode_sample(fields, tiles=[1])


def test_encode_fields_are_what_is_on_disk(staged, sample):
    _, path = staged
    fields = samples.encode_sample(make_sample())
    assert list(fields) == list(samples.FIELDS)
    assert all(fields[n] == (path / n).read_bytes() for n in fields)


def test_failed_swap_keeps_the_old_sample(staged, tmp_path, monkeypatch):
    path = samples.write_staged(tmp_path, make_sample())
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_rename = os.rename

    def flaky(src, dst):
        if str(src).endswith(".tmp") and not str(src).endswith(".old.tmp") and str(dst) == str(path):
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="disk full"):
        samples.write_staged(tmp_path, make_sample(seed=1))
    monkeypatch.setattr(os, "rename", real_rename)
    # the previous sample is back in place, complete, and no temp folder is left behind
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_clean_staged_temp(tmp_path):
    d = tmp_path / "staged" / "val" / ".CA-1.abcd.tmp"
    d.mkdir(parents=True)
    (d / "lr.png").write_bytes(b"x")
    assert samples.clean_staged_temp(tmp_path) == 1 and not d.exists()


@pytest.mark.parametrize("change, match", [
    (dict(key="CA-1.5"), "no dots"),
    (dict(split="holdout"), "split"),
    (dict(lr=np.zeros((268, 268), np.uint8)), "lr.png"),
    (dict(hr=np.zeros((99, 268, 268, 3), np.uint8)), "hr is"),
    (dict(meta={"href": "https://x.blob.core.windows.net/naip/a.tif?sv=2021&sig=SECRET"}), "signed href"),
    (dict(meta={"x": float("nan")}), "meta.json"),
])
def test_bad_sample_is_one_line_error(sample, tmp_path, change, match):
    bad = Sample(**{**sample.__dict__, **change})
    with pytest.raises(SampleError, match=match):
        samples.write_staged(tmp_path, bad)
    assert not (tmp_path / "staged").exists() or not any((tmp_path / "staged").rglob("*.jpg"))


def test_incomplete_folder_is_rejected(staged, tmp_path):
    _, path = staged
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in path.iterdir():
        if p.name != "hr_42.jpg":
            (broken / p.name).write_bytes(p.read_bytes())
    with pytest.raises(SampleError, match="missing hr_42.jpg"):
        samples.read_staged(broken)
    with pytest.raises(SampleError, match="does not exist"):
        samples.read_staged(tmp_path / "nope")


def test_row_helpers_validate():
    with pytest.raises(SampleError, match="outside 0..65"):
        samples.labels_from_concepts([66], 66)
    with pytest.raises(SampleError, match="lengths differ"):
        samples.dense_tile_frac([0], [1, 2], [0.5], 66)
    with pytest.raises(SampleError, match="outside 100 tiles"):
        samples.dense_tile_frac([100], [1], [0.5], 66)
