"""Other readers: plain `webdataset` and Hugging Face `datasets` read gl10m shards, in a Python
that cannot import gl10m (no site processing, so the editable install's .pth is never read;
site-packages is put on sys.path by hand; the script checks gl10m is not findable)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from gl10m import samples as smp

pytest.importorskip("webdataset")

PRELUDE = r"""
import importlib.util, json, sys
sys.path.append(SITE)
assert importlib.util.find_spec("gl10m") is None, "gl10m must not be importable here"
import numpy as np
"""

WDS = r"""
import webdataset as wds
out = {}
for s in wds.WebDataset(URLS, shardshuffle=False).decode("rgb8"):
    out[s["__key__"]] = {
        "fields": sorted(k for k in s if not k.startswith("__")),
        "lr": np.asarray(s["lr.png"]).tolist(), "hr_63": np.asarray(s["hr_63.jpg"]).tolist(),
        "labels": s["labels.npy"].tolist(), "tile_frac_shape": list(s["tile_frac.npy"].shape),
        "meta": s["meta.json"],
    }
assert "gl10m" not in sys.modules
print(json.dumps(out))
"""

HF = r"""
import datasets
ds = datasets.load_dataset("webdataset", data_files={"train": URLS}, split="train", cache_dir=CACHE)
out = {}
for s in ds:
    out[s["__key__"]] = {
        "fields": sorted(k for k in s if not k.startswith("__")),
        "lr": np.asarray(s["lr.png"].convert("RGB")).tolist(), "hr_63": np.asarray(s["hr_63.jpg"]).tolist(),
        "labels": np.asarray(s["labels.npy"]).tolist(), "tile_frac_shape": list(np.asarray(s["tile_frac.npy"]).shape),
        "meta": s["meta.json"],
    }
assert "gl10m" not in sys.modules
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory) -> list[str]:
    from tests.fixtures.samples import build_shards

    sd = build_shards(tmp_path_factory.mktemp("hf"), n_train=3, n_val=0, max_bytes=7_000_000)
    urls = sorted(str(p) for p in (sd / "train").glob("*.tar"))
    assert len(urls) == 2
    return urls


def run_isolated(script: str, urls: list[str], tmp_path: Path) -> dict:
    code = (PRELUDE + script).replace("SITE", repr(sysconfig.get_paths()["purelib"])) \
        .replace("URLS", repr(urls)).replace("CACHE", repr(str(tmp_path / "hf-cache")))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    p = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def expected(urls: list[str]) -> dict[str, smp.Sample]:
    from gl10m import shards

    out = {}
    for u in urls:
        fields: dict[str, dict] = {}
        for name, blob in shards.iter_members(Path(u)):
            k, f = shards.split_member(name)
            fields.setdefault(k, {})[f] = blob
        out.update({k: smp.decode_sample(v, tiles=[63]) for k, v in fields.items()})
    return out


def check(got: dict, want: dict[str, smp.Sample]) -> None:
    assert sorted(got) == sorted(want)
    for k, g in got.items():
        w = want[k]
        assert g["fields"] == sorted(smp.FIELDS)
        assert np.array_equal(np.asarray(g["lr"], np.uint8), w.lr)  # PNG: lossless, exact
        hr = np.asarray(g["hr_63"], np.int16)
        assert hr.shape == (268, 268, 3) and np.abs(hr - w.hr[0]).max() <= 1  # another JPEG decoder
        assert g["labels"] == w.labels.tolist() and g["tile_frac_shape"] == [100, 66]
        assert g["meta"] == w.meta and g["meta"]["key"] == k


def test_plain_webdataset_reads_the_shards_without_gl10m(shard_urls, tmp_path):
    check(run_isolated(WDS, shard_urls, tmp_path), expected(shard_urls))


def test_hugging_face_datasets_reads_the_shards_without_gl10m(shard_urls, tmp_path):
    pytest.importorskip("datasets")
    check(run_isolated(HF, shard_urls, tmp_path), expected(shard_urls))
