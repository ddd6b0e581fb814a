"""The ``earthengine`` provider: GL-10M's own path, through the earthengine-api client.

Collections: Sentinel-2 ``COPERNICUS/S2_SR_HARMONIZED`` (already harmonised: Earth Engine removes
the +1000 DN offset of processing baselines >= 04.00) and NAIP ``USDA/NAIP/DOQQ``; the profile's
collection names (``imagery.s2.collection``, ``imagery.naip.collection``) map onto them.

* **Auth**: ``ee.Initialize(project=...)`` once per process (every Dask worker initialises on its
  first call), with a service-account key file (``key_file``, or ``GOOGLE_APPLICATION_CREDENTIALS``)
  or the user's stored credentials (``earthengine authenticate``). A missing project or missing
  or unreadable credentials is one line (:class:`EarthEngineError`). Credentials are never put
  in :meth:`EarthEngineProvider.describe`, logs, ledgers or sample metadata. ``url`` points the
  client at another endpoint (the testbed's stand-in, :mod:`gl10m.testbed.eeserver`).
* **catalog** (:meth:`search_items`): ``filterBounds`` + ``filterDate`` on the collection, then the
  properties of every image in batches of ``batch`` images (``toList(batch, offset)`` and one
  ``aggregate_array`` per property in one ``getInfo``), so no answer exceeds the API's limits.
  NAIP DOQQs carry no state property in Earth Engine: the catalog stage searches per state and
  labels the items with that state (``wants_state``).
* **reads** (:meth:`EarthEngineProvider.read_lr` / ``read_hr``): pixels through ``ee.data.computePixels`` (``NPY``), never
  thumbnails. LR: the plan's Sentinel-2 images (``system:index`` in the plan's ids) with
  ``CLOUDY_PIXEL_PERCENTAGE`` below the profile's threshold, each with its SCL classes masked
  (``remap`` of ``imagery.s2.scl_mask`` to 0, ``updateMask``), B4/B3/B2 resampled bilinearly,
  per-pixel median (plus the count of valid dates), on the footprint's 268 x 268 EPSG:4326 grid;
  reflectance = DN / 10000, stretched 0..0.3 like the stac path. HR: the chosen state-year's
  DOQQs (``filter`` by id, sorted by date so the newest is on top, bilinear, then ``mosaic``, not
  ``first()``), R/G/B, 2680 x 2680, requested in blocks that respect ``max_request_bytes`` and
  ``max_request_px`` and reassembled. :func:`gl10m.fetch.assemble` checks and stages them like
  the stac path's (QC, sample format); the provenance names Earth Engine asset ids and dates.
  With ``imagery.bands`` other than ``rgb`` the same expressions also select B8 and NAIP's N
  (one more band in the same requests): the median B2/B3/B4/B8 as harmonised reflectance *
  10000 (uint16) and the mosaic's R/G/B/N are the sample's extra bands. A
  permanent Earth Engine error naming a missing or unreadable asset is its typed rejection.
* **Quotas**: every call runs inside the pipeline's limiter (a concurrency cap shared by all
  workers) and is retried with backoff on "Too many requests", "Too many concurrent
  aggregations", quota/rate errors and 5xx (:mod:`gl10m.sources.retry`).
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from gl10m.errors import UserError
from gl10m.sources.base import (ASSET_CORRUPT, ASSET_MISSING, Bbox, HRImage, LRImage, Provider, ReadContext,
                                Rejection, empty_item, iso_utc)
from gl10m.sources.retry import TransientError, retry

S2_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
NAIP_COLLECTION = "USDA/NAIP/DOQQ"
S2_BANDS = ("B4", "B3", "B2")          # R, G, B
S2_NIR = "B8"                          # also read when imagery.bands is not rgb
NAIP_BANDS = ("R", "G", "B")
NAIP_NIR = "N"
S2_SCALE = 10000.0
S2_PROPS = ("system:index", "system:time_start", "system:footprint", "CLOUDY_PIXEL_PERCENTAGE", "MGRS_TILE",
            "PROCESSING_BASELINE", "PRODUCT_ID", "SENSING_ORBIT_NUMBER", "SPACECRAFT_NAME")
NAIP_PROPS = ("system:index", "system:time_start", "system:footprint")
MAX_REQUEST_BYTES = 32 * 2 ** 20       # computePixels: answers above ~32 MB are refused
MAX_REQUEST_PX = 10_000                # ... and grids above 10,000 px per side
DEFAULT_URL = "https://earthengine.googleapis.com"
_TRANSIENT = re.compile(r"too many requests|too many concurrent|rate limit|quota|resource.?exhausted|"
                        r"internal error|service unavailable|backend error|deadline|timed? ?out|"
                        r"\b(429|500|502|503|504)\b|connection (reset|refused|aborted)", re.I)


_MISSING = re.compile(r"not found|does not exist", re.I)
_CORRUPT = re.compile(r"corrupt|cannot be read|unreadable", re.I)


class EarthEngineError(UserError):
    """Earth Engine cannot be used as configured (no project, no credentials, no client)."""


def _import_ee():
    try:
        import ee  # noqa: F401
    except ImportError:
        raise EarthEngineError("the earthengine provider needs earthengine-api (pip install 'gl10m[ee]')") from None
    return ee


_INIT_LOCK = threading.Lock()
_INITIALISED: dict[str, tuple] = {}  # per process: the configuration it was initialised with


def _initialise(project: str, key_file: str | None, url: str | None) -> None:
    """``ee.Initialize`` once per process and configuration (thread-safe)."""
    cfg = (project, key_file, url)
    if _INITIALISED.get("cfg") == cfg:
        return
    ee = _import_ee()
    with _INIT_LOCK:
        if _INITIALISED.get("cfg") == cfg:
            return
        credentials: Any = None
        if key_file:
            p = Path(key_file)
            if not p.is_file():
                raise EarthEngineError(f"Earth Engine key file not found: {p}")
            try:
                email = json.loads(p.read_text()).get("client_email")
            except (OSError, ValueError):
                email = None
            if not email:
                raise EarthEngineError(f"{p}: not a service-account key (no client_email)")
            try:
                credentials = ee.ServiceAccountCredentials(email, str(p))
            except Exception as e:  # malformed key material
                raise EarthEngineError(f"{p}: unusable service-account key ({type(e).__name__})") from None
        elif url is None:
            credentials = "persistent"  # the user's stored credentials (earthengine authenticate)
        if url is not None:
            # the stand-in and other private endpoints: no data-catalog lookup on a Google URL
            ee.deprecation._FetchDataCatalogStac = lambda: {}
        try:
            kw = {"project": project}
            if url is not None:
                kw["url"] = url
            ee.Initialize(credentials=credentials, **kw)
        except ee.EEException as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "credential" in msg.lower() or "authenticate" in msg.lower():
                raise EarthEngineError("Earth Engine credentials are missing or invalid: run `earthengine "
                                       "authenticate` or set provider.key_file / GOOGLE_APPLICATION_CREDENTIALS") from None
            raise EarthEngineError(f"Earth Engine initialisation failed: {msg}") from None
        except Exception as e:  # google.auth errors, connection errors to a private endpoint
            raise EarthEngineError(f"Earth Engine initialisation failed ({type(e).__name__})") from None
        _INITIALISED["cfg"] = cfg


def _call(fn, limiter=None, retry_opts: Mapping[str, Any] | None = None):
    """Run an Earth Engine call inside the limiter, retrying quota errors and 5xx."""
    ee = _import_ee()

    def once():
        with (limiter if limiter is not None else nullcontext()):
            try:
                return fn()
            except ee.EEException as e:
                msg = str(e)
                if _TRANSIENT.search(msg):
                    raise TransientError(f"Earth Engine: {msg.splitlines()[0]}") from None
                raise
    return retry(once, **{"attempts": 6, "base_delay": 1.0, "max_delay": 60.0, **(retry_opts or {})})


def _ms_to_iso(ms) -> str | None:
    if ms is None:
        return None
    return iso_utc(dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=int(ms)))


def _geojson(fp: Any) -> dict | None:
    """An Earth Engine footprint (a GeoJSON geometry; LinearRing for image footprints) -> Polygon."""
    if not isinstance(fp, dict) or "coordinates" not in fp:
        return None
    if fp.get("type") == "LinearRing":
        return {"type": "Polygon", "coordinates": [fp["coordinates"]]}
    return {"type": fp["type"], "coordinates": fp["coordinates"]}


def _product_parts(product_id: str | None) -> tuple[str | None, str | None, str | None]:
    """``S2B_MSIL2A_20230610T183919_N0509_R070_T11SLT_...`` -> (platform, sensing time, orbit)."""
    m = re.match(r"^(S2[A-D])_MSIL2A_(\d{8}T\d{6})_N\d{4}_(R\d{3})_", product_id or "")
    return (m.group(1), m.group(2), m.group(3)) if m else (None, None, None)


def _fmt_baseline(v) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    if re.fullmatch(r"\d{4}", s):
        return f"{s[:2]}.{s[2:]}"
    return s


def s2_item(props: dict, collection: str) -> dict:
    """Earth Engine S2 image properties -> a normalised item (:mod:`gl10m.sources.base`)."""
    iid = str(props["system:index"])
    plat, when, _orbit = _product_parts(props.get("PRODUCT_ID"))
    mgrs = props.get("MGRS_TILE")
    zone = int(mgrs[:2]) if isinstance(mgrs, str) and mgrs[:2].isdigit() else None
    geom = _geojson(props.get("system:footprint"))
    lat = None
    if geom:
        lat = float(np.mean([c[1] for c in geom["coordinates"][0]]))
    epsg = (32600 if (lat is None or lat >= 0) else 32700) + zone if zone else None
    return empty_item(
        id=iid, collection=collection, provider="earthengine", datetime=_ms_to_iso(props.get("system:time_start")),
        geometry=geom, epsg=epsg, gsd=10.0, cloud_cover=props.get("CLOUDY_PIXEL_PERCENTAGE"),
        mgrs_tile=mgrs, baseline=_fmt_baseline(props.get("PROCESSING_BASELINE")),
        datatake=f"{plat}_{when}" if plat else None,  # the stac provider's key: platform + sensing time
        hrefs={b: f"ee://{S2_COLLECTION}/{iid}#{b}" for b in ("B02", "B03", "B04", "B08", "SCL")},
        properties={k: v for k, v in props.items() if k != "system:footprint"})


def naip_item(props: dict, collection: str, state: str | None) -> dict:
    iid = str(props["system:index"])
    when = _ms_to_iso(props.get("system:time_start"))
    return empty_item(
        id=iid, collection=collection, provider="earthengine", datetime=when,
        geometry=_geojson(props.get("system:footprint")), naip_state=state.upper() if state else None,
        naip_year=int(when[:4]) if when else None, hrefs={"image": f"ee://{NAIP_COLLECTION}/{iid}"},
        properties={k: v for k, v in props.items() if k != "system:footprint"})


def grid_spec(bounds: tuple[float, float, float, float], width: int, height: int,
              col0: int = 0, row0: int = 0, cols: int | None = None, rows: int | None = None) -> dict:
    """computePixels ``grid`` for the block (row0, col0, rows x cols) of a north-up EPSG:4326 grid
    of ``width x height`` pixels over ``bounds``."""
    w, s, e, n = bounds
    dx, dy = (e - w) / width, (n - s) / height
    return {"dimensions": {"width": int(cols or width), "height": int(rows or height)},
            "affineTransform": {"scaleX": dx, "shearX": 0.0, "translateX": w + col0 * dx,
                                "shearY": 0.0, "scaleY": -dy, "translateY": n - row0 * dy},
            "crsCode": "EPSG:4326"}


def blocks(width: int, height: int, bytes_per_px: int, max_bytes: int = MAX_REQUEST_BYTES,
           max_px: int = MAX_REQUEST_PX) -> list[tuple[int, int, int, int]]:
    """(row0, col0, rows, cols) blocks covering the grid, each within ``max_px`` per side and
    ``max_bytes`` (rows of full-width strips, split further only when needed)."""
    if bytes_per_px < 1 or max_bytes < bytes_per_px or max_px < 1:
        raise ValueError("blocks: bad limits")
    cols = min(width, max_px, max_bytes // bytes_per_px)
    rows = max(1, min(height, max_px, max_bytes // (bytes_per_px * cols)))
    return [(r, c, min(rows, height - r), min(cols, width - c))
            for r in range(0, height, rows) for c in range(0, width, cols)]


class EarthEngineProvider(Provider):
    """See the module doc. Picklable (for Dask): only the configuration travels."""

    name = "earthengine"
    wants_state = True

    def __init__(self, project: str | None, *, key_file: str | None = None, url: str | None = None,
                 collections: Mapping[str, str] | None = None, max_concurrency: int = 4, batch: int = 500,
                 max_request_bytes: int = MAX_REQUEST_BYTES, max_request_px: int = MAX_REQUEST_PX,
                 retry_opts: Mapping[str, Any] | None = None):
        if not project:
            raise EarthEngineError("the earthengine provider needs a Cloud project (provider.project or --ee-project)")
        self.project, self.url = str(project), url
        self.key_file = key_file or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or None
        self.collections = dict(collections or {})   # profile collection name -> EE collection id
        self.max_concurrency, self.batch = int(max_concurrency), int(batch)
        self.max_request_bytes, self.max_request_px = int(max_request_bytes), int(max_request_px)
        self.retry_opts = dict(retry_opts or {})
        self.limiter = None

    def describe(self) -> dict:
        return {"provider": self.name, "project": self.project, "url": self.url or DEFAULT_URL,
                "collections": {"s2": S2_COLLECTION, "naip": NAIP_COLLECTION}}

    def ee(self):
        _initialise(self.project, self.key_file, self.url)
        return _import_ee()

    def call(self, fn):
        return _call(fn, self.limiter, self.retry_opts)

    def kind_of(self, collection: str) -> str:
        ee_id = self.collections.get(collection, collection)
        if ee_id == S2_COLLECTION:
            return "s2"
        if ee_id == NAIP_COLLECTION:
            return "naip"
        raise EarthEngineError(f"collection {collection!r}: no Earth Engine collection for it "
                               f"(known: {S2_COLLECTION}, {NAIP_COLLECTION})")

    # -- catalog ----------------------------------------------------------------------------
    def search_items(self, collection: str, bbox: Bbox, start: dt.date, end: dt.date, *,
                     state: str | None = None) -> Iterator[dict]:
        kind = self.kind_of(collection)
        ee = self.ee()
        ee_id = S2_COLLECTION if kind == "s2" else NAIP_COLLECTION
        geom = ee.Geometry.Rectangle([float(v) for v in bbox], "EPSG:4326", False)
        col = (ee.ImageCollection(ee_id).filterBounds(geom)
               .filterDate(start.isoformat(), (end + dt.timedelta(days=1)).isoformat()))
        n = int(self.call(lambda: col.size().getInfo()))
        props = S2_PROPS if kind == "s2" else NAIP_PROPS
        for off in range(0, n, self.batch):
            part = ee.ImageCollection(col.toList(self.batch, off))
            got = self.call(lambda part=part: ee.Dictionary(
                {p: part.aggregate_array(p) for p in props}).getInfo())
            cols = [got.get(p) or [] for p in props]
            m = len(cols[0])
            if any(len(c) != m for c in cols):
                raise EarthEngineError(f"{ee_id}: properties of unequal length (an image lacks one of {props})")
            for vals in zip(*cols):
                p = dict(zip(props, vals))
                yield s2_item(p, collection) if kind == "s2" else naip_item(p, collection, state)

    # -- pixels -----------------------------------------------------------------------------
    def compute_pixels(self, image, bounds, width: int, height: int, bands: tuple[str, ...],
                       bytes_per_px: int, *, timed=None) -> np.ndarray:
        """``image`` on the EPSG:4326 grid -> float or uint8 array [len(bands), H, W], requested in
        blocks within the limits and reassembled. `timed` (``ReadContext.timed``) times the
        answers ("reads") apart from their reassembly ("ee block reassembly")."""
        ee = self.ee()
        timed = timed or (lambda part: nullcontext())
        out = None
        for r0, c0, rows, cols in blocks(width, height, bytes_per_px, self.max_request_bytes, self.max_request_px):
            req = {"expression": image, "fileFormat": "NPY", "bandIds": list(bands),
                   "grid": grid_spec(bounds, width, height, c0, r0, cols, rows)}
            with timed("reads"):
                raw = self.call(lambda req=req: ee.data.computePixels(req))
            with timed("ee block reassembly"):
                arr = np.load(io.BytesIO(raw), allow_pickle=False)
                if arr.shape != (rows, cols) or arr.dtype.names is None or set(bands) - set(arr.dtype.names):
                    raise TransientError(f"computePixels answered {arr.dtype} {arr.shape}, expected bands "
                                         f"{bands} on {rows}x{cols}")
                if out is None:
                    out = np.empty((len(bands), height, width), dtype=arr.dtype[bands[0]])
                for i, b in enumerate(bands):
                    out[i, r0:r0 + rows, c0:c0 + cols] = arr[b]
        return out

    def s2_image(self, ids: list[str], max_cloud: float, scl_mask: list[int], bands: tuple[str, ...] = S2_BANDS):
        """The LR expression: masked median of the plan's S2 images (`bands`) + the count of valid dates."""
        ee = self.ee()
        col = (ee.ImageCollection(S2_COLLECTION)
               .filter(ee.Filter.And(ee.Filter.inList("system:index", list(ids)),
                                     ee.Filter.lt("CLOUDY_PIXEL_PERCENTAGE", float(max_cloud)))))

        def mask(img):
            keep = img.select("SCL").remap(list(scl_mask), [0] * len(scl_mask), 1)
            return img.select(list(bands)).resample("bilinear").updateMask(keep)

        masked = col.map(mask)
        return masked.median().addBands(masked.select([S2_BANDS[0]]).count().rename(["n_obs"]))

    def naip_image(self, ids: list[str], bands: tuple[str, ...] = NAIP_BANDS):
        """The HR expression: the DOQQs by id, oldest first (the newest ends on top), mosaicked."""
        ee = self.ee()
        col = (ee.ImageCollection(NAIP_COLLECTION).filter(ee.Filter.inList("system:index", list(ids)))
               .sort("system:time_start"))
        return col.map(lambda img: img.select(list(bands)).resample("bilinear")).mosaic()

    # -- reads of one scene (gl10m.fetch assembles them) -------------------------------------
    def pixels_or_rejection(self, what):
        """`what()` with a permanent Earth Engine error (transient ones were retried) on an asset
        as its typed rejection; any other error propagates."""
        ee = _import_ee()
        try:
            return what()
        except ee.EEException as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = ASSET_MISSING if _MISSING.search(msg) else ASSET_CORRUPT if _CORRUPT.search(msg) else None
            if reason is None:
                raise
            rej = Rejection(reason, msg)
            rej.detail = {"error": msg}
            raise rej from None

    def read_lr(self, row: Mapping, grid, profile, ctx: ReadContext) -> LRImage:
        """The masked median of the row's Sentinel-2 images on `grid`, computed by Earth Engine,
        stretched like the stac path's (see the module doc)."""
        from gl10m import compose

        self.limiter = ctx.limiter
        s2p = profile.imagery.s2
        items = list(row["s2_items"])
        bands = S2_BANDS if profile.imagery.bands == "rgb" else (*S2_BANDS, S2_NIR)
        nb = len(bands)

        def pixels():
            img = self.s2_image([str(it["id"]) for it in items], s2p.max_cloud_pct, list(s2p.scl_mask), bands)
            return self.compute_pixels(img, grid.bounds, grid.width, grid.height, (*bands, "n_obs"), (nb + 1) * 8,
                                       timed=ctx.timed)

        px = self.pixels_or_rejection(pixels)
        extra = None
        with ctx.timed("s2 composite"):
            count = px[nb].astype(np.int32)
            refl = px[:nb].astype(np.float32) / np.float32(S2_SCALE)
            refl[:, count == 0] = np.nan
            rgb = compose.stretch(refl[:3], *s2p.stretch)
            if nb == 4:  # B2, B3, B4, B8 as harmonised reflectance * 10000
                extra = compose.reflectance_dn(refl[[2, 1, 0, 3]])
        used = [{"id": str(it["id"]), "asset": f"{S2_COLLECTION}/{it['id']}", "datetime": it.get("datetime"),
                 "baseline": it.get("baseline"), "offset_subtracted": "by Earth Engine (S2_SR_HARMONIZED)",
                 "cloud_cover": it.get("cloud_cover"), "mgrs_tile": it.get("mgrs_tile")} for it in items]
        meta = {"provider": self.name,
                "s2": {"collection": S2_COLLECTION,
                       "harmonisation": {"enabled": True, "by": f"Earth Engine {S2_COLLECTION}", "scale": S2_SCALE}}}
        return LRImage(rgb, count, len(used), {"items": used, "excluded": []}, meta, extra=extra)

    def read_hr(self, row: Mapping, grid, profile, ctx: ReadContext) -> HRImage:
        """The mosaic of the row's NAIP DOQQs on `grid`, computed by Earth Engine."""
        self.limiter = ctx.limiter
        items = list(row["naip_items"])
        bands = NAIP_BANDS if profile.imagery.bands == "rgb" else (*NAIP_BANDS, NAIP_NIR)

        def pixels():
            img = self.naip_image([str(it["id"]) for it in items], bands)
            return self.compute_pixels(img, grid.bounds, grid.width, grid.height, bands, len(bands), timed=ctx.timed)

        hr = self.pixels_or_rejection(pixels)
        with ctx.timed("naip mosaic"):
            hr = hr.astype(np.uint8, copy=False)
            covered = (hr[0] | hr[1] | hr[2]) != 0
            full = np.moveaxis(hr, 0, -1)  # [H, W, bands], a view: the tiles are cut from it in one copy
            mosaic = full[..., :3]
        info = {"items": [{"id": str(it["id"]), "asset": f"{NAIP_COLLECTION}/{it['id']}",
                           "datetime": it.get("datetime")} for it in items]}
        meta = {"naip": {"collection": NAIP_COLLECTION,
                         "mosaic": "ImageCollection.mosaic of the DOQQs sorted by date (newest on top)"}}
        return HRImage(mosaic, covered, info, meta, extra=full if len(bands) == 4 else None)


def provider_from_profile(profile, **over) -> EarthEngineProvider:
    p = profile.provider
    im = profile.imagery
    kw = {"project": getattr(p, "project", None), "key_file": getattr(p, "key_file", None),
          "url": getattr(p, "ee_url", None), "max_concurrency": p.max_concurrency,
          "collections": {im.s2.collection: S2_COLLECTION, im.naip.collection: NAIP_COLLECTION}}
    kw.update({k: v for k, v in over.items() if v is not None})
    return EarthEngineProvider(**kw)
