"""GDAL configuration for reading remote COGs over HTTP (``/vsicurl/``).

Used by the fetch stage for every provider (Planetary Computer, Earth Search, the local
testbed): ``with rasterio.Env(**gdal_http_env()): rasterio.open(href)``.

What each option does, and why:

* ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``: do not list the "directory" of the URL on open
  (an extra request, and blob stores answer it with an error page) and assume no sidecar files.
* ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS=.tif,.tiff,.TIF,.TIFF``: never probe ``.aux.xml``, ``.ovr``,
  ``.msk`` sidecars; only the GeoTIFF itself is fetched. (Signed URLs end in ``?sig=...``: GDAL
  matches the extension before the query string.)
* ``GDAL_HTTP_MULTIRANGE=YES``: read the several byte ranges a window needs in parallel.
* ``GDAL_HTTP_MERGE_CONSECUTIVE_RANGES=YES``: merge adjacent tile ranges into one request.
* ``GDAL_HTTP_MAX_RETRY`` / ``GDAL_HTTP_RETRY_DELAY``: retry 429 / 5xx and dropped connections
  at the HTTP layer with backoff starting at the delay (seconds).
* ``GDAL_HTTP_TIMEOUT`` / ``GDAL_HTTP_CONNECTTIMEOUT``: fail a stuck request instead of hanging
  a worker; the stage's own retry records it as ``failed`` and tries again later.
* ``VSI_CACHE=TRUE`` + ``VSI_CACHE_SIZE``: block cache per open file (32 MB each), so
  re-reading the header and neighbouring tiles of the same COG costs no request;
  ``CPL_VSIL_CURL_CACHE_SIZE`` (128 MB) is the /vsicurl/ chunk cache shared by all files of a
  process. Both are per worker process: mind them when running many workers.
* ``GDAL_INGESTED_BYTES_AT_OPEN``: fetch the first 32 kB on open, enough for the IFDs of a COG
  with overviews, instead of several small header requests.
* ``GDAL_HTTP_VERSION=2TLS``: HTTP/2 over https where the server offers it; plain http stays
  HTTP/1.1 (no h2c upgrade dance with simple servers such as the testbed's).
* ``GDAL_HTTP_USERAGENT``: identifies the builder to the provider.

Values already set in the process environment win over these defaults, so a user can tune a
run with plain environment variables (``GDAL_HTTP_MAX_RETRY=10 gl10m download ...``).
"""
from __future__ import annotations

import os
from typing import Mapping

DEFAULTS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_CONNECTTIMEOUT": "15",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(32 * 1024 * 1024),
    "CPL_VSIL_CURL_CACHE_SIZE": str(128 * 1024 * 1024),
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "GDAL_HTTP_VERSION": "2TLS",
    "GDAL_HTTP_USERAGENT": "gl10m",
}


def gdal_http_env(overrides: Mapping[str, object] | None = None, *,
                  environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL config options for remote COG reads, as strings for ``rasterio.Env(**...)``.

    Precedence: `overrides` > the process environment (`environ`, default ``os.environ``) >
    :data:`DEFAULTS`. An override of ``None`` removes that option.
    """
    env = os.environ if environ is None else environ
    out = {k: env.get(k, v) for k, v in DEFAULTS.items()}
    for k, v in (overrides or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, bool):
            out[k] = "YES" if v else "NO"
        else:
            out[k] = str(v)
    return out
