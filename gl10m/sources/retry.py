"""Retry with exponential backoff and full jitter, honouring ``Retry-After``.

Providers fail transiently all the time (Planetary Computer answers 429 and 5xx, connections
reset, reads time out). :func:`retry` calls a function until it succeeds, a non-transient error
is raised, or the attempts run out (then the last error is raised). Between attempts it sleeps

    max(retry_after, uniform(0, min(max_delay, base_delay * 2**attempt)))

("full jitter"; ``retry_after`` is the server's ``Retry-After``, seconds or an HTTP date,
when the error carries one; it is honoured up to ``max_retry_after`` seconds).

:func:`is_transient` decides what is worth retrying, for the errors our stack raises:
:class:`TransientError` (raise it yourself, e.g. with :func:`check_response`), ``requests``
(HTTP 429/5xx, timeouts, connection errors), ``pystac_client.exceptions.APIError``,
``urllib`` errors, ``rasterio`` / GDAL I/O errors (by their ``HTTP response code: N`` or
curl messages) and the OS-level timeouts and connection resets. Any other 4xx is permanent.
The cause chain (``__cause__`` / ``__context__``) is followed, so a wrapped error classifies
like the error it wraps (pystac's ``STACError: ... does not resolve to a STAC object`` raised
over a body cut short is transient).

A :class:`Budget` bounds the retrying of one unit of work (a scene, a catalog search) in time
rather than in attempts: every retried call of the unit shares it, and retrying stops when it is
spent. A hostile provider (one request in five failing) is then ridden out however unlucky a
unit's draws are, and a provider that is down still fails the unit in bounded time.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import random
import re
import socket
import time
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 507, 509, 520, 521, 522, 523, 524})


class TransientError(Exception):
    """A failure worth retrying. `retry_after` (seconds) is the server's wish, when it said one."""

    def __init__(self, message: str = "transient failure", *, retry_after: float | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status

    def __reduce__(self):  # picklable with its fields: Dask sends it from worker to driver
        return (_rebuild, (type(self), self.args, self.__dict__))


class PermanentHTTPError(Exception):
    """An HTTP error that retrying will not fix (a 4xx other than 408/425/429)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    """Unpickle one of our errors: its message, then its fields (``__init__`` takes keywords)."""
    e = cls.__new__(cls)
    Exception.__init__(e, *args)
    e.__dict__.update(state)
    return e


# -- Retry-After ------------------------------------------------------------------------------
def parse_retry_after(value: Any, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP date. None if absent
    or unparseable; never negative."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return max(0.0, float(value))
    s = str(value).strip()
    if not s:
        return None
    try:
        return max(0.0, float(s))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(s)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    now = now or dt.datetime.now(dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def _headers_of(exc: BaseException) -> Any:
    resp = getattr(exc, "response", None)
    if resp is not None and getattr(resp, "headers", None) is not None:
        return resp.headers
    hdrs = getattr(exc, "headers", None)  # urllib.error.HTTPError
    return hdrs


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def retry_after_of(exc: BaseException) -> float | None:
    """The ``Retry-After`` (seconds) an error carries, if any (attribute or response header)."""
    for e in _chain(exc):
        ra = getattr(e, "retry_after", None)
        if ra is not None:
            return parse_retry_after(ra)
        hdrs = _headers_of(e)
        if hdrs is not None:
            try:
                v = hdrs.get("Retry-After")
            except Exception:  # pragma: no cover - odd header objects
                v = None
            if v is not None:
                return parse_retry_after(v)
    return None


# -- classification ---------------------------------------------------------------------------
_GDAL_HTTP_RE = re.compile(r"HTTP (?:response )?code:?\s*(\d{3})", re.I)
_TRANSIENT_TEXT = re.compile(
    r"timed? ?out|timeout|connection (?:reset|refused|aborted|closed)|reset by peer|broken pipe|"
    r"temporar(?:y|ily)|too many requests|service unavailable|bad gateway|gateway time|"
    r"could not resolve|couldn't connect|failed to connect|ssl|recv failure|send failure|"
    r"transfer closed|empty reply|curl error", re.I)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an error carries (requests, pystac-client, urllib, ours, GDAL text)."""
    for attr in ("status", "status_code", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v <= 599:
            return v
    resp = getattr(exc, "response", None)
    v = getattr(resp, "status_code", None) if resp is not None else None
    if isinstance(v, int):
        return v
    return None


def _classify_one(e: BaseException) -> bool | None:
    """True transient, False permanent, None unknown (look further down the chain)."""
    if isinstance(e, TransientError):
        return True
    if isinstance(e, PermanentHTTPError):
        return False
    st = status_of(e)
    if st is not None:
        return st in RETRY_STATUSES or st >= 500
    if isinstance(e, (socket.timeout, TimeoutError, ConnectionError)):
        return True  # ConnectionResetError, ConnectionRefusedError, BrokenPipeError, ...
    try:
        import requests

        if isinstance(e, (requests.exceptions.Timeout, requests.exceptions.ConnectionError,
                          requests.exceptions.ChunkedEncodingError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import urllib3.exceptions as u3

        if isinstance(e, (u3.TimeoutError, u3.ProtocolError, u3.NewConnectionError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    import urllib.error

    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return True
    name = type(e).__module__ + "." + type(e).__name__
    if name.startswith("rasterio") or name.startswith("pystac_client") or "CPLE" in name:
        text = str(e)
        m = _GDAL_HTTP_RE.search(text)
        if m:
            code = int(m.group(1))
            return code in RETRY_STATUSES or code >= 500
        if _TRANSIENT_TEXT.search(text):
            return True
        return None
    return None


def is_transient(exc: BaseException) -> bool:
    """Is `exc` worth retrying? 429/5xx/408, timeouts and connection errors are; other 4xx and
    everything unrecognised are not."""
    for e in _chain(exc):
        verdict = _classify_one(e)
        if verdict is not None:
            return verdict
    return False


def check_response(resp: Any, what: str = "request") -> Any:
    """Raise for a non-2xx ``requests`` response: :class:`TransientError` (with its Retry-After)
    for 408/425/429/5xx, :class:`PermanentHTTPError` otherwise. Returns `resp` when it is fine."""
    st = int(resp.status_code)
    if 200 <= st < 300:
        return resp
    url = getattr(resp, "url", "") or ""
    url = url.split("?", 1)[0]  # never echo query strings (signed tokens, keys)
    msg = f"{what}: HTTP {st} from {url}" if url else f"{what}: HTTP {st}"
    if st in RETRY_STATUSES or st >= 500:
        raise TransientError(msg, retry_after=parse_retry_after(resp.headers.get("Retry-After")), status=st)
    raise PermanentHTTPError(msg, status=st)


# -- the loop ---------------------------------------------------------------------------------
BUDGET_ENV = "GL10M_RETRY_BUDGET_S"


def unit_budget(default_s: float) -> "Budget":
    """A fresh :class:`Budget` for one unit: `default_s` seconds, or ``$GL10M_RETRY_BUDGET_S``."""
    import os

    v = os.environ.get(BUDGET_ENV)
    try:
        seconds = float(v) if v else default_s
    except ValueError:
        seconds = default_s
    return Budget(seconds if seconds > 0 else default_s)


class Budget:
    """A time budget (seconds) shared by the retried calls of one unit of work."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic):
        if seconds <= 0:
            raise ValueError("a retry budget must be > 0 seconds")
        self.seconds = float(seconds)
        self._clock = clock
        self.deadline = clock() + self.seconds

    def remaining(self) -> float:
        return max(0.0, self.deadline - self._clock())

    def __repr__(self) -> str:
        return f"Budget({self.seconds:g} s, {self.remaining():.1f} s left)"


def backoff_delay(attempt: int, *, base_delay: float, max_delay: float, rng: random.Random,
                  retry_after: float | None = None, max_retry_after: float = 300.0) -> float:
    """Sleep before retry number `attempt` (0-based): full jitter, at least `retry_after`."""
    cap = min(max_delay, base_delay * (2 ** attempt))
    d = rng.uniform(0.0, cap) if cap > 0 else 0.0
    if retry_after is not None:
        d = max(d, min(retry_after, max_retry_after))
    return d


def retry(fn: Callable[[], T], *, attempts: int | None = 5, base_delay: float = 0.5, max_delay: float = 30.0,
          retry_on: Callable[[BaseException], bool] = is_transient, max_retry_after: float = 300.0,
          sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
          on_retry: Callable[[int, BaseException, float], None] | None = None,
          budget: Budget | None = None) -> T:
    """Call ``fn()`` until it returns; retry errors for which ``retry_on(exc)`` is true.

    At most `attempts` calls in all (None: no count, only the `budget`), and no retry once the
    `budget` is spent (a sleep is shortened to what is left; a ``Retry-After`` beyond it ends the
    retrying). The last error is raised when they run out, and a non-retryable error at once.
    ``on_retry(attempt, exc, delay)`` is called before each sleep (for logging or counting; it
    must not log credentials).
    """
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be >= 1")
    if attempts is None and budget is None:
        raise ValueError("retry without a count of attempts needs a budget")
    rng = rng or random.Random()
    i = 0
    while True:
        try:
            return fn()
        except BaseException as exc:  # noqa: BLE001 - reraised below unless retryable
            last = attempts is not None and i == attempts - 1
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) or last or not retry_on(exc):
                raise
            ra = retry_after_of(exc)
            delay = backoff_delay(i, base_delay=base_delay, max_delay=max_delay, rng=rng,
                                  retry_after=ra, max_retry_after=max_retry_after)
            if budget is not None:
                left = budget.remaining()
                if left <= 0 or (ra is not None and min(ra, max_retry_after) > left):
                    raise
                delay = min(delay, left)
            i += 1
            if on_retry is not None:
                on_retry(i, exc, delay)
            sleep(delay)


def retrying(**kw: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form: ``@retrying(attempts=3)`` retries the decorated function like :func:`retry`."""
    import functools

    def deco(f: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(f)
        def wrapper(*a: Any, **k: Any) -> T:
            return retry(lambda: f(*a, **k), **kw)
        return wrapper
    return deco
