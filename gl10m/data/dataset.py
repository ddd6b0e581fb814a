"""The torch dataset: :class:`ShardDataset` (splitting over ranks and workers, shuffling, reading
by offset or streaming), :func:`load` that makes one, and :func:`collate`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from gl10m import samples as smp
from gl10m.data import tar as _tar
from gl10m.data.common import HEAD_FIELDS, IterableDataset, LoaderError, TileSpec, check_bands, torch
from gl10m.data.decode import chw, decode_extra, decode_lr, decode_tiles, decoded_tile_px, tile_indices
from gl10m.data.sources import INDEX_NAME, Shard, ShardIndex, resolve
from gl10m.data.tar import NotSeekable, open_reader, open_stream, read_sample_members
from gl10m.shards import ShardError, iter_tar


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

    def __init__(self, shards: list[Shard], index: ShardIndex | None, *, split: str | None, tiles: TileSpec,
                 shuffle: int, seed: int, rank: int, world_size: int, with_epoch: int | None, verify: bool,
                 decode_meta: bool, split_by: str, tile_px: int | None = None, georef: bool = False,
                 bands: str | None = None):
        self._shards, self._index, self.split = shards, index, split
        self._tiles_fn = tiles if callable(tiles) else None
        self._tiles = None if callable(tiles) else (
            tuple(range(smp.N_TILES)) if isinstance(tiles, str)
            else tile_indices(tiles if isinstance(tiles, np.ndarray) or (torch is not None and isinstance(tiles, torch.Tensor))
                              else list(tiles), "tiles"))
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.with_epoch, self.verify, self.decode_meta, self.split_by = with_epoch, verify, decode_meta, split_by
        self.epoch = 0
        self.tile_px = tile_px
        self.georef = georef
        self.bands = None if bands in (None, "rgb") else bands  # extra bands to return, or None

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

    def _reader(self, s: Shard, readers: dict):
        if s.url not in readers:
            while len(readers) >= _tar.MAX_OPEN:
                old = readers.pop(next(iter(readers)))
                if old is not None:
                    old.close()
            try:
                readers[s.url] = open_reader(s.url)
            except NotSeekable:
                readers[s.url] = None
        else:
            readers[s.url] = readers.pop(s.url)  # most recently used last
        return readers[s.url]

    # -- streaming ------------------------------------------------------------------------------
    def _needed_head(self) -> tuple[str, ...]:
        return HEAD_FIELDS if self.decode_meta or self.georef else HEAD_FIELDS[1:]

    def _stream(self, s: Shard, keep, counter) -> Iterator[_Partial]:
        ix = self._index
        by_key = {ix.keys[r]: r for r in s.rows} if s.rows is not None else None
        head = set(self._needed_head())
        cur: dict | None = None
        pos = -1

        def finish(c):
            where = f"{s.name}: sample {c['key']}"
            schema = smp.fields_for(smp.bands_of(c["names"]))
            if set(c["names"]) != set(schema) or len(c["names"]) != len(schema):
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
                c["lr"] = decode_lr(c["data"][smp.LR_FIELD], where)
                sel = tile_indices(self._tiles_fn(chw(c["lr"])), where)
            data = {f: c["data"][f] for f in head}
            if self.bands is not None:
                have = smp.bands_of(c["names"])
                check_bands(self.bands, have, where)
                data[smp.lr_extra_field(have)] = c["data"][smp.lr_extra_field(have)]
            for i in sel:
                for f in _names((i,), self.bands is not None):
                    if f in c["data"]:
                        data[f] = c["data"][f]
            return _Partial(c["key"], s.name, data, c["lr"], sel)

        fh = open_stream(s.url)
        try:
            for m in iter_tar(fh, s.name):  # names, types and sizes checked before anything is read
                key, field = m.key, m.field
                if cur is None or key != cur["key"]:
                    if cur is not None:
                        out = finish(cur)
                        if out is not None:
                            yield out
                    pos += 1
                    k = keep is None or keep(pos)
                    cur = {"key": key, "names": [], "data": {}, "keep": k, "lr": None, "tiles": self._tiles}
                cur["names"].append(field)
                if not cur["keep"]:
                    continue
                if (self.verify or field in head or field == smp.LR_FIELD
                        or (self.bands is not None and field.startswith("lr_"))
                        or (field.startswith("hr_") and (cur["tiles"] is None
                                                         or field in _names(cur["tiles"], self.bands is not None)))):
                    cur["data"][field] = m.read()
                if field == smp.LR_FIELD and self._tiles_fn is not None and cur["tiles"] is None:
                    where = f"{s.name}: sample {key}"
                    cur["lr"] = decode_lr(cur["data"][field], where)
                    cur["tiles"] = tile_indices(self._tiles_fn(chw(cur["lr"])), where)
                    if not self.verify:  # drop tiles that came before LR and are not selected
                        names = _names(cur["tiles"], self.bands is not None)
                        for f in [f for f in cur["data"] if f.startswith("hr_") and f not in names]:
                            del cur["data"][f]
            if cur is not None:
                out = finish(cur)
                if out is not None:
                    yield out
        except ShardError as e:
            raise LoaderError(str(e)) from None
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
            have = ix.bands
            extra = self.bands is not None
            if extra:
                check_bands(self.bands, have, where)
            if self.verify:
                data = read_sample_members(reader, s.name, key, offs, sizes, smp.fields_for(have), ix.pos)
                from gl10m.shards import sample_digest

                if sample_digest(data) != ix.sha256[row]:
                    raise LoaderError(f"{where}: checksum mismatch")
            else:
                want = list(self._needed_head())
                if extra:
                    want.append(smp.lr_extra_field(have))
                if self._tiles is not None:
                    want += _names(self._tiles, extra, have)
                data = read_sample_members(reader, s.name, key, offs, sizes, want, ix.pos)
            lr, sel = None, self._tiles
            if sel is None:
                lr = decode_lr(data[smp.LR_FIELD], where)
                sel = tile_indices(self._tiles_fn(chw(lr)), where)
                missing = [f for f in _names(sel, extra, have) if f not in data]
                if missing:
                    data.update(read_sample_members(reader, s.name, key, offs, sizes, missing, ix.pos))
        if lr is None:
            lr = decode_lr(data[smp.LR_FIELD], where)
        out: dict[str, Any] = {"key": key}
        if self.decode_meta or self.georef:
            try:
                meta = smp.decode_meta(data[smp.META_FIELD])
            except smp.SampleError as e:
                raise LoaderError(f"{where}: {e}") from None
            if not isinstance(meta, dict) or meta.get("key", key) != key:
                raise LoaderError(f"{where}: meta.json names another sample ({meta.get('key') if isinstance(meta, dict) else meta!r})")
            if self.decode_meta:
                out["meta"] = meta
        try:
            labels = smp.decode_labels(data[smp.LABELS_FIELD])
            frac = smp.decode_tile_frac(data[smp.TILE_FRAC_FIELD])
        except smp.SampleError as e:
            raise LoaderError(f"{where}: {e}") from None
        if labels.ndim != 1 or frac.ndim != 2 or frac.shape[0] != smp.N_TILES:
            raise LoaderError(f"{where}: labels {labels.shape} / tile_frac {frac.shape} have the wrong shape")
        hr = decode_tiles(sel, data, where, self.tile_px)
        out.update(lr=chw(lr), hr=chw(hr), tiles=torch.tensor(sel, dtype=torch.int64).reshape(-1),
                   labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8)),
                   tile_frac=torch.from_numpy(np.ascontiguousarray(frac[list(sel)])))
        if self.bands is not None:
            have = smp.bands_of(data)
            check_bands(self.bands, have, where)
            lr_x, hr_x = decode_extra(sel, data, where, have, self.bands)
            # uint16 reflectance as int32 (torch's uint16 supports few operations); NAIP stays uint8
            out.update(lr_extra=chw(lr_x.astype(np.int32)), hr_extra=chw(hr_x))
        if self.georef:
            out.update(_georef_fields(meta, sel, where))
        return out


def _georef_fields(meta: dict, sel, where: str) -> dict:
    """``crs``, ``bounds`` / ``transform`` (the LR image) and ``tile_bounds`` / ``tile_transform``
    (the returned tiles) from meta.json's georef block (gl10m.geometry)."""
    from gl10m import geometry

    try:
        lr = geometry.lr_transform(meta)
        tt = [geometry.tile_transform(meta, i) for i in sel]
        tb = [geometry.image_bounds(meta, i) for i in sel]
        return {"crs": str(meta["georef"]["crs"]),
                "bounds": torch.tensor(geometry.image_bounds(meta, "lr"), dtype=torch.float64),
                "transform": torch.tensor(lr, dtype=torch.float64),
                "tile_bounds": torch.tensor(tb, dtype=torch.float64).reshape(-1, 4),
                "tile_transform": torch.tensor(tt, dtype=torch.float64).reshape(-1, 6)}
    except (ValueError, KeyError, TypeError) as e:
        raise LoaderError(f"{where}: georef=True but {e}") from None


def _names(idx: Iterable[int], extra: bool = False, have: str | None = None) -> list[str]:
    """The members of tiles `idx`: their JPEGs, and with `extra` their extra bands (of the mode
    `have`, or of every mode when it is not known yet: a streamed sample)."""
    out = []
    for i in idx:
        out.append(smp.hr_field(i))
        if extra:
            out += [smp.hr_extra_field(i, b) for b in ((have,) if have else smp.BANDS[1:])]
    return out


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
         index: str | os.PathLike | None = None, tile_px: int | None = None,
         georef: bool = False, bands: str = "rgb") -> ShardDataset:
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
    `georef`: add each sample's georeferencing from its meta.json (``crs``, ``bounds``,
    ``transform``, ``tile_bounds``, ``tile_transform``; see the module doc).
    `bands`: ``"rgb"`` (default: the RGB images only), ``"rgbn"`` or ``"raw"``: also return the
    shards' extra bands (``lr_extra`` int32 [C, 268, 268], reflectance * 10000; ``hr_extra`` uint8
    [n, C, 268, 268] for the returned tiles; :data:`gl10m.samples.EXTRA`), reading only the
    extra members of the returned tiles; ``rgbn`` can be read from ``raw`` shards (their fourth
    band). A one-line LoaderError when the shards do not hold them.

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
    if bands not in smp.BANDS:
        raise LoaderError(f"bands must be one of {', '.join(smp.BANDS)}, got {bands!r}")
    shards, ix, split = resolve(source, split, index)
    if ix is not None and len(ix.keys):
        check_bands(bands, ix.bands, f"{shards[0].url}")
    if verify and ix is None:
        raise LoaderError(f"verify=True needs the shard index ({INDEX_NAME}); none was found for {shards[0].url}")
    return ShardDataset(shards, ix, split=split, tiles=tiles, shuffle=int(shuffle), seed=int(seed), rank=int(rank),
                        world_size=int(world_size), with_epoch=None if with_epoch is None else int(with_epoch),
                        verify=verify, decode_meta=decode_meta, split_by=split_by,
                        tile_px=None if tile_px is None else int(decoded_tile_px(tile_px)), georef=bool(georef),
                        bands=bands)


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
