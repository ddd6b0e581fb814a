"""Tile selections and decoding (LR PNG, HR JPEG tiles, labels), with one-line LoaderErrors."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gl10m import samples as smp
from gl10m.data.common import LoaderError, torch


# ---------------------------------------------------------------------------------------------
# Tiles and decoding
# ---------------------------------------------------------------------------------------------
def tile_indices(sel, where: str) -> tuple[int, ...]:
    """A tile selection (indices, a boolean mask, a tensor) as a tuple of distinct tile indices, or a
    one-line LoaderError naming `where`."""
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


def decode_tiles(idx: Sequence[int], data: dict[str, bytes], where: str = "sample",
                 tile_px: int | None = None) -> np.ndarray:
    """The HR tiles ``idx`` from ``{hr_XX.jpg: bytes}`` -> uint8 [n, S, S, 3] (NHWC), decoded straight
    into one buffer with :func:`gl10m.samples.decode_tile`; S = 268, or with ``tile_px`` the reduced
    size of :func:`decoded_tile_px`, scaled inside the JPEG decoder (its DCT scaling: a model that resizes
    tiles to 64 px decodes them at 67 px, ~1.6x faster than in full and with no 268 px resize to
    follow; the result differs from full decode + antialiased resize by ~0.4 DN on average)."""
    idx = tuple(int(i) for i in idx)
    side = decoded_tile_px(tile_px)
    min_side = None if side == smp.TILE_PX else side
    hr = np.empty((len(idx), side, side, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        f = smp.hr_field(i)
        try:
            got = smp.decode_tile(data[f], out=hr[j], min_side=min_side)
        except ValueError as e:
            raise LoaderError(f"{where}: {f} is not a {smp.TILE_PX}x{smp.TILE_PX} JPEG ({e})") from None
        if got.shape != hr[j].shape:
            raise LoaderError(f"{where}: {f} decodes to {got.shape[1]}x{got.shape[0]}, expected {side}x{side} "
                              f"(a {smp.TILE_PX}x{smp.TILE_PX} JPEG)")
    return hr


def decode_lr(data: bytes, where: str = "lr") -> np.ndarray:
    """``lr.png`` bytes -> uint8 [268, 268, 3] (HWC), or a one-line :class:`LoaderError`."""
    try:
        lr = smp.decode_lr(data)
    except smp.SampleError as e:
        raise LoaderError(f"{where}: {e}") from None
    except Exception as e:  # PIL.UnidentifiedImageError and friends
        raise LoaderError(f"{where}: {smp.LR_FIELD} is not a PNG ({e})") from None
    if lr.shape != (smp.TILE_PX, smp.TILE_PX, 3):
        raise LoaderError(f"{where}: {smp.LR_FIELD} is {lr.shape}, expected ({smp.TILE_PX}, {smp.TILE_PX}, 3)")
    return lr


def decode_extra(idx: Sequence[int], data: dict[str, bytes], where: str, have: str,
                  want: str) -> tuple[np.ndarray, np.ndarray]:
    """The extra bands of a sample written with `have` (rgbn or raw), as `want` asks (rgbn from
    raw shards: their fourth band): (LR [268, 268, C] uint16, HR [n, 268, 268, C] uint8)."""
    def one(field: str, lr: bool) -> np.ndarray:
        if field not in data:
            raise LoaderError(f"{where}: has no {field} (bands {have!r} asked for)")
        try:
            a = smp.decode_extra(data[field], have, lr=lr, what=field)
        except smp.SampleError as e:
            raise LoaderError(f"{where}: {e}") from None
        return a[..., 3:4] if want != have else a

    lr = one(smp.lr_extra_field(have), True)
    c, dtype = smp.EXTRA[want][3], smp.EXTRA[want][4]
    hr = np.empty((len(idx), smp.TILE_PX, smp.TILE_PX, c), dtype)
    for j, i in enumerate(idx):
        hr[j] = one(smp.hr_extra_field(i, have), False)
    return lr, hr


def chw(a: np.ndarray):
    """An HWC image or NHWC stack as a CHW / NCHW torch tensor (a view, no copy)."""
    t = torch.from_numpy(a)
    return t.permute(2, 0, 1) if a.ndim == 3 else t.permute(0, 3, 1, 2)


def decode_labels(data: bytes, where: str = "sample") -> np.ndarray:
    """``labels.npy`` bytes -> the multi-hot label vector (never unpickles)."""
    try:
        return smp.decode_labels(data)
    except smp.SampleError as e:
        raise LoaderError(f"{where}: {e}") from None
