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
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from gl10m.io import atomic_path

SHARD_NAME = "gl10m-{split}-{n:06d}.tar"
DEFAULT_SHARD_BYTES = 768 * 1024 * 1024  # ~0.75 GB, inside the 0.5-1 GB that streams well


class ShardError(Exception):
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
    sha256: str      # of this member's bytes


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


def write_shard(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]], split: str) -> list[IndexRow]:
    """Write one tar shard atomically; return the index rows of its members."""
    rows: list[IndexRow] = []
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, files in samples:
                    if "." in key or "/" in key:
                        raise ShardError(f"sample key {key!r} must not contain dots or slashes")
                    for name in member_order(files):
                        data = files[name]
                        ti = _tarinfo(f"{key}.{name}", len(data))
                        header = len(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
                        start = tar.offset
                        tar.addfile(ti, io.BytesIO(data))
                        rows.append(IndexRow(key, split, path.name, ti.name, start + header, len(data),
                                             hashlib.sha256(data).hexdigest()))
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
