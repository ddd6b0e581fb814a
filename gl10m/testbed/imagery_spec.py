"""The testbed imagery spec: the `imagery:` mapping of manifests/testbed.yaml (NAIP state-years,
Sentinel-2 dates, faults, COG options), validated with one-line errors; the constants the
renderers share (:mod:`gl10m.testbed.naip`, :mod:`gl10m.testbed.sentinel2`)."""
from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gl10m.errors import UserError

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
