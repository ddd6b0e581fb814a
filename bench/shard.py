"""Shard stage throughput vs a raw byte copy of the same staged files, measured in one run.

Builds N synthetic staged samples (realistic-size JPEG tiles), then times:
  baseline: copying every staged file's bytes into one new file (read + write + fsync, no tar);
  shard:    gl10m.shards.build over the same samples (tar members, index, checksums, manifest).
Prints MB/s of both and the ratio (goal >= 0.7). Run: .venv/bin/python bench/shard.py [--samples N]
[--json PATH] (the figures as JSON records, for bench/run_all.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import add_json_arg, record, write_json


def textured(rng, n, size=268):
    """Smooth texture + noise: compresses like imagery (~25-45 kB per JPEG q95 tile)."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        f = rng.uniform(2, 9, 3)
        base = 120 + 60 * np.sin(2 * np.pi * (f[0] * x + f[1] * y))[..., None] * rng.uniform(0.5, 1, 3)
        out[i] = np.clip(base + rng.normal(0, 5, (size, size, 3)), 0, 255)
    return out


def make_staged(root: Path, n: int, seed: int = 0):
    from gl10m import samples as smp
    from gl10m import shards

    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        key = f"CA-w{i:06d}"
        labels = np.zeros(66, np.uint8)
        labels[rng.choice(66, 4, replace=False)] = 1
        s = smp.Sample(key=key, split="train", lr=textured(rng, 1)[0], hr=textured(rng, 100), labels=labels,
                       tile_frac=np.zeros((100, 66), np.float16), meta={"key": key, "state": "CA"})
        entries.append(shards.Entry(key, "train", "CA", smp.write_staged(root, s)))
    return entries


def drop_caches_hint():
    return "page cache warm for both (same files read by each variant)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=6)
    add_json_arg(ap)
    args = ap.parse_args()
    from gl10m import shards

    tmp = Path(tempfile.mkdtemp(prefix="gl10m-bench-shard-"))
    try:
        t0 = time.perf_counter()
        entries = make_staged(tmp / "w", args.samples)
        files = [p for e in entries for p in sorted(e.folder.iterdir())]
        nbytes = sum(p.stat().st_size for p in files)
        print(f"{args.samples} staged samples, {len(files)} files, {nbytes / 1e6:.1f} MB "
              f"(made in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} cores; {drop_caches_hint()}")

        def copy():
            # a fresh file each round, as the shard stage writes fresh shards (no reused pages)
            (tmp / "copy.bin").unlink(missing_ok=True)
            with open(tmp / "copy.bin", "wb") as out:
                for p in files:
                    out.write(p.read_bytes())
                out.flush()
                os.fsync(out.fileno())

        def build():
            shards.build(entries, tmp / "shards", max_bytes=256 * 1024 * 1024)

        best = {"copy": float("inf"), "shard": float("inf")}
        order = [("copy", copy), ("shard", build)]
        for r in range(args.rounds):  # interleaved, alternating order, best of N: writeback and
            for name, fn in (order if r % 2 == 0 else order[::-1]):  # a shared machine add noise
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        mb = nbytes / 1e6
        print(f"{'variant':<10}{'seconds':>10}{'MB/s':>10}")
        for name in ("copy", "shard"):
            print(f"{name:<10}{best[name]:>10.3f}{mb / best[name]:>10.1f}")
        ratio = best["copy"] / best["shard"]
        print(f"shard / raw copy throughput: {ratio:.2f} (goal >= 0.7)")
        write_json(args.json, "shard", [record(
            "shards.build throughput", mb / best["shard"], "MB/s", "raw copy of the staged files (read+write+fsync)",
            mb / best["copy"], ratio, True,
            "shard MB/s / raw copy MB/s of the same bytes; goal >= 0.7",
            note=f"best of {args.rounds} interleaved rounds")], samples=args.samples, rounds=args.rounds,
            mb=round(mb, 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
