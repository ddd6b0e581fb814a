"""The sample format: THE one place that encodes, writes, reads and decodes a sample.

A sample is one scene. Its fields (file names; fixed, lowercase, identical in every sample):

* ``lr.png``: the Sentinel-2 image, 268 x 268 RGB uint8 (PNG, Pillow, compress level 6);
* ``hr_00.jpg`` .. ``hr_99.jpg``: the 100 NAIP tiles, 268 x 268 RGB uint8, JPEG quality 95,
  4:4:4 (simplejpeg), index ``row*10 + col`` with row 0 north and col 0 west;
* ``labels.npy``: [66] uint8 multi-hot (``np.save``; loaded with ``allow_pickle=False``);
* ``tile_frac.npy``: [100, 66] float16, the fraction of each tile covered by each concept;
* ``meta.json``: provenance and QC (sorted keys, one space indent, no NaN, never a URL with a
  query string: signed hrefs and tokens must not leak into a dataset).

Encoders have fixed settings, so the same arrays and metadata give byte-identical files.
A staged sample is the folder ``W/staged/{split}/{key}/`` holding exactly these files; it is
written into a temp folder beside it and renamed into place, so a reader sees the whole sample
or nothing. The shard stage reuses :func:`encode_sample` / :func:`decode_sample` (bytes per
field) and may decode only the tiles it needs (``tiles=[...]``).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gl10m.errors import UserError
from gl10m.io import fsync_dir, is_orphan_temp, temp_prefix

LR_FIELD = "lr.png"
LABELS_FIELD = "labels.npy"
TILE_FRAC_FIELD = "tile_frac.npy"
META_FIELD = "meta.json"
# The scene geometry of the sample format: the default profile's (gl10m-66.yaml geometry: grid 10,
# tile_px 268, lr_px 268; tests/test_profile.py holds them equal). Every other module takes them
# from here; a sample of another geometry is refused (_check_sample).
GRID = 10  # HR tiles a side
N_TILES = GRID * GRID
TILE_PX = 268  # an HR tile's side, and the LR image's
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = "444"
PNG_COMPRESS_LEVEL = 6
SPLITS = ("train", "val", "test")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class SampleError(UserError, ValueError):
    """A sample that cannot be written or read (bad shape, missing field, bad key...)."""


def hr_field(i: int) -> str:
    return f"hr_{int(i):02d}.jpg"


HR_FIELDS = tuple(hr_field(i) for i in range(N_TILES))
FIELDS = (LR_FIELD, *HR_FIELDS, LABELS_FIELD, TILE_FRAC_FIELD, META_FIELD)


@dataclass
class Sample:
    """One scene in memory.

    ``hr`` holds the tiles listed in ``tiles`` (all 100, index order, unless a reader asked
    for a subset), [len(tiles), 268, 268, 3] uint8.
    """

    key: str
    split: str
    lr: np.ndarray
    hr: np.ndarray
    labels: np.ndarray
    tile_frac: np.ndarray
    meta: dict
    tiles: tuple[int, ...] = field(default=tuple(range(N_TILES)))


# ---------------------------------------------------------------------------------------------
# Field codecs
# ---------------------------------------------------------------------------------------------
def _rgb(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise SampleError(f"{what}: expected [H, W, 3] uint8, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)


def encode_lr(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_rgb(img, LR_FIELD), "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_lr(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            raise SampleError(f"{LR_FIELD}: expected an RGB PNG, got mode {im.mode}")
        return np.asarray(im, dtype=np.uint8).copy()


def encode_tile(tile: np.ndarray) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(_rgb(tile, "hr tile"), quality=JPEG_QUALITY, colorspace="RGB",
                                  colorsubsampling=JPEG_SUBSAMPLING, fastdct=False)


def decode_tile(data: bytes, *, out: np.ndarray | None = None, min_side: int | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] (accurate DCT and upsampling: the same pixels everywhere).
    ``out``: decode into this array (its shape must be the decoded one). ``min_side``: let the
    decoder scale the image down (JPEG DCT scaling, M/8 for M = 1..8) to the smallest size whose
    sides are at least ``min_side``. A ValueError when the bytes are not a JPEG."""
    import simplejpeg

    scale = {} if min_side is None else {"min_width": int(min_side), "min_height": int(min_side)}
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, buffer=out, **scale)


def encode_npy(arr: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (``np.save``, never a pickle: object arrays are refused)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, what: str) -> np.ndarray:
    """``.npy`` bytes -> the array, never unpickling; a SampleError naming `what` otherwise."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise SampleError(f"{what}: not a plain .npy array ({e})") from None


def encode_labels(labels: np.ndarray) -> bytes:
    a = np.asarray(labels)
    if a.ndim != 1 or not np.isin(a, (0, 1)).all():
        raise SampleError(f"{LABELS_FIELD}: expected a 1-D multi-hot vector of 0/1, got shape {a.shape}")
    return encode_npy(a.astype(np.uint8))


def decode_labels(data: bytes) -> np.ndarray:
    return decode_npy(data, LABELS_FIELD)


def encode_tile_frac(frac: np.ndarray) -> bytes:
    a = np.asarray(frac, dtype=np.float16)
    if a.ndim != 2 or a.shape[0] != N_TILES:
        raise SampleError(f"{TILE_FRAC_FIELD}: expected [{N_TILES}, n_concepts], got shape {a.shape}")
    return encode_npy(a)


def decode_tile_frac(data: bytes) -> np.ndarray:
    return decode_npy(data, TILE_FRAC_FIELD)


def _json_default(o: Any):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return sorted(o) if isinstance(o, set) else list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


_QUERY_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s]*\?", re.I)


def _check_no_secrets(o: Any, path: str = "meta") -> None:
    if isinstance(o, str):
        if _QUERY_URL.search(o):
            raise SampleError(f"{path}: holds a URL with a query string (a signed href?); meta.json never stores those")
    elif isinstance(o, Mapping):
        for k, v in o.items():
            _check_no_secrets(v, f"{path}.{k}")
    elif isinstance(o, (list, tuple)):
        for i, v in enumerate(o):
            _check_no_secrets(v, f"{path}.{i}")


def encode_meta(meta: Mapping) -> bytes:
    _check_no_secrets(meta)
    try:
        text = json.dumps(meta, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False, default=_json_default)
    except ValueError as e:
        raise SampleError(f"{META_FIELD}: {e}") from None
    return (text + "\n").encode("ascii")


def decode_meta(data: bytes) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError(f"{META_FIELD}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Labels from a plan row
# ---------------------------------------------------------------------------------------------
def labels_from_concepts(concepts: Iterable[int], n_concepts: int) -> np.ndarray:
    """Concept ids -> [n_concepts] uint8 multi-hot."""
    out = np.zeros(n_concepts, dtype=np.uint8)
    for c in concepts:
        c = int(c)
        if not 0 <= c < n_concepts:
            raise SampleError(f"concept id {c} is outside 0..{n_concepts - 1}")
        out[c] = 1
    return out


def dense_tile_frac(tile_idx: Sequence[int], tile_concept: Sequence[int], tile_frac: Sequence[float],
                    n_concepts: int, n_tiles: int = N_TILES) -> np.ndarray:
    """Sparse (tile, concept, fraction) triples -> dense float16 [n_tiles, n_concepts]."""
    if not (len(tile_idx) == len(tile_concept) == len(tile_frac)):
        raise SampleError(f"tile_idx/tile_concept/tile_frac lengths differ "
                          f"({len(tile_idx)}, {len(tile_concept)}, {len(tile_frac)})")
    out = np.zeros((n_tiles, n_concepts), dtype=np.float32)
    for t, c, f in zip(tile_idx, tile_concept, tile_frac):
        t, c = int(t), int(c)
        if not (0 <= t < n_tiles and 0 <= c < n_concepts):
            raise SampleError(f"tile fraction ({t}, {c}) is outside {n_tiles} tiles x {n_concepts} concepts")
        out[t, c] = float(f)
    return out.astype(np.float16)


# ---------------------------------------------------------------------------------------------
# Whole samples
# ---------------------------------------------------------------------------------------------
def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SampleError(f"sample key {key!r} must be letters, digits, '-' or '_' (no dots)")
    return key


def _check_sample(s: Sample) -> None:
    check_key(s.key)
    if s.split not in SPLITS:
        raise SampleError(f"sample {s.key}: split {s.split!r} is not one of {', '.join(SPLITS)}")
    lr = _rgb(s.lr, LR_FIELD)
    if lr.shape[:2] != (TILE_PX, TILE_PX):
        raise SampleError(f"sample {s.key}: lr is {lr.shape[0]}x{lr.shape[1]}, expected {TILE_PX}x{TILE_PX}")
    hr = np.asarray(s.hr)
    if hr.shape != (N_TILES, TILE_PX, TILE_PX, 3) or hr.dtype != np.uint8:
        raise SampleError(f"sample {s.key}: hr is {hr.dtype} {hr.shape}, expected uint8 ({N_TILES}, {TILE_PX}, {TILE_PX}, 3)")
    if tuple(s.tiles) != tuple(range(N_TILES)):
        raise SampleError(f"sample {s.key}: only a full sample (all {N_TILES} tiles) can be written")
    n = np.asarray(s.labels).shape[0]
    if np.asarray(s.tile_frac).shape != (N_TILES, n):
        raise SampleError(f"sample {s.key}: tile_frac shape {np.asarray(s.tile_frac).shape} != ({N_TILES}, {n})")


def encode_sample(s: Sample) -> dict[str, bytes]:
    """All fields of a full sample as bytes, in :data:`FIELDS` order. ``meta.json`` carries the
    sample's key and split (they override any in ``s.meta``)."""
    _check_sample(s)
    meta = dict(s.meta)
    meta["key"], meta["split"] = s.key, s.split
    out = {LR_FIELD: encode_lr(s.lr)}
    for i in range(N_TILES):
        out[hr_field(i)] = encode_tile(s.hr[i])
    out[LABELS_FIELD] = encode_labels(s.labels)
    out[TILE_FRAC_FIELD] = encode_tile_frac(s.tile_frac)
    out[META_FIELD] = encode_meta(meta)
    return out


def _tile_list(tiles: Iterable[int] | str | None) -> tuple[int, ...]:
    """Tile indices from None or ``"all"`` (all 100, as ``gl10m.data.load`` takes them) or a list."""
    if tiles is None or (isinstance(tiles, str) and tiles == "all"):
        return tuple(range(N_TILES))
    if isinstance(tiles, (str, bytes)):
        raise SampleError(f"tiles must be 'all' or a list of tile indices, got {tiles!r}")
    out = tuple(int(t) for t in tiles)
    bad = [t for t in out if not 0 <= t < N_TILES]
    if bad:
        raise SampleError(f"tile index {bad[0]} is outside 0..{N_TILES - 1}")
    return out


def decode_sample(fields: Mapping[str, bytes], *, tiles: Iterable[int] | None = None) -> Sample:
    """Fields (name -> bytes) -> Sample, decoding only the HR tiles in `tiles` (default all),
    in the order given. Fields not needed (unselected tiles) may be absent from `fields`."""
    idx = _tile_list(tiles)
    need = [LR_FIELD, LABELS_FIELD, TILE_FRAC_FIELD, META_FIELD, *(hr_field(i) for i in idx)]
    missing = [f for f in need if f not in fields]
    if missing:
        raise SampleError(f"sample is missing field(s) {', '.join(missing[:3])}")
    meta = decode_meta(fields[META_FIELD])
    hr = np.empty((len(idx), TILE_PX, TILE_PX, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        hr[j] = decode_tile(fields[hr_field(i)])
    return Sample(key=meta.get("key", ""), split=meta.get("split", ""), lr=decode_lr(fields[LR_FIELD]), hr=hr,
                  labels=decode_labels(fields[LABELS_FIELD]), tile_frac=decode_tile_frac(fields[TILE_FRAC_FIELD]),
                  meta=meta, tiles=idx)


# ---------------------------------------------------------------------------------------------
# Staged samples on disk
# ---------------------------------------------------------------------------------------------
def staged_dir(workdir: str | Path, split: str, key: str) -> Path:
    """``W/staged/{split}/{key}``."""
    return Path(workdir) / "staged" / split / check_key(key)


def _fsync_files(paths: list[Path], threads: int = 16) -> None:
    """fsync every file, concurrently: the filesystem commits concurrent fsyncs together (ext4:
    one journal commit for the batch), ~10x faster than one after the other for a sample's
    ~100 small files."""
    def one(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(paths) <= 1:
        for path in paths:
            one(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(paths)), thread_name_prefix="gl10m-fsync") as ex:
        list(ex.map(one, paths))


def write_staged(workdir: str | Path, sample: Sample, *, durable: bool = True,
                 fields: Mapping[str, bytes] | None = None) -> Path:
    """Write `sample` to ``W/staged/{split}/{key}/`` atomically and return that folder.

    The files go into a temp folder beside the target (each fsynced), which is then renamed
    into place; an existing sample is swapped out and removed only after the new one is in.
    durable=False skips the fsyncs (the rename stays atomic, so a killed process never leaves a
    half sample; only a power cut could): for samples that can be regenerated bit for bit.
    `fields`: ``encode_sample(sample)`` when the caller has it already.
    """
    fields = encode_sample(sample) if fields is None else fields
    final = staged_dir(workdir, sample.split, sample.key)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(sample.key), suffix=".tmp", dir=parent))
    try:
        for name, data in fields.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
        if durable:
            _fsync_files([tmp / name for name in fields])
        os.chmod(tmp, 0o755)
        if durable:
            fsync_dir(tmp)
        if final.exists():
            old = parent / f"{temp_prefix(sample.key)}{uuid.uuid4().hex[:8]}.old.tmp"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)  # put the previous sample back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        if durable:
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_fields(path: str | Path, names: Iterable[str] | None = None) -> dict[str, bytes]:
    """The raw bytes of a staged sample's fields (all of them in :data:`FIELDS` order, or
    `names`): the one reader of staged folders (the shard stage copies these bytes). The folder
    must hold exactly the schema's files; names starting with a dot (leftovers of interrupted
    atomic writes) are never part of a sample."""
    path = Path(path)
    if not path.is_dir():
        raise SampleError(f"staged sample {path} does not exist")
    present = set()
    for p in path.iterdir():
        if p.name.startswith("."):
            continue
        if not p.is_file():
            raise SampleError(f"staged sample {path}: {p.name} is not a file (a staged sample holds only files)")
        present.add(p.name)
    extra = sorted(present - set(FIELDS))
    missing = [f for f in FIELDS if f not in present]
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise SampleError(f"staged sample {path} is not a complete sample ({what})")
    return {n: (path / n).read_bytes() for n in (FIELDS if names is None else names)}


def read_staged(path: str | Path, *, tiles: Iterable[int] | None = None) -> Sample:
    """Read and decode the staged sample folder `path`, decoding only `tiles` (default all)."""
    idx = _tile_list(tiles)
    names = [LR_FIELD, LABELS_FIELD, TILE_FRAC_FIELD, META_FIELD, *(hr_field(i) for i in idx)]
    return decode_sample(read_fields(path, names), tiles=idx)


def clean_staged_temp(workdir: str | Path) -> int:
    """Remove temp folders left by interrupted :func:`write_staged` calls; return how many."""
    root = Path(workdir) / "staged"
    n = 0
    if root.is_dir():
        for split in root.iterdir():
            if split.is_dir():
                for p in split.glob(".*.tmp"):
                    if p.is_dir() and is_orphan_temp(p.name):  # never a live writer's
                        shutil.rmtree(p, ignore_errors=True)
                        n += 1
    return n
