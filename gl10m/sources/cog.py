"""Reading Sentinel-2 and NAIP COGs over HTTP (``/vsicurl/``) or from files: the pixels of the
STAC provider (:class:`CogReader`, used by :class:`gl10m.sources.stac.StacProvider`).

:meth:`CogReader.read_lr` reads every selected Sentinel-2 granule's B04/B03/B02 (and B08 when the
profile's ``imagery.bands`` is not ``rgb``) and SCL windows over the footprint and composes the
LR image (:mod:`gl10m.compose`: harmonise, mask, warp, median, stretch; the extra bands as
harmonised reflectance); :meth:`CogReader.read_hr` reads every NAIP quarter-quad of the chosen
state-year (bands 1-3, and 4 when ``imagery.bands`` asks) and mosaics it onto the HR grid. QC and
staging are :mod:`gl10m.fetch`'s.

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
import os
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from gl10m import compose, qc
from gl10m.sources.base import (ASSET_CORRUPT, ASSET_MISSING, S2_MASKED, AccessDenied, HRImage, LRImage, ReadContext,
                                Rejection, redact)
from gl10m.sources.retry import (RETRY_STATUSES, TransientError, is_transient, parse_retry_after, retry,
                                 unit_budget)

S2_RGB = ("B04", "B03", "B02")  # R, G, B
S2_NIR = "B08"  # read too when imagery.bands is not rgb
# retried within a time budget per scene (UNIT_BUDGET_S, shared by all its reads), not a count
DEFAULT_RETRY = {"attempts": None, "base_delay": 0.5, "max_delay": 10.0}
UNIT_BUDGET_S = 300.0
IO_THREADS = 4  # concurrent asset reads per scene (each inside the provider's limiter)
_HTTP_CODE = re.compile(r"HTTP (?:response )?code:?\s*(\d{3})", re.I)


def identity(href: str) -> str:
    """The default signer: hrefs are read as they are."""
    return href


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
        if need_rgb and ds.count < (3 if indexes == list(compose.RGB_BANDS) else 4):
            need = "R, G, B" if indexes == list(compose.RGB_BANDS) else "R, G, B, N"
            raise Rejection(ASSET_CORRUPT, f"{item} {asset}: {ds.count} band(s), needs {need}",
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



class _Pools:
    """The I/O pools of one calling thread (by size), in the process that made them."""

    def __init__(self):
        self.pid = os.getpid()
        self.by_size: dict[int, ThreadPoolExecutor] = {}


_POOLS = threading.local()


def io_pool(threads: int) -> ThreadPoolExecutor:
    """The calling thread's own pool of `threads` I/O threads, kept from one scene to the next.

    A thread that starts for one batch of reads and ends with it starts cold in GDAL every time
    (its own ``/vsicurl/`` connections and per-thread state): on the bench's scenes that cost about
    0.06 CPU seconds a scene more than threads that live on (0.19 against 0.13; one thread reading
    alone, 0.11). One pool per calling thread, so scenes fetched at once by the threads of one
    process still read `threads` assets each at a time; it is shut down when its thread ends, and
    a process forked from one that had pools makes its own."""
    pools = getattr(_POOLS, "pools", None)
    if pools is None or pools.pid != os.getpid():
        pools = _POOLS.pools = _Pools()
    ex = pools.by_size.get(threads)
    if ex is None:
        ex = pools.by_size[threads] = ThreadPoolExecutor(threads, thread_name_prefix="gl10m-read")
        weakref.finalize(pools, ex.shutdown, wait=False)
    return ex


class CogReader:
    """The pixels of plan rows read from their COG hrefs: ``sign(href)`` right before each open,
    ``resign(href)`` (default: ``sign``) once more after an HTTP 403.

    The assets of one scene are read concurrently, by up to `io_threads` threads (each read
    still holds the limiter, so the provider's cap on concurrent requests holds); the results
    are used in plan order, each as soon as it and those before it are in (a Sentinel-2 date is
    warped, a NAIP window warped and mosaicked, while later ones are still read), and the first
    failure in that order is the outcome, as if the reads had been made one after the other. A
    limiter is entered once in the calling thread first, so one that binds to the calling
    context on first use (``distributed.Semaphore`` in a Dask task) is bound before the threads
    share it; then every read of the batch runs in the calling thread's pool (:func:`io_pool`,
    kept from scene to scene; the two NAIP quarter-quads of a scene at once). GDAL's
    ``/vsicurl/`` cache is the process's, shared by the threads."""

    def __init__(self, sign: Callable[[str], str] = identity, resign: Callable[[str], str] | None = None, *,
                 io_threads: int = IO_THREADS):
        self.sign, self.resign = sign, resign or sign
        self.io_threads = max(1, int(io_threads))

    def _gather(self, ctx: ReadContext, jobs: list[tuple]) -> Iterator:
        """``read_asset`` of each (href, fn, item, asset) job -> its results in job order, each
        yielded as soon as it and every job before it are read, so the caller composes the
        first assets while the others are still being read; the first failure in job order is
        raised when it is reached (later ones are dropped). Closing the iterator early cancels
        the reads not yet started. Time spent waiting on a read counts as "reads"."""
        def one(job):
            href, fn, item, asset = job
            return read_asset(href, fn, item=item, asset=asset, sign=self.sign, resign=self.resign,
                              limiter=ctx.limiter, gdal_env=ctx.gdal_env, retry_opts=ctx.retry_opts)

        if self.io_threads == 1 or len(jobs) <= 1:
            for job in jobs:
                with ctx.timed("reads"):
                    got = one(job)
                yield got
            return
        if ctx.limiter is not None:
            # bound in the calling thread before the pool's threads share it: a
            # distributed.Semaphore finds its Dask worker from the task's thread only
            with ctx.limiter:
                pass
        ex = io_pool(self.io_threads)
        futures = [ex.submit(one, j) for j in jobs]
        try:
            for k in range(len(futures)):
                with ctx.timed("reads"):
                    got = futures[k].result()
                futures[k] = None  # the caller holds the window only as long as it needs it
                yield got
        finally:  # closed early (a failure): the reads not started are dropped, none outlives the batch
            wait([f for f in futures if f is not None and not f.cancel()])

    def read_lr(self, row: Mapping, grid: compose.Grid, profile, ctx: ReadContext) -> LRImage:
        return _compose_lr(list(row["s2_items"]), profile, grid, lambda jobs: self._gather(ctx, jobs), ctx.timed)

    def read_hr(self, row: Mapping, grid: compose.Grid, profile, ctx: ReadContext) -> HRImage:
        return _compose_hr(list(row["naip_items"]), profile, grid, lambda jobs: self._gather(ctx, jobs), ctx.timed)


# ---------------------------------------------------------------------------------------------
# LR and HR
# ---------------------------------------------------------------------------------------------
def _drain(results: Iterator) -> None:
    """Read every result of `results` (raising the first failure among them)."""
    for _ in results:
        pass


def _compose_lr(s2_items: list[dict], profile, grid: compose.Grid, gather, timed) -> LRImage:
    s2p = profile.imagery.s2
    bands = (*S2_RGB, S2_NIR) if profile.imagery.bands != "rgb" else S2_RGB
    nb = len(bands)
    jobs, plan, excluded, missing = [], [], [], None
    for it in s2_items:  # what to read, in plan order, up to the first href the plan lacks
        iid = str(it["id"])
        try:
            offset = compose.offset_for(it.get("baseline"), profile)
        except ValueError as e:
            excluded.append({"id": iid, "datetime": it.get("datetime"), "why": str(e)})
            continue
        hrefs = it.get("hrefs") or {}
        lacking = [band for band in ("SCL", *bands) if not hrefs.get(band)]
        if lacking:
            band = sorted(lacking, key=(*bands, "SCL").index)[0]
            missing = Rejection(ASSET_MISSING, f"{iid} {band}: no href in the plan", item=iid, asset=band)
            break
        epsg = it.get("epsg")
        plan.append((it, offset))
        jobs += [(hrefs[band], _window_reader(grid, 1, item=iid, asset=band, epsg=epsg), iid, band)
                 for band in ("SCL", *bands)]
    obs, used = [], []
    with contextlib.closing(gather(jobs)) as got:  # each date composed as soon as its windows are in
        if missing is not None:
            _drain(got)  # a failed read before the missing href comes first
            raise missing
        for it, offset in plan:
            scl_got, *bands_got = [next(got) for _ in range(nb + 1)]
            with timed("s2 warp + scl mask"):
                refl, scl = _s2_date(it, scl_got, bands_got, profile, grid)
            obs.append((refl, scl))
            used.append({"id": str(it["id"]), "datetime": it.get("datetime"), "baseline": it.get("baseline"),
                         "offset_subtracted": offset, "cloud_cover": it.get("cloud_cover"),
                         "mgrs_tile": it.get("mgrs_tile"), "epsg": it.get("epsg"),
                         "scl": qc.scl_stats(scl, s2p.scl_mask)})
    info = {"items": used, "excluded": excluded}
    if not obs:
        raise Rejection(S2_MASKED, "no usable Sentinel-2 item", **info)
    with timed("s2 median + stretch"):
        if nb == 3:
            rgb, count = compose.s2_composite(obs, s2p.scl_mask, tuple(s2p.stretch))
            return LRImage(rgb, count, len(obs), info)
        med, count = compose.s2_median(obs, s2p.scl_mask)
        rgb = compose.stretch(med[:3], *s2p.stretch)
        extra = compose.reflectance_dn(med[[2, 1, 0, 3]])  # B02, B03, B04, B08
    return LRImage(rgb, count, len(obs), info, extra=extra)


def _s2_date(it: dict, scl_got, bands_got: list, profile, grid: compose.Grid) -> tuple[np.ndarray, np.ndarray]:
    """One date's windows -> (reflectance [B, H, W] on the LR grid (B04, B03, B02, and B08 when
    read), NaN where masked or without data; SCL [H, W] on the LR grid). The SCL is put on the
    bands' 10 m grid once (nearest) and masks there, before the one bilinear warp of the bands."""
    s2p = profile.imagery.s2
    nb = len(bands_got)
    if scl_got is None or any(g is None for g in bands_got):
        refl = np.full((nb, *grid.shape), np.nan, np.float32)
        if scl_got is None:
            return refl, np.zeros(grid.shape, np.uint8)
        return refl, compose.warp_scl(scl_got[0], scl_got[2], scl_got[3], grid)
    dn0, _, tr, crs = bands_got[0]
    if any(g[0].shape != dn0.shape or g[2] != tr for g in bands_got):  # not one grid: warp each on its own
        parts = [_s2_date(it, scl_got, [g] * nb, profile, grid)[0][0] for g in bands_got]
        return np.stack(parts), compose.warp_scl(scl_got[0], scl_got[2], scl_got[3], grid)
    native = compose.scl_to_band_grid(scl_got[0], scl_got[2], dn0.shape, tr, crs)
    refl = np.empty((nb, *dn0.shape), np.float32)
    for b, g in enumerate(bands_got):
        refl[b] = compose.harmonise(g[0], it.get("baseline"), profile)
    bad = np.isin(native, np.asarray(sorted(s2p.scl_mask), dtype=np.uint8)) | np.isnan(refl).any(axis=0)
    refl[:, bad] = np.nan
    warped = compose.warp_reflectance(refl, tr, crs, grid)
    return warped, compose.warp_scl(scl_got[0], scl_got[2], scl_got[3], grid)


def _compose_hr(naip_items: list[dict], profile, grid: compose.Grid, gather, timed) -> HRImage:
    # priority: newest first, then id (deterministic); each fills the others' holes
    order = sorted(naip_items, key=lambda it: str(it["id"]))
    order = sorted(order, key=lambda it: str(it.get("datetime") or ""), reverse=True)  # stable
    indexes = list(compose.RGB_BANDS if profile.imagery.bands == "rgb" else compose.RGBN_BANDS)
    jobs, missing = [], None
    for it in order:  # up to the first href the plan lacks
        iid = str(it["id"])
        if not it.get("href"):
            missing = Rejection(ASSET_MISSING, f"{iid} image: no href in the plan", item=iid, asset="image")
            break
        jobs.append((it["href"], _window_reader(grid, indexes, need_rgb=True, item=iid,
                                                asset="image", epsg=it.get("epsg")), iid, "image"))
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    used, mos = [], compose.Mosaic(grid.shape, len(indexes))
    with contextlib.closing(gather(jobs)) as got:  # each window warped as soon as it and those before it are in
        if missing is not None:
            _drain(got)  # a failed read before the missing href comes first
            raise missing
        for it, g in zip(order, got):
            used.append({"id": str(it["id"]), "datetime": it.get("datetime"), "epsg": it.get("epsg"),
                         "gsd": it.get("gsd"), "overlaps": g is not None})
            if g is None:
                continue
            rgb, masks, tr, crs = g
            del g  # the window is dropped once warped
            # warp only onto the part of the HR grid this quarter-quad's window can reach and the
            # mosaic still needs
            src_b = transform_bounds(crs, compose.WGS84, *array_bounds(rgb.shape[1], rgb.shape[2], tr),
                                     densify_pts=21)
            sub = compose.sub_grid(grid, src_b)
            if sub is None:
                continue
            with timed("naip mosaic"):
                box = mos.todo(sub[1], sub[2], sub[0].height, sub[0].width)
            if box is None:
                continue
            with timed("naip warp"):
                layer = compose.warp_naip(rgb, compose.naip_valid(rgb, masks), tr, crs,
                                          compose.window_grid(grid, *box))
            del rgb, masks
            with timed("naip mosaic"):
                mos.add(layer, box[0], box[1])
            del layer
    mosaic, covered = mos.result()
    if len(indexes) == 3:
        return HRImage(mosaic, covered, {"items": used})
    return HRImage(mosaic[..., :3], covered, {"items": used}, extra=mosaic)
