"""The old home of the testbed's vector world, kept as a facade for callers of its names.

The world now lives in modules by concern: `spec` (load_spec, spec_from_dict, TestbedSpec,
BIOMES), `classes` (truth ids, marks, materials, draw order), `layout` (generate, build_region,
RegionWorld, the region builder), `recipes` and `sites` (what fills the cells), `pbfwrite`
(write_pbf, write_pbfs), `raster` (rasterize_truth, rasterize_layers, truth_grid, write_truth).
New code imports from those; model/ still imports from here. Importing this module loads no
profile: the profile-derived names (CONCEPT_NAMES, CID, TRUTH_CLASSES, BG, CLASS_MATERIAL) are
made on first use.
"""
from __future__ import annotations

from typing import Any

from gl10m.testbed import classes as _classes
from gl10m.testbed.classes import (BACKGROUND_CLASSES, MARK, MARK_NAMES, MATERIAL, MATERIALS, NODATA,
                                   Z_BRIDGE, Z_BUILDING, Z_CONTAINER, Z_COVER, Z_GROUND, Z_MAJOR, Z_MINOR,
                                   Z_SMALL, Z_WATER)
from gl10m.testbed.layout import RegionWorld, build_region, concept_targets, generate, utm_zone
from gl10m.testbed.pbfwrite import write_pbf, write_pbfs, write_vector_world
from gl10m.testbed.raster import (draw_shapes, rasterio_bounds, rasterize_layers, rasterize_truth, truth_grid,
                                  write_truth)
from gl10m.testbed.spec import (BIOMES, COASTAL, DEFAULT_SPEC, Frequency, RegionSpec, TestbedSpec, TestbedSpecError,
                                load_spec, spec_from_dict)

__all__ = [
    "BACKGROUND_CLASSES", "BG", "BIOMES", "CID", "CLASS_MATERIAL", "COASTAL", "CONCEPT_NAMES", "DEFAULT_SPEC",
    "Frequency", "MARK", "MARK_NAMES", "MATERIAL", "MATERIALS", "NODATA", "RegionSpec", "RegionWorld",
    "TRUTH_CLASSES", "TestbedSpec", "TestbedSpecError", "Z_BRIDGE", "Z_BUILDING", "Z_CONTAINER", "Z_COVER",
    "Z_GROUND", "Z_MAJOR", "Z_MINOR", "Z_SMALL", "Z_WATER", "build_region", "concept_targets", "draw_shapes",
    "generate", "load_spec", "rasterio_bounds", "rasterize_layers", "rasterize_truth", "spec_from_dict",
    "truth_grid", "utm_zone", "write_pbf", "write_pbfs", "write_truth", "write_vector_world",
]


def __getattr__(name: str) -> Any:
    if name in _classes._PROFILE_TABLES:
        return getattr(_classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
