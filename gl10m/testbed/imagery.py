"""The testbed's imagery: NAIP-like and Sentinel-2-L2A-like COGs rendered from the truth.

Everything starts from one 1 m surface-reflectance rendering of a region (bands R, G, B, NIR),
made from the truth raster (class id per pixel, gl10m.testbed.classes.TRUTH_CLASSES) and its
detail layer of thin markings (MARK_NAMES), with textures that are functions of *world*
coordinates (hashed value-noise lattices), so any grid of the same place renders the same
ground:

* NAIP: per state-year, the 1 m reflectance with that year's look (season of the vegetation,
  sun direction and cast shadows of tall classes, colour balance, haze, sensor noise) as 4-band
  uint8 (R, G, B, NIR), cut into quarter-quad COGs (3.75' x 3.75' cells plus an overlap, like
  DOQQs, UTM NAD83). A state-year with another ground sample distance (0.6 m) is rendered
  directly on its own grid from a truth rasterised at that resolution.
* Sentinel-2 L2A: the *same* 1 m reflectance averaged over 10 x 10 m cells (the exact 10x
  downsample), seasonally modulated per date, blurred by a Gaussian PSF, plus sensor noise;
  then clouds (SCL 8/9/10, bright), cloud shadows (SCL 3, dark) and swath-edge nodata (SCL 0 and
  zero reflectance). Bands B02/B03/B04 are uint16 reflectance * 10000, plus the +1000 offset when
  the processing baseline is >= 04.00 (never otherwise); SCL is uint8 at 20 m. UTM WGS84.
  (PROJ treats NAD83 and WGS84 UTM coordinates as identical to ~0.1 mm, so the 10 m cells are
  exact blocks of the 1 m grid.)

`render_region` does one region end to end and returns plain-dict descriptions of what it wrote
(gl10m.testbed.stac_items turns them into STAC items); gl10m.testbed.build runs it per region.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gl10m.errors import UserError

# ------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------
QQ_DEG = 3.75 / 60.0  # a quarter quad is 3.75' x 3.75'
NAIP_BANDS = ("red", "green", "blue", "nir")
S2_BANDS = ("B02", "B03", "B04")  # blue, green, red
S2_OFFSET = 1000
DN_PER_REFL = 255.0 / 0.45  # NAIP: reflectance 0.45 -> 255 at unit gain
NAIP_MIN_DN = 7  # real NAIP never has all-black land pixels; black (<= 5) is reserved for no-data


class ImagerySpecError(UserError, ValueError):
    """An imagery section that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NaipYear(_Strict):
    year: int = Field(ge=2000, le=2100)
    date: dt.date
    gsd: float = Field(default=1.0, gt=0.1, le=2.0)

    @model_validator(mode="after")
    def _same_year(self):
        if self.date.year != self.year:
            raise ValueError(f"date {self.date} is not in year {self.year}")
        return self


class S2Date(_Strict):
    date: dt.date
    cloud_pct: float = Field(ge=0, le=100, description="target cloudy share of valid pixels (SCL 8/9/10)")
    baseline: str = Field(pattern=r"^\d\d\.\d\d$")
    reprocessed_baseline: str | None = Field(default=None, pattern=r"^\d\d\.\d\d$")
    nodata_edge: float = Field(default=0.0, ge=0, le=0.6, description="share of the granule width lost at the swath edge")


class Fault(_Strict):
    kind: Literal["black_wedge", "missing_href", "corrupt_cog"]
    state: str
    collection: Literal["naip", "sentinel-2-l2a"] = "naip"


def _default_naip_states() -> dict[str, list[NaipYear]]:
    y = NaipYear
    return {
        # the newest state-year inside 2022-01-01..2024-04-01 is what the pipeline must pick
        "CA": [y(year=2020, date="2020-05-21"), y(year=2022, date="2022-06-14", gsd=0.6)],
        "TX": [y(year=2022, date="2022-09-03"), y(year=2024, date="2024-07-19")],  # 2024 is after the window
        "WA": [y(year=2021, date="2021-07-08"), y(year=2023, date="2023-08-02")],
        "AZ": [y(year=2021, date="2021-05-30"), y(year=2023, date="2023-06-11")],
        "ME": [y(year=2021, date="2021-09-14"), y(year=2023, date="2023-07-27")],
    }


def _default_s2_dates() -> list[S2Date]:
    d = S2Date
    return [
        # before 2022-01-25: baseline 03.01 without offset; reprocessed (Collection-1) at 05.00 with it
        # before 2022-01-25: baseline 03.01 without offset; reprocessed (Collection-1) at 05.00 with it
        d(date="2022-01-12", cloud_pct=0.4, baseline="03.01", reprocessed_baseline="05.00"),
        d(date="2022-08-20", cloud_pct=0.8, baseline="04.00", nodata_edge=0.3),
        d(date="2023-02-15", cloud_pct=38.0, baseline="05.09"),
        d(date="2023-04-26", cloud_pct=1.2, baseline="05.09", nodata_edge=0.35),
        # a reprocessing duplicate of the same datatake (same pixels): the catalog keeps one
        d(date="2023-06-30", cloud_pct=0.3, baseline="05.09", reprocessed_baseline="05.10"),
        d(date="2023-08-19", cloud_pct=6.5, baseline="05.09"),
        d(date="2023-10-13", cloud_pct=0.9, baseline="05.10"),
    ]


def _default_faults() -> list[Fault]:
    return [Fault(kind="black_wedge", state="CA", collection="naip"),
            Fault(kind="missing_href", state="TX", collection="sentinel-2-l2a"),
            Fault(kind="corrupt_cog", state="WA", collection="naip")]


class ImagerySpec(_Strict):
    """The `imagery:` mapping of manifests/testbed.yaml (every field has a default)."""
    naip_years: list[NaipYear] = Field(
        default_factory=lambda: [NaipYear(year=2021, date="2021-06-20"), NaipYear(year=2023, date="2023-06-25")],
        min_length=1, description="state-years of a state not listed in naip_states")
    naip_states: dict[str, list[NaipYear]] = Field(default_factory=_default_naip_states)
    naip_overlap_m: float = Field(default=300.0, ge=0, le=1000, description="DOQQ overlap beyond the 3.75' cell")
    margin_m: float = Field(default=300.0, ge=0, le=3000, description="imagery extends this far beyond the region bbox")
    naip_compress: Literal["JPEG", "DEFLATE"] = "JPEG"
    naip_quality: int = Field(default=70, ge=30, le=100)
    naip_noise_dn: int = Field(default=1, ge=0, le=20)
    s2_dates: list[S2Date] = Field(default_factory=_default_s2_dates, min_length=1)
    s2_date_jitter_days: int = Field(default=3, ge=0, le=10, description="per-region shift of the dates (other orbits)")
    s2_noise: float = Field(default=0.002, ge=0, le=0.05, description="sensor noise, reflectance units")
    s2_psf_sigma_px: float = Field(default=0.5, ge=0, le=2.0)
    faults: list[Fault] = Field(default_factory=_default_faults)
    blocksize: int = Field(default=512, ge=128, le=2048)
    extent_deg: float | None = Field(default=None, gt=0.001, le=1.0,
                                     description="render imagery over the central extent_deg square of each "
                                                 "region only (None: the whole region); for small test worlds")

    @field_validator("naip_years")
    @classmethod
    def _distinct(cls, v):
        if len({y.year for y in v}) != len(v):
            raise ValueError("years must be distinct")
        return v

    @field_validator("naip_states")
    @classmethod
    def _distinct_states(cls, v):
        for k, ys in v.items():
            if not ys:
                raise ValueError(f"{k}: at least one year")
            if len({y.year for y in ys}) != len(ys):
                raise ValueError(f"{k}: years must be distinct")
        return v

    @field_validator("s2_dates")
    @classmethod
    def _dates(cls, v):
        if len({d.date for d in v}) != len(v):
            raise ValueError("dates must be distinct")
        return sorted(v, key=lambda d: d.date)

    def years_for(self, state: str) -> list[NaipYear]:
        return sorted(self.naip_states.get(state, self.naip_years), key=lambda y: y.year)

    @property
    def margin_total_m(self) -> float:
        return self.margin_m


def imagery_spec(data: dict | None) -> ImagerySpec:
    """Validate the spec's `imagery:` mapping (None or {} gives the defaults); one-line errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ImagerySpecError("testbed imagery: expected a mapping")
    try:
        return ImagerySpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ImagerySpecError(f"testbed imagery: {loc}: {msg}") from None


# ------------------------------------------------------------------------------------------
# Seeds and value noise (functions of world coordinates)
# ------------------------------------------------------------------------------------------
def subseed(seed: int, *keys: Any) -> int:
    """A stable 63-bit seed from a base seed and keys (never Python's salted hash())."""
    blob = repr((int(seed),) + tuple(str(k) for k in keys)).encode()
    return (zlib.crc32(blob) << 31) ^ zlib.crc32(blob[::-1]) ^ (int(seed) & 0x7FFFFFFF)


def rng_for(seed: int, *keys: Any) -> np.random.Generator:
    return np.random.default_rng(subseed(seed, *keys))


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def _lattice(key: int, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Hashed values in [-1, 1) at integer lattice points (iy rows x ix cols), float32."""
    with np.errstate(over="ignore"):
        hx = _mix(ix.astype(np.int64).view(np.uint64) + np.uint64(key & 0xFFFFFFFFFFFF))
        z = _mix(hx[None, :] ^ (iy.astype(np.int64).view(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)))
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 / (1 << 24)) - np.float32(1.0))


def value_noise(xs: np.ndarray, ys: np.ndarray, spacing: float, key: int) -> np.ndarray:
    """Smooth noise in [-1, 1] at world points (ys rows x xs cols), lattice every `spacing` metres.

    The value at a place depends only on (x, y, spacing, key), not on the grid asking for it.
    """
    gx = xs / spacing
    gy = ys / spacing
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    fx = (gx - ix).astype(np.float32)
    fy = (gy - iy).astype(np.float32)
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    x0, y0 = ix.min(), iy.min()
    lat = _lattice(key, np.arange(x0, ix.max() + 2), np.arange(y0, iy.max() + 2))
    cx = ix - x0
    lx = lat[:, cx] * (1 - fx) + lat[:, cx + 1] * fx  # (ny_lattice, W)
    ry = iy - y0
    # lx[ry] * (1 - fy) + lx[ry + 1] * fy, in place (the same float32 operations, two full-size arrays)
    out = np.take(lx, ry, axis=0)
    out *= (1 - fy)[:, None]
    hi = np.take(lx, ry + 1, axis=0)
    hi *= fy[:, None]
    out += hi
    return out


# ------------------------------------------------------------------------------------------
# Appearance: per truth class and per mark
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Look:
    rgbn: tuple[float, float, float, float]  # surface reflectance R, G, B, NIR
    kind: Literal["veg", "water", "bare", "built"]
    fine: float = 0.03  # texture weights: grain (1.5 m), crowns (4 m), patches (15 m), fields (80 m)
    crown: float = 0.0
    med: float = 0.04
    coarse: float = 0.03
    height: float = 0.0  # metres; casts a shadow in NAIP


def _L(r, g, b, n, kind, **kw) -> Look:
    return Look((r, g, b, n), kind, **kw)


# What a pixel looks like is decided by its surface material (classes.MATERIALS: the school's
# lawn and its roof share a class); roofs and tall structures then take their class's colour and
# height. Colours are plausible surface reflectances.
MATERIAL_LOOKS: dict[str, Look] = {
    "none": _L(.20, .20, .19, .25, "bare"),
    "grass": _L(.07, .10, .05, .32, "veg", fine=.06, med=.10, coarse=.08),
    "lawn": _L(.06, .12, .05, .38, "veg", fine=.03, med=.05, coarse=.02),
    "dry_grass": _L(.15, .14, .09, .26, "veg", fine=.05, med=.10, coarse=.10),
    "crop": _L(.10, .12, .07, .30, "veg", fine=.04, med=.08, coarse=.25),
    "trees": _L(.03, .05, .03, .28, "veg", fine=.08, crown=.45, med=.06, height=15),
    "shrub": _L(.07, .08, .06, .20, "veg", fine=.05, crown=.35, med=.06),
    "marsh": _L(.05, .08, .05, .20, "veg", fine=.05, med=.25, coarse=.15),
    "water": _L(.03, .05, .05, .015, "water", fine=.01, med=.05, coarse=.02),
    "sea": _L(.02, .04, .06, .01, "water", fine=.01, med=.03, coarse=.02),
    "sand": _L(.38, .35, .29, .40, "bare", fine=.03, med=.05),
    "desert": _L(.32, .25, .18, .35, "bare", fine=.04, med=.05, coarse=.08),
    "soil": _L(.25, .21, .17, .28, "bare", fine=.08, med=.10, coarse=.08),
    "rock": _L(.26, .24, .22, .29, "bare", fine=.10, med=.12, coarse=.10),
    "gravel": _L(.27, .26, .24, .28, "bare", fine=.12, med=.04, coarse=0),
    "asphalt": _L(.09, .09, .09, .11, "built", fine=.02, med=.03, coarse=0),
    "concrete": _L(.30, .30, .29, .32, "built", fine=.02, med=.04, coarse=0),
    "roof": _L(.22, .19, .18, .23, "built", fine=.02, med=0, coarse=0, height=7),
    "roof_metal": _L(.40, .41, .42, .42, "built", fine=.01, med=0, coarse=0, height=9),
    "court": _L(.07, .17, .14, .12, "built", fine=.01, med=0, coarse=0),
    "turf": _L(.05, .15, .05, .38, "veg", fine=.02, med=.02, coarse=0),
    "pool": _L(.10, .29, .37, .04, "water", fine=.02, med=0, coarse=0),
    "solar": _L(.04, .05, .10, .07, "built", fine=.02, med=.02, coarse=0),
    "track": _L(.16, .14, .12, .18, "bare", fine=.08, med=.02, coarse=0),
}
ROOF_MATERIALS = ("roof", "roof_metal")
TALL_MATERIALS = ("roof", "roof_metal", "concrete")

# Roof colour (on roof materials) and height (on roof and concrete materials) per class.
CLASS_ROOF: dict[str, tuple[float, float, float, float]] = {
    "fire_station": (.30, .12, .10, .28), "barn": (.26, .08, .06, .25), "religious_building": (.26, .16, .13, .26),
    "office": (.18, .20, .24, .20), "school": (.30, .24, .20, .30), "university": (.28, .22, .19, .28),
    "hospital": (.38, .38, .37, .38), "supermarket": (.40, .40, .38, .41), "shopping_mall": (.34, .33, .31, .35),
    "warehouse": (.43, .43, .43, .44), "police_station": (.20, .22, .26, .24), "airport_terminal": (.33, .34, .37, .35),
    "airport_hangar": (.39, .40, .41, .41), "railway_station": (.25, .23, .22, .25), "toll_booth": (.40, .40, .38, .40),
    "gas_station": (.42, .40, .38, .42), "industrial": (.31, .31, .32, .33), "prison": (.30, .30, .28, .31),
}
CLASS_HEIGHT: dict[str, float] = {
    "stadium": 20, "railway_station": 8, "airport_hangar": 12, "airport_terminal": 15, "dam": 6,
    "parking_garage": 10, "industrial": 9, "school": 8, "university": 12, "hospital": 20, "supermarket": 7,
    "shopping_mall": 10, "warehouse": 10, "office": 25, "religious_building": 12, "fire_station": 8,
    "police_station": 8, "prison": 8, "gas_station": 5, "barn": 8, "overpass": 7, "viaduct": 15, "tower": 40,
    "toll_booth": 6, "building": 6, "shipyard": 10, "port": 8, "water_treatment_facility": 6,
}

# Marks: ("paint", colour) replaces the pixel; ("mul", factor) darkens it.
MARK_LOOKS: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "court_line": ("paint", (.55, .56, .55, .50)),
    "parking_stripe": ("paint", (.50, .50, .48, .46)),
    "rail_track": ("paint", (.10, .09, .08, .10)),
    "road_marking": ("paint", (.50, .46, .25, .45)),
    "roof_ridge": ("mul", (.70, .70, .70, .75)),
    "helipad_marking": ("paint", (.58, .58, .57, .52)),
    "runway_marking": ("paint", (.60, .60, .59, .55)),
    "solar_row": ("paint", (.03, .04, .09, .05)),
    "crop_row": ("mul", (.75, .85, .75, .90)),
    "pool_edge": ("paint", (.40, .39, .36, .40)),
    "shadow": ("mul", (.40, .40, .42, .45)),
    "turbine_blade": ("paint", (.55, .55, .55, .52)),
    "grave_row": ("paint", (.35, .34, .33, .33)),
    "vehicle": ("paint", (.30, .30, .30, .30)),  # colour varied per vehicle below
    "fence": ("mul", (.60, .60, .60, .65)),
    "boat": ("paint", (.55, .55, .55, .50)),
    "tank_rim": ("paint", (.45, .45, .44, .44)),
}
_VEHICLE_COLOURS = np.array([[.50, .50, .50, .45], [.08, .08, .09, .10], [.35, .06, .05, .30],
                             [.10, .14, .30, .25], [.40, .40, .42, .40], [.20, .20, .20, .22]], np.float32)


def look_for(material: str) -> Look:
    """The look of a material name: explicit, else a stable hashed colour (still distinct)."""
    if material in MATERIAL_LOOKS:
        return MATERIAL_LOOKS[material]
    h = zlib.crc32(material.encode())
    rgb = [0.08 + 0.3 * ((h >> s) & 0xFF) / 255 for s in (0, 8, 16)]
    return _L(rgb[0], rgb[1], rgb[2], 0.25, "bare")


@dataclass(frozen=True)
class Tables:
    """Look-up tables indexed by key = material * 256 + class (see `key_of`)."""
    rgbn: np.ndarray  # (4, n) float32
    fine: np.ndarray
    crown: np.ndarray
    med: np.ndarray
    coarse: np.ndarray
    veg: np.ndarray  # 1 where vegetation
    water: np.ndarray
    height: np.ndarray
    mark_paint: np.ndarray  # (4, 256) colour of painted marks
    mark_mul: np.ndarray  # (4, 256) factor of multiplying marks (1 = none)
    mark_is_paint: np.ndarray  # (256,) bool
    vehicle: int
    class_material: np.ndarray  # (256,) default material of a class (fills material 0)


def build_tables(class_names: list[str], material_names: list[str], mark_names: list[str],
                 class_material: list[int]) -> Tables:
    nm = len(material_names)
    n = nm * 256
    rgbn = np.zeros((4, n), np.float32)
    w = {k: np.zeros(n, np.float32) for k in ("fine", "crown", "med", "coarse", "veg", "water", "height")}
    for mi, mname in enumerate(material_names):
        lk = look_for(mname)
        for ci in range(256):
            cname = class_names[ci] if ci < len(class_names) else ""
            k = mi * 256 + ci
            col = CLASS_ROOF.get(cname, lk.rgbn) if mname in ROOF_MATERIALS else lk.rgbn
            rgbn[:, k] = col
            w["fine"][k], w["crown"][k], w["med"][k], w["coarse"][k] = lk.fine, lk.crown, lk.med, lk.coarse
            w["veg"][k] = lk.kind == "veg"
            w["water"][k] = lk.kind == "water"
            h = lk.height
            if mname in TALL_MATERIALS and cname in CLASS_HEIGHT:
                h = CLASS_HEIGHT[cname]
            w["height"][k] = h
    paint = np.zeros((4, 256), np.float32)
    mul = np.ones((4, 256), np.float32)
    is_paint = np.zeros(256, bool)
    vehicle = -1
    for i, name in enumerate(mark_names[:256]):
        if i == 0 or name == "none":
            continue
        mode, col = MARK_LOOKS.get(name, ("paint", (.5, .5, .5, .45)))
        if mode == "paint":
            paint[:, i] = col
            is_paint[i] = True
        else:
            mul[:, i] = col
        if name == "vehicle":
            vehicle = i
    cm = np.zeros(256, np.uint8)
    cm[:len(class_material)] = class_material[:256]
    return Tables(rgbn, w["fine"], w["crown"], w["med"], w["coarse"], w["veg"], w["water"], w["height"],
                  paint, mul, is_paint, vehicle, cm)


def default_tables() -> Tables:
    from gl10m.testbed.classes import CLASS_MATERIAL, MARK_NAMES, MATERIALS, TRUTH_CLASSES
    return build_tables(TRUTH_CLASSES, MATERIALS, MARK_NAMES, CLASS_MATERIAL)


def key_of(classes: np.ndarray, material: np.ndarray, tables: Tables, fill_class: int, nodata: int = 255) -> np.ndarray:
    """Per-pixel table key (uint16): material * 256 + class. Outside the mapped region (class
    nodata) the region's base cover is rendered (unlabelled land); material 0 takes the class's
    default material."""
    c = classes
    if (c == nodata).any():
        c = np.where(c == nodata, np.uint8(fill_class), c)
    m = material
    if m is None:
        m = tables.class_material[c]
    elif (m == 0).any():
        m = np.where(m == 0, tables.class_material[c], m)
    return (m.astype(np.uint16) << 8) | c


def pixel_centres(transform, shape, row0: int = 0, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World x of the columns and y of rows row0..row0+rows of a north-up grid."""
    rows = shape[0] - row0 if rows is None else rows
    xs = transform.c + (np.arange(shape[1]) + 0.5) * transform.a
    ys = transform.f + (np.arange(row0, row0 + rows) + 0.5) * transform.e
    return xs, ys


def surface_reflectance(key: np.ndarray, marks: np.ndarray | None, xs: np.ndarray, ys: np.ndarray,
                        tables: Tables, seed: int, bands: int = 4) -> np.ndarray:
    """Surface reflectance (bands, H, W) float32 (R, G, B, NIR) of a block of truth.

    key: `key_of(classes, material)`; xs, ys: world coordinates of the block's pixel centres.
    bands: 4, or 3 for R, G, B only (the same values, NIR not computed).
    A pure function of the place: any grid over the same ground gives the same textures.
    """
    c = key
    tex = np.ones(c.shape, np.float32)
    # the keys present in this block: a scale that none of them uses is skipped
    present = np.bincount(c.ravel(), minlength=len(tables.fine))[:len(tables.fine)] > 0
    ci = c.astype(np.intp)  # one index conversion for the ~8 table look-ups below
    for name, spacing, wt in (("fine", 1.5, tables.fine), ("crown", 4.0, tables.crown),
                              ("med", 15.0, tables.med), ("coarse", 80.0, tables.coarse)):
        if not wt[present].any():
            continue
        n = value_noise(xs, ys, spacing, subseed(seed, "tex", name))
        if name == "crown":  # rounder crowns, dark gaps
            n *= np.float32(2.5)
            np.tanh(n, out=n)
        n *= np.take(wt, ci)
        tex += n
    np.maximum(tex, 0.05, out=tex)
    out = np.empty((bands,) + c.shape, np.float32)
    for b in range(bands):
        np.multiply(np.take(tables.rgbn[b], ci), tex, out=out[b])
    del ci
    at = np.flatnonzero(marks != 0) if marks is not None else ()
    if len(at):  # marks are thin: only their pixels, by flat index
        ms = marks.ravel()[at]
        paint = tables.mark_is_paint[ms]
        for b in range(bands):
            ob = out[b].ravel()
            vals = ob[at]
            ob[at] = np.where(paint, tables.mark_paint[b][ms], vals * tables.mark_mul[b][ms])
        if tables.vehicle > 0:
            veh = at[ms == tables.vehicle]
            if len(veh):  # each car its own colour: a coarse hash of its place
                rr, cc = np.divmod(veh, marks.shape[1])
                ix = np.floor(xs[cc] / 3.0).astype(np.int64)
                iy = np.floor(ys[rr] / 3.0).astype(np.int64)
                h = _lattice(subseed(seed, "car"), ix, np.zeros(1, np.int64))[0] if len(ix) else ix
                h2 = _lattice(subseed(seed, "car2"), iy, np.zeros(1, np.int64))[0] if len(iy) else iy
                k = (np.floor((h + h2 + 2) * 1.5).astype(np.int64)) % len(_VEHICLE_COLOURS)
                for b in range(bands):
                    out[b][rr, cc] = _VEHICLE_COLOURS[k, b]
    return out


# ------------------------------------------------------------------------------------------
# NAIP: per-year look
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class YearLook:
    gains: tuple[float, float, float, float]
    haze: tuple[float, float, float, float]
    season: float  # vegetation browning, -0.3 (lush) .. 0.8 (dry)
    sun_azimuth: float  # degrees from north, clockwise
    sun_elevation: float  # degrees


_SEASON_COEF = np.array([0.6, 0.1, 0.3, -0.35], np.float32)  # per band (R, G, B, NIR) per unit browning


def season_of(date: dt.date, lat: float) -> float:
    """Vegetation browning on a date: lush in late spring, dry in late summer/autumn, dull in winter."""
    doy = date.timetuple().tm_yday
    if lat < 0:
        doy = (doy + 182) % 365
    return float(0.25 - 0.45 * math.cos(2 * math.pi * (doy - 140) / 365.0) + 0.2 * math.sin(2 * math.pi * (doy - 140) / 365.0))


def year_look(seed: int, state: str, ny: NaipYear, lat: float) -> YearLook:
    rng = rng_for(seed, "naip-look", state, ny.year)
    g = 1.0 + rng.uniform(-0.07, 0.07, 3)
    bright = rng.uniform(0.92, 1.08)
    gains = tuple(float(x * bright) for x in g) + (float(bright * rng.uniform(0.95, 1.05)),)
    haze = tuple(float(x) for x in rng.uniform(0.0, 0.012, 1)[0] * np.array([0.6, 0.8, 1.0, 0.3]))
    season = season_of(ny.date, lat) + float(rng.uniform(-0.1, 0.1))
    doy = ny.date.timetuple().tm_yday
    elev = 90 - abs(lat - 23.44 * math.sin(2 * math.pi * (doy - 81) / 365.0)) - float(rng.uniform(8, 20))
    return YearLook(gains, haze, season, float(rng.uniform(120, 165)), max(20.0, elev))


def shadow_mask(key: np.ndarray, tables: Tables, look: YearLook, gsd: float) -> np.ndarray:
    """Cast shadows of tall surfaces away from the sun (bool, never on the tall pixels themselves)."""
    classes = key
    h = tables.height[key]
    tall = h > 0
    if not tall.any():
        return np.zeros(classes.shape, bool)
    az = math.radians(look.sun_azimuth)
    ux, uy = -math.sin(az), math.cos(az)  # away from the sun; rows grow southwards
    k = 1.0 / math.tan(math.radians(look.sun_elevation)) / gsd  # shadow px per metre of height
    out = np.zeros(classes.shape, bool)
    H, W = classes.shape
    for tier in (4.0, 10.0, 25.0):
        src = h >= tier
        if not src.any():
            continue
        n = max(1, int(round(tier * k)))
        step = max(1, n // 8)
        for s in range(step, n + 1, step):
            dx = int(round(s * ux))
            dy = int(round(-s * uy))
            ys0, ys1 = max(0, dy), H + min(0, dy)
            xs0, xs1 = max(0, dx), W + min(0, dx)
            if ys1 <= ys0 or xs1 <= xs0:
                continue
            out[ys0:ys1, xs0:xs1] |= src[ys0 - dy:ys1 - dy, xs0 - dx:xs1 - dx]
    out &= ~tall
    return out


def naip_dn(refl: np.ndarray, veg: np.ndarray, shadow: np.ndarray, look: YearLook,
            rng: np.random.Generator, noise_dn: int) -> np.ndarray:
    """(4, H, W) reflectance -> (4, H, W) uint8 NAIP digital numbers with the year's look (or
    (3, H, W) R, G, B -> the same three bands)."""
    out = np.empty(refl.shape, np.uint8)
    shade = np.where(shadow, np.float32(0.45), np.float32(1.0)) if shadow is not None else None
    for b in range(refl.shape[0]):
        x = veg * np.float32(look.season * _SEASON_COEF[b])
        x += 1.0
        x *= refl[b]
        x *= np.float32(look.gains[b] * DN_PER_REFL)
        if shade is not None:
            x *= shade
        x += np.float32(look.haze[b] * DN_PER_REFL)
        if noise_dn:
            x += rng.integers(-noise_dn, noise_dn + 1, size=x.shape, dtype=np.int8)
        np.clip(x, NAIP_MIN_DN, 255, out=x)
        out[b] = x  # float -> uint8 truncation after clipping
    return out


# ------------------------------------------------------------------------------------------
# Grids, quarter quads, MGRS
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    epsg: int
    x0: float  # west
    y1: float  # north
    res: float
    width: int
    height: int

    @property
    def transform(self):
        from affine import Affine
        return Affine(self.res, 0.0, self.x0, 0.0, -self.res, self.y1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y1 - self.height * self.res, self.x0 + self.width * self.res, self.y1)

    def window_of(self, other: "Grid") -> tuple[int, int]:
        """(row, col) offset of `other` (same CRS and resolution, aligned) inside this grid."""
        col = (other.x0 - self.x0) / self.res
        row = (self.y1 - other.y1) / self.res
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise ValueError("grids are not aligned")
        return int(round(row)), int(round(col))


def _proj_bounds(bbox_ll, epsg: int, densify: int = 21) -> tuple[float, float, float, float]:
    from pyproj import Transformer
    tr = Transformer.from_crs(4326, epsg, always_xy=True)
    w, s, e, n = bbox_ll
    t = np.linspace(0, 1, densify)
    lon = np.concatenate([w + (e - w) * t, np.full(densify, e), e - (e - w) * t, np.full(densify, w)])
    lat = np.concatenate([np.full(densify, s), s + (n - s) * t, np.full(densify, n), n - (n - s) * t])
    x, y = tr.transform(lon, lat)
    return float(np.min(x)), float(np.min(y)), float(np.max(x)), float(np.max(y))


def snapped_grid(bounds, epsg: int, res: float, snap: float) -> Grid:
    """The north-up grid at `res` covering `bounds`, its edges on multiples of `snap` metres."""
    x0 = math.floor(bounds[0] / snap) * snap
    y0 = math.floor(bounds[1] / snap) * snap
    x1 = math.ceil(bounds[2] / snap) * snap
    y1 = math.ceil(bounds[3] / snap) * snap
    return Grid(epsg, x0, y1, res, int(round((x1 - x0) / res)), int(round((y1 - y0) / res)))


def region_grid(bbox_ll, epsg: int, margin_m: float, res: float = 1.0) -> Grid:
    """The region's master grid: bbox + margin, edges on 60 m (so 10 m and 20 m cells nest)."""
    b = _proj_bounds(bbox_ll, epsg)
    return snapped_grid((b[0] - margin_m, b[1] - margin_m, b[2] + margin_m, b[3] + margin_m), epsg, res, 60.0)


@dataclass(frozen=True)
class QuarterQuad:
    lat0: float  # south edge of the 3.75' cell
    lon0: float  # west edge
    name: str  # m_AAOOOQQ_qd_ZZ_RRR (date appended per year)

    @property
    def cell(self) -> tuple[float, float, float, float]:
        return (self.lon0, self.lat0, self.lon0 + QQ_DEG, self.lat0 + QQ_DEG)


def quarter_quads(bbox_ll, zone: int, gsd: float) -> list[QuarterQuad]:
    """DOQQ cells (3.75' x 3.75') meeting the bbox, with DOQQ-style names.

    Name: m_{lat}{lon}{quad}_{quadrant}_{zone}_{res}: the 1-degree block by its south-east
    corner (degrees N and W), the 7.5' quad numbered 01..64 from the block's north-west corner
    row by row, the quadrant (nw/ne/sw/se) of the quad, the UTM zone and the resolution in cm.
    """
    w, s, e, n = bbox_ll
    eps = 1e-9
    out = []
    for j in range(math.floor(s / QQ_DEG + eps), math.ceil(n / QQ_DEG - eps)):
        for i in range(math.floor(w / QQ_DEG + eps), math.ceil(e / QQ_DEG - eps)):
            lat0, lon0 = j * QQ_DEG, i * QQ_DEG
            clat, clon = lat0 + QQ_DEG / 2, lon0 + QQ_DEG / 2
            blat, blon = math.floor(clat), math.floor(-clon)  # block: SE corner (lat N, lon W)
            row = 7 - int((clat - blat) // 0.125)  # from the north
            col = int((-clon - blon) // 0.125)  # from the east ...
            col = 7 - col  # ... numbered from the west
            quad = row * 8 + col + 1
            ns = "n" if (clat - blat) % 0.125 >= 0.0625 else "s"
            ew = "w" if (-clon - blon) % 0.125 >= 0.0625 else "e"
            res = f"{int(round(gsd * 100)):03d}"
            out.append(QuarterQuad(round(lat0, 9), round(lon0, 9),
                                   f"m_{blat:02d}{blon:03d}{quad:02d}_{ns}{ew}_{zone:02d}_{res}"))
    return out


_MGRS_BANDS = "CDEFGHJKLMNPQRSTUVWX"
_MGRS_COLS = ("STUVWXYZ", "ABCDEFGH", "JKLMNPQR")  # zone % 3 == 0, 1, 2
_MGRS_ROWS = "ABCDEFGHJKLMNPQRSTUV"


def mgrs_tile(lon: float, lat: float, zone: int | None = None) -> str:
    """MGRS 100 km grid square of a point, e.g. '11SLT' (WGS84, AA lettering as Sentinel-2 uses)."""
    from pyproj import Transformer
    zone = zone or int(math.floor((lon + 180) / 6)) + 1
    tr = Transformer.from_crs(4326, 32600 + zone if lat >= 0 else 32700 + zone, always_xy=True)
    x, y = tr.transform(lon, lat)
    band = _MGRS_BANDS[min(int((lat + 80) // 8), len(_MGRS_BANDS) - 1)]
    col = _MGRS_COLS[zone % 3][int(x // 100000) - 1]
    row = _MGRS_ROWS[(int(y // 100000) + (5 if zone % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{col}{row}"


# ------------------------------------------------------------------------------------------
# COG writing
# ------------------------------------------------------------------------------------------
def write_cog(path: str | Path, data: np.ndarray, grid: Grid, *, compress: str = "DEFLATE", quality: int = 85,
              nodata: float | None = None, resampling: str = "average", blocksize: int = 512,
              tags: dict | None = None, band_names: tuple[str, ...] | None = None, predictor: int | None = None) -> Path:
    """Write (bands, H, W) as a Cloud-Optimised GeoTIFF (tiled, overviews), atomically."""
    import rasterio
    from gl10m.io import atomic_path

    if data.ndim == 2:
        data = data[None]
    if data.shape[1:] != grid.shape:
        raise ValueError(f"array {data.shape[1:]} does not match grid {grid.shape}")
    path = Path(path)
    opts: dict[str, Any] = dict(compress=compress, blocksize=blocksize, overview_resampling=resampling,
                                num_threads=1, bigtiff="NO")
    if compress == "JPEG":
        opts["quality"] = quality
    elif predictor:
        opts["predictor"] = predictor
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", driver="COG", width=grid.width, height=grid.height, count=data.shape[0],
                           dtype=data.dtype, crs=f"EPSG:{grid.epsg}", transform=grid.transform, nodata=nodata,
                           **opts) as dst:
            dst.write(data)
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})
            if band_names:
                for i, nm in enumerate(band_names, 1):
                    dst.set_band_description(i, nm)
        os.chmod(tmp, 0o644)  # a published dataset file, not a private temp file
    return path


def footprint_ll(grid: Grid, geom_xy=None) -> dict:
    """GeoJSON polygon (lon/lat) of a grid's extent, or of a shapely geometry in its CRS."""
    import shapely
    from pyproj import Transformer
    from shapely.geometry import box, mapping
    g = box(*grid.bounds) if geom_xy is None else geom_xy
    g = shapely.segmentize(g, max(grid.width, grid.height) * grid.res / 8)
    tr = Transformer.from_crs(grid.epsg, 4326, always_xy=True)

    def f(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.round(np.column_stack([x, y]), 7)
    g = shapely.transform(g, f)
    return mapping(shapely.normalize(g.simplify(0)))


# ------------------------------------------------------------------------------------------
# Sentinel-2
# ------------------------------------------------------------------------------------------
def block_mean(a: np.ndarray, k: int, dtype=np.float64) -> np.ndarray:
    """Mean over k x k blocks of the last two axes (shape divisible by k), accumulated in `dtype`
    (float64 by default; float32 is ~3x faster and differs by ~1e-7 relative)."""
    *lead, H, W = a.shape
    if np.dtype(dtype) == np.float32 and a.dtype == np.float32:
        # rows first (contiguous adds of whole rows), then the k columns of each block: ~6x faster
        # than the strided mean; the sums are float32 in another order (same ~1e-7 relative)
        s = a.reshape(*lead, H // k, k, W).sum(axis=-2)
        s = s.reshape(*lead, H // k, W // k, k).sum(axis=-1)
        s *= np.float32(1.0 / (k * k))
        return s
    return a.reshape(*lead, H // k, k, W // k, k).mean(axis=(-3, -1), dtype=dtype).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes, edges replicated."""
    if sigma <= 0:
        return a
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    pad = [(0, 0)] * (a.ndim - 2)
    b = np.pad(a, pad + [(r, r), (0, 0)], mode="edge")
    a = sum(k[i] * b[..., i:i + a.shape[-2], :] for i in range(2 * r + 1))
    b = np.pad(a, pad + [(0, 0), (r, r)], mode="edge")
    return sum(k[i] * b[..., :, i:i + a.shape[-1]] for i in range(2 * r + 1)).astype(np.float32)


def has_offset(baseline: str) -> bool:
    """L2A processing baselines >= 04.00 store reflectance * 10000 + 1000."""
    return tuple(int(p) for p in baseline.split(".")) >= (4, 0)


@dataclass
class S2Base:
    """A region's 10 m ground (exact 10x10 means of the 1 m rendering), in the S2 grid."""
    grid: Grid  # 10 m, UTM WGS84
    refl: np.ndarray  # (3, H, W) R, G, B
    vegrefl: np.ndarray  # (3, H, W) mean of refl * veg (for exact seasonal modulation)
    veg: np.ndarray  # (H, W) vegetation share
    water: np.ndarray  # (H, W) water share


@dataclass
class S2Scene:
    bands: dict[str, np.ndarray]  # B02, B03, B04 uint16 (H, W); SCL uint8 (H/2, W/2)
    cloud_pct: float
    nodata_pct: float
    valid_geom: Any  # shapely polygon in the grid CRS


def render_s2(base: S2Base, d: S2Date, date: dt.date, lat: float, seed: int, key: str, spec: ImagerySpec,
              baseline: str) -> S2Scene:
    """One granule on one date from the 10 m ground: season, PSF, noise, clouds, shadows, nodata."""
    import shapely
    from rasterio import features as rfeat
    from shapely.geometry import box

    g = base.grid
    H, W = g.height, g.width
    h2, w2 = H // 2, W // 2
    rng = rng_for(seed, "s2", key, date.isoformat())
    season = season_of(date, lat) + float(rng.uniform(-0.08, 0.08))
    coef = _SEASON_COEF[[0, 1, 2]]
    refl = base.refl + base.vegrefl * (season * coef)[:, None, None]
    haze = rng.uniform(0.0, 0.01) * np.array([0.5, 0.7, 1.0], np.float32)  # R, G, B
    refl = gaussian_blur(refl, spec.s2_psf_sigma_px) + haze[:, None, None]
    refl = refl + rng.normal(0, spec.s2_noise, refl.shape).astype(np.float32)

    # swath-edge nodata: a slanted edge on one side of the granule (geometry first, then pixels)
    valid_geom = box(*g.bounds)
    nodata10 = np.zeros((H, W), bool)
    if d.nodata_edge > 0:
        x0, y0, x1, y1 = g.bounds
        wdt = (x1 - x0) * d.nodata_edge
        slant = (x1 - x0) * 0.15
        if rng.random() < 0.5:  # west edge
            cut = shapely.Polygon([(x0 - 1, y0 - 1), (x0 + wdt + slant, y0 - 1), (x0 + wdt - slant, y1 + 1), (x0 - 1, y1 + 1)])
        else:  # east edge
            cut = shapely.Polygon([(x1 + 1, y0 - 1), (x1 - wdt + slant, y0 - 1), (x1 - wdt - slant, y1 + 1), (x1 + 1, y1 + 1)])
        g20 = Grid(g.epsg, g.x0, g.y1, g.res * 2, w2, h2)
        nd20 = rfeat.geometry_mask([cut], out_shape=(h2, w2), transform=g20.transform, invert=True)
        # the item footprint is the union of the valid 20 m cells (what the pixels really hold)
        valid_geom = shapely.union_all([box(*b) for b in _runs_to_boxes(~nd20, g20)]) if (~nd20).any() else shapely.Polygon()
        nodata10 = np.repeat(np.repeat(nd20, 2, 0), 2, 1)

    # clouds at 20 m: thresholded noise to the target share of valid pixels
    scl20 = _land_scl(base)
    nd20 = nodata10[::2, ::2]
    valid20 = ~nd20
    cloud = np.zeros((h2, w2), np.float32)
    cloud_cls = np.zeros((h2, w2), np.uint8)
    if d.cloud_pct > 0 and valid20.any():
        ys = np.arange(h2, dtype=np.float64)
        xs = np.arange(w2, dtype=np.float64)
        k = subseed(seed, "cloud", key, date.isoformat())
        field = value_noise(xs, ys, 22.0, k) + 0.5 * value_noise(xs, ys, 7.0, k + 1) + 0.25 * value_noise(xs, ys, 2.5, k + 2)
        thr = np.quantile(field[valid20], 1 - d.cloud_pct / 100.0)
        is_cloud = (field >= thr) & valid20
        core = field >= thr + 0.35 * (field.max() - thr)
        cirrus = value_noise(xs, ys, 30.0, k + 3) > 0.35
        cloud_cls[is_cloud] = 8
        cloud_cls[is_cloud & core] = 9
        cloud_cls[is_cloud & ~core & cirrus] = 10
        opacity = {8: 0.55, 9: 0.9, 10: 0.25}
        for c, o in opacity.items():
            cloud[cloud_cls == c] = o
        # shadows: the cloud mask shifted away from the sun, where there is no cloud
        dy, dx = int(rng.integers(6, 14)), int(rng.integers(-12, -4))
        sh = np.zeros((h2, w2), bool)
        src = np.isin(cloud_cls, (8, 9))
        ys0, ys1 = max(0, dy), h2 + min(0, dy)
        xs0, xs1 = max(0, dx), w2 + min(0, dx)
        sh[ys0:ys1, xs0:xs1] = src[ys0 - dy:ys1 - dy, xs0 - dx:xs1 - dx]
        sh &= (cloud_cls == 0) & valid20
        scl20 = np.where(sh, np.uint8(3), scl20)
        scl20 = np.where(cloud_cls > 0, cloud_cls, scl20)
        cloud10 = np.repeat(np.repeat(cloud, 2, 0), 2, 1)
        shadow10 = np.repeat(np.repeat(sh, 2, 0), 2, 1)
        white = (0.55 + 0.08 * value_noise(np.arange(W, dtype=float), np.arange(H, dtype=float), 5.0, k + 4)).astype(np.float32)
        refl = refl * (1 - cloud10) + white * cloud10
        refl = np.where(shadow10, refl * np.float32(0.4), refl)
    scl20 = np.where(nd20, np.uint8(0), scl20).astype(np.uint8)

    offset = S2_OFFSET if has_offset(baseline) else 0
    dn = np.clip(np.rint(refl * 10000.0) + offset, 1, 65535).astype(np.uint16)
    dn[:, nodata10] = 0
    n_valid = int(valid20.sum())
    cloudy = int(np.isin(scl20, (8, 9, 10)).sum())
    return S2Scene(
        bands={"B04": dn[0], "B03": dn[1], "B02": dn[2], "SCL": scl20},
        cloud_pct=round(100.0 * cloudy / n_valid, 4) if n_valid else 100.0,
        nodata_pct=round(100.0 * float(nd20.mean()), 4),
        valid_geom=valid_geom)


def _runs_to_boxes(mask: np.ndarray, grid: Grid):
    """Row runs of True cells as (x0, y0, x1, y1) boxes (merged later by union)."""
    out = []
    for r in range(mask.shape[0]):
        row = mask[r]
        if not row.any():
            continue
        d = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
        ytop = grid.y1 - r * grid.res
        for a, b in zip(starts, ends):
            out.append((grid.x0 + a * grid.res, ytop - grid.res, grid.x0 + b * grid.res, ytop))
    return out


def _land_scl(base: S2Base) -> np.ndarray:
    """SCL of the ground at 20 m: 6 water, 4 vegetation, 5 not vegetated."""
    water = block_mean(base.water, 2)
    veg = block_mean(base.veg, 2)
    return np.where(water >= 0.5, 6, np.where(veg >= 0.5, 4, 5)).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# One region, end to end
# ------------------------------------------------------------------------------------------
STRIP = 600  # rows per block of the 1 m rendering (a multiple of 60)


def _s2_times(seed: int, state: str, lon: float, d: S2Date, jitter: int) -> tuple[dt.datetime, str, int]:
    """Sensing time (10:30 local solar), platform and relative orbit of a region's acquisition."""
    rng = rng_for(seed, "s2-orbit", state)
    shift = int(rng.integers(-jitter, jitter + 1)) if jitter else 0
    day = d.date + dt.timedelta(days=shift)
    hours = 10.5 - lon / 15.0
    t = dt.datetime.combine(day, dt.time(0), tzinfo=dt.timezone.utc) + dt.timedelta(hours=hours)
    t = t.replace(microsecond=24000 * (1 + int(rng.integers(0, 40))))
    platform = "Sentinel-2A" if (day.toordinal() // 5) % 2 == 0 else "Sentinel-2B"
    orbit = 1 + int((lon + 180) * 143 / 360 * 7) % 143
    return t, platform, orbit


def naip_item_id(state: str, qq_name: str, date: dt.date) -> str:
    return f"{state.lower()}_{qq_name}_{date:%Y%m%d}"


def imagery_bbox(bbox, spec: ImagerySpec) -> tuple[float, float, float, float]:
    """The part of a region bbox that gets imagery (all of it unless spec.extent_deg is set)."""
    if not spec.extent_deg:
        return tuple(bbox)
    w, s, e, n = bbox
    cx, cy, h = (w + e) / 2, (s + n) / 2, spec.extent_deg / 2
    return (round(max(w, cx - h), 7), round(max(s, cy - h), 7), round(min(e, cx + h), 7), round(min(n, cy + h), 7))


def imagery_region(region, spec: ImagerySpec):
    """The region with its bbox cut to `imagery_bbox` (truth outside it is nodata)."""
    import dataclasses
    bb = imagery_bbox(region.bbox, spec)
    return region if tuple(bb) == tuple(region.bbox) else dataclasses.replace(region, bbox=bb)


def region_parts(region, spec: ImagerySpec) -> list[str]:
    """Independent work units of a region: "base" (truth, 1 m NAIP years, Sentinel-2) and one
    "naip:{year}" per state-year at another GSD (rendered on its own grid)."""
    return ["base"] + [f"naip:{y.year}" for y in spec.years_for(region.code) if abs(y.gsd - 1.0) > 1e-9]


def render_region(region, spec: ImagerySpec, out_dir: str | Path, seed: int, part: str = "all",
                  rasterize: Callable | None = None, tables: Tables | None = None,
                  wedge: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Render one region's truth, NAIP and Sentinel-2 COGs under out_dir; describe what was written.

    region: a gl10m.testbed.layout.RegionWorld (code, bbox, utm_epsg_nad83, utm_epsg_wgs84,
    base_cover). part: "all", or one of `region_parts` (so a build can spread a region over
    processes). rasterize(region, crs, transform, shape) -> {"classes", "marks", "material"}
    (uint8 layers) defaults to raster.rasterize_layers. wedge: put the black no-data wedge fault
    into one NAIP quarter quad of the region's newest state-year. Returns {"state", "truth",
    "naip": [...], "s2": [...], "faults": [...]} with hrefs relative to out_dir.
    """
    if rasterize is None:
        from gl10m.testbed.raster import rasterize_layers as rasterize
    tables = tables or default_tables()
    region = imagery_region(region, spec)
    parts = region_parts(region, spec) if part == "all" else [part]
    out: dict = {"state": region.code, "truth": None, "naip": [], "s2": [], "faults": []}
    for p in parts:
        if p == "base":
            r = _render_base(region, spec, Path(out_dir), seed, rasterize, tables, wedge, progress)
        elif p.startswith("naip:"):
            year = int(p.split(":", 1)[1])
            ys = [y for y in spec.years_for(region.code) if y.year == year]
            if not ys:
                raise ValueError(f"region {region.code} has no NAIP year {year}")
            r = _render_naip_grid(region, spec, Path(out_dir), seed, rasterize, tables, ys, wedge, progress)
        else:
            raise ValueError(f"unknown part {p!r}")
        out["truth"] = out["truth"] or r.get("truth")
        for k in ("naip", "s2", "faults"):
            out[k] += r.get(k, [])
    out["naip"].sort(key=lambda d: d["id"])
    out["s2"].sort(key=lambda d: (d["datetime"], d["processed"]))
    return out


def merge_parts(results: list[dict]) -> dict:
    """Merge render_region results of the parts of one region."""
    out: dict = {"state": results[0]["state"], "truth": None, "naip": [], "s2": [], "faults": []}
    for r in results:
        out["truth"] = out["truth"] or r.get("truth")
        for k in ("naip", "s2", "faults"):
            out[k] += r.get(k, [])
    out["naip"].sort(key=lambda d: d["id"])
    out["s2"].sort(key=lambda d: (d["datetime"], d["processed"]))
    return out


def _render_base(region, spec, out_dir, seed, rasterize, tables, wedge, progress) -> dict:
    from gl10m.testbed.classes import NODATA, TRUTH_CLASSES
    say = progress or (lambda s: None)
    code = region.code
    w, s, e, n = region.bbox
    lon_c, lat_c = (w + e) / 2, (s + n) / 2
    master = region_grid(region.bbox, region.utm_epsg_nad83, spec.margin_m, 1.0)
    say(f"{code}: truth {master.width}x{master.height}")
    layers = rasterize(region, f"EPSG:{master.epsg}", master.transform, master.shape)
    truth_rel = f"truth/{code}.tif"
    write_cog(out_dir / truth_rel, layers["classes"], master, compress="DEFLATE", nodata=NODATA, resampling="mode",
              blocksize=spec.blocksize, tags={"classes": ",".join(TRUTH_CLASSES), "region": code})
    one_m = [y for y in spec.years_for(code) if abs(y.gsd - 1.0) <= 1e-9]
    acc = _Acc10(master)
    naip = _render_master(region, master, layers, one_m, spec, seed, tables, acc)
    del layers
    res = _write_quarter_quads(region, spec, out_dir, master, naip, one_m, wedge, progress)
    del naip

    # Sentinel-2: the granule grid = master extent, relabelled as UTM WGS84 (same coordinates)
    g10 = Grid(region.utm_epsg_wgs84, master.x0, master.y1, 10.0, master.width // 10, master.height // 10)
    base = S2Base(g10, acc.refl, acc.vegrefl, acc.veg, acc.water)
    tile = mgrs_tile(lon_c, lat_c, region.utm_epsg_wgs84 % 100)
    s2_out: list[dict] = []
    for d in spec.s2_dates:
        t, platform, orbit = _s2_times(seed, code, lon_c, d, spec.s2_date_jitter_days)
        versions = [(d.baseline, False)] + ([(d.reprocessed_baseline, True)] if d.reprocessed_baseline else [])
        for baseline, again in versions:
            scene = render_s2(base, d, t.date(), lat_c, seed, code, spec, baseline)
            folder = f"s2/{tile}/{t:%Y%m%d}" + (f"_N{baseline.replace('.', '')}" if again else "")
            assets = {}
            for b in ("B02", "B03", "B04", "SCL"):
                arr = scene.bands[b]
                gb = g10 if b != "SCL" else Grid(g10.epsg, g10.x0, g10.y1, 20.0, g10.width // 2, g10.height // 2)
                rel = f"{folder}/{b}.tif"
                write_cog(out_dir / rel, arr, gb, compress="DEFLATE", predictor=2, nodata=0,
                          resampling="nearest" if b == "SCL" else "average", blocksize=spec.blocksize)
                assets[b] = {"href": rel, "gsd": gb.res, "epsg": gb.epsg, "transform": list(gb.transform)[:6],
                             "shape": [gb.height, gb.width], "bbox_xy": list(gb.bounds)}
            # processing time: hours after sensing; a reprocessing (new baseline) much later
            proc = t + (dt.timedelta(days=420, hours=7) if again else dt.timedelta(hours=9, minutes=17))
            s2_out.append({"state": code, "mgrs": tile, "datetime": t.isoformat().replace("+00:00", "Z"),
                           "platform": platform, "relative_orbit": orbit, "baseline": baseline,
                           "offset": S2_OFFSET if has_offset(baseline) else 0,
                           "processed": proc.strftime("%Y%m%dT%H%M%S"), "reprocessed": again,
                           "cloud_pct": scene.cloud_pct, "nodata_pct": scene.nodata_pct, "epsg": g10.epsg,
                           "geometry": footprint_ll(g10, scene.valid_geom), "assets": assets})
        say(f"{code}: s2 {t:%Y-%m-%d}")
    res["truth"] = {"href": truth_rel, "epsg": master.epsg, "transform": list(master.transform)[:6],
                    "shape": [master.height, master.width]}
    res["s2"] = s2_out
    return res


class _Acc10:
    """10 m means of the 1 m rendering, on the master's own 10 m cells (edges on 60 m)."""

    def __init__(self, master: Grid):
        h, w = master.height // 10, master.width // 10
        self.refl = np.empty((3, h, w), np.float32)
        self.vegrefl = np.empty((3, h, w), np.float32)
        self.veg = np.empty((h, w), np.float32)
        self.water = np.empty((h, w), np.float32)

    def add(self, r0: int, r1: int, refl: np.ndarray, veg: np.ndarray, water: np.ndarray) -> None:
        q0, q1 = r0 // 10, r1 // 10
        self.refl[:, q0:q1] = block_mean(refl[:3], 10)
        self.vegrefl[:, q0:q1] = block_mean(refl[:3] * veg, 10)
        self.veg[q0:q1] = block_mean(veg, 10)
        self.water[q0:q1] = block_mean(water, 10)


def _render_master(region, grid: Grid, layers: dict, years: list[NaipYear], spec: ImagerySpec, seed: int,
                   tables: Tables, acc: _Acc10 | None) -> dict[int, np.ndarray]:
    """NAIP uint8 (4, H, W) per year over a whole grid, rendered in strips of rows."""
    code = region.code
    lat_c = (region.bbox[1] + region.bbox[3]) / 2
    key = key_of(layers["classes"], layers.get("material"), tables, int(region.base_cover))
    marks = layers["marks"]
    looks = {y.year: year_look(seed, code, y, lat_c) for y in years}
    out = {y.year: np.empty((4,) + grid.shape, np.uint8) for y in years}
    shadows = {y.year: shadow_mask(key, tables, looks[y.year], grid.res) for y in years}
    tex_seed = subseed(seed, "texture")
    xs = pixel_centres(grid.transform, grid.shape)[0]
    for r0 in range(0, grid.height, STRIP):
        r1 = min(grid.height, r0 + STRIP)
        k = key[r0:r1]
        ys = pixel_centres(grid.transform, grid.shape, r0, r1 - r0)[1]
        refl = surface_reflectance(k, marks[r0:r1], xs, ys, tables, tex_seed)
        veg = tables.veg[k]
        for y in years:
            rng = rng_for(seed, "naip-noise", code, y.year, r0)
            out[y.year][:, r0:r1] = naip_dn(refl, veg, shadows[y.year][r0:r1], looks[y.year], rng, spec.naip_noise_dn)
        if acc is not None:
            acc.add(r0, r1, refl, veg, tables.water[k])
    return out


def _render_naip_grid(region, spec, out_dir, seed, rasterize, tables, years, wedge, progress) -> dict:
    """State-years at another GSD: truth rasterised and rendered on their own master grid."""
    gsd = years[0].gsd
    master = region_grid(region.bbox, region.utm_epsg_nad83, spec.margin_m, gsd)
    layers = rasterize(region, f"EPSG:{master.epsg}", master.transform, master.shape)
    naip = _render_master(region, master, layers, years, spec, seed, tables, None)
    del layers
    return _write_quarter_quads(region, spec, out_dir, master, naip, years, wedge, progress)


def _write_quarter_quads(region, spec, out_dir, master: Grid, naip: dict[int, np.ndarray], years: list[NaipYear],
                         wedge: bool, progress) -> dict:
    say = progress or (lambda s: None)
    code = region.code
    w, s, e, n = region.bbox
    lon_c, lat_c = (w + e) / 2, (s + n) / 2
    zone = region.utm_epsg_nad83 % 100
    newest = spec.years_for(code)[-1].year
    naip_out, faults = [], []
    for y in years:
        qqs = quarter_quads(region.bbox, zone, y.gsd)
        wedge_qq = _pick_wedge_qq(qqs, lon_c, lat_c) if (wedge and y.year == newest) else None
        for qq in qqs:
            cell = _proj_bounds(qq.cell, master.epsg)
            ov = spec.naip_overlap_m
            want = (cell[0] - ov, cell[1] - ov, cell[2] + ov, cell[3] + ov)
            mb = master.bounds
            clip = (max(want[0], mb[0]), max(want[1], mb[1]), min(want[2], mb[2]), min(want[3], mb[3]))
            if clip[2] - clip[0] < 10 * y.gsd or clip[3] - clip[1] < 10 * y.gsd:
                continue
            g = _clip_grid(snapped_grid(clip, master.epsg, y.gsd, y.gsd), master)
            r, c0 = master.window_of(g)
            img = naip[y.year][:, r:r + g.height, c0:c0 + g.width]
            fname = f"{qq.name}_{y.date:%Y%m%d}"
            rel = f"naip/{code}/{y.year}/{fname}.tif"
            item_id = naip_item_id(code, qq.name, y.date)
            if qq is wedge_qq:
                img = img.copy()
                poly = _apply_wedge(img, g, lon_c, lat_c)
                faults.append({"kind": "black_wedge", "collection": "naip", "state": code, "item_id": item_id,
                               "asset": "image", "href": rel,
                               "black_fraction": round(float((img.max(axis=0) <= 5).mean()), 4),
                               "wedge": footprint_ll(g, poly)})
            write_cog(out_dir / rel, np.ascontiguousarray(img), g, compress=spec.naip_compress,
                      quality=spec.naip_quality, resampling="average", blocksize=spec.blocksize,
                      band_names=("Red", "Green", "Blue", "NIR"))
            naip_out.append({"id": item_id, "state": code, "year": y.year, "date": y.date.isoformat(), "gsd": y.gsd,
                             "epsg": g.epsg, "transform": list(g.transform)[:6], "shape": [g.height, g.width],
                             "bbox_xy": list(g.bounds), "href": rel, "cell": list(qq.cell), "quad": qq.name,
                             "geometry": footprint_ll(g)})
            say(f"{code}: naip {fname}")
    return {"naip": naip_out, "faults": faults}


def _clip_grid(g: Grid, master: Grid) -> Grid:
    """Shrink a grid to lie inside the master extent (whole pixels)."""
    mb = master.bounds
    x0 = g.x0 + max(0, math.ceil((mb[0] - g.x0) / g.res - 1e-9)) * g.res
    y1 = g.y1 - max(0, math.ceil((g.y1 - mb[3]) / g.res - 1e-9)) * g.res
    x1 = min(g.bounds[2], mb[2])
    y0 = max(g.bounds[1], mb[1])
    return Grid(g.epsg, x0, y1, g.res, int(math.floor((x1 - x0) / g.res + 1e-9)), int(math.floor((y1 - y0) / g.res + 1e-9)))


def _pick_wedge_qq(qqs: list[QuarterQuad], lon: float, lat: float) -> QuarterQuad | None:
    """The quarter quad whose cell holds the point (else the nearest)."""
    if not qqs:
        return None
    return min(qqs, key=lambda q: (abs(q.lon0 + QQ_DEG / 2 - lon) + abs(q.lat0 + QQ_DEG / 2 - lat), q.name))


def _apply_wedge(img: np.ndarray, g: Grid, lon: float, lat: float):
    """Black out a triangular wedge at the image corner nearest (lon, lat); returns it (CRS of g)."""
    import shapely
    from pyproj import Transformer
    from rasterio import features as rfeat
    x, y = Transformer.from_crs(4326, g.epsg, always_xy=True).transform(lon, lat)
    x0, y0, x1, y1 = g.bounds
    cx = x0 if abs(x - x0) <= abs(x - x1) else x1
    cy = y0 if abs(y - y0) <= abs(y - y1) else y1
    lx = (x1 - x0) * 0.6 * (1 if cx == x0 else -1)
    ly = (y1 - y0) * 0.6 * (1 if cy == y0 else -1)
    poly = shapely.Polygon([(cx, cy), (cx + lx, cy), (cx, cy + ly)])
    m = rfeat.geometry_mask([poly], out_shape=g.shape, transform=g.transform, invert=True)
    img[:, m] = 0
    return poly
