"""Where the shards are: a shards folder (manifest + sidecar index), shard paths/URLs or brace
patterns, local, HTTP or fsspec -> the split's shards (with their index rows, in tar order)."""
from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from gl10m import samples as smp
from gl10m.data.common import N_FIELDS, LoaderError, field_pos
from gl10m.io import is_url
from gl10m.shards import INDEX_NAME, MANIFEST_NAME, MAX_MEMBER_BYTES

_BLOCK = 512  # a tar header: no member starts before the first one ends


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def local_path(s: str) -> str | None:
    """The local path of `s` (plain path or file:// URL), else None."""
    if s.startswith("file://"):
        return s[len("file://"):]
    return None if is_url(s) else s


def _join(base: str, *parts: str) -> str:
    loc = local_path(base)
    if loc is not None:
        return str(Path(loc).joinpath(*parts))
    return posixpath.join(base.rstrip("/"), *parts)


def _expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def fsspec_fs(url: str):
    """(filesystem, path) of an fsspec URL, or a one-line LoaderError (no backend, bad URL)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise LoaderError(f"reading {url.split('://')[0]}:// URLs needs an fsspec backend that is not "
                          f"installed ({e})") from None
    except ValueError as e:
        raise LoaderError(f"{url}: {e}") from None


def http_session():
    """A requests session that asks for the bytes as stored (no Content-Encoding)."""
    import requests

    s = requests.Session()
    s.headers["Accept-Encoding"] = "identity"
    return s


def _read_bytes(url: str) -> bytes:
    loc = local_path(url)
    try:
        if loc is not None:
            return Path(loc).read_bytes()
        if url.startswith(("http://", "https://")):
            with http_session() as s:
                r = s.get(url, timeout=60)
                if r.status_code == 404:
                    raise FileNotFoundError(url)
                r.raise_for_status()
                return r.content
        fs, path = fsspec_fs(url)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise LoaderError(f"{url}: cannot read ({e})") from None


def _safe_shard_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or not name.endswith(".tar"):
        raise LoaderError(f"shard name {name!r} is not a plain .tar file name")
    return name


@dataclass(frozen=True)
class Shard:
    """One shard of a resolved source: its URL, its file name and its rows in the index."""

    url: str
    name: str
    rows: np.ndarray | None = None  # index rows (into ShardIndex arrays) of this shard, in tar order


@dataclass(frozen=True)
class ShardIndex:
    """The sidecar index rows of the split read, as arrays: keys, sha256, member offsets and sizes."""

    keys: list
    sha256: list
    offsets: np.ndarray  # [n, n_fields] int64, smp.fields_for(bands) order
    sizes: np.ndarray    # [n, n_fields] int32
    bands: str = "rgb"   # what the samples hold (every sample the same: the index is refused otherwise)

    @property
    def pos(self) -> dict[str, int]:
        return field_pos(self.bands)


def _read_index(raw: bytes, split: str | None,
                shard_names: Iterable[str]) -> tuple[ShardIndex, dict[str, np.ndarray]]:
    """Index rows of `split` (all splits when None) whose shard is in `shard_names`, as arrays in
    FIELDS order; and, per shard name, its rows sorted by offset (tar order)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(io.BytesIO(raw), columns=["key", "split", "shard", "fields", "offsets", "sizes", "sha256"])
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise LoaderError(f"{INDEX_NAME}: not a gl10m shard index ({e})") from None
    names = sorted(set(shard_names))
    mask = pc.is_in(t["shard"], value_set=pa.array(names, pa.string()))
    if split is not None:
        mask = pc.and_(mask, pc.equal(t["split"], split))
    t = t.filter(mask)
    n = t.num_rows
    if n == 0:
        return ShardIndex([], [], np.zeros((0, N_FIELDS), np.int64), np.zeros((0, N_FIELDS), np.int32)), {}

    bands = smp.bands_of(t["fields"].combine_chunks().flatten().unique().to_pylist())
    pos = field_pos(bands)
    nf = len(pos)

    def square(col: str) -> pa.Array:
        arr = t[col].combine_chunks()
        if not (pc.list_value_length(arr).to_numpy(zero_copy_only=False) == nf).all():
            raise LoaderError(f"{INDEX_NAME}: a sample's {col} do not list the {nf} schema fields"
                              + (f" (bands {bands})" if bands != "rgb" else ""))
        return arr.flatten()

    enc = square("fields").dictionary_encode()
    vocab = enc.dictionary.to_pylist()
    unknown = [v for v in vocab if v not in pos]
    if unknown:
        raise LoaderError(f"{INDEX_NAME}: field {unknown[0]!r} is not in the sample schema")
    canon = np.asarray([pos[v] for v in vocab], np.int64)[enc.indices.to_numpy().reshape(n, nf)]
    if not (np.sort(canon, axis=1) == np.arange(nf)).all():
        raise LoaderError(f"{INDEX_NAME}: a sample's field set differs from the schema")
    offs = square("offsets").to_numpy().reshape(n, nf).astype(np.int64)
    sizes = square("sizes").to_numpy().reshape(n, nf)
    if offs.min() < _BLOCK or sizes.min() < 0:
        raise LoaderError(f"{INDEX_NAME}: offsets/sizes out of range")
    if sizes.max() > MAX_MEMBER_BYTES:  # checked before any read: a size is also a read length
        r = int(np.argmax(sizes.max(axis=1)))
        raise LoaderError(f"{INDEX_NAME}: sample {t['key'][r].as_py()} ({t['shard'][r].as_py()}): a member of "
                          f"{int(sizes.max())} bytes, above the per-member cap of {MAX_MEMBER_BYTES >> 20} MiB "
                          "(gl10m.shards.MAX_MEMBER_BYTES)")
    sizes = sizes.astype(np.int32)  # a member is < 2 GiB; halves the index in memory
    o2, s2 = np.empty_like(offs), np.empty_like(sizes)
    np.put_along_axis(o2, canon, offs, axis=1)
    np.put_along_axis(s2, canon, sizes, axis=1)
    keys = t["key"].to_pylist()
    for k in keys:
        try:
            smp.check_key(k)
        except smp.SampleError as e:
            raise LoaderError(f"{INDEX_NAME}: {e}") from None
    shard_col = np.asarray(t["shard"].to_pylist(), dtype=object)
    first = o2.min(axis=1)
    by_shard = {}
    for name in names:
        rows = np.flatnonzero(shard_col == name)
        if len(rows):
            by_shard[name] = rows[np.argsort(first[rows], kind="stable")]
    return ShardIndex(keys, t["sha256"].to_pylist(), o2, s2, bands), by_shard


def resolve(source, split: str | None, index: str | os.PathLike | None):
    """-> (shards, ShardIndex or None, split)."""
    if isinstance(source, (str, os.PathLike)):
        urls = _expand(os.fspath(source))
    elif isinstance(source, Iterable):
        urls = [u for s in source for u in _expand(os.fspath(s))]
    else:
        raise LoaderError(f"source must be a shards folder, a shard path/URL or a list of them, "
                          f"got {type(source).__name__}")
    if not urls:
        raise LoaderError("no shards given")
    if len(urls) == 1 and not urls[0].endswith(".tar"):
        return _resolve_dir(urls[0], split, index)
    for u in urls:
        if not u.endswith(".tar"):
            raise LoaderError(f"{u}: not a .tar shard (a shards folder must be given alone)")
    names = [posixpath.basename(u.rstrip("/")) for u in urls]
    idx_url = os.fspath(index) if index is not None else None
    if idx_url is None:
        loc = local_path(urls[0])
        if loc is not None:
            cand = Path(loc).parent.parent / INDEX_NAME
            if cand.exists():
                idx_url = str(cand)
                split = split or Path(loc).parent.name
    if idx_url is None:
        return [Shard(u, n) for u, n in zip(urls, names)], None, split
    try:
        raw = _read_bytes(idx_url)
    except FileNotFoundError:
        raise LoaderError(f"{idx_url}: no shard index there") from None
    ix, by_shard = _read_index(raw, split, names)
    return [Shard(u, n, by_shard.get(n)) for u, n in zip(urls, names)], ix, split


def _resolve_dir(base: str, split: str | None, index):
    try:
        manifest = json.loads(_read_bytes(_join(base, MANIFEST_NAME)))
    except FileNotFoundError:
        raise LoaderError(f"{base}: not a shards folder (no {MANIFEST_NAME}) and not a .tar shard") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoaderError(f"{_join(base, MANIFEST_NAME)}: not valid JSON ({e})") from None
    listed = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise LoaderError(f"{_join(base, MANIFEST_NAME)}: lists no shards")
    if split is None:
        if len(listed) != 1:
            raise LoaderError(f"{base}: name a split (split=...), one of {', '.join(sorted(listed))}")
        split = next(iter(listed))
    if split not in listed:
        raise LoaderError(f"{base}: no split {split!r}; it has {', '.join(sorted(listed))}")
    names = [_safe_shard_name(e.get("name") if isinstance(e, dict) else e) for e in listed[split]]
    if not names:
        raise LoaderError(f"{base}: split {split!r} has no shards")
    urls = [_join(base, split, n) for n in names]
    idx_url = os.fspath(index) if index is not None else _join(base, INDEX_NAME)
    try:
        raw = _read_bytes(idx_url)
    except FileNotFoundError:
        if index is not None:
            raise LoaderError(f"{idx_url}: no shard index there") from None
        return [Shard(u, n) for u, n in zip(urls, names)], None, split
    ix, by_shard = _read_index(raw, split, names)
    return [Shard(u, n, by_shard.get(n)) for u, n in zip(urls, names)], ix, split
