"""Loaders: gl10m WebDataset shards -> a torch ``IterableDataset`` of decoded samples.

::

    from gl10m import data
    ds = data.load("W/shards", split="train", tiles=[0, 11, 45], shuffle=500)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=data.collate)

Each item is a dict:

* ``key`` (str), ``meta`` (dict from ``meta.json``; absent with ``decode_meta=False``);
* ``lr``: uint8 [3, 268, 268]; ``hr``: uint8 [n, 3, 268, 268], the requested tiles in the
  requested order; ``tiles``: int64 [n], their indices (``row*10 + col``);
* ``labels``: uint8 [66] multi-hot; ``tile_frac``: float16 [n, 66], the concept fractions of
  the returned tiles.

``lr`` and ``hr`` are channels-last views (shape C, H, W over H, W, C memory, as decoded): no
CPU copy is spent on a transpose. Ship them to the GPU as uint8 and normalise there; call
``.contiguous()`` where a kernel wants NCHW memory.

Sources: a shards folder (``W/shards``: ``manifest.json`` lists the split's shards, the sidecar
``index.parquet`` gives each member's byte offset), a list of shard paths/URLs, or a brace
pattern (``.../gl10m-train-{000000..000009}.tar``). Local paths, ``file://``, ``http(s)://``
(``requests``) and any other fsspec URL (``s3://`` needs s3fs, ``gs://`` gcsfs, ``memory://``).
For a list of local shards the index is found at ``<shard>/../../index.parquet`` when present.

Reads: with an index and a seekable shard (a local file, an HTTP server that honours Range, a
seekable fsspec file) only the needed members are read, by offset: ``meta.json``,
``labels.npy``, ``lr.png`` and ``tile_frac.npy`` in one read (they are adjacent), then the
selected tiles (adjacent ones merged into one read); the 512-byte tar header in front of every
member read is checked against the index (name and size), so a stale index is an error, not
wrong pixels. Without an index, or when the server ignores Range, the tar is streamed and the
members a sample does not need are skipped without being read into Python or decoded.

Safety: nothing is unpickled (``.npy`` with ``allow_pickle=False``, never ``torch.load``);
member names with absolute paths, ``..`` or folders are refused; a sample whose field set is
not the schema is refused; ``verify=True`` checks each sample's sha256 against the index (it
reads every member of the sample).

Splitting over DDP ranks and DataLoader workers ("consumers", ``world_size * num_workers`` of
them; consumer ``rank * num_workers + worker``): the split's shards are put in one order (the
manifest/list order, or a permutation of it seeded by ``(seed, epoch)`` when shuffling, the same
in every consumer). With at least as many shards as consumers, consumer ``c`` reads shards
``c, c + C, c + 2C, ...`` ("shard" rule). Otherwise every consumer walks all shards in that
order and keeps the samples whose position in the walk (index order = tar order) is ``c`` modulo
``C`` ("sample" rule; with an index it reads only those). Either way every sample is yielded
exactly once per epoch across all consumers. ``split_by="sample"`` forces the sample rule
(balanced counts per rank, useful for DDP); the shard rule gives unequal counts when shards
differ in size. Call ``set_epoch(e)`` each epoch to reshuffle (DataLoader workers get a fresh
copy of the dataset each epoch, so the loader cannot count epochs by itself).

``with_epoch=N`` gives an infinite resampled stream cut into epochs of ``N`` samples per rank
(the rank's workers share them, so every rank yields exactly ``N``): each consumer draws shards
at random with replacement (seeded by seed, epoch and consumer) and reads them through the
shuffle buffer. Samples may repeat within an epoch; that is what resampling means.

Shuffling: ``shuffle=K`` keeps a buffer of K samples per consumer. With an index the buffer
holds references (shard, row) and samples are read and decoded after it; when streaming it holds
the undecoded bytes of the fields a sample needs.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np

from gl10m import samples as smp
from gl10m.errors import UserError
from gl10m.shards import INDEX_NAME, MANIFEST_NAME, MAX_MEMBER_BYTES, ShardError, split_member

try:  # torch is needed to iterate, not to import this module (docs, tooling)
    import torch
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover - exercised only where torch is missing
    torch = None
    IterableDataset = object  # type: ignore[assignment,misc]

TileSpec = Union[str, Sequence[int], Callable[[Any], Any]]

N_FIELDS = len(smp.FIELDS)
FIELD_POS = {f: i for i, f in enumerate(smp.FIELDS)}
HEAD_FIELDS = (smp.META_FIELD, smp.LABELS_FIELD, smp.LR_FIELD, smp.TILE_FRAC_FIELD)
_BLOCK = 512
_MERGE_GAP = 2 * _BLOCK  # members closer than this (padding + next header) are read together
_MAX_OPEN = 8


class LoaderError(UserError, ValueError):
    """A source, split, tile request or shard the loader cannot use."""


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def _is_url(s: str) -> bool:
    return "://" in s


def _local(s: str) -> str | None:
    """The local path of `s` (plain path or file:// URL), else None."""
    if s.startswith("file://"):
        return s[len("file://"):]
    return None if _is_url(s) else s


def _join(base: str, *parts: str) -> str:
    loc = _local(base)
    if loc is not None:
        return str(Path(loc).joinpath(*parts))
    return posixpath.join(base.rstrip("/"), *parts)


def _expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _fsspec_fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise LoaderError(f"reading {url.split('://')[0]}:// URLs needs an fsspec backend that is not "
                          f"installed ({e})") from None
    except ValueError as e:
        raise LoaderError(f"{url}: {e}") from None


def _http_session():
    import requests

    s = requests.Session()
    s.headers["Accept-Encoding"] = "identity"
    return s


def _read_bytes(url: str) -> bytes:
    loc = _local(url)
    try:
        if loc is not None:
            return Path(loc).read_bytes()
        if url.startswith(("http://", "https://")):
            with _http_session() as s:
                r = s.get(url, timeout=60)
                if r.status_code == 404:
                    raise FileNotFoundError(url)
                r.raise_for_status()
                return r.content
        fs, path = _fsspec_fs(url)
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
class _Shard:
    url: str
    name: str
    rows: np.ndarray | None = None  # index rows (into _Index arrays) of this shard, in tar order


@dataclass(frozen=True)
class _Index:
    keys: list
    sha256: list
    offsets: np.ndarray  # [n, N_FIELDS] int64, FIELDS order
    sizes: np.ndarray    # [n, N_FIELDS] int32


def _read_index(raw: bytes, split: str | None, shard_names: Iterable[str]) -> tuple[_Index, dict[str, np.ndarray]]:
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
        return _Index([], [], np.zeros((0, N_FIELDS), np.int64), np.zeros((0, N_FIELDS), np.int32)), {}

    def square(col: str) -> pa.Array:
        arr = t[col].combine_chunks()
        if not (pc.list_value_length(arr).to_numpy(zero_copy_only=False) == N_FIELDS).all():
            raise LoaderError(f"{INDEX_NAME}: a sample's {col} do not list the {N_FIELDS} schema fields")
        return arr.flatten()

    enc = square("fields").dictionary_encode()
    vocab = enc.dictionary.to_pylist()
    unknown = [v for v in vocab if v not in FIELD_POS]
    if unknown:
        raise LoaderError(f"{INDEX_NAME}: field {unknown[0]!r} is not in the sample schema")
    canon = np.asarray([FIELD_POS[v] for v in vocab], np.int64)[enc.indices.to_numpy().reshape(n, N_FIELDS)]
    if not (np.sort(canon, axis=1) == np.arange(N_FIELDS)).all():
        raise LoaderError(f"{INDEX_NAME}: a sample's field set differs from the schema")
    offs = square("offsets").to_numpy().reshape(n, N_FIELDS).astype(np.int64)
    sizes = square("sizes").to_numpy().reshape(n, N_FIELDS)
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
    return _Index(keys, t["sha256"].to_pylist(), o2, s2), by_shard


def _resolve(source, split: str | None, index: str | os.PathLike | None):
    """-> (shards, _Index or None, split)."""
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
        loc = _local(urls[0])
        if loc is not None:
            cand = Path(loc).parent.parent / INDEX_NAME
            if cand.exists():
                idx_url = str(cand)
                split = split or Path(loc).parent.name
    if idx_url is None:
        return [_Shard(u, n) for u, n in zip(urls, names)], None, split
    try:
        raw = _read_bytes(idx_url)
    except FileNotFoundError:
        raise LoaderError(f"{idx_url}: no shard index there") from None
    ix, by_shard = _read_index(raw, split, names)
    return [_Shard(u, n, by_shard.get(n)) for u, n in zip(urls, names)], ix, split


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
        return [_Shard(u, n) for u, n in zip(urls, names)], None, split
    ix, by_shard = _read_index(raw, split, names)
    return [_Shard(u, n, by_shard.get(n)) for u, n in zip(urls, names)], ix, split


# ---------------------------------------------------------------------------------------------
# Byte access: random reads (sparse) and streams (fallback)
# ---------------------------------------------------------------------------------------------
class _NotSeekable(Exception):
    pass


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

    def close(self):
        os.close(self.fd)


class _HttpReader:
    def __init__(self, url: str):
        import requests

        self.url, self.s = url, _http_session()
        try:
            r = self.s.get(url, headers={"Range": "bytes=0-0"}, stream=True, timeout=60)
            r.close()
        except requests.RequestException as e:
            self.s.close()
            raise LoaderError(f"{url}: cannot open shard ({e})") from None
        if r.status_code != 206:
            self.s.close()
            if r.status_code in (200, 416):
                raise _NotSeekable(url)
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
        fs, path = _fsspec_fs(url)
        try:
            self.f = fs.open(path, "rb")
        except FileNotFoundError:
            raise LoaderError(f"{url}: shard not found") from None
        if not self.f.seekable():
            self.f.close()
            raise _NotSeekable(url)
        self.url = url

    def read(self, offset: int, size: int) -> bytes:
        self.f.seek(offset)
        data = self.f.read(size)
        if len(data) != size:
            raise LoaderError(f"{self.url}: truncated (wanted {size} bytes at {offset})")
        return data

    def close(self):
        self.f.close()


def _open_reader(url: str):
    loc = _local(url)
    if loc is not None:
        return _LocalReader(loc)
    if url.startswith(("http://", "https://")):
        return _HttpReader(url)
    return _FsspecReader(url)


class _HttpStream(io.RawIOBase):
    """A streaming GET as a readable file that closes its session too."""

    def __init__(self, url: str):
        self.s = _http_session()
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


def _open_stream(url: str):
    loc = _local(url)
    try:
        if loc is not None:
            return open(loc, "rb")
        if url.startswith(("http://", "https://")):
            return io.BufferedReader(_HttpStream(url), 1 << 20)
        fs, path = _fsspec_fs(url)
        return fs.open(path, "rb")
    except OSError as e:
        raise LoaderError(f"{url}: cannot open shard ({e})") from None
    except Exception as e:  # requests' HTTPError/ConnectionError
        if type(e).__module__.startswith("requests"):
            raise LoaderError(f"{url}: cannot open shard ({e})") from None
        raise


def _parse_header(block: bytes) -> tuple[str, int]:
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        size = -1
    return name.decode("utf-8", "replace"), size


def _read_members(reader, shard: str, key: str, offs: np.ndarray, sizes: np.ndarray,
                  fields: Sequence[str]) -> dict[str, bytes]:
    """Read `fields` of one sample at their indexed offsets, merging adjacent members into one
    read, and check each member's tar header (name, size) against the index."""
    items = sorted(((int(offs[FIELD_POS[f]]), int(sizes[FIELD_POS[f]]), f) for f in fields))
    out: dict[str, bytes] = {}
    i = 0
    while i < len(items):
        j = i
        start = items[i][0] - _BLOCK
        end = items[i][0] + items[i][1]
        while j + 1 < len(items) and items[j + 1][0] - _BLOCK - end <= _MERGE_GAP:
            j += 1
            end = max(end, items[j][0] + items[j][1])
        if start < 0:
            raise LoaderError(f"{shard}: sample {key}: the index gives an offset before the first header")
        buf = reader.read(start, end - start)
        for off, size, f in items[i:j + 1]:
            a = off - start
            name, hsize = _parse_header(buf[a - _BLOCK:a])
            if name != f"{key}.{f}" or hsize != size:
                raise LoaderError(f"{shard}: sample {key}: the index does not match the shard at {f} "
                                  f"(found {name!r}, {hsize} bytes): a stale index?")
            out[f] = buf[a:a + size]
        i = j + 1
    return out


# ---------------------------------------------------------------------------------------------
# Tiles and decoding
# ---------------------------------------------------------------------------------------------
def _tile_indices(sel, where: str) -> tuple[int, ...]:
    if torch is not None and isinstance(sel, torch.Tensor):
        sel = sel.detach().cpu().numpy()
    arr = np.asarray(sel)
    if arr.dtype == bool:
        if arr.shape != (smp.N_TILES,):
            raise LoaderError(f"{where}: a boolean tile mask must have {smp.N_TILES} entries, got shape {arr.shape}")
        arr = np.flatnonzero(arr)
    if arr.size == 0:
        return ()
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise LoaderError(f"{where}: tiles must be 'all', a list of tile indices or a {smp.N_TILES}-entry "
                          f"boolean mask, got {arr.dtype} {arr.shape}")
    bad = arr[(arr < 0) | (arr >= smp.N_TILES)]
    if bad.size:
        raise LoaderError(f"{where}: tile index {int(bad[0])} is outside 0..{smp.N_TILES - 1}")
    out = tuple(int(x) for x in arr)
    if len(set(out)) != len(out):
        raise LoaderError(f"{where}: tile indices repeat ({out})")
    return out


def decoded_tile_px(tile_px: int | None) -> int:
    """Side of a tile decoded for a reader that needs ``tile_px`` pixels (None: the full 268): the
    smallest JPEG DCT scaling M/8 of 268 (M = 1..8, rounded up as libjpeg does) that is at least
    ``tile_px``. E.g. 64 -> 67, 96 -> 101, 128 -> 134, 224 -> 235."""
    if tile_px is None:
        return smp.TILE_PX
    if isinstance(tile_px, bool) or not isinstance(tile_px, (int, np.integer)) or tile_px < 1:
        raise LoaderError(f"tile_px must be a positive integer or None, got {tile_px!r}")
    for m in range(1, 9):
        side = -(-smp.TILE_PX * m // 8)
        if side >= tile_px:
            return side
    return smp.TILE_PX


def _decode_tiles(idx: Sequence[int], data: dict[str, bytes], where: str, tile_px: int | None = None) -> np.ndarray:
    """Decode the HR tiles `idx` straight into one [n, S, S, 3] buffer, with exactly the settings
    of :func:`gl10m.samples.decode_tile`; S = 268, or with ``tile_px`` the reduced size of
    :func:`decoded_tile_px`, scaled inside the JPEG decoder (its DCT scaling: a model that resizes
    tiles to 64 px decodes them at 67 px, ~1.6x faster than in full and with no 268 px resize to
    follow; the result differs from full decode + antialiased resize by ~0.4 DN on average)."""
    import simplejpeg

    side = decoded_tile_px(tile_px)
    scale = {} if side == smp.TILE_PX else {"min_width": side, "min_height": side}
    hr = np.empty((len(idx), side, side, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        f = smp.hr_field(i)
        try:
            got = simplejpeg.decode_jpeg(data[f], colorspace="RGB", fastdct=False, fastupsample=False, buffer=hr[j],
                                         **scale)
        except ValueError as e:
            raise LoaderError(f"{where}: {f} is not a {smp.TILE_PX}x{smp.TILE_PX} JPEG ({e})") from None
        if got.shape != hr[j].shape:
            raise LoaderError(f"{where}: {f} decodes to {got.shape[1]}x{got.shape[0]}, expected {side}x{side} "
                              f"(a {smp.TILE_PX}x{smp.TILE_PX} JPEG)")
    return hr


def _decode_lr(data: bytes, where: str) -> np.ndarray:
    try:
        lr = smp.decode_lr(data)
    except smp.SampleError as e:
        raise LoaderError(f"{where}: {e}") from None
    except Exception as e:  # PIL.UnidentifiedImageError and friends
        raise LoaderError(f"{where}: {smp.LR_FIELD} is not a PNG ({e})") from None
    if lr.shape != (smp.TILE_PX, smp.TILE_PX, 3):
        raise LoaderError(f"{where}: {smp.LR_FIELD} is {lr.shape}, expected ({smp.TILE_PX}, {smp.TILE_PX}, 3)")
    return lr


def _chw(a: np.ndarray):
    t = torch.from_numpy(a)
    return t.permute(2, 0, 1) if a.ndim == 3 else t.permute(0, 3, 1, 2)


@dataclass
class _Partial:
    """A sample between reading and decoding: the bytes it needs (and LR, if already decoded)."""
    key: str
    shard: str
    data: dict
    lr: np.ndarray | None = None
    tiles: tuple | None = None


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
def _default_rank() -> tuple[int, int]:
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise LoaderError(f"RANK/WORLD_SIZE must be integers, got {os.environ.get('RANK')!r}/"
                          f"{os.environ.get('WORLD_SIZE')!r}") from None


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    if size <= 1:
        yield from items
        return
    buf: list = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = it
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


class ShardDataset(IterableDataset):
    """The dataset :func:`load` returns (see the module doc for items, splitting and shuffling)."""

    def __init__(self, shards: list[_Shard], index: _Index | None, *, split: str | None, tiles: TileSpec,
                 shuffle: int, seed: int, rank: int, world_size: int, with_epoch: int | None, verify: bool,
                 decode_meta: bool, split_by: str, tile_px: int | None = None):
        self._shards, self._index, self.split = shards, index, split
        self._tiles_fn = tiles if callable(tiles) else None
        self._tiles = None if callable(tiles) else (
            tuple(range(smp.N_TILES)) if isinstance(tiles, str)
            else _tile_indices(tiles if isinstance(tiles, np.ndarray) or (torch is not None and isinstance(tiles, torch.Tensor))
                               else list(tiles), "tiles"))
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.with_epoch, self.verify, self.decode_meta, self.split_by = with_epoch, verify, decode_meta, split_by
        self.epoch = 0
        self.tile_px = tile_px

    # -- public ---------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._shards]

    @property
    def num_samples(self) -> int | None:
        """Samples in the selected shards per the index (None without an index)."""
        if self._index is None:
            return None
        return int(sum(len(s.rows) for s in self._shards if s.rows is not None))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if torch is None:
            raise LoaderError("gl10m.data needs torch (pip install torch)")
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        consumers, cid = self.world_size * nw, self.rank * nw + wid
        readers: dict[str, Any] = {}
        try:
            for part in self._jobs(cid, consumers, wid, nw, readers):
                yield self._finish(part, readers)
        finally:
            for r in readers.values():
                if r is not None:
                    r.close()

    # -- planning -------------------------------------------------------------------------------
    def _rng(self, *tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, *tag])

    def _jobs(self, cid: int, consumers: int, wid: int, nw: int, readers: dict) -> Iterator:
        n = len(self._shards)
        order = list(range(n))
        if self.shuffle:
            order = [int(i) for i in self._rng(0).permutation(n)]
        rng = self._rng(1, cid)
        if self.with_epoch is not None:
            quota = self.with_epoch // nw + (1 if wid < self.with_epoch % nw else 0)
            yield from _take(_buffer_shuffle(self._resampled(self._rng(2, cid), readers), self.shuffle, rng), quota)
            return
        rule = self.split_by if self.split_by != "auto" else ("shard" if n >= consumers else "sample")
        if rule == "shard":
            walk = (self._shard_items(order[i], readers) for i in range(cid, n, consumers))
        else:
            walk = self._sample_rule_walk(order, cid, consumers, readers)
        yield from _buffer_shuffle((x for g in walk for x in g), self.shuffle, rng)

    def _sample_rule_walk(self, order, cid, consumers, readers):
        pos = 0
        for si in order:
            s = self._shards[si]
            start = pos

            def keep(p, start=start):
                return (start + p) % consumers == cid
            if s.rows is not None:
                pos += len(s.rows)
                yield self._shard_items(si, readers, keep)
            else:
                counter = [0]
                yield self._shard_items(si, readers, keep, counter)
                pos += counter[0]

    def _resampled(self, rng: np.random.Generator, readers) -> Iterator:
        n = len(self._shards)
        empty = 0
        while True:
            got = False
            for item in self._shard_items(int(rng.integers(n)), readers):
                got = True
                yield item
            empty = 0 if got else empty + 1
            if empty > 10 * n + 10:
                raise LoaderError("with_epoch: the shards hold no samples")

    def _shard_items(self, si: int, readers: dict, keep=None, counter=None) -> Iterator:
        """The samples of shard `si` this consumer keeps (keep(position in shard) -> bool): index refs
        (si, row) when the shard can be read by offset, else streamed partials."""
        s = self._shards[si]
        if s.rows is not None and self._reader(s, readers) is not None:
            for p, row in enumerate(s.rows):
                if keep is None or keep(p):
                    yield (si, int(row))
            return
        if self.verify and s.rows is None:
            raise LoaderError(f"{s.name}: verify=True needs the shard index ({INDEX_NAME}), and it has no rows "
                              f"for this shard")
        yield from self._stream(s, keep, counter)

    def _reader(self, s: _Shard, readers: dict):
        if s.url not in readers:
            while len(readers) >= _MAX_OPEN:
                old = readers.pop(next(iter(readers)))
                if old is not None:
                    old.close()
            try:
                readers[s.url] = _open_reader(s.url)
            except _NotSeekable:
                readers[s.url] = None
        else:
            readers[s.url] = readers.pop(s.url)  # most recently used last
        return readers[s.url]

    # -- streaming ------------------------------------------------------------------------------
    def _needed_head(self) -> tuple[str, ...]:
        return HEAD_FIELDS if self.decode_meta else HEAD_FIELDS[1:]

    def _stream(self, s: _Shard, keep, counter) -> Iterator[_Partial]:
        import tarfile

        ix = self._index
        by_key = {ix.keys[r]: r for r in s.rows} if s.rows is not None else None
        head = set(self._needed_head())
        seen: set[str] = set()
        cur: dict | None = None
        pos = -1

        def finish(c):
            where = f"{s.name}: sample {c['key']}"
            if set(c["names"]) != set(smp.FIELDS) or len(c["names"]) != N_FIELDS:
                raise LoaderError(f"{where}: its fields differ from the schema")
            if not c["keep"]:
                return None
            if by_key is not None and c["key"] not in by_key:
                raise LoaderError(f"{where}: not in the index")
            if self.verify:
                from gl10m.shards import sample_digest

                if sample_digest(c["data"]) != ix.sha256[by_key[c["key"]]]:
                    raise LoaderError(f"{where}: checksum mismatch")
            sel = c["tiles"]
            if sel is None:  # the LR image came after tiles (not gl10m's order): choose now
                c["lr"] = _decode_lr(c["data"][smp.LR_FIELD], where)
                sel = _tile_indices(self._tiles_fn(_chw(c["lr"])), where)
            data = {f: c["data"][f] for f in head}
            for i in sel:
                data[smp.hr_field(i)] = c["data"][smp.hr_field(i)]
            return _Partial(c["key"], s.name, data, c["lr"], sel)

        fh = _open_stream(s.url)
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                for ti in tar:
                    try:
                        key, field = split_member(ti.name)
                    except ShardError as e:
                        raise LoaderError(f"{s.name}: {e}") from None
                    if not ti.isfile():
                        raise LoaderError(f"{s.name}: member {ti.name!r} is not a regular file")
                    if cur is None or key != cur["key"]:
                        if cur is not None:
                            out = finish(cur)
                            if out is not None:
                                yield out
                        if key in seen:
                            raise LoaderError(f"{s.name}: sample {key} appears twice")
                        seen.add(key)
                        pos += 1
                        k = keep is None or keep(pos)
                        cur = {"key": key, "names": [], "data": {}, "keep": k, "lr": None,
                               "tiles": self._tiles}
                    cur["names"].append(field)
                    if not cur["keep"]:
                        continue
                    want = (self.verify or field in head or field == smp.LR_FIELD
                            or (field.startswith("hr_") and (cur["tiles"] is None or field in _names(cur["tiles"]))))
                    if field in cur["data"]:
                        raise LoaderError(f"{s.name}: sample {key}: {field} appears twice")
                    if want and ti.size > MAX_MEMBER_BYTES:  # before reading it: the header is not trusted
                        raise LoaderError(f"{s.name}: sample {key}: {field} claims {ti.size} bytes, above the "
                                          f"per-member cap of {MAX_MEMBER_BYTES >> 20} MiB (gl10m.shards.MAX_MEMBER_BYTES)")
                    if want:
                        cur["data"][field] = tar.extractfile(ti).read()
                    if field == smp.LR_FIELD and self._tiles_fn is not None and cur["tiles"] is None:
                        where = f"{s.name}: sample {key}"
                        cur["lr"] = _decode_lr(cur["data"][field], where)
                        cur["tiles"] = _tile_indices(self._tiles_fn(_chw(cur["lr"])), where)
                        if not self.verify:  # drop tiles that came before LR and are not selected
                            names = _names(cur["tiles"])
                            for f in [f for f in cur["data"] if f.startswith("hr_") and f not in names]:
                                del cur["data"][f]
                if cur is not None:
                    out = finish(cur)
                    if out is not None:
                        yield out
        except tarfile.TarError as e:
            raise LoaderError(f"{s.name}: not a readable tar ({e})") from None
        finally:
            fh.close()
        if counter is not None:
            counter[0] = pos + 1

    # -- reading by offset and decoding -----------------------------------------------------------
    def _finish(self, part, readers) -> dict:
        if isinstance(part, _Partial):
            key, shard, data, lr, sel = part.key, part.shard, part.data, part.lr, part.tiles
            where = f"{shard}: sample {key}"
        else:
            si, row = part
            s, ix = self._shards[si], self._index
            key = ix.keys[row]
            where = f"{s.name}: sample {key}"
            reader = self._reader(s, readers)
            offs, sizes = ix.offsets[row], ix.sizes[row]
            if self.verify:
                data = _read_members(reader, s.name, key, offs, sizes, smp.FIELDS)
                from gl10m.shards import sample_digest

                if sample_digest(data) != ix.sha256[row]:
                    raise LoaderError(f"{where}: checksum mismatch")
            else:
                want = list(self._needed_head())
                if self._tiles is not None:
                    want += _names(self._tiles)
                data = _read_members(reader, s.name, key, offs, sizes, want)
            lr, sel = None, self._tiles
            if sel is None:
                lr = _decode_lr(data[smp.LR_FIELD], where)
                sel = _tile_indices(self._tiles_fn(_chw(lr)), where)
                missing = [f for f in _names(sel) if f not in data]
                if missing:
                    data.update(_read_members(reader, s.name, key, offs, sizes, missing))
        if lr is None:
            lr = _decode_lr(data[smp.LR_FIELD], where)
        out: dict[str, Any] = {"key": key}
        if self.decode_meta:
            try:
                meta = smp.decode_meta(data[smp.META_FIELD])
            except smp.SampleError as e:
                raise LoaderError(f"{where}: {e}") from None
            if not isinstance(meta, dict) or meta.get("key", key) != key:
                raise LoaderError(f"{where}: meta.json names another sample ({meta.get('key') if isinstance(meta, dict) else meta!r})")
            out["meta"] = meta
        try:
            labels = smp.decode_labels(data[smp.LABELS_FIELD])
            frac = smp.decode_tile_frac(data[smp.TILE_FRAC_FIELD])
        except smp.SampleError as e:
            raise LoaderError(f"{where}: {e}") from None
        if labels.ndim != 1 or frac.ndim != 2 or frac.shape[0] != smp.N_TILES:
            raise LoaderError(f"{where}: labels {labels.shape} / tile_frac {frac.shape} have the wrong shape")
        hr = _decode_tiles(sel, data, where, self.tile_px)
        out.update(lr=_chw(lr), hr=_chw(hr), tiles=torch.tensor(sel, dtype=torch.int64).reshape(-1),
                   labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8)),
                   tile_frac=torch.from_numpy(np.ascontiguousarray(frac[list(sel)])))
        return out


def _names(idx: Iterable[int]) -> list[str]:
    return [smp.hr_field(i) for i in idx]


def _take(it: Iterator, n: int) -> Iterator:
    if n <= 0:
        return
    for k, x in enumerate(it, 1):
        yield x
        if k >= n:
            return


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def load(source, split: str | None = None, tiles: TileSpec = "all", *, shuffle: int = 0, seed: int = 0,
         rank: int | None = None, world_size: int | None = None, with_epoch: int | None = None,
         verify: bool = False, decode_meta: bool = True, split_by: str = "auto",
         index: str | os.PathLike | None = None, tile_px: int | None = None) -> ShardDataset:
    """gl10m shards -> a torch IterableDataset of decoded sample dicts (see the module doc).

    `source`: a shards folder (local or URL), a shard path/URL, a brace pattern, or a list of
    them. `split`: which split of a shards folder (may be omitted when it has one). `tiles`:
    ``"all"``, a list of tile indices (or a 100-entry boolean mask), or a callable given the
    decoded LR image (uint8 [3, 268, 268] tensor) that returns either; only those tiles are read
    and decoded. `shuffle`: buffer size (0: index/tar order). `rank`/`world_size`: default
    torch.distributed's when initialised, else env RANK/WORLD_SIZE, else 0/1 (read now, at
    construction). `with_epoch`: samples per rank per epoch of an infinite resampled stream.
    `verify`: check each sample's sha256 against the index. `split_by`: "auto", "shard" or
    "sample" (the rule splitting samples over ranks x workers). `index`: the sidecar index for a
    list of shard URLs (found automatically for a shards folder and for local shards).
    `tile_px`: decode HR tiles at the smallest JPEG DCT scaling of at least this many pixels
    (:func:`decoded_tile_px`: 64 -> 67 x 67) instead of 268, for a model that resizes them down.

    Batching: pass ``collate_fn=gl10m.data.collate`` to a ``torch.utils.data.DataLoader``
    (``DataLoader(load(...), batch_size=4, collate_fn=collate)``); torch's default collate fails
    on the per-sample ``meta`` dicts and on tile counts that differ between samples.
    """
    if torch is None:
        raise LoaderError("gl10m.data.load needs torch (pip install torch)")
    if not (callable(tiles) or (isinstance(tiles, str) and tiles == "all")
            or (not isinstance(tiles, (str, bytes)) and isinstance(tiles, Iterable))):
        raise LoaderError(f"tiles must be 'all', a list of tile indices or a callable, got {tiles!r}")
    for name, v in (("shuffle", shuffle), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise LoaderError(f"{name} must be a non-negative integer, got {v!r}")
    if with_epoch is not None and (isinstance(with_epoch, bool) or not isinstance(with_epoch, (int, np.integer))
                                   or with_epoch < 1):
        raise LoaderError(f"with_epoch must be a positive number of samples, got {with_epoch!r}")
    if split_by not in ("auto", "shard", "sample"):
        raise LoaderError(f"split_by must be 'auto', 'shard' or 'sample', got {split_by!r}")
    if (rank is None) != (world_size is None):
        raise LoaderError("give both rank and world_size, or neither")
    if rank is None:
        rank, world_size = _default_rank()
    if not (isinstance(world_size, (int, np.integer)) and world_size >= 1 and 0 <= rank < world_size):
        raise LoaderError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    shards, ix, split = _resolve(source, split, index)
    if verify and ix is None:
        raise LoaderError(f"verify=True needs the shard index ({INDEX_NAME}); none was found for {shards[0].url}")
    return ShardDataset(shards, ix, split=split, tiles=tiles, shuffle=int(shuffle), seed=int(seed), rank=int(rank),
                        world_size=int(world_size), with_epoch=None if with_epoch is None else int(with_epoch),
                        verify=verify, decode_meta=decode_meta, split_by=split_by,
                        tile_px=None if tile_px is None else int(decoded_tile_px(tile_px)))


def collate(batch: Sequence[dict]) -> dict:
    """Batch sample dicts: tensors of equal shape are stacked (``lr`` [B, 3, H, W], ``labels``
    [B, 66], and ``hr`` [B, n, 3, H, W] when every sample has the same tile count, still
    channels-last in memory); tensors whose shapes differ (``hr``, ``tiles``, ``tile_frac`` with a
    sampler choosing different counts) and everything else (``key``, ``meta``) stay lists."""
    from torch.utils.data import default_collate

    if not batch:
        raise LoaderError("collate: empty batch")
    out: dict[str, Any] = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if isinstance(vals[0], torch.Tensor) and all(isinstance(v, torch.Tensor) and v.shape == vals[0].shape
                                                     and v.dtype == vals[0].dtype for v in vals):
            if k in ("lr", "hr"):  # stack the HWC memory (a plain copy), then view it as C, H, W again
                nd = vals[0].dim()
                to_hwc = (1, 2, 0) if nd == 3 else (0, 2, 3, 1)
                stacked = default_collate([v.permute(*to_hwc) for v in vals])
                out[k] = stacked.permute(0, 3, 1, 2) if nd == 3 else stacked.permute(0, 1, 4, 2, 3)
            else:
                out[k] = default_collate(vals)
        else:
            out[k] = vals
    return out


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
        shards, ix, self.split = _resolve(source, split, index)
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
        bad = [f for f in fields if f not in FIELD_POS]
        if bad:
            raise LoaderError(f"{bad[0]!r} is not a field of the sample schema")
        si, row = self._rows[i]
        s = self._shards[si]
        if s.url not in self._readers:
            while len(self._readers) >= _MAX_OPEN:  # bounded: a split may have hundreds of shards
                self._readers.pop(next(iter(self._readers))).close()
            try:
                self._readers[s.url] = _open_reader(s.url)
            except _NotSeekable:
                raise LoaderError(f"{s.url}: random access needs a seekable shard (a local file or "
                                  "an HTTP server that honours Range)") from None
        return _read_members(self._readers[s.url], s.name, self._index.keys[row],
                             self._index.offsets[row], self._index.sizes[row], list(fields))

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> "SampleReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_lr(data: bytes, where: str = "lr") -> np.ndarray:
    """``lr.png`` bytes -> uint8 [268, 268, 3] (HWC), or a one-line :class:`LoaderError`."""
    return _decode_lr(data, where)


def decode_tiles(idx: Sequence[int], data: dict[str, bytes], where: str = "sample",
                 tile_px: int | None = None) -> np.ndarray:
    """The HR tiles ``idx`` from ``{hr_XX.jpg: bytes}`` -> uint8 [n, 268, 268, 3] (NHWC); with
    ``tile_px``, [n, S, S, 3] at the reduced size of :func:`decoded_tile_px`."""
    return _decode_tiles(tuple(int(i) for i in idx), data, where, tile_px)


def decode_labels(data: bytes, where: str = "sample") -> np.ndarray:
    """``labels.npy`` bytes -> the multi-hot label vector (never unpickles)."""
    try:
        return smp.decode_labels(data)
    except smp.SampleError as e:
        raise LoaderError(f"{where}: {e}") from None
