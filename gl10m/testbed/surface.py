"""The testbed's 1 m surface reflectance (R, G, B, NIR) rendered from the truth: seeds and value
noise (functions of world coordinates, so any grid over the same ground renders the same
textures), the look of each material and mark, and the seasonal browning of vegetation. Shared
by the NAIP and Sentinel-2 renderers (:mod:`gl10m.testbed.naip`, :mod:`gl10m.testbed.sentinel2`)."""
from __future__ import annotations

import datetime as dt
import math
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

# ------------------------------------------------------------------------------------------
# Seeds and value noise (functions of world coordinates)
# ------------------------------------------------------------------------------------------
def subseed(seed: int, *keys: Any) -> int:
    """A stable 63-bit seed from a base seed and keys (never Python's salted hash())."""
    blob = repr((int(seed),) + tuple(str(k) for k in keys)).encode()
    return (zlib.crc32(blob) << 31) ^ zlib.crc32(blob[::-1]) ^ (int(seed) & 0x7FFFFFFF)


def rng_for(seed: int, *keys: Any) -> np.random.Generator:
    return np.random.default_rng(subseed(seed, *keys))


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def _lattice(key: int, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Hashed values in [-1, 1) at integer lattice points (iy rows x ix cols), float32."""
    with np.errstate(over="ignore"):
        hx = _mix(ix.astype(np.int64).view(np.uint64) + np.uint64(key & 0xFFFFFFFFFFFF))
        z = _mix(hx[None, :] ^ (iy.astype(np.int64).view(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)))
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 / (1 << 24)) - np.float32(1.0))


def value_noise(xs: np.ndarray, ys: np.ndarray, spacing: float, key: int) -> np.ndarray:
    """Smooth noise in [-1, 1] at world points (ys rows x xs cols), lattice every `spacing` metres.

    The value at a place depends only on (x, y, spacing, key), not on the grid asking for it.
    """
    gx = xs / spacing
    gy = ys / spacing
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    fx = (gx - ix).astype(np.float32)
    fy = (gy - iy).astype(np.float32)
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    x0, y0 = ix.min(), iy.min()
    lat = _lattice(key, np.arange(x0, ix.max() + 2), np.arange(y0, iy.max() + 2))
    cx = ix - x0
    lx = lat[:, cx] * (1 - fx) + lat[:, cx + 1] * fx  # (ny_lattice, W)
    ry = iy - y0
    # lx[ry] * (1 - fy) + lx[ry + 1] * fy, in place (the same float32 operations, two full-size arrays)
    out = np.take(lx, ry, axis=0)
    out *= (1 - fy)[:, None]
    hi = np.take(lx, ry + 1, axis=0)
    hi *= fy[:, None]
    out += hi
    return out


# ------------------------------------------------------------------------------------------
# Appearance: per truth class and per mark
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Look:
    rgbn: tuple[float, float, float, float]  # surface reflectance R, G, B, NIR
    kind: Literal["veg", "water", "bare", "built"]
    fine: float = 0.03  # texture weights: grain (1.5 m), crowns (4 m), patches (15 m), fields (80 m)
    crown: float = 0.0
    med: float = 0.04
    coarse: float = 0.03
    height: float = 0.0  # metres; casts a shadow in NAIP


def _L(r, g, b, n, kind, **kw) -> Look:
    return Look((r, g, b, n), kind, **kw)


# What a pixel looks like is decided by its surface material (classes.MATERIALS: the school's
# lawn and its roof share a class); roofs and tall structures then take their class's colour and
# height. Colours are plausible surface reflectances.
MATERIAL_LOOKS: dict[str, Look] = {
    "none": _L(.20, .20, .19, .25, "bare"),
    "grass": _L(.07, .10, .05, .32, "veg", fine=.06, med=.10, coarse=.08),
    "lawn": _L(.06, .12, .05, .38, "veg", fine=.03, med=.05, coarse=.02),
    "dry_grass": _L(.15, .14, .09, .26, "veg", fine=.05, med=.10, coarse=.10),
    "crop": _L(.10, .12, .07, .30, "veg", fine=.04, med=.08, coarse=.25),
    "trees": _L(.03, .05, .03, .28, "veg", fine=.08, crown=.45, med=.06, height=15),
    "shrub": _L(.07, .08, .06, .20, "veg", fine=.05, crown=.35, med=.06),
    "marsh": _L(.05, .08, .05, .20, "veg", fine=.05, med=.25, coarse=.15),
    "water": _L(.03, .05, .05, .015, "water", fine=.01, med=.05, coarse=.02),
    "sea": _L(.02, .04, .06, .01, "water", fine=.01, med=.03, coarse=.02),
    "sand": _L(.38, .35, .29, .40, "bare", fine=.03, med=.05),
    "desert": _L(.32, .25, .18, .35, "bare", fine=.04, med=.05, coarse=.08),
    "soil": _L(.25, .21, .17, .28, "bare", fine=.08, med=.10, coarse=.08),
    "rock": _L(.26, .24, .22, .29, "bare", fine=.10, med=.12, coarse=.10),
    "gravel": _L(.27, .26, .24, .28, "bare", fine=.12, med=.04, coarse=0),
    "asphalt": _L(.09, .09, .09, .11, "built", fine=.02, med=.03, coarse=0),
    "concrete": _L(.30, .30, .29, .32, "built", fine=.02, med=.04, coarse=0),
    "roof": _L(.22, .19, .18, .23, "built", fine=.02, med=0, coarse=0, height=7),
    "roof_metal": _L(.40, .41, .42, .42, "built", fine=.01, med=0, coarse=0, height=9),
    "court": _L(.07, .17, .14, .12, "built", fine=.01, med=0, coarse=0),
    "turf": _L(.05, .15, .05, .38, "veg", fine=.02, med=.02, coarse=0),
    "pool": _L(.10, .29, .37, .04, "water", fine=.02, med=0, coarse=0),
    "solar": _L(.04, .05, .10, .07, "built", fine=.02, med=.02, coarse=0),
    "track": _L(.16, .14, .12, .18, "bare", fine=.08, med=.02, coarse=0),
}
ROOF_MATERIALS = ("roof", "roof_metal")
TALL_MATERIALS = ("roof", "roof_metal", "concrete")

# Roof colour (on roof materials) and height (on roof and concrete materials) per class.
CLASS_ROOF: dict[str, tuple[float, float, float, float]] = {
    "fire_station": (.30, .12, .10, .28), "barn": (.26, .08, .06, .25), "religious_building": (.26, .16, .13, .26),
    "office": (.18, .20, .24, .20), "school": (.30, .24, .20, .30), "university": (.28, .22, .19, .28),
    "hospital": (.38, .38, .37, .38), "supermarket": (.40, .40, .38, .41), "shopping_mall": (.34, .33, .31, .35),
    "warehouse": (.43, .43, .43, .44), "police_station": (.20, .22, .26, .24), "airport_terminal": (.33, .34, .37, .35),
    "airport_hangar": (.39, .40, .41, .41), "railway_station": (.25, .23, .22, .25), "toll_booth": (.40, .40, .38, .40),
    "gas_station": (.42, .40, .38, .42), "industrial": (.31, .31, .32, .33), "prison": (.30, .30, .28, .31),
}
CLASS_HEIGHT: dict[str, float] = {
    "stadium": 20, "railway_station": 8, "airport_hangar": 12, "airport_terminal": 15, "dam": 6,
    "parking_garage": 10, "industrial": 9, "school": 8, "university": 12, "hospital": 20, "supermarket": 7,
    "shopping_mall": 10, "warehouse": 10, "office": 25, "religious_building": 12, "fire_station": 8,
    "police_station": 8, "prison": 8, "gas_station": 5, "barn": 8, "overpass": 7, "viaduct": 15, "tower": 40,
    "toll_booth": 6, "building": 6, "shipyard": 10, "port": 8, "water_treatment_facility": 6,
}

# Marks: ("paint", colour) replaces the pixel; ("mul", factor) darkens it.
MARK_LOOKS: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "court_line": ("paint", (.55, .56, .55, .50)),
    "parking_stripe": ("paint", (.50, .50, .48, .46)),
    "rail_track": ("paint", (.10, .09, .08, .10)),
    "road_marking": ("paint", (.50, .46, .25, .45)),
    "roof_ridge": ("mul", (.70, .70, .70, .75)),
    "helipad_marking": ("paint", (.58, .58, .57, .52)),
    "runway_marking": ("paint", (.60, .60, .59, .55)),
    "solar_row": ("paint", (.03, .04, .09, .05)),
    "crop_row": ("mul", (.75, .85, .75, .90)),
    "pool_edge": ("paint", (.40, .39, .36, .40)),
    "shadow": ("mul", (.40, .40, .42, .45)),
    "turbine_blade": ("paint", (.55, .55, .55, .52)),
    "grave_row": ("paint", (.35, .34, .33, .33)),
    "vehicle": ("paint", (.30, .30, .30, .30)),  # colour varied per vehicle below
    "fence": ("mul", (.60, .60, .60, .65)),
    "boat": ("paint", (.55, .55, .55, .50)),
    "tank_rim": ("paint", (.45, .45, .44, .44)),
}
_VEHICLE_COLOURS = np.array([[.50, .50, .50, .45], [.08, .08, .09, .10], [.35, .06, .05, .30],
                             [.10, .14, .30, .25], [.40, .40, .42, .40], [.20, .20, .20, .22]], np.float32)


def look_for(material: str) -> Look:
    """The look of a material name: explicit, else a stable hashed colour (still distinct)."""
    if material in MATERIAL_LOOKS:
        return MATERIAL_LOOKS[material]
    h = zlib.crc32(material.encode())
    rgb = [0.08 + 0.3 * ((h >> s) & 0xFF) / 255 for s in (0, 8, 16)]
    return _L(rgb[0], rgb[1], rgb[2], 0.25, "bare")


@dataclass(frozen=True)
class Tables:
    """Look-up tables indexed by key = material * 256 + class (see `key_of`)."""
    rgbn: np.ndarray  # (4, n) float32
    fine: np.ndarray
    crown: np.ndarray
    med: np.ndarray
    coarse: np.ndarray
    veg: np.ndarray  # 1 where vegetation
    water: np.ndarray
    height: np.ndarray
    mark_paint: np.ndarray  # (4, 256) colour of painted marks
    mark_mul: np.ndarray  # (4, 256) factor of multiplying marks (1 = none)
    mark_is_paint: np.ndarray  # (256,) bool
    vehicle: int
    class_material: np.ndarray  # (256,) default material of a class (fills material 0)


def build_tables(class_names: list[str], material_names: list[str], mark_names: list[str],
                 class_material: list[int]) -> Tables:
    nm = len(material_names)
    n = nm * 256
    rgbn = np.zeros((4, n), np.float32)
    w = {k: np.zeros(n, np.float32) for k in ("fine", "crown", "med", "coarse", "veg", "water", "height")}
    for mi, mname in enumerate(material_names):
        lk = look_for(mname)
        for ci in range(256):
            cname = class_names[ci] if ci < len(class_names) else ""
            k = mi * 256 + ci
            col = CLASS_ROOF.get(cname, lk.rgbn) if mname in ROOF_MATERIALS else lk.rgbn
            rgbn[:, k] = col
            w["fine"][k], w["crown"][k], w["med"][k], w["coarse"][k] = lk.fine, lk.crown, lk.med, lk.coarse
            w["veg"][k] = lk.kind == "veg"
            w["water"][k] = lk.kind == "water"
            h = lk.height
            if mname in TALL_MATERIALS and cname in CLASS_HEIGHT:
                h = CLASS_HEIGHT[cname]
            w["height"][k] = h
    paint = np.zeros((4, 256), np.float32)
    mul = np.ones((4, 256), np.float32)
    is_paint = np.zeros(256, bool)
    vehicle = -1
    for i, name in enumerate(mark_names[:256]):
        if i == 0 or name == "none":
            continue
        mode, col = MARK_LOOKS.get(name, ("paint", (.5, .5, .5, .45)))
        if mode == "paint":
            paint[:, i] = col
            is_paint[i] = True
        else:
            mul[:, i] = col
        if name == "vehicle":
            vehicle = i
    cm = np.zeros(256, np.uint8)
    cm[:len(class_material)] = class_material[:256]
    return Tables(rgbn, w["fine"], w["crown"], w["med"], w["coarse"], w["veg"], w["water"], w["height"],
                  paint, mul, is_paint, vehicle, cm)


def default_tables() -> Tables:
    from gl10m.testbed.classes import CLASS_MATERIAL, MARK_NAMES, MATERIALS, TRUTH_CLASSES
    return build_tables(TRUTH_CLASSES, MATERIALS, MARK_NAMES, CLASS_MATERIAL)


def key_of(classes: np.ndarray, material: np.ndarray, tables: Tables, fill_class: int, nodata: int = 255) -> np.ndarray:
    """Per-pixel table key (uint16): material * 256 + class. Outside the mapped region (class
    nodata) the region's base cover is rendered (unlabelled land); material 0 takes the class's
    default material."""
    c = classes
    if (c == nodata).any():
        c = np.where(c == nodata, np.uint8(fill_class), c)
    m = material
    if m is None:
        m = tables.class_material[c]
    elif (m == 0).any():
        m = np.where(m == 0, tables.class_material[c], m)
    return (m.astype(np.uint16) << 8) | c


def pixel_centres(transform, shape, row0: int = 0, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World x of the columns and y of rows row0..row0+rows of a north-up grid."""
    rows = shape[0] - row0 if rows is None else rows
    xs = transform.c + (np.arange(shape[1]) + 0.5) * transform.a
    ys = transform.f + (np.arange(row0, row0 + rows) + 0.5) * transform.e
    return xs, ys


def surface_reflectance(key: np.ndarray, marks: np.ndarray | None, xs: np.ndarray, ys: np.ndarray,
                        tables: Tables, seed: int, bands: int = 4) -> np.ndarray:
    """Surface reflectance (bands, H, W) float32 (R, G, B, NIR) of a block of truth.

    key: `key_of(classes, material)`; xs, ys: world coordinates of the block's pixel centres.
    bands: 4, or 3 for R, G, B only (the same values, NIR not computed).
    A pure function of the place: any grid over the same ground gives the same textures.
    """
    c = key
    tex = np.ones(c.shape, np.float32)
    # the keys present in this block: a scale that none of them uses is skipped
    present = np.bincount(c.ravel(), minlength=len(tables.fine))[:len(tables.fine)] > 0
    ci = c.astype(np.intp)  # one index conversion for the ~8 table look-ups below
    for name, spacing, wt in (("fine", 1.5, tables.fine), ("crown", 4.0, tables.crown),
                              ("med", 15.0, tables.med), ("coarse", 80.0, tables.coarse)):
        if not wt[present].any():
            continue
        n = value_noise(xs, ys, spacing, subseed(seed, "tex", name))
        if name == "crown":  # rounder crowns, dark gaps
            n *= np.float32(2.5)
            np.tanh(n, out=n)
        n *= np.take(wt, ci)
        tex += n
    np.maximum(tex, 0.05, out=tex)
    out = np.empty((bands,) + c.shape, np.float32)
    for b in range(bands):
        np.multiply(np.take(tables.rgbn[b], ci), tex, out=out[b])
    del ci
    at = np.flatnonzero(marks != 0) if marks is not None else ()
    if len(at):  # marks are thin: only their pixels, by flat index
        ms = marks.ravel()[at]
        paint = tables.mark_is_paint[ms]
        for b in range(bands):
            ob = out[b].ravel()
            vals = ob[at]
            ob[at] = np.where(paint, tables.mark_paint[b][ms], vals * tables.mark_mul[b][ms])
        if tables.vehicle > 0:
            veh = at[ms == tables.vehicle]
            if len(veh):  # each car its own colour: a coarse hash of its place
                rr, cc = np.divmod(veh, marks.shape[1])
                ix = np.floor(xs[cc] / 3.0).astype(np.int64)
                iy = np.floor(ys[rr] / 3.0).astype(np.int64)
                h = _lattice(subseed(seed, "car"), ix, np.zeros(1, np.int64))[0] if len(ix) else ix
                h2 = _lattice(subseed(seed, "car2"), iy, np.zeros(1, np.int64))[0] if len(iy) else iy
                k = (np.floor((h + h2 + 2) * 1.5).astype(np.int64)) % len(_VEHICLE_COLOURS)
                for b in range(bands):
                    out[b][rr, cc] = _VEHICLE_COLOURS[k, b]
    return out


SEASON_COEF = np.array([0.6, 0.1, 0.3, -0.35], np.float32)  # per band (R, G, B, NIR) per unit browning


def season_of(date: dt.date, lat: float) -> float:
    """Vegetation browning on a date: lush in late spring, dry in late summer/autumn, dull in winter."""
    doy = date.timetuple().tm_yday
    if lat < 0:
        doy = (doy + 182) % 365
    return float(0.25 - 0.45 * math.cos(2 * math.pi * (doy - 140) / 365.0) + 0.2 * math.sin(2 * math.pi * (doy - 140) / 365.0))
