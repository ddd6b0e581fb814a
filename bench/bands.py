"""Benchmark: what imagery.bands costs. rgb (GL-10M) against rgbn and raw, measured in one run.

    .venv/bin/python bench/bands.py [--world BUILT_TESTBED] [--scenes 6] [--repeat 2] [--json PATH]

A testbed world (``gl10m.testbed.build``: TX, WA, AZ at 0.048 degrees, no faults; or ``--world``)
is served like the testbed (Range HTTP + the rustac STAC API on 127.0.0.1), indexed and planned
once (``gl10m index``/``download`` with rgb), then every fetched scene's plan row is fetched again
with :func:`gl10m.fetch.fetch_scene` in each mode, the modes interleaved scene by scene and the
whole pass repeated (`--repeat`), so a shared machine's load falls on every mode alike. Printed
per mode: the median seconds per scene, the staged sample size (all members, and the extra
members alone), and both as ratios against rgb of the same run.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import add_json_arg, record, write_json

MODES = ("rgb", "rgbn", "raw")


def _world(root: Path) -> Path:
    import yaml

    from gl10m.testbed import build as tb
    from gl10m.testbed.spec import DEFAULT_SPEC

    spec = yaml.safe_load(Path(DEFAULT_SPEC).read_text())
    spec["regions"] = {k: v for k, v in spec["regions"].items() if k in ("TX", "WA", "AZ")}
    spec["region_size_deg"] = 0.048
    spec["profile"] = str((Path(DEFAULT_SPEC).parent / spec["profile"]).resolve())
    spec["imagery"]["faults"] = []
    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    tb.build(root / "world", spec_path=root / "spec.yaml")
    return root / "world"


def _mode(p, bands):
    from gl10m import profile as prof

    d = p.model_dump(mode="json", exclude={"source"})
    d["imagery"]["bands"] = bands
    return prof.from_dict(d, p.source)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None, help="a built testbed world (default: build one)")
    ap.add_argument("--scenes", type=int, default=6, help="scenes fetched per mode and pass")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the scenes")
    add_json_arg(ap)
    a = ap.parse_args(argv)

    from gl10m import fetch, samples
    from gl10m import plan as planmod
    from gl10m import profile as prof
    from gl10m.pipelines import download, index
    from gl10m.testbed import serve

    tmp = Path(tempfile.mkdtemp(prefix="gl10m-bench-bands-"))
    try:
        t0 = time.perf_counter()
        world = a.world or _world(tmp)
        p = prof.load(world / "profile.yaml")
        wd = tmp / "wd"
        with serve.serve(world) as srv:
            index.run_index(p, wd, quiet=True)
            download.run_download(p, wd, stac_url=srv.stac_url, quiet=True)
            rows = []
            for r in sorted(p.regions):
                rows += planmod.read_plan(planmod.plan_path(wd, r)).drop(columns="geometry").to_dict("records")
            done = {f.name for f in (wd / "staged").glob("*/*") if not f.name.startswith(".")}
            rows = [r for r in rows if r["key"] in done][:a.scenes]
            if not rows:
                print("no scene was fetched: nothing to measure", file=sys.stderr)
                return 1
            profiles = {m: (p if m == "rgb" else _mode(p, m)) for m in MODES}
            secs: dict[str, list[float]] = {m: [] for m in MODES}
            sizes: dict[str, list[int]] = {m: [] for m in MODES}
            extra: dict[str, list[int]] = {m: [] for m in MODES}
            for rep in range(a.repeat):
                for row in rows:
                    for m in (MODES if rep % 2 == 0 else MODES[::-1]):
                        out = tmp / f"out-{m}"
                        t = time.perf_counter()
                        o = fetch.fetch_scene(row, profiles[m], out)  # the plan's hrefs: the served world's URLs
                        secs[m].append(time.perf_counter() - t)
                        if o.status != "ok":
                            raise SystemExit(f"{row['key']} {m}: {o.label}")
                        if rep == 0:
                            files = {f.name: f.stat().st_size for f in o.path.iterdir()}
                            sizes[m].append(sum(files.values()))
                            std = set(samples.FIELDS)
                            extra[m].append(sum(v for k, v in files.items() if k not in std))
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base_s = statistics.median(secs["rgb"])
    base_b = statistics.mean(sizes["rgb"])
    print(f"imagery.bands cost: {len(rows)} scenes x {a.repeat} passes per mode, modes interleaved "
          f"(wall {wall:.0f} s)")
    print(f"  {'mode':6} {'s/scene':>8} {'x rgb':>6} {'sample MB':>10} {'x rgb':>6} {'extra MB':>9}")
    recs = []
    for m in MODES:
        s, b, x = statistics.median(secs[m]), statistics.mean(sizes[m]), statistics.mean(extra[m])
        print(f"  {m:6} {s:8.3f} {s / base_s:6.2f} {b / 1e6:10.2f} {b / base_b:6.2f} {x / 1e6:9.2f}")
        recs.append(record(f"fetch_scene, imagery.bands {m}", s, "s/scene", "fetch_scene, rgb", base_s,
                           higher_is_better=False, meaning="median seconds per scene (reads, composite, mosaic, "
                           "QC, encode, staging), modes interleaved in one run"))
        recs.append(record(f"staged sample size, imagery.bands {m}", b / 1e6, "MB", "staged sample size, rgb",
                           base_b / 1e6, higher_is_better=False,
                           meaning=f"mean bytes of a staged sample (extra members alone: {x / 1e6:.2f} MB)"))
    write_json(a.json, "bands", recs, scenes=len(rows), repeat=a.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
