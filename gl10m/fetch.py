"""The fetch step: one plan row (one scene) -> one staged sample, or a typed rejection.

``fetch_scene(row, profile, workdir)`` reads every selected Sentinel-2 granule's B04/B03/B02 and
SCL windows and every NAIP quarter-quad of the chosen state-year over the scene footprint,
composes the LR image and the HR mosaic (:mod:`gl10m.compose`), checks them (:mod:`gl10m.qc`)
and writes the staged sample (:mod:`gl10m.samples`) with its full provenance.

Outcomes:

* ``ok``: the sample is at ``W/staged/{split}/{key}/`` (``FetchOutcome.path``);
* ``rejected`` with a reason (deterministic; the ledger records ``rejected:<reason>``):
  ``asset_missing`` (HTTP 404/410 or a missing file), ``asset_corrupt`` (unreadable or
  truncated COG: the same read failure twice; a NAIP image without R, G, B bands; a raster
  without CRS or geotransform, or whose CRS contradicts the item's ``proj:epsg``), ``s2_masked`` (no usable S2
  item, or an LR black ratio >= ``qc.max_black_ratio``; pixels without any valid observation
  after SCL masking are black), ``hr_black`` (HR tiles at or above that ratio, listed in the
  detail), ``naip_gap`` (no quarter-quad covers any of the footprint; pixels a partial mosaic leaves
  uncovered stay black and the black-pixel QC decides, as in GL-10M);
* an exception for transient trouble (HTTP 429/5xx, timeouts, refused connections after the
  retries; a 403 that survives re-signing): the pipeline records ``failed:<error>`` and a
  later run tries again.

Reads: hrefs in the plan are unsigned; ``sign(href)`` is called right before each open and
``resign(href)`` (default: ``sign``) once more after an HTTP 403. Each asset open+read runs
inside ``limiter`` (a context manager, e.g. a ``distributed.Semaphore`` per provider, capping
concurrent requests across all Dask workers) and inside ``rasterio.Env(**gdal_http_env())``.
Transient errors are retried with exponential backoff and full jitter, honouring Retry-After
(:func:`gl10m.sources.retry.retry`). GDAL caches a failed ``/vsicurl/`` answer per URL, so the
cache entry of a URL is dropped after each failure before trying again.

Two things GDAL hides are recovered here. GDAL's own HTTP retries ignore ``Retry-After`` and
its error names only the status, so after a 429/503 the server is asked once more (a one-byte
ranged GET) for the ``Retry-After`` to honour. And GDAL accepts a body cut short by a dropped
connection as if the file were that short: the read fails like a truncated COG ("got N bytes,
expected M"). A truncated file fails the same way every time, a dropped transfer differently
(N is where the connection broke), so a read is called corrupt only when it fails with the same
error twice; until then a failure that looks like corruption is retried like a transient one.
The same holds for what the reader finds wrong in a dataset it opened over HTTP (no
georeferencing, too few bands): a transfer cut inside the TIFF header opens as a TIFF without its
GeoTIFF tags, so such a finding is confirmed on a fresh read before the asset is rejected.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from gl10m import __version__, compose, qc, samples
from gl10m.errors import redact as _redact_urls
from gl10m.sources.retry import (RETRY_STATUSES, TransientError, is_transient, parse_retry_after, retry,
                                 unit_budget)

OK, REJECTED = "ok", "rejected"
ASSET_MISSING = "asset_missing"
ASSET_CORRUPT = "asset_corrupt"
S2_MASKED = "s2_masked"
HR_BLACK = "hr_black"
NAIP_GAP = "naip_gap"
REASONS = (ASSET_MISSING, ASSET_CORRUPT, S2_MASKED, HR_BLACK, NAIP_GAP)
S2_RGB = ("B04", "B03", "B02")  # R, G, B
ROW_FIELDS = ("key", "scene_id", "state", "split", "west", "south", "east", "north", "concepts",
              "tile_idx", "tile_concept", "tile_frac", "naip_year", "naip_date", "naip_items",
              "s2_window", "s2_start", "s2_end", "s2_items")
# retried within a time budget per scene (UNIT_BUDGET_S, shared by all its reads), not a count
DEFAULT_RETRY = {"attempts": None, "base_delay": 0.5, "max_delay": 10.0}
UNIT_BUDGET_S = 300.0


def identity(href: str) -> str:
    """The default signer: hrefs are read as they are."""
    return href


@dataclass(frozen=True)
class FetchOutcome:
    status: str                      # "ok" | "rejected"
    reason: str | None = None        # one of REASONS when rejected
    detail: dict = field(default_factory=dict)
    path: Path | None = None         # the staged sample folder when ok

    @property
    def label(self) -> str:
        return self.status if not self.reason else f"{self.status}:{self.reason}"


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


# ---------------------------------------------------------------------------------------------
# Reading one asset: sign, limit, open, classify errors, retry
# ---------------------------------------------------------------------------------------------
_QUERY = re.compile(r"\?[^\s'\"]*")
_HTTP_CODE = re.compile(r"HTTP (?:response )?code:?\s*(\d{3})", re.I)


def redact(text: str) -> str:
    """Drop query strings (signatures, tokens) and ``user:password@`` from URLs in a message."""
    return _QUERY.sub("?<redacted>", _redact_urls(str(text)))


def _is_http(href: str) -> bool:
    return href.startswith(("http://", "https://"))


@functools.lru_cache(maxsize=1)
def _clear_cache_fn() -> Callable[[bytes], None] | None:
    """GDAL's ``VSICurlPartialClearCache`` from the libgdal rasterio uses, or None."""
    import rasterio

    here = os.path.dirname(rasterio.__file__)
    cands = sorted(glob.glob(os.path.join(here, os.pardir, "rasterio.libs", "libgdal*")))
    cands += [p for p in (ctypes.util.find_library("gdal"),) if p]
    for path in cands:
        try:
            fn = ctypes.CDLL(path).VSICurlPartialClearCache
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_char_p]
        fn.restype = None
        return fn
    return None


def forget_url(url: str) -> None:
    """Drop GDAL's cached state (existence, size, blocks) of a remote `url`."""
    fn = _clear_cache_fn()
    if fn is not None and _is_http(url):
        fn(("/vsicurl/" + url).encode())


def _probe(url: str) -> tuple[int | None, float | None]:
    """(HTTP status, Retry-After) of a one-byte ranged GET; (None, None) when it cannot connect."""
    import requests

    try:
        r = requests.get(url, headers={"Range": "bytes=0-0"}, timeout=(10, 30), stream=True)
        r.close()
        return r.status_code, parse_retry_after(r.headers.get("Retry-After"))
    except requests.RequestException:
        return None, None


def _error_text(exc: BaseException) -> str:
    """The messages of `exc` and of the errors it wraps, one line, without query strings."""
    texts, e, seen = [], exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    return redact(" | ".join(texts))


def _classify(exc: BaseException, url: str) -> tuple[str, int | None, float | None]:
    """('missing' | 'forbidden' | 'transient' | 'corrupt', status, retry_after) of a read error."""
    text = _error_text(exc)
    m = _HTTP_CODE.search(text)
    status, retry_after = (int(m.group(1)) if m else None), None
    if status is None and _is_http(url):
        if is_transient(exc):
            return "transient", None, None
        status, retry_after = _probe(url)  # GDAL said "read failed": ask the server itself
        if status is None:
            return "transient", None, None
    if status is None:  # a local file
        return ("corrupt" if os.path.exists(url) else "missing"), None, None
    if status in (404, 410):
        return "missing", status, None
    if status in (401, 403):
        return "forbidden", status, None
    if status in RETRY_STATUSES or status >= 500:
        if retry_after is None and status in (429, 503) and _is_http(url):
            _, retry_after = _probe(url)  # GDAL's error drops the headers: ask for Retry-After
        return "transient", status, retry_after
    if 200 <= status < 300 or status == 416:
        return "corrupt", status, None
    return "missing", status, None


def read_asset(href: str, fn: Callable[[Any], Any], *, item: str, asset: str,
               sign: Callable[[str], str] = identity, resign: Callable[[str], str] | None = None,
               limiter: Any = None, gdal_env: Mapping[str, Any] | None = None,
               retry_opts: Mapping[str, Any] | None = None) -> Any:
    """Open `href` (signed right before) and return ``fn(dataset)``.

    Raises :class:`Rejection` (asset_missing / asset_corrupt), :class:`AccessDenied`, or
    :class:`TransientError` once the retries are spent.
    """
    import rasterio
    from rasterio.errors import RasterioError

    try:
        from rasterio._err import CPLE_BaseError
    except ImportError:  # pragma: no cover
        CPLE_BaseError = RasterioError
    from gl10m.sources.gdalenv import gdal_http_env

    resign = resign or sign
    env = gdal_http_env(gdal_env)
    lim = limiter if limiter is not None else contextlib.nullcontext()
    where = {"item": item, "asset": asset}
    suspects: set[str] = set()  # errors of the reads that looked corrupt (kept across retries)

    def once():
        url = sign(href)
        for attempt in range(2):  # a second try after a 403 (re-signed) or a suspected corrupt read
            try:
                with lim, rasterio.Env(**env):
                    with rasterio.open(url) as ds:
                        return fn(ds)
            except Rejection as r:
                # what `fn` found wrong in an opened dataset (no georeferencing, too few bands):
                # over HTTP a transfer cut inside the header opens as a TIFF without its GeoTIFF
                # tags, so it is suspect like a corrupt-looking read: the same finding twice (on
                # a fresh read) is the file, once is the transfer
                if r.reason != ASSET_CORRUPT or not _is_http(url):
                    raise
                forget_url(url)
                text = f"{r.reason}: {r}"
                if text in suspects:
                    raise
                suspects.add(text)
                if attempt == 0:
                    continue
                raise TransientError(f"{item} {asset}: {r} (on one read only: retrying)") from None
            except (RasterioError, CPLE_BaseError) as exc:
                forget_url(url)
                kind, status, retry_after = _classify(exc, url)
                msg = f"{item} {asset}: {redact(exc)}"
                if kind == "forbidden":
                    if attempt == 0:
                        url = resign(href)
                        continue
                    raise AccessDenied(f"{msg} (HTTP {status} after re-signing)") from None
                if kind == "missing":
                    raise Rejection(ASSET_MISSING, msg, status=status, **where) from None
                if kind == "transient":
                    raise TransientError(msg, retry_after=retry_after, status=status) from None
                # looks corrupt: the same failure twice is the file, a new one the transfer (a
                # connection dropped mid-body reads as a truncated file, cut somewhere else each time)
                text = _error_text(exc)
                if text in suspects:
                    raise Rejection(ASSET_CORRUPT, msg, status=status, **where) from None
                suspects.add(text)
                if attempt == 0:
                    continue
                raise TransientError(f"{msg} (unreadable, differently each time: retrying)", status=status) from None
        raise AssertionError("unreachable")  # pragma: no cover

    opts = {**DEFAULT_RETRY, **(retry_opts or {})}
    if opts.get("budget") is None and opts["attempts"] is None:
        opts["budget"] = unit_budget(UNIT_BUDGET_S)
    return retry(once, retry_on=lambda e: isinstance(e, TransientError), **opts)


# ---------------------------------------------------------------------------------------------
# What is read from each dataset (inside the limiter; CPU work happens outside it)
# ---------------------------------------------------------------------------------------------
def _check_georef(ds, epsg: Any, item: str, asset: str) -> None:
    """Reject an asset whose georeferencing cannot be trusted: no CRS or no geotransform, or a CRS
    that contradicts the item's ``proj:epsg`` (one of the two is wrong, so the pixels may land in
    the wrong place). A CRS without an EPSG equivalent is not second-guessed."""
    from affine import Affine

    if ds.crs is None or ds.transform == Affine.identity():
        raise Rejection(ASSET_CORRUPT, f"{item} {asset}: not georeferenced (no CRS or no geotransform)",
                        item=item, asset=asset)
    if epsg is None or (isinstance(epsg, float) and np.isnan(epsg)):
        return
    code = ds.crs.to_epsg()
    if code is not None and int(code) != int(epsg):
        raise Rejection(ASSET_CORRUPT, f"{item} {asset}: raster CRS EPSG:{code} contradicts the item's "
                        f"proj:epsg {int(epsg)}", item=item, asset=asset, raster_epsg=int(code), item_epsg=int(epsg))


def _window_reader(grid: compose.Grid, indexes, *, need_rgb: bool = False, item: str = "", asset: str = "",
                   epsg: Any = None):
    def fn(ds):
        _check_georef(ds, epsg, item, asset)
        if need_rgb and ds.count < 3:
            raise Rejection(ASSET_CORRUPT, f"{item} {asset}: {ds.count} band(s), needs R, G, B",
                            item=item, asset=asset)
        win = compose.source_window(ds, grid.bounds)
        if win is None:
            return None
        data = ds.read(indexes, window=win)
        masks = None
        if need_rgb:
            from rasterio.enums import MaskFlags

            if any(MaskFlags.all_valid not in f for f in ds.mask_flag_enums[:3]):
                masks = ds.read_masks(indexes, window=win)
        return data, masks, ds.window_transform(win), ds.crs
    return fn


def _json_list(v: Any, what: str) -> list:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan row {what} is not valid JSON ({e})") from None
    if not isinstance(v, list):
        raise ValueError(f"plan row {what} must be a JSON list")
    return v


def _check_row(row: Mapping) -> None:
    missing = [k for k in ROW_FIELDS if k not in row]
    if missing:
        raise ValueError(f"plan row {row.get('key', '?')} lacks field(s) {', '.join(missing)}")
    samples.check_key(str(row["key"]))


# ---------------------------------------------------------------------------------------------
# LR and HR
# ---------------------------------------------------------------------------------------------
def _compose_lr(s2_items: list[dict], profile, grid: compose.Grid, read) -> tuple[np.ndarray, dict]:
    s2p = profile.imagery.s2
    obs, used, excluded = [], [], []
    for it in s2_items:
        iid = str(it["id"])
        try:
            offset = compose.offset_for(it.get("baseline"), profile)
        except ValueError as e:
            excluded.append({"id": iid, "datetime": it.get("datetime"), "why": str(e)})
            continue
        hrefs = it.get("hrefs") or {}
        for band in (*S2_RGB, "SCL"):
            if not hrefs.get(band):
                raise Rejection(ASSET_MISSING, f"{iid} {band}: no href in the plan", item=iid, asset=band)
        epsg = it.get("epsg")
        scl_got = read(hrefs["SCL"], _window_reader(grid, 1, item=iid, asset="SCL", epsg=epsg), iid, "SCL")
        bands = []
        for band in S2_RGB:
            got = read(hrefs[band], _window_reader(grid, 1, item=iid, asset=band, epsg=epsg), iid, band)
            if got is None or scl_got is None:
                bands.append(np.full(grid.shape, np.nan, np.float32))
                continue
            dn, _, tr, crs = got
            refl = compose.harmonise(dn, it.get("baseline"), profile)
            native = compose.scl_to_band_grid(scl_got[0], scl_got[2], dn.shape, tr, crs)
            compose.mask_native(refl, native, s2p.scl_mask)
            bands.append(compose.warp_reflectance(refl, tr, crs, grid))
        scl = (np.zeros(grid.shape, np.uint8) if scl_got is None
               else compose.warp_scl(scl_got[0], scl_got[2], scl_got[3], grid))
        obs.append((np.stack(bands), scl))
        used.append({"id": iid, "datetime": it.get("datetime"), "baseline": it.get("baseline"),
                     "offset_subtracted": offset, "cloud_cover": it.get("cloud_cover"),
                     "mgrs_tile": it.get("mgrs_tile"), "epsg": it.get("epsg"),
                     "scl": qc.scl_stats(scl, s2p.scl_mask)})
    info = {"items": used, "excluded": excluded}
    if not obs:
        raise Rejection(S2_MASKED, "no usable Sentinel-2 item", **info)
    rgb, count = compose.s2_composite(obs, s2p.scl_mask, tuple(s2p.stretch))
    return check_lr(rgb, count, len(obs), profile, info), info


def check_lr(rgb: np.ndarray, count: np.ndarray, n_dates: int, profile, info: dict) -> np.ndarray:
    """The LR QC shared by every provider: composite statistics and the black-pixel ratio into
    `info`; an ``s2_masked`` rejection at or above ``qc.max_black_ratio``. As in GL-10M (a masked
    median), LR pixels without any valid observation are black (0) and this check decides; a fully
    masked footprint fails it."""
    info["composite"] = qc.composite_stats(count, n_dates)
    info["black_ratio"] = round(qc.black_ratio(rgb, profile.qc.black_level), 6)
    if info["black_ratio"] >= profile.qc.max_black_ratio:
        raise Rejection(S2_MASKED, f"LR black ratio {info['black_ratio']:.3f} >= {profile.qc.max_black_ratio}", **info)
    return rgb


def _compose_hr(naip_items: list[dict], profile, grid: compose.Grid, read) -> tuple[np.ndarray, dict]:
    if not naip_items:
        raise Rejection(NAIP_GAP, "no NAIP item in the plan row", uncovered=1.0)
    # priority: newest first, then id (deterministic); each fills the others' holes
    order = sorted(naip_items, key=lambda it: str(it["id"]))
    order = sorted(order, key=lambda it: str(it.get("datetime") or ""), reverse=True)  # stable
    used: list[dict] = []

    def layers():
        for it in order:
            iid = str(it["id"])
            if not it.get("href"):
                raise Rejection(ASSET_MISSING, f"{iid} image: no href in the plan", item=iid, asset="image")
            got = read(it["href"], _window_reader(grid, list(compose.RGB_BANDS), need_rgb=True,
                                                  item=iid, asset="image", epsg=it.get("epsg")), iid, "image")
            used.append({"id": iid, "datetime": it.get("datetime"), "epsg": it.get("epsg"), "gsd": it.get("gsd"),
                         "overlaps": got is not None})
            if got is None:
                continue
            rgb, masks, tr, crs = got
            # warp only onto the part of the HR grid this quarter-quad's window can reach
            from rasterio.transform import array_bounds
            from rasterio.warp import transform_bounds

            src_b = transform_bounds(crs, compose.WGS84, *array_bounds(rgb.shape[1], rgb.shape[2], tr), densify_pts=21)
            sub = compose.sub_grid(grid, src_b)
            if sub is None:
                continue
            g, r0, c0 = sub
            yield compose.warp_naip(rgb, compose.naip_valid(rgb, masks), tr, crs, g), r0, c0

    try:
        mosaic, covered = compose.mosaic(layers(), grid.shape)
    except ValueError:  # no layer overlapped
        mosaic, covered = np.zeros((*grid.shape, 3), np.uint8), np.zeros(grid.shape, bool)
    info: dict = {"items": used}
    return check_hr(mosaic, covered, profile, info), info


def check_hr(mosaic: np.ndarray, covered: np.ndarray, profile, info: dict) -> np.ndarray:
    """The HR QC shared by every provider: the HR mosaic [H, W, 3] and its coverage -> tiles, with
    ``uncovered`` and the per-tile black ratios in `info`; ``naip_gap`` when nothing covers the
    footprint, ``hr_black`` for tiles at or above ``qc.max_black_ratio``. As in GL-10M, pixels no
    image covers stay black (0) and the black-pixel QC decides: a tile with too many of them fails
    as hr_black; a sliver along an edge does not."""
    gap = 1.0 - np.count_nonzero(covered) / covered.size
    info["uncovered"] = round(gap, 6)
    if gap >= 1.0:
        raise Rejection(NAIP_GAP, "no NAIP image covers any of the HR footprint", **info)
    tiles = compose.cut_tiles(mosaic, profile.geometry.grid)
    ratios = qc.black_ratios(tiles, profile.qc.black_level)
    info["black_ratios"] = [round(float(r), 4) for r in ratios]
    info["black_ratio_max"] = round(float(ratios.max()), 6)
    bad = qc.failing_tiles(ratios, profile.qc.max_black_ratio)
    if bad:
        raise Rejection(HR_BLACK, f"{len(bad)} HR tile(s) with black ratio >= {profile.qc.max_black_ratio}",
                        tiles=bad, **info)
    return tiles


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def build_meta(row: Mapping, profile, lr_grid: compose.Grid, hr_grid: compose.Grid, lr: dict, hr: dict) -> dict:
    s2p = profile.imagery.s2
    g = profile.geometry
    concepts = sorted({int(c) for c in row["concepts"]})
    lr_m, hr_m = compose.ground_px_m(lr_grid), compose.ground_px_m(hr_grid)
    return {
        "key": str(row["key"]), "scene_id": str(row["scene_id"]), "state": str(row["state"]),
        "split": str(row["split"]),
        "footprint": {"west": float(row["west"]), "south": float(row["south"]),
                      "east": float(row["east"]), "north": float(row["north"])},
        "crs": "EPSG:4326",
        "lr": {"width": lr_grid.width, "height": lr_grid.height, "px_deg": list(lr_grid.px_deg),
               "px_m_x": round(lr_m[0], 4), "px_m_y": round(lr_m[1], 4), "bands": list(S2_RGB)},
        "hr": {"width": hr_grid.width, "height": hr_grid.height, "px_deg": list(hr_grid.px_deg),
               "px_m_x": round(hr_m[0], 4), "px_m_y": round(hr_m[1], 4), "bands": ["R", "G", "B"],
               "grid": g.grid, "tile_px": g.tile_px,
               "tile_index": "row*grid + col, row 0 = north, col 0 = west"},
        "concepts": [profile.concepts[c].name for c in concepts],
        "concept_ids": concepts,
        "naip": {"year": int(row["naip_year"]), "date": str(row["naip_date"]), "items": hr["items"],
                 "resampling": "bilinear", "mosaic": "newest first, first valid pixel wins"},
        "s2": {"window": str(row["s2_window"]), "start": str(row["s2_start"]), "end": str(row["s2_end"]),
               "items": lr["items"], "excluded": lr["excluded"],
               "harmonisation": {"enabled": bool(s2p.harmonize), "offset": int(s2p.offset),
                                 "offset_baseline": s2p.offset_baseline, "scale": compose.S2_SCALE,
                                 "rule": "subtract offset when processing baseline >= offset_baseline (item metadata)"},
               "scl_mask": list(s2p.scl_mask), "composite": "per-pixel median of unmasked dates",
               "resampling": {"reflectance": "bilinear", "scl": "nearest"},
               "stretch": list(s2p.stretch)},
        "qc": {"black_level": profile.qc.black_level, "max_black_ratio": profile.qc.max_black_ratio,
               "lr_black_ratio": lr["black_ratio"], "s2_composite": lr["composite"],
               "hr_black_ratio_max": hr["black_ratio_max"], "hr_black_ratios": hr["black_ratios"]},
        "provider": str(row.get("provider") or profile.provider.name),
        "plan_hash": str(row.get("plan_hash") or ""),
        "profile": {"name": profile.name, "version": profile.version, "hash": profile.hash()},
        "builder": {"name": "gl10m", "version": __version__},
    }


def fetch_scene(row: Mapping, profile, out_root: str | Path, *, sign: Callable[[str], str] = identity,
                resign: Callable[[str], str] | None = None, limiter: Any = None,
                gdal_env: Mapping[str, Any] | None = None,
                retry_opts: Mapping[str, Any] | None = None) -> FetchOutcome:
    """Fetch, compose, check and stage one scene (see the module docstring).

    `out_root` is the work dir W (the sample goes to ``W/staged/{split}/{key}/``). `gdal_env`
    overrides GDAL options; `retry_opts` overrides ``attempts``/``base_delay``/``max_delay``/
    ``budget`` (default: every read of the scene retries transient errors within one
    :class:`~gl10m.sources.retry.Budget` of UNIT_BUDGET_S seconds, or ``$GL10M_RETRY_BUDGET_S``).
    Raises ValueError for a malformed row, TransientError / AccessDenied for transient trouble.
    """
    retry_opts = {"budget": unit_budget(UNIT_BUDGET_S), **(retry_opts or {})}
    _check_row(row)
    bounds = (float(row["west"]), float(row["south"]), float(row["east"]), float(row["north"]))
    lrg, hrg = compose.lr_grid(bounds, profile), compose.hr_grid(bounds, profile)
    s2_items = _json_list(row["s2_items"], "s2_items")
    naip_items = _json_list(row["naip_items"], "naip_items")

    def read(href, fn, item, asset):
        return read_asset(href, fn, item=item, asset=asset, sign=sign, resign=resign, limiter=limiter,
                          gdal_env=gdal_env, retry_opts=retry_opts)

    try:
        lr_rgb, lr_info = _compose_lr(s2_items, profile, lrg, read)
        tiles, hr_info = _compose_hr(naip_items, profile, hrg, read)
    except Rejection as r:
        return FetchOutcome(REJECTED, r.reason, _clean(r.detail))
    return stage_sample(row, profile, out_root, lr_rgb, tiles, build_meta(row, profile, lrg, hrg, lr_info, hr_info),
                        lr_info, hr_info)


def stage_sample(row: Mapping, profile, out_root: str | Path, lr_rgb: np.ndarray, tiles: np.ndarray, meta: dict,
                 lr_info: dict, hr_info: dict) -> FetchOutcome:
    """Write the checked LR image and HR tiles of a plan row as its staged sample -> ``ok``."""
    n = profile.n_concepts
    sample = samples.Sample(
        key=str(row["key"]), split=str(row["split"]), lr=lr_rgb, hr=tiles,
        labels=samples.labels_from_concepts(row["concepts"], n),
        tile_frac=samples.dense_tile_frac(list(row["tile_idx"]), list(row["tile_concept"]), list(row["tile_frac"]),
                                          n, profile.geometry.grid ** 2),
        meta=meta)
    path = samples.write_staged(out_root, sample)
    detail = {"lr_black_ratio": lr_info["black_ratio"], "hr_black_ratio_max": hr_info["black_ratio_max"],
              "s2_items": len(lr_info["items"]), "s2_excluded": len(lr_info["excluded"]),
              "naip_items": len(hr_info["items"]), "s2_min_obs": lr_info["composite"]["min_obs"]}
    return FetchOutcome(OK, None, detail, path)


def _clean(detail: dict) -> dict:
    """JSON-safe detail without signed URLs."""
    return json.loads(redact(json.dumps(detail, default=str)))
