"""The ``stac`` provider: any STAC API (the offline testbed's rustac, pgstac, Planetary Computer,
Earth Search) through pystac-client, with retries, full paging and local normalisation.

* Search sends only ``collections``, ``bbox``, ``datetime`` and ``limit`` (<= 1000, Planetary
  Computer's cap) and follows every ``next`` link; it never relies on server-side ``query``,
  ``filter`` or ``sortby`` (rustac's in-memory backend silently ignores them). Long date ranges
  are split into chunks (``chunk_days``) so no single search runs for minutes; items seen twice
  (chunk edges, unstable paging) are yielded once. Every HTTP request is retried on 429/5xx,
  timeouts and connection errors with backoff honouring ``Retry-After``
  (:mod:`gl10m.sources.retry`).
* Items are normalised to the shape of :mod:`gl10m.sources.base` whatever the server calls
  things: Planetary Computer (``s2:mgrs_tile``, ``s2:processing_baseline``, ``s2:datatake_id``,
  ``proj:epsg`` / ``proj:code``, ``naip:state``, ``naip:year``, assets ``B02 B03 B04 B08 SCL``) and
  Earth Search (``mgrs:utm_zone`` + ``mgrs:latitude_band`` + ``mgrs:grid_square``, the older
  ``sentinel:*`` names, assets ``blue green red scl``).
* Pixels (``read_lr`` / ``read_hr``): the COG windows of the plan's hrefs, signed right before
  each read (:mod:`gl10m.sources.cog`).
* Planetary Computer assets are signed with SAS tokens (:class:`PlanetaryComputerSigner`):
  tokens are cached per storage container and refreshed before they expire; ``resign`` (fetch
  calls it after a 403) drops the cached token and fetches a new one. The subscription key is
  read from ``PC_SDK_SUBSCRIPTION_KEY`` (or the planetary-computer package's settings file when
  that package is installed) and is never logged, printed or written.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit, urlunsplit

from gl10m.errors import UserError, redact
from gl10m.sources.base import Bbox, HRImage, LRImage, Provider, ReadContext, as_date, empty_item, iso_utc
from gl10m.sources.retry import PermanentHTTPError, TransientError, check_response, retry

log = logging.getLogger(__name__)

MAX_PAGE = 1000  # Planetary Computer's page-size cap
DEFAULT_SAS_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
BLOB_DOMAIN = ".blob.core.windows.net"

# canonical asset key -> the names providers use for it (first found wins)
ASSET_ALIASES: dict[str, tuple[str, ...]] = {
    "B02": ("B02", "blue"),
    "B03": ("B03", "green"),
    "B04": ("B04", "red"),
    "B08": ("B08", "nir"),
    "SCL": ("SCL", "scl"),
    "image": ("image",),
}

_PC_S2_ID = re.compile(r"^(S2[A-D])_MSIL2A_(\d{8}T\d{6})_(?:N(\d{4})_)?R\d{3}_T(\d{2}[A-Z]{3})_(\d{8}T\d{6})$")
_PRODUCT_URI = re.compile(r"^(S2[A-D])_MSIL2A_(\d{8}T\d{6})_N(\d{4})_R\d{3}_T(\d{2}[A-Z]{3})_(\d{8}T\d{6})")
_DATATAKE_ID = re.compile(r"^G?(S2[A-D])_(\d{8}T\d{6})_")
_ES_ID = re.compile(r"^(S2[A-D])_(\d{2}[A-Z]{3})_(\d{8})_(\d+)_L2A$")
_EPSG_CODE = re.compile(r"EPSG:(\d+)$", re.I)


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------
def _epsg(props: dict, assets: dict) -> int | None:
    v = props.get("proj:epsg")
    if v is None:
        code = props.get("proj:code")
        if isinstance(code, str) and (m := _EPSG_CODE.search(code)):
            v = m.group(1)
    if v is None:
        for a in assets.values():
            if a.get("proj:epsg") is not None:
                v = a["proj:epsg"]
                break
            code = a.get("proj:code")
            if isinstance(code, str) and (m := _EPSG_CODE.search(code)):
                v = m.group(1)
                break
    return int(v) if v is not None else None


def _mgrs(props: dict, item_id: str) -> str | None:
    v = props.get("s2:mgrs_tile")
    if v:
        return str(v).upper().lstrip("T")
    for prefix in ("mgrs", "sentinel"):
        z, b, g = (props.get(f"{prefix}:utm_zone"), props.get(f"{prefix}:latitude_band"),
                   props.get(f"{prefix}:grid_square"))
        if z is not None and b and g:
            return f"{int(z):02d}{str(b).upper()}{str(g).upper()}"
    if m := _PC_S2_ID.match(item_id):
        return m.group(4)
    if m := _ES_ID.match(item_id):
        return m.group(2)
    return None


def _fmt_baseline(n4: str) -> str:
    return f"{n4[:2]}.{n4[2:]}"


def _baseline(props: dict, item_id: str) -> str | None:
    v = props.get("s2:processing_baseline") or props.get("processing:version")
    if v:
        s = str(v).strip()
        if re.fullmatch(r"\d{4}", s):
            return _fmt_baseline(s)
        if re.fullmatch(r"\d{1,2}\.\d{1,2}", s):
            a, b = s.split(".")
            return f"{int(a):02d}.{int(b):02d}"
        return s
    for key in ("s2:product_uri", "sentinel:product_id", "s2:datatake_id"):
        s = props.get(key)
        if isinstance(s, str):
            if m := _PRODUCT_URI.match(s):
                return _fmt_baseline(m.group(3))
            if m := re.search(r"_N(\d\d)\.(\d\d)$", s):
                return f"{m.group(1)}.{m.group(2)}"
    if (m := _PC_S2_ID.match(item_id)) and m.group(3):
        return _fmt_baseline(m.group(3))
    return None


def _platform_code(props: dict) -> str | None:
    p = str(props.get("platform") or "").lower()
    if m := re.fullmatch(r"sentinel-?2([a-d])", p):
        return f"S2{m.group(1).upper()}"
    return None


def _datatake(props: dict, item_id: str, when: str | None) -> str | None:
    """A baseline-free key of the datatake: satellite + datatake sensing start
    (``S2B_20230610T183919``). Two reprocessings of one granule share it."""
    s = props.get("s2:datatake_id")
    if isinstance(s, str) and (m := _DATATAKE_ID.match(s)):
        return f"{m.group(1)}_{m.group(2)}"
    for key in ("s2:product_uri", "sentinel:product_id"):
        s = props.get(key)
        if isinstance(s, str) and (m := _PRODUCT_URI.match(s)):
            return f"{m.group(1)}_{m.group(2)}"
    if m := _PC_S2_ID.match(item_id):
        return f"{m.group(1)}_{m.group(2)}"
    sat = _platform_code(props) or ((m.group(1)) if (m := _ES_ID.match(item_id)) else None)
    if sat and when:
        return f"{sat}_{when[:19].replace('-', '').replace(':', '')}"
    return None


def _gsd(props: dict, assets: dict, hrefs_keys: list[str]) -> float | None:
    v = props.get("gsd")
    if v is None:
        for k in hrefs_keys:
            for alias in ASSET_ALIASES.get(k, (k,)):
                a = assets.get(alias)
                if a and a.get("gsd") is not None:
                    return float(a["gsd"])
        return None
    return float(v)


def _self_href(item: dict) -> str | None:
    for link in item.get("links") or []:
        if link.get("rel") == "self" and "://" in str(link.get("href", "")):
            return link["href"]
    return None


def _hrefs(item: dict) -> dict[str, str]:
    assets = item.get("assets") or {}
    base = _self_href(item)
    out: dict[str, str] = {}
    for canon, aliases in ASSET_ALIASES.items():
        for alias in aliases:
            a = assets.get(alias)
            if a and a.get("href"):
                href = str(a["href"])
                if base and "://" not in href:
                    href = urljoin(base, href)
                out[canon] = href
                break
    return out


def normalise_item(item: dict, provider: str = "stac") -> dict:
    """One STAC item (a GeoJSON dict) in the normalised shape of :mod:`gl10m.sources.base`."""
    props = dict(item.get("properties") or {})
    assets = item.get("assets") or {}
    iid = str(item["id"])
    when = iso_utc(props.get("datetime") or props.get("start_datetime"))
    hrefs = _hrefs(item)
    state = props.get("naip:state")
    year = props.get("naip:year")
    is_s2 = any(k in hrefs for k in ("B02", "B03", "B04", "SCL")) or any(
        str(k).startswith(("s2:", "mgrs:", "sentinel:")) for k in props)
    geom = item.get("geometry")
    bbox = item.get("bbox")
    if bbox is None and geom is not None:
        from shapely.geometry import shape

        bbox = list(shape(geom).bounds)
    return empty_item(
        id=iid,
        collection=item.get("collection"),
        provider=provider,
        datetime=when,
        geometry=geom,
        bbox=[float(v) for v in bbox[:2] + bbox[-2:]] if bbox is not None and len(bbox) in (4, 6) else bbox,
        epsg=_epsg(props, assets),
        gsd=_gsd(props, assets, list(hrefs)),
        cloud_cover=float(props["eo:cloud_cover"]) if props.get("eo:cloud_cover") is not None else None,
        mgrs_tile=_mgrs(props, iid) if is_s2 else None,
        baseline=_baseline(props, iid) if is_s2 else None,
        datatake=_datatake(props, iid, when) if is_s2 else None,
        naip_state=str(state).upper() if state else None,
        naip_year=int(year) if year not in (None, "") else (int(when[:4]) if state and when else None),
        hrefs=hrefs,
        properties=props,
    )


# ---------------------------------------------------------------------------------------------
# HTTP with retries for pystac-client
# ---------------------------------------------------------------------------------------------
def _retry_io_class():
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO
    from requests import Request

    class RetryingStacApiIO(StacApiIO):
        """pystac-client I/O whose every request goes through :func:`retry`, keeping the
        ``Retry-After`` of 429/503 answers (pystac-client's own errors drop the headers)."""

        def __init__(self, *, retry_kw: dict | None = None, timeout: Any = (10, 120), **kw: Any):
            super().__init__(max_retries=None, timeout=timeout, **kw)
            self.retry_kw = {"attempts": 8, "max_delay": 10.0, **(retry_kw or {})}
            self.n_requests = 0

        def request(self, href: str, method: str | None = None, headers: dict | None = None,
                    parameters: dict | None = None) -> str:
            method = (method or "GET").upper()

            def once() -> str:
                if method in ("POST", "PUT", "PATCH"):
                    req = Request(method=method, url=href, headers=headers, json=parameters)
                else:
                    req = Request(method=method, url=href, headers=headers, params=dict(parameters or {}))
                modified = self._req_modifier(req) if self._req_modifier else None
                prepped = self.session.prepare_request(modified or req)
                self.n_requests += 1
                resp = self.session.send(prepped, timeout=self.timeout)
                try:
                    check_response(resp, f"STAC {method}")
                except PermanentHTTPError as e:
                    err = APIError(f"{e}: {resp.text[:300]}")
                    err.status_code = resp.status_code
                    raise err from None
                text = resp.content.decode("utf-8", errors="replace")
                try:  # a STAC API answers JSON: a garbled or truncated body is a transient fault
                    json.loads(text)
                except ValueError:
                    raise TransientError(f"STAC {method} {_public_url(href)}: the answer is not valid JSON "
                                         f"({len(resp.content)} bytes)") from None
                return text

            return retry(once, **self.retry_kw)

    return RetryingStacApiIO


# ---------------------------------------------------------------------------------------------
# Planetary Computer signing
# ---------------------------------------------------------------------------------------------
def _pc_settings() -> tuple[str | None, str | None]:
    """(sas_url, subscription_key) from the environment, else the planetary-computer package's
    settings (which also reads ``~/.planetarycomputer/settings.env``) when it is installed."""
    sas = os.environ.get("PC_SDK_SAS_URL")
    key = os.environ.get("PC_SDK_SUBSCRIPTION_KEY")
    if sas is None or key is None:
        try:
            import warnings

            with warnings.catch_warnings():  # the package warns about its own pydantic use
                warnings.simplefilter("ignore")
                from planetary_computer.settings import Settings

            s = Settings.get()
            sas = sas or s.sas_url
            key = key or s.subscription_key
        except Exception:  # package absent or unreadable settings: anonymous access still works
            pass
    return sas, key


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class PlanetaryComputerSigner:
    """Sign Azure blob hrefs with Planetary Computer SAS tokens, cached per container.

    A token is fetched from ``{sas_url}/{account}/{container}`` (answer:
    ``{"token": ..., "msft:expiry": ...}``), reused until less than `min_ttl_s` seconds remain,
    and dropped by :meth:`resign` (for a 403 from storage). Hrefs outside
    ``*.blob.core.windows.net`` are returned unchanged. Thread-safe; each process has its own
    cache. The subscription key is sent as ``Ocp-Apim-Subscription-Key`` and never shown.
    """

    def __init__(self, sas_url: str | None = None, subscription_key: str | None = None, *,
                 min_ttl_s: float = 600.0, timeout: float = 30.0, retry_kw: dict | None = None,
                 clock: Callable[[], dt.datetime] | None = None):
        env_sas, env_key = _pc_settings()
        self.sas_url = (sas_url or env_sas or DEFAULT_SAS_URL).rstrip("/")
        self._key = subscription_key if subscription_key is not None else env_key
        self.min_ttl_s = float(min_ttl_s)
        self.timeout = timeout
        self.retry_kw = dict(retry_kw or {})
        self._clock = clock or _utcnow
        self._cache: dict[tuple[str, str], tuple[str, dt.datetime]] = {}
        self._lock = threading.Lock()
        self._session = None
        self.n_token_requests = 0

    def __getstate__(self):  # picklable for Dask: no session, no lock, no cached tokens
        st = self.__dict__.copy()
        st["_session"] = None
        st["_lock"] = None
        st["_cache"] = {}
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PlanetaryComputerSigner(sas_url={self.sas_url!r}, key={'set' if self._key else 'none'})"

    @staticmethod
    def container_of(href: str) -> tuple[str, str] | None:
        u = urlsplit(href)
        if not u.netloc.endswith(BLOB_DOMAIN):
            return None
        parts = u.path.lstrip("/").split("/", 1)
        if len(parts) < 2 or not parts[0]:
            return None
        return u.netloc.split(".", 1)[0], parts[0]

    @staticmethod
    def unsigned(href: str) -> str:
        """`href` without a SAS query string."""
        return href.split("?", 1)[0] if PlanetaryComputerSigner.container_of(href) else href

    def _fetch_token(self, account: str, container: str) -> tuple[str, dt.datetime]:
        import requests

        if self._session is None:
            self._session = requests.Session()
        url = f"{self.sas_url}/{account}/{container}"
        headers = {"Ocp-Apim-Subscription-Key": self._key} if self._key else {}

        def once():
            self.n_token_requests += 1
            resp = self._session.get(url, headers=headers, timeout=self.timeout)
            check_response(resp, "Planetary Computer SAS token")
            return resp.json()

        body = retry(once, **self.retry_kw)
        token, expiry = body.get("token"), body.get("msft:expiry")
        if not token or not expiry:
            raise TransientError(f"Planetary Computer SAS token: no token in the answer from {url}")
        exp = dt.datetime.fromisoformat(iso_utc(expiry).replace("Z", "+00:00"))
        return str(token).lstrip("?"), exp

    def _token(self, account: str, container: str, force: bool) -> str:
        with self._lock:
            hit = self._cache.get((account, container))
            if hit and not force and (hit[1] - self._clock()).total_seconds() > self.min_ttl_s:
                return hit[0]
            token, exp = self._fetch_token(account, container)
            self._cache[(account, container)] = (token, exp)
            return token

    def sign(self, href: str, *, force: bool = False) -> str:
        where = self.container_of(href)
        if where is None:
            return href
        base = href.split("?", 1)[0]
        return f"{base}?{self._token(*where, force=force)}"

    def resign(self, href: str) -> str:
        return self.sign(href, force=True)


# ---------------------------------------------------------------------------------------------
# the provider
# ---------------------------------------------------------------------------------------------
def date_chunks(start: dt.date, end: dt.date, days: int | None) -> list[tuple[dt.date, dt.date]]:
    """Split ``start .. end`` (inclusive) into consecutive inclusive chunks of at most `days`."""
    if end < start:
        raise UserError(f"date range ends before it starts: {start} .. {end}")
    if not days:
        return [(start, end)]
    out, a = [], start
    while a <= end:
        b = min(end, a + dt.timedelta(days=days - 1))
        out.append((a, b))
        a = b + dt.timedelta(days=1)
    return out


def _public_url(url: str) -> str:
    """`url` without ``user:password@``, query string and fragment (where tokens travel)."""
    u = urlsplit(url)
    host = u.netloc.rsplit("@", 1)[-1]
    return urlunsplit((u.scheme, host, u.path, "", ""))


def flavour_of(url: str) -> str:
    host = urlsplit(url).netloc.lower()
    if "planetarycomputer" in host:
        return "planetary_computer"
    if "earth-search" in host:
        return "earth_search"
    return "generic"


class StacProvider(Provider):
    """A STAC API as an imagery provider (see the module doc)."""

    def __init__(self, url: str, *, signing: str = "none", max_concurrency: int = 8,
                 page_size: int = MAX_PAGE, chunk_days: int | None = 92, name: str = "stac",
                 retry_kw: dict | None = None, timeout: Any = (10, 120),
                 signer: PlanetaryComputerSigner | None = None):
        if not url or "://" not in url:
            raise UserError(f"provider.stac_url must be an http(s) URL, got {redact(url)!r}")
        if signing not in ("none", "planetary_computer"):
            raise UserError(f"unknown signing {signing!r} (none, planetary_computer)")
        self.url = url.rstrip("/")
        self.signing = signing
        self.max_concurrency = int(max_concurrency)
        self.page_size = max(1, min(int(page_size), MAX_PAGE))
        self.chunk_days = chunk_days
        self.name = name
        self.flavour = flavour_of(self.url)
        self.retry_kw = dict(retry_kw or {})
        self.timeout = timeout
        self._signer = signer if signer is not None else (
            PlanetaryComputerSigner(retry_kw=self.retry_kw) if signing == "planetary_computer" else None)
        self._client = None
        self._io = None

    def __getstate__(self):  # picklable for Dask workers: the client is reopened lazily
        st = self.__dict__.copy()
        st["_client"] = None
        st["_io"] = None
        return st

    def describe(self) -> dict:
        """Provenance (recorded in catalog metadata and hashed): the URL without credentials."""
        return {"provider": self.name, "url": _public_url(self.url), "flavour": self.flavour,
                "signing": self.signing}

    @property
    def n_requests(self) -> int:
        """HTTP requests made to the STAC API so far (retries included)."""
        return self._io.n_requests if self._io is not None else 0

    def client(self):
        if self._client is None:
            from pystac_client import Client

            self._io = _retry_io_class()(retry_kw=self.retry_kw, timeout=self.timeout)
            self._client = Client.open(self.url, stac_io=self._io)
        return self._client

    def search_pages(self, collection: str, bbox: Bbox, start: dt.date, end: dt.date) -> Iterator[dict]:
        """The raw result pages (dicts) of one search, following every ``next`` link."""
        client = self.client()
        search = client.search(
            collections=[collection], bbox=[float(v) for v in bbox],
            datetime=f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z",
            limit=self.page_size)
        yield from search.pages_as_dicts()

    def search_items(self, collection: str, bbox: Bbox, start: dt.date, end: dt.date) -> Iterator[dict]:
        start, end = as_date(start), as_date(end)
        seen: set[str] = set()
        for a, b in date_chunks(start, end, self.chunk_days):
            for page in self.search_pages(collection, bbox, a, b):
                for feat in page.get("features") or []:
                    iid = str(feat.get("id"))
                    if iid in seen:
                        continue
                    seen.add(iid)
                    item = normalise_item(feat, self.name)
                    if item["datetime"] is None or not (start <= as_date(item["datetime"]) <= end):
                        continue  # a server that is loose with datetime: filter here too
                    yield item

    def sign(self, href: str) -> str:
        return self._signer.sign(href) if self._signer is not None else href

    def resign(self, href: str) -> str:
        return self._signer.resign(href) if self._signer is not None else href

    def read_lr(self, row: Mapping, grid, profile, ctx: ReadContext) -> LRImage:
        """The Sentinel-2 composite of the row's COG windows (:class:`gl10m.sources.cog.CogReader`)."""
        from gl10m.sources.cog import CogReader

        return CogReader(self.sign, self.resign).read_lr(row, grid, profile, ctx)

    def read_hr(self, row: Mapping, grid, profile, ctx: ReadContext) -> HRImage:
        """The NAIP mosaic of the row's COG windows (:class:`gl10m.sources.cog.CogReader`)."""
        from gl10m.sources.cog import CogReader

        return CogReader(self.sign, self.resign).read_hr(row, grid, profile, ctx)


def provider_from_profile(profile, *, stac_url: str | None = None) -> Provider:
    """The provider a profile names (``provider.name``), optionally pointed at another STAC URL."""
    p = profile.provider
    if p.name == "stac":
        url = stac_url or p.stac_url
        if not url:
            raise UserError("provider.stac_url is not set in the profile")
        return StacProvider(url, signing=p.signing, max_concurrency=p.max_concurrency)
    if p.name == "earthengine":
        try:
            from gl10m.sources import earthengine  # type: ignore[attr-defined]
        except ImportError:
            raise UserError("the earthengine provider is not available in this build (use provider.name: stac)") from None
        return earthengine.provider_from_profile(profile)
    raise UserError(f"unknown provider {p.name!r}")


def item_json(item: dict) -> str:
    """Stable JSON of a normalised item (for hashing and provenance)."""
    return json.dumps(item, sort_keys=True, separators=(",", ":"), default=str)
