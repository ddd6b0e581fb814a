"""What every part of the loader shares: LoaderError, the schema's field positions, optional torch."""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

from gl10m import samples as smp
from gl10m.errors import UserError

try:  # torch is needed to iterate, not to import this module (docs, tooling)
    import torch
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover - exercised only where torch is missing
    torch = None
    IterableDataset = object  # type: ignore[assignment,misc]

TileSpec = Union[str, Sequence[int], Callable[[Any], Any]]

N_FIELDS = len(smp.FIELDS)  # the rgb schema's; a sample with extra bands has smp.fields_for(bands)
FIELD_POS = {f: i for i, f in enumerate(smp.FIELDS)}
BANDS = smp.BANDS


def field_pos(bands: str = "rgb") -> dict[str, int]:
    """Field -> position in the schema of a sample written with `bands` (rgb: :data:`FIELD_POS`)."""
    return FIELD_POS if bands == "rgb" else {f: i for i, f in enumerate(smp.fields_for(bands))}


def check_bands(want: str | None, have: str, where: str) -> None:
    """A one-line LoaderError when shards holding `have` cannot give the bands `want` (rgbn can
    be taken from raw shards: their fourth band is the NIR)."""
    if want in (None, "rgb") or want == have or (want == "rgbn" and have == "raw"):
        return
    held = "no extra bands (imagery.bands: rgb)" if have == "rgb" else f"bands {have!r}"
    raise LoaderError(f"{where}: bands={want!r} asked for, but these shards hold {held}; "
                      f"build them with imagery.bands: {want} in the profile")
HEAD_FIELDS = (smp.META_FIELD, smp.LABELS_FIELD, smp.LR_FIELD, smp.TILE_FRAC_FIELD)


class LoaderError(UserError, ValueError):
    """A source, split, tile request or shard the loader cannot use."""
