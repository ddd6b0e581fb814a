"""Benchmark the osm stage against a bare pyosmium area scan, measured in the same run.

    .venv/bin/python bench/osm.py [--nodes 1100000] [--seed 0] [--keep DIR] [--json PATH]

Generates (seeded) a PBF of >= 1e6 nodes with a realistic mix: many irrelevant buildings and
residential roads, untagged way nodes, tagged POI nodes (some concepts, mostly not), concept
areas, concept lines (highways, railways, rivers, tunnels), multipolygon relations with holes,
route relations; spread over two UTM zones. Rings are random star shapes, so a few self-intersect
(as in real OSM): they show up as repaired (ways) and dropped (relations osmium cannot assemble). Then runs, each in a fresh subprocess (so peak RSS
is per variant):

  baseline   FileProcessor(...).with_areas(), Python sees only areas and reads their tags
  osm/flex   gl10m.osm.extract, node_index=flex_mem
  osm/sfa    gl10m.osm.extract, node_index=sparse_file_array (file in a temp dir)

and prints time, ratio to the baseline, feature rows/s and peak RSS. No timed asserts.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import add_json_arg, record, write_json

ROOT = Path(__file__).resolve().parent.parent
BBOX = (-122.0, 34.0, -118.0, 38.0)  # crosses the UTM 10/11 boundary at -120
M = 1 / 111_320.0  # degrees per metre (latitude)


def generate(path: Path, n_nodes: int, seed: int) -> dict:
    """Write the synthetic PBF; return object counts."""
    import osmium
    from osmium.osm.mutable import Node, Relation, Way

    rng = np.random.default_rng(seed)
    w, s, e, n = BBOX
    counts = dict(nodes=0, ways=0, relations=0)
    nodes: list = []
    ways: list = []
    rels: list = []
    nid = [0]
    wid = [0]

    def new_node(lon, lat, tags=None):
        nid[0] += 1
        nodes.append(Node(id=nid[0], location=(float(lon), float(lat)), tags=tags or {}))
        return nid[0]

    def ring(lon, lat, size_m, k=4):
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = size_m / 2 * rng.uniform(0.7, 1.0, k)
        c = np.cos(np.radians(lat))
        return [new_node(lon + x * M / c, lat + y * M) for x, y in zip(r * np.cos(ang), r * np.sin(ang))]

    def path_(lon, lat, length_m, k):
        dx, dy = rng.normal(size=2)
        d = np.hypot(dx, dy)
        steps = np.arange(k) * length_m / (k - 1)
        c = np.cos(np.radians(lat))
        return [new_node(lon + dx / d * t * M / c, lat + dy / d * t * M) for t in steps]

    def add_way(refs, tags, closed=False):
        wid[0] += 1
        ways.append(Way(id=wid[0], nodes=refs + ([refs[0]] if closed else []), tags=tags))
        return wid[0]

    def spot():
        return rng.uniform(w, e), rng.uniform(s, n)

    concept_areas = [{"leisure": "park"}, {"landuse": "farmland"}, {"leisure": "pitch", "sport": "tennis"},
                     {"leisure": "swimming_pool"}, {"amenity": "parking", "parking": "surface"},
                     {"building": "warehouse"}, {"landuse": "industrial"}, {"amenity": "school"}]
    concept_lines = [{"highway": "primary"}, {"highway": "secondary"}, {"railway": "rail"},
                     {"waterway": "river"}, {"railway": "rail", "bridge": "yes"},
                     {"highway": "motorway", "tunnel": "yes"}]
    poi_concepts = [{"man_made": "tower"}, {"amenity": "fuel"}, {"amenity": "place_of_worship"},
                    {"power": "substation"}, {"amenity": "school"}]
    poi_other = [{"amenity": "bench"}, {"highway": "street_lamp"}, {"shop": "bakery"},
                 {"natural": "tree"}, {"highway": "crossing"}, {"name": "x", "place": "locality"}]

    budget = n_nodes
    while nid[0] < budget:
        r = rng.random()
        lon, lat = spot()
        if r < 0.55:  # building (mostly irrelevant)
            tags = {"building": "barn"} if rng.random() < 0.03 else {"building": "yes"}
            add_way(ring(lon, lat, rng.uniform(8, 30)), tags, closed=True)
        elif r < 0.70:  # road (mostly irrelevant)
            tags = concept_lines[rng.integers(len(concept_lines))] if rng.random() < 0.15 else {"highway": "residential"}
            add_way(path_(lon, lat, rng.uniform(100, 2000), int(rng.integers(4, 16))), dict(tags))
        elif r < 0.73:  # concept area
            add_way(ring(lon, lat, rng.uniform(30, 300), int(rng.integers(4, 10))),
                    dict(concept_areas[rng.integers(len(concept_areas))]), closed=True)
        elif r < 0.74:  # multipolygon with a hole (wood / lake) or an irrelevant one
            outer = add_way(ring(lon, lat, 800, 8), {}, closed=True)
            inner = add_way(ring(lon, lat, 150, 5), {}, closed=True)
            tags = [{"natural": "wood"}, {"water": "lake", "natural": "water"}, {"landuse": "residential"}][
                rng.integers(3)]
            rels.append(Relation(id=len(rels) + 1, members=[("w", outer, "outer"), ("w", inner, "inner")],
                                 tags={"type": "multipolygon", **tags}))
        elif r < 0.745 and ways:  # route relation over a few existing ways
            mem = [("w", int(x), "") for x in rng.choice(np.arange(1, wid[0] + 1), 3, replace=False)]
            rels.append(Relation(id=len(rels) + 1, members=mem, tags={"type": "route", "route": "bus"}))
        else:  # tagged POI node
            tags = poi_concepts[rng.integers(len(poi_concepts))] if rng.random() < 0.1 else \
                poi_other[rng.integers(len(poi_other))]
            new_node(lon, lat, dict(tags))
    if path.exists():
        path.unlink()
    with osmium.SimpleWriter(str(path)) as wr:
        for o in nodes:
            wr.add_node(o)
        for o in ways:
            wr.add_way(o)
        for o in rels:
            wr.add_relation(o)
    counts.update(nodes=len(nodes), ways=len(ways), relations=len(rels))
    return counts


def _peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM: reset by exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(variant: str, pbf: str) -> dict:
    """Run one variant in this process; return timings and peak RSS."""
    t0 = time.perf_counter()
    if variant == "baseline":
        import osmium

        fp = osmium.FileProcessor(pbf).with_areas().with_filter(osmium.filter.EntityFilter(osmium.osm.AREA))
        n = 0
        for a in fp:
            dict(a.tags)
            n += 1
        rows = n
        extra = {}
    else:
        from gl10m import osm, profile

        prof = profile.load()
        idx = {"osm/flex": "flex_mem", "osm/sfa": "sparse_file_array"}[variant]
        with tempfile.TemporaryDirectory() as td:
            res = osm.extract(pbf, prof, node_index=idx, tmpdir=td)
        rows = len(res.features)
        extra = {k: res.stats[k] for k in ("read", "matched", "areas", "lines", "points", "repaired", "dropped")}
    dt = time.perf_counter() - t0
    rss = _peak_rss_mb()
    return dict(variant=variant, seconds=dt, rows=rows, rss_mb=rss, **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1_100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the generated PBF in this folder")
    add_json_arg(ap)
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "PBF"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(*a.one)))
        return 0
    with tempfile.TemporaryDirectory() as td:
        folder = a.keep or Path(td)
        folder.mkdir(parents=True, exist_ok=True)
        pbf = folder / f"bench-{a.nodes}-{a.seed}.osm.pbf"
        t0 = time.perf_counter()
        counts = generate(pbf, a.nodes, a.seed)
        print(f"generated {pbf.name}: {counts['nodes']:,} nodes, {counts['ways']:,} ways, "
              f"{counts['relations']:,} relations, {pbf.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        results = []
        for v in ("baseline", "osm/flex", "osm/sfa"):
            out = subprocess.run([sys.executable, __file__, "--one", v, str(pbf)], check=True,
                                 capture_output=True, text=True, cwd=ROOT).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]["seconds"]
    print(f"{'variant':<10} {'seconds':>8} {'x baseline':>10} {'rows':>8} {'rows/s':>9} {'peak RSS MB':>11}")
    for r in results:
        print(f"{r['variant']:<10} {r['seconds']:8.2f} {r['seconds'] / base:10.2f} {r['rows']:8,d} "
              f"{r['rows'] / r['seconds']:9,.0f} {r['rss_mb']:11.0f}")
    st = results[1]
    print(f"osm stats: read={st['read']:,} matched={st['matched']:,} areas={st['areas']:,} "
          f"lines={st['lines']:,} points={st['points']:,} repaired={st['repaired']} dropped={st['dropped']}")
    print("(baseline rows = areas seen by Python; osm rows = feature rows, buffered lines/points included)")
    b = results[0]
    recs = []
    for r in results[1:]:
        recs.append(record(f"{r['variant']} time", r["seconds"], "s", "bare pyosmium area scan", b["seconds"], None,
                           False, "osm.extract time / bare pyosmium area scan time of the same PBF",
                           note=f"{r['rows']:,} feature rows vs {b['rows']:,} areas seen by the baseline"))
        recs.append(record(f"{r['variant']} peak RSS", r["rss_mb"], "MB", "bare pyosmium area scan", b["rss_mb"], None,
                           False, "peak RSS of osm.extract / of the bare area scan (each in a fresh process)"))
    write_json(a.json, "osm", recs, nodes=counts["nodes"], ways=counts["ways"], relations=counts["relations"],
               seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
