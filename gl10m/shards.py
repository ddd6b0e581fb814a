"""WebDataset shards: staged sample folders -> deterministic tar shards + a sidecar index.

Sharding copies bytes; it never re-encodes. A staged sample is a folder ``{key}/`` holding the
sample's files (``lr.png``, ``hr_00.jpg`` .. ``hr_99.jpg``, ``labels.npy``, ...: see
gl10m/samples.py); each becomes the tar member ``{key}.{file name}``, which is what plain
webdataset and Hugging Face ``datasets`` expect (keys have no dots, field names are lowercase).

Determinism: sample order and shard assignment depend only on the keys (order by sha1 of the
key, which spreads states and concepts evenly over shards), members are written with fixed tar
metadata (ustar, mtime 0, uid/gid 0, mode 0444, no user names), so the same staged samples give
byte-identical shards. Each shard is written to a temp file, fsynced and renamed.

Reading: this module holds the one tar reader. :func:`iter_tar` streams members, each checked from
its header before it can be read (safe name, regular file, ``<key>.<field>``, size against the file
and :data:`MAX_MEMBER_BYTES`, samples contiguous); :func:`read_members` reads members at their
indexed offsets and checks each one's tar header against the index. :func:`verify`,
:mod:`gl10m.data`, :mod:`gl10m.inspect` and the feature cache read shards through them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from gl10m.errors import UserError
from gl10m.io import atomic_path

SHARD_NAME = "gl10m-{split}-{n:06d}.tar"
DEFAULT_SHARD_BYTES = 768 * 1024 * 1024  # ~0.75 GB, inside the 0.5-1 GB that streams well
# The largest member any gl10m reader accepts (index sizes and tar headers are checked against it
# and against the file before a byte is read). A real member is far smaller: an HR tile ~20-45 kB,
# lr.png ~0.2 MB, tile_frac.npy 13 kB; a 2680x2680 RGB raster would be 21.5 MB uncompressed.
MAX_MEMBER_BYTES = 64 * 1024 * 1024


class ShardError(UserError, ValueError):
    """A staged sample or shard that is not what the index says."""


def member_order(names: Iterable[str]) -> list[str]:
    """Field order inside a sample: small fields first (meta, labels, LR), then HR tiles 00..99.

    A reader that stops after the LR image never touches the tiles.
    """
    names = list(names)
    tiles = sorted(n for n in names if n.startswith("hr_"))
    rest = sorted((n for n in names if not n.startswith("hr_")),
                  key=lambda n: (0 if n == "meta.json" else 1 if n.startswith("labels") else 2, n))
    return rest + tiles


def sample_order(keys: Iterable[str]) -> list[str]:
    """Deterministic, input-order-independent order of samples: by sha1(key), then key."""
    return sorted(set(keys), key=lambda k: (hashlib.sha1(k.encode()).hexdigest(), k))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


@dataclass(frozen=True)
class IndexRow:
    key: str
    split: str
    shard: str
    member: str      # full member name, "{key}.{field}"
    offset: int      # byte offset of the member's data in the shard
    size: int


def sample_digest(files: dict[str, bytes]) -> str:
    """sha256 over a sample's fields in member order (name, length and bytes of each)."""
    h = hashlib.sha256()
    for name in member_order(files):
        data = files[name]
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group keys (in sample_order) into consecutive shards of at most ~max_bytes of data."""
    return pack([(key, sizes[key]) for key in sample_order(sizes)], max_bytes)


def pack(items, max_bytes: int) -> list[list[str]]:
    """(name, bytes) pairs, in order -> consecutive groups of at most ~max_bytes (a group holds at
    least one item)."""
    groups: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for name, n in items:
        if cur and cur_bytes + n > max_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        groups.append(cur)
    return groups


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's record size: archives end on a multiple of it


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]], split: str) -> list[IndexRow]:
    """Write one ustar shard atomically; return the index rows of its members.

    Members are written directly (512-byte ustar header, data, zero padding; two zero blocks and
    padding to the record size at the end): exactly what tarfile writes, one write per member.
    """
    rows: list[IndexRow] = []
    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=1 << 20) as fh:
            pos = 0
            for key, files in samples:
                if "." in key or "/" in key:
                    raise ShardError(f"sample key {key!r} must not contain dots or slashes")
                for name in member_order(files):
                    data = files[name]
                    ti = _tarinfo(f"{key}.{name}", len(data))
                    header = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
                    fh.write(header)
                    fh.write(data)
                    pad = -len(data) % _BLOCK
                    if pad:
                        fh.write(b"\0" * pad)
                    rows.append(IndexRow(key, split, path.name, ti.name, pos + len(header), len(data)))
                    pos += len(header) + len(data) + pad
            end = pos + 2 * _BLOCK
            fh.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
    return rows


def check_extent(where: str, field: str, offset: int, size: int, file_size: int | None,
                 max_member: int = MAX_MEMBER_BYTES) -> None:
    """Refuse a member extent (from the index or a tar header) before anything is read: a size
    above the per-member cap, a negative size, or bytes outside the file. `where` names the shard
    and the sample."""
    offset, size = int(offset), int(size)
    if size < 0:
        raise ShardError(f"{where}: {field} has a negative size ({size})")
    if size > max_member:
        raise ShardError(f"{where}: {field} claims {size} bytes, above the per-member cap of "
                         f"{max_member / 2**20:g} MiB (gl10m.shards.MAX_MEMBER_BYTES)")
    if offset < _BLOCK or (file_size is not None and offset + size > file_size):
        raise ShardError(f"{where}: {field} at offset {offset} (+{size} bytes) is outside the shard "
                         f"({file_size} bytes; truncated or a stale index?)")


def check_member_name(name: str) -> None:
    """Reject absolute paths, '..' components and nested paths in member names."""
    if name.startswith("/") or name.startswith("\\") or ".." in name.split("/") or "/" in name:
        raise ShardError(f"unsafe tar member name {name!r}")


def split_member(name: str) -> tuple[str, str]:
    """'CA-w1.hr_03.jpg' -> ('CA-w1', 'hr_03.jpg'): the key ends at the first dot."""
    check_member_name(name)
    key, _, field = name.partition(".")
    if not key or not field:
        raise ShardError(f"member {name!r} is not '<key>.<field>'")
    return key, field


# -- reading: the one tar reader ---------------------------------------------------------------
# verify, gl10m.data (streams and reads by offset), gl10m.inspect and the feature cache read
# shards only through iter_tar (or iter_members, on top of it) and read_members.
@dataclass(frozen=True)
class Member:
    """A member of a shard being read, checked but not yet read: ``read()`` returns its bytes
    (call it before taking the next member; a member never read is skipped unread)."""
    key: str
    field: str
    offset: int  # of its data in the tar
    size: int
    read: Callable[[], bytes]


def iter_tar(fh, where: str, *, stream: bool = True, file_size: int | None = None,
             max_member: int = MAX_MEMBER_BYTES) -> Iterator[Member]:
    """The members of the tar in the open file `fh`, in tar order, each checked from its header
    (which is not trusted) before the caller can read it: a safe name (no absolute path, '..' or
    folder), a regular file (no link, device, folder), named ``<key>.<field>``, its size at most
    `max_member` and inside `file_size` (when known); a sample's members are contiguous (a key
    that comes back, or a field twice in a sample, is refused). Every error is a one-line
    :class:`ShardError` starting with `where` (the shard's name); so is a file that is not a
    readable tar.

    ``stream=True`` reads `fh` front to back (any readable file, compressed tars too); ``False``
    needs a seekable `fh` and skips unread members by seeking."""
    def reader(tar, ti):
        def read() -> bytes:
            try:
                return tar.extractfile(ti).read()
            except tarfile.TarError as e:
                raise ShardError(f"{where}: not a readable tar ({e})") from None
        return read

    try:
        with tarfile.open(fileobj=fh, mode="r|*" if stream else "r:") as tar:
            seen: set[str] = set()
            cur, fields = None, set()
            for ti in tar:
                try:
                    check_member_name(ti.name)
                    if not ti.isfile():
                        raise ShardError(f"member {ti.name!r} is not a regular file")
                    key, field = split_member(ti.name)
                except ShardError as e:
                    raise ShardError(f"{where}: {e}") from None
                check_extent(f"{where}: sample {key}", field, ti.offset_data, ti.size, file_size, max_member)
                if key != cur:
                    if key in seen:
                        raise ShardError(f"{where}: sample {key} appears twice")
                    seen.add(key)
                    cur, fields = key, set()
                if field in fields:
                    raise ShardError(f"{where}: sample {key}: {field} appears twice")
                fields.add(field)
                yield Member(key, field, ti.offset_data, ti.size, reader(tar, ti))
    except tarfile.TarError as e:
        raise ShardError(f"{where}: not a readable tar ({e})") from None


def iter_members(path: Path, *, max_member: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of a local shard, checked as :func:`iter_tar` checks them (sizes also
    against the file's)."""
    path = Path(path)
    with open(path, "rb") as fh:
        for m in iter_tar(fh, path.name, stream=False, file_size=os.fstat(fh.fileno()).st_size,
                          max_member=max_member):
            yield f"{m.key}.{m.field}", m.read()


def parse_header(block: bytes) -> tuple[str, int]:
    """A 512-byte ustar/GNU tar header -> (member name, size); size -1 when it is not a number."""
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        size = -1
    return name.decode("utf-8", "replace"), size


_MERGE_GAP = 2 * _BLOCK  # members closer than this (padding + the next header) are read together


def read_members(read: Callable[[int, int], bytes], where: str, key: str,
                 extents: Iterable[tuple[str, int, int]], *, file_size: int | None = None,
                 max_member: int = MAX_MEMBER_BYTES) -> dict[str, bytes]:
    """{field: bytes} of sample `key`'s members at their indexed ``(field, offset, size)``, read
    with ``read(offset, size)``. Each extent is checked (:func:`check_extent`) before anything is
    read; members close together are read at once (adjacent tiles: one read); the tar header in
    front of each member must name ``{key}.{field}`` with that size, so a stale index is an
    error, not wrong bytes. Errors are one-line ShardErrors starting with `where` (the shard)."""
    items = sorted((int(o), int(n), f) for f, o, n in extents)
    for off, size, f in items:
        check_extent(f"{where}: sample {key}", f, off, size, file_size, max_member)
    out: dict[str, bytes] = {}
    i = 0
    while i < len(items):
        j = i
        start = items[i][0] - _BLOCK
        end = items[i][0] + items[i][1]
        while j + 1 < len(items) and items[j + 1][0] - _BLOCK - end <= _MERGE_GAP:
            j += 1
            end = max(end, items[j][0] + items[j][1])
        buf = read(start, end - start)
        for off, size, f in items[i:j + 1]:
            a = off - start
            name, hsize = parse_header(buf[a - _BLOCK:a])
            if name != f"{key}.{f}" or hsize != size:
                raise ShardError(f"{where}: sample {key}: the index does not match the shard at {f} "
                                 f"(found {name!r}, {hsize} bytes): a stale index?")
            out[f] = buf[a:a + size]
        i = j + 1
    return out


def manifest_json(data: dict) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


# -- the whole stage: staged samples -> shards + index + manifest ------------------------------
INDEX_NAME = "index.parquet"
MANIFEST_NAME = "manifest.json"


def shard_path(out_dir: Path, split: str, n: int) -> Path:
    return Path(out_dir) / split / SHARD_NAME.format(split=split, n=n)


def _index_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([
        ("key", pa.string()), ("split", pa.string()), ("state", pa.string()), ("shard", pa.string()),
        ("fields", pa.list_(pa.string())), ("offsets", pa.list_(pa.int64())), ("sizes", pa.list_(pa.int64())),
        ("sha256", pa.string()), ("labels", pa.list_(pa.uint8())), ("nbytes", pa.int64()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def write_index(rows: list[dict], path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(_index_table(rows), tmp, compression="zstd")


def read_index(path: Path):
    """The sidecar index as a pandas DataFrame (one row per sample)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.exists():
        raise ShardError(f"{p}: no shard index here")
    return pq.read_table(p).to_pandas()


@dataclass
class Entry:
    """One staged sample to shard."""
    key: str
    split: str
    state: str
    folder: Path


def build(entries: Sequence[Entry], out_dir: str | Path, *, max_bytes: int = DEFAULT_SHARD_BYTES,
          manifest_extra: dict | None = None, progress=None) -> dict:
    """Write the shards of every split, then the index, then the manifest (all atomic).

    Shards of a split that the new build does not produce are removed at the end, so a rebuild
    from fewer samples leaves no stale shard behind. Returns the manifest.
    """
    from gl10m import samples as smp

    from concurrent.futures import ThreadPoolExecutor

    out_dir = Path(out_dir)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gl10m-digest")
    try:
        return _build(entries, out_dir, max_bytes, manifest_extra, progress, pool, smp)
    finally:
        pool.shutdown(wait=True)


def _build(entries, out_dir: Path, max_bytes: int, manifest_extra, progress, pool, smp) -> dict:
    by_split: dict[str, list[Entry]] = {}
    for e in entries:
        by_split.setdefault(e.split, []).append(e)
    index_rows: list[dict] = []
    shard_files: dict[str, list[dict]] = {}
    for split in sorted(by_split):
        ents = {e.key: e for e in by_split[split]}
        if len(ents) != len(by_split[split]):
            raise ShardError(f"split {split}: a key appears twice")
        sizes = {k: sum(p.stat().st_size for p in e.folder.iterdir() if not p.name.startswith("."))
                 for k, e in ents.items()}
        written = []
        for n, group in enumerate(plan_shards(sizes, max_bytes)):
            path = shard_path(out_dir, split, n)
            digests: dict[str, object] = {}
            labels: dict[str, list[int]] = {}

            def stream(group=group, digests=digests, labels=labels):
                # one sample in memory at a time; its checksum is computed on a second thread
                # (hashlib releases the GIL) while the shard writer copies its bytes
                for key in group:
                    try:
                        files = smp.read_fields(ents[key].folder)
                    except smp.SampleError as e:
                        raise ShardError(f"sample {key}: {e}") from None
                    digests[key] = pool.submit(sample_digest, files)
                    labels[key] = [int(x) for x in smp.decode_labels(files[smp.LABELS_FIELD])]
                    yield key, files

            rows = write_shard(path, stream(), split)
            by_key: dict[str, list[IndexRow]] = {}
            for r in rows:
                by_key.setdefault(r.key, []).append(r)
            for key in group:
                rs = by_key[key]
                index_rows.append({
                    "key": key, "split": split, "state": ents[key].state, "shard": path.name,
                    "fields": [r.member.split(".", 1)[1] for r in rs], "offsets": [r.offset for r in rs],
                    "sizes": [r.size for r in rs], "sha256": digests[key].result(),
                    "labels": labels[key], "nbytes": sum(r.size for r in rs)})
            written.append({"name": path.name, "bytes": path.stat().st_size, "samples": len(group)})
            if progress:
                progress(len(group))
        shard_files[split] = written
        keep = {w["name"] for w in written}
        for old in (out_dir / split).glob("gl10m-*.tar"):
            if old.name not in keep:
                old.unlink()
    for split_dir in out_dir.glob("*/"):
        if split_dir.is_dir() and split_dir.name not in by_split:
            for old in split_dir.glob("gl10m-*.tar"):
                old.unlink()
    write_index(index_rows, out_dir / INDEX_NAME)
    manifest = {
        "format": "webdataset", "index": INDEX_NAME, "shards": shard_files,
        "samples": {s: len(v) for s, v in sorted(by_split.items())},
        "states": _count(index_rows, lambda r: [(r["split"], r["state"])]),
        **(manifest_extra or {}),
    }
    (out_dir).mkdir(parents=True, exist_ok=True)
    from gl10m.io import atomic_write_bytes

    atomic_write_bytes(out_dir / MANIFEST_NAME, manifest_json(manifest))
    return manifest


def _count(rows, keys_of) -> dict:
    out: dict = {}
    for r in rows:
        for a, b in keys_of(r):
            out.setdefault(a, {})
            out[a][b] = out[a].get(b, 0) + 1
    return {a: dict(sorted(v.items())) for a, v in sorted(out.items())}


# -- verify ----------------------------------------------------------------------------------
class VerifyError(ShardError):
    """`gl10m verify` found bad shards: ``problems`` holds one line per bad shard (its split/shard,
    the sample and what is wrong), ``str()`` all of them."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def verify(out_dir: str | Path, *, decode: bool = True, progress=None) -> dict:
    """Check every shard against the index: member names, field sets (with the extra bands'
    members when the dataset has them, in every sample), offsets and sizes, sample checksums,
    image sizes, extra bands (decodable, shape and dtype), labels, and each scene's
    georeferencing (meta.json's ``georef`` against its footprint: :func:`gl10m.geometry.georef_problems`).
    Sizes and offsets (from the index and from every tar
    header) are checked against the file and :data:`MAX_MEMBER_BYTES` before anything is read.

    Every shard is checked; a bad one gives one line naming the shard and the (first) bad sample.
    Raises :class:`VerifyError` (a ShardError) with those lines when any shard is bad."""
    out_dir = Path(out_dir)
    try:
        idx = read_index(out_dir / INDEX_NAME)
    except ShardError:
        raise
    except Exception as e:  # a truncated or foreign parquet file
        raise ShardError(f"{out_dir / INDEX_NAME}: not a readable shard index ({type(e).__name__}: {e})") from None
    for col in ("key", "split", "shard", "fields", "offsets", "sizes", "sha256", "labels"):
        if col not in idx.columns:
            raise ShardError(f"{out_dir / INDEX_NAME}: not a gl10m shard index (no column {col!r})")
    problems: list[str] = []
    seen: set[str] = set()
    n = 0
    from gl10m import samples as smp

    # the bands the samples hold (extra members, gl10m/samples.py EXTRA): one set for the dataset
    modes = sorted({smp.bands_of(f) for f in idx["fields"]}) if len(idx) else ["rgb"]
    if len(modes) > 1:
        raise VerifyError([f"{out_dir / INDEX_NAME}: samples hold different band sets ({', '.join(modes)}); "
                           "every sample of a dataset must have the same fields"])
    by_shard = {s: g for s, g in idx.groupby(["split", "shard"], sort=True)}
    for (split, shard), g in by_shard.items():
        state = {"key": None}
        try:
            n += _verify_shard(out_dir, str(split), str(shard), g, seen, decode, progress, state, modes[0])
        except ShardError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if f"{split}/{shard}" not in msg:  # a tar-level error (iter_tar): say where and after which sample
                msg = msg[len(shard) + 2:] if msg.startswith(f"{shard}: ") else msg
                at = f"after sample {state['key']}: " if state["key"] else ""
                msg = f"{split}/{shard}: {at}{msg}"
            problems.append(msg[:500])
        except Exception as e:  # noqa: BLE001 - one line per bad shard, never a traceback
            key = f"sample {state['key']} " if state["key"] else ""
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            problems.append(f"{key}({split}/{shard}): {type(e).__name__}: {msg}"[:500])
    if problems:
        raise VerifyError(problems)
    return {"samples": n, "shards": len(by_shard)}


def _verify_georef(files: dict[str, bytes], where: str) -> None:
    """A scene's (a sample with a footprint) georef block, when it has one, must agree with its
    footprint and sizes."""
    from gl10m import samples as smp
    from gl10m.geometry import georef_problems

    try:
        meta = smp.decode_meta(files[smp.META_FIELD])
    except smp.SampleError as e:
        raise ShardError(f"{where}: {e}") from None
    # a sample without a georef block was built before gl10m wrote one: valid, just not georeferenced
    # (gl10m export and data.load(georef=True) say so); one that has it must agree with its footprint
    if isinstance(meta, dict) and "footprint" in meta and "georef" in meta:
        bad = georef_problems(meta, lr_size=smp.TILE_PX, tile_size=smp.TILE_PX)
        if bad:
            raise ShardError(f"{where}: {bad[0]}"[:500])


def _verify_shard(out_dir: Path, split: str, shard: str, g, seen: set, decode: bool, progress, state,
                  bands: str = "rgb") -> int:
    from gl10m import samples as smp

    expected = list(smp.fields_for(bands))
    if "/" in shard or "\\" in shard or shard in ("", ".", "..") or "/" in split or split in ("", ".", ".."):
        raise ShardError(f"{split}/{shard}: the index names an unsafe shard path")
    path = out_dir / split / shard
    if not path.is_file():
        raise ShardError(f"{split}/{shard}: listed in the index but missing")
    file_size = path.stat().st_size
    want = {}
    for r in g.itertuples():
        where = f"sample {r.key} ({split}/{shard})"
        fields, offsets, sizes = list(r.fields), list(r.offsets), list(r.sizes)
        if not (len(fields) == len(offsets) == len(sizes)):
            raise ShardError(f"{where}: the index lists {len(fields)} fields, {len(offsets)} offsets, "
                             f"{len(sizes)} sizes")
        for f, o, sz in zip(fields, offsets, sizes):
            check_extent(where, f"{f} (index)", o, sz, file_size)
        want[r.key] = r
    n = 0
    cur_key, files = None, {}

    def finish(key, files):
        r = want.get(key)
        where = f"sample {key} ({split}/{shard})"
        if r is None:
            raise ShardError(f"{where}: not in the index")
        if sorted(files) != sorted(expected):
            raise ShardError(f"{where}: field set differs from the schema")
        if sample_digest(files) != r.sha256:
            raise ShardError(f"{where}: checksum mismatch")
        if list(r.fields) != member_order(files):
            raise ShardError(f"{where}: member order differs from the index")
        if decode:
            try:
                s = smp.decode_sample(files, bands=bands)  # extra bands: decodable, right shape and dtype
            except Exception as e:  # noqa: BLE001 - a bad image or array, whatever the decoder raises
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ShardError(f"{where}: does not decode ({type(e).__name__}: {msg})"[:500]) from None
            if s.lr.shape != (smp.TILE_PX, smp.TILE_PX, 3) or s.hr.shape != (smp.N_TILES, smp.TILE_PX, smp.TILE_PX, 3):
                raise ShardError(f"{where}: image sizes {s.lr.shape} / {s.hr.shape}")
            if [int(x) for x in s.labels] != [int(x) for x in r.labels]:
                raise ShardError(f"{where}: labels differ from the index")
        _verify_georef(files, where)

    with open(path, "rb") as fh:
        for m in iter_tar(fh, shard, stream=False, file_size=file_size):
            if m.key != cur_key:
                if cur_key is not None:
                    finish(cur_key, files)
                    n += 1
                    if progress:
                        progress(1)
                if m.key in seen:  # in an earlier shard (iter_tar refuses a key twice in one)
                    raise ShardError(f"sample {m.key} ({split}/{shard}): appears twice")
                seen.add(m.key)
                cur_key, files = m.key, {}
                state["key"] = m.key
            r = want.get(m.key)
            if r is not None and m.field in list(r.fields):
                i = list(r.fields).index(m.field)
                if (int(r.offsets[i]), int(r.sizes[i])) != (m.offset, m.size):
                    raise ShardError(f"sample {m.key} ({split}/{shard}): {m.field} is not at the indexed offset")
            files[m.field] = m.read()
        if cur_key is not None:
            finish(cur_key, files)
            n += 1
            if progress:
                progress(1)
    missing = set(want) - seen
    if missing:
        raise ShardError(f"sample {sorted(missing)[0]} ({split}/{shard}): in the index but not in the shard")
    return n
