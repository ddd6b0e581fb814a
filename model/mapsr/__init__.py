"""MapSR: prompt-driven land-cover map super-resolution with a frozen vision encoder.

The method is :mod:`.model` (features, probe, prompts, matching, evaluation), the graph refinement
:mod:`.graph`, inputs and outputs :mod:`.io` (GeoTIFFs, class maps, gl10m samples, testbed scenes),
the held-out benchmark :mod:`.bench`, the command line :mod:`.cli` (``gl10m mapsr``). The public
names of ``model`` and ``io`` are importable from here (``from gl10m.model.mapsr import MapSR``);
they load on first use, so importing the CLI does not import torch.
"""
from __future__ import annotations

import importlib

_FROM = {
    "model": ("IGNORE", "NODATA_OUT", "MapSRError", "MapSRConfig", "FeatureMap", "dense_features", "train_probe",
              "PromptAccumulator", "cosine_scores", "heat", "sha256_arrays", "encoder_hash", "MapSR", "confusion",
              "scores_from_confusion", "evaluate", "upsample_coarse", "majority_pool", "coarse_prior"),
    "io": ("TESTBED_BASE", "ClassMap", "TestbedScene", "coarse_on_grid", "read_image", "read_truth",
           "sample_profile", "sample_scene", "testbed_scene", "write_map", "stretch_uint8", "material_to_base"),
    "graph": ("RefineConfig",),
}
_WHERE = {name: mod for mod, names in _FROM.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
