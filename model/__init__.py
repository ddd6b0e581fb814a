"""gl10m.model: the cross-scale model (:mod:`gl10m.model.crossscale`: sampler + predictor, their
training, fitting and evaluation) and MapSR, with the tile/text encoders both use
(:mod:`gl10m.model.encoders`) and the model configs (``configs/``).

The main public names are re-exported here, imported on first use, so ``import gl10m.model``
stays cheap (no torch) and ``from gl10m.model import Predictor`` works."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Predictor": "gl10m.model.crossscale.predictor",
    "load_predictor": "gl10m.model.crossscale.predictor",
    "Sampler": "gl10m.model.crossscale.sampler",
    "load_sampler": "gl10m.model.crossscale.sampler",
    "TileEncoder": "gl10m.model.encoders",
    "TextEncoder": "gl10m.model.encoders",
    "build_encoder": "gl10m.model.encoders",
    "load_encoder": "gl10m.model.encoders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
