"""Fault injection in front of the testbed's servers: a misbehaving provider, on demand.

Planetary Computer throttles (429 with ``Retry-After``), fails (5xx), stalls and drops
connections in the middle of a body. :class:`FaultProxy` is an HTTP proxy on 127.0.0.1 that
forwards ``GET`` and ``HEAD`` (``Range`` headers included, bodies streamed) and ``POST`` (STAC
item search) to one upstream base URL and, for a set fraction of requests, instead:

* answers **429** with ``Retry-After`` (``throttle``);
* answers **500, 502, 503 or 504** (``server_error``; 503 also carries ``Retry-After``);
* sends the upstream's status line, headers and only **part of the body**, then closes the
  connection (``drop``; a response without a body closes before answering: an empty reply);
* and, independently of those, **waits** ``delay_s`` before forwarding (``delay``).

Which request gets which fault is a pure function of the seed, the request (method, path and
query, ``Range``, a digest of a POST body) and how many times this proxy has seen that request before
(:meth:`FaultSpec.decide`), so a run is deterministic per seed whatever the order in which
threads reach the proxy, and a retry of a request draws afresh. The proxy is thread-safe and
counts what it injected (:meth:`FaultProxy.counts`).

Links: a STAC API writes absolute URLs into its answers (``next`` pages, asset hrefs). A proxy
rewrites, in JSON bodies and ``Location`` headers, its upstream's base URL to its own, plus any
other pairs in ``rewrite``. :func:`inject_faults` puts one proxy in front of each server of a
served world (:class:`gl10m.testbed.serve.Servers`) and points the STAC answers' asset hrefs at
the file proxy, so every request a download makes, search pages and COG byte ranges alike,
goes through a proxy; the servers and the world folder stay as they are::

    with serve(world) as servers, inject_faults(servers, FaultSpec.mixed(0.2, seed=1)) as faulty:
        run_download(profile, workdir, stac_url=faulty.stac_url)
        print(faulty.counts())
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Mapping

from gl10m.errors import UserError

PASS, THROTTLE, SERVER_ERROR, DROP = "pass", "throttle", "server_error", "drop"
SERVER_ERROR_STATUSES = (500, 502, 503, 504)
# never forwarded: they describe one connection, not the resource (RFC 9110 section 7.6.1)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
CHUNK = 64 * 1024
UPSTREAM_TIMEOUT_S = 60.0


class FaultSpecError(UserError, ValueError):
    """Fault rates that make no sense (negative, above 1, or failures summing above 1)."""


@dataclass(frozen=True)
class Decision:
    """What the proxy does with one request."""

    fault: str            # PASS | THROTTLE | SERVER_ERROR | DROP
    delay: bool = False   # wait FaultSpec.delay_s before anything else
    status: int = 0       # the 5xx to answer (SERVER_ERROR)
    cut: float = 0.0      # the fraction of the body sent before closing (DROP), in [0.1, 0.9)


@dataclass(frozen=True)
class FaultSpec:
    """How often a proxy misbehaves. Rates are fractions of requests in [0, 1]; the three
    failures (throttle, server_error, drop) are exclusive and must sum to at most 1; delay is
    drawn independently of them."""

    throttle: float = 0.0
    server_error: float = 0.0
    drop: float = 0.0
    delay: float = 0.0
    delay_s: float = 0.05
    retry_after: str = "1"   # the Retry-After sent with 429 and 503 (delta-seconds or HTTP date)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("throttle", "server_error", "drop", "delay"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise FaultSpecError(f"fault rate {name}={v} must be within 0..1")
        if self.throttle + self.server_error + self.drop > 1.0 + 1e-9:
            raise FaultSpecError(f"fault rates throttle+server_error+drop="
                                 f"{self.throttle + self.server_error + self.drop:.3f} exceed 1")
        if self.delay_s < 0:
            raise FaultSpecError(f"delay_s={self.delay_s} must be >= 0")

    @classmethod
    def mixed(cls, rate: float, *, seed: int = 0, delay: float | None = None, delay_s: float = 0.05,
              retry_after: str = "1") -> "FaultSpec":
        """`rate` of all requests fail, split evenly between 429, 5xx and mid-body drops; as
        many again (or `delay`) are delayed by `delay_s`."""
        if not 0.0 <= rate <= 1.0:
            raise FaultSpecError(f"fault rate {rate} must be within 0..1")
        return cls(throttle=rate / 3, server_error=rate / 3, drop=rate / 3,
                   delay=rate if delay is None else delay, delay_s=delay_s, retry_after=retry_after, seed=seed)

    @property
    def failure_rate(self) -> float:
        return self.throttle + self.server_error + self.drop

    def decide(self, request: str, occurrence: int) -> Decision:
        """The fate of the `occurrence`-th (0-based) sighting of `request` (a stable string
        naming it: method, target, Range). Pure: same seed and arguments, same decision."""
        d = hashlib.blake2b(f"{self.seed}\0{request}\0{occurrence}".encode(), digest_size=32).digest()
        u = [int.from_bytes(d[i:i + 8], "big") / 2.0 ** 64 for i in range(0, 32, 8)]
        delay = u[1] < self.delay
        if u[0] < self.throttle:
            return Decision(THROTTLE, delay)
        if u[0] < self.throttle + self.server_error:
            return Decision(SERVER_ERROR, delay, status=SERVER_ERROR_STATUSES[int(u[2] * len(SERVER_ERROR_STATUSES))])
        if u[0] < self.failure_rate:
            return Decision(DROP, delay, cut=0.1 + 0.8 * u[3])
        return Decision(PASS, delay)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address) -> None:
        """Clients hanging up early (a reader that has what it needs) are not errors."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultProxy:
    """A fault-injecting HTTP proxy on `host` in front of the base URL `upstream` (see the
    module doc). Serves from a daemon thread once constructed; use as a context manager or
    call :meth:`close`."""

    def __init__(self, upstream: str, spec: FaultSpec, *, host: str = "127.0.0.1", port: int = 0,
                 rewrite: Mapping[str, str] | None = None, name: str = "proxy"):
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise FaultSpecError(f"upstream {upstream!r} must be an http:// URL")
        self.upstream = upstream.rstrip("/")
        self.spec = spec
        self.name = name
        self._up_host, self._up_port = u.hostname, u.port or 80
        self._up_prefix = u.path.rstrip("/")
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._counts = {"requests": 0, PASS: 0, THROTTLE: 0, SERVER_ERROR: 0, DROP: 0, "delayed": 0,
                        "upstream_errors": 0}
        self._srv = _Server((host, port), self._handler_class())
        self.url = f"http://{host}:{self._srv.server_address[1]}"
        self.rewrite: dict[str, str] = {self.upstream: self.url, **dict(rewrite or {})}
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"gl10m-faults-{name}", daemon=True)
        self._thread.start()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _decide(self, request: str) -> Decision:
        with self._lock:
            n = self._seen.get(request, 0)
            self._seen[request] = n + 1
            self._counts["requests"] += 1
        return self.spec.decide(request, n)

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def counts(self) -> dict[str, int]:
        """What happened so far: ``requests`` seen, how many passed, were throttled (429), got a
        5xx, were dropped mid-body, were delayed, and upstream errors (answered 502, not
        injected)."""
        with self._lock:
            return dict(self._counts)

    @property
    def injected(self) -> int:
        """Requests that got an injected failure (429, 5xx or a drop)."""
        c = self.counts()
        return c[THROTTLE] + c[SERVER_ERROR] + c[DROP]

    def close(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        if self._thread.is_alive():
            self._srv.shutdown()
            self._thread.join(5)
        self._srv.server_close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.url} -> {self.upstream}, {asdict(self.spec)})"

    # -- the handler ---------------------------------------------------------------------------
    def _handler_class(self):
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        return Handler

    def _rewrite(self, text: bytes) -> bytes:
        for old, new in self.rewrite.items():
            text = text.replace(old.encode(), new.encode())
        return text


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forwards GET/HEAD to the owner's upstream, injecting the owner's decisions."""

    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, like the servers behind it
    server_version = "gl10m-faults"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle(body=True)

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_POST(self) -> None:
        self._handle(body=True)

    # -- injected answers ------------------------------------------------------------------------
    def _answer(self, status: int, extra: Iterable[tuple[str, str]] = ()) -> None:
        payload = f"{status} {HTTPStatus(status).phrase} (injected by gl10m.testbed.faults)\n".encode()
        self.send_response(status)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _hang_up(self) -> None:
        """Close the connection now, whatever was sent so far."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- forwarding ------------------------------------------------------------------------------
    def _handle(self, body: bool) -> None:
        owner, spec = self.owner, self.owner.spec
        n = int(self.headers.get("Content-Length") or 0)
        self._request_body = self.rfile.read(n) if n > 0 else None
        digest = hashlib.sha1(self._request_body).hexdigest() if self._request_body else ""
        decision = owner._decide(f"{self.command} {self.path} {self.headers.get('Range', '')} {digest}")
        if decision.delay:
            owner._count("delayed")
            time.sleep(spec.delay_s)
        if decision.fault == THROTTLE:
            owner._count(THROTTLE)
            self._answer(429, [("Retry-After", spec.retry_after)])
            return
        if decision.fault == SERVER_ERROR:
            owner._count(SERVER_ERROR)
            self._answer(decision.status, [("Retry-After", spec.retry_after)] if decision.status == 503 else [])
            return
        try:
            conn, resp = self._upstream()
        except (OSError, http.client.HTTPException) as e:
            owner._count("upstream_errors")
            print(f"gl10m.testbed.faults: upstream {owner.upstream} failed: {e}", file=sys.stderr)
            self._answer(502)
            return
        try:
            self._relay(resp, body, decision)
        finally:
            conn.close()

    def _upstream(self) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        owner = self.owner
        conn = http.client.HTTPConnection(owner._up_host, owner._up_port, timeout=UPSTREAM_TIMEOUT_S)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP
                   and k.lower() not in ("host", "accept-encoding")}
        headers["Accept-Encoding"] = "identity"  # bodies we may rewrite must come uncompressed
        conn.request(self.command, owner._up_prefix + self.path, body=self._request_body, headers=headers)
        return conn, conn.getresponse()

    def _relay(self, resp: http.client.HTTPResponse, body: bool, decision: Decision) -> None:
        owner = self.owner
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        ctype = (resp.getheader("Content-Type") or "").lower()
        length = resp.getheader("Content-Length")
        buffered: bytes | None = None
        if body and ("json" in ctype or length is None):
            # small bodies we must rewrite (STAC JSON) or measure (chunked): read them whole
            buffered = resp.read()
            if "json" in ctype:
                buffered = owner._rewrite(buffered)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(buffered))))
            length = str(len(buffered))
        headers = [(k, owner._rewrite(v.encode()).decode() if k.lower() == "location" else v) for k, v in headers]
        size = int(length) if length is not None and length.isdigit() else 0
        if decision.fault == DROP:
            owner._count(DROP)
            if not body or size <= 1:  # no body to cut short: an empty reply instead
                self._hang_up()
                return
        else:
            owner._count(PASS)
        self.send_response_only(resp.status, resp.reason)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if not body:
            return
        limit = max(1, min(size - 1, int(size * decision.cut))) if decision.fault == DROP else None
        sent = 0
        if buffered is not None:
            self.wfile.write(buffered if limit is None else buffered[:limit])
        else:
            while True:
                chunk = resp.read(CHUNK if limit is None else min(CHUNK, limit - sent))
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
                if limit is not None and sent >= limit:
                    break
        if decision.fault == DROP:
            self._hang_up()
            with contextlib.suppress(OSError, http.client.HTTPException):
                resp.read()  # let the upstream finish its answer: the fault is ours, not its


# ---------------------------------------------------------------------------------------------
# A served world behind proxies
# ---------------------------------------------------------------------------------------------
class FaultyTestbed:
    """Fault proxies in front of both servers of a served world: ``stac_url`` (the STAC API,
    whose answers point at ``http_url``) and ``http_url`` (the COG files). Close it (or use it
    as a context manager) to stop the proxies; the servers behind keep running."""

    def __init__(self, servers, spec: FaultSpec, *, host: str = "127.0.0.1", stac_port: int = 0,
                 http_port: int = 0):
        self.servers = servers
        self.spec = spec
        self.files = FaultProxy(servers.http_url, spec, host=host, port=http_port, name="files")
        try:
            self.stac = FaultProxy(servers.stac_url, spec, host=host, port=stac_port, name="stac",
                                   rewrite={servers.http_url: self.files.url})
        except BaseException:
            self.files.close()
            raise

    @property
    def stac_url(self) -> str:
        return self.stac.url

    @property
    def http_url(self) -> str:
        return self.files.url

    def counts(self) -> dict[str, dict[str, int]]:
        """:meth:`FaultProxy.counts` of each proxy, by name (``stac``, ``files``)."""
        return {"stac": self.stac.counts(), "files": self.files.counts()}

    @property
    def injected(self) -> int:
        return self.stac.injected + self.files.injected

    def profile_for(self, profile):
        """`profile` with its provider pointed at the faulty STAC API, unsigned."""
        prov = profile.provider.model_copy(update={"name": "stac", "stac_url": self.stac_url, "signing": "none"})
        return profile.model_copy(update={"provider": prov})

    def close(self) -> None:
        self.stac.close()
        self.files.close()

    def __enter__(self) -> "FaultyTestbed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultyTestbed(stac_url={self.stac_url!r}, http_url={self.http_url!r})"


def inject_faults(servers, spec: FaultSpec, *, host: str = "127.0.0.1", stac_port: int = 0,
                  http_port: int = 0) -> FaultyTestbed:
    """Proxies with faults in front of a running :class:`~gl10m.testbed.serve.Servers` (on the
    given ports; 0: free ones)."""
    return FaultyTestbed(servers, spec, host=host, stac_port=stac_port, http_port=http_port)


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m gl10m.testbed.faults DIR --rate 0.2 [--seed N]``: serve a world behind fault
    proxies, print the URLs and the counts at Ctrl-C."""
    import argparse

    from gl10m.testbed.serve import run_forever

    ap = argparse.ArgumentParser(prog="python -m gl10m.testbed.faults", description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--rate", type=float, default=0.2, help="fraction of requests that fail (429, 5xx, drops)")
    ap.add_argument("--delay", type=float, default=None, help="fraction of requests delayed (default: --rate)")
    ap.add_argument("--delay-s", type=float, default=0.05)
    ap.add_argument("--retry-after", default="1")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(list(argv) if argv is not None else None)
    try:
        spec = FaultSpec.mixed(a.rate, seed=a.seed, delay=a.delay, delay_s=a.delay_s, retry_after=a.retry_after)
        run_forever(a.dir, faults=spec)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
