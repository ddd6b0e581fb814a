"""Before a run: which STAC API to talk to, and is it there at all?

* :func:`resolve_stac_url` - ``--stac-url`` if given; else the profile's ``provider.stac_url``,
  unless that is a testbed placeholder (a URL with port 0, as ``gl10m testbed build`` writes
  into its profile): then the URL that ``gl10m testbed serve WORLD`` recorded in
  ``WORLD/served.json`` beside the profile, or one line saying to start it.
* :func:`check_reachable` - one GET of the landing page, retried for a few seconds only
  (transient faults are ridden out, a server that is not there is not waited for): an
  unreachable or non-STAC URL is bad input, one line, before any Dask cluster starts.
"""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from gl10m.errors import UserError, redact
from gl10m.sources.retry import Budget, check_response, is_transient, retry

SERVED_JSON = "served.json"
REACH_BUDGET_S = 4.0


def is_placeholder(url: str | None) -> bool:
    """A testbed placeholder URL: port 0 (nothing can listen there)."""
    if not url:
        return False
    try:
        return urlsplit(url).port == 0
    except ValueError:
        return False


def served_json_of(profile) -> Path | None:
    """Where ``gl10m testbed serve`` records the URLs of the world whose profile this is."""
    src = getattr(profile, "source", None)
    return Path(src).parent / SERVED_JSON if src else None


def resolve_stac_url(profile, stac_url: str | None) -> str | None:
    """The STAC API URL a run uses (see the module doc); None for a non-STAC provider."""
    if stac_url:
        return stac_url
    if profile.provider.name != "stac":
        return None
    url = profile.provider.stac_url
    if not is_placeholder(url):
        return url
    info = served_json_of(profile)
    if info is not None and info.is_file():
        try:
            served = json.loads(info.read_text())["stac_url"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{info}: not a file written by `gl10m testbed serve` (remove it and serve again)") from None
        return str(served)
    world = info.parent if info is not None else "WORLD"
    raise UserError(f"the profile's provider is the testbed placeholder {url} and nothing is served: start "
                    f"`gl10m testbed serve {world}` (it records its URLs in {SERVED_JSON}) or pass --stac-url URL")


def check_reachable(url: str, *, budget_s: float = REACH_BUDGET_S, served_from: Path | None = None) -> None:
    """Raise a one-line :class:`UserError` unless `url` answers like a STAC API within `budget_s`."""
    import requests

    def once():
        resp = requests.get(url, timeout=(3, 5), headers={"Accept": "application/json"})
        check_response(resp, "STAC landing page")
        try:
            body = resp.json()
        except ValueError:
            from gl10m.sources.retry import TransientError

            raise TransientError("the landing page is not JSON") from None
        return body

    where = f" (from {served_from})" if served_from else ""
    hint = ("is the server running? (the testbed: `gl10m testbed serve WORLD`; another API: --stac-url)")
    try:
        body = retry(once, attempts=None, budget=Budget(budget_s), base_delay=0.25, max_delay=1.5)
    except Exception as e:  # noqa: BLE001 - every way of not answering is one line
        why = _why(e) if is_transient(e) or isinstance(e, requests.RequestException) else redact(str(e))[:200]
        raise UserError(f"provider {redact(url)}{where} is unreachable: {why}; {hint}") from None
    if not isinstance(body, dict) or not (body.get("links") or body.get("type") in ("Catalog", "Collection")):
        raise UserError(f"provider {redact(url)}{where} does not answer like a STAC API (no links on its "
                        "landing page); check provider.stac_url or --stac-url")


def _why(e: BaseException) -> str:
    text = str(e)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("Failed to resolve", "unknown host"),
                          ("Invalid URL", "invalid URL")):
        if needle in text:
            return short
    return redact(f"{type(e).__name__}: {text.splitlines()[0] if text else ''}")[:200]
