"""The testbed's vector world: a seeded, realistic-looking OSM world for every concept.

`load_spec` reads manifests/testbed.yaml; `generate` lays out each region (sea, river, highway,
railway with a viaduct, an overpass and a tunnel, a town with streets and blocks, an industrial
zone, rural parcels, and sites such as an airport, a port or a wind farm) in the region's UTM
(NAD83) zone on a grid of cells, and returns one `RegionWorld` per region with its features as
a GeoDataFrame (EPSG:4326). `write_pbf` writes them as an OSM PBF (real nodes, ways and
multipolygon relations carrying the tags the profile's rules match); `rasterize_truth` burns the
same features into a truth raster (class id per pixel, see TRUTH_CLASSES) plus a detail layer
of thin markings (MARK_NAMES) that the imagery renderer paints so small objects are
recognisable at 1 m.

Truth ids: 0..65 are the profile's concepts, 66.. the background classes below, 255 nodata.
Draw order (`z`, higher on top): 1 containers (landuse, grounds), 2 land cover, 3 water,
4 ground surfaces (pitches, parking, runways), 5 minor roads and rails, 6 major roads,
7 buildings, 8 small objects, 9 bridges and dams.
Ways are drawn buffered to `width_m` (ground width); nodes as discs of diameter `width_m`;
a tunnel way (tunnel=yes) is drawn only as its two portals.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gl10m import safeyaml
from gl10m.errors import UserError
from gl10m.profile import DEFAULT_PROFILE, MANIFESTS, Profile, format_validation_error, load as load_profile

DEFAULT_SPEC = MANIFESTS / "testbed.yaml"

_DEFAULT_PROFILE = load_profile(DEFAULT_PROFILE)
CONCEPT_NAMES: list[str] = [c.name for c in _DEFAULT_PROFILE.concepts]
CID: dict[str, int] = {n: i for i, n in enumerate(CONCEPT_NAMES)}

BACKGROUND_CLASSES = ["grass", "bare_soil", "residential", "building", "minor_road", "sea", "paved", "trees"]
TRUTH_CLASSES: list[str] = CONCEPT_NAMES + BACKGROUND_CLASSES
NODATA = 255
BG: dict[str, int] = {n: len(CONCEPT_NAMES) + i for i, n in enumerate(BACKGROUND_CLASSES)}

# Detail marks (the `marks` layer of rasterize_truth): 0 = none.
MARK_NAMES: list[str] = [
    "none", "court_line", "parking_stripe", "rail_track", "road_marking", "roof_ridge",
    "helipad_marking", "runway_marking", "solar_row", "crop_row", "pool_edge", "shadow",
    "turbine_blade", "grave_row", "vehicle", "fence", "boat", "tank_rim",
]
MARK: dict[str, int] = {n: i for i, n in enumerate(MARK_NAMES)}

# Surface materials (the `material` layer of rasterize_layers): what the ground or roof is made
# of, so the renderer can tell a church roof from its parking lot though both carry a class.
MATERIALS: list[str] = [
    "none", "grass", "lawn", "dry_grass", "crop", "trees", "shrub", "marsh", "water", "sea", "sand", "desert",
    "soil", "rock", "gravel", "asphalt", "concrete", "roof", "roof_metal", "court", "turf", "pool", "solar", "track",
]
MATERIAL: dict[str, int] = {n: i for i, n in enumerate(MATERIALS)}
_CLASS_MATERIAL: dict[str, str] = {
    "tennis": "court", "skate_park": "concrete", "american_football": "turf", "swimming_pool": "pool",
    "golf_course": "lawn", "baseball_field": "turf", "stadium": "concrete", "roundabout": "asphalt",
    "airport": "dry_grass", "port": "concrete", "railway_station": "roof", "runway": "asphalt",
    "airport_hangar": "roof_metal", "airport_terminal": "roof", "helipad": "concrete", "dam": "concrete",
    "electric_substation": "gravel", "shipyard": "concrete", "solar_farm": "solar", "wind_farm": "dry_grass",
    "surface_mine": "rock", "waste_disposal": "soil", "water_treatment_facility": "concrete", "marina": "water",
    "beach": "sand", "parking_garage": "concrete", "parking_lot": "asphalt", "soccer": "turf", "farmland": "crop",
    "forest": "trees", "lake": "water", "wetland": "marsh", "park": "lawn", "river": "water", "desert": "desert",
    "meadow": "grass", "bareland": "rock", "chaparral": "shrub", "industrial": "concrete", "aquaculture": "water",
    "construction_site": "soil", "nature_reserve": "grass", "school": "lawn", "university": "lawn",
    "hospital": "lawn", "supermarket": "roof", "shopping_mall": "roof", "warehouse": "roof_metal", "office": "roof",
    "religious_building": "roof", "fire_station": "roof", "police_station": "roof", "prison": "gravel",
    "gas_station": "asphalt", "barn": "roof_metal", "car_dealership": "asphalt", "railroad": "track",
    "highway": "asphalt", "overpass": "concrete", "viaduct": "concrete", "tower": "concrete", "toll_booth": "roof",
    "tunnel_opening": "concrete", "pond": "water", "sand": "sand", "cemetery": "lawn",
    "grass": "grass", "bare_soil": "soil", "residential": "lawn", "building": "roof", "minor_road": "asphalt",
    "sea": "sea", "paved": "concrete", "trees": "trees",
}
# default material of each truth id (index = truth id)
CLASS_MATERIAL: list[int] = [MATERIAL[_CLASS_MATERIAL[n]] for n in TRUTH_CLASSES]

Z_CONTAINER, Z_COVER, Z_WATER, Z_GROUND, Z_MINOR, Z_MAJOR, Z_BUILDING, Z_SMALL, Z_BRIDGE = range(1, 10)

# Biomes: base land cover and concept affinity multipliers (default 1.0).
BIOMES: dict[str, dict[str, Any]] = {
    "coastal_plain": {"base": "grass", "w": {
        "desert": 0, "farmland": 2.5, "chaparral": 2, "beach": 3, "port": 2, "marina": 2, "shipyard": 1,
        "sand": 1.5, "forest": 0.4, "wetland": 0.8, "aquaculture": 1.5}},
    "prairie": {"base": "grass", "w": {
        "desert": 0.3, "farmland": 2.5, "meadow": 2, "wind_farm": 3, "forest": 0.6, "stadium": 2,
        "american_football": 2, "chaparral": 0.5}},
    "forest_coast": {"base": "grass", "w": {
        "desert": 0, "forest": 2.5, "wetland": 1.5, "port": 3, "shipyard": 3, "marina": 2, "chaparral": 0.3,
        "sand": 0.3, "farmland": 0.5}},
    "desert": {"base": "bare_soil", "w": {
        "desert": 5, "sand": 2.5, "bareland": 2.5, "chaparral": 2, "forest": 0.1, "wetland": 0.2,
        "swimming_pool": 2.5, "golf_course": 2, "solar_farm": 3, "lake": 0.3, "farmland": 0.6,
        "meadow": 0.2, "aquaculture": 0.2, "pond": 0.5, "surface_mine": 2}},
    "northern_coast": {"base": "grass", "w": {
        "desert": 0, "forest": 3, "wetland": 2.5, "beach": 2, "marina": 3, "aquaculture": 3, "port": 1,
        "shipyard": 1, "chaparral": 0.2, "sand": 0.6, "solar_farm": 0.3, "swimming_pool": 0.5}},
}
COASTAL = {"beach", "port", "shipyard", "marina"}


class TestbedSpecError(UserError, ValueError):
    """A testbed spec that cannot be used; one line naming the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegionSpec(_Strict):
    center: tuple[float, float]
    biome: Literal["coastal_plain", "prairie", "forest_coast", "desert", "northern_coast"]
    coast: Literal["none", "north", "south", "east", "west"] = "none"
    town_cells: tuple[int, int] = (7, 6)

    @field_validator("town_cells")
    @classmethod
    def _town(cls, v):
        if v[0] < 3 or v[1] < 3:
            raise ValueError("town_cells must be at least [3, 3]")
        return v


class Frequency(_Strict):
    scale: float = Field(gt=0)
    min_per_concept: int = Field(ge=1)
    max_per_concept: int = Field(ge=1)


class TestbedSpec(_Strict):
    name: str
    seed: int = Field(ge=0)
    profile: str = "gl10m-66.yaml"
    region_size_deg: float = Field(gt=0, le=0.5)
    cell_m: float = Field(ge=100, le=500)
    street_margin_m: float = Field(ge=5, le=40)
    frequency: Frequency
    regions: dict[str, RegionSpec] = Field(min_length=1)
    imagery: dict[str, Any] = Field(default_factory=dict)
    # geometry.max_overlap of the world's profile.yaml (None: the base profile's value). A small
    # region holds only a few non-overlapping 0.024-degree scenes; letting the testbed's scenes
    # overlap gives the demo more of them without rendering a bigger world.
    max_overlap: float | None = Field(default=None, ge=0, le=1)
    source: Path | None = Field(default=None, exclude=True)

    def profile_path(self) -> Path:
        p = Path(self.profile)
        if not p.is_absolute():
            p = (self.source.parent if self.source else MANIFESTS) / p
        return p

    def load_profile(self) -> Profile:
        return load_profile(self.profile_path())

    def region_bbox(self, code: str) -> tuple[float, float, float, float]:
        lon, lat = self.regions[code].center
        h = self.region_size_deg / 2
        return (round(lon - h, 7), round(lat - h, 7), round(lon + h, 7), round(lat + h, 7))


def spec_from_dict(data: Any, source: Path | str | None = None) -> TestbedSpec:
    """Validate a spec mapping against the schema and its profile (regions, splits, sizes)."""
    label = Path(source).name if source else "<dict>"
    if not isinstance(data, dict):
        raise TestbedSpecError(f"testbed spec {label}: expected a mapping at the top level")
    try:
        spec = TestbedSpec.model_validate(data)
    except ValidationError as e:
        raise TestbedSpecError(f"testbed spec {label}: {format_validation_error(e)}") from None
    if source is not None:
        spec = spec.model_copy(update={"source": Path(source).resolve()})
    try:
        prof = spec.load_profile()
    except UserError as e:
        raise TestbedSpecError(f"testbed spec {label}: profile: {e}") from None
    names = [c.name for c in prof.concepts]
    if names != CONCEPT_NAMES:
        raise TestbedSpecError(f"testbed spec {label}: profile {prof.name} does not have the 66 GL-10M concepts in order")
    fp = prof.geometry.footprint_deg
    if spec.region_size_deg < 2 * fp:
        raise TestbedSpecError(f"testbed spec {label}: region_size_deg {spec.region_size_deg} must be >= {2 * fp} "
                               f"(2 x 2 scene footprints of {fp} deg)")
    if spec.frequency.max_per_concept < spec.frequency.min_per_concept:
        raise TestbedSpecError(f"testbed spec {label}: frequency.max_per_concept < min_per_concept")
    for code, r in sorted(spec.regions.items()):
        if code not in prof.regions:
            raise TestbedSpecError(f"testbed spec {label}: regions.{code}: not a region of profile {prof.name}")
        w, s, e, n = spec.region_bbox(code)
        sw, ss, se, sn = prof.regions[code].bbox
        if not (sw <= w and e <= se and ss <= s and n <= sn):
            raise TestbedSpecError(f"testbed spec {label}: regions.{code}: bbox {[w, s, e, n]} is not inside "
                                   f"the state's bbox {list(prof.regions[code].bbox)}")
    scheme = prof.splits.schemes[prof.splits.scheme]
    for split in ("train", "val", "test"):
        if not set(getattr(scheme, split)) & set(spec.regions):
            raise TestbedSpecError(f"testbed spec {label}: no region in the {split} split of profile "
                                   f"{prof.name} ({', '.join(getattr(scheme, split))})")
    codes = sorted(spec.regions)
    for i, a in enumerate(codes):
        for b in codes[i + 1:]:
            A, B = spec.region_bbox(a), spec.region_bbox(b)
            if A[0] < B[2] and B[0] < A[2] and A[1] < B[3] and B[1] < A[3]:
                raise TestbedSpecError(f"testbed spec {label}: regions {a} and {b} overlap")
    return spec


def load_spec(path: str | Path | None = None) -> TestbedSpec:
    """Load and validate a testbed spec (default: manifests/testbed.yaml)."""
    p = Path(path) if path else DEFAULT_SPEC
    if not p.exists():
        raise TestbedSpecError(f"testbed spec {p}: no such file")
    try:
        data = safeyaml.load(p.read_text())
    except yaml.YAMLError as e:
        raise TestbedSpecError(f"testbed spec {p.name}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return spec_from_dict(data, p)


# ------------------------------------------------------------------------------------------
# Regions
# ------------------------------------------------------------------------------------------
def utm_zone(lon: float) -> int:
    return int(math.floor((lon + 180.0) / 6.0)) + 1


@dataclass
class RegionWorld:
    code: str
    bbox: tuple[float, float, float, float]
    utm_epsg_nad83: int
    utm_epsg_wgs84: int
    features: Any  # geopandas.GeoDataFrame, EPSG:4326 (see module doc for columns)
    marks: Any = None  # geopandas.GeoDataFrame: fid (owner), mark (MARK id), z, geometry (EPSG:4326)
    base_cover: int = 0  # truth id of unmapped land inside the region
    id_base: int = 0  # OSM ids of this region are id_base + 1 ...
    biome: str = ""
    split: str | None = None
    targets: dict[str, int] = field(default_factory=dict)  # planned instances per concept name

    def concept_counts(self) -> dict[int, int]:
        """Features per matched concept id (the generator's own view)."""
        vc = self.features["concept"].value_counts()
        return {int(k): int(v) for k, v in sorted(vc.items()) if k >= 0}


def concept_targets(spec: TestbedSpec, profile: Profile, rng: np.random.Generator) -> dict[str, dict[str, int]]:
    """Instances per region and concept: long-tailed from the profile counts, >=1 in two regions."""
    f = spec.frequency
    codes = sorted(spec.regions)
    out = {c: {} for c in codes}
    for con in profile.concepts:
        n = int(np.clip(round(f.scale * con.count), f.min_per_concept, f.max_per_concept))
        w = []
        for c in codes:
            r = spec.regions[c]
            wt = float(BIOMES[r.biome]["w"].get(con.name, 1.0))
            if con.name in COASTAL and r.coast == "none":
                wt = 0.0
            w.append(wt)
        w = np.asarray(w)
        if w.sum() <= 0:
            w = np.ones(len(codes))
        elig = [i for i in np.argsort(-w - rng.random(len(w)) * 1e-3, kind="stable") if w[i] > 0]
        alloc = np.zeros(len(codes), dtype=int)
        first = elig[:min(n, 2, len(elig))]
        for i in first:
            alloc[i] += 1
        rest = n - alloc.sum()
        if rest > 0:
            alloc += rng.multinomial(rest, w / w.sum())
        for i, c in enumerate(codes):
            out[c][con.name] = int(alloc[i])
    return out


# ------------------------------------------------------------------------------------------
# Geometry helpers (local metres, UTM)
# ------------------------------------------------------------------------------------------
def _shp():
    import shapely
    from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
    return shapely, LineString, MultiPolygon, Point, Polygon, box


def _blob(rect, rng, n=28, rough=0.22, fill=0.96):
    """A smooth, irregular polygon inscribed in rect (x0, y0, x1, y1)."""
    from shapely.geometry import Polygon
    x0, y0, x1, y1 = rect
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * fill, (y1 - y0) / 2 * fill
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    noise = np.zeros(n)
    for k in (2, 3, 5):
        noise += rng.uniform(0, 1) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) / k
    noise = (noise - noise.min()) / max(np.ptp(noise), 1e-9)
    f = 1 - rough * noise
    # squarish superellipse so blobs fill their parcels like real land cover
    c, s = np.cos(t), np.sin(t)
    e = 0.6
    px = cx + rx * f * np.sign(c) * np.abs(c) ** e
    py = cy + ry * f * np.sign(s) * np.abs(s) ** e
    return Polygon(np.column_stack([px, py]).round(2))


def _jrect(rect, rng, j=4.0):
    """A rectangle with its corners jittered inward by up to j metres."""
    from shapely.geometry import Polygon
    x0, y0, x1, y1 = rect
    d = rng.uniform(0, j, size=8)
    return Polygon([(x0 + d[0], y0 + d[1]), (x1 - d[2], y0 + d[3]), (x1 - d[4], y1 - d[5]), (x0 + d[6], y1 - d[7])])


def _box(x0, y0, x1, y1):
    from shapely.geometry import box
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _sub(rect, fx0, fy0, fx1, fy1):
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    return (x0 + fx0 * w, y0 + fy0 * h, x0 + fx1 * w, y0 + fy1 * h)


def _lines_across(poly, spacing, angle_deg, rng):
    """Parallel lines across a polygon (crop rows, solar rows, parking stripes), clipped to it."""
    from shapely.geometry import MultiLineString
    from shapely import affinity
    x0, y0, x1, y1 = poly.bounds
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = math.hypot(x1 - x0, y1 - y0) / 2 + spacing
    off = rng.uniform(0, spacing)
    ys = np.arange(-r + off, r, spacing)
    ml = MultiLineString([[(cx - r, cy + y), (cx + r, cy + y)] for y in ys])
    ml = affinity.rotate(ml, angle_deg, origin=(cx, cy))
    return ml.intersection(poly)


# ------------------------------------------------------------------------------------------
# The region builder
# ------------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, spec: TestbedSpec, code: str, rng: np.random.Generator, budget: dict[str, int],
                 matcher, fid_base: int):
        self.spec, self.code, self.rng, self.budget = spec, code, rng, dict(budget)
        self.rs = spec.regions[code]
        self.matcher = matcher
        self.fid_base = fid_base
        self.bbox = spec.region_bbox(code)
        lon, lat = self.rs.center
        z = utm_zone(lon)
        self.epsg_nad83, self.epsg_wgs84 = 26900 + z, 32600 + z
        fwd = _transformer(4326, self.epsg_nad83)
        w, s, e, n = self.bbox
        cx, cy = fwd.transform([w, e, e, w], [s, s, n, n])
        # inner axis-aligned rectangle of the (slightly rotated) bbox in UTM, minus a small margin
        pad = 8.0
        self.x0, self.x1 = max(cx[0], cx[3]) + pad, min(cx[1], cx[2]) - pad
        self.y0, self.y1 = max(cy[0], cy[1]) + pad, min(cy[2], cy[3]) - pad
        cell = spec.cell_m
        self.cell, self.m = cell, spec.street_margin_m
        self.nc = int((self.x1 - self.x0) // cell)
        self.nr = int((self.y1 - self.y0) // cell)
        self.ox = self.x0 + ((self.x1 - self.x0) - self.nc * cell) / 2
        self.oy = self.y0 + ((self.y1 - self.y0) - self.nr * cell) / 2
        # zones: 0 rural, 1 sea, 2 coast, 3 town, 4 industrial, 5 riparian
        self.zone = np.zeros((self.nr, self.nc), dtype=np.int8)
        self.used = np.zeros((self.nr, self.nc), dtype=bool)
        self.block_h = np.zeros((self.nr + 1, self.nc), dtype=bool)  # road along bottom edge of row r
        self.block_v = np.zeros((self.nr, self.nc + 1), dtype=bool)  # road along left edge of col c
        self.feats: list[dict] = []
        self.marks: list[tuple[int, int, int, Any]] = []  # (feature index, mark, z, geom)
        self.placed: dict[str, int] = {}
        self.budget_network = False  # True: highway, railway and river only when the budget asks

    def want_line(self, name: str) -> bool:
        """Draw network line `name` (highway, railroad, river)? Always in the testbed world; in
        budget mode (model-scale scenes) only when the budget holds one (and it is taken)."""
        return not self.budget_network or self.take(name)

    # -- bookkeeping -----------------------------------------------------------------------
    def take(self, name: str, k: int = 1) -> bool:
        if self.budget.get(name, 0) >= k:
            self.budget[name] -= k
            return True
        return False

    def set_material(self, i: int, material: str) -> int:
        self.feats[i]["material"] = MATERIAL[material]
        return i

    def _add(self, osm_type, geom, tags, cover, z, width, intended=None) -> int:
        tags = {k: str(v) for k, v in tags.items()}
        matches = self.matcher.match(tags)
        if intended is not None and CID[intended] in matches:
            concept = CID[intended]
        else:
            concept = matches[0] if matches else -1
        if isinstance(cover, str):
            cover = CID[cover] if cover in CID else BG[cover]
        self.feats.append(dict(osm_type=osm_type, geometry=geom, tags=tags, concept=int(concept),
                               cover=int(cover), z=int(z), width_m=float(width),
                               material=CLASS_MATERIAL[int(cover)]))
        return len(self.feats) - 1

    def area(self, geom, tags, cover, z, intended=None) -> int:
        """A closed way (simple polygon) or a multipolygon relation (holes or several parts)."""
        geom = geom.buffer(0) if not geom.is_valid else geom
        multi = geom.geom_type == "MultiPolygon" or len(geom.interiors) > 0
        tags = dict(tags)
        if multi:
            tags = {"type": "multipolygon", **tags}
        return self._add("relation" if multi else "way", geom, tags, cover, z, 0.0, intended)

    def way(self, line, tags, width, cover, z, intended=None) -> int:
        return self._add("way", line, tags, cover, z, width, intended)

    def node(self, pt, tags, diameter, cover, z, intended=None) -> int:
        return self._add("node", pt, tags, cover, z, diameter, intended)

    def mark(self, owner: int, name: str, geom, z: int | None = None) -> None:
        if geom is None or geom.is_empty:
            return
        self.marks.append((owner, MARK[name], self.feats[owner]["z"] if z is None else z, geom))

    # -- grid ------------------------------------------------------------------------------
    def cell_rect(self, r, c, h=1, w=1, inset=None):
        m = self.m if inset is None else inset
        return (self.ox + c * self.cell + m, self.oy + r * self.cell + m,
                self.ox + (c + w) * self.cell - m, self.oy + (r + h) * self.cell - m)

    def alloc(self, h, w, zones=(0,), pick=None):
        """Reserve a free h x w block of cells in the given zones (no road through it); rect or None."""
        zs = np.isin(self.zone, zones) & ~self.used
        cands = [(r, c) for r in range(self.nr - h + 1) for c in range(self.nc - w + 1)]
        order = self.rng.permutation(len(cands))
        for i in order:
            r, c = cands[i]
            if not zs[r:r + h, c:c + w].all():
                continue
            if h > 1 and self.block_h[r + 1:r + h, c:c + w].any():
                continue
            if w > 1 and self.block_v[r:r + h, c + 1:c + w].any():
                continue
            if pick is not None and not pick(r, c):
                continue
            self.used[r:r + h, c:c + w] = True
            return self.cell_rect(r, c, h, w), (r, c)
        return None, None

    # -- coordinates for the coast side ------------------------------------------------------
    def coast_xy(self, u, v):
        side = self.rs.coast
        W, H = self.nc * self.cell, self.nr * self.cell
        if side == "west":
            return self.ox + v, self.oy + u
        if side == "east":
            return self.ox + W - v, self.oy + u
        if side == "south":
            return self.ox + u, self.oy + v
        return self.ox + u, self.oy + H - v  # north

    # ======================================================================================
    def build(self):
        rng = self.rng
        self.layout_sea()
        self.layout_network()
        self.layout_town()
        self.place_sites()
        self.fill_town()
        self.place_leftovers()
        self.fill_rural()

    # -- sea and coast ----------------------------------------------------------------------
    def layout_sea(self):
        side = self.rs.coast
        if side == "none":
            self.coast_v = None
            return
        rng = self.rng
        along = self.nc if side in ("south", "north") else self.nr
        sw = 2
        self.sea_cells = sw
        L = along * self.cell
        ph, ph2 = rng.uniform(0, 2 * np.pi, 2)
        us = np.linspace(-self.cell, L + self.cell, 90)
        base = sw * self.cell - 40

        def coast_v(u):
            return base + 22 * np.sin(u / 310 + ph) + 10 * np.sin(u / 97 + ph2)
        self.coast_v = coast_v
        outer = [self.coast_xy(u, -self.cell) for u in (us[-1], us[0])]
        poly_pts = [self.coast_xy(u, coast_v(u)) for u in us] + outer
        from shapely.geometry import Polygon
        sea = Polygon(poly_pts).intersection(_box(self.x0 - 5, self.y0 - 5, self.x1 + 5, self.y1 + 5))
        # sea: a bay area (OSM natural=bay), background class "sea"
        self.area(sea, {"natural": "bay", "name": f"{self.code} Bay"}, "sea", Z_COVER)
        for i in range(sw):
            if side == "west":
                self.zone[:, i] = 1
            elif side == "east":
                self.zone[:, self.nc - 1 - i] = 1
            elif side == "south":
                self.zone[i, :] = 1
            else:
                self.zone[self.nr - 1 - i, :] = 1
        self.used[self.zone == 1] = True
        if side == "west":
            self.zone[:, sw] = 2
        elif side == "east":
            self.zone[:, self.nc - 1 - sw] = 2
        elif side == "south":
            self.zone[sw, :] = 2
        else:
            self.zone[self.nr - 1 - sw, :] = 2

    def land_extent_x(self):
        x0, x1 = self.ox, self.ox + self.nc * self.cell
        if self.rs.coast == "west":
            x0 += self.sea_cells * self.cell + 10
        if self.rs.coast == "east":
            x1 -= self.sea_cells * self.cell + 10
        return x0 + 2, x1 - 2

    def land_extent_y(self):
        y0, y1 = self.oy, self.oy + self.nr * self.cell
        if self.rs.coast == "south":
            y0 += self.sea_cells * self.cell + 10
        if self.rs.coast == "north":
            y1 -= self.sea_cells * self.cell + 10
        return y0 + 2, y1 - 2

    def land_rows(self):
        rows = [r for r in range(self.nr) if not (self.zone[r] == 1).all()]
        return rows[0], rows[-1]

    def land_cols(self):
        cols = [c for c in range(self.nc) if not (self.zone[:, c] == 1).all()]
        return cols[0], cols[-1]

    # -- network: highway, rail, river, roads -----------------------------------------------
    def _split_line(self, pts_axis, fixed, horizontal, cuts):
        """Split a straight road/rail [a, b] along one axis at cut intervals -> list of (a, b, tag)."""
        a, b = pts_axis
        segs, pos = [], a
        for (ca, cb, tag) in sorted(cuts):
            if cb <= a or ca >= b:
                continue
            ca, cb = max(ca, a), min(cb, b)
            if ca > pos:
                segs.append((pos, ca, None))
            segs.append((ca, cb, tag))
            pos = cb
        if pos < b:
            segs.append((pos, b, None))
        return segs

    def _seg_geom(self, a, b, fixed, horizontal, n=2):
        from shapely.geometry import LineString
        t = np.linspace(a, b, n)
        if horizontal:
            return LineString(np.column_stack([t, np.full(n, fixed)]).round(2))
        return LineString(np.column_stack([np.full(n, fixed), t]).round(2))

    def layout_network(self):
        rng, cell = self.rng, self.cell
        r0, r1 = self.land_rows()
        c0, c1 = self.land_cols()
        nr_land, nc_land = r1 - r0 + 1, c1 - c0 + 1
        # rows/cols of the main lines (boundaries), well apart
        self.r_hw = r0 + max(2, int(nr_land * rng.uniform(0.22, 0.3)))
        self.r_ter = r0 + int(nr_land * rng.uniform(0.55, 0.62))
        self.r_riv = r0 + int(nr_land * rng.uniform(0.8, 0.86))
        if self.r_riv <= self.r_ter + 1:
            self.r_riv = min(r1 - 1, self.r_ter + 2)
        self.c_sec = c0 + int(nc_land * rng.uniform(0.45, 0.55))
        self.c_rl = c0 + int(nc_land * rng.uniform(0.7, 0.78))
        if self.c_rl <= self.c_sec + 1:
            self.c_rl = min(c1 - 1, self.c_sec + 3)
        lx0, lx1 = self.land_extent_x()
        ly0, ly1 = self.land_extent_y()
        draw_river, draw_hw, draw_rail = self.want_line("river"), self.want_line("highway"), self.want_line("railroad")
        y_hw = self.oy + self.r_hw * cell
        y_ter = self.oy + self.r_ter * cell
        x_sec = self.ox + self.c_sec * cell
        x_rl = self.ox + self.c_rl * cell
        self.block_h[self.r_hw, :] = True
        self.block_h[self.r_ter, :] = True
        self.block_v[:, self.c_sec] = True
        self.block_v[:, self.c_rl] = True
        # river corridor row
        self.zone[self.r_riv, :][self.zone[self.r_riv, :] == 0] = 5
        y_riv_mid = self.oy + (self.r_riv + 0.5) * cell
        ph = rng.uniform(0, 2 * np.pi)
        xs = np.linspace(self.ox - 20, self.ox + self.nc * cell + 20, 120)
        ys = y_riv_mid + 42 * np.sin(xs / 230 + ph) + 8 * np.sin(xs / 61 + 2 * ph)
        from shapely.geometry import LineString, Point
        river = LineString(np.column_stack([xs, ys]).round(2)).intersection(
            _box(lx0 - (self.sea_cells * cell if self.rs.coast == "west" else 0) - 60, ly0,
                 lx1 + (self.sea_cells * cell if self.rs.coast == "east" else 0) + 60, ly1))
        if river.geom_type == "MultiLineString":
            river = max(river.geoms, key=lambda g: g.length)
        self.river = river
        # split the river into reaches like OSM
        L = river.length
        cuts = np.linspace(0, L, 4)
        from shapely.ops import substring
        for i in range(3 if draw_river else 0):
            seg = substring(river, cuts[i], cuts[i + 1])
            self.way(seg, {"waterway": "river", "name": f"{self.code} River"}, 26, "river", Z_WATER, "river")
        river_y_at = lambda x: float(np.interp(x, xs, ys))  # noqa: E731

        # highway (motorway) along r_hw with an overpass over the rail, a toll plaza
        hw_kind = "motorway" if self.rs.biome in ("prairie", "coastal_plain", "desert") else "trunk"
        cuts = [(x_rl - 45, x_rl + 45, "bridge")] if draw_rail else []
        tolls = []
        xt = x_sec + rng.uniform(0.3, 0.5) * (x_rl - x_sec)
        while draw_hw and self.take("toll_booth") and len(tolls) < 3:
            tolls.append(xt)
            xt = lx0 + rng.uniform(0.1, 0.3) * (x_sec - lx0) if len(tolls) == 1 else xt + 30
        for (a, b, tag) in self._split_line((lx0, lx1), y_hw, True, cuts) if draw_hw else []:
            g = self._seg_geom(a, b, y_hw, True, n=max(2, int((b - a) // 150)))
            tags = {"highway": hw_kind, "ref": "I-5" if hw_kind == "motorway" else "SR 9", "lanes": "4",
                    "oneway": "no", "maxspeed": "65 mph"}
            if tag == "bridge":
                tags.update({"bridge": "yes", "layer": "1"})
                i = self.way(g, tags, 24, "overpass", Z_BRIDGE, "overpass")
            else:
                i = self.way(g, tags, 24, "highway", Z_MAJOR, "highway")
            self.mark(i, "road_marking", g)
            self.mark(i, "road_marking", g.parallel_offset(5.5, "left"))
            self.mark(i, "road_marking", g.parallel_offset(5.5, "right"))
        for xt in tolls:
            i = self.node(Point(round(xt, 2), round(y_hw, 2)), {"barrier": "toll_booth", "name": "Toll Plaza"},
                          14, "toll_booth", Z_SMALL, "toll_booth")
            for dx in (-4, 0, 4):
                self.mark(i, "vehicle", _box(xt + dx - 1, y_hw - 6, xt + dx + 1, y_hw + 6))
        # tertiary road along r_ter; secondary road along c_sec crossing the highway on a bridge
        for (a, b, tag) in self._split_line((lx0, lx1), y_ter, True, [(x_sec - 20, x_sec + 20, "rb"),
                                                                       (x_rl - 8, x_rl + 8, "xing")]
                                            ) if draw_hw else []:
            if tag == "rb":
                continue
            g = self._seg_geom(a, b, y_ter, True, n=max(2, int((b - a) // 150)))
            i = self.way(g, {"highway": "tertiary", "name": "Main Street"}, 12, "highway", Z_MAJOR, "highway")
            self.mark(i, "road_marking", g)
        cuts = [(y_hw - 30, y_hw + 30, "bridge"), (y_ter - 20, y_ter + 20, "rb")]
        yr = river_y_at(x_sec)
        if draw_river:
            cuts.append((yr - 30, yr + 30, "bridge"))
        for (a, b, tag) in self._split_line((ly0, ly1), x_sec, False, cuts) if draw_hw else []:
            if tag == "rb":
                continue
            g = self._seg_geom(a, b, x_sec, False, n=max(2, int((b - a) // 150)))
            tags = {"highway": "secondary", "name": "Central Avenue"}
            if tag == "bridge":
                tags.update({"bridge": "yes", "layer": "1"})
                i = self.way(g, tags, 14, "overpass", Z_BRIDGE, "overpass")
            else:
                i = self.way(g, tags, 14, "highway", Z_MAJOR, "highway")
            self.mark(i, "road_marking", g)
        # roundabout at secondary x tertiary (a closed way)
        if draw_hw and self.take("roundabout"):
            self._roundabout(x_sec, y_ter, 20, "secondary")
        # railway along c_rl: viaduct over the river, tunnel through a hill near the far end
        yr = river_y_at(x_rl)
        cuts = [(yr - 70, yr + 70, "viaduct")] if draw_river else []
        if draw_rail and self.take("tunnel_opening"):
            yt0 = (y_hw + y_ter) / 2 - 110 if ly1 - (yr + 80) < 400 else yr + 160
            cuts.append((yt0, yt0 + 260, "tunnel"))
            # the hill the tunnel goes through: a forest on both sides of the line
            self.tunnel_span = (yt0, yt0 + 260)
        else:
            self.tunnel_span = None
        self.x_rl, self.y_hw, self.y_ter, self.x_sec = x_rl, y_hw, y_ter, x_sec
        for (a, b, tag) in self._split_line((ly0, ly1), x_rl, False, cuts) if draw_rail else []:
            g = self._seg_geom(a, b, x_rl, False, n=max(2, int((b - a) // 150)))
            tags = {"railway": "rail", "usage": "main", "gauge": "1435", "name": f"{self.code} Subdivision"}
            if tag == "viaduct":
                tags.update({"bridge": "viaduct", "layer": "1"})
                i = self.way(g, tags, 10, "viaduct", Z_BRIDGE, "viaduct")
            elif tag == "tunnel":
                tags.update({"tunnel": "yes", "layer": "-1"})
                i = self.way(g, tags, 12, "tunnel_opening", Z_BRIDGE, "tunnel_opening")
                continue
            else:
                i = self.way(g, tags, 6, "railroad", Z_MINOR, "railroad")
            self.mark(i, "rail_track", g.parallel_offset(0.75, "left"))
            self.mark(i, "rail_track", g.parallel_offset(0.75, "right"))
        if self.tunnel_span:
            ra = int((self.tunnel_span[0] - self.oy) // cell)
            rb = int((self.tunnel_span[1] - self.oy) // cell)
            for r in range(max(ra, 0), min(rb, self.nr - 1) + 1):
                for c in (self.c_rl - 1, self.c_rl):
                    if 0 <= c < self.nc and not self.used[r, c]:
                        self.used[r, c] = True
                        rect = self.cell_rect(r, c, inset=0)
                        if self.take("forest"):
                            self.area(_jrect(rect, self.rng, 6), {"natural": "wood", "leaf_type": "mixed"},
                                      "forest", Z_COVER, "forest")
                        else:
                            self.area(_jrect(rect, self.rng, 6), {"natural": "scrub"}, "chaparral", Z_COVER,
                                      "chaparral")
        # dams across the river
        dam_xs = [x for x in np.linspace(lx0 + 150, lx1 - 150, 7)
                  if abs(x - x_sec) > 80 and abs(x - x_rl) > 120]
        for xd in rng.permutation(dam_xs)[:3]:
            if not draw_river or not self.take("dam"):
                break
            yd = river_y_at(xd)
            g = LineString([(round(xd, 2), round(yd - 28, 2)), (round(xd, 2), round(yd + 28, 2))])
            i = self.way(g, {"waterway": "dam", "name": "Mill Dam"}, 9, "dam", Z_BRIDGE, "dam")
        # rural tracks
        return

    def _roundabout(self, x, y, r, kind):
        from shapely.geometry import LineString
        t = np.linspace(0, 2 * np.pi, 25)
        pts = np.column_stack([x + r * np.cos(t), y + r * np.sin(t)]).round(2)
        pts[-1] = pts[0]
        g = LineString(pts)
        i = self.way(g, {"highway": kind, "junction": "roundabout", "oneway": "yes"}, 9, "roundabout", Z_MAJOR,
                     "roundabout")
        self.mark(i, "road_marking", g.buffer(r - 5).exterior)
        return i

    # -- town ------------------------------------------------------------------------------
    def layout_town(self):
        tw, th = self.rs.town_cells
        r0, r1 = self.land_rows()
        c0, c1 = self.land_cols()
        # town centred on the secondary x tertiary crossing, kept between highway and river
        tc0 = int(np.clip(self.c_sec - tw // 2, c0, c1 + 1 - tw))
        tr0 = int(np.clip(self.r_ter - th // 2, self.r_hw, self.r_riv - th))
        tr0 = max(tr0, r0)
        th = min(th, self.r_riv - tr0)
        self.town = (tr0, tc0, th, tw)
        for r in range(tr0, tr0 + th):
            for c in range(tc0, tc0 + tw):
                if self.zone[r, c] == 0:
                    self.zone[r, c] = 3
        # landuse=residential over the town (a container)
        x0, y0 = self.ox + tc0 * self.cell, self.oy + tr0 * self.cell
        x1, y1 = x0 + tw * self.cell, y0 + th * self.cell
        self.area(_box(x0 + 4, y0 + 4, x1 - 4, y1 - 4), {"landuse": "residential"}, "residential", Z_CONTAINER)
        # streets on the internal cell boundaries (not on the main roads)
        k = 0
        for r in range(tr0 + 1, tr0 + th):
            if r == self.r_ter:
                continue
            self.block_h[r, tc0:tc0 + tw] = True
            y = self.oy + r * self.cell
            g = self._seg_geom(x0 + 6, x1 - 6, y, True, 4)
            self.way(g, {"highway": "residential", "name": f"{_STREETS[k % len(_STREETS)]} Street"}, 8,
                     "minor_road", Z_MINOR)
            k += 1
        for c in range(tc0 + 1, tc0 + tw):
            if c in (self.c_sec, self.c_rl):
                continue
            self.block_v[tr0:tr0 + th, c] = True
            x = self.ox + c * self.cell
            g = self._seg_geom(y0 + 6, y1 - 6, x, False, 4)
            self.way(g, {"highway": "residential", "name": f"{_STREETS[k % len(_STREETS)]} Avenue"}, 8,
                     "minor_road", Z_MINOR)
            k += 1
        # small roundabouts at a few town junctions
        juncs = [(self.ox + c * self.cell, self.oy + r * self.cell)
                 for r in range(tr0 + 1, tr0 + th) for c in range(tc0 + 1, tc0 + tw)
                 if r != self.r_ter and c not in (self.c_sec, self.c_rl)]
        for j in self.rng.permutation(len(juncs))[:2]:
            if self.take("roundabout"):
                self._roundabout(juncs[j][0], juncs[j][1], 12, "residential")
        # industrial zone: a band of cells next to the railway, below the highway or above it
        r_lo = max(r0, self.r_hw - 3)
        for r in range(r_lo, min(self.r_hw + 2, self.nr)):
            for c in range(self.c_rl - 1, min(self.c_rl + 3, self.nc)):
                if self.zone[r, c] == 0:
                    self.zone[r, c] = 4

    # -- sites -----------------------------------------------------------------------------
    def place_sites(self):
        for name, fn in _SITE_ORDER:
            guard = 0
            while self.budget.get(name, 0) > 0 and guard < 200:
                guard += 1
                before = self.budget[name]
                ok = fn(self)
                if not ok or self.budget[name] >= before:
                    break

    def fill_town(self):
        tr0, tc0, th, tw = self.town
        for r in range(tr0, tr0 + th):
            for c in range(tc0, tc0 + tw):
                if self.zone[r, c] == 3 and not self.used[r, c]:
                    self.used[r, c] = True
                    _residential_block(self, self.cell_rect(r, c))

    def place_leftovers(self):
        for name, fn in _LEFTOVER:
            guard = 0
            while self.budget.get(name, 0) > 0 and guard < 100:
                guard += 1
                before = self.budget[name]
                ok = fn(self)
                if not ok or self.budget[name] >= before:
                    break

    def fill_rural(self):
        """Unclaimed rural cells: a few stay unmapped (base cover); the rest get generic cover."""
        rng = self.rng
        base = BIOMES[self.rs.biome]["base"]
        for r in range(self.nr):
            for c in range(self.nc):
                if self.used[r, c] or self.zone[r, c] in (1,):
                    continue
                if rng.random() < 0.6:
                    continue
                self.used[r, c] = True
                rect = self.cell_rect(r, c)
                if base == "bare_soil":
                    self.area(_blob(rect, rng), {"landuse": "grass"}, "grass", Z_COVER)
                else:
                    self.area(_jrect(rect, rng, 8), {"landuse": "grass"}, "grass", Z_COVER)


_STREETS = ["Oak", "Pine", "Maple", "Cedar", "Elm", "Walnut", "Spruce", "Birch", "Willow", "Ash", "Chestnut",
            "Laurel", "Magnolia", "Hickory", "Sycamore", "Juniper"]


# ------------------------------------------------------------------------------------------
# Recipes: each takes a builder, reserves cells, adds features, consumes budget.
# ------------------------------------------------------------------------------------------
def _building(b: _Builder, rect_or_poly, tags, cover, intended=None, ridge=True):
    poly = _box(*rect_or_poly) if isinstance(rect_or_poly, tuple) else rect_or_poly
    i = b.area(poly, tags, cover, Z_BUILDING, intended)
    metal = tags.get("building") in ("warehouse", "hangar", "barn", "industrial", "roof")
    b.set_material(i, "roof_metal" if metal else "roof")
    if ridge:
        x0, y0, x1, y1 = poly.bounds
        from shapely.geometry import LineString
        if x1 - x0 >= y1 - y0:
            g = LineString([(x0 + 1.5, (y0 + y1) / 2), (x1 - 1.5, (y0 + y1) / 2)])
        else:
            g = LineString([((x0 + x1) / 2, y0 + 1.5), ((x0 + x1) / 2, y1 - 1.5)])
        b.mark(i, "roof_ridge", g.intersection(poly))
    return i


def _parking(b: _Builder, rect, garage=False):
    if garage:
        if not b.take("parking_garage"):
            return None
        i = b.area(_box(*rect), {"amenity": "parking", "parking": "multi-storey", "building": "parking",
                                 "levels": "4"}, "parking_garage", Z_BUILDING, "parking_garage")
        b.mark(i, "parking_stripe", _lines_across(_box(*rect).buffer(-3), 2.7, 90, b.rng))
        return i
    if not b.take("parking_lot"):
        return None
    poly = _box(*rect)
    i = b.area(poly, {"amenity": "parking", "parking": "surface", "surface": "asphalt"}, "parking_lot",
               Z_GROUND, "parking_lot")
    b.mark(i, "parking_stripe", _lines_across(poly.buffer(-2), 2.7, 90 if (rect[2] - rect[0]) > (rect[3] - rect[1])
                                              else 0, b.rng))
    # a few parked cars
    x0, y0, x1, y1 = rect
    for _ in range(int(b.rng.integers(3, 12))):
        cx, cy = b.rng.uniform(x0 + 3, x1 - 3), b.rng.uniform(y0 + 3, y1 - 3)
        b.mark(i, "vehicle", _box(cx - 1, cy - 2.2, cx + 1, cy + 2.2), Z_GROUND)
    return i


def _court_lines(b, i, poly, kind):
    """Court / field markings inside a pitch rectangle."""
    from shapely.geometry import LineString
    x0, y0, x1, y1 = poly.bounds
    inner = _box(x0 + 1.5, y0 + 1.5, x1 - 1.5, y1 - 1.5)
    b.mark(i, "court_line", inner.exterior)
    long_x = (x1 - x0) >= (y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "tennis":
        if long_x:
            b.mark(i, "court_line", LineString([(cx, y0 + 1.5), (cx, y1 - 1.5)]))
            b.mark(i, "court_line", LineString([(x0 + 6, cy), (x1 - 6, cy)]))
        else:
            b.mark(i, "court_line", LineString([(x0 + 1.5, cy), (x1 - 1.5, cy)]))
            b.mark(i, "court_line", LineString([(cx, y0 + 6), (cx, y1 - 6)]))
    elif kind == "american_football":
        n = 11
        for k in range(1, n):
            if long_x:
                x = x0 + (x1 - x0) * k / n
                b.mark(i, "court_line", LineString([(x, y0 + 1.5), (x, y1 - 1.5)]))
            else:
                y = y0 + (y1 - y0) * k / n
                b.mark(i, "court_line", LineString([(x0 + 1.5, y), (x1 - 1.5, y)]))
    elif kind == "soccer":
        if long_x:
            b.mark(i, "court_line", LineString([(cx, y0 + 1.5), (cx, y1 - 1.5)]))
        else:
            b.mark(i, "court_line", LineString([(x0 + 1.5, cy), (x1 - 1.5, cy)]))
        from shapely.geometry import Point
        b.mark(i, "court_line", Point(cx, cy).buffer(8).exterior)
    elif kind == "baseball":
        from shapely.geometry import Polygon
        s = min(x1 - x0, y1 - y0) * 0.28
        d = Polygon([(x0 + 4, y0 + 4), (x0 + 4 + s, y0 + 4), (x0 + 4 + s, y0 + 4 + s), (x0 + 4, y0 + 4 + s)])
        b.mark(i, "court_line", d.exterior)


def _pitch(b, rect, sport, tags_extra=None):
    """leisure=pitch with the sport's marking; rect sized by the caller."""
    name = {"tennis": "tennis", "american_football": "american_football", "soccer": "soccer",
            "baseball": "baseball_field", "skateboard": "skate_park"}[sport]
    if not b.take(name):
        return None
    poly = _box(*rect)
    tags = {"leisure": "pitch", "sport": sport, "surface": "grass" if sport != "tennis" else "hard"}
    if tags_extra:
        tags.update(tags_extra)
    i = b.area(poly, tags, name, Z_GROUND, name)
    if sport != "skateboard":
        _court_lines(b, i, poly, sport)
    return i


def _fit(rect, w, h, rng, where="any"):
    """A w x h sub-rectangle inside rect (rotated 90 degrees if it fits better), or None."""
    x0, y0, x1, y1 = rect
    if w > x1 - x0 or h > y1 - y0:
        w, h = h, w
    if w > x1 - x0 or h > y1 - y0:
        return None
    x = rng.uniform(x0, x1 - w)
    y = rng.uniform(y0, y1 - h)
    return (x, y, x + w, y + h)


def _split(rect, frac, vertical, gap=6.0):
    x0, y0, x1, y1 = rect
    if vertical:
        xm = x0 + (x1 - x0) * frac
        return (x0, y0, xm - gap / 2, y1), (xm + gap / 2, y0, x1, y1)
    ym = y0 + (y1 - y0) * frac
    return (x0, y0, x1, ym - gap / 2), (x0, ym + gap / 2, x1, y1)


def _pool(b, x, y, rng, public=False):
    if not b.take("swimming_pool"):
        return None
    if public:
        w, h = 25.0, 12.5
    else:
        w, h = rng.uniform(7, 11), rng.uniform(3.5, 5.5)
    if rng.random() < 0.5:
        w, h = h, w
    if not public and rng.random() < 0.35:
        poly = _blob((x - w / 2, y - h / 2, x + w / 2, y + h / 2), rng, n=16, rough=0.3, fill=1.0)
    else:
        poly = _box(x - w / 2, y - h / 2, x + w / 2, y + h / 2)
    i = b.area(poly, {"leisure": "swimming_pool", "access": "private" if not public else "yes"},
               "swimming_pool", Z_SMALL, "swimming_pool")
    b.mark(i, "pool_edge", poly.exterior)
    return i


def _residential_block(b: _Builder, rect):
    """Houses along the two long sides, back yards with pools, sometimes a private court."""
    rng = b.rng
    x0, y0, x1, y1 = rect
    lot = rng.uniform(19, 24)
    n = int((x1 - x0) // lot)
    mid = (y0 + y1) / 2
    for side in (0, 1):
        for k in range(n):
            lx = x0 + k * lot
            hw, hd = rng.uniform(10, min(15, lot - 5)), rng.uniform(11, 16)
            setback = rng.uniform(6, 9)
            hx = lx + (lot - hw) / 2
            if side == 0:
                hy0 = y0 + setback
                poly = (hx, hy0, hx + hw, hy0 + hd)
                yard = (lx + 2, hy0 + hd + 3, lx + lot - 2, mid - 2)
            else:
                hy1 = y1 - setback
                poly = (hx, hy1 - hd, hx + hw, hy1)
                yard = (lx + 2, mid + 2, lx + lot - 2, hy1 - hd - 3)
            _building(b, poly, {"building": "house"}, "building")
            if yard[3] - yard[1] > 12 and rng.random() < 0.35:
                _pool(b, (yard[0] + yard[2]) / 2, (yard[1] + yard[3]) / 2, rng)
            elif rng.random() < 0.25:
                b.node(_pt(rng.uniform(yard[0], yard[2]), rng.uniform(yard[1], yard[3])), {"natural": "tree"},
                       rng.uniform(5, 9), "trees", Z_SMALL)
    # a private tennis court in the middle of some blocks
    if rng.random() < 0.3 and b.budget.get("tennis", 0) > 0:
        r = _fit((x0 + n * lot * 0.3, mid - 9, x0 + n * lot * 0.7, mid + 9), 34, 17, rng)
        if r:
            _pitch(b, r, "tennis", {"access": "private"})


def _pt(x, y):
    from shapely.geometry import Point
    return Point(round(float(x), 2), round(float(y), 2))


def _civic_grounds(b, rect, tags, cover, intended):
    return b.area(_box(*rect), tags, cover, Z_CONTAINER, intended)


def _school(b: _Builder):
    rect, _ = b.alloc(1, 1, (3,))
    if rect is None:
        rect, _ = b.alloc(1, 1, (0, 4))
    if rect is None or not b.take("school"):
        return False
    rng = b.rng
    _civic_grounds(b, rect, {"amenity": "school", "name": "Lincoln School"}, "school", "school")
    left, right = _split(rect, 0.42, True)
    # building (L shape) + parking on the left
    bx0, by0, bx1, by1 = left
    from shapely.geometry import Polygon
    L = Polygon([(bx0 + 5, by1 - 60), (bx1 - 5, by1 - 60), (bx1 - 5, by1 - 40), (bx0 + 25, by1 - 40),
                 (bx0 + 25, by1 - 5), (bx0 + 5, by1 - 5)])
    _building(b, L, {"building": "school"}, "school")
    _parking(b, (bx0 + 4, by0 + 4, bx1 - 4, by0 + 40))
    # fields on the right: football or soccer + baseball + tennis
    fx0, fy0, fx1, fy1 = right
    top = (fx0, (fy0 + fy1) / 2, fx1, fy1)
    bot = (fx0, fy0, fx1, (fy0 + fy1) / 2 - 4)
    placed = False
    for sport, (w, h) in (("american_football", (80, 42)), ("soccer", (78, 46))):
        r = _fit(top, min(w, top[2] - top[0] - 2), min(h, top[3] - top[1] - 2), rng)
        if r and _pitch(b, r, sport) is not None:
            placed = True
            break
    if not placed:
        r = _fit(top, 34, 17, rng)
        if not (r and _pitch(b, r, "tennis") is not None):
            # a running track (not a concept) so the grounds still look like a school's
            from shapely import affinity
            cx, cy = (top[0] + top[2]) / 2, (top[1] + top[3]) / 2
            rx, ry = (top[2] - top[0]) / 2 - 4, (top[3] - top[1]) / 2 - 4
            oval = affinity.scale(_pt(cx, cy).buffer(1, 24), rx, ry)
            t = b.set_material(b.area(oval, {"leisure": "track", "sport": "running"}, "paved", Z_GROUND), "court")
            b.mark(t, "court_line", oval.buffer(-3).exterior)
    r = _fit(bot, 62, 62, rng) if rng.random() < 0.6 else None
    if r and _pitch(b, r, "baseball") is not None:
        pass
    else:
        for k in range(2):
            r = (bot[0] + 4 + k * 38, bot[1] + 4, bot[0] + 38 + k * 38, bot[1] + 21)
            if r[2] < bot[2]:
                _pitch(b, r, "tennis")
    return True


def _lot_site(size=(1, 1), zones=(3,), fallback=(0, 4)):
    def deco(fn):
        def run(b: _Builder):
            rect, _ = b.alloc(size[0], size[1], zones)
            if rect is None and fallback:
                rect, _ = b.alloc(size[0], size[1], fallback)
            if rect is None:
                return False
            fn(b, rect)
            return True
        return run
    return deco


def _quarters(rect):
    a, bb = _split(rect, 0.5, True)
    return list(_split(a, 0.5, False)) + list(_split(bb, 0.5, False))


@_lot_site()
def _civic_block(b: _Builder, rect):
    """A town block of four lots for small civic and commercial sites (church, fire, police, gas...)."""
    rng = b.rng
    opts = ["religious_building", "gas_station", "fire_station", "police_station", "supermarket",
            "car_dealership", "office", "skate_park", "electric_substation", "parking_lot", "cemetery"]
    lots = _quarters(rect)
    for lot in lots:
        avail = [o for o in opts if b.budget.get(o, 0) > 0]
        if not avail:
            _houses_lot(b, lot)
            continue
        w = np.array([b.budget[o] for o in avail], dtype=float)
        o = avail[int(rng.choice(len(avail), p=w / w.sum()))]
        _LOT_FILL[o](b, lot)


def _houses_lot(b, lot):
    rng = b.rng
    x0, y0, x1, y1 = lot
    for k in range(int((x1 - x0) // 20)):
        hx = x0 + k * 20 + 3
        _building(b, (hx, y0 + 5, hx + 13, y0 + 18), {"building": "house"}, "building")
        if rng.random() < 0.3:
            _pool(b, hx + 6, y0 + 26, rng)


def _lot_church(b, lot):
    if not b.take("religious_building"):
        return
    from shapely.geometry import Polygon
    rng = b.rng
    x0, y0, x1, y1 = lot
    cx, cy = (x0 + x1) / 2, y0 + (y1 - y0) * 0.62
    L, W = rng.uniform(28, 38), rng.uniform(11, 14)
    cross = Polygon([(cx - W / 2, cy - L / 2), (cx + W / 2, cy - L / 2), (cx + W / 2, cy + L / 6),
                     (cx + W * 1.3, cy + L / 6), (cx + W * 1.3, cy + L / 6 + W), (cx + W / 2, cy + L / 6 + W),
                     (cx + W / 2, cy + L / 2), (cx - W / 2, cy + L / 2), (cx - W / 2, cy + L / 6 + W),
                     (cx - W * 1.3, cy + L / 6 + W), (cx - W * 1.3, cy + L / 6), (cx - W / 2, cy + L / 6)])
    _building(b, cross, {"amenity": "place_of_worship", "religion": "christian", "building": "church",
                         "name": "St. Mary"}, "religious_building", "religious_building")
    _parking(b, (x0 + 4, y0 + 4, x1 - 4, y0 + 26))


def _lot_gas(b, lot):
    if not b.take("gas_station"):
        return
    x0, y0, x1, y1 = lot
    site = (x0 + 3, y0 + 3, min(x1 - 3, x0 + 55), min(y1 - 3, y0 + 45))
    i = b.area(_box(*site), {"amenity": "fuel", "brand": "Shell"}, "gas_station", Z_GROUND, "gas_station")
    sx0, sy0, sx1, sy1 = site
    canopy = (sx0 + 8, sy0 + 8, sx0 + 32, sy0 + 22)
    j = _building(b, canopy, {"building": "roof", "layer": "1"}, "gas_station", ridge=False)
    for k in range(4):
        x = canopy[0] + 3 + k * 6
        b.mark(j, "vehicle", _box(x, canopy[1] + 5, x + 1.2, canopy[3] - 5))
    _building(b, (sx0 + 36, sy0 + 26, sx1 - 3, sy1 - 3), {"building": "retail", "shop": "convenience"},
              "gas_station")


def _lot_fire(b, lot):
    if not b.take("fire_station"):
        return
    x0, y0, x1, y1 = lot
    i = _building(b, (x0 + 8, y0 + 25, x0 + 45, y0 + 50), {"amenity": "fire_station", "building": "fire_station"},
                  "fire_station", "fire_station")
    b.area(_box(x0 + 8, y0 + 4, x0 + 45, y0 + 24), {"area:highway": "service", "surface": "concrete"}, "paved",
           Z_GROUND)
    for k in range(3):
        b.mark(i, "vehicle", _box(x0 + 12 + k * 11, y0 + 10, x0 + 15 + k * 11, y0 + 19), Z_GROUND)


def _lot_police(b, lot):
    if not b.take("police_station"):
        return
    x0, y0, x1, y1 = lot
    _building(b, (x0 + 8, y0 + 30, x1 - 8, y1 - 8), {"amenity": "police", "building": "government"},
              "police_station", "police_station")
    _parking(b, (x0 + 6, y0 + 4, x1 - 6, y0 + 24))


def _lot_supermarket(b, lot):
    if not b.take("supermarket"):
        return
    x0, y0, x1, y1 = lot
    _building(b, (x0 + 5, y0 + (y1 - y0) * 0.5, x1 - 5, y1 - 4), {"shop": "supermarket", "building": "retail",
                                                                   "name": "Market"}, "supermarket", "supermarket",
              ridge=False)
    _parking(b, (x0 + 5, y0 + 4, x1 - 5, y0 + (y1 - y0) * 0.5 - 5))


def _lot_cardealer(b, lot):
    if not b.take("car_dealership"):
        return
    x0, y0, x1, y1 = lot
    i = b.area(_box(*lot), {"shop": "car", "name": "Motors"}, "car_dealership", Z_GROUND, "car_dealership")
    _building(b, (x0 + 5, y1 - 25, x0 + 40, y1 - 5), {"building": "retail"}, "car_dealership")
    for gx in np.arange(x0 + 4, x1 - 4, 3.2):
        for gy in np.arange(y0 + 4, y1 - 30, 7.0):
            b.mark(i, "vehicle", _box(gx, gy, gx + 1.9, gy + 4.5))


def _lot_office(b, lot):
    if not b.take("office"):
        return
    x0, y0, x1, y1 = lot
    _building(b, (x0 + 6, y0 + (y1 - y0) * 0.45, x1 - 6, y1 - 6), {"building": "office", "levels": "5"},
              "office", "office", ridge=False)
    if _parking(b, (x0 + 6, y0 + 4, x1 - 6, y0 + (y1 - y0) * 0.45 - 5), garage=True) is None:
        _parking(b, (x0 + 6, y0 + 4, x1 - 6, y0 + (y1 - y0) * 0.45 - 5))


def _lot_skate(b, lot):
    if not b.take("skate_park"):
        return
    x0, y0, x1, y1 = lot
    poly = _blob((x0 + 10, y0 + 10, x0 + 45, y0 + 38), b.rng, n=18, rough=0.2)
    i = b.area(poly, {"leisure": "skate_park", "surface": "concrete"}, "skate_park", Z_GROUND, "skate_park")
    b.mark(i, "court_line", poly.buffer(-4).exterior if not poly.buffer(-4).is_empty else None)


def _lot_substation(b, lot):
    if not b.take("electric_substation"):
        return
    x0, y0, x1, y1 = lot
    poly = _box(x0 + 8, y0 + 8, min(x1 - 8, x0 + 60), min(y1 - 8, y0 + 45))
    i = b.area(poly, {"power": "substation", "voltage": "115000"}, "electric_substation", Z_GROUND,
               "electric_substation")
    b.mark(i, "fence", poly.exterior)
    b.mark(i, "court_line", _lines_across(poly.buffer(-4), 5, 0, b.rng))


def _lot_parking(b, lot):
    x0, y0, x1, y1 = lot
    _parking(b, (x0 + 4, y0 + 4, x1 - 4, y1 - 4))


def _lot_cemetery(b, lot):
    if not b.take("cemetery"):
        return
    poly = _jrect(lot, b.rng, 3)
    i = b.area(poly, {"landuse": "cemetery", "name": "Evergreen Cemetery"}, "cemetery", Z_COVER, "cemetery")
    b.mark(i, "grave_row", _lines_across(poly.buffer(-4), 3.0, 0, b.rng))


_LOT_FILL: dict[str, Callable] = {
    "religious_building": _lot_church, "gas_station": _lot_gas, "fire_station": _lot_fire,
    "police_station": _lot_police, "supermarket": _lot_supermarket, "car_dealership": _lot_cardealer,
    "office": _lot_office, "skate_park": _lot_skate, "electric_substation": _lot_substation,
    "parking_lot": _lot_parking, "cemetery": _lot_cemetery,
}


@_lot_site()
def _hospital(b: _Builder, rect):
    if not b.take("hospital"):
        return
    x0, y0, x1, y1 = rect
    _civic_grounds(b, rect, {"amenity": "hospital", "healthcare": "hospital", "name": "General Hospital"},
                   "hospital", "hospital")
    from shapely.geometry import Polygon
    H = Polygon([(x0 + 10, y1 - 90), (x0 + 100, y1 - 90), (x0 + 100, y1 - 70), (x0 + 65, y1 - 70),
                 (x0 + 65, y1 - 10), (x0 + 45, y1 - 10), (x0 + 45, y1 - 70), (x0 + 10, y1 - 70)])
    _building(b, H, {"building": "hospital"}, "hospital", ridge=False)
    _parking(b, (x0 + 6, y0 + 6, x0 + 100, y0 + 50), garage=True) or _parking(b, (x0 + 6, y0 + 6, x0 + 100, y0 + 50))
    _helipad(b, x1 - 28, y1 - 28)


def _helipad(b, x, y, d=20.0):
    if not b.take("helipad"):
        return None
    from shapely.geometry import LineString
    poly = _pt(x, y).buffer(d / 2, 16)
    i = b.area(poly, {"aeroway": "helipad", "surface": "concrete"}, "helipad", Z_SMALL, "helipad")
    b.mark(i, "helipad_marking", poly.buffer(-1.5).exterior)
    h = d * 0.22
    for g in (LineString([(x - h, y - h * 1.3), (x - h, y + h * 1.3)]), LineString([(x + h, y - h * 1.3),
                                                                                   (x + h, y + h * 1.3)]),
              LineString([(x - h, y), (x + h, y)])):
        b.mark(i, "helipad_marking", g)
    return i


@_lot_site(size=(1, 2))
def _mall(b: _Builder, rect):
    if not b.take("shopping_mall"):
        return
    x0, y0, x1, y1 = rect
    w = x1 - x0
    _building(b, (x0 + w * 0.25, y0 + (y1 - y0) * 0.55, x1 - w * 0.25, y1 - 8),
              {"shop": "mall", "building": "retail", "name": "Town Center Mall"}, "shopping_mall", "shopping_mall",
              ridge=False)
    _parking(b, (x0 + 6, y0 + 6, x0 + w * 0.48, y0 + (y1 - y0) * 0.5))
    _parking(b, (x0 + w * 0.52, y0 + 6, x1 - 6, y0 + (y1 - y0) * 0.5))
    _parking(b, (x0 + 6, y0 + (y1 - y0) * 0.55, x0 + w * 0.22, y1 - 8), garage=True)


@_lot_site(size=(2, 2), zones=(0,), fallback=(0, 3))
def _university(b: _Builder, rect):
    if not b.take("university"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    _civic_grounds(b, rect, {"amenity": "university", "name": f"{b.code} State University"}, "university",
                   "university")
    # quad of buildings around a lawn
    for (fx0, fy0, fx1, fy1) in ((0.05, 0.6, 0.3, 0.9), (0.35, 0.75, 0.65, 0.95), (0.7, 0.6, 0.95, 0.9),
                                 (0.05, 0.3, 0.2, 0.55), (0.8, 0.3, 0.95, 0.55)):
        _building(b, _sub(rect, fx0, fy0, fx1, fy1), {"building": "yes"}, "university")
    _parking(b, _sub(rect, 0.05, 0.04, 0.45, 0.22))
    _parking(b, _sub(rect, 0.55, 0.04, 0.95, 0.22), garage=True)
    r = _fit(_sub(rect, 0.25, 0.3, 0.75, 0.55), 100, 60, rng)
    if r:
        _pitch(b, r, "soccer") or _pitch(b, r, "american_football")
    for k in range(3):
        _pitch(b, (x0 + 40 + k * 38, y0 + (y1 - y0) * 0.24, x0 + 74 + k * 38, y0 + (y1 - y0) * 0.24 + 17), "tennis")


@_lot_site(size=(1, 2), zones=(0, 3), fallback=(4,))
def _stadium(b: _Builder, rect):
    if not b.take("stadium"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 20
    from shapely import affinity
    outer = affinity.scale(_pt(cx, cy).buffer(1, 32), 95, 70)
    inner = affinity.scale(_pt(cx, cy).buffer(1, 32), 70, 45)
    sport = "american_football" if b.budget.get("american_football", 0) >= b.budget.get("soccer", 0) else "soccer"
    b.area(outer, {"leisure": "stadium", "name": "Memorial Stadium", "sport": sport}, "stadium", Z_GROUND,
           "stadium")
    _building(b, outer.difference(inner), {"building": "grandstand"}, "stadium", ridge=False)
    r = (cx - 50, cy - 25, cx + 50, cy + 25)
    _pitch(b, r, sport) or _pitch(b, r, "soccer" if sport != "soccer" else "american_football")
    _parking(b, (x0 + 6, y0 + 4, x1 - 6, cy - 75))


@_lot_site(size=(1, 2), zones=(0, 4))
def _prison(b: _Builder, rect):
    if not b.take("prison"):
        return
    x0, y0, x1, y1 = rect
    poly = _box(*rect)
    i = b.area(poly, {"amenity": "prison", "landuse": "prison", "name": "County Correctional Facility"},
               "prison", Z_CONTAINER, "prison")
    b.mark(i, "fence", poly.buffer(-3).exterior, Z_BUILDING)
    b.mark(i, "fence", poly.buffer(-8).exterior, Z_BUILDING)
    w = x1 - x0
    for k in range(4):
        bx = x0 + 20 + k * (w - 40) / 4
        _building(b, (bx, y0 + 40, bx + (w - 40) / 4 - 12, y0 + 70), {"building": "yes"}, "prison")
        _building(b, (bx, y1 - 70, bx + (w - 40) / 4 - 12, y1 - 40), {"building": "yes"}, "prison")
    _pitch(b, (x0 + w / 2 - 17, (y0 + y1) / 2 - 8, x0 + w / 2 + 17, (y0 + y1) / 2 + 9), "tennis") or \
        _parking(b, (x0 + w / 2 - 30, (y0 + y1) / 2 - 15, x0 + w / 2 + 30, (y0 + y1) / 2 + 15))


@_lot_site(size=(2, 4), zones=(0,), fallback=(0, 5))
def _airport(b: _Builder, rect):
    if not b.take("airport"):
        return
    from shapely.geometry import LineString
    x0, y0, x1, y1 = rect
    poly = _box(*rect)
    b.area(poly, {"aeroway": "aerodrome", "name": f"{b.code} Municipal Airport", "iata": "XTB"}, "airport",
           Z_CONTAINER, "airport")
    ry = y0 + (y1 - y0) * 0.62
    rwy = LineString([(x0 + 40, ry), (x1 - 40, ry)])
    b.take("runway")  # an airport always has its runway; it counts against the budget when there is one
    i = b.way(rwy, {"aeroway": "runway", "ref": "09/27", "surface": "asphalt", "width": "30"}, 30, "runway",
              Z_GROUND, "runway")
    b.mark(i, "runway_marking", LineString([(x0 + 70, ry), (x1 - 70, ry)]))
    for xe in (x0 + 44, x1 - 56):
        for k in range(6):
            yk = ry - 12 + k * 4.5
            b.mark(i, "runway_marking", _box(xe, yk, xe + 12, yk + 1.8))
    ty = ry - 60
    b.way(LineString([(x0 + 60, ty), (x1 - 60, ty)]), {"aeroway": "taxiway"}, 15, "paved", Z_GROUND)
    for xc in (x0 + 60, x1 - 60):
        b.way(LineString([(xc, ty), (xc, ry)]), {"aeroway": "taxiway"}, 15, "paved", Z_GROUND)
    apron = (x0 + 120, y0 + 20, x1 - 120, ty - 12)
    b.area(_box(*apron), {"aeroway": "apron", "surface": "concrete"}, "paved", Z_GROUND)
    ax0, ay0, ax1, ay1 = apron
    k = 0
    while b.budget.get("airport_hangar", 0) > 0 and k < 4:
        hx = ax0 + 8 + k * 45
        if hx + 35 > (ax0 + ax1) / 2 - 10:
            break
        _building(b, (hx, ay0 + 6, hx + 35, ay0 + 36), {"aeroway": "hangar", "building": "hangar"},
                  "airport_hangar", "airport_hangar")
        b.take("airport_hangar")
        k += 1
    if b.take("airport_terminal"):
        _building(b, ((ax0 + ax1) / 2 + 10, ay0 + 6, ax1 - 8, ay0 + 40),
                  {"aeroway": "terminal", "building": "terminal", "name": "Terminal"}, "airport_terminal",
                  "airport_terminal", ridge=False)
    for k in range(3):
        px = (ax0 + ax1) / 2 - 5 + k * 25
        b.mark(len(b.feats) - 1, "vehicle", _box(px, ay1 - 20, px + 14, ay1 - 8), Z_GROUND)
    _helipad(b, x1 - 70, ay0 + 25)
    _parking(b, (x0 + 20, y0 + 20, x0 + 110, y0 + 70))
    if b.budget.get("tower", 0) > 0:
        _tower(b, x0 + 115, ry - 30, "observation")


def _tower(b, x, y, kind="communication"):
    if not b.take("tower"):
        return None
    i = b.node(_pt(x, y), {"man_made": "tower", "tower:type": kind, "height": "40"}, 7, "tower", Z_SMALL, "tower")
    from shapely.geometry import LineString
    b.mark(i, "shadow", LineString([(x + 2, y - 2), (x + 28, y - 22)]).buffer(1.2))
    return i


@_lot_site(size=(2, 2), zones=(0,), fallback=(0, 5))
def _golf(b: _Builder, rect):
    if not b.take("golf_course"):
        return
    rng = b.rng
    poly = _blob(rect, rng, rough=0.12, fill=1.0)
    b.area(poly, {"leisure": "golf_course", "name": "Valley Golf Club"}, "golf_course", Z_COVER, "golf_course")
    x0, y0, x1, y1 = rect
    # a water hazard pond
    if b.take("pond"):
        b.area(_blob(_sub(rect, 0.4, 0.4, 0.6, 0.55), rng), {"natural": "water", "water": "pond"}, "pond", Z_WATER,
               "pond")
    for k in range(5):
        c = _pt(rng.uniform(x0 + 40, x1 - 40), rng.uniform(y0 + 40, y1 - 40))
        b.set_material(b.area(c.buffer(rng.uniform(5, 9), 8), {"golf": "bunker"}, "golf_course", Z_GROUND), "sand")


@_lot_site(size=(3, 3), zones=(0, 5), fallback=(0,))
def _reserve(b: _Builder, rect):
    if not b.take("nature_reserve"):
        return
    rng = b.rng
    poly = _jrect(rect, rng, 20)
    b.area(poly, {"boundary": "protected_area", "leisure": "nature_reserve", "protect_class": "4",
                  "name": "Heron Marsh Preserve"}, "nature_reserve", Z_CONTAINER, "nature_reserve")
    subs = [_sub(rect, fx, fy, fx + 0.3, fy + 0.3) for fx in (0.02, 0.35, 0.68) for fy in (0.02, 0.35, 0.68)]
    for s in subs:
        opts = [o for o in ("forest", "wetland", "meadow", "pond") if b.budget.get(o, 0) > 0]
        if not opts or rng.random() < 0.25:
            continue
        o = opts[int(rng.integers(len(opts)))]
        _COVER_RECIPES[o](b, s)


def _cover_recipe(name, tags_options, cover=None, shape="blob"):
    def fn(b, rect):
        if not b.take(name):
            return
        rng = b.rng
        tags = tags_options[int(rng.integers(len(tags_options)))]
        poly = _blob(rect, rng) if shape == "blob" else _jrect(rect, rng, 6)
        b.area(poly, tags, cover or name, Z_COVER if name not in ("pond", "lake") else Z_WATER, name)
    return fn


def _forest_recipe(b, rect):
    if not b.take("forest"):
        return
    rng = b.rng
    tags = [{"landuse": "forest", "leaf_type": "needleleaved"}, {"natural": "wood", "leaf_type": "broadleaved"},
            {"natural": "wood", "leaf_type": "mixed"}][int(rng.integers(3))]
    poly = _blob(rect, rng, rough=0.18)
    w = rect[2] - rect[0]
    if w > 150 and rng.random() < 0.4:
        hole = _blob(_sub(rect, 0.35, 0.35, 0.62, 0.6), rng)
        poly = poly.difference(hole)
    b.area(poly, tags, "forest", Z_COVER, "forest")


def _lake_recipe(b, rect):
    if not b.take("lake"):
        return
    rng = b.rng
    poly = _blob(rect, rng, rough=0.25)
    if rect[2] - rect[0] > 150 and rng.random() < 0.6:
        poly = poly.difference(_blob(_sub(rect, 0.4, 0.4, 0.58, 0.58), rng))
    b.area(poly, {"natural": "water", "water": "lake", "name": "Clear Lake"}, "lake", Z_WATER, "lake")


def _farm_recipe(b, rect):
    if not b.take("farmland"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    vertical = rng.random() < 0.5
    parts = list(_split(rect, rng.uniform(0.35, 0.65), vertical, gap=5))
    crop = ["wheat", "maize", "soy", "vegetables", "alfalfa"][int(rng.integers(5))]
    ang = 0 if rng.random() < 0.5 else 90
    if rng.random() < 0.35:
        # one field as a multipolygon of two parts
        geom = _jrect(parts[0], rng, 3).union(_jrect(parts[1], rng, 3))
        i = b.area(geom, {"landuse": "farmland", "crop": crop}, "farmland", Z_COVER, "farmland")
        b.mark(i, "crop_row", _lines_across(geom, 4.0, ang, rng))
        barn_in = parts[1]
    else:
        poly = _jrect(parts[0], rng, 3)
        i = b.area(poly, {"landuse": "farmland", "crop": crop}, "farmland", Z_COVER, "farmland")
        b.mark(i, "crop_row", _lines_across(poly, 4.0, ang, rng))
        barn_in = parts[1]
        if b.take("farmland"):
            poly2 = _jrect(parts[1], rng, 3)
            crop2 = ["wheat", "maize", "soy", "vegetables", "alfalfa"][int(rng.integers(5))]
            i = b.area(poly2, {"landuse": "farmland", "crop": crop2}, "farmland", Z_COVER, "farmland")
            b.mark(i, "crop_row", _lines_across(poly2, 4.0, 90 - ang, rng))
    if b.take("barn"):
        bx, by = barn_in[0] + 8, barn_in[1] + 8
        b.set_material(b.area(_box(bx - 4, by - 4, bx + 50, by + 40), {"landuse": "farmyard"}, "bare_soil", Z_GROUND),
                       "gravel")
        _building(b, (bx, by, bx + 30, by + 18), {"building": "barn"}, "barn", "barn")
    if b.budget.get("pond", 0) > 0 and rng.random() < 0.3:
        b.take("pond")
        b.area(_blob((x1 - 40, y1 - 35, x1 - 8, y1 - 8), rng), {"natural": "water", "water": "pond"}, "pond",
               Z_WATER, "pond")


def _ponds_recipe(b, rect):
    rng = b.rng
    k = 0
    for s in _quarters(rect):
        if rng.random() < 0.5 and k > 0:
            continue
        if not b.take("pond"):
            break
        k += 1
        x0, y0, x1, y1 = s
        d = rng.uniform(25, min(x1 - x0, y1 - y0))
        b.area(_blob(_fit(s, d, d * rng.uniform(0.6, 1), rng), rng), {"natural": "water", "water": "pond"}, "pond",
               Z_WATER, "pond")


def _wetland_recipe(b, rect):
    if not b.take("wetland"):
        return
    rng = b.rng
    kind = ["marsh", "swamp", "wet_meadow", "reedbed"][int(rng.integers(4))]
    b.area(_blob(rect, rng, rough=0.3), {"natural": "wetland", "wetland": kind}, "wetland", Z_COVER, "wetland")


_COVER_RECIPES: dict[str, Callable] = {
    "forest": _forest_recipe,
    "farmland": _farm_recipe,
    "lake": _lake_recipe,
    "pond": _ponds_recipe,
    "wetland": _wetland_recipe,
    "meadow": _cover_recipe("meadow", [{"landuse": "meadow"}, {"landuse": "meadow", "meadow": "agricultural"}],
                            shape="rect"),
    "chaparral": _cover_recipe("chaparral", [{"natural": "scrub"}]),
    "desert": _cover_recipe("desert", [{"natural": "desert"}]),
    "sand": _cover_recipe("sand", [{"natural": "sand"}]),
    "bareland": _cover_recipe("bareland", [{"natural": "bare_rock"}, {"natural": "scree"}, {"natural": "shingle"}]),
    "construction_site": _cover_recipe("construction_site", [{"landuse": "construction"}], shape="rect"),
    "surface_mine": _cover_recipe("surface_mine", [{"landuse": "quarry", "resource": "gravel"}]),
    "waste_disposal": _cover_recipe("waste_disposal", [{"landuse": "landfill"}]),
}


def _cover_site(name, size=(1, 1), zones=(0,), fallback=(0, 5)):
    @_lot_site(size=size, zones=zones, fallback=fallback)
    def run(b, rect):
        _COVER_RECIPES[name](b, rect)
    return run


def _random_size(b, opts):
    return opts[int(b.rng.integers(len(opts)))]


def _sized_cover(name, sizes, zones=(0,), fallback=(0, 5)):
    def run(b: _Builder):
        h, w = _random_size(b, sizes)
        rect, _ = b.alloc(h, w, zones)
        if rect is None:
            rect, _ = b.alloc(1, 1, fallback)
        if rect is None:
            return False
        _COVER_RECIPES[name](b, rect)
        return True
    return run


@_lot_site(size=(1, 2), zones=(0,), fallback=(0, 4, 5))
def _solar(b: _Builder, rect):
    if not b.take("solar_farm"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    if rng.random() < 0.5:
        poly = _box(*rect)
        tags = {"power": "plant", "plant:source": "solar", "plant:method": "photovoltaic", "name": "Sun Ranch Solar"}
    else:
        poly = _box(*_sub(rect, 0, 0, 0.47, 1)).union(_box(*_sub(rect, 0.53, 0.1, 1, 0.9)))
        tags = {"power": "plant", "plant:source": "solar", "plant:method": "photovoltaic", "name": "Mesa Solar"}
    i = b.area(poly, tags, "solar_farm", Z_GROUND, "solar_farm")
    b.mark(i, "solar_row", _lines_across(poly.buffer(-4), 6.0, 0, rng))


@_lot_site(size=(2, 3), zones=(0,), fallback=(0, 5))
def _wind(b: _Builder, rect):
    if not b.take("wind_farm"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    b.area(_box(*rect), {"power": "plant", "plant:source": "wind", "name": "Prairie Wind"}, "wind_farm",
           Z_CONTAINER, "wind_farm")
    # farmland underneath, like real wind farms
    for part in _quarters(rect):
        if b.take("farmland"):
            poly = _jrect(part, rng, 4)
            i = b.area(poly, {"landuse": "farmland", "crop": "wheat"}, "farmland", Z_COVER, "farmland")
            b.mark(i, "crop_row", _lines_across(poly, 4.0, 0, rng))
    from shapely.geometry import LineString
    for gx in np.linspace(x0 + 80, x1 - 80, 2):
        for gy in np.linspace(y0 + 70, y1 - 70, 2):
            x, y = gx + rng.uniform(-20, 20), gy + rng.uniform(-20, 20)
            tags = {"power": "generator", "generator:source": "wind", "generator:method": "wind_turbine",
                    "generator:type": "horizontal_axis"}
            i = b.node(_pt(x, y), tags, 5, "wind_farm", Z_SMALL, "wind_farm")
            a = rng.uniform(0, 2 * np.pi)
            for k in range(3):
                t = a + k * 2 * np.pi / 3
                b.mark(i, "turbine_blade", LineString([(x, y), (x + 38 * np.cos(t), y + 38 * np.sin(t))]))
            b.mark(i, "shadow", LineString([(x + 2, y - 2), (x + 60, y - 50)]).buffer(1.5))


@_lot_site(size=(1, 1), zones=(4,), fallback=(0,))
def _industrial(b: _Builder, rect):
    if not b.take("industrial"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    b.area(_box(*rect), {"landuse": "industrial"}, "industrial", Z_CONTAINER, "industrial")
    for q in _quarters(rect):
        qx0, qy0, qx1, qy1 = q
        o = rng.random()
        if b.budget.get("warehouse", 0) > 0 and o < 0.5:
            b.take("warehouse")
            _building(b, (qx0 + 4, qy0 + 4, qx1 - 4, qy1 - 20), {"building": "warehouse"}, "warehouse", "warehouse",
                      ridge=False)
            i = b.area(_box(qx0 + 4, qy1 - 17, qx1 - 4, qy1 - 4), {"area:highway": "service"}, "paved", Z_GROUND)
            for k in range(int((qx1 - qx0 - 10) // 16)):
                b.mark(i, "vehicle", _box(qx0 + 6 + k * 16, qy1 - 16, qx0 + 9 + k * 16, qy1 - 5))
        elif b.budget.get("electric_substation", 0) > 0 and o < 0.65:
            _lot_substation(b, q)
        elif b.budget.get("tower", 0) > 0 and o < 0.75:
            _tower(b, (qx0 + qx1) / 2, (qy0 + qy1) / 2)
        elif b.budget.get("construction_site", 0) > 0 and o < 0.85:
            _COVER_RECIPES["construction_site"](b, q)
        else:
            _building(b, (qx0 + 6, qy0 + 6, qx1 - 6, qy1 - 10), {"building": "industrial"}, "building")


@_lot_site(size=(1, 1), zones=(0, 4), fallback=(0, 5))
def _water_treatment(b: _Builder, rect):
    if not b.take("water_treatment_facility"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    tags = [{"man_made": "wastewater_plant", "name": "Wastewater Plant"},
            {"man_made": "water_works", "name": "Water Works"}][int(rng.integers(2))]
    poly = _box(*rect)
    i = b.area(poly, tags, "water_treatment_facility", Z_CONTAINER, "water_treatment_facility")
    b.mark(i, "fence", poly.exterior)
    for k in range(3):
        cx, cy = x0 + 30 + k * 45, y1 - 35
        c = _pt(cx, cy).buffer(17, 24)
        j = b.set_material(b.area(c, {"man_made": "storage_tank", "content": "water"}, "water_treatment_facility",
                                  Z_BUILDING), "water")
        b.mark(j, "tank_rim", c.buffer(-1).exterior)
        b.mark(j, "tank_rim", _pt(cx, cy).buffer(3).exterior)
    for k in range(2):
        bx = x0 + 15 + k * 65
        j = b.set_material(b.area(_box(bx, y0 + 15, bx + 55, y0 + 70), {"man_made": "basin", "natural": "water",
                                                                        "water": "basin"},
                                  "water_treatment_facility", Z_WATER), "water")
        b.mark(j, "fence", _box(bx, y0 + 15, bx + 55, y0 + 70).exterior)


@_lot_site(size=(1, 1), zones=(0,), fallback=(0, 5))
def _aquaculture(b: _Builder, rect):
    if not b.take("aquaculture"):
        return
    x0, y0, x1, y1 = rect
    b.area(_box(*rect), {"landuse": "aquaculture", "aquaculture": "fish"}, "aquaculture", Z_CONTAINER,
           "aquaculture")
    for gx in range(4):
        for gy in range(3):
            px = x0 + 6 + gx * (x1 - x0 - 6) / 4
            py = y0 + 6 + gy * (y1 - y0 - 6) / 3
            r = (px, py, px + (x1 - x0 - 6) / 4 - 6, py + (y1 - y0 - 6) / 3 - 6)
            b.area(_box(*r), {"natural": "water", "water": "basin"}, "aquaculture", Z_WATER)


@_lot_site(size=(1, 1), zones=(0,), fallback=(0, 5))
def _park(b: _Builder, rect):
    if not b.take("park"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    poly = _jrect(rect, rng, 4)
    b.area(poly, {"leisure": "park", "name": "Riverside Park"}, "park", Z_COVER, "park")
    from shapely.geometry import LineString
    b.way(LineString([(x0 + 5, y0 + 5), ((x0 + x1) / 2, (y0 + y1) / 2 + 10), (x1 - 5, y1 - 5)]),
          {"highway": "footway"}, 3, "paved", Z_GROUND)
    for k in range(int(rng.integers(3, 8))):
        b.node(_pt(rng.uniform(x0 + 8, x1 - 8), rng.uniform(y0 + 8, y1 - 8)), {"natural": "tree"},
               rng.uniform(6, 11), "trees", Z_SMALL)
    opts = [o for o in ("tennis", "baseball_field", "skate_park", "swimming_pool", "pond") if b.budget.get(o, 0) > 0]
    if opts:
        o = opts[int(rng.integers(len(opts)))]
        sub = _sub(rect, 0.55, 0.05, 0.97, 0.45)
        if o == "tennis":
            _pitch(b, (sub[0], sub[1], sub[0] + 34, sub[1] + 17), "tennis")
        elif o == "baseball_field":
            r = _fit(sub, 60, 60, rng)
            if r:
                _pitch(b, r, "baseball")
        elif o == "skate_park":
            _lot_skate(b, sub)
        elif o == "swimming_pool":
            _pool(b, (sub[0] + sub[2]) / 2, (sub[1] + sub[3]) / 2, rng, public=True)
        else:
            _ponds_recipe(b, sub)


def _coast_site(b: _Builder, n_cells=1):
    """Reserve n consecutive coast cells; return (u0, u1) along the coast or None."""
    side = b.rs.coast
    if side == "none":
        return None
    along = b.nc if side in ("south", "north") else b.nr
    sw = b.sea_cells
    idx = [(k, sw) for k in range(along)]
    order = b.rng.permutation(along - n_cells + 1) if along >= n_cells else []
    for k0 in order:
        cells = []
        for k in range(k0, k0 + n_cells):
            if side == "west":
                cells.append((k, sw))
            elif side == "east":
                cells.append((k, b.nc - 1 - sw))
            elif side == "south":
                cells.append((sw, k))
            else:
                cells.append((b.nr - 1 - sw, k))
        if all(b.zone[r, c] == 2 and not b.used[r, c] for r, c in cells):
            # not crossed by a road/rail running perpendicular to the coast
            if side in ("west", "east"):
                rs = [r for r, _ in cells]
                if any(b.block_h[r, cells[0][1]] for r in rs[1:]):
                    continue
            else:
                cs = [c for _, c in cells]
                if any(b.block_v[cells[0][0], c] for c in cs[1:]):
                    continue
            for r, c in cells:
                b.used[r, c] = True
            return k0 * b.cell + b.m, (k0 + n_cells) * b.cell - b.m
    return None


def _coast_poly(b, u0, u1, v_from_coast0, v1, n=20):
    """Polygon between the coastline (offset by v_from_coast0) and depth v1 from the sea edge, u in [u0, u1]."""
    from shapely.geometry import Polygon
    us = np.linspace(u0, u1, n)
    near = [b.coast_xy(u, b.coast_v(u) + v_from_coast0) for u in us]
    far = [b.coast_xy(u, v1) for u in us[::-1]]
    return Polygon(near + far)


def _beach(b: _Builder):
    s = _coast_site(b, 1)
    if s is None or not b.take("beach"):
        return False
    u0, u1 = s
    poly = _coast_poly(b, u0 - b.m, u1 + b.m, 0.0, b.sea_cells * b.cell + 45)
    b.area(poly, {"natural": "beach", "surface": "sand"}, "beach", Z_COVER, "beach")
    return True


def _port(b: _Builder):
    s = _coast_site(b, 2)
    if s is None or not b.take("port"):
        return False
    rng = b.rng
    u0, u1 = s
    depth = b.sea_cells * b.cell + b.cell - b.m
    poly = _coast_poly(b, u0, u1, -25.0, depth)
    i = b.area(poly, {"landuse": "port", "name": "Port Terminal"}, "port", Z_GROUND, "port")
    # container stacks, a quay and cranes
    v0 = b.sea_cells * b.cell + 20
    for k in range(int((u1 - u0 - 20) // 14)):
        u = u0 + 10 + k * 14
        for vv in (v0 + 20, v0 + 50, v0 + 80):
            x0_, y0_ = b.coast_xy(u, vv)
            x1_, y1_ = b.coast_xy(u + 12, vv + 2.5)
            b.mark(i, "vehicle", _box(x0_, y0_, x1_, y1_))
    for k in range(3):
        u = u0 + 30 + k * (u1 - u0 - 60) / 2
        x, y = b.coast_xy(u, b.coast_v(u) - 10)
        b.mark(i, "shadow", _box(x - 3, y - 3, x + 3, y + 3).buffer(6))
    ux = (u0 + u1) / 2
    if b.take("warehouse"):
        xa, ya = b.coast_xy(ux - 40, depth - 60)
        xb, yb = b.coast_xy(ux + 40, depth - 10)
        _building(b, _box(xa, ya, xb, yb), {"building": "warehouse"}, "warehouse", "warehouse", ridge=False)
    return True


def _shipyard(b: _Builder):
    s = _coast_site(b, 1)
    if s is None or not b.take("shipyard"):
        return False
    u0, u1 = s
    depth = b.sea_cells * b.cell + b.cell - b.m
    poly = _coast_poly(b, u0, u1, -15.0, depth)
    b.area(poly, {"landuse": "industrial", "industrial": "shipyard", "man_made": "shipyard",
                  "name": "Harbor Shipyard"}, "shipyard", Z_GROUND, "shipyard")
    # dry dock (water) and a big shed
    um = (u0 + u1) / 2
    xa, ya = b.coast_xy(um - 15, b.coast_v(um) - 10)
    xb, yb = b.coast_xy(um + 15, b.coast_v(um) + 90)
    b.set_material(b.area(_box(xa, ya, xb, yb), {"waterway": "dock", "dock": "drydock"}, "shipyard", Z_WATER),
                   "water")
    xa, ya = b.coast_xy(u0 + 5, depth - 60)
    xb, yb = b.coast_xy(um - 25, depth - 5)
    _building(b, _box(xa, ya, xb, yb), {"building": "industrial"}, "shipyard", ridge=False)
    return True


def _marina(b: _Builder):
    s = _coast_site(b, 1)
    if s is None or not b.take("marina"):
        return False
    rng = b.rng
    u0, u1 = s
    poly = _coast_poly(b, u0, u1, -110.0, b.sea_cells * b.cell + 40)
    i = b.area(poly, {"leisure": "marina", "name": "Harbor Marina"}, "marina", Z_GROUND, "marina")
    from shapely.geometry import LineString
    for k in range(4):
        u = u0 + 20 + k * (u1 - u0 - 40) / 3
        a = b.coast_xy(u, b.coast_v(u) + 2)
        c = b.coast_xy(u, b.coast_v(u) - 95)
        j = b.way(LineString([a, c]), {"man_made": "pier", "floating": "yes"}, 3, "paved", Z_SMALL)
        for t in np.linspace(10, 85, 6):
            for side in (-1, 1):
                x, y = b.coast_xy(u + side * 5, b.coast_v(u) - t)
                b.mark(j, "boat", _box(x - 2, y - 1.2, x + 2, y + 1.2).buffer(0.4), Z_SMALL)
    return True


def _station(b: _Builder):
    """A railway station beside the line, preferably in town."""
    cl = b.c_rl
    rect, rc = b.alloc(1, 1, (3, 4, 0), pick=lambda r, c: c == cl)
    if rect is None or not b.take("railway_station"):
        return False
    x0, y0, x1, y1 = rect
    xr = b.x_rl
    plat = (xr + 5, y0 + 10, xr + 12, y1 - 10)
    j = b.area(_box(*plat), {"railway": "platform", "public_transport": "platform"}, "paved", Z_GROUND)
    i = b.area(_box(xr + 14, y0 + 60, xr + 50, y0 + 95), {"railway": "station", "public_transport": "station",
                                                          "building": "train_station", "name": "Union Station"},
               "railway_station", Z_BUILDING, "railway_station")
    _parking(b, (xr + 55, y0 + 10, x1 - 4, y1 - 10))
    return True


def _tower_site(b: _Builder):
    rect, _ = b.alloc(1, 1, (0, 4, 5))
    if rect is None:
        return False
    x0, y0, x1, y1 = rect
    x, y = (x0 + x1) / 2, (y0 + y1) / 2
    if _tower(b, x, y) is None:
        return False
    b.set_material(b.area(_box(x - 12, y - 12, x + 12, y + 12), {"surface": "gravel", "area:highway": "service"},
                          "bare_soil", Z_GROUND), "gravel")
    if b.budget.get("electric_substation", 0) > 0:
        _lot_substation(b, (x0, y0, (x0 + x1) / 2, (y0 + y1) / 2 - 15))
    return True


def _helipad_site(b: _Builder):
    rect, _ = b.alloc(1, 1, (0, 4, 3))
    if rect is None:
        return False
    x0, y0, x1, y1 = rect
    b.area(_box(x0 + 40, y0 + 40, x1 - 40, y1 - 40), {"surface": "grass", "landuse": "grass"}, "grass", Z_COVER)
    if _helipad(b, (x0 + x1) / 2, (y0 + y1) / 2) is None:
        return False
    if b.budget.get("fire_station", 0) > 0:
        _lot_fire(b, (x0, y0, (x0 + x1) / 2, (y0 + y1) / 2))
    return True


def _sports_site(b: _Builder):
    """A sports complex for pitches left over after schools, parks and blocks."""
    rect, _ = b.alloc(1, 1, (0, 3, 5))
    if rect is None:
        return False
    rng = b.rng
    x0, y0, x1, y1 = rect
    did = False
    lots = _quarters(rect)
    for q in lots:
        for sport, name, (w, h) in (("soccer", "soccer", (70, 45)), ("american_football", "american_football",
                                                                      (70, 40)), ("baseball", "baseball_field",
                                                                                  (60, 60)),
                                    ("skateboard", "skate_park", (30, 25)), ("tennis", "tennis", (34, 17))):
            if b.budget.get(name, 0) > 0:
                r = _fit(q, w, h, rng)
                if r and _pitch(b, r, sport) is not None:
                    did = True
                    break
    if not did:
        _parking(b, lots[0])
    return True


def _pool_site(b: _Builder):
    rect, _ = b.alloc(1, 1, (3, 0))
    if rect is None:
        return False
    _residential_block(b, rect)
    return True


_SITE_ORDER: list[tuple[str, Callable]] = [
    ("airport", _airport), ("nature_reserve", _reserve), ("golf_course", _golf), ("wind_farm", _wind),
    ("university", _university), ("stadium", _stadium), ("shopping_mall", _mall), ("prison", _prison),
    ("port", _port), ("shipyard", _shipyard), ("marina", _marina), ("beach", _beach),
    ("railway_station", _station),
    ("lake", _sized_cover("lake", [(2, 2), (1, 2), (2, 1)], zones=(0,))),
    ("solar_farm", _solar), ("surface_mine", _sized_cover("surface_mine", [(1, 2), (1, 1)])),
    ("waste_disposal", _sized_cover("waste_disposal", [(1, 1)])),
    ("water_treatment_facility", _water_treatment), ("aquaculture", _aquaculture),
    ("school", _school), ("hospital", _hospital), ("industrial", _industrial),
    ("religious_building", _civic_block), ("gas_station", _civic_block),
    ("park", _park),
    ("farmland", _sized_cover("farmland", [(1, 1), (1, 2), (2, 1), (2, 2)], zones=(0,))),
    ("forest", _sized_cover("forest", [(1, 1), (2, 2), (1, 2), (2, 3)], zones=(0, 5))),
    ("wetland", _sized_cover("wetland", [(1, 1), (1, 2)], zones=(5, 0))),
    ("meadow", _sized_cover("meadow", [(1, 1), (1, 2)], zones=(0, 5))),
    ("chaparral", _sized_cover("chaparral", [(1, 1), (2, 2), (1, 2)])),
    ("desert", _sized_cover("desert", [(2, 2), (1, 2), (1, 1)])),
    ("sand", _sized_cover("sand", [(1, 1)])),
    ("bareland", _sized_cover("bareland", [(1, 1)])),
    ("construction_site", _sized_cover("construction_site", [(1, 1)], zones=(0, 3, 4))),
    ("cemetery", _civic_block), ("pond", _sized_cover("pond", [(1, 1)], zones=(0, 5))),
]

_LEFTOVER: list[tuple[str, Callable]] = [
    ("swimming_pool", _pool_site), ("tennis", _sports_site), ("soccer", _sports_site),
    ("american_football", _sports_site), ("baseball_field", _sports_site), ("skate_park", _sports_site),
    ("tower", _tower_site), ("helipad", _helipad_site), ("electric_substation", _tower_site),
    ("warehouse", _industrial), ("office", _civic_block), ("police_station", _civic_block),
    ("fire_station", _civic_block), ("supermarket", _civic_block), ("car_dealership", _civic_block),
    ("parking_lot", _civic_block), ("parking_garage", _civic_block),
]


# ------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------
def generate(spec: TestbedSpec, seed: int | None = None) -> list[RegionWorld]:
    """Generate every region of the spec (sorted by code); the same seed gives the same world."""
    from gl10m.concepts import ConceptMatcher

    prof = spec.load_profile()
    matcher = ConceptMatcher(prof.concepts)
    seed = spec.seed if seed is None else int(seed)
    root = np.random.SeedSequence(seed)
    targets = concept_targets(spec, prof, np.random.default_rng(root.spawn(1)[0]))
    codes = sorted(spec.regions)
    children = root.spawn(len(codes) + 1)[1:]
    out = []
    for k, code in enumerate(codes):
        rng = np.random.default_rng(children[k])
        out.append(build_region(spec, code, rng, targets[code], matcher, (k + 1) * 10_000_000,
                                split=prof.split_of(code)))
    return out


def build_region(spec: TestbedSpec, code: str, rng: np.random.Generator, budget: dict[str, int], matcher,
                 id_base: int, *, split: str | None = None, budget_network: bool = False) -> RegionWorld:
    """Lay out one region of `spec` with the recipes (`_Builder`) and return it in EPSG:4326.

    budget: planned instances per concept name; id_base: its OSM ids are id_base + 1 ...
    budget_network: draw the highway, railway, river and main roads only where the budget asks
    for them (highway, railroad, river), as the model-scale scenes do; the testbed world always
    draws its full network (False).
    """
    import geopandas as gpd
    import shapely
    from pyproj import Transformer

    b = _Builder(spec, code, rng, budget, matcher, id_base)
    b.budget_network = budget_network
    b.build()
    inv = _transformer(b.epsg_nad83, 4326)

    def to_ll(xy, inv=inv):
        x, y = inv.transform(xy[:, 0], xy[:, 1])
        return np.round(np.column_stack([x, y]), 7)

    geoms = shapely.transform(np.array([f["geometry"] for f in b.feats], dtype=object), to_ll)
    geoms = _repair(geoms)
    # OSM ids: nodes, ways and relations each count up from id_base in creation order
    counters = {"node": 0, "way": 0, "relation": 0}
    osm_ids = []
    for f in b.feats:
        counters[f["osm_type"]] += 1
        osm_ids.append(id_base + counters[f["osm_type"]])
    df = gpd.GeoDataFrame({
        "fid": np.arange(len(b.feats), dtype=np.int64) + id_base,
        "osm_type": [f["osm_type"] for f in b.feats],
        "osm_id": np.asarray(osm_ids, dtype=np.int64),
        "tags": [f["tags"] for f in b.feats],
        "concept": np.asarray([f["concept"] for f in b.feats], dtype=np.int64),
        "cover": np.asarray([f["cover"] for f in b.feats], dtype=np.int64),
        "z": np.asarray([f["z"] for f in b.feats], dtype=np.int64),
        "width_m": np.asarray([f["width_m"] for f in b.feats], dtype=np.float64),
        "material": np.asarray([f["material"] for f in b.feats], dtype=np.int64),
    }, geometry=list(geoms), crs="EPSG:4326")
    mgeoms = shapely.transform(np.array([m[3] for m in b.marks], dtype=object), to_ll) if b.marks else []
    marks = gpd.GeoDataFrame({
        "fid": np.asarray([m[0] + id_base for m in b.marks], dtype=np.int64),
        "mark": np.asarray([m[1] for m in b.marks], dtype=np.int64),
        "z": np.asarray([m[2] for m in b.marks], dtype=np.int64),
    }, geometry=list(mgeoms), crs="EPSG:4326")
    return RegionWorld(
        code=code, bbox=b.bbox, utm_epsg_nad83=b.epsg_nad83, utm_epsg_wgs84=b.epsg_wgs84, features=df,
        marks=marks, base_cover=BG[BIOMES[b.rs.biome]["base"]], id_base=id_base, biome=b.rs.biome,
        split=split, targets=dict(budget))


def _repair(geoms):
    """Rounding to 1e-7 degrees can make a polygon invalid; fix it (areas stay areas)."""
    import shapely
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        fixed = shapely.make_valid(geoms[bad])
        out = []
        for g in fixed:
            if g.geom_type == "GeometryCollection":
                polys = [p for p in g.geoms if p.geom_type in ("Polygon", "MultiPolygon")]
                g = shapely.union_all(polys) if polys else g
            out.append(g)
        geoms = geoms.copy()
        geoms[bad] = out
    return geoms


# ------------------------------------------------------------------------------------------
# PBF
# ------------------------------------------------------------------------------------------
def write_pbf(regions: list[RegionWorld], path: str | Path) -> Path:
    """Write the regions' features as one OSM PBF (nodes, ways, relations, each sorted by id); atomic."""
    from gl10m.testbed.pbfwrite import write_regions_pbf
    return write_regions_pbf(regions, path)


def write_pbfs(regions: list[RegionWorld], osm_dir: str | Path) -> dict[str, Path]:
    """One PBF per region, DIR/osm/{CODE}.osm.pbf (how the pipeline reads one extract per state)."""
    return {r.code: write_pbf([r], Path(osm_dir) / f"{r.code}.osm.pbf") for r in regions}


def write_vector_world(regions: list[RegionWorld], out: str | Path, truth_res_m: float | None = 1.0) -> dict:
    """Write DIR/osm/{CODE}.osm.pbf and (unless truth_res_m is None) DIR/truth/{CODE}.tif; returns the paths."""
    out = Path(out)
    paths = {"osm": write_pbfs(regions, out / "osm"), "truth": {}}
    if truth_res_m is not None:
        for r in regions:
            paths["truth"][r.code] = write_truth(r, out / "truth" / f"{r.code}.tif", truth_res_m)
    return paths


# ------------------------------------------------------------------------------------------
# Truth raster
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _transformer(src, dst):
    """A cached always_xy pyproj Transformer (building one costs ~5 ms)."""
    from pyproj import Transformer
    return Transformer.from_crs(src, dst, always_xy=True)


@functools.lru_cache(maxsize=32)
def _transformer_from_4326(crs):
    from pyproj import CRS, Transformer
    return Transformer.from_crs(4326, CRS.from_user_input(crs), always_xy=True)


def _to_crs(geoms, crs):
    import shapely
    tr = _transformer_from_4326(crs)

    def f(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])
    return shapely.transform(np.asarray(geoms, dtype=object), f)


def draw_shapes(region: RegionWorld, crs) -> tuple[list, np.ndarray, np.ndarray]:
    """The features as drawable polygons in `crs` (metric), in draw order; plus cover, z and material."""
    import shapely
    df = region.features
    order = np.lexsort((df["fid"].to_numpy(), df["z"].to_numpy()))
    df = df.iloc[order]
    geoms = _to_crs(df.geometry.to_numpy(), crs)
    width = df["width_m"].to_numpy()
    kinds = shapely.get_type_id(geoms)  # 0 point, 1 linestring, 3 polygon, 6 multipolygon
    out = np.empty(len(geoms), dtype=object)
    is_area = (kinds == 3) | (kinds == 6)
    out[is_area] = geoms[is_area]
    pts = kinds == 0
    out[pts] = shapely.buffer(geoms[pts], np.maximum(width[pts], 1.0) / 2, quad_segs=6)
    lines = (kinds == 1) | (kinds == 5)
    tunnel = np.array([t.get("tunnel") == "yes" for t in df["tags"]])
    plain = lines & ~tunnel
    out[plain] = shapely.buffer(geoms[plain], np.maximum(width[plain], 1.0) / 2, quad_segs=4, cap_style="flat")
    for i in np.nonzero(lines & tunnel)[0]:
        g = geoms[i]
        a, b = shapely.get_point(g, 0), shapely.get_point(g, -1)
        out[i] = shapely.union(shapely.buffer(a, width[i] / 2, cap_style="square"),
                               shapely.buffer(b, width[i] / 2, cap_style="square"))
    return list(out), df["cover"].to_numpy(), df["z"].to_numpy(), df["material"].to_numpy()


def rasterio_bounds(transform, height: int, width: int) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a north-up grid."""
    return (transform.c, transform.f + height * transform.e, transform.c + width * transform.a, transform.f)


def rasterize_truth(region: RegionWorld, crs, transform, shape) -> tuple[np.ndarray, np.ndarray]:
    """Burn the region into a grid: (classes uint8 [H, W], marks uint8 [H, W]).

    classes: truth id per pixel (TRUTH_CLASSES), the region's base cover where nothing is
    mapped, 255 outside the region's bbox. marks: MARK id of thin markings (0 none), only where
    the feature they belong to is on top.
    """
    layers = rasterize_layers(region, crs, transform, shape)
    return layers["classes"], layers["marks"]


def _index_dtype(n: int) -> str:
    """The narrowest burn dtype for feature indices 1..n (half the memory traffic of int32)."""
    return "uint16" if n < 65535 else "int32"


def rasterize_layers(region: RegionWorld, crs, transform, shape) -> dict[str, np.ndarray]:
    """rasterize_truth's layers plus `material` (uint8 MATERIALS id per pixel, 0 outside the region):
    what the top feature is made of (a church is class religious_building, material roof)."""
    from rasterio import features as rfeat
    import shapely
    from shapely.geometry import box

    H, W = int(shape[0]), int(shape[1])
    shapes, cover, z, mat = draw_shapes(region, crs)
    # one burn of feature indices in draw order (later shapes overwrite earlier ones)
    idx = rfeat.rasterize(((g, i + 1) for i, g in enumerate(shapes) if g is not None and not g.is_empty),
                          out_shape=(H, W), transform=transform, fill=0, dtype=_index_dtype(len(shapes)))
    lut_c = np.concatenate([[region.base_cover], cover]).astype(np.uint8)
    lut_z = np.concatenate([[0], z]).astype(np.int16)
    classes = np.take(lut_c, idx)
    material = np.take(np.concatenate([[CLASS_MATERIAL[region.base_cover]], mat]).astype(np.uint8), idx)
    bbox = _to_crs([box(*region.bbox)], crs)[0]
    if not bbox.contains(box(*rasterio_bounds(transform, H, W))):  # else every pixel is inside the region
        inside = rfeat.rasterize([(bbox, 1)], out_shape=(H, W), transform=transform, fill=0, dtype="uint8")
        classes[inside == 0] = NODATA
        material[inside == 0] = 0
    marks = np.zeros((H, W), dtype=np.uint8)
    m = region.marks
    if m is not None and len(m):
        mo = np.lexsort((np.arange(len(m)), m["z"].to_numpy()))
        mg = _to_crs(m.geometry.to_numpy()[mo], crs)
        mid = m["mark"].to_numpy()[mo]
        mz = m["z"].to_numpy()[mo]
        j = rfeat.rasterize(((g, i + 1) for i, g in enumerate(mg) if g is not None and not g.is_empty),
                            out_shape=(H, W), transform=transform, fill=0, dtype=_index_dtype(len(mg)),
                            all_touched=False)
        at = np.flatnonzero(j != 0)  # marks are thin: work on their pixels only
        ja = j.ravel()[at]
        keep = (np.concatenate([[0], mz]).astype(np.int16)[ja] >= lut_z[idx.ravel()[at]]) \
            & (classes.ravel()[at] != NODATA)
        marks.ravel()[at[keep]] = np.concatenate([[0], mid]).astype(np.uint8)[ja[keep]]
    del idx
    return {"classes": classes, "marks": marks, "material": material}


def truth_grid(region: RegionWorld, res_m: float = 1.0, crs: int | None = None):
    """(crs, transform, shape) of a north-up grid covering the region's bbox at res_m in its UTM zone."""
    from pyproj import Transformer
    from rasterio.transform import from_origin
    crs = crs or region.utm_epsg_nad83
    tr = Transformer.from_crs(4326, crs, always_xy=True)
    w, s, e, n = region.bbox
    xs, ys = tr.transform([w, e, e, w], [s, s, n, n])
    x0 = math.floor(min(xs) / res_m) * res_m
    y1 = math.ceil(max(ys) / res_m) * res_m
    x1 = math.ceil(max(xs) / res_m) * res_m
    y0 = math.floor(min(ys) / res_m) * res_m
    shape = (int(round((y1 - y0) / res_m)), int(round((x1 - x0) / res_m)))
    return crs, from_origin(x0, y1, res_m, res_m), shape


def write_truth(region: RegionWorld, path: str | Path, res_m: float = 1.0, classes: np.ndarray | None = None) -> Path:
    """Write the region's truth classes on truth_grid(region, res_m) as a uint8 COG (nodata 255), atomically.

    Pass `classes` when already rasterised on that same grid (the imagery renderer does) to skip a burn.
    """
    import rasterio
    from gl10m.io import atomic_path
    crs, transform, shape = truth_grid(region, res_m)
    if classes is None:
        classes, _ = rasterize_truth(region, crs, transform, shape)
    elif classes.shape != shape or classes.dtype != np.uint8:
        raise ValueError(f"classes must be uint8 {shape} (truth_grid at {res_m} m), got {classes.dtype} {classes.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", driver="COG", width=shape[1], height=shape[0], count=1, dtype="uint8",
                           crs=f"EPSG:{crs}", transform=transform, nodata=NODATA, compress="deflate",
                           blocksize=512, overview_resampling="mode") as dst:
            dst.write(classes, 1)
            dst.update_tags(classes=",".join(TRUTH_CLASSES), region=region.code)
    return path
