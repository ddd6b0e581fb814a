"""The imagery-provider interface shared by every backend (``stac``, ``earthengine``).

A provider does four things for the download stages:

* ``search_items(collection, bbox, start, end)`` yields every item of `collection` whose
  footprint intersects `bbox` (west, south, east, north in EPSG:4326) and whose acquisition date
  lies in ``start .. end`` (both inclusive, whole days, UTC), normalised to one internal shape
  (:data:`ITEM_FIELDS`, below) whatever the backend calls things;
* ``sign(href)`` returns a URL the fetch step can read (identity unless the provider signs);
  ``resign(href)`` forces fresh credentials (fetch calls it after an HTTP 403, e.g. an expired
  Planetary Computer SAS token);
* ``read_lr(row, grid, profile, ctx)`` and ``read_hr(row, grid, profile, ctx)`` read the pixels
  of one plan row (items parsed, :func:`gl10m.fetch.parse_row`) onto the footprint's LR and HR
  grids: an :class:`LRImage` (the Sentinel-2 composite, stretched to uint8, with its valid-date
  count) and an :class:`HRImage` (the NAIP mosaic and what it covers), or a :class:`Rejection`
  for a deterministic fault of the inputs. QC, tiles, metadata and the staged sample are one
  module's, the same for every provider (:func:`gl10m.fetch.assemble`);
* ``name`` and ``max_concurrency`` (the cap on concurrent requests across all Dask workers).

Read outcomes every provider shares: :class:`Rejection` (``rejected:<reason>``, one of
:data:`REASONS`), :class:`AccessDenied` (credentials; recorded as failed), and
:class:`gl10m.sources.retry.TransientError` for trouble a later run may not have.

Normalised item (a plain dict):

=============  ==============================================================================
id             the provider's item id
collection     the provider's collection id
provider       the provider's ``name``
datetime       acquisition time, ISO 8601 UTC with ``Z`` (``2023-06-10T18:39:19Z``)
geometry       footprint, GeoJSON dict in EPSG:4326
bbox           [west, south, east, north] (EPSG:4326)
epsg           native CRS of the assets (int) or None
gsd            ground sample distance in metres, or None
cloud_cover    scene cloud cover in percent (Sentinel-2), or None
mgrs_tile      Sentinel-2 MGRS tile (``11SLT``), or None
baseline       Sentinel-2 processing baseline (``05.09``), or None
datatake       Sentinel-2 datatake key, baseline-free (``S2B_20230610T183919_R070``), or None
naip_state     NAIP state, upper case (``CA``), or None
naip_year      NAIP year (int), or None
hrefs          {canonical asset key: UNSIGNED href}; Sentinel-2 ``B02 B03 B04 B08 SCL``, NAIP ``image``
properties     the item's raw properties (provenance)
=============  ==============================================================================
"""
from __future__ import annotations

import abc
import contextlib
import datetime as dt
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from gl10m.errors import redact as _redact_urls

ITEM_FIELDS: tuple[str, ...] = (
    "id", "collection", "provider", "datetime", "geometry", "bbox", "epsg", "gsd", "cloud_cover",
    "mgrs_tile", "baseline", "datatake", "naip_state", "naip_year", "hrefs", "properties",
)
S2_ASSETS: tuple[str, ...] = ("B02", "B03", "B04", "B08", "SCL")
NAIP_ASSETS: tuple[str, ...] = ("image",)

Bbox = tuple[float, float, float, float]

ASSET_MISSING = "asset_missing"
ASSET_CORRUPT = "asset_corrupt"
S2_MASKED = "s2_masked"
HR_BLACK = "hr_black"
NAIP_GAP = "naip_gap"
REASONS = (ASSET_MISSING, ASSET_CORRUPT, S2_MASKED, HR_BLACK, NAIP_GAP)


class Rejection(Exception):
    """A deterministic reason to drop the scene (becomes ``rejected:<reason>``)."""

    def __init__(self, reason: str, message: str, **detail: Any):
        super().__init__(message)
        self.reason = reason
        self.detail = {"message": message, **detail}


class AccessDenied(Exception):
    """HTTP 401/403 even after re-signing: credentials, not data (recorded as failed; a rerun,
    with a fresh token or fixed credentials, tries again)."""

    transient = True


_QUERY = re.compile(r"\?[^\s'\"]*")


def redact(text: str) -> str:
    """Drop query strings (signatures, tokens) and ``user:password@`` from URLs in a message."""
    return _QUERY.sub("?<redacted>", _redact_urls(str(text)))


class Timings:
    """Seconds spent per part of one scene's fetch (``with t("part"): ...``), for the bench; the
    parts nest freely, each adds its own wall time (``seconds``) and the CPU time of the thread
    that ran it (``cpu``: the composing thread's own work, without the I/O threads' reads)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        t, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - t, time.thread_time() - c)

    def add(self, part: str, seconds: float, cpu: float = 0.0) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds
        self.cpu[part] = self.cpu.get(part, 0.0) + cpu


@dataclass
class ReadContext:
    """What the reads of one scene share: the limiter (a context manager capping concurrent
    requests across workers, or None), the retry options (with the scene's time budget), GDAL
    overrides for COG reads, and where the time goes (:class:`Timings`, optional)."""

    limiter: Any = None
    retry_opts: Mapping[str, Any] | None = None
    gdal_env: Mapping[str, Any] | None = None
    timings: Timings | None = None

    def timed(self, part: str):
        return self.timings(part) if self.timings is not None else contextlib.nullcontext()


@dataclass
class LRImage:
    """A provider's Sentinel-2 composite on the LR grid: ``rgb`` [H, W, 3] uint8 (pixels without
    any valid observation are 0), ``count`` [H, W] valid dates per pixel, ``n_dates`` the dates
    composited; ``info`` the items used and excluded (``items``, ``excluded``) for the QC detail
    and the metadata; ``meta`` what the provider adds to or replaces in the sample metadata (one
    level deep: ``{"s2": {"collection": ...}}`` updates ``meta["s2"]``). ``extra``: when the
    profile's ``imagery.bands`` is not ``rgb``, B02, B03, B04, B08 as [H, W, 4] uint16 harmonised
    surface reflectance * 10000 (0 without a valid observation); None otherwise."""

    rgb: np.ndarray
    count: np.ndarray
    n_dates: int
    info: dict
    meta: dict = field(default_factory=dict)
    extra: np.ndarray | None = None


@dataclass
class HRImage:
    """A provider's NAIP mosaic on the HR grid: ``rgb`` [H, W, 3] uint8 (0 where uncovered),
    ``covered`` [H, W] bool; ``info`` (``items``) and ``meta`` as in :class:`LRImage`; ``extra``:
    when ``imagery.bands`` is not ``rgb``, R, G, B, N as [H, W, 4] uint8 (0 where uncovered)."""

    rgb: np.ndarray
    covered: np.ndarray
    info: dict
    meta: dict = field(default_factory=dict)
    extra: np.ndarray | None = None


@runtime_checkable
class ProviderLike(Protocol):
    """What the pipeline needs of a provider (structural type, for type checking)."""

    name: str
    max_concurrency: int

    def search_items(self, collection: str, bbox: Bbox, start: dt.date, end: dt.date) -> Iterator[dict]: ...

    def sign(self, href: str) -> str: ...

    def resign(self, href: str) -> str: ...

    def read_lr(self, row: Mapping, grid, profile, ctx: ReadContext) -> LRImage: ...

    def read_hr(self, row: Mapping, grid, profile, ctx: ReadContext) -> HRImage: ...


class Provider(abc.ABC):
    """Base class of the backends: identity signing, a concurrency cap, the search to implement."""

    name: str = "provider"
    max_concurrency: int = 8

    @abc.abstractmethod
    def search_items(self, collection: str, bbox: Bbox, start: dt.date, end: dt.date) -> Iterator[dict]:
        """Yield normalised items (see the module doc) of `collection` over `bbox` and the dates."""

    def sign(self, href: str) -> str:
        """A readable URL for an unsigned asset href (identity here)."""
        return href

    def resign(self, href: str) -> str:
        """Like :meth:`sign`, but with fresh credentials (after a 403). Identity here."""
        return href

    def read_lr(self, row: Mapping, grid, profile, ctx: ReadContext) -> LRImage:
        """The Sentinel-2 composite of a parsed plan row on `grid` (see the module doc)."""
        raise NotImplementedError(f"{type(self).__name__} reads no pixels")

    def read_hr(self, row: Mapping, grid, profile, ctx: ReadContext) -> HRImage:
        """The NAIP mosaic of a parsed plan row on `grid` (see the module doc)."""
        raise NotImplementedError(f"{type(self).__name__} reads no pixels")

    def describe(self) -> dict:
        """What to record as provenance (no credentials)."""
        return {"provider": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def empty_item(**values: Any) -> dict:
    """A normalised item with every field present (None / empty), updated with `values`."""
    item: dict[str, Any] = {k: None for k in ITEM_FIELDS}
    item["hrefs"] = {}
    item["properties"] = {}
    unknown = set(values) - set(ITEM_FIELDS)
    if unknown:
        raise KeyError(f"not item fields: {sorted(unknown)}")
    item.update(values)
    return item


def iso_utc(value: Any) -> str | None:
    """Normalise a datetime / ISO string to ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, seconds)."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        t = value
    elif isinstance(value, dt.date):
        t = dt.datetime(value.year, value.month, value.day)
    else:
        s = str(value).strip().replace(" ", "T")
        if s.endswith("Z") or s.endswith("z"):
            s = s[:-1] + "+00:00"
        # Python < 3.11 does not parse fractions of other than 3/6 digits: trim them.
        if "." in s:
            head, _, tail = s.partition(".")
            frac = re.match(r"\d*", tail).group(0)
            rest = tail[len(frac):]
            s = head + ("." + (frac + "000000")[:6] if frac else "") + rest
        t = dt.datetime.fromisoformat(s)
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return t.replace(microsecond=0).isoformat() + "Z"


def as_date(value: Any) -> dt.date:
    """A date from a date, a datetime or an ISO string (the date part of its UTC time)."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    s = iso_utc(value)
    assert s is not None
    return dt.date.fromisoformat(s[:10])
