"""Benchmark the anchors stage (anchors -> thinning with the min-concepts rule -> scene stats).

Generates seeded synthetic concept features at a constant density (clustered "towns" over a
rural background; small buildings/pools, mid-size parks, large forest/farm polygons, long
buffered lines), runs the stage on a small set (the baseline, measured in the same run) and on
a 10x larger one over a 10x larger area, and prints anchors/s and the time ratio (near 10 =
linear). With --brute it also times the filter-first reference (scene stats for every anchor,
then thinning) on the small set, the baseline the lazy validation is meant to beat.

    .venv/bin/python bench/anchors.py            # 30k vs 300k features, ~1-2 min on 2 cores
    .venv/bin/python bench/anchors.py --small 10000 --large 100000 --brute
    .venv/bin/python bench/anchors.py --json PATH  # also the figures as JSON records (bench/run_all.py)
"""
from __future__ import annotations

import argparse
import time

import geopandas as gpd
import numpy as np
import shapely
from _results import add_json_arg, record, write_json

from gl10m import anchors as A
from gl10m import profile as P

DENSITY_PER_DEG2 = 28_000  # features per square degree (~3 per km^2 at 40N: a busy state)


def synth_features(n: int, seed: int, profile, lon0: float = -105.0, lat0: float = 38.0) -> gpd.GeoDataFrame:
    """`n` features over a square region sized for DENSITY_PER_DEG2, seeded."""
    rng = np.random.default_rng(seed)
    side = float(np.sqrt(n / DENSITY_PER_DEG2))
    # 60 % in towns (one town per ~3000 features), 40 % scattered
    n_town = int(0.6 * n)
    towns = rng.uniform([lon0, lat0], [lon0 + side, lat0 + side], size=(max(1, n // 3000), 2))
    which = rng.integers(0, len(towns), n_town)
    sigma = rng.uniform(0.01, 0.04, len(towns))[which]
    pts_t = towns[which] + rng.normal(0, 1, (n_town, 2)) * sigma[:, None]
    pts_r = rng.uniform([lon0, lat0], [lon0 + side, lat0 + side], size=(n - n_town, 2))
    pts = np.vstack([pts_t, pts_r])
    # concepts drawn with the GL-10M priors (long tail), 1-2 per feature
    prior = np.array([c.count for c in profile.concepts], dtype="float64")
    prior /= prior.sum()
    c1 = rng.choice(len(prior), n, p=prior)
    c2 = rng.choice(len(prior), n, p=prior)
    two = rng.random(n) < 0.15
    concepts = [np.unique([a, b]).astype("int16") if t else np.array([a], dtype="int16")
                for a, b, t in zip(c1.tolist(), c2.tolist(), two.tolist())]
    # shapes: 70 % small boxes (10-80 m), 15 % mid polygons (100-500 m, 32-gons),
    # 10 % large (0.5-2.5 km, 64-gons), 5 % lines (0.5-4 km, 10 m wide)
    kind = rng.choice(4, n, p=[0.70, 0.15, 0.10, 0.05])
    m = 1 / 111_000.0
    geoms = np.empty(n, dtype=object)
    k = kind == 0
    h = rng.uniform(5, 40, k.sum()) * m
    geoms[k] = shapely.box(pts[k, 0] - h, pts[k, 1] - h, pts[k, 0] + h, pts[k, 1] + h)
    for kk, lo, hi, q in ((1, 50, 250, 8), (2, 250, 1250, 16)):
        k = kind == kk
        geoms[k] = shapely.buffer(shapely.points(pts[k]), rng.uniform(lo, hi, k.sum()) * m, quad_segs=q)
    k = kind == 3
    ang = rng.uniform(0, np.pi, k.sum())
    ln = rng.uniform(500, 4000, k.sum()) * m
    ends = pts[k] + np.column_stack([np.cos(ang), np.sin(ang)]) * ln[:, None]
    lines = shapely.linestrings(np.stack([pts[k], ends], axis=1))
    geoms[k] = shapely.buffer(lines, 5 * m, cap_style="flat")
    types = np.where(kind == 0, "way", np.where(kind == 2, "relation", "way")).astype(object)
    types[(kind == 0) & (rng.random(n) < 0.3)] = "node"
    return gpd.GeoDataFrame({
        "osm_type": types, "osm_id": np.arange(1, n + 1, dtype="int64"), "kind": "area",
        "concepts": concepts, "area_m2": 0.0,
    }, geometry=geoms, crs="EPSG:4326")


def run_stage(features, profile) -> dict:
    c0 = time.process_time()
    t0 = time.perf_counter()
    anchors = A.anchor_points(features, profile)
    t1 = time.perf_counter()
    idx = A._FeatureIndex.build(features, profile.n_concepts)
    status, counts = A.thin_status(anchors, profile, _index=idx)
    t2 = time.perf_counter()
    kept = anchors[status == 1].reset_index(drop=True)
    out = [A.scene_stats(p, None, profile, "XX", _index=idx) for p in A.partitions(kept, 4)] if len(kept) else []
    t3 = time.perf_counter()
    return {"anchors": len(anchors), "kept": counts["kept"], "validated": counts["validated"],
            "dropped": counts["dropped_min_concepts"], "scenes": sum(map(len, out)),
            "t_anchor": t1 - t0, "t_thin": t2 - t1, "t_stats": t3 - t2, "t": t3 - t0,
            "cpu": time.process_time() - c0}


def run_brute(features, profile) -> dict:
    """Filter first: statistics of every anchor's scene, then thinning of the valid ones."""
    t0 = time.perf_counter()
    anchors = A.anchor_points(features, profile)
    idx = A._FeatureIndex.build(features, profile.n_concepts)
    allst = A.scene_stats(anchors, None, profile, "XX", min_concepts_filter=False, _index=idx)
    ok = allst["concepts"].map(len).to_numpy() >= profile.geometry.min_concepts
    valid_ids = set(allst["scene_id"][ok])
    sid = A.scene_ids(anchors["anchor_osm_type"], anchors["anchor_osm_id"])
    kept = A.thin(anchors[np.isin(sid, list(valid_ids))], profile)
    return {"kept": len(kept), "t": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=30_000)
    ap.add_argument("--large", type=int, default=300_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--brute", action="store_true", help="also time filter-first on the small set")
    add_json_arg(ap)
    a = ap.parse_args()
    prof = P.load()
    res: dict[int, list[dict]] = {a.small: [], a.large: []}
    recs = []
    # small, large, small again: the machine is shared, so the baseline is the better of two
    for n in (a.small, a.large, a.small):
        t = time.perf_counter()
        f = synth_features(n, a.seed, prof)
        gen = time.perf_counter() - t
        r = run_stage(f, prof)
        res[n].append(r)
        print(f"{n:>8} features (generated in {gen:.1f} s): {r['anchors']} anchors -> {r['kept']} kept "
              f"({r['dropped']} dropped < min concepts, {r['validated']} validated), {r['scenes']} scenes | "
              f"anchors {r['t_anchor']:.1f} s, thin {r['t_thin']:.1f} s, stats {r['t_stats']:.1f} s, "
              f"total {r['t']:.1f} s wall, {r['cpu']:.1f} s cpu = {r['anchors'] / r['t']:,.0f} anchors/s")
        if a.brute and n == a.small and len(res[n]) == 1:
            b = run_brute(f, prof)
            assert b["kept"] == r["kept"], "filter-first and lazy thinning disagree"
            print(f"{'':>8} filter-first baseline: {b['t']:.1f} s; lazy/filter-first time ratio "
                  f"{r['t'] / b['t']:.3f} (same {b['kept']} kept)")
            recs.append(record(f"lazy thinning, {n} features", r["t"], "s", "filter-first (stats of every anchor)",
                               b["t"], None, False, "lazy validation time / filter-first time on the same set"))
    s = min(res[a.small], key=lambda r: r["cpu"])
    l = res[a.large][0]
    x = l["anchors"] / s["anchors"]
    for what in ("t", "cpu"):
        ratio = l[what] / s[what]
        print(f"scaling {a.small} -> {a.large} features (x{x:.0f} at equal density), {'wall' if what == 't' else 'cpu'}: "
              f"time x{ratio:.1f}; per-anchor cost ratio {ratio / x:.2f} (1.00 = linear)")
        kind = "wall" if what == "t" else "cpu"
        recs.append(record(f"{kind} time per anchor, {a.large} features", 1e6 * l[what] / l["anchors"], "us/anchor",
                           f"{kind} time per anchor, {a.small} features", 1e6 * s[what] / s["anchors"], ratio / x,
                           False, f"per-anchor cost at {x:.0f}x the features (equal density) / at 1x; 1.00 = linear"))
    write_json(a.json, "anchors", recs, small=a.small, large=a.large, seed=a.seed, brute=a.brute)

if __name__ == "__main__":
    main()
