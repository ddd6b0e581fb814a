"""Serve a built testbed world like the real providers do, on 127.0.0.1.

Two real servers, each in its own process group:

* an HTTP server with Range support over the world folder (our own threaded handler: 206 with
  ``Content-Range``, ``multipart/byteranges`` for several ranges, 416 for unsatisfiable ones,
  ``HEAD``, ``Accept-Ranges``, HTTP/1.1 keep-alive), so GDAL reads the COGs through ``/vsicurl/``
  exactly as it reads Planetary Computer's blobs;
* a STAC API server, ``rustac serve`` (in-memory), loaded with the collections from
  ``DIR/stac/collections.json`` and the items of every other ``DIR/stac/*.json`` item collection,
  whose relative asset hrefs are rewritten to the HTTP server's absolute URLs (written to a temp
  folder; ``DIR`` is never modified). Note: rustac's in-memory backend silently ignores
  ``query``/``filter``/``sortby`` (HTTP 200, zero items): bbox, intersects, datetime,
  collections, ids and paging work. The pipeline must not depend on the ignored ones.

``serve(dir)`` returns a :class:`Servers` (a context manager); ``run_forever(dir)`` prints the two
URLs and blocks until Ctrl-C (``gl10m testbed serve DIR``).
"""
from __future__ import annotations

import atexit
import contextlib
import email.utils
import json
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable

from gl10m.errors import UserError

COLLECTIONS_FILE = "collections.json"
READY_TIMEOUT_S = 30.0


class ServeError(UserError, RuntimeError):
    """The world cannot be served (missing folder, no items, rustac missing, a server died)."""


# ---------------------------------------------------------------------------------------------
# HTTP server with Range support
# ---------------------------------------------------------------------------------------------
_RANGE_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """Parse a ``Range`` header against a resource of `size` bytes (RFC 9110 section 14).

    Returns the satisfiable ranges as inclusive ``(first, last)`` pairs, ``[]`` when the header
    is valid but no range is satisfiable (answer 416), or ``None`` when the header is not a
    bytes range we understand (answer 200 with the whole body, as the RFC says to).
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        return None
    out: list[tuple[int, int]] = []
    for part in spec.split(","):
        m = _RANGE_RE.match(part)
        if not m or (m.group(1) == "" and m.group(2) == ""):
            return None
        first_s, last_s = m.groups()
        if first_s == "":  # suffix range: the last N bytes
            n = int(last_s)
            if n == 0 or size == 0:
                continue
            out.append((max(0, size - n), size - 1))
            continue
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
        if last_s and last < first:
            return None  # syntactically invalid: ignore the header
        if first >= size:
            continue
        out.append((first, min(last, size - 1)))
    return out


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Static files under `directory` with byte ranges; no directory listings."""

    protocol_version = "HTTP/1.1"  # keep-alive: GDAL reuses connections
    server_version = "gl10m-testbed"
    sys_version = ""
    _BOUNDARY = "gl10m-byteranges-7d3f9a"

    def log_message(self, format: str, *args: Any) -> None:  # quiet; errors still go to stderr
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            ctype = self.guess_type(path)
            header = self.headers.get("Range")
            ranges = parse_range(header, size) if header else None
            if ranges == []:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            common = [("Accept-Ranges", "bytes"),
                      ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
                      ("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')]
            if ranges is None:
                self.send_response(HTTPStatus.OK)
                for k, v in common:
                    self.send_header(k, v)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if body:
                    shutil.copyfileobj(f, self.wfile)
                return
            if len(ranges) == 1:
                first, last = ranges[0]
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                for k, v in common:
                    self.send_header(k, v)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Length", str(last - first + 1))
                self.end_headers()
                if body:
                    f.seek(first)
                    self.wfile.write(f.read(last - first + 1))
                return
            parts = []
            for first, last in ranges:
                f.seek(first)
                head = (f"--{self._BOUNDARY}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n").encode()
                parts.append(head + f.read(last - first + 1) + b"\r\n")
            payload = b"".join(parts) + f"--{self._BOUNDARY}--\r\n".encode()
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            for k, v in common:
                self.send_header(k, v)
            self.send_header("Content-Type", f"multipart/byteranges; boundary={self._BOUNDARY}")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    verbose = False


def make_http_server(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) threaded Range HTTP server over `root`."""
    root = str(Path(root).resolve())

    class Handler(RangeRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=root, **kw)

    return _Server((host, port), Handler)


def http_main(argv: list[str]) -> int:
    """The files server's child process (run by `python -c`): serve `root`, print ``PORT <n>``, stop
    on SIGTERM or when stdin closes."""
    root, host, port = argv[0], argv[1], int(argv[2])
    srv = make_http_server(root, host, port)
    print(f"PORT {srv.server_address[1]}", flush=True)

    def _stop(*_):
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _watch_parent():  # the parent holds our stdin: EOF means it is gone
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(1):
                pass
        _stop()

    threading.Thread(target=_watch_parent, daemon=True).start()
    srv.serve_forever(poll_interval=0.2)
    srv.server_close()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter finalisation: the stdin watcher thread is blocked in a read, and
    # finalising would wait ~1 s for its buffer lock (then print a fatal error)
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# Reading the world's STAC files and rewriting hrefs
# ---------------------------------------------------------------------------------------------
def _is_relative(href: str) -> bool:
    return not (urllib.parse.urlsplit(href).scheme or href.startswith("/"))


def absolute_href(href: str, base_url: str) -> str:
    """`href` relative to the world folder -> URL under `base_url`; absolute hrefs unchanged."""
    if not _is_relative(href):
        return href
    rel = posixpath.normpath(href.replace("\\", "/"))
    if rel.startswith("../") or rel == "..":
        raise ServeError(f"asset href {href!r} points outside the world folder")
    return base_url.rstrip("/") + "/" + urllib.parse.quote(rel)


def rewrite_item(item: dict, base_url: str) -> dict:
    """A copy of `item` with relative asset hrefs made absolute and file links dropped."""
    out = json.loads(json.dumps(item))
    for asset in (out.get("assets") or {}).values():
        if isinstance(asset, dict) and isinstance(asset.get("href"), str):
            asset["href"] = absolute_href(asset["href"], base_url)
    # self/root/parent/collection links to files mean nothing to an API: it makes its own
    out["links"] = [ln for ln in out.get("links", [])
                    if isinstance(ln, dict) and ln.get("rel") not in ("self", "root", "parent", "collection")
                    and not _is_relative(str(ln.get("href", "")))]
    return out


def rewrite_collection(collection: dict, base_url: str) -> dict:
    """A copy of `collection` without file links (the API makes its own) and with relative
    asset hrefs (thumbnails...) made absolute."""
    out = json.loads(json.dumps(collection))
    out["links"] = [ln for ln in out.get("links", []) if isinstance(ln, dict)
                    and ln.get("rel") not in ("self", "root", "parent", "item", "child", "items")
                    and not _is_relative(str(ln.get("href", "")))]
    for asset in (out.get("assets") or {}).values():
        if isinstance(asset, dict) and isinstance(asset.get("href"), str):
            asset["href"] = absolute_href(asset["href"], base_url)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ServeError(f"cannot read {path}: {e}") from None


def load_world_stac(world: str | Path) -> tuple[list[dict], list[dict]]:
    """(collections, items) of a world folder, items with hrefs still as on disk.

    Collections come from ``stac/collections.json`` (a list or ``{"collections": [...]}``);
    items from every other ``stac/*.json`` (a FeatureCollection, a list, or a single item).
    """
    world = Path(world)
    if not world.exists():
        raise ServeError(f"world folder {world} does not exist (build one with `gl10m testbed build`)")
    if not world.is_dir():
        raise ServeError(f"world folder {world} is not a folder")
    stac = world / "stac"
    if not stac.is_dir():
        raise ServeError(f"world folder {world} has no stac/ folder: not a built world")
    collections: list[dict] = []
    cpath = stac / COLLECTIONS_FILE
    if cpath.exists():
        data = _read_json(cpath)
        if isinstance(data, dict) and "collections" in data:
            data = data["collections"]
        elif isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not all(isinstance(c, dict) and c.get("id") for c in data):
            raise ServeError(f"{cpath}: expected a list of STAC collections")
        collections = data
    items: list[dict] = []
    for p in sorted(stac.glob("*.json")):
        if p.name == COLLECTIONS_FILE:
            continue
        data = _read_json(p)
        if isinstance(data, dict) and data.get("type") == "FeatureCollection":
            feats = data.get("features", [])
        elif isinstance(data, dict) and data.get("type") == "Feature":
            feats = [data]
        elif isinstance(data, list):
            feats = data
        else:
            raise ServeError(f"{p}: expected a GeoJSON FeatureCollection of STAC items")
        for it in feats:
            if not isinstance(it, dict) or it.get("type") != "Feature" or not it.get("id"):
                raise ServeError(f"{p}: an entry is not a STAC item (needs type Feature and an id)")
        items.extend(feats)
    if not items:
        raise ServeError(f"world folder {world} has no STAC items in {stac}/*.json")
    ids = [(it.get("collection"), it["id"]) for it in items]
    dup = sorted({f"{c}/{i}" for c, i in ids if ids.count((c, i)) > 1})
    if dup:
        raise ServeError(f"world folder {world}: duplicate item ids {dup[:3]}")
    known = {c["id"] for c in collections}
    if collections:
        missing = sorted({str(it.get("collection")) for it in items} - known)
        if missing:
            raise ServeError(f"items name collections {missing} that {cpath} does not define")
    return collections, items


def write_api_inputs(world: str | Path, base_url: str, out_dir: str | Path) -> list[Path]:
    """Write the collections (one file each) and the rewritten items into `out_dir`.

    Returns the files in the order ``rustac serve`` must load them (collections first).
    """
    from gl10m.io import atomic_write_text

    collections, items = load_world_stac(world)
    out_dir = Path(out_dir)
    files: list[Path] = []
    for i, c in enumerate(collections):
        c = rewrite_collection(c, base_url)
        p = out_dir / f"collection-{i:03d}.json"
        atomic_write_text(p, json.dumps(c))
        files.append(p)
    fc = {"type": "FeatureCollection", "features": [rewrite_item(it, base_url) for it in items]}
    p = out_dir / "items.json"
    atomic_write_text(p, json.dumps(fc))
    files.append(p)
    return files


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
def _preexec_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM if the thread that started it dies (no orphans on kill -9)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _popen(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """Start `cmd` in its own session (process group), stderr to the file `log` (never a pipe
    that could fill up and block a long-running server)."""
    preexec = None
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        preexec = _preexec_pdeathsig
    with open(log, "ab") as err:
        p = subprocess.Popen(cmd, start_new_session=True, preexec_fn=preexec, stderr=err, **kw)
    p.gl10m_log = log  # type: ignore[attr-defined]
    return p


def _stop_process(p: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers; reap it."""
    if p is None:
        return
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout)
    else:  # the leader exited: still sweep anything it left in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    for s in (p.stdin, p.stdout, p.stderr):
        if s is not None:
            with contextlib.suppress(Exception):
                s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (callers retry if someone takes it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require_rustac() -> None:
    """Raise a one-line ServeError when neither pip rustac nor a `rustac` binary is there."""
    try:
        import rustac  # noqa: F401
    except ImportError:
        if not shutil.which("rustac"):
            raise ServeError("rustac is not installed: pip install 'rustac>=0.9' (or the gl10m[testbed] extra)") from None


def rustac_command(workdir: str | Path) -> list[str]:
    """How to run the rustac CLI: pip rustac's entry point via a runner script in `workdir`
    (its `main()` parses the process argv, so `python -c` does not work), else `rustac` on PATH."""
    try:
        import rustac  # noqa: F401
    except ImportError:
        exe = shutil.which("rustac")
        if exe:
            return [exe]
        raise ServeError("rustac is not installed: pip install 'rustac>=0.9' (or the gl10m[testbed] extra)") from None
    runner = Path(workdir) / "rustac_main.py"
    runner.write_text("import sys\nfrom rustac import main\nsys.exit(main())\n")
    return [sys.executable, str(runner)]


def _get_json(url: str, timeout: float = 2.0) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float, what: str,
               check=lambda doc: True) -> None:
    """Poll `url` until it answers JSON for which `check` is true; fail fast if `proc` died."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    last = ""
    while True:
        if proc is not None and proc.poll() is not None:
            err = _tail(proc)
            raise ServeError(f"{what} exited with code {proc.returncode} before it was ready{err}")
        try:
            if check(_get_json(url, timeout=0.5)):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, OSError) as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise ServeError(f"{what} did not answer at {url} within {timeout:.0f} s ({last})")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _tail(proc: subprocess.Popen) -> str:
    """The last line of a dead child's stderr log (see _popen), for one-line errors."""
    log = getattr(proc, "gl10m_log", None)
    with contextlib.suppress(Exception):
        if log is not None:
            text = re.sub(r"\x1b\[[0-9;]*m", "", Path(log).read_text(errors="replace"))
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if lines:
                return f": {lines[-1][:300]}"
    return ""


# ---------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------
class Servers:
    """The two running servers of one served world. Use as a context manager or call close()."""

    def __init__(self, world: Path, host: str):
        self.world = world
        self.host = host
        self.http_url: str = ""
        self.stac_url: str = ""
        self.http_port: int = 0
        self.stac_port: int = 0
        self.n_items: int = 0
        self.collections: list[str] = []
        self._http: subprocess.Popen | None = None
        self._stac: subprocess.Popen | None = None
        self._tmp: Path | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop both servers (their whole process groups) and remove the temp folder. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _stop_process(self._stac)
        _stop_process(self._http)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return (not self._closed and self._http is not None and self._http.poll() is None
                and self._stac is not None and self._stac.poll() is None)

    # -- helpers -----------------------------------------------------------------------------
    def url_for(self, rel: str) -> str:
        """The HTTP URL of a file given by its path relative to the world folder."""
        return absolute_href(rel, self.http_url)

    def profile_for(self, profile):
        """`profile` (a gl10m Profile) with its provider pointed at this STAC API, unsigned."""
        prov = profile.provider.model_copy(update={"name": "stac", "stac_url": self.stac_url, "signing": "none"})
        return profile.model_copy(update={"provider": prov})

    def info(self) -> dict:
        return {"stac_url": self.stac_url, "http_url": self.http_url, "world": str(self.world),
                "pid": os.getpid(), "items": self.n_items, "collections": self.collections,
                "server_pids": [p.pid for p in (self._http, self._stac) if p is not None]}

    def write_info(self, path: str | Path) -> Path:
        """Write ``served.json`` (the URLs) to `path` atomically, for other processes to find."""
        from gl10m.io import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.info(), indent=2) + "\n")
        return path

    def __repr__(self) -> str:
        return f"Servers(stac_url={self.stac_url!r}, http_url={self.http_url!r}, world={str(self.world)!r})"


def _start_http(s: Servers, http_port: int) -> None:
    cmd = [sys.executable, "-c", "import sys; from gl10m.testbed.serve import http_main; sys.exit(http_main(sys.argv[1:]))",
           str(s.world), s.host, str(http_port)]
    s._http = _popen(cmd, s._tmp / "http.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = s._http.stdout.readline().decode().strip()
    if not line.startswith("PORT "):
        s._http.wait(5)
        raise ServeError(f"the HTTP server did not start on {s.host}:{http_port}{_tail(s._http)}")
    s.http_port = int(line.split()[1])
    s.http_url = f"http://{s.host}:{s.http_port}"


def _start_stac(s: Servers, stac_port: int, files: list[Path], timeout: float) -> None:
    base = rustac_command(s._tmp)
    tries = 1 if stac_port else 5
    for attempt in range(tries):
        port = stac_port or free_port(s.host)
        cmd = base + ["serve", "--addr", f"{s.host}:{port}", *[str(f) for f in files]]
        s._stac = _popen(cmd, s._tmp / f"rustac-{attempt}.log", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        url = f"http://{s.host}:{port}"
        try:
            wait_ready(url + "/", s._stac, timeout, "the STAC API server (rustac serve)",
                       check=lambda doc: isinstance(doc, dict) and doc.get("type") == "Catalog")
        except ServeError as e:
            _stop_process(s._stac)
            if attempt + 1 < tries and "in use" in str(e).lower():
                continue  # someone took the port between free_port() and bind: try another
            raise
        s.stac_port, s.stac_url = port, url
        return


def serve(dir: str | Path, *, host: str = "127.0.0.1", stac_port: int = 0, http_port: int = 0,
          timeout: float = READY_TIMEOUT_S, info_path: str | Path | None = None) -> Servers:
    """Serve the world folder `dir`: a Range HTTP server for its files, then a STAC API.

    Ports 0 mean "pick free ones". Returns when both answer. On any failure everything started
    is stopped and a one-line :class:`ServeError` is raised. `info_path`, if given, receives a
    ``served.json`` with the URLs.
    """
    world = Path(dir).expanduser()
    load_world_stac(world)  # fail early, before starting anything, on a bad folder...
    require_rustac()  # ...or without rustac
    world = world.resolve()
    s = Servers(world, host)
    atexit.register(s.close)
    try:
        s._tmp = Path(tempfile.mkdtemp(prefix="gl10m-serve-"))
        _start_http(s, http_port)
        wait_ready_http(s.http_url, s._http, timeout)
        files = write_api_inputs(world, s.http_url, s._tmp)
        collections, items = load_world_stac(world)
        s.n_items, s.collections = len(items), [c["id"] for c in collections]
        _start_stac(s, stac_port, files, timeout)
        if info_path is not None:
            s.write_info(info_path)
    except BaseException:
        s.close()
        raise
    return s


def wait_ready_http(http_url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Poll the HTTP server until it answers (any status: 404 for / is fine)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServeError(f"the HTTP server exited with code {proc.returncode}{_tail(proc)}")
        try:
            urllib.request.urlopen(urllib.request.Request(http_url + "/", method="HEAD"), timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise ServeError(f"the HTTP server did not answer at {http_url} within {timeout:.0f} s") from None
            time.sleep(0.02)


def run_forever(dir: str | Path, *, host: str = "127.0.0.1", stac_port: int = 0, http_port: int = 0,
                info_path: str | Path | None = None, out=None, faults=None, extra: dict | None = None) -> None:
    """Serve `dir`, print the URLs, block until Ctrl-C (or SIGTERM), then stop cleanly. `faults`
    (a :class:`gl10m.testbed.faults.FaultSpec`): serve behind fault proxies instead; the URLs
    printed and written are the proxies' (on `stac_port` / `http_port`), and what they injected
    is printed at the end. `extra`: more entries for the info file (another server's URL)."""
    out = out or sys.stdout
    stop = threading.Event()

    def _term(*_):
        stop.set()

    main = threading.current_thread() is threading.main_thread()
    # SIGINT too, explicitly: a process started with SIGINT ignored (a background job of a
    # non-interactive shell, e.g. under CI) never gets Python's KeyboardInterrupt handler
    old = {sig: signal.signal(sig, _term) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        with contextlib.ExitStack() as stack:
            behind = faults is not None  # the proxies, not the servers behind them, take the ports asked for
            s = stack.enter_context(serve(dir, host=host, stac_port=0 if behind else stac_port,
                                          http_port=0 if behind else http_port))
            front, note = s, ""
            if faults is not None:
                from gl10m.testbed.faults import inject_faults

                front = stack.enter_context(inject_faults(s, faults, host=host, stac_port=stac_port,
                                                          http_port=http_port))
                note = ", behind fault proxies"
            print(f"STAC API:   {front.stac_url}  ({s.n_items} items in "
                  f"{', '.join(s.collections) or 'their collections'}{note})", file=out)
            print(f"files:      {front.http_url}/  (HTTP with Range{note})", file=out)
            if info_path is not None:
                from gl10m.io import atomic_write_text

                atomic_write_text(Path(info_path), json.dumps(
                    {**s.info(), "stac_url": front.stac_url, "http_url": front.http_url, **(extra or {})},
                    indent=2) + "\n")
                print(f"written:    {info_path}", file=out)
            print("Ctrl-C to stop", file=out, flush=True)
            try:
                while not stop.wait(0.5):
                    if not s.alive:
                        raise ServeError("a testbed server stopped unexpectedly")
            except KeyboardInterrupt:
                pass
            if faults is not None:
                print(f"injected:   {front.counts()}", file=out)
            print("stopping...", file=out, flush=True)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if info_path is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(info_path).unlink()


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m gl10m.testbed.serve DIR [--served-json PATH]`` (the CLI wraps run_forever)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gl10m.testbed.serve", description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--stac-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--served-json", default=None)
    a = ap.parse_args(list(argv) if argv is not None else None)
    try:
        run_forever(a.dir, host=a.host, stac_port=a.stac_port, http_port=a.http_port, info_path=a.served_json)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
