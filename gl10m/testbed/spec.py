"""The testbed world spec (manifests/testbed.yaml): schema, biomes, `load_spec`, `spec_from_dict`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gl10m import safeyaml
from gl10m.errors import UserError
from gl10m.profile import MANIFESTS, Profile, format_validation_error, load as load_profile
from gl10m.testbed import classes as C

DEFAULT_SPEC = MANIFESTS / "testbed.yaml"

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
    if names != C.CONCEPT_NAMES:
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
    return spec_from_dict(safeyaml.read_mapping(p, "testbed spec", TestbedSpecError), p)


