"""Benchmark: gl10m.data.load samples/s against a bare simplejpeg decode loop, and sparse reads.

    .venv/bin/python bench/loader.py [--samples 48] [--tiles 12] [--repeat 3] [--keep DIR] [--json PATH]

Builds synthetic staged samples (smooth multi-scale textures + sensor noise, so JPEG q95 tiles
are ~20-45 kB like real NAIP, not the 5 kB of flat synthetic tiles or the 100 kB of pure noise),
shards them with gl10m.shards.build, then measures in this one run, on the same shards, one
process, no DataLoader workers (best of --repeat rounds; in each round every variant runs once):

  * bare: simplejpeg.decode_jpeg of the 100 tiles of every sample, bytes already in memory
    (no I/O, no tar, no LR/labels/meta): the decode-bound ceiling;
  * load(all): gl10m.data.load(..., tiles="all"): reads by offset + LR PNG + labels + meta +
    all 100 tiles decoded into tensors; goal >= 0.8 x bare;
  * load(12): gl10m.data.load(..., tiles=<12 indices>): sparse reads; goal >= 5 x load(all);
  * stream(12): the same 12 tiles without the index (tar streamed, other members skipped), to
    show what the offset reads buy.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import add_json_arg, record, write_json  # noqa: E402


def texture(rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """A 2680x2680 RGB 'scene': smooth fields at three scales (bicubic upsampling of small random
    images) + fine texture + sensor noise of a per-scene strength, uint8."""
    from PIL import Image

    n = 2680
    out = np.full((n, n, 3), 110.0, np.float32)
    for cells, amp in ((6, 70.0), (40, 30.0), (400, 14.0)):
        small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        up = np.asarray(Image.fromarray(small, "RGB").resize((n, n), Image.BICUBIC), np.float32)
        out += amp * (up / 127.5 - 1.0)
    sigma = rng.uniform(0.6, 1.6)
    out += sigma * np.roll(noise, tuple(int(x) for x in rng.integers(0, n, 2)), axis=(0, 1))
    return np.clip(out, 0, 255).astype(np.uint8)


def build(root: Path, n: int) -> Path:
    from gl10m import samples as smp
    from gl10m import shards

    entries = []
    noise = np.random.default_rng(12345).normal(0, 3.0, (2680, 2680, 3)).astype(np.float32)
    for i in range(n):
        rng = np.random.default_rng(i)
        scene = texture(rng, noise)
        hr = scene.reshape(10, 268, 10, 268, 3).transpose(0, 2, 1, 3, 4).reshape(100, 268, 268, 3)
        lr = np.ascontiguousarray(scene[::10, ::10])
        labels = np.zeros(66, np.uint8)
        labels[rng.choice(66, 5, replace=False)] = 1
        frac = np.zeros((100, 66), np.float16)
        key = f"CA-b{i:04d}"
        s = smp.Sample(key=key, split="train", lr=lr, hr=np.ascontiguousarray(hr), labels=labels, tile_frac=frac,
                       meta={"state": "CA"})
        entries.append(shards.Entry(key, "train", "CA", smp.write_staged(root, s)))
    out = root / "shards"
    shards.build(entries, out, max_bytes=64 * 1024 * 1024)
    return out


def best_interleaved(fns: list, repeat: int) -> list[float]:
    """Best wall time of each function over `repeat` rounds, the functions taking turns in every
    round, so that load from other processes on this machine hits them alike."""
    t = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            t[i].append(time.perf_counter() - t0)
    return [min(x) for x in t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--tiles", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--keep", type=Path, help="build (or reuse) the shards here instead of a temp folder")
    add_json_arg(ap)
    a = ap.parse_args()

    import simplejpeg
    import torch

    from gl10m import data, shards
    from gl10m import samples as smp

    torch.set_num_threads(1)
    tmp = None
    if a.keep is not None and (a.keep / "shards" / shards.MANIFEST_NAME).exists():
        sd = a.keep / "shards"
    else:
        root = a.keep or Path(tmp := tempfile.mkdtemp(prefix="gl10m-bench-loader-"))
        t0 = time.perf_counter()
        sd = build(root, a.samples)
        print(f"built {a.samples} samples in {time.perf_counter() - t0:.1f} s")
    try:
        tiles_bytes = []
        for tar in sorted((sd / "train").glob("*.tar")):
            cur: dict[str, list] = {}
            for name, blob in shards.iter_members(tar):
                k, f = shards.split_member(name)
                if f.startswith("hr_"):
                    cur.setdefault(k, []).append(blob)
            tiles_bytes += list(cur.values())
        n = len(tiles_bytes)
        sizes = [len(b) for t in tiles_bytes for b in t]
        print(f"{n} samples, tiles {np.mean(sizes) / 1024:.1f} kB mean "
              f"({np.percentile(sizes, 5) / 1024:.1f}-{np.percentile(sizes, 95) / 1024:.1f} kB, 5-95%)")

        def bare():
            for t in tiles_bytes:
                for b in t:
                    simplejpeg.decode_jpeg(b, colorspace="RGB", fastdct=False, fastupsample=False)

        sel = sorted(int(i) for i in np.random.default_rng(0).choice(smp.N_TILES, a.tiles, replace=False))
        nidx = Path(tempfile.mkdtemp(prefix="gl10m-bench-noindex-"))
        shutil.copytree(sd, nidx / "s")
        (nidx / "s" / shards.INDEX_NAME).unlink()

        def run(src, tiles):
            def go():
                k = sum(1 for _ in data.load(src, split="train", tiles=tiles))
                assert k == n
            return go

        names = ["bare simplejpeg, 100 tiles", "load(tiles='all')", f"load(tiles={a.tiles})",
                 f"load(tiles={a.tiles}), no index (streamed)"]
        times = best_interleaved([bare, run(sd, "all"), run(sd, sel), run(nidx / "s", sel)], a.repeat)
        rows = list(zip(names, times))
        shutil.rmtree(nidx, ignore_errors=True)
        print(f"{'':44} {'samples/s':>10}")
        for name, t in rows:
            print(f"{name:44} {n / t:10.1f}")
        sps = {name: n / t for name, t in rows}
        r_all = sps["load(tiles='all')"] / sps["bare simplejpeg, 100 tiles"]
        r_sel = sps[f"load(tiles={a.tiles})"] / sps["load(tiles='all')"]
        r_str = sps[f"load(tiles={a.tiles})"] / sps[f"load(tiles={a.tiles}), no index (streamed)"]
        print(f"load(all) / bare decode:            {r_all:.2f}  (goal >= 0.8)")
        print(f"load({a.tiles}) / load(all):              {r_sel:.2f}x (goal >= 5)")
        print(f"load({a.tiles}) by offset / streamed:     {r_str:.2f}x")
        k = f"load(tiles={a.tiles})"
        note = f"best of {a.repeat} interleaved rounds, one process"
        write_json(a.json, "loader", [
            record("load(tiles='all')", sps["load(tiles='all')"], "samples/s", "bare simplejpeg decode, 100 tiles",
                   sps["bare simplejpeg, 100 tiles"], r_all, True,
                   "full load samples/s / bare decode samples/s; goal >= 0.8", note),
            record(k, sps[k], "samples/s", "load(tiles='all')", sps["load(tiles='all')"], r_sel, True,
                   f"sparse ({a.tiles} tiles) / full load samples/s; goal >= 5", note),
            record(k, sps[k], "samples/s", f"{k}, no index (streamed)", sps[f"{k}, no index (streamed)"], r_str, True,
                   "reads by offset / streamed tar samples/s: what the index buys", note),
        ], samples=n, tiles=a.tiles, repeat=a.repeat)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
