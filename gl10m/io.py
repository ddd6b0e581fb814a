"""Atomic file writes: temp file in the same folder, fsync, rename. Nothing half-written.

Also the small helpers every writer and reader shares: :func:`fsync_dir`, :func:`is_url`,
:func:`jsonable`.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(d: str | Path) -> None:
    """Make a rename or a new entry in folder `d` durable (fsync the folder). Best effort: a
    filesystem that cannot open or fsync a folder is not an error."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_url(source: str | Path) -> bool:
    """Does `source` name a URL (``scheme://...``, file:// included) rather than a plain path?"""
    return "://" in str(source)


def jsonable(value):
    """`value` as plain JSON values: numpy scalars become numbers (``.item()``), anything else
    JSON does not know becomes its ``str``."""
    import json

    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    On any exception the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=f".tmp{sfx}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600; outputs get the usual 0666 & ~umask
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_TEMP_OWNER = re.compile(r"\.(\d+)-[A-Za-z0-9_]+(?:\.old)?\.tmp")


def temp_prefix(name: str) -> str:
    """Prefix of a temp file or folder beside `name`: ``.{name}.{pid}-``, so that a cleaner can
    tell whose it is (:func:`is_orphan_temp`)."""
    return f".{name}.{os.getpid()}-"


def is_orphan_temp(name: str) -> bool:
    """Is the temp file/folder `name` (``.{target}.{pid}-{random}.tmp...``) left by a process that
    no longer runs on this host? Temp names without a pid (written by older versions) count as
    orphans; the temp files of this process and of any other live process are never orphans."""
    from gl10m.lock import pid_alive

    m = None
    for m in _TEMP_OWNER.finditer(name):
        pass
    if m is None:
        return True
    pid = int(m.group(1))
    return pid != os.getpid() and not pid_alive(pid)


def clean_temp(folder: str | Path) -> int:
    """Remove leftover temp files of interrupted atomic writes under `folder` (only orphans:
    :func:`is_orphan_temp`, never another live process's); return how many."""
    n = 0
    for p in Path(folder).rglob(".*.tmp*"):
        if p.is_file() and is_orphan_temp(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


def ensure_dir(path: str | Path, what: str = "folder") -> Path:
    """Create folder `path` (and its parents) for writing, or raise a one-line UserError: a parent
    or the path itself is a regular file, it cannot be created, or it is not writable. For the
    driver to call before a stage starts, so a bad output path fails before anything is written."""
    from gl10m.errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: the {what} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{path}: cannot create the {what}: a parent is a file, not a folder") from None
    except NotADirectoryError:
        raise UserError(f"{path}: cannot create the {what}: a parent is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"{path}: cannot create the {what} ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: the {what} is not writable")
    return path
