"""Load and validate a dataset profile (manifests/*.yaml).

A profile is the whole dataset definition as data. Validation is strict: an unknown key, a
concept without a rule, a bad date or a negative threshold is one `ProfileError` whose message
names the field (``profile gl10m-66.yaml: concepts.3.rule: field required``).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from gl10m.concepts import RuleError, compile_rule
from gl10m import safeyaml
from gl10m.errors import UserError
from gl10m.io import is_url

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
DEFAULT_PROFILE = MANIFESTS / "gl10m-66.yaml"


class ProfileError(UserError, ValueError):
    """A profile that cannot be used; the message is one line naming the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NonNeg = Field(ge=0)


class Buffers(_Strict):
    line: float | None = Field(default=None, gt=0, description="half-width in metres for ways")
    point: float | None = Field(default=None, gt=0, description="radius in metres for nodes")


class Concept(_Strict):
    id: int = Field(ge=0)
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    label: str
    count: int = Field(ge=0, description="scenes with this concept in GL-10M train+val (prior)")
    kinds: list[Literal["area", "line", "point"]] = Field(min_length=1)
    rule: dict[str, Any]
    buffer_m: Buffers = Buffers()
    line_as: Literal["line", "ends"] = "line"
    novel: bool = False

    @field_validator("rule")
    @classmethod
    def _rule_compiles(cls, v):
        try:
            compile_rule(v)
        except RuleError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _buffers_for_kinds(self):
        if "line" in self.kinds:
            need = "point" if self.line_as == "ends" else "line"
            if getattr(self.buffer_m, need) is None:
                raise ValueError(f"kind 'line' needs buffer_m.{need}")
        if "point" in self.kinds and self.buffer_m.point is None:
            raise ValueError("kind 'point' needs buffer_m.point")
        return self


class Geometry(_Strict):
    seed_half_width_deg: float = Field(gt=0)
    scale: int = Field(gt=0)
    grid: int = Field(gt=0)
    tile_px: int = Field(gt=0)
    lr_px: int = Field(gt=0)
    max_overlap: float = Field(ge=0, le=1)
    min_concepts: int = Field(ge=1)
    min_concept_area_m2: float = Field(ge=0)

    @property
    def footprint_deg(self) -> float:
        """Side of the square scene footprint in degrees (0.024 for GL-10M)."""
        return round(2 * self.seed_half_width_deg * self.scale, 12)

    @property
    def hr_px(self) -> int:
        return self.grid * self.tile_px


class Naip(_Strict):
    collection: str
    start: dt.date
    end: dt.date
    bands: list[str] = Field(min_length=3, max_length=3)

    @model_validator(mode="after")
    def _order(self):
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class S2(_Strict):
    collection: str
    window_days: int = Field(gt=0)
    clip_start: dt.date
    clip_end: dt.date
    fallback_start: dt.date
    fallback_end: dt.date
    max_cloud_pct: float = Field(ge=0, le=100)
    scl_mask: list[int]
    harmonize: bool
    offset_baseline: str = Field(pattern=r"^\d\d\.\d\d$")
    offset: int = Field(ge=0)
    stretch: tuple[float, float]

    @field_validator("scl_mask")
    @classmethod
    def _scl(cls, v):
        if any(c < 0 or c > 11 for c in v):
            raise ValueError("SCL classes are 0..11")
        return sorted(set(v))

    @model_validator(mode="after")
    def _dates(self):
        if self.clip_end < self.clip_start or self.fallback_end < self.fallback_start:
            raise ValueError("a date range ends before it starts")
        if not (0 <= self.stretch[0] < self.stretch[1]):
            raise ValueError("stretch must be (low, high) with 0 <= low < high")
        return self


class Imagery(_Strict):
    naip: Naip
    s2: S2
    # rgb: GL-10M's 8-bit RGB only; rgbn adds S2 B08 and NAIP NIR, raw S2 B02/B03/B04/B08 as
    # harmonised uint16 reflectance and NAIP's 4 bands (gl10m/samples.py: EXTRA)
    bands: Literal["rgb", "rgbn", "raw"] = "rgb"

    @model_serializer(mode="wrap")
    def _rgb_unstated(self, handler):
        # the default is left out of every dump, so the profile hash, the section hashes and the
        # stage input hashes of an rgb profile are what they were before this setting existed
        data = handler(self)
        if isinstance(data, dict) and data.get("bands") == "rgb":
            data.pop("bands")
        return data


class QC(_Strict):
    black_level: int = Field(ge=0, le=255)
    max_black_ratio: float = Field(ge=0, le=1)


class SplitScheme(_Strict):
    train: list[str]
    val: list[str]
    test: list[str]


class Splits(_Strict):
    scheme: str
    schemes: dict[str, SplitScheme]
    border_buffer_deg: float = Field(ge=0)

    @model_validator(mode="after")
    def _known(self):
        if self.scheme not in self.schemes:
            raise ValueError(f"scheme {self.scheme!r} is not one of {sorted(self.schemes)}")
        for name, s in self.schemes.items():
            seen = s.train + s.val + s.test
            dup = sorted({x for x in seen if seen.count(x) > 1})
            if dup:
                raise ValueError(f"scheme {name!r} puts {dup} in more than one split")
        return self


class Provider(_Strict):
    name: Literal["stac", "earthengine"]
    stac_url: str | None = None
    signing: Literal["none", "planetary_computer"] = "none"
    max_concurrency: int = Field(default=8, gt=0)
    project: str | None = None  # earthengine: the Cloud project
    key_file: str | None = None  # earthengine: a service-account key (default: stored credentials)
    ee_url: str | None = None  # earthengine: another API endpoint (the testbed's stand-in)


class OsmSource(_Strict):
    base_url: str
    extract_date: str = Field(pattern=r"^\d{6}$")
    node_index: str = "sparse_file_array"


class Region(_Strict):
    name: str
    slug: str = Field(pattern=r"^[a-z0-9-]+$")
    target: int = Field(ge=0)
    bbox: tuple[float, float, float, float]
    pbf: str | None = Field(default=None, description="local path or URL; default: Geofabrik dated extract")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("bbox")
    @classmethod
    def _bbox(cls, v):
        w, s, e, n = v
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            raise ValueError("bbox must be [west, south, east, north] in degrees")
        return v


class Profile(_Strict):
    name: str
    version: int = Field(ge=1)
    description: str = ""
    geometry: Geometry
    imagery: Imagery
    qc: QC
    splits: Splits
    provider: Provider
    osm: OsmSource
    regions: dict[str, Region] = Field(min_length=1)
    concepts: list[Concept] = Field(min_length=1)

    # set by load(); not part of the data
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _consistent(self):
        ids = [c.id for c in self.concepts]
        if ids != list(range(len(ids))):
            raise ValueError("concept ids must be 0..N-1 in order")
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError("concept names must be unique")
        for name, s in self.splits.schemes.items():
            unknown = sorted(set(s.train + s.val + s.test) - set(self.regions))
            if unknown and name == self.splits.scheme:
                raise ValueError(f"splits.schemes.{name} names unknown regions {unknown}")
        return self

    # -- helpers ---------------------------------------------------------------------------
    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    def split_of(self, region: str) -> str | None:
        s = self.splits.schemes[self.splits.scheme]
        for split in ("train", "val", "test"):
            if region in getattr(s, split):
                return split
        return None

    def pbf_source(self, region: str) -> str:
        """Where the region's PBF comes from: its own `pbf`, or the pinned Geofabrik extract."""
        r = self.regions[region]
        if r.pbf:
            if is_url(r.pbf) or self.source is None or Path(r.pbf).is_absolute():
                return r.pbf
            return str((self.source.parent / r.pbf).resolve())
        return f"{self.osm.base_url}/{r.slug}-{self.osm.extract_date}.osm.pbf"

    def select_regions(self, states: str | list[str] | None) -> list[str]:
        """Regions named on the command line (comma list), validated; all when None. An empty
        selection (``--states ""`` from an unset shell variable) is an error, never "all"."""
        if states is None:
            return sorted(self.regions)
        if isinstance(states, str):
            states = [s for s in states.split(",")]
        wanted = [s.strip().upper() for s in states if s.strip()]
        if not wanted:
            raise ProfileError("--states names no state (leave it out to select all)")
        unknown = [s for s in wanted if s not in self.regions]
        if unknown:
            raise ProfileError(f"unknown state {', '.join(unknown)}; the profile has {', '.join(sorted(self.regions))}")
        return sorted(set(wanted))

    def select_concepts(self, names: str | list[str] | None) -> list[int] | None:
        """Concept ids named on the command line (``--concepts``, a comma list), sorted and
        deduplicated; None when `names` is None (no subset). Matching ignores case, surrounding
        space, and treats inner runs of spaces or hyphens as ``_`` ("Swimming Pool" and
        "swimming-pool" are ``swimming_pool``). An unknown name is one error line with the close
        matches (difflib); an empty selection is an error, never "all"."""
        import difflib

        if names is None:
            return None
        if isinstance(names, str):
            names = names.split(",")
        wanted = [normalize_concept_name(n) for n in names]
        wanted = [n for n in wanted if n]
        if not wanted:
            raise ProfileError("--concepts names no concept (leave it out to keep every scene)")
        ids = {c.name: c.id for c in self.concepts}
        bad = []
        for n in dict.fromkeys(wanted):
            if n not in ids:
                close = difflib.get_close_matches(n, list(ids), n=3, cutoff=0.6)
                bad.append(f"{n!r} (did you mean: {', '.join(close)}?)" if close
                           else f"{n!r} (no close match among the profile's {len(ids)} concept names)")
        if bad:
            raise ProfileError(f"unknown concept{'s' if len(bad) > 1 else ''} {'; '.join(bad)}")
        return sorted({ids[n] for n in wanted})

    def subset(self, bbox: tuple[float, float, float, float], regions: list[str]) -> tuple["Profile", list[str]]:
        """A regional subset: (this profile with each of ``regions`` whose bbox meets ``bbox``
        clipped to the intersection, those regions). Every stage then works inside it: anchors
        whose footprint leaves a region's bbox are dropped and the catalog searches that bbox."""
        w, s, e, n = (float(v) for v in bbox)
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            raise ProfileError(f"--bbox must be west,south,east,north in degrees with west < east and "
                               f"south < north, got {w},{s},{e},{n}")
        new, kept = dict(self.regions), []
        for r in regions:
            rw, rs, re_, rn = self.regions[r].bbox
            cw, cs, ce, cn = max(w, rw), max(s, rs), min(e, re_), min(n, rn)
            if cw < ce and cs < cn:
                new[r] = self.regions[r].model_copy(update={"bbox": (cw, cs, ce, cn)})
                kept.append(r)
        if not kept:
            raise ProfileError(f"--bbox {w},{s},{e},{n} meets none of the regions {', '.join(regions)}")
        return self.model_copy(update={"regions": new}), kept

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named top-level sections (what a stage depends on)."""
        data = self.model_dump(mode="json", include=set(sections))
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def hash(self) -> str:
        data = self.model_dump(mode="json")
        for k in ("key_file", "ee_url"):  # added later: unset, they leave existing hashes alone
            if data["provider"].get(k) is None:
                data["provider"].pop(k, None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def normalize_concept_name(name: str) -> str:
    """A concept name as typed -> the profile's spelling: lower case, no surrounding space, inner
    runs of spaces or hyphens as ``_``."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def format_validation_error(e: ValidationError) -> str:
    """The first pydantic error as `dotted.field: message` (one line), for every strict schema here."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{more}"


def from_dict(data: dict, source: Path | str | None = None) -> Profile:
    label = Path(source).name if source else "<dict>"
    if not isinstance(data, dict):
        raise ProfileError(f"profile {label}: expected a mapping at the top level")
    try:
        prof = Profile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(f"profile {label}: {format_validation_error(e)}") from None
    if source is not None:
        prof = prof.model_copy(update={"source": Path(source).resolve()})
    return prof


def load(path: str | Path | None = None) -> Profile:
    """Load and validate a profile file (default: manifests/gl10m-66.yaml)."""
    p = Path(path) if path else DEFAULT_PROFILE
    if not p.exists():
        raise ProfileError(f"profile {p}: no such file")
    if not p.is_file():
        raise ProfileError(f"profile {p}: not a file")
    try:
        data = safeyaml.load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"profile {p.name}: not a YAML text file (not UTF-8)") from None
    except OSError as e:
        raise ProfileError(f"profile {p}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ProfileError(f"profile {p.name}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    return from_dict(data, p)


def dump(profile: Profile, path: str | Path) -> None:
    """Write a profile as YAML (atomic)."""
    from gl10m.io import atomic_write_text

    data = profile.model_dump(mode="json", exclude={"source"})
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, width=120))
