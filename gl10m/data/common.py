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

N_FIELDS = len(smp.FIELDS)
FIELD_POS = {f: i for i, f in enumerate(smp.FIELDS)}
HEAD_FIELDS = (smp.META_FIELD, smp.LABELS_FIELD, smp.LR_FIELD, smp.TILE_FRAC_FIELD)


class LoaderError(UserError, ValueError):
    """A source, split, tile request or shard the loader cannot use."""
