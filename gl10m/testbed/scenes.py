"""The model-scale world: thousands of synthetic GL-10M scenes, straight to staged samples.

Each scene is its own small seeded layout: a mini "region" around the scene footprint, built
by the testbed's recipes (gl10m.testbed.layout `build_region` / `Builder`) with a per-scene
concept budget, then rendered by the testbed's renderer (gl10m.testbed.imagery) and labelled by
the pipeline's own osm and anchors code. Nothing here draws, shades or measures on its own:

1. :func:`plan_world` (seed, N) -> one :class:`ScenePlan` per scene: its state (weighted by the
   profile's per-state targets inside the split), split (exact ~83/8/9 % by a seeded
   permutation), footprint (a distinct 0.024-degree cell of the state's box, never within
   ``splits.border_buffer_deg`` of another split's region), biome (drawn from the state's mixture,
   :data:`STATE_LOOK`) and coast, and a
   concept budget. Budgets follow the profile's ``count`` prior (scenes with the concept in
   GL-10M / 94,077 train+val scenes) with a floor of :data:`FLOOR_SHARE` of the scenes, so every
   concept is asked for at N >= 2,000 (rare ones stay rare: the floor is 0.2 % of scenes) and
   each scene asks for >= 2 concepts.
2. :func:`render_scene` (a plan row) -> arrays: the layout rasterised (raster.rasterize_layers)
   straight onto the scene's EPSG:4326 HR grid (2680 x 2680, gl10m.compose.hr_grid) through a
   local equidistant projection whose pixels are exactly that grid's (so no warping), the 1 m
   surface reflectance (imagery.surface_reflectance), NAIP DN with a per-scene year look
   (shadow_mask, naip_dn); LR = the same ground as Sentinel-2 sees it: 10 x 10 block means of the
   reflectance (imagery.block_mean), imagery.render_s2 (season, PSF blur, noise, L2A DN with the
   baseline's offset; no clouds: the pipeline's composite is cloud-free), then the pipeline's own
   harmonisation and stretch 0..0.3 (gl10m.compose.harmonise / stretch) -> 268 x 268.
3. :func:`scene_labels`: the layout written as a PBF (pbfwrite.write_pbf), read by the osm stage
   (gl10m.osm.extract: the same buffers of lines and points) and measured by the anchors stage
   (gl10m.anchors.scene_stats): labels, per-tile fractions, pixel sizes.
4. :func:`stage_scene`: all of it as one staged sample through gl10m.samples (one writer).

Splits: every scene is its own layout from its own seed, so no feature, layout cell or scene is
shared between scenes at all, let alone across splits; footprints also never overlap and keep
the border buffer to other splits' regions, so gl10m.splits.border_drops drops nothing.
"""
from __future__ import annotations

import datetime as dt
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gl10m.errors import UserError

GENERATOR = "gl10m.testbed.scenes"
GENERATOR_VERSION = 3  # 2: states are biome mixtures; 3: LR block means summed rows-then-columns (float32)
GL10M_SCENES = 94077  # train + val scenes of GL-10M: the denominator of the `count` prior
FLOOR_SHARE = 0.002  # every concept is asked for in at least this share of the scenes (>= 1)
SPLIT_SHARE = {"val": 0.08, "test": 0.09}  # the rest is train (~83 %)
REGION_PAD = 1.1  # the layout covers the footprint times this (features run out of the scene)

# Biomes and coast of each state: ({biome: share of the state's scenes}, coast sides, share of
# scenes on the coast). A state is a mixture, as real states are (California has deserts,
# Texas a coast), and every biome occurs in the train states, so the val/test states (WA; AZ, ME)
# are new places but not new kinds of land: the model is judged on what it could have learnt.
STATE_LOOK: dict[str, tuple[dict[str, float], tuple[str, ...], float]] = {
    "CA": ({"coastal_plain": 0.5, "desert": 0.3, "forest_coast": 0.2}, ("west",), 0.35),
    "TX": ({"prairie": 0.6, "desert": 0.25, "coastal_plain": 0.15}, ("south", "east"), 0.12),
    "FL": ({"coastal_plain": 1.0}, ("east", "west", "south"), 0.5),
    "WA": ({"forest_coast": 0.6, "northern_coast": 0.2, "prairie": 0.2}, ("west", "north"), 0.3),
    "IL": ({"prairie": 1.0}, ("east",), 0.05),
    "PA": ({"forest_coast": 0.6, "northern_coast": 0.2, "prairie": 0.2}, ("north",), 0.05),
    "NC": ({"coastal_plain": 0.6, "forest_coast": 0.4}, ("east",), 0.25),
    "GA": ({"coastal_plain": 0.7, "forest_coast": 0.3}, ("east",), 0.2),
    "CO": ({"prairie": 0.6, "desert": 0.4}, (), 0.0),
    "AZ": ({"desert": 0.85, "prairie": 0.15}, (), 0.0),
    "ME": ({"northern_coast": 0.7, "forest_coast": 0.3}, ("east", "south"), 0.45),
}
DEFAULT_LOOK = ({"prairie": 1.0}, (), 0.0)
# Instances asked for when a scene asks for a concept: 1 + Poisson(extra).
EXTRA_INSTANCES = {"swimming_pool": 3.0, "tennis": 1.0, "parking_lot": 1.5, "farmland": 1.0, "forest": 1.0,
                   "religious_building": 0.3, "pond": 0.5, "barn": 0.5, "gas_station": 0.3, "warehouse": 1.0,
                   "airport_hangar": 1.0, "meadow": 0.5, "chaparral": 0.5, "wetland": 0.5, "baseball_field": 0.5}


class ScenesError(UserError, ValueError):
    """Bad input to the scene generator (one line)."""


@dataclass(frozen=True)
class ScenePlan:
    index: int
    state: str
    split: str
    lon: float  # footprint centre
    lat: float
    biome: str
    coast: str
    town_cells: tuple[int, int]
    budget: dict = field(hash=False)  # concept name -> instances asked for
    seed: int = 0  # the world seed

    @property
    def id_base(self) -> int:
        """OSM ids of this scene's layout count up from here (unique over the world)."""
        return (self.index + 1) * 1_000_000


# ------------------------------------------------------------------------------------------
# 1. plan
# ------------------------------------------------------------------------------------------
def _split_states(profile, states: list[str]) -> dict[str, list[str]]:
    scheme = profile.splits.schemes[profile.splits.scheme]
    out = {s: [c for c in getattr(scheme, s) if c in states] for s in ("train", "val", "test")}
    return {s: v for s, v in out.items() if v}


def split_counts(n: int, splits: list[str]) -> dict[str, int]:
    """Scenes per split: val and test get round(share * n) (when present), train the rest."""
    out = {s: int(round(SPLIT_SHARE[s] * n)) for s in splits if s != "train"}
    if "train" in splits:
        out["train"] = n - sum(out.values())
    elif out:  # no train state selected: the rest goes to the first held-out split
        first = sorted(out)[0]
        out[first] += n - sum(out.values())
    return out


def concept_quota(profile, n: int) -> np.ndarray:
    """Scenes that ask for each concept: round(n * count / GL10M_SCENES), at least the floor."""
    counts = np.array([c.count for c in profile.concepts], dtype=float)
    floor = max(1, int(math.ceil(FLOOR_SHARE * n)))
    return np.clip(np.maximum(np.round(n * counts / GL10M_SCENES), floor), 0, n).astype(int)


def _pick_cells(rng, profile, state: str, k: int, other_boxes: list, taken: set) -> list[tuple[float, float]]:
    """k footprint centres in distinct footprint cells of the state's box, away from other splits."""
    fp = profile.geometry.footprint_deg
    buf = profile.splits.border_buffer_deg
    w, s, e, n = profile.regions[state].bbox
    nx, ny = int((e - w) // fp), int((n - s) // fp)
    if nx < 1 or ny < 1:
        raise ScenesError(f"state {state}: its box is smaller than one scene footprint")
    out, guard = [], 0
    while len(out) < k:
        guard += 1
        if guard > 200 * k + 1000:
            raise ScenesError(f"state {state}: cannot place {k} non-overlapping scenes in its box")
        i, j = int(rng.integers(nx)), int(rng.integers(ny))
        if (state, i, j) in taken:
            continue
        fw, fs = w + i * fp, s + j * fp
        if any(fw - buf < be and fw + fp + buf > bw and fs - buf < bn and fs + fp + buf > bs
               for bw, bs, be, bn in other_boxes):
            continue
        taken.add((state, i, j))
        out.append((round(fw + fp / 2, 7), round(fs + fp / 2, 7)))
    return out


def plan_world(n: int, seed: int, profile, states: list[str] | None = None) -> list[ScenePlan]:
    """The plan of a world of `n` scenes (see the module doc); a pure function of its inputs."""
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ScenesError(f"--scenes must be a positive number of scenes, got {n}")
    regions = profile.select_regions(states)
    by_split = _split_states(profile, regions)
    if not by_split:
        raise ScenesError(f"no selected state ({', '.join(regions)}) is in a split of scheme {profile.splits.scheme}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 14, int(n)]))
    counts = split_counts(n, sorted(by_split))
    order = rng.permutation(n)
    split_of = np.empty(n, dtype=object)
    pos = 0
    for s in ("train", "val", "test"):
        for i in order[pos:pos + counts.get(s, 0)]:
            split_of[i] = s
        pos += counts.get(s, 0)
    # states: weighted by the profile's per-state download targets within the split
    state_of = np.empty(n, dtype=object)
    for s, codes in by_split.items():
        idx = np.flatnonzero(split_of == s)
        w = np.array([profile.regions[c].target for c in codes], float)
        state_of[idx] = np.array(codes, dtype=object)[rng.choice(len(codes), size=len(idx), p=w / w.sum())]
    # footprints: distinct cells, away from the boxes of regions of other splits
    centre: dict[int, tuple[float, float]] = {}
    taken: set = set()
    for code in sorted(set(state_of)):
        split = profile.split_of(code)
        others = [r.bbox for c, r in sorted(profile.regions.items())
                  if profile.split_of(c) not in (None, split) and c != code]
        idx = np.flatnonzero(state_of == code)
        for i, c in zip(idx, _pick_cells(rng, profile, code, len(idx), others, taken)):
            centre[int(i)] = c
    # concept budgets: each concept asked for by its quota of scenes, >= 2 concepts a scene
    names = [c.name for c in profile.concepts]
    prior = np.array([c.count for c in profile.concepts], float)
    asked = [set() for _ in range(n)]
    for k, q in enumerate(concept_quota(profile, n)):
        for i in rng.choice(n, size=int(q), replace=False):
            asked[int(i)].add(k)
    p = prior / prior.sum()
    for i in range(n):
        while len(asked[i]) < 2:
            asked[i].add(int(rng.choice(len(names), p=p)))
    from gl10m.testbed.spec import COASTAL
    out = []
    for i in range(n):
        st = str(state_of[i])
        mix, sides, share = STATE_LOOK.get(st, DEFAULT_LOOK)
        kinds = sorted(mix)
        w = np.array([mix[b] for b in kinds], float)
        biome = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        wants_coast = any(names[k] in COASTAL for k in asked[i])
        u = rng.random()
        coast = "none"
        if sides and (wants_coast or u < share):
            coast = sides[int(rng.integers(len(sides)))]
        elif wants_coast:  # a coastal concept in a state without a coast in the table: a lake shore
            coast = ("north", "south", "east", "west")[int(rng.integers(4))]
        budget = {}
        for k in sorted(asked[i]):
            extra = EXTRA_INSTANCES.get(names[k], 0.0)
            budget[names[k]] = 1 + (int(rng.poisson(extra)) if extra else 0)
        town = (int(rng.integers(3, 7)), int(rng.integers(3, 6)))
        lon, lat = centre[i]
        out.append(ScenePlan(i, st, str(split_of[i]), lon, lat, biome, coast, town, budget, int(seed)))
    return out


# ------------------------------------------------------------------------------------------
# 2. layout
# ------------------------------------------------------------------------------------------
def _spec(plan: ScenePlan, profile):
    from gl10m.testbed.spec import TestbedSpec

    fp = profile.geometry.footprint_deg
    return TestbedSpec.model_validate({
        "name": "scenes", "seed": plan.seed, "region_size_deg": round(fp * REGION_PAD, 7), "cell_m": 200.0,
        "street_margin_m": 18.0, "frequency": {"scale": 1.0, "min_per_concept": 1, "max_per_concept": 1},
        "regions": {plan.state: {"center": (plan.lon, plan.lat), "biome": plan.biome, "coast": plan.coast,
                                 "town_cells": plan.town_cells}}})


_MATCHER = {}


def layout(plan: ScenePlan, profile, attempt: int = 0):
    """The scene's layout (a layout.RegionWorld in EPSG:4326), from the world seed, the scene index
    and the layout attempt (a retry lays the scene out again from another sub-seed)."""
    from gl10m.concepts import ConceptMatcher
    from gl10m.testbed.layout import build_region

    key = profile.hash()
    if key not in _MATCHER:
        _MATCHER[key] = ConceptMatcher(profile.concepts)
    entropy = [plan.seed, 14, 1, plan.index] + ([attempt] if attempt else [])
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    return build_region(_spec(plan, profile), plan.state, rng, plan.budget, _MATCHER[key], plan.id_base,
                          split=plan.split, budget_network=True)


def footprint(plan: ScenePlan, profile) -> tuple[float, float, float, float]:
    from gl10m import geometry as geo

    b = geo.footprint_bounds(np.array([plan.lon]), np.array([plan.lat]), profile.geometry.footprint_deg)[0]
    return tuple(float(v) for v in b)


# ------------------------------------------------------------------------------------------
# 3. render
# ------------------------------------------------------------------------------------------
def local_crs(bounds) -> str:
    """An equidistant cylindrical CRS centred on the footprint (metres; x, y linear in lon, lat),
    so the EPSG:4326 HR grid is an affine grid in it and metre widths stay metres."""
    w, s, e, n = bounds
    return (f"+proj=eqc +lat_ts={(s + n) / 2:.9f} +lat_0=0 +lon_0={(w + e) / 2:.9f} +x_0=0 +y_0=0 "
            "+ellps=WGS84 +units=m +no_defs")


def metric_grid(bounds, size: int):
    """(crs, transform, xs, ys) of the `size` x `size` EPSG:4326 grid over `bounds`, in local_crs."""
    from affine import Affine

    from gl10m.testbed.shapes import transformer_from_4326

    crs = local_crs(bounds)
    tr = transformer_from_4326(crs)  # the one rasterize_layers then uses for this scene
    w, s, e, n = bounds
    (x0, x1), (y0, y1) = tr.transform([w, e], [n, s])[0], tr.transform([w, e], [n, s])[1]
    px, py = (x1 - x0) / size, (y0 - y1) / size
    transform = Affine(px, 0.0, x0, 0.0, -py, y0)
    xs = x0 + (np.arange(size) + 0.5) * px
    ys = y0 - (np.arange(size) + 0.5) * py
    return crs, transform, xs, ys


@dataclass
class Rendered:
    hr: np.ndarray  # [H, W, 3] uint8 NAIP RGB on the HR grid
    lr: np.ndarray  # [268, 268, 3] uint8 stretched Sentinel-2 RGB
    lr_refl: np.ndarray  # [3, 268, 268] float32 harmonised reflectance (R, G, B)
    truth: np.ndarray | None  # [H, W] uint8 truth class per HR pixel (classes.TRUTH_CLASSES)
    marks: np.ndarray | None  # [H, W] uint8 mark id per HR pixel (classes.MARK_NAMES), with keep_truth
    naip: dict
    s2: dict


def naip_year_for(state: str):
    """The scene's NAIP state-year: the newest testbed year inside GL-10M's window, else 2022."""
    from gl10m.testbed.imagery import ImagerySpec, NaipYear

    ok = [y for y in ImagerySpec().years_for(state)
          if dt.date(2022, 1, 1) <= y.date <= dt.date(2024, 4, 1) and abs(y.gsd - 1.0) < 1e-9]
    return ok[-1] if ok else NaipYear(year=2022, date=dt.date(2022, 6, 20))


def render_scene(plan: ScenePlan, region, profile, *, marks: bool = True, keep_truth: bool = False) -> Rendered:
    """HR and LR of one scene from its layout (see the module doc). marks=False renders without the
    detail layer (court lines, rows, vehicles ...): only for measuring what the marks carry."""
    from gl10m import compose
    from gl10m.testbed import imagery as I
    from gl10m.testbed.raster import rasterize_layers

    bounds = footprint(plan, profile)
    size = profile.geometry.hr_px
    crs, transform, xs, ys = metric_grid(bounds, size)
    layers = rasterize_layers(region, crs, transform, (size, size))
    tables = _tables()
    key = I.key_of(layers["classes"], layers["material"], tables, int(region.base_cover))
    mk = layers["marks"] if marks else None
    ny = naip_year_for(plan.state)
    look = I.year_look(plan.seed, f"{plan.state}-{plan.index}", ny, plan.lat)
    shadow = I.shadow_mask(key, tables, look, 1.0)
    tex_seed = I.subseed(plan.seed, "texture", plan.index)
    k = int(profile.geometry.lr_px)
    f = size // k
    hr = np.empty((size, size, 3), np.uint8)
    refl10 = np.empty((3, k, k), np.float32)
    veg10 = np.empty((3, k, k), np.float32)
    vegs10 = np.empty((k, k), np.float32)
    water10 = np.empty((k, k), np.float32)
    rng = I.rng_for(plan.seed, "naip-noise", plan.index)
    strip = f * 67  # rows per strip: whole LR rows
    for r0 in range(0, size, strip):
        r1 = min(size, r0 + strip)
        kk = key[r0:r1]
        refl = I.surface_reflectance(kk, None if mk is None else mk[r0:r1], xs, ys[r0:r1], tables, tex_seed, bands=3)
        veg = tables.veg[kk]
        dn = I.naip_dn(refl, veg, shadow[r0:r1], look, rng, 1)
        hr[r0:r1] = dn.transpose(1, 2, 0)
        q0, q1 = r0 // f, r1 // f
        refl10[:, q0:q1] = I.block_mean(refl, f, np.float32)
        refl *= veg
        veg10[:, q0:q1] = I.block_mean(refl, f, np.float32)
        vegs10[q0:q1] = I.block_mean(veg, f, np.float32)
        water10[q0:q1] = I.block_mean(tables.water[kk], f, np.float32)
    # Sentinel-2 sees the same ground: the 10 m means, a cloud-free L2A granule of the scene
    spec = I.ImagerySpec()
    date = dt.date(2023, 6, 1) + dt.timedelta(days=int(I.rng_for(plan.seed, "s2-date", plan.index).integers(0, 120)))
    base = I.S2Base(I.Grid(32600, 0.0, 0.0, 10.0, k, k), refl10, veg10, vegs10, water10)
    sd = I.S2Date(date=date, cloud_pct=0.0, baseline="05.09")
    scene = I.render_s2(base, sd, date, plan.lat, plan.seed, f"{plan.state}-{plan.index}", spec, sd.baseline)
    refl_lr = np.stack([compose.harmonise(scene.bands[b], sd.baseline, profile) for b in ("B04", "B03", "B02")])
    lo, hi = profile.imagery.s2.stretch
    lr = compose.stretch(refl_lr, lo, hi)
    naip = {"year": ny.year, "date": ny.date.isoformat(), "gsd_m": 1.0, "sun_azimuth": round(look.sun_azimuth, 3),
            "sun_elevation": round(look.sun_elevation, 3), "season": round(look.season, 4)}
    s2 = {"date": date.isoformat(), "baseline": sd.baseline, "psf_sigma_px": spec.s2_psf_sigma_px,
          "noise": spec.s2_noise, "stretch": [lo, hi]}
    return Rendered(hr, lr, refl_lr, layers["classes"] if keep_truth else None,
                    layers["marks"] if keep_truth else None, naip, s2)


_TABLES = []


def _tables():
    from gl10m.testbed.imagery import default_tables

    if not _TABLES:
        _TABLES.append(default_tables())
    return _TABLES[0]


# ------------------------------------------------------------------------------------------
# 4. labels: the osm stage and the anchors stage on the scene's own layout
# ------------------------------------------------------------------------------------------
def concept_features(region, profile, tmpdir: str | Path | None = None):
    """The layout through the osm stage: written as a PBF, read by gl10m.osm.extract (the same
    area/line/point rules and buffers as for a real extract)."""
    from gl10m import osm
    from gl10m.testbed.pbfwrite import write_pbf

    with tempfile.TemporaryDirectory(prefix="gl10m-scene-", dir=tmpdir) as d:
        pbf = write_pbf([region], Path(d) / "scene.osm.pbf")
        return osm.extract(pbf, profile, node_index="flex_mem", tmpdir=d).features


def scene_labels(plan: ScenePlan, features, profile):
    """One candidate row (gl10m.anchors schema) for the scene, measured by anchors.scene_stats.

    The scene's anchor is its object of the rarest concept (as the anchors stage picks anchors),
    placed at the planned footprint centre; scene_stats does the rest (min-concepts rule off:
    the caller decides what to do with a scene of fewer concepts)."""
    import geopandas as gpd

    from gl10m import anchors

    pts = anchors.anchor_points(features, profile) if len(features) else None
    if pts is None or len(pts) == 0:
        a_type, a_id, a_con = "node", plan.id_base, -1
    else:
        o = anchors.priority_order(pts)[0]
        a_type, a_id, a_con = str(pts["anchor_osm_type"].iloc[o]), int(pts["anchor_osm_id"].iloc[o]), \
            int(pts["anchor_concept"].iloc[o])
    sc = gpd.GeoDataFrame({"lon": [plan.lon], "lat": [plan.lat], "anchor_osm_type": [a_type],
                           "anchor_osm_id": [a_id], "anchor_concept": np.array([a_con], "int16")},
                          geometry=gpd.points_from_xy([plan.lon], [plan.lat]), crs="EPSG:4326")
    feats = features if len(features) else features.iloc[:0]
    out = anchors.scene_stats(sc, feats, profile, plan.state, min_concepts_filter=False)
    return out.iloc[0]


# ------------------------------------------------------------------------------------------
# 5. one scene end to end -> a staged sample
# ------------------------------------------------------------------------------------------
MAX_ATTEMPTS = 4


def _retry_plan(plan: ScenePlan, attempt: int) -> ScenePlan:
    """A scene whose layout left fewer than min_concepts present concepts is laid out again from
    another sub-seed with two common covers added (deterministic: attempt k of the same plan)."""
    import dataclasses
    budget = dict(plan.budget)
    for name in ("meadow", "forest", "farmland", "parking_lot")[:attempt + 1]:
        budget.setdefault(name, 1)
    return dataclasses.replace(plan, budget=budget)


def _black_ratio(img: np.ndarray, level: int) -> float:
    c = img[..., 0] | img[..., 1] | img[..., 2] if level == 0 else np.maximum(np.maximum(img[..., 0], img[..., 1]),
                                                                               img[..., 2])
    return float(np.count_nonzero(c <= level) / c.size)


def build_meta(plan: ScenePlan, row, profile, n_scenes: int, r: Rendered, attempt: int) -> dict:
    """meta.json: the fields of a fetched sample that apply (ids, footprint, grids, ground pixel
    sizes, concepts, QC) plus a provenance block saying these are synthetic scenes."""
    from gl10m import __version__, compose
    from gl10m.geometry import georef_meta

    g = profile.geometry
    bounds = footprint(plan, profile)
    lrg, hrg = compose.lr_grid(bounds, profile), compose.hr_grid(bounds, profile)
    lr_m, hr_m = compose.ground_px_m(lrg), compose.ground_px_m(hrg)
    concepts = sorted(int(c) for c in row["concepts"])
    lvl = profile.qc.black_level
    tiles_black = [round(_black_ratio(t, lvl), 6) for t in compose.cut_tiles(r.hr, g.grid)]
    return {
        "scene_id": str(row["scene_id"]), "state": plan.state,
        "footprint": {"west": bounds[0], "south": bounds[1], "east": bounds[2], "north": bounds[3]},
        "crs": "EPSG:4326",
        "lr": {"width": lrg.width, "height": lrg.height, "px_deg": list(lrg.px_deg),
               "px_m_x": round(lr_m[0], 4), "px_m_y": round(lr_m[1], 4), "bands": ["B04", "B03", "B02"]},
        "hr": {"width": hrg.width, "height": hrg.height, "px_deg": list(hrg.px_deg),
               "px_m_x": round(hr_m[0], 4), "px_m_y": round(hr_m[1], 4), "bands": ["R", "G", "B"],
               "grid": g.grid, "tile_px": g.tile_px, "tile_index": "row*grid + col, row 0 = north, col 0 = west"},
        "georef": georef_meta(lrg, hrg, g.grid),
        "concepts": [profile.concepts[c].name for c in concepts], "concept_ids": concepts,
        "anchor": {"osm_type": str(row["anchor_osm_type"]), "osm_id": int(row["anchor_osm_id"]),
                   "concept": int(row["anchor_concept"])},
        "naip": {**r.naip, "items": [], "mosaic": "synthetic: rendered on the HR grid"},
        "s2": {**r.s2, "items": [], "window": "synthetic", "composite": "one cloud-free synthetic L2A granule",
               "harmonisation": {"offset": int(profile.imagery.s2.offset), "rule": "compose.harmonise"}},
        "qc": {"black_level": lvl, "max_black_ratio": profile.qc.max_black_ratio,
               "lr_black_ratio": round(_black_ratio(r.lr, lvl), 6),
               "hr_black_ratio_max": max(tiles_black), "hr_black_ratios": tiles_black},
        "provider": "synthetic",
        "plan_hash": "",
        "profile": {"name": profile.name, "version": profile.version, "hash": profile.hash()},
        "builder": {"name": "gl10m", "version": __version__},
        "provenance": {"synthetic": True, "generator": GENERATOR, "generator_version": GENERATOR_VERSION,
                       "seed": plan.seed, "scene_index": plan.index, "n_scenes": int(n_scenes),
                       "biome": plan.biome, "coast": plan.coast, "budget": dict(sorted(plan.budget.items())),
                       "layout_attempt": attempt,
                       "note": "a synthetic scene of the gl10m testbed world: one seeded layout per scene, "
                               "rendered by gl10m.testbed.imagery; not real imagery"},
    }


def scene_key(plan: ScenePlan, row) -> str:
    return f"{plan.state}-{row['scene_id']}"


def build_scene(plan: ScenePlan, profile, out_root: str | Path, n_scenes: int, *,
                truth_dir: str | Path | None = None) -> dict:
    """Lay out, label, render and stage one scene (``out_root/staged/{split}/{key}/``).

    A plain function of its inputs (no Dask): the same plan gives the same bytes. Returns
    {key, split, state, west, south, east, north, concepts, folder, attempt}. With `truth_dir`,
    also writes ``{truth_dir}/{key}.npy``: the 1 m truth class per HR pixel (uint8,
    classes.TRUTH_CLASSES; the layout's top feature, as rendered).
    """
    from gl10m import samples

    min_c = profile.geometry.min_concepts
    for attempt in range(MAX_ATTEMPTS):
        p = plan if attempt == 0 else _retry_plan(plan, attempt)
        region = layout(p, profile, attempt)
        feats = concept_features(region, profile)
        row = scene_labels(p, feats, profile)
        if len(row["concepts"]) >= min_c:
            break
    else:
        raise RuntimeError(f"scene {plan.index}: fewer than {min_c} concepts after {MAX_ATTEMPTS} layouts")
    r = render_scene(p, region, profile, keep_truth=truth_dir is not None)
    key = scene_key(p, row)
    n = profile.n_concepts
    sample = samples.Sample(
        key=key, split=plan.split, lr=r.lr, hr=_tiles(r.hr, profile.geometry.grid),
        labels=samples.labels_from_concepts(row["concepts"], n),
        tile_frac=samples.dense_tile_frac(list(row["tile_idx"]), list(row["tile_concept"]), list(row["tile_frac"]),
                                          n, profile.geometry.grid ** 2),
        meta=build_meta(p, row, profile, n_scenes, r, attempt))
    folder = samples.write_staged(out_root, sample, durable=False)  # regenerable bit for bit
    if truth_dir is not None:
        from gl10m.io import atomic_path
        with atomic_path(Path(truth_dir) / f"{key}.npy") as tmp:
            np.save(tmp, r.truth, allow_pickle=False)
    b = footprint(p, profile)
    return {"key": key, "split": plan.split, "state": plan.state, "west": b[0], "south": b[1], "east": b[2],
            "north": b[3], "concepts": [int(c) for c in row["concepts"]], "folder": str(folder), "attempt": attempt}


def _tiles(hr: np.ndarray, grid: int) -> np.ndarray:
    from gl10m import compose
    return compose.cut_tiles(hr, grid)
