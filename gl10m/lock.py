"""One writer per work dir.

Every command that writes into a work dir (``index``, ``plan``, ``download``, ``shard``, ``demo``,
``model fit``/``features`` writing under one, ``testbed scenes`` writing its out dir) holds
:func:`workdir_lock` while it runs. A second writer gets a :class:`WorkdirBusy` at once (exit 2,
one line naming the holder: pid, host, command, since when). Read-only commands (``status``,
``verify``, ``stats``, ``show``, loading) never take it.

The lock is an OS lock (``fcntl.flock``, exclusive, non-blocking) on ``W/gl10m.lock``; the file
also holds a JSON record of the holder, for the message. The kernel releases a flock when its
holder dies, however it dies (``kill -9`` included), so a lock left by a dead process is simply
taken over: the stale record is overwritten. The lock file itself is never removed (removing it
would let two processes lock two different files of the same name).

Within one process the lock is re-entrant (``demo`` runs ``index``, ``download``, ``shard`` and
``model fit`` on the same work dir). A work dir on a file system without working ``flock`` (some
network mounts) is not protected against writers on other hosts.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from gl10m.errors import UserError

LOCK_NAME = "gl10m.lock"

_held: dict[str, list] = {}  # realpath of the work dir -> [fd, depth], this process's locks
_guard = threading.Lock()


class WorkdirBusy(UserError):
    """Another process is writing into this work dir (exit 2, one line)."""


def _record(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _read_record(path: Path) -> dict:
    """The holder's record (a few tries: the holder writes it right after taking the lock)."""
    for _ in range(20):
        try:
            rec = json.loads(path.read_text() or "null")
            if isinstance(rec, dict):
                return rec
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return {}


def pid_alive(pid: int) -> bool:
    """Is process `pid` running on this host?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_root(path: str | Path) -> Path | None:
    """The outermost gl10m work dir (a folder holding a ledger or a lock file) at or above `path`,
    or None: what a writer of `path` locks (a model dir inside W locks W)."""
    p = Path(path).resolve()
    root = None
    for d in (p, *p.parents):
        if (d / "ledger.sqlite").is_file() or (d / LOCK_NAME).is_file():
            root = d
    return root


def enclosing_lock(path: str | Path, *, what: str = "work dir"):
    """:func:`workdir_lock` for a writer of `path` that may lie inside a work dir: the work dir it
    lies in (:func:`lock_root` of its nearest existing folder) if any, else `path` itself."""
    p = Path(path).resolve()
    base = next((d for d in (p, *p.parents) if d.is_dir()), p)
    return workdir_lock(lock_root(base) or p, what=what)


def describe(rec: dict) -> str:
    if not rec:
        return "another process (no holder record)"
    who = f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}"
    gone = ""
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) and not pid_alive(rec["pid"]):
        gone = "; that process is gone but a process it started still holds the lock"
    return f"{who} (`{rec.get('command', '?')}`, since {rec.get('since', '?')}{gone})"


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, command: str | None = None, *, create: bool = True,
                 what: str = "work dir") -> Iterator[Path | None]:
    """Hold the work dir's writer lock for the block; raise :class:`WorkdirBusy` at once when
    another process holds it. `workdir` is created if missing (and removed again when the block
    wrote nothing into it); with ``create=False`` a missing work dir is left alone and nothing is
    locked (for commands that need an existing one and fail with their own message without it)."""
    import fcntl

    from gl10m.io import ensure_dir

    if not create and not Path(workdir).is_dir():
        yield None
        return
    created = not Path(workdir).exists()
    wd = ensure_dir(Path(workdir), what).resolve()
    key = str(wd)
    with _guard:
        if key in _held:  # re-entrant within this process
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield wd
        finally:
            with _guard:
                _held[key][1] -= 1
        return
    command = command or " ".join(["gl10m", *sys.argv[1:]])[:300]
    path = wd / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        rec = _read_record(path)
        raise WorkdirBusy(f"{wd} is being written by {describe(rec)}: one writer per work dir; wait for it "
                          "to finish (status, verify, stats and show work meanwhile)") from None
    try:
        from gl10m.errors import redact

        rec = _record(redact(command))
        data = (json.dumps(rec) + "\n").encode()
        os.ftruncate(fd, 0)  # a dead holder's record (its flock went with it) is overwritten
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        with _guard:
            _held[key] = [fd, 1]
        try:
            yield wd
        finally:
            with _guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: no holder record, the file stays
    finally:
        if created:  # a command that failed before writing anything leaves nothing behind
            with contextlib.suppress(OSError):
                if [p.name for p in wd.iterdir()] == [LOCK_NAME]:
                    path.unlink()
                    wd.rmdir()
        os.close(fd)  # releases the flock
