"""A throwaway pgstac STAC API (PostgreSQL + PostGIS + pgstac), the stack Planetary Computer runs.

Used to check that the pipeline's STAC client gets the same answers from pgstac as from the
in-memory ``rustac serve`` of :mod:`gl10m.testbed.serve`. Everything lives in one temp folder:

1. ``initdb`` a cluster there (PostgreSQL refuses to run as root: when we are root, the folder
   is chowned to an unprivileged user, ``postgres`` or ``nobody``, and the server runs as it),
   start it with ``pg_ctl`` on 127.0.0.1 and a free port (durability off: it is a test DB);
2. ``pypgstac`` migrate, then load the collections and items (hrefs already rewritten);
3. serve it with ``rustac serve --pgstac DSN`` on 127.0.0.1 and a free port.

``PgstacServer.close()`` stops the API, stops the cluster (``pg_ctl stop -m immediate``) and
removes the folder. Needs the Debian packages ``postgresql-15`` and ``postgresql-15-postgis-3``
and pip ``pypgstac[psycopg]`` (``bash .ci/pgstac.sh .venv`` installs them).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from gl10m.errors import UserError
from gl10m.testbed import serve as _serve

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")
POSTGIS_CONTROL = "postgis.control"


class PgstacError(UserError, RuntimeError):
    """pgstac cannot be set up here (binaries, PostGIS or pypgstac missing, a step failed)."""


def pg_bin_dir() -> Path | None:
    """The folder holding initdb/pg_ctl/postgres (env GL10M_PG_BIN, else Debian's), or None."""
    cands = [os.environ["GL10M_PG_BIN"]] if os.environ.get("GL10M_PG_BIN") else []
    cands += list(PG_BIN_DIRS)
    for d in cands:
        p = Path(d)
        if (p / "initdb").is_file() and (p / "pg_ctl").is_file() and (p / "postgres").is_file():
            return p
    return None


def _sharedir(bindir: Path) -> Path | None:
    with contextlib.suppress(Exception):
        out = subprocess.run([str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    # Debian: /usr/lib/postgresql/15/bin -> /usr/share/postgresql/15
    return Path("/usr/share/postgresql") / bindir.parent.name


def missing() -> str | None:
    """Why pgstac cannot run here (one line), or None when everything needed is installed."""
    bindir = pg_bin_dir()
    if bindir is None:
        return "PostgreSQL binaries not found (apt-get install postgresql-15; or set GL10M_PG_BIN)"
    share = _sharedir(bindir)
    if share is None or not (share / "extension" / POSTGIS_CONTROL).is_file():
        return f"PostGIS is not installed for {bindir.parent.name} (apt-get install postgresql-{bindir.parent.name}-postgis-3)"
    try:
        import psycopg  # noqa: F401
        import pypgstac  # noqa: F401
    except ImportError as e:
        return f"pypgstac is not installed ({e.name}): pip install 'pypgstac[psycopg]'"
    return None


def _run_as() -> str | None:
    """The unprivileged user to run PostgreSQL as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PgstacError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PgstacServer:
    """A running pgstac cluster and its STAC API. Context manager; close() is idempotent."""

    def __init__(self) -> None:
        self.tmp: Path | None = None
        self.dsn: str = ""
        self.stac_url: str = ""
        self.pg_port: int = 0
        self.n_items = 0
        self._bindir: Path | None = None
        self._user: str | None = None
        self._api: subprocess.Popen | None = None
        self._pg_started = False
        self._closed = False
        self._lock = threading.Lock()

    # -- running PostgreSQL tools -----------------------------------------------------------
    def _pg(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        assert self._bindir is not None and self.tmp is not None
        kw = {"user": self._user} if self._user else {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.tmp)}
        p = subprocess.run([str(self._bindir / tool), *args], capture_output=True, text=True,
                           timeout=timeout, cwd=self.tmp, env=env, **kw)
        if p.returncode != 0:
            last = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
            raise PgstacError(f"{tool} failed (exit {p.returncode}): {last[-1] if last else 'no output'}")
        return p

    def _start_cluster(self) -> None:
        data, sock = self.tmp / "data", self.tmp / "sock"
        sock.mkdir()
        if self._user:
            for p in (self.tmp, sock):
                shutil.chown(p, user=self._user)
        self._pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-sync", "--locale=C")
        last: Exception | None = None
        for _ in range(5):  # a free port may be taken before the postmaster binds it: retry
            port = _serve.free_port()
            opts = (f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
            try:
                self._pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.tmp / "postgres.log"),
                         "-w", "-t", "30", "start")
            except PgstacError as e:
                last = e
                continue
            self._pg_started, self.pg_port = True, port
            self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            return
        raise PgstacError(f"PostgreSQL did not start: {last}")

    def _stop_cluster(self) -> None:
        if self._pg_started:
            self._pg_started = False
            with contextlib.suppress(Exception):
                self._pg("pg_ctl", "-D", str(self.tmp / "data"), "-m", "immediate", "-w", "stop", timeout=30)

    # -- pgstac -------------------------------------------------------------------------------
    def load(self, collections: list[dict], items: list[dict]) -> None:
        """pypgstac migrate (once), then insert `collections` and `items` (rewritten hrefs)."""
        import psycopg
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods
        from pypgstac.migrate import Migrate

        try:
            # pgstac's functions find their tables through search_path; pypgstac sets it on its
            # own connections, an API server connecting as this (super)user does not.
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("ALTER ROLE postgres SET search_path TO pgstac, public")
            with PgstacDB(dsn=self.dsn) as db:
                Migrate(db).run_migration()
                loader = Loader(db=db)
                if collections:
                    loader.load_collections(iter(collections), insert_mode=Methods.upsert)
                if items:
                    loader.load_items(iter(items), insert_mode=Methods.upsert)
        except Exception as e:  # psycopg / pypgstac errors: one line
            raise PgstacError(f"loading pgstac failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        self.n_items += len(items)

    def _start_api(self, timeout: float) -> None:
        base = _serve.rustac_command(self.tmp)
        for attempt in range(5):
            port = _serve.free_port()
            cmd = base + ["serve", "--addr", f"127.0.0.1:{port}", "--pgstac", self.dsn]
            self._api = _serve._popen(cmd, self.tmp / f"rustac-{attempt}.log",
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                _serve.wait_ready(url + "/", self._api, timeout, "the pgstac STAC API (rustac serve --pgstac)",
                                  check=lambda doc: isinstance(doc, dict) and doc.get("type") == "Catalog")
            except _serve.ServeError as e:
                _serve._stop_process(self._api)
                self._api = None
                if attempt < 4 and "in use" in str(e).lower():
                    continue
                raise PgstacError(str(e)) from None
            self.stac_url = url
            return

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _serve._stop_process(self._api)
        self._stop_cluster()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def __enter__(self) -> "PgstacServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PgstacServer(stac_url={self.stac_url!r}, dsn={self.dsn!r})"


def start(collections: Iterable[dict] = (), items: Iterable[dict] = (), *, timeout: float = 60.0) -> PgstacServer:
    """Start a cluster, migrate pgstac, load `collections` and `items`, serve them; return it."""
    why = missing()
    if why:
        raise PgstacError(why)
    s = PgstacServer()
    atexit.register(s.close)
    try:
        s._bindir = pg_bin_dir()
        s._user = _run_as()
        s.tmp = Path(tempfile.mkdtemp(prefix="gl10m-pgstac-"))
        s._start_cluster()
        s.load(list(collections), list(items))
        s._start_api(timeout)
    except BaseException:
        s.close()
        raise
    return s


def serve_world(world: str | Path, http_url: str, *, timeout: float = 60.0) -> PgstacServer:
    """Serve a world folder's STAC items from pgstac, asset hrefs pointed at `http_url`
    (the Range HTTP server of a running :func:`gl10m.testbed.serve.serve`)."""
    collections, items = _serve.load_world_stac(world)
    if not collections:  # pgstac needs each item's collection to exist
        collections = [{"type": "Collection", "stac_version": "1.0.0", "id": cid, "description": cid,
                        "license": "proprietary", "links": [],
                        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                   "temporal": {"interval": [[None, None]]}}}
                       for cid in sorted({str(it.get("collection")) for it in items})]
    items = [_serve.rewrite_item(it, http_url) for it in items]
    collections = [_serve.rewrite_collection(c, http_url) for c in collections]
    return start(collections, items, timeout=timeout)
