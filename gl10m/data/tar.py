"""Byte access to shards: random reads by offset (local, HTTP Range, seekable fsspec), streams
(the fallback), and :class:`SampleReader` (random access to raw member bytes). The tar format
itself (members read at their indexed offsets and checked against their tar headers, streamed
members checked before they are read) is :mod:`gl10m.shards`."""
from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np

from gl10m.data.common import FIELD_POS, LoaderError
from gl10m.data.sources import INDEX_NAME, fsspec_fs, http_session, local_path, resolve
from gl10m.shards import ShardError, read_members

MAX_OPEN = 8  # open shard readers per consumer (least recently used closed first)


# ---------------------------------------------------------------------------------------------
# Byte access: random reads (sparse) and streams (fallback)
# ---------------------------------------------------------------------------------------------
class NotSeekable(Exception):
    """The shard's store cannot read by offset: the caller streams it instead."""


class _LocalReader:
    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise LoaderError(f"{path}: cannot open shard ({e.strerror})") from None
        self.url = path

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise LoaderError(f"{self.url}: truncated (wanted {size} bytes at {offset})")
        return data

    def close(self, _close=os.close):  # bound now: a loader dropped at interpreter exit closes after `os` is gone
        _close(self.fd)


class _HttpReader:
    def __init__(self, url: str):
        import requests

        self.url, self.s = url, http_session()
        try:
            r = self.s.get(url, headers={"Range": "bytes=0-0"}, stream=True, timeout=60)
            r.close()
        except requests.RequestException as e:
            self.s.close()
            raise LoaderError(f"{url}: cannot open shard ({e})") from None
        if r.status_code != 206:
            self.s.close()
            if r.status_code in (200, 416):
                raise NotSeekable(url)
            raise LoaderError(f"{url}: HTTP {r.status_code}")

    def read(self, offset: int, size: int) -> bytes:
        import requests

        try:
            r = self.s.get(self.url, headers={"Range": f"bytes={offset}-{offset + size - 1}"}, timeout=60)
        except requests.RequestException as e:
            raise LoaderError(f"{self.url}: range read failed ({e})") from None
        if r.status_code != 206 or len(r.content) != size:
            raise LoaderError(f"{self.url}: range read failed (HTTP {r.status_code}, {len(r.content)} of {size} bytes)")
        return r.content

    def close(self):
        self.s.close()


class _FsspecReader:
    def __init__(self, url: str):
        fs, path = fsspec_fs(url)
        try:
            self.f = fs.open(path, "rb")
        except FileNotFoundError:
            raise LoaderError(f"{url}: shard not found") from None
        if not self.f.seekable():
            self.f.close()
            raise NotSeekable(url)
        self.url = url

    def read(self, offset: int, size: int) -> bytes:
        self.f.seek(offset)
        data = self.f.read(size)
        if len(data) != size:
            raise LoaderError(f"{self.url}: truncated (wanted {size} bytes at {offset})")
        return data

    def close(self):
        self.f.close()


def open_reader(url: str):
    """A reader of byte ranges of the shard at `url` (local file, HTTP Range or fsspec); raises
    NotSeekable where the store cannot seek."""
    loc = local_path(url)
    if loc is not None:
        return _LocalReader(loc)
    if url.startswith(("http://", "https://")):
        return _HttpReader(url)
    return _FsspecReader(url)


class _HttpStream(io.RawIOBase):
    """A streaming GET as a readable file that closes its session too."""

    def __init__(self, url: str):
        self.s = http_session()
        try:
            self.r = self.s.get(url, stream=True, timeout=60)
            self.r.raise_for_status()
        except Exception:
            self.s.close()
            raise
        self.r.raw.decode_content = True

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.r.raw.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.r.close()
            self.s.close()
        super().close()


def open_stream(url: str):
    """The shard at `url` as a readable binary stream (the fallback to reads by offset)."""
    loc = local_path(url)
    try:
        if loc is not None:
            return open(loc, "rb")
        if url.startswith(("http://", "https://")):
            return io.BufferedReader(_HttpStream(url), 1 << 20)
        fs, path = fsspec_fs(url)
        return fs.open(path, "rb")
    except OSError as e:
        raise LoaderError(f"{url}: cannot open shard ({e})") from None
    except Exception as e:  # requests' HTTPError/ConnectionError
        if type(e).__module__.startswith("requests"):
            raise LoaderError(f"{url}: cannot open shard ({e})") from None
        raise


def read_sample_members(reader, shard: str, key: str, offs: np.ndarray, sizes: np.ndarray,
                        fields: Sequence[str], pos: dict[str, int] = FIELD_POS) -> dict[str, bytes]:
    """Read `fields` of one sample at their indexed offsets with :func:`gl10m.shards.read_members`
    (adjacent members in one read, each tar header checked against the index). `pos`: the index's
    field positions (``ShardIndex.pos``)."""
    try:
        return read_members(reader.read, shard, key,
                            [(f, offs[pos[f]], sizes[pos[f]]) for f in fields])
    except ShardError as e:
        raise LoaderError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Random access to raw member bytes (evaluation, timing harnesses)
# ---------------------------------------------------------------------------------------------
class SampleReader:
    """Random access to the members of a split's samples, as raw bytes, by index order.

    ``reader.read(i, fields)`` returns ``{field: bytes}`` for sample ``i`` (``reader.keys[i]``),
    reading only those members (by offset, checked against their tar headers): the IO of a
    pipeline that requests only some HR tiles, separate from decoding. :func:`decode_lr`,
    :func:`decode_tiles`, :func:`decode_labels` then decode them. Needs the shard index (a shards
    folder, local or over HTTP with Range). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, source, split: str | None = None, *, index: str | os.PathLike | None = None):
        shards, ix, self.split = resolve(source, split, index)
        if ix is None:
            raise LoaderError(f"{shards[0].url}: random access needs the shard index ({INDEX_NAME})")
        self._index = ix
        self._shards = shards
        self._rows: list[tuple[int, int]] = [(si, int(r)) for si, s in enumerate(shards)
                                             if s.rows is not None for r in s.rows]
        self._readers: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def keys(self) -> list[str]:
        return [self._index.keys[r] for _, r in self._rows]

    def read(self, i: int, fields: Sequence[str]) -> dict[str, bytes]:
        if not 0 <= i < len(self._rows):
            raise LoaderError(f"sample {i} is outside 0..{len(self._rows) - 1}")
        bad = [f for f in fields if f not in self._index.pos]
        if bad:
            raise LoaderError(f"{bad[0]!r} is not a field of the sample schema")
        si, row = self._rows[i]
        s = self._shards[si]
        if s.url not in self._readers:
            while len(self._readers) >= MAX_OPEN:  # bounded: a split may have hundreds of shards
                self._readers.pop(next(iter(self._readers))).close()
            try:
                self._readers[s.url] = open_reader(s.url)
            except NotSeekable:
                raise LoaderError(f"{s.url}: random access needs a seekable shard (a local file or "
                                  "an HTTP server that honours Range)") from None
        return read_sample_members(self._readers[s.url], s.name, self._index.keys[row],
                             self._index.offsets[row], self._index.sizes[row], list(fields), self._index.pos)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> "SampleReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
