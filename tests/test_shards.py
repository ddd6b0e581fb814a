"""Shards: deterministic byte-copy tars, the sidecar index, verify, safe member names."""
import io
import random
import tarfile

import numpy as np
import pytest

from gl10m import samples as smp
from gl10m import shards
from tests.fixtures.samples import make_sample
from tests.fixtures.tars import sparse_member_tar, write_tar


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    entries = []
    for i, (state, split) in enumerate([("CA", "train")] * 5 + [("WA", "val")] * 2 + [("AZ", "test")] * 2):
        key = f"{state}-w{1000 + i}"
        folder = smp.write_staged(root, make_sample(key, split, i, look="noise"))
        entries.append(shards.Entry(key, split, state, folder))
    return root, entries


def test_rebuild_is_byte_identical_and_order_independent(staged, tmp_path):
    root, entries = staged
    m1 = shards.build(entries, tmp_path / "a", max_bytes=4 * 1024 * 1024)
    shuffled = entries[:]
    random.Random(3).shuffle(shuffled)
    m2 = shards.build(shuffled, tmp_path / "b", max_bytes=4 * 1024 * 1024)
    assert m1 == m2
    tars = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(tars) > 3  # several shards per split at this size
    for t in tars:
        assert (tmp_path / "a" / t).read_bytes() == (tmp_path / "b" / t).read_bytes()
    assert (tmp_path / "a" / "index.parquet").read_bytes() == (tmp_path / "b" / "index.parquet").read_bytes()
    assert m1["samples"] == {"test": 2, "train": 5, "val": 2}
    with tarfile.open(tmp_path / "a" / tars[0]) as tar:
        for ti in tar:
            assert (ti.mtime, ti.uid, ti.gid, ti.mode, ti.uname) == (0, 0, 0, 0o444, "")


def test_index_offsets_point_at_the_member_bytes(staged, tmp_path):
    root, entries = staged
    shards.build(entries, tmp_path / "s")
    idx = shards.read_index(tmp_path / "s" / "index.parquet")
    assert len(idx) == 9 and set(idx["split"]) == {"train", "val", "test"}
    r = idx[idx["key"] == "CA-w1002"].iloc[0]
    fields = list(r["fields"])
    assert fields[0] == "meta.json" and fields[-1] == "hr_99.jpg" and len(fields) == len(smp.FIELDS)
    raw = (tmp_path / "s" / r["split"] / r["shard"]).read_bytes()
    i = fields.index("hr_37.jpg")
    tile = smp.decode_tile(raw[r["offsets"][i]: r["offsets"][i] + r["sizes"][i]])
    full = smp.read_staged(entries[2].folder, tiles=[37])
    assert np.array_equal(tile, full.hr[0])
    assert list(r["labels"]) == [int(x) for x in full.labels]


def test_verify_passes_then_names_a_flipped_byte(staged, tmp_path):
    root, entries = staged
    out = tmp_path / "s"
    shards.build(entries, out)
    assert shards.verify(out) == {"samples": 9, "shards": 3}
    idx = shards.read_index(out / "index.parquet")
    r = idx[idx["key"] == "WA-w1005"].iloc[0]
    path = out / r["split"] / r["shard"]
    data = bytearray(path.read_bytes())
    j = list(r["fields"]).index("hr_50.jpg")
    data[r["offsets"][j] + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match="WA-w1005.*checksum"):
        shards.verify(out, decode=False)


def test_webdataset_reads_every_field(staged, tmp_path):
    import webdataset as wds

    root, entries = staged
    shards.build(entries, tmp_path / "s")
    urls = sorted(str(p) for p in (tmp_path / "s" / "train").glob("*.tar"))
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert sorted(s["__key__"] for s in got) == sorted(e.key for e in entries if e.split == "train")
    assert all(set(k for k in s if not k.startswith("__")) == set(smp.FIELDS) for s in got)


def test_rebuild_from_fewer_samples_removes_stale_shards(staged, tmp_path):
    root, entries = staged
    out = tmp_path / "s"
    shards.build(entries, out, max_bytes=2 * 1024 * 1024)
    before = sorted(p.name for p in (out / "train").glob("*.tar"))
    shards.build([e for e in entries if e.split != "val"][:3], out, max_bytes=2 * 1024 * 1024)
    after = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert len(after) < len(before)
    assert not list((out / "val").glob("*.tar"))
    assert shards.verify(out)["samples"] == 3


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.jpg", "a/../../b.png", "dir/k.lr.png"])
def test_unsafe_member_names_are_rejected(tmp_path, name):
    p = write_tar(tmp_path / "evil.tar", [(name, b"x")])
    with pytest.raises(shards.ShardError, match="unsafe"):
        list(shards.iter_members(p))


def test_a_sample_missing_a_field_is_refused(staged, tmp_path):
    root, entries = staged
    bad = tmp_path / "bad" / "CA-w9"
    bad.mkdir(parents=True)
    for f in entries[0].folder.iterdir():
        if f.name != "hr_42.jpg":
            (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(shards.ShardError, match="CA-w9.*missing hr_42.jpg"):
        shards.build([shards.Entry("CA-w9", "train", "CA", bad)], tmp_path / "s")


# -- the one tar reader (gl10m.shards.iter_tar / read_members): every reader refuses the same -------
@pytest.fixture(scope="module")
def built(staged, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "s"
    shards.build(staged[1], out)
    return out


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["a sample comes back", "a field twice"])
def test_every_reader_refuses_a_split_sample_or_a_repeated_field(built, tmp_path, case):
    """A shard whose sample CA-w1000 comes back after another (or repeats a field) is refused by
    iter_members (verify's reader), the streaming loader and the feature cache alike."""
    data = pytest.importorskip("gl10m.data")
    feats = pytest.importorskip("gl10m.model.crossscale.features")
    (tar,) = sorted((built / "train").glob("*.tar"))[:1]
    mem = list(shards.iter_members(tar))
    first = [m for m in mem if m[0].startswith(mem[0][0].split(".")[0] + ".")]
    second = [m for m in mem if m[0].startswith(mem[len(first)][0].split(".")[0] + ".")]
    if case == "a sample comes back":
        bad, twice = first + second + [first[0]], first[0][0].split(".")[0]
        fbad = [("CA-w1.s_vis.npy", _npy([1.0])), ("CA-w2.s_vis.npy", _npy([2.0])), ("CA-w1.labels.npy", _npy([1]))]
        ftwice = "CA-w1 appears twice"
    else:
        bad, twice = first + [first[3]] + second, first[3][0].split(".", 1)[1]
        fbad = [("CA-w1.s_vis.npy", _npy([1.0])), ("CA-w1.s_vis.npy", _npy([2.0]))]
        ftwice = "s_vis.npy appears twice"
    path = write_tar(tmp_path / "gl10m-train-000000.tar", bad)
    with pytest.raises(shards.ShardError, match=f"{twice} appears twice"):
        list(shards.iter_members(path))
    with pytest.raises(data.LoaderError, match=f"{twice} appears twice"):
        list(data.load([str(path)], tiles=[0]))
    fpath = write_tar(tmp_path / "feat-train-000000.tar", fbad)
    with pytest.raises(feats.FeatureError, match=ftwice):
        list(feats._iter_shard(fpath))


def test_the_feature_cache_refuses_a_member_above_the_cap_before_reading_it(tmp_path):
    feats = pytest.importorskip("gl10m.model.crossscale.features")
    path = sparse_member_tar(tmp_path / "feat-train-000000.tar", "CA-w1.hr_tokens.npy", shards.MAX_MEMBER_BYTES + 1)
    with pytest.raises(feats.FeatureError, match="CA-w1.*per-member cap"):
        list(feats._iter_shard(path))


def test_show_and_inspect_refuse_an_index_that_points_at_another_member(built):
    """gl10m.inspect reads by offset through shards.read_members: an index row whose hr_03 entry
    points at hr_04's bytes is an error naming the sample, not hr_04's pixels shown as hr_03."""
    import shutil

    from gl10m import inspect as gi

    sd = built.parent / "stale"
    if sd.exists():
        shutil.rmtree(sd)
    shutil.copytree(built, sd)
    rows = shards.read_index(sd / shards.INDEX_NAME).to_dict("records")
    for r in rows:
        r["fields"], r["offsets"], r["sizes"] = list(r["fields"]), list(r["offsets"]), list(r["sizes"])
        r["labels"] = [int(x) for x in r["labels"]]
    row = next(r for r in rows if r["key"] == "CA-w1002")
    good = gi.read_fields(sd, row, ["hr_03.jpg", "hr_04.jpg"])
    i, j = row["fields"].index("hr_03.jpg"), row["fields"].index("hr_04.jpg")
    row["offsets"][i], row["sizes"][i] = row["offsets"][j], row["sizes"][j]
    shards.write_index(rows, sd / shards.INDEX_NAME)
    with pytest.raises(shards.ShardError, match="CA-w1002.*does not match the shard at hr_03.jpg"):
        gi.read_fields(sd, row, ["hr_03.jpg"])
    with pytest.raises(shards.ShardError, match="CA-w1002"):
        gi.load_sample(sd, "CA-w1002", tiles=[3])
    assert gi.read_fields(sd, row, ["hr_04.jpg"]) == {"hr_04.jpg": good["hr_04.jpg"]}


def test_staged_folders_have_one_reader(staged, tmp_path):
    """samples.read_fields is the staged-folder reader the shard stage uses: a dot-file left by an
    interrupted write is no part of the sample (shard bytes unchanged), a folder inside is refused."""
    import shutil

    root, entries = staged
    e = entries[0]
    folder = tmp_path / "W" / e.key
    shutil.copytree(e.folder, folder)
    (folder / ".lr.png.1234.tmp").write_bytes(b"half a file")
    assert smp.read_fields(folder) == smp.read_fields(e.folder)
    assert smp.read_staged(folder).key == e.key
    shards.build([shards.Entry(e.key, e.split, e.state, folder)], tmp_path / "a")
    shards.build([e], tmp_path / "b")
    name = f"{e.split}/" + shards.SHARD_NAME.format(split=e.split, n=0)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    (folder / "sub").mkdir()
    with pytest.raises(shards.ShardError, match=f"{e.key}.*not a file"):
        shards.build([shards.Entry(e.key, e.split, e.state, folder)], tmp_path / "c")
