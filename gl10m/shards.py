"""WebDataset shards: staged sample folders -> deterministic tar shards + a sidecar index.

Sharding copies bytes; it never re-encodes. A staged sample is a folder ``{key}/`` holding the
sample's files (``lr.png``, ``hr_00.jpg`` .. ``hr_99.jpg``, ``labels.npy``, ...: see
gl10m/samples.py); each becomes the tar member ``{key}.{file name}``, which is what plain
webdataset and Hugging Face ``datasets`` expect (keys have no dots, field names are lowercase).

Determinism: sample order and shard assignment depend only on the keys (order by sha1 of the
key, which spreads states and concepts evenly over shards), members are written with fixed tar
metadata (ustar, mtime 0, uid/gid 0, mode 0444, no user names), so the same staged samples give
byte-identical shards. Each shard is written to a temp file, fsynced and renamed.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from gl10m.errors import UserError
from gl10m.io import atomic_path

SHARD_NAME = "gl10m-{split}-{n:06d}.tar"
DEFAULT_SHARD_BYTES = 768 * 1024 * 1024  # ~0.75 GB, inside the 0.5-1 GB that streams well


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


def read_sample_files(folder: Path) -> dict[str, bytes]:
    """The files of one staged sample folder, by field name (dot-free key is the folder name)."""
    files = {}
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            continue  # leftovers of interrupted atomic writes are never part of a sample
        if not p.is_file():
            raise ShardError(f"{p}: a staged sample holds only files")
        files[p.name] = p.read_bytes()
    if not files:
        raise ShardError(f"{folder}: empty staged sample")
    return files


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
    groups: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for key in sample_order(sizes):
        n = sizes[key]
        if cur and cur_bytes + n > max_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(key)
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


def iter_members(path: Path):
    """(member name, bytes) of a shard, refusing unsafe member names."""
    with tarfile.open(path, mode="r:") as tar:
        for ti in tar:
            check_member_name(ti.name)
            if not ti.isfile():
                raise ShardError(f"{path.name}: member {ti.name!r} is not a regular file")
            f = tar.extractfile(ti)
            yield ti.name, f.read()


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
                    files = read_sample_files(ents[key].folder)
                    missing = sorted(set(smp.FIELDS) - set(files))
                    extra = sorted(set(files) - set(smp.FIELDS))
                    if missing or extra:
                        raise ShardError(f"staged sample {key}: fields differ from the schema "
                                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
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
def verify(out_dir: str | Path, *, decode: bool = True, progress=None) -> dict:
    """Check every shard against the index: member names, field sets, offsets and sizes, sample
    checksums, image sizes and labels. Raises ShardError naming the first bad sample."""
    from gl10m import samples as smp

    out_dir = Path(out_dir)
    idx = read_index(out_dir / INDEX_NAME)
    expected = list(smp.FIELDS)
    by_shard = {s: g for s, g in idx.groupby(["split", "shard"], sort=True)}
    seen: set[str] = set()
    n = 0
    for (split, shard), g in by_shard.items():
        path = out_dir / split / shard
        if not path.exists():
            raise ShardError(f"{split}/{shard}: listed in the index but missing")
        want = {r.key: r for r in g.itertuples()}
        cur_key, files = None, {}

        def finish(key, files):
            r = want.get(key)
            if r is None:
                raise ShardError(f"sample {key} ({split}/{shard}): not in the index")
            if sorted(files) != sorted(expected):
                raise ShardError(f"sample {key} ({split}/{shard}): field set differs from the schema")
            if sample_digest(files) != r.sha256:
                raise ShardError(f"sample {key} ({split}/{shard}): checksum mismatch")
            if list(r.fields) != member_order(files):
                raise ShardError(f"sample {key} ({split}/{shard}): member order differs from the index")
            if decode:
                s = smp.decode_sample(files)
                if s.lr.shape != (smp.TILE_PX, smp.TILE_PX, 3) or s.hr.shape != (smp.N_TILES, smp.TILE_PX, smp.TILE_PX, 3):
                    raise ShardError(f"sample {key} ({split}/{shard}): image sizes {s.lr.shape} / {s.hr.shape}")
                if [int(x) for x in s.labels] != [int(x) for x in r.labels]:
                    raise ShardError(f"sample {key} ({split}/{shard}): labels differ from the index")

        with open(path, "rb") as raw:
            for name, data in iter_members(path):
                key, field_ = split_member(name)
                if key != cur_key:
                    if cur_key is not None:
                        finish(cur_key, files)
                        n += 1
                        if progress:
                            progress(1)
                    if key in seen:
                        raise ShardError(f"sample {key}: appears twice")
                    seen.add(key)
                    cur_key, files = key, {}
                files[field_] = data
                r = want.get(key)
                if r is not None and field_ in list(r.fields):
                    i = list(r.fields).index(field_)
                    raw.seek(int(r.offsets[i]))
                    if raw.read(int(r.sizes[i])) != data:
                        raise ShardError(f"sample {key} ({split}/{shard}): {field_} is not at the indexed offset")
            if cur_key is not None:
                finish(cur_key, files)
                n += 1
                if progress:
                    progress(1)
        missing = set(want) - seen
        if missing:
            raise ShardError(f"sample {sorted(missing)[0]} ({split}/{shard}): in the index but not in the shard")
    return {"samples": n, "shards": len(by_shard)}
