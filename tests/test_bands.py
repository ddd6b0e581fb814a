"""imagery.bands (rgb / rgbn / raw): the extra members' codec, the profile hash, the loader's
``bands=``, verify, the testbed's B08 and plain webdataset / HF ``datasets`` reading them.

The end-to-end runs over the served testbed (values against the truth it was rendered from,
rgb byte-identical to main) are in tests/test_bands_e2e.py."""
import io

import numpy as np
import pytest

from gl10m import profile as prof
from gl10m import samples as smp
from gl10m import shards
from tests.fixtures.samples import make_sample


def _with_bands(s: smp.Sample, bands: str, seed: int) -> smp.Sample:
    """`s` with random extra bands of mode `bands` (smooth ramps, so they compress like imagery)."""
    rng = np.random.default_rng(seed)
    _, lc, ld, hc, hd, _, _ = smp.EXTRA[bands]
    yy, xx = np.mgrid[0:smp.TILE_PX, 0:smp.TILE_PX]
    lr = np.stack([(xx * (7 + c) + yy * 3 + rng.integers(0, 9, xx.shape)) % 4000 for c in range(lc)], -1)
    hr = np.stack([np.stack([(xx + yy * (c + 1) + t) % 250 for c in range(hc)], -1) for t in range(smp.N_TILES)])
    s.bands, s.lr_extra, s.hr_extra = bands, lr.astype(ld), hr.astype(hd)
    return s


def _shards(tmp_path, bands: str, n: int = 3):
    entries = []
    for i in range(n):
        key = f"CA-b{i}"
        s = _with_bands(make_sample(key, "train", i), bands, i) if bands != "rgb" else make_sample(key, "train", i)
        entries.append(shards.Entry(key, "train", "CA", smp.write_staged(tmp_path / "w", s)))
    out = tmp_path / "shards"
    shards.build(entries, out, max_bytes=1_500_000)
    return out


# -- the codec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bands,seed", [("rgbn", 0), ("raw", 1), ("raw", 7)])
def test_extra_members_round_trip_losslessly_and_byte_identically(bands, seed):
    s = _with_bands(make_sample("CA-x1", "train", seed), bands, seed)
    a, b = smp.encode_sample(s), smp.encode_sample(s)
    assert a == b  # fixed zip timestamps: the same arrays give the same bytes
    assert list(a) == list(smp.fields_for(bands)) and len(a) == len(smp.FIELDS) + 1 + smp.N_TILES
    name = smp.EXTRA[bands][0]
    assert smp.lr_extra_field(bands) == f"lr_{name}.npz" and smp.hr_extra_field(7, bands) == f"hr_07_{name}.npz"
    assert smp.bands_of(a) == bands and smp.bands_of(smp.FIELDS) == "rgb"
    got = smp.decode_sample(a, tiles=[3, 99])
    assert np.array_equal(got.lr_extra, s.lr_extra) and np.array_equal(got.hr_extra, s.hr_extra[[3, 99]])
    assert got.lr_extra.dtype == np.uint16 and got.hr_extra.dtype == np.uint8
    # plain numpy reads it, and it is compressed
    z = np.load(io.BytesIO(a[smp.lr_extra_field(bands)]), allow_pickle=False)
    assert z.files == [name] and np.array_equal(z[name], s.lr_extra)
    assert len(a[smp.hr_extra_field(0, bands)]) < s.hr_extra[0].nbytes


def test_rgb_samples_have_no_extra_member_and_bad_extras_are_refused():
    s = make_sample("CA-x2", "train", 3)
    assert list(smp.encode_sample(s)) == list(smp.FIELDS)
    s.bands = "rgbn"
    with pytest.raises(smp.SampleError, match="needs lr_extra and hr_extra"):
        smp.encode_sample(s)
    _with_bands(s, "rgbn", 3)
    s.lr_extra = s.lr_extra.astype(np.uint8)
    with pytest.raises(smp.SampleError, match="expected uint16"):
        smp.encode_sample(s)
    with pytest.raises(smp.SampleError, match="bands must be one of"):
        smp.fields_for("rgbnir")
    with pytest.raises(smp.SampleError, match="not a plain .npz"):
        smp.decode_extra(b"not a zip", "raw", lr=True)


def test_staged_folders_hold_the_extra_members(tmp_path):
    s = _with_bands(make_sample("CA-x3", "train", 4), "raw", 4)
    path = smp.write_staged(tmp_path, s)
    assert sorted(p.name for p in path.iterdir()) == sorted(smp.fields_for("raw"))
    got = smp.read_staged(path, tiles=[5])
    assert got.bands == "raw" and np.array_equal(got.hr_extra[0], s.hr_extra[5])
    (path / smp.hr_extra_field(42, "raw")).unlink()
    with pytest.raises(smp.SampleError, match="not a complete sample"):
        smp.read_fields(path)


# -- the profile ----------------------------------------------------------------------------------
MAIN_PROFILE_HASH = "717f414cff039d0b"  # gl10m-66.yaml's hash on main before imagery.bands existed
MAIN_IMAGERY_HASH = "7d2ebd129d1a908c"  # its section_hash("imagery") there


def test_profile_hash_changes_only_when_bands_is_not_rgb():
    p = prof.load()
    assert p.imagery.bands == "rgb"
    assert p.hash() == MAIN_PROFILE_HASH and p.section_hash("imagery") == MAIN_IMAGERY_HASH
    d = p.model_dump(mode="json", exclude={"source"})
    assert "bands" not in d["imagery"]
    d["imagery"]["bands"] = "rgb"
    assert prof.from_dict(d).hash() == MAIN_PROFILE_HASH  # stated or not: the same
    hashes = {}
    for b in ("rgbn", "raw"):
        d["imagery"]["bands"] = b
        q = prof.from_dict(d)
        assert q.imagery.bands == b and q.model_dump(mode="json")["imagery"]["bands"] == b
        hashes[b] = q.hash()
    assert len({MAIN_PROFILE_HASH, *hashes.values()}) == 3
    d["imagery"]["bands"] = "nir"
    with pytest.raises(prof.ProfileError, match="imagery.bands"):
        prof.from_dict(d)


# -- shards, verify and the loader ---------------------------------------------------------------------
@pytest.mark.parametrize("bands", ["rgbn", "raw"])
def test_loader_returns_the_extra_bands_on_request(tmp_path, bands):
    torch = pytest.importorskip("torch")
    from gl10m import data

    out = _shards(tmp_path, bands)
    assert shards.verify(out)["samples"] == 3
    idx = shards.read_index(out / shards.INDEX_NAME)
    assert all(len(f) == len(smp.fields_for(bands)) for f in idx["fields"])
    want = {f"CA-b{i}": _with_bands(make_sample(f"CA-b{i}", "train", i), bands, i) for i in range(3)}
    for stream in (False, True):  # by offset (the index), and streamed (a shard list without it)
        src = out if not stream else sorted(str(p) for p in (out / "train").glob("*.tar"))
        kw = {} if not stream else {"index": None}
        ds = data.load(src, "train", tiles=[0, 57], bands=bands, **kw) if not stream else \
            data.load([f"file://{p}" for p in src], "train", tiles=[0, 57], bands=bands)
        got = list(ds)
        assert sorted(g["key"] for g in got) == sorted(want)
        for g in got:
            w = want[g["key"]]
            assert g["lr_extra"].dtype == torch.int32 and tuple(g["lr_extra"].shape) == (w.lr_extra.shape[2], 268, 268)
            assert np.array_equal(g["lr_extra"].permute(1, 2, 0).numpy(), w.lr_extra.astype(np.int32))
            assert np.array_equal(g["hr_extra"].permute(0, 2, 3, 1).numpy(), w.hr_extra[[0, 57]])
        b = data.collate(got[:2])
        assert tuple(b["hr_extra"].shape) == (2, 2, w.hr_extra.shape[3], 268, 268)
    plain = next(iter(data.load(out, "train", tiles=[1])))
    assert "lr_extra" not in plain and "hr_extra" not in plain


def test_rgbn_reads_from_raw_shards_and_missing_bands_are_one_line_errors(tmp_path):
    pytest.importorskip("torch")
    from gl10m import data

    raw = _shards(tmp_path / "raw", "raw", 2)
    g = next(iter(data.load(raw, "train", tiles=[4], bands="rgbn")))
    w = _with_bands(make_sample(g["key"], "train", int(g["key"][-1])), "raw", int(g["key"][-1]))
    assert np.array_equal(g["hr_extra"][0, 0].numpy(), w.hr_extra[4, :, :, 3])  # the N band
    rgb = _shards(tmp_path / "rgb", "rgb", 2)
    with pytest.raises(data.LoaderError, match=r"bands='raw' asked for, but these shards hold no extra bands") as e:
        data.load(rgb, "train", bands="raw")
    assert "\n" not in str(e.value)
    with pytest.raises(data.LoaderError, match="bands='raw' asked for, but these shards hold bands 'rgbn'"):
        data.load(_shards(tmp_path / "n", "rgbn", 1), "train", bands="raw")
    tars = [f"file://{p}" for p in sorted((rgb / "train").glob("*.tar"))]
    with pytest.raises(data.LoaderError, match="hold no extra bands"):  # streamed: found at the first sample
        list(data.load(tars, "train", bands="rgbn"))
    with pytest.raises(data.LoaderError, match="bands must be one of"):
        data.load(rgb, "train", bands="nir")


def _corrupt(out, key: str, field: str, new: bytes) -> None:
    """Overwrite one member's bytes in place (same size) and fix the sample's checksum in the
    index, so only the content is wrong (what verify's decode must catch)."""
    idx = shards.read_index(out / shards.INDEX_NAME)
    r = idx[idx["key"] == key].iloc[0]
    i = list(r["fields"]).index(field)
    off, size = int(r["offsets"][i]), int(r["sizes"][i])
    assert len(new) <= size
    path = out / r["split"] / r["shard"]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(new.ljust(size, b"\0"))
    files = dict(shards.iter_members(path))
    digest = shards.sample_digest({k.split(".", 1)[1]: v for k, v in files.items() if k.startswith(key + ".")})
    rows = idx.to_dict("records")
    for row in rows:
        if row["key"] == key:
            row["sha256"] = digest
        for c in ("fields", "offsets", "sizes", "labels"):
            row[c] = list(row[c])
    shards.write_index(rows, out / shards.INDEX_NAME)


@pytest.mark.parametrize("how", ["not_npz", "wrong_dtype"])
def test_verify_fails_on_a_corrupted_extra_member(tmp_path, how):
    out = _shards(tmp_path, "rgbn", 2)
    assert shards.verify(out)["samples"] == 2
    field = smp.hr_extra_field(13, "rgbn")
    bad = b"garbage, not a zip" if how == "not_npz" else \
        smp.encode_npz(np.zeros((268, 268, 1), np.uint16)[:, :100], "nir")
    _corrupt(out, "CA-b1", field, bad)
    with pytest.raises(shards.VerifyError) as e:
        shards.verify(out)
    msg = str(e.value)
    assert "CA-b1" in msg and "does not decode" in msg and field in msg, msg


def test_verify_refuses_a_dataset_mixing_band_sets(tmp_path):
    a = smp.write_staged(tmp_path / "w", make_sample("CA-m0", "train", 0))
    b = smp.write_staged(tmp_path / "w", _with_bands(make_sample("CA-m1", "train", 1), "rgbn", 1))
    out = tmp_path / "shards"
    shards.build([shards.Entry("CA-m0", "train", "CA", a), shards.Entry("CA-m1", "train", "CA", b)], out)
    with pytest.raises(shards.VerifyError, match="different band sets"):
        shards.verify(out)


# -- plain webdataset and Hugging Face datasets, without gl10m ----------------------------------------
def test_plain_webdataset_and_hf_datasets_decode_the_extra_members(tmp_path, monkeypatch):
    wds = pytest.importorskip("webdataset")
    out = _shards(tmp_path, "raw", 2)
    tars = sorted(str(p) for p in (out / "train").glob("*.tar"))
    want = {f"CA-b{i}": _with_bands(make_sample(f"CA-b{i}", "train", i), "raw", i) for i in range(2)}
    got = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert sorted(g["__key__"] for g in got) == sorted(want)
    for g in got:
        w = want[g["__key__"]]
        assert np.array_equal(g["lr_raw.npz"]["raw"], w.lr_extra)
        assert np.array_equal(g["hr_42_raw.npz"]["raw"], w.hr_extra[42])
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    row = next(r for r in ds if r["__key__"] == "CA-b0")
    assert np.array_equal(np.asarray(row["hr_07_raw.npz"]["raw"], np.uint8), want["CA-b0"].hr_extra[7])
    assert np.array_equal(np.asarray(row["lr_raw.npz"]["raw"], np.uint16), want["CA-b0"].lr_extra)


# -- the testbed's B08 ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [3, 11, 29])
def test_testbed_b08_is_rendered_from_the_same_surfaces(seed):
    """B08 from the surfaces' NIR (vegetation bright, water dark), and B02-B04 exactly what they
    are without it (the random numbers of the other bands are untouched)."""

    from gl10m.testbed import imagery as I

    tables = I.default_tables()
    from gl10m.testbed.classes import MATERIALS, TRUTH_CLASSES

    h = w = 120
    cls = np.zeros((h * 10, w * 10), np.uint8)
    mat = np.zeros_like(cls)
    mat[:, : w * 5] = MATERIALS.index("trees")
    mat[:, w * 5:] = MATERIALS.index("water")
    cls[:] = TRUTH_CLASSES.index("grass")
    key = I.key_of(cls, mat, tables, 0)
    grid = I.Grid(32611, 500000.0, 3800000.0, 1.0, w * 10, h * 10)
    xs, ys = I.pixel_centres(grid.transform, grid.shape)
    refl = I.surface_reflectance(key, None, xs, ys, tables, seed)
    acc = I.Acc10(grid)
    acc.add(0, h * 10, refl, tables.veg[key], tables.water[key])
    g10 = I.Grid(32611, grid.x0, grid.y1, 10.0, w, h)
    spec = I.imagery_spec({})
    d = spec.s2_dates[-1]
    with_nir = I.render_s2(I.S2Base(g10, acc.refl, acc.vegrefl, acc.veg, acc.water, acc.nir, acc.vegnir),
                           d, d.date, 45.0, seed, "XX", spec, d.baseline)
    without = I.render_s2(I.S2Base(g10, acc.refl, acc.vegrefl, acc.veg, acc.water), d, d.date, 45.0, seed, "XX",
                          spec, d.baseline)
    assert "B08" not in without.bands and with_nir.bands["B08"].dtype == np.uint16
    for b in ("B02", "B03", "B04", "SCL"):
        assert np.array_equal(with_nir.bands[b], without.bands[b]), b
    clear = np.repeat(np.repeat(np.isin(with_nir.bands["SCL"], (4, 5, 6)), 2, 0), 2, 1)
    off = I.S2_OFFSET if I.has_offset(d.baseline) else 0
    nir = (with_nir.bands["B08"].astype(float) - off) / 1e4
    veg, water = nir[:, 5:w // 2 - 5][clear[:, 5:w // 2 - 5]], nir[:, w // 2 + 5:-5][clear[:, w // 2 + 5:-5]]
    assert veg.size > 1000 and water.size > 1000
    assert np.median(veg) > 0.15 > 0.05 > np.median(water)
    # water's NIR is its look's, within the texture, haze and noise
    assert abs(np.median(water) - I.MATERIAL_LOOKS["water"].rgbn[3]) < 0.01
