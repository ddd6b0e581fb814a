"""Pinned OSM PBF inputs: a local path, or a download with resume and a checksum.

`fetch_pbf(source, dest_dir)`:
* a local path (or file:// URL) must exist and be readable; it is returned as is (and checked
  against `sha256` when one is pinned);
* an http(s) URL (a dated Geofabrik extract, see Profile.pbf_source) is downloaded into
  `dest_dir/<name>.part`, resuming a partial `.part` with an HTTP Range request (a server that
  ignores Range gets a fresh start), retried a few times on a dropped connection (gl10m.sources.retry), checked
  (the pinned `sha256`; else Geofabrik's `<url>.md5` sidecar when the server has one) and only
  then renamed to `dest_dir/<name>` (atomic). A file already there is reused (dated extracts do
  not change; with a pinned sha256 it is verified first). A lock file serialises concurrent
  fetches of the same file.
Every failure is one `PbfError` line (HTTP status, checksum mismatch, missing file...).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import requests

from gl10m.errors import UserError
from gl10m.io import fsync_dir, is_url
from gl10m.sources.retry import retry

CHUNK = 1 << 20  # hashing
NET_CHUNK = 1 << 16  # network reads: small, so a dropped link loses little
USER_AGENT = "gl10m (pinned OSM extract download)"


class PbfError(UserError, ValueError):
    """A PBF source that cannot be used (one line)."""


class PbfUnavailable(PbfError):
    """The server or the network, not the source: a download that kept failing, an HTTP 429 or
    5xx. Transient: the index pipeline records it as failed and the next run tries again."""

    transient = True


def file_digest(path: str | Path, algo: str = "sha256", chunk: int = CHUNK) -> str:
    """Hex digest of a file, read in chunks (sha256 by default)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _local(source: str, sha256: str | None) -> Path:
    s = str(source)
    if s.startswith("file://"):
        s = unquote(urlparse(s).path)
    p = Path(s)
    if not p.is_file():
        raise PbfError(f"{p}: no such PBF file")
    if not os.access(p, os.R_OK):
        raise PbfError(f"{p}: not readable")
    if sha256:
        got = file_digest(p)
        if got != sha256.lower():
            raise PbfError(f"{p}: sha256 mismatch (pinned {sha256.lower()}, file has {got})")
    return p


def _remote_md5(url: str, session: requests.Session, timeout: float) -> str | None:
    """Geofabrik's `<url>.md5` sidecar ("<hex>  <name>"), or None when the server has none."""
    try:
        r = session.get(url + ".md5", timeout=timeout)
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    tok = r.text.strip().split()
    if tok and len(tok[0]) == 32 and all(c in "0123456789abcdefABCDEF" for c in tok[0]):
        return tok[0].lower()
    return None


def _download(url: str, part: Path, session: requests.Session, timeout: float,
              progress: Callable[[int, int | None], None] | None) -> int | None:
    """Fill `part` with the whole resource, resuming from its current size. Returns the total
    size when the server said it (None otherwise). Raises requests errors on a dropped link."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and have:
            # nothing left past our offset: complete if the server's length is ours
            h = session.head(url, timeout=timeout, headers={"User-Agent": USER_AGENT})
            total = int(h.headers["Content-Length"]) if "Content-Length" in h.headers else None
            if total == have:
                return total
            part.unlink()
            return _download(url, part, session, timeout, progress)
        if r.status_code not in (200, 206):
            cls = PbfUnavailable if r.status_code in (408, 425, 429) or r.status_code >= 500 else PbfError
            raise cls(f"{url}: HTTP {r.status_code} {r.reason}".rstrip())
        total = None
        if r.status_code == 206:
            cr = r.headers.get("Content-Range", "")  # bytes START-END/TOTAL
            try:
                start = int(cr.split()[1].split("-")[0])
                total = int(cr.split("/")[1]) if cr.split("/")[1] != "*" else None
            except (IndexError, ValueError):
                raise PbfError(f"{url}: bad Content-Range {cr!r}") from None
            if start != have:
                raise PbfError(f"{url}: asked to resume at byte {have}, server sent {start}")
            mode = "ab"
        else:  # the server ignored Range: start over
            have = 0
            mode = "wb"
            if "Content-Length" in r.headers:
                total = int(r.headers["Content-Length"])
        done = have
        with open(part, mode) as f:
            for b in r.iter_content(NET_CHUNK):
                f.write(b)
                done += len(b)
                if progress:
                    progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        if total is not None and done != total:
            raise requests.ConnectionError(f"short read: {done} of {total} bytes")
        return total


def fetch_pbf(source: str, dest_dir: str | Path, *, sha256: str | None = None,
              progress: Callable[[int, int | None], None] | None = None,
              retries: int = 3, timeout: float = 60.0, backoff_s: float = 1.0,
              session: requests.Session | None = None) -> Path:
    """Return a local, verified path for a PBF `source` (local path or http(s) URL).

    progress(bytes_done, bytes_total_or_None) is called as data arrives.
    """
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256)):
        raise PbfError(f"sha256 {sha256!r} is not 64 hex digits")
    if not is_url(source) or str(source).startswith("file://"):
        return _local(source, sha256)
    if urlparse(str(source)).scheme not in ("http", "https"):
        raise PbfError(f"{source}: unsupported URL scheme (http, https or a local path)")

    name = Path(unquote(urlparse(source).path)).name
    if not name:
        raise PbfError(f"{source}: URL names no file")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    part = dest_dir / (name + ".part")
    own = session is None
    session = session or requests.Session()
    lock = open(dest_dir / (name + ".lock"), "a")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if dest.exists():
            if not sha256 or file_digest(dest) == sha256.lower():
                return dest
            dest.unlink()  # the pin changed or the file is damaged: fetch again
        try:  # a dropped link resumes where it stopped (the .part file keeps what arrived)
            retry(lambda: _download(source, part, session, timeout, progress), attempts=retries + 1,
                  base_delay=backoff_s, max_delay=max(backoff_s * 2 ** retries, backoff_s),
                  retry_on=lambda e: isinstance(e, requests.RequestException), sleep=time.sleep)
        except requests.RequestException as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PbfUnavailable(f"{source}: download failed after {retries} retries ({msg}); "
                                 f"partial data kept in {part}") from None
        if sha256:
            got, want, algo = file_digest(part), sha256.lower(), "sha256"
        else:
            want = _remote_md5(source, session, timeout)
            got, algo = (file_digest(part, "md5") if want else None), "md5"
        if want is not None and got != want:
            part.unlink()
            raise PbfError(f"{source}: {algo} mismatch (expected {want}, downloaded file has {got})")
        os.replace(part, dest)
        fsync_dir(dest_dir)
        return dest
    finally:
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()
        if own:
            session.close()
