"""`gl10m testbed scenes` throughput vs the shard writer alone on the same samples, in one run.

Builds a world of N scenes (layout, osm + anchors labels, 1 m render, Sentinel-2 view, staged
sample) with 1 and 2 Dask workers, then times gl10m.shards.build alone over the same staged
samples (what `gl10m shard` does after a download). Prints scenes/s of each and the ratio of the
whole scene step to the shard writer (how many times the writer's cost a scene costs). Goal:
>= 2 scenes/s with 2 workers on a 2-core machine (5 ideal), so 2,000 scenes take < 17 min.
Run: .venv/bin/python bench/scenes.py [--scenes N] [--workers 1,2] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _results import add_json_arg, record, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--workers", default="1,2", help="comma list of Dask worker counts to time")
    add_json_arg(ap)
    args = ap.parse_args()
    from gl10m import shards
    from gl10m.pipelines.scenes import build_world

    tmp = Path(tempfile.mkdtemp(prefix="gl10m-bench-scenes-"))
    try:
        rows, last = [], None
        for w in [int(x) for x in args.workers.split(",")]:
            out = tmp / f"w{w}"
            t0 = time.perf_counter()
            res = build_world(out, args.scenes, args.seed, workers=w, card=False)
            total = time.perf_counter() - t0
            rows.append((w, res.built / res.seconds, res.seconds, total))
            last = res
        entries = [shards.Entry(r.key, r.split, r.state, last.out_dir / "staged" / r.split / r.key)
                   for r in shards.read_index(last.shards_dir / shards.INDEX_NAME).itertuples()]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            shards.build(entries, tmp / "shards-only")
            best = min(best, time.perf_counter() - t)
        writer = len(entries) / best
        print(f"{args.scenes} scenes, seed {args.seed}, {os.cpu_count()} cores")
        print(f"{'variant':<28}{'seconds':>10}{'scenes/s':>10}")
        for w, sps, sec, total in rows:
            print(f"{f'scenes, {w} worker(s)':<28}{sec:>10.1f}{sps:>10.2f}   (with cluster start and shards: {total:.1f} s)")
        print(f"{'shards.build alone':<28}{best:>10.2f}{writer:>10.1f}")
        for w, sps, _, _ in rows:
            print(f"{w} worker(s): a scene costs {writer / sps:.1f}x the shard writer's time for it "
                  f"(goal >= 2 scenes/s with 2 workers)")
        write_json(args.json, "scenes", [record(
            f"testbed scenes, {w} worker(s)", sps, "scenes/s", "shards.build alone (same samples)", writer,
            sps / writer, True, "scenes/s of the whole scene step / samples/s of the shard writer alone; "
            "goal >= 2 scenes/s with 2 workers", note=f"{args.scenes} scenes") for w, sps, _, _ in rows],
            scenes=args.scenes, seed=args.seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
