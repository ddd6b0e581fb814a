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
  the returned tiles;
* with ``georef=True`` (from meta.json's ``georef`` block, :mod:`gl10m.geometry`), torchgeo-style:
  ``crs`` (str, ``"EPSG:4326"``), ``bounds`` float64 [4] (west, south, east, north of the LR
  image: the footprint) and ``transform`` float64 [6] (its GDAL geotransform), ``tile_bounds``
  float64 [n, 4] and ``tile_transform`` float64 [n, 6] of the returned tiles, in their order.
* with ``bands="rgbn"`` or ``"raw"`` (shards built with that ``imagery.bands``; rgbn also from raw
  shards): ``lr_extra`` int32 [C, 268, 268] (Sentinel-2 reflectance * 10000) and ``hr_extra``
  uint8 [n, C, 268, 268] (NAIP) of the returned tiles (:data:`gl10m.samples.EXTRA`).

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

Modules: ``common`` (LoaderError, the schema's field positions), ``sources`` (folders, URLs,
manifest and sidecar index -> shards), ``tar`` (byte access: random reads by offset, streams,
:class:`SampleReader`), ``decode`` (LR, HR tiles, labels, with :mod:`gl10m.samples`' codecs),
``dataset`` (:class:`ShardDataset`, :func:`load`, :func:`collate`). The tar format (members read
by offset and checked against their headers, streamed members checked before they are read) is
:mod:`gl10m.shards`' one reader.
"""
from __future__ import annotations

from gl10m.data.common import FIELD_POS, HEAD_FIELDS, N_FIELDS, LoaderError, TileSpec
from gl10m.data.dataset import ShardDataset, collate, load
from gl10m.data.decode import decode_labels, decode_lr, decode_tiles, decoded_tile_px
from gl10m.data.tar import SampleReader

__all__ = ["FIELD_POS", "HEAD_FIELDS", "LoaderError", "N_FIELDS", "SampleReader", "ShardDataset", "TileSpec",
           "collate", "decode_labels", "decode_lr", "decode_tiles", "decoded_tile_px", "load"]
