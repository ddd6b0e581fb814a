"""gl10m.data: the shard loader (sparse reads by offset, streaming fallback, splitting, safety)."""
from __future__ import annotations

import functools
import http.server
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gl10m import data, shards  # noqa: E402
from gl10m import samples as smp  # noqa: E402
from tests.fixtures.samples import build_shards, make_sample  # noqa: E402,F401 - make_sample: tests/test_mapsr.py
from tests.fixtures.tars import write_tar  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- synthetic shards -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("d"))


def full_samples(sd: Path, split: str) -> dict[str, smp.Sample]:
    """Every sample of a split decoded in full by the reference reader (gl10m.samples)."""
    out = {}
    for tar in sorted((sd / split).glob("*.tar")):
        fields: dict[str, dict] = {}
        for name, blob in shards.iter_members(tar):
            k, f = shards.split_member(name)
            fields.setdefault(k, {})[f] = blob
        for k, fs in fields.items():
            out[k] = smp.decode_sample(fs)
    return out


def keys_of(ds) -> list[str]:
    return [s["key"] for s in ds]


def copy_without_index(sd: Path, dst: Path) -> Path:
    shutil.copytree(sd, dst)
    (dst / shards.INDEX_NAME).unlink()
    return dst


# -- pixels -----------------------------------------------------------------------------------
@pytest.mark.parametrize("indexed", [True, False])
def test_tile_subset_gives_the_pixels_of_full_decoding(sd, tmp_path, indexed):
    src = sd if indexed else copy_without_index(sd, tmp_path / "s")
    ref = full_samples(sd, "train")
    ds = data.load(src, split="train", tiles=[37, 0, 99, 5])
    got = list(ds)
    assert sorted(s["key"] for s in got) == sorted(ref)
    for s in got:
        r = ref[s["key"]]
        assert s["hr"].shape == (4, 3, 268, 268) and s["hr"].dtype == torch.uint8
        assert s["tiles"].tolist() == [37, 0, 99, 5]
        assert np.array_equal(s["hr"].permute(0, 2, 3, 1).numpy(), r.hr[[37, 0, 99, 5]])
        assert s["lr"].shape == (3, 268, 268) and np.array_equal(s["lr"].permute(1, 2, 0).numpy(), r.lr)
        assert s["labels"].dtype == torch.uint8 and s["labels"].tolist() == r.labels.tolist()
        assert np.array_equal(s["tile_frac"].numpy(), r.tile_frac[[37, 0, 99, 5]])
        assert s["meta"] == r.meta and s["meta"]["key"] == s["key"]


def test_all_tiles_and_a_sampler_of_the_lr_image(sd):
    ref = full_samples(sd, "val")

    def brightest3(lr):  # a real LR-only sampler: the 3 brightest 10x10 blocks of the LR image
        blocks = lr[:, :260, :260].float().mean(0).reshape(10, 26, 10, 26).mean((1, 3)).flatten()
        return torch.argsort(blocks, descending=True, stable=True)[:3]

    for s in data.load(sd, split="val", tiles=brightest3):
        r = ref[s["key"]]
        want = brightest3(torch.from_numpy(r.lr).permute(2, 0, 1)).tolist()
        assert s["tiles"].tolist() == want
        assert np.array_equal(s["hr"].permute(0, 2, 3, 1).numpy(), r.hr[want])
    full = list(data.load(sd, split="val"))
    assert all(np.array_equal(s["hr"].permute(0, 2, 3, 1).numpy(), ref[s["key"]].hr) for s in full)
    assert full[0]["tiles"].tolist() == list(range(100))


def test_sampler_mask_and_empty_selection(sd):
    mask = np.zeros(100, bool)
    mask[[3, 80]] = True
    s = next(iter(data.load(sd, split="val", tiles=lambda lr: mask)))
    assert s["tiles"].tolist() == [3, 80]
    s = next(iter(data.load(sd, split="val", tiles=[], decode_meta=False)))
    assert s["hr"].shape == (0, 3, 268, 268) and "meta" not in s


def zero_member(sd: Path, key: str, field: str) -> None:
    idx = shards.read_index(sd / shards.INDEX_NAME)
    r = idx[idx["key"] == key].iloc[0]
    j = list(r["fields"]).index(field)
    path = sd / r["split"] / r["shard"]
    raw = bytearray(path.read_bytes())
    raw[r["offsets"][j]: r["offsets"][j] + r["sizes"][j]] = bytes(r["sizes"][j])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("indexed", [True, False])
def test_only_the_selected_tiles_are_decoded(sd, tmp_path, indexed):
    src = tmp_path / "s"
    shutil.copytree(sd, src)
    key = sorted(full_samples(sd, "val"))[1]
    zero_member(src, key, "hr_50.jpg")  # not a JPEG any more
    if not indexed:
        (src / shards.INDEX_NAME).unlink()
    assert len(list(data.load(src, split="val", tiles=[0, 49, 51]))) == 3
    with pytest.raises(data.LoaderError, match=f"{key}: hr_50.jpg"):
        list(data.load(src, split="val", tiles=[50]))


# -- checks -----------------------------------------------------------------------------------
def test_verify_names_the_sample_whose_bytes_changed(sd, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(sd, src)
    key = sorted(full_samples(sd, "val"))[2]
    idx = shards.read_index(src / shards.INDEX_NAME)
    r = idx[idx["key"] == key].iloc[0]
    j = list(r["fields"]).index("hr_77.jpg")
    path = src / "val" / r["shard"]
    raw = bytearray(path.read_bytes())
    raw[r["offsets"][j] + 200] ^= 0x55
    path.write_bytes(bytes(raw))
    assert len(list(data.load(src, split="val", tiles=[1]))) == 3  # unverified sparse reads never see it
    with pytest.raises(data.LoaderError, match=f"{key}: checksum mismatch"):
        list(data.load(src, split="val", tiles=[1], verify=True))
    with pytest.raises(data.LoaderError, match="verify=True needs the shard index"):
        data.load(copy_without_index(sd, tmp_path / "n"), split="val", verify=True)


def test_a_stale_index_is_an_error_not_wrong_pixels(sd, tmp_path):
    other = build_shards(tmp_path / "o", n_train=0, n_val=3)  # same shard names, other samples
    src = tmp_path / "s"
    shutil.copytree(sd, src)
    shutil.copy(other / "val" / "gl10m-val-000000.tar", src / "val" / "gl10m-val-000000.tar")
    with pytest.raises(data.LoaderError, match="index does not match the shard"):
        list(data.load(src, split="val", tiles=[4]))


def sample_members(sd: Path, key: str) -> list[tuple[str, bytes]]:
    return [(n, b) for t in sorted((sd / "val").glob("*.tar")) for n, b in shards.iter_members(t)
            if n.startswith(key + ".")]


@pytest.mark.parametrize("case", ["traversal", "absolute", "missing", "extra_pickle"])
def test_unsafe_or_off_schema_shards_are_refused(sd, tmp_path, case):
    key = sorted(full_samples(sd, "val"))[0]
    mem = sample_members(sd, key)
    if case == "traversal":
        mem[3] = ("../" + mem[3][0], mem[3][1])
    elif case == "absolute":
        mem[0] = ("/tmp/" + mem[0][0], mem[0][1])
    elif case == "missing":
        mem = [m for m in mem if not m[0].endswith("hr_42.jpg")]
    else:
        mem.append((f"{key}.evil.pyd", b"\x80\x04K\x01."))  # a pickle: never loaded
    path = write_tar(tmp_path / "x.tar", mem, fmt=tarfile.USTAR_FORMAT)
    msg = {"traversal": "unsafe", "absolute": "unsafe", "missing": "fields differ", "extra_pickle": "fields differ"}
    with pytest.raises(data.LoaderError, match=msg[case]):
        list(data.load([path], tiles=[0]))


def test_bad_arguments_are_one_line_user_errors(sd, tmp_path):
    from gl10m.errors import UserError

    cases = [
        lambda: data.load(sd),  # two splits: name one
        lambda: data.load(sd, split="test"),
        lambda: data.load(tmp_path, split="train"),  # no manifest
        lambda: data.load(sd, split="train", tiles=[100]),
        lambda: data.load(sd, split="train", tiles=[1, 1]),
        lambda: data.load(sd, split="train", tiles="some"),
        lambda: data.load(sd, split="train", rank=2, world_size=2),
        lambda: data.load(sd, split="train", shuffle=-1),
        lambda: data.load(sd, split="train", with_epoch=0),
        lambda: list(data.load(sd, split="val", tiles=lambda lr: [7, 700])),
    ]
    for make in cases:
        with pytest.raises(UserError) as e:
            make()
        assert "\n" not in str(e.value) and str(e.value)


# -- sources ----------------------------------------------------------------------------------
def test_shard_lists_brace_patterns_and_fsspec_urls(sd):
    import fsspec

    want = sorted(full_samples(sd, "train"))
    urls = sorted(str(p) for p in (sd / "train").glob("*.tar"))
    ds = data.load(urls, tiles=[2])
    assert ds.num_samples == len(want)  # the index was found beside the shards
    assert sorted(keys_of(ds)) == want
    pattern = str(sd / "train") + "/gl10m-train-{000000..%06d}.tar" % (len(urls) - 1)
    assert sorted(keys_of(data.load(pattern, tiles=[2]))) == want
    assert sorted(keys_of(data.load("file://" + str(sd), split="train", tiles=[2]))) == want

    fs = fsspec.filesystem("memory")
    fs.put(str(sd), "/gl10m-test-shards", recursive=True)
    try:
        ds = data.load("memory://gl10m-test-shards", split="val", tiles=[9, 1])
        assert ds.num_samples == 3
        local = {s["key"]: s for s in data.load(sd, split="val", tiles=[9, 1])}
        for s in ds:
            assert torch.equal(s["hr"], local[s["key"]]["hr"]) and s["meta"] == local[s["key"]]["meta"]
    finally:
        fs.rm("/gl10m-test-shards", recursive=True)


class _Server:
    def __init__(self, root: Path, ranges: bool):
        from RangeHTTPServer import RangeRequestHandler

        base = RangeRequestHandler if ranges else http.server.SimpleHTTPRequestHandler
        self.log: list[tuple[str, str | None]] = []
        log = self.log

        class H(base):
            def log_message(self, *a):
                pass

            def send_head(self):
                log.append((self.path, self.headers.get("Range")))
                return super().send_head()

        class Srv(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # the loader hangs up on a no-Range server after its probe: expected

        self.httpd = Srv(("127.0.0.1", 0), functools.partial(H, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.t = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("ranges", [True, False])
def test_http_sparse_reads_with_range_and_streaming_without(sd, ranges):
    local = {s["key"]: s for s in data.load(sd, split="val", tiles=[11, 3])}
    with _Server(sd.parent, ranges) as srv:
        got = list(data.load(f"{srv.url}/shards", split="val", tiles=[11, 3]))
    assert sorted(s["key"] for s in got) == sorted(local)
    for s in got:
        assert torch.equal(s["hr"], local[s["key"]]["hr"]) and torch.equal(s["lr"], local[s["key"]]["lr"])
    tar_gets = [r for p, r in srv.log if p.endswith(".tar")]
    if ranges:  # every shard request asked for a byte range: no shard was downloaded whole
        assert tar_gets and all(r and r.startswith("bytes=") for r in tar_gets)
    else:  # one probe per shard (answered in full: no Range support), then one plain streaming GET
        n_shards = len(list((sd / "val").glob("*.tar")))
        assert tar_gets.count("bytes=0-0") == n_shards and tar_gets.count(None) == n_shards
        assert len(tar_gets) == 2 * n_shards


# -- order, epochs, splitting -----------------------------------------------------------------
def test_shuffle_is_a_seeded_permutation_that_changes_with_the_epoch(sd):
    plain = keys_of(data.load(sd, split="train", tiles=[]))
    a = data.load(sd, split="train", tiles=[], shuffle=4, seed=3)
    e0 = keys_of(a)
    assert sorted(e0) == sorted(plain) and e0 != plain
    assert keys_of(data.load(sd, split="train", tiles=[], shuffle=4, seed=3)) == e0
    a.set_epoch(1)
    assert keys_of(a) != e0 and sorted(keys_of(a)) == sorted(plain)


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("split_by", ["auto", "sample"])
def test_ranks_partition_the_split(sd, tmp_path, indexed, split_by):
    src = sd if indexed else copy_without_index(sd, tmp_path / "s")
    want = sorted(full_samples(sd, "train"))
    for world in (2, 3, 5):  # 4 shards: shard rule at 2 and 3 ranks, sample rule at 5 (or forced)
        seen = [k for r in range(world) for k in keys_of(data.load(src, split="train", tiles=[], rank=r,
                                                                   world_size=world, split_by=split_by, shuffle=3))]
        assert sorted(seen) == want, (world, split_by)


def test_with_epoch_gives_n_samples_per_rank_from_a_resampled_stream(sd):
    want = set(full_samples(sd, "train"))
    ds = data.load(sd, split="train", tiles=[0], with_epoch=11, shuffle=2)
    got = keys_of(ds)
    assert len(got) == 11 > len(want) and set(got) <= want  # more than one pass: resampled, not exhausted
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert len(list(dl)) == 11
    ds.set_epoch(1)
    assert keys_of(ds) != got


def test_collate_stacks_equal_shapes_and_lists_the_rest(sd):
    batch = list(data.load(sd, split="val", tiles=[1, 2]))
    b = data.collate(batch)
    assert b["hr"].shape == (3, 2, 3, 268, 268) and b["lr"].shape == (3, 3, 268, 268)
    assert b["labels"].shape == (3, 66) and b["key"] == [s["key"] for s in batch]
    assert torch.equal(b["hr"][1], batch[1]["hr"]) and torch.equal(b["lr"][2], batch[2]["lr"])
    calls = itertools.count(1)
    varied = list(data.load(sd, split="val", tiles=lambda lr: list(range(next(calls)))))  # 1, 2, 3 tiles
    b = data.collate(varied)
    assert isinstance(b["hr"], list) and [h.shape[0] for h in b["hr"]] == [1, 2, 3]
    assert isinstance(b["tiles"], list) and b["lr"].shape == (3, 3, 268, 268)


DDP_SCRIPT = r"""
import json, sys, torch
from gl10m import data
ds = data.load(sys.argv[1], split="train", tiles=[], split_by=sys.argv[2])
dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
print(json.dumps([s["key"] for s in dl]))
"""


@pytest.mark.parametrize("split_by", ["shard", "sample"])
def test_ddp_two_ranks_two_workers_see_every_sample_once(sd, split_by):
    want = sorted(full_samples(sd, "train"))
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(sd), split_by], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    per_rank = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        per_rank.append(json.loads(out.strip().splitlines()[-1]))
    assert all(per_rank)  # both ranks got samples
    assert sorted(k for r in per_rank for k in r) == want


def test_sample_reader_reads_members_by_index_order(sd, monkeypatch):
    """Random access to raw member bytes (the eval's IO): equal to the shard's bytes, bounded
    open files, one-line errors."""
    monkeypatch.setattr(data.tar, "MAX_OPEN", 1)  # the bound on open shard readers
    want = full_samples(sd, "train")
    with data.SampleReader(sd, "train") as r:
        assert sorted(r.keys) == sorted(want) and len(r) == len(want)
        assert len(r._shards) > 1  # so the bound on open files is exercised
        for i, key in enumerate(r.keys):
            got = r.read(i, [smp.LR_FIELD, smp.hr_field(37), smp.LABELS_FIELD])
            assert set(got) == {smp.LR_FIELD, smp.hr_field(37), smp.LABELS_FIELD}
            np.testing.assert_array_equal(data.decode_lr(got[smp.LR_FIELD]), want[key].lr)
            np.testing.assert_array_equal(data.decode_tiles([37], got)[0], want[key].hr[37])
            np.testing.assert_array_equal(data.decode_labels(got[smp.LABELS_FIELD]), want[key].labels)
            assert len(r._readers) <= 1
        with pytest.raises(data.LoaderError, match="outside"):
            r.read(len(r), [smp.LR_FIELD])
        with pytest.raises(data.LoaderError, match="not a field"):
            r.read(0, ["lr.jpg"])


def test_tiles_decoded_at_a_reduced_size_match_a_resize_of_the_full_ones(sd):
    """tile_px: the JPEG decoder's own DCT scaling gives [n, 3, S, S] with S the smallest M/8 of 268
    at or above tile_px; its pixels agree with the full tile box-averaged to that size."""
    assert [data.decoded_tile_px(p) for p in (None, 1, 34, 35, 64, 96, 128, 224, 268, 300)] == \
        [268, 34, 34, 67, 67, 101, 134, 235, 268, 268]
    with pytest.raises(data.LoaderError):
        data.decoded_tile_px(0)
    ref = full_samples(sd, "val")
    n = 0
    for s in data.load(sd, split="val", tiles=[0, 37, 99], tile_px=64):
        assert s["hr"].shape == (3, 3, 67, 67) and s["hr"].dtype == torch.uint8
        full = torch.from_numpy(ref[s["key"]].hr[[0, 37, 99]]).permute(0, 3, 1, 2).float()
        small = torch.nn.functional.interpolate(full, size=(67, 67), mode="area")
        assert (s["hr"].float() - small).abs().mean() < 4.0     # DN, of 255
        assert np.array_equal(s["lr"].permute(1, 2, 0).numpy(), ref[s["key"]].lr)  # LR untouched
        n += 1
    assert n > 0
    raw = {smp.hr_field(i): smp.encode_tile(ref[s["key"]].hr[i]) for i in (5,)}
    assert data.decode_tiles([5], raw, tile_px=128).shape == (1, 134, 134, 3)


def test_a_loader_left_open_at_exit_closes_quietly(sd):
    """An iterator abandoned mid-epoch and still referenced at interpreter exit: its shard
    readers close during shutdown without 'Exception ignored' noise."""
    code = ("import sys\nfrom gl10m import data\n"
            f"it = iter(data.load({str(sd)!r}, split='train', tiles=[0]))\n"
            "next(it)\nKEEP = it\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Exception ignored" not in out.stderr, out.stderr
