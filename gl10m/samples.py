"""The sample format: THE one place that encodes, writes, reads and decodes a sample.

A sample is one scene. Its fields (file names; fixed, lowercase, identical in every sample):

* ``lr.png``: the Sentinel-2 image, 268 x 268 RGB uint8 (PNG, Pillow, compress level 6);
* ``hr_00.jpg`` .. ``hr_99.jpg``: the 100 NAIP tiles, 268 x 268 RGB uint8, JPEG quality 95,
  4:4:4 (simplejpeg), index ``row*10 + col`` with row 0 north and col 0 west;
* ``labels.npy``: [66] uint8 multi-hot (``np.save``; loaded with ``allow_pickle=False``);
* ``tile_frac.npy``: [100, 66] float16, the fraction of each tile covered by each concept;
* ``meta.json``: provenance and QC (sorted keys, one space indent, no NaN, never a URL with a
  query string: signed hrefs and tokens must not leak into a dataset).

With ``imagery.bands`` other than ``rgb`` every sample also holds one extra member for the LR
image and one per HR tile (:data:`EXTRA`), the same set in every sample of a dataset:

* ``rgbn``: ``lr_nir.npz`` (Sentinel-2 B08, [268, 268, 1] uint16 harmonised surface reflectance
  * 10000) and ``hr_00_nir.npz`` .. ``hr_99_nir.npz`` (NAIP band 4, [268, 268, 1] uint8);
* ``raw``: ``lr_raw.npz`` (B02, B03, B04, B08: [268, 268, 4] uint16 harmonised reflectance * 10000)
  and ``hr_00_raw.npz`` .. (NAIP R, G, B, N: [268, 268, 4] uint8).

Each ``.npz`` holds one array under the name ``nir`` / ``raw``, deflate-compressed (a zip written
here with fixed timestamps, so rebuilds stay byte-identical; ``np.savez_compressed`` stamps the
current time). Why ``.npz``: lossless, compressed, any band count and dtype, and both plain
webdataset 1.0.2 (``autodecode.basichandlers``: ``npz`` -> ``dict(np.load(...))``) and Hugging Face
``datasets``' webdataset builder (``npz`` -> ``np.load(..., allow_pickle=False)``) decode it without
gl10m. ``.npy`` is not compressed; 16-bit PNG holds 1 or 3 channels and Pillow (webdataset's image
decoder) reduces 16-bit RGB to 8 bits; neither decodes a TIFF of 4 uint16 bands by default.
Pixels without any valid observation are 0 (as in ``lr.png``).

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
# imagery.bands -> (name of the extra members, LR channels and dtype, HR channels and dtype, what they hold)
BANDS = ("rgb", "rgbn", "raw")
EXTRA: dict[str, tuple[str, int, str, int, str, tuple[str, ...], tuple[str, ...]]] = {
    "rgbn": ("nir", 1, "uint16", 1, "uint8", ("B08",), ("N",)),
    "raw": ("raw", 4, "uint16", 4, "uint8", ("B02", "B03", "B04", "B08"), ("R", "G", "B", "N")),
}
REFLECTANCE_SCALE = 1e-4  # extra LR members: reflectance = value * scale + offset (harmonised: offset 0)
REFLECTANCE_OFFSET = 0.0
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class SampleError(UserError, ValueError):
    """A sample that cannot be written or read (bad shape, missing field, bad key...)."""


def hr_field(i: int) -> str:
    return f"hr_{int(i):02d}.jpg"


HR_FIELDS = tuple(hr_field(i) for i in range(N_TILES))
FIELDS = (LR_FIELD, *HR_FIELDS, LABELS_FIELD, TILE_FRAC_FIELD, META_FIELD)


def check_bands(bands: str) -> str:
    if bands not in BANDS:
        raise SampleError(f"bands must be one of {', '.join(BANDS)}, got {bands!r}")
    return bands


def lr_extra_field(bands: str) -> str:
    """``lr_nir.npz`` / ``lr_raw.npz``: the LR image's extra member for `bands` (not ``rgb``)."""
    return f"lr_{EXTRA[bands][0]}.npz"


def hr_extra_field(i: int, bands: str) -> str:
    """``hr_07_nir.npz`` / ``hr_07_raw.npz``: HR tile `i`'s extra member for `bands`."""
    return f"hr_{int(i):02d}_{EXTRA[bands][0]}.npz"


def fields_for(bands: str = "rgb") -> tuple[str, ...]:
    """Every field of a sample built with `bands` (the rgb fields, then the extra ones)."""
    if check_bands(bands) == "rgb":
        return FIELDS
    return (*FIELDS, lr_extra_field(bands), *(hr_extra_field(i, bands) for i in range(N_TILES)))


def extra_channels(bands: str) -> list[int]:
    """Which of the 4 bands a provider delivers (S2 B02, B03, B04, B08; NAIP R, G, B, N) `bands`
    stores: ``[3]`` (the NIR) for rgbn, all four for raw."""
    return [3] if check_bands(bands) == "rgbn" else [0, 1, 2, 3]


def extra_meta(bands: str) -> dict:
    """What ``meta.json`` says about the extra members of `bands` (not ``rgb``)."""
    name, lc, ld, hc, hd, lb, hb = EXTRA[check_bands(bands)]
    return {"mode": bands,
            "lr": {"field": lr_extra_field(bands), "array": name, "bands": list(lb), "dtype": ld,
                   "shape": [TILE_PX, TILE_PX, lc], "scale": REFLECTANCE_SCALE, "offset": REFLECTANCE_OFFSET,
                   "nodata": 0, "units": "surface reflectance = value * scale + offset (harmonised: the "
                                         "L2A +1000 DN offset already removed)"},
            "hr": {"field": f"hr_NN_{name}.npz", "array": name, "bands": list(hb), "dtype": hd,
                   "shape": [TILE_PX, TILE_PX, hc], "nodata": 0, "units": "NAIP digital numbers (uint8), "
                                                                          "mosaicked like the RGB tiles"}}


def bands_of(names: Iterable[str]) -> str:
    """The bands mode a set of field names was written with (``rgb`` when no extra member)."""
    names = set(names)
    for b in BANDS[1:]:
        if lr_extra_field(b) in names:
            return b
    return "rgb"


@dataclass
class Sample:
    """One scene in memory.

    ``hr`` holds the tiles listed in ``tiles`` (all 100, index order, unless a reader asked
    for a subset), [len(tiles), 268, 268, 3] uint8. With ``bands`` other than ``rgb``,
    ``lr_extra`` and ``hr_extra`` hold the extra bands (:data:`EXTRA`).
    """

    key: str
    split: str
    lr: np.ndarray
    hr: np.ndarray
    labels: np.ndarray
    tile_frac: np.ndarray
    meta: dict
    tiles: tuple[int, ...] = field(default=tuple(range(N_TILES)))
    bands: str = "rgb"
    lr_extra: np.ndarray | None = None  # [268, 268, C] (see EXTRA), None for rgb or when not decoded
    hr_extra: np.ndarray | None = None  # [len(tiles), 268, 268, C]


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


_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def encode_npz(arr: np.ndarray, name: str) -> bytes:
    """One array as ``.npz`` bytes (deflate, level 6), byte-identical for the same array: a zip with
    one member ``{name}.npy`` and a fixed timestamp (what ``np.load`` and ``np.savez_compressed`` use)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        zf.writestr(info, encode_npy(arr), compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    return buf.getvalue()


def decode_npz(data: bytes, name: str, what: str) -> np.ndarray:
    """``.npz`` bytes -> its array `name`, never unpickling; a SampleError naming `what` otherwise."""
    import zipfile

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if list(z.files) != [name]:
                raise SampleError(f"{what}: expected one array {name!r}, found {list(z.files)}")
            return z[name]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise SampleError(f"{what}: not a plain .npz array ({type(e).__name__}: {e})") from None


def _check_extra(a: np.ndarray, bands: str, lr: bool, what: str, n: int | None = None) -> np.ndarray:
    _, lc, ld, hc, hd, _, _ = EXTRA[bands]
    c, d = (lc, ld) if lr else (hc, hd)
    shape = (TILE_PX, TILE_PX, c) if n is None else (n, TILE_PX, TILE_PX, c)
    a = np.asarray(a)
    if a.shape != shape or a.dtype != np.dtype(d):
        raise SampleError(f"{what}: expected {d} {shape}, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def encode_extra(arr: np.ndarray, bands: str, *, lr: bool) -> bytes:
    """The LR image's (`lr`) or one HR tile's extra bands as ``.npz`` bytes (shape/dtype checked)."""
    what = lr_extra_field(bands) if lr else f"hr_NN_{EXTRA[bands][0]}.npz"
    return encode_npz(_check_extra(arr, bands, lr, what), EXTRA[bands][0])


def decode_extra(data: bytes, bands: str, *, lr: bool, what: str = "") -> np.ndarray:
    """Inverse of :func:`encode_extra`; a SampleError when the member is not the expected array."""
    what = what or (lr_extra_field(bands) if lr else f"hr_NN_{EXTRA[bands][0]}.npz")
    return _check_extra(decode_npz(data, EXTRA[bands][0], what), bands, lr, what)


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
    if check_bands(s.bands) != "rgb":
        if s.lr_extra is None or s.hr_extra is None:
            raise SampleError(f"sample {s.key}: bands {s.bands!r} needs lr_extra and hr_extra")
        _check_extra(s.lr_extra, s.bands, True, f"sample {s.key}: lr_extra")
        _check_extra(s.hr_extra, s.bands, False, f"sample {s.key}: hr_extra", N_TILES)
    n = np.asarray(s.labels).shape[0]
    if np.asarray(s.tile_frac).shape != (N_TILES, n):
        raise SampleError(f"sample {s.key}: tile_frac shape {np.asarray(s.tile_frac).shape} != ({N_TILES}, {n})")


def encode_sample(s: Sample) -> dict[str, bytes]:
    """All fields of a full sample as bytes, in :func:`fields_for` order. ``meta.json`` carries the
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
    if s.bands != "rgb":
        name = EXTRA[s.bands][0]
        out[lr_extra_field(s.bands)] = encode_npz(np.ascontiguousarray(s.lr_extra), name)
        for i in range(N_TILES):
            out[hr_extra_field(i, s.bands)] = encode_npz(np.ascontiguousarray(s.hr_extra[i]), name)
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


def decode_sample(fields: Mapping[str, bytes], *, tiles: Iterable[int] | None = None,
                  bands: str | None = None) -> Sample:
    """Fields (name -> bytes) -> Sample, decoding only the HR tiles in `tiles` (default all),
    in the order given. Fields not needed (unselected tiles) may be absent from `fields`.
    `bands`: also decode that mode's extra members (default: the mode the fields were written
    with, :func:`bands_of`; ``"rgb"`` decodes none)."""
    idx = _tile_list(tiles)
    bands = check_bands(bands_of(fields) if bands is None else bands)
    need = [LR_FIELD, LABELS_FIELD, TILE_FRAC_FIELD, META_FIELD, *(hr_field(i) for i in idx)]
    if bands != "rgb":
        need += [lr_extra_field(bands), *(hr_extra_field(i, bands) for i in idx)]
    missing = [f for f in need if f not in fields]
    if missing:
        raise SampleError(f"sample is missing field(s) {', '.join(missing[:3])}")
    meta = decode_meta(fields[META_FIELD])
    hr = np.empty((len(idx), TILE_PX, TILE_PX, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        hr[j] = decode_tile(fields[hr_field(i)])
    lr_x = hr_x = None
    if bands != "rgb":
        lr_x = decode_extra(fields[lr_extra_field(bands)], bands, lr=True)
        hr_x = np.stack([decode_extra(fields[hr_extra_field(i, bands)], bands, lr=False,
                                      what=hr_extra_field(i, bands)) for i in idx]) if idx else \
            np.zeros((0, TILE_PX, TILE_PX, EXTRA[bands][3]), EXTRA[bands][4])
    return Sample(key=meta.get("key", ""), split=meta.get("split", ""), lr=decode_lr(fields[LR_FIELD]), hr=hr,
                  labels=decode_labels(fields[LABELS_FIELD]), tile_frac=decode_tile_frac(fields[TILE_FRAC_FIELD]),
                  meta=meta, tiles=idx, bands=bands, lr_extra=lr_x, hr_extra=hr_x)


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
    """The raw bytes of a staged sample's fields (all of them in :func:`fields_for` order, or
    `names`): the one reader of staged folders (the shard stage copies these bytes). The folder
    must hold exactly the schema's files (those of the bands mode its extra members say,
    :func:`bands_of`); names starting with a dot (leftovers of interrupted atomic writes) are
    never part of a sample."""
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
    schema = fields_for(bands_of(present))
    extra = sorted(present - set(schema))
    missing = [f for f in schema if f not in present]
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        raise SampleError(f"staged sample {path} is not a complete sample ({what})")
    return {n: (path / n).read_bytes() for n in (schema if names is None else names)}


def read_staged(path: str | Path, *, tiles: Iterable[int] | None = None) -> Sample:
    """Read and decode the staged sample folder `path`, decoding only `tiles` (default all), with
    its extra bands if it has them."""
    idx = _tile_list(tiles)
    bands = bands_of(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else "rgb"
    names = [LR_FIELD, LABELS_FIELD, TILE_FRAC_FIELD, META_FIELD, *(hr_field(i) for i in idx)]
    if bands != "rgb":
        names += [lr_extra_field(bands), *(hr_extra_field(i, bands) for i in idx)]
    return decode_sample(read_fields(path, names), tiles=idx, bands=bands)


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
