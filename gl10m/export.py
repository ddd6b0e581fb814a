"""One sample's images as GeoTIFFs (``gl10m export``): ``DIR/KEY/lr.tif`` and ``DIR/KEY/hr_XX.tif``.

The sample is found by key through the shards' sidecar index and only the members it needs
(``meta.json``, ``lr.png``, the asked tiles) are read from its shard by offset
(:func:`gl10m.inspect.read_fields`). Each image is written as a 3-band uint8 RGB GeoTIFF
(deflate, horizontal predictor, photometric RGB) in EPSG:4326 with the transform that the
sample's ``meta.json`` ``georef`` block gives (:mod:`gl10m.geometry`: the LR transform, and each
tile's derived from the HR mosaic's), so the files open in QGIS or rasterio where the scene is.
Pixels are the sample's decoded pixels, unchanged. Every file is written to a temp file beside
it and renamed into place: a crash leaves whole files or none, never half of one. The same
sample gives byte-identical files.

From Python::

    from gl10m.export import export_sample
    res = export_sample("W/shards", "CA-123", "out", tiles=[0, 45, 99])
    res.paths   # [out/CA-123/lr.tif, out/CA-123/hr_00.tif, ...]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from gl10m import geometry
from gl10m import inspect as insp
from gl10m import samples as smp
from gl10m.errors import UserError
from gl10m.io import atomic_path

LR_NAME = "lr.tif"


def tile_name(i: int) -> str:
    return f"hr_{int(i):02d}.tif"


@dataclass
class ExportResult:
    key: str
    folder: Path                     # DIR/KEY
    paths: list[Path] = field(default_factory=list)  # written (or, with dry_run, to be written)
    dry_run: bool = False


def parse_tiles(spec: str | Iterable[int] | None) -> list[int]:
    """Tile indices from ``"all"`` / None (all of them), ``"0,1,45"`` or a list; in the given
    order, duplicates dropped. Anything else is a one-line UserError."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(smp.N_TILES))
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            spec = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"--tiles must be 'all' or comma-separated tile indices 0..{smp.N_TILES - 1}, "
                            f"got {spec!r}") from None
    out: list[int] = []
    for t in spec:
        t = int(t)
        if not 0 <= t < smp.N_TILES:
            raise UserError(f"tile index {t} is outside 0..{smp.N_TILES - 1}")
        if t not in out:
            out.append(t)
    return out


def write_geotiff(path: str | Path, img: np.ndarray, transform, crs: str, tags: dict | None = None) -> None:
    """[H, W, 3] uint8 -> an RGB GeoTIFF at `path` (atomically: temp file, fsync, rename).
    `transform`: the GDAL geotransform (6 numbers)."""
    import rasterio
    from affine import Affine

    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{path}: expected [H, W, 3] uint8, got {img.dtype} {img.shape}")
    h, w, _ = img.shape
    with atomic_path(path, suffix=".tif") as tmp:
        with rasterio.open(tmp, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs,
                           transform=Affine.from_gdal(*[float(v) for v in transform]), compress="deflate",
                           predictor=2, photometric="RGB", interleave="pixel") as dst:
            dst.write(np.ascontiguousarray(img.transpose(2, 0, 1)))
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})


def export_sample(shards_dir: str | Path, key: str, out_dir: str | Path, *, tiles: str | Iterable[int] | None = "all",
                  lr: bool = True, dry_run: bool = False) -> ExportResult:
    """Write sample `key`'s LR image (`lr`) and HR `tiles` as GeoTIFFs under ``out_dir/key/``.

    `shards_dir`: a shards folder (``W/shards`` with ``index.parquet``). An unknown key, a missing
    shards folder or shard, a sample without georeferencing, or nothing to write is a one-line
    :class:`UserError`. `dry_run`: read only ``meta.json`` (the key and its georef are checked)
    and return the paths that would be written, writing nothing."""
    idx = parse_tiles(tiles)
    if not lr and not idx:
        raise UserError("nothing to export: --no-lr and no tiles")
    root = insp.shards_root(shards_dir)
    row = insp.index_row(insp.read_index(root), key, root)
    where = f"sample {key} ({row['split']}/{row['shard']})"
    folder = Path(out_dir) / str(row["key"])
    res = ExportResult(key=str(row["key"]), folder=folder, dry_run=dry_run)
    targets = ([(LR_NAME, smp.LR_FIELD, None)] if lr else []) + [(tile_name(i), smp.hr_field(i), i) for i in idx]
    names = [smp.META_FIELD] + ([] if dry_run else [f for _, f, _ in targets])
    data = insp.read_fields(root, row, names)
    try:
        meta = smp.decode_meta(data[smp.META_FIELD])
        crs = str(meta["georef"]["crs"]) if isinstance(meta.get("georef"), dict) else None
        transforms = {name: (geometry.lr_transform(meta) if i is None else geometry.tile_transform(meta, i))
                      for name, _, i in targets}
    except (smp.SampleError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: cannot georeference it ({e})") from None
    for name, fld, i in targets:
        path = folder / name
        res.paths.append(path)
        if dry_run:
            continue
        try:
            img = smp.decode_lr(data[fld]) if i is None else smp.decode_tile(data[fld])
        except Exception as e:  # noqa: BLE001 - a bad image: one line naming the sample and member
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{where}: {fld} does not decode ({msg})"[:500]) from None
        write_geotiff(path, img, transforms[name], crs,
                      tags={"gl10m_key": res.key, "gl10m_member": fld,
                            **({} if i is None else {"gl10m_tile": i, "gl10m_tile_row": i // smp.GRID,
                                                     "gl10m_tile_col": i % smp.GRID})})
    return res
