"""The testbed's truth vocabulary: class ids, detail marks, surface materials, draw order.

Truth ids: 0..65 are the profile's concepts (CONCEPT_NAMES, from the default profile), 66.. the
background classes (BACKGROUND_CLASSES), 255 nodata. The profile-derived tables (CONCEPT_NAMES,
CID, TRUTH_CLASSES, BG, CLASS_MATERIAL) are made on first use, so importing this module loads no
profile; `from gl10m.testbed.classes import CID` works as for any other name.
Draw order (`z`, higher on top): 1 containers (landuse, grounds), 2 land cover, 3 water,
4 ground surfaces (pitches, parking, runways), 5 minor roads and rails, 6 major roads,
7 buildings, 8 small objects, 9 bridges and dams.
"""
from __future__ import annotations

import functools
from typing import Any

BACKGROUND_CLASSES = ["grass", "bare_soil", "residential", "building", "minor_road", "sea", "paved", "trees"]
NODATA = 255

# Detail marks (the `marks` layer of rasterize_truth): 0 = none.
MARK_NAMES: list[str] = [
    "none", "court_line", "parking_stripe", "rail_track", "road_marking", "roof_ridge",
    "helipad_marking", "runway_marking", "solar_row", "crop_row", "pool_edge", "shadow",
    "turbine_blade", "grave_row", "vehicle", "fence", "boat", "tank_rim",
]
MARK: dict[str, int] = {n: i for i, n in enumerate(MARK_NAMES)}

# Surface materials (the `material` layer of rasterize_layers): what the ground or roof is made
# of, so the renderer can tell a church roof from its parking lot though both carry a class.
MATERIALS: list[str] = [
    "none", "grass", "lawn", "dry_grass", "crop", "trees", "shrub", "marsh", "water", "sea", "sand", "desert",
    "soil", "rock", "gravel", "asphalt", "concrete", "roof", "roof_metal", "court", "turf", "pool", "solar", "track",
]
MATERIAL: dict[str, int] = {n: i for i, n in enumerate(MATERIALS)}
_CLASS_MATERIAL: dict[str, str] = {
    "tennis": "court", "skate_park": "concrete", "american_football": "turf", "swimming_pool": "pool",
    "golf_course": "lawn", "baseball_field": "turf", "stadium": "concrete", "roundabout": "asphalt",
    "airport": "dry_grass", "port": "concrete", "railway_station": "roof", "runway": "asphalt",
    "airport_hangar": "roof_metal", "airport_terminal": "roof", "helipad": "concrete", "dam": "concrete",
    "electric_substation": "gravel", "shipyard": "concrete", "solar_farm": "solar", "wind_farm": "dry_grass",
    "surface_mine": "rock", "waste_disposal": "soil", "water_treatment_facility": "concrete", "marina": "water",
    "beach": "sand", "parking_garage": "concrete", "parking_lot": "asphalt", "soccer": "turf", "farmland": "crop",
    "forest": "trees", "lake": "water", "wetland": "marsh", "park": "lawn", "river": "water", "desert": "desert",
    "meadow": "grass", "bareland": "rock", "chaparral": "shrub", "industrial": "concrete", "aquaculture": "water",
    "construction_site": "soil", "nature_reserve": "grass", "school": "lawn", "university": "lawn",
    "hospital": "lawn", "supermarket": "roof", "shopping_mall": "roof", "warehouse": "roof_metal", "office": "roof",
    "religious_building": "roof", "fire_station": "roof", "police_station": "roof", "prison": "gravel",
    "gas_station": "asphalt", "barn": "roof_metal", "car_dealership": "asphalt", "railroad": "track",
    "highway": "asphalt", "overpass": "concrete", "viaduct": "concrete", "tower": "concrete", "toll_booth": "roof",
    "tunnel_opening": "concrete", "pond": "water", "sand": "sand", "cemetery": "lawn",
    "grass": "grass", "bare_soil": "soil", "residential": "lawn", "building": "roof", "minor_road": "asphalt",
    "sea": "sea", "paved": "concrete", "trees": "trees",
}
# default material of each truth id (index = truth id)

Z_CONTAINER, Z_COVER, Z_WATER, Z_GROUND, Z_MINOR, Z_MAJOR, Z_BUILDING, Z_SMALL, Z_BRIDGE = range(1, 10)

_PROFILE_TABLES = ("CONCEPT_NAMES", "CID", "TRUTH_CLASSES", "BG", "CLASS_MATERIAL")


@functools.cache
def _profile_tables() -> dict[str, Any]:
    """The tables that depend on the default profile's concepts, built once on first use."""
    from gl10m.profile import DEFAULT_PROFILE, load as load_profile

    concept_names: list[str] = [c.name for c in load_profile(DEFAULT_PROFILE).concepts]
    truth_classes: list[str] = concept_names + BACKGROUND_CLASSES
    return {
        "CONCEPT_NAMES": concept_names,
        "CID": {n: i for i, n in enumerate(concept_names)},
        "TRUTH_CLASSES": truth_classes,
        "BG": {n: len(concept_names) + i for i, n in enumerate(BACKGROUND_CLASSES)},
        # default material of each truth id (index = truth id)
        "CLASS_MATERIAL": [MATERIAL[_CLASS_MATERIAL[n]] for n in truth_classes],
    }


def __getattr__(name: str) -> Any:
    if name in _PROFILE_TABLES:
        tables = _profile_tables()
        globals().update(tables)  # later lookups are plain module attributes
        return tables[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
