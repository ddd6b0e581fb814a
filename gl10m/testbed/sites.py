"""The site recipes of the layout (hospital, airport, golf course, land cover, energy, industry,
coast, stations, towers, sports) and the order the builder places them in (SITE_ORDER, then
LEFTOVER for what the budget still holds).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from gl10m.testbed.classes import Z_BUILDING, Z_CONTAINER, Z_COVER, Z_GROUND, Z_SMALL, Z_WATER
from gl10m.testbed.recipes import (building, civic_block, civic_grounds, fit, lot_fire, lot_site, lot_skate,
                                   lot_substation, parking, pitch, pool, pt, quarters, residential_block, school, split)
from gl10m.testbed.shapes import blob, box, jrect, lines_across, sub_rect

if TYPE_CHECKING:
    from gl10m.testbed.layout import Builder


@lot_site()
def _hospital(b: Builder, rect):
    if not b.take("hospital"):
        return
    x0, y0, x1, y1 = rect
    civic_grounds(b, rect, {"amenity": "hospital", "healthcare": "hospital", "name": "General Hospital"},
                   "hospital", "hospital")
    from shapely.geometry import Polygon
    H = Polygon([(x0 + 10, y1 - 90), (x0 + 100, y1 - 90), (x0 + 100, y1 - 70), (x0 + 65, y1 - 70),
                 (x0 + 65, y1 - 10), (x0 + 45, y1 - 10), (x0 + 45, y1 - 70), (x0 + 10, y1 - 70)])
    building(b, H, {"building": "hospital"}, "hospital", ridge=False)
    parking(b, (x0 + 6, y0 + 6, x0 + 100, y0 + 50), garage=True) or parking(b, (x0 + 6, y0 + 6, x0 + 100, y0 + 50))
    _helipad(b, x1 - 28, y1 - 28)


def _helipad(b, x, y, d=20.0):
    if not b.take("helipad"):
        return None
    from shapely.geometry import LineString
    poly = pt(x, y).buffer(d / 2, 16)
    i = b.area(poly, {"aeroway": "helipad", "surface": "concrete"}, "helipad", Z_SMALL, "helipad")
    b.mark(i, "helipad_marking", poly.buffer(-1.5).exterior)
    h = d * 0.22
    for g in (LineString([(x - h, y - h * 1.3), (x - h, y + h * 1.3)]), LineString([(x + h, y - h * 1.3),
                                                                                   (x + h, y + h * 1.3)]),
              LineString([(x - h, y), (x + h, y)])):
        b.mark(i, "helipad_marking", g)
    return i


@lot_site(size=(1, 2))
def _mall(b: Builder, rect):
    if not b.take("shopping_mall"):
        return
    x0, y0, x1, y1 = rect
    w = x1 - x0
    building(b, (x0 + w * 0.25, y0 + (y1 - y0) * 0.55, x1 - w * 0.25, y1 - 8),
              {"shop": "mall", "building": "retail", "name": "Town Center Mall"}, "shopping_mall", "shopping_mall",
              ridge=False)
    parking(b, (x0 + 6, y0 + 6, x0 + w * 0.48, y0 + (y1 - y0) * 0.5))
    parking(b, (x0 + w * 0.52, y0 + 6, x1 - 6, y0 + (y1 - y0) * 0.5))
    parking(b, (x0 + 6, y0 + (y1 - y0) * 0.55, x0 + w * 0.22, y1 - 8), garage=True)


@lot_site(size=(2, 2), zones=(0,), fallback=(0, 3))
def _university(b: Builder, rect):
    if not b.take("university"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    civic_grounds(b, rect, {"amenity": "university", "name": f"{b.code} State University"}, "university",
                   "university")
    # quad of buildings around a lawn
    for (fx0, fy0, fx1, fy1) in ((0.05, 0.6, 0.3, 0.9), (0.35, 0.75, 0.65, 0.95), (0.7, 0.6, 0.95, 0.9),
                                 (0.05, 0.3, 0.2, 0.55), (0.8, 0.3, 0.95, 0.55)):
        building(b, sub_rect(rect, fx0, fy0, fx1, fy1), {"building": "yes"}, "university")
    parking(b, sub_rect(rect, 0.05, 0.04, 0.45, 0.22))
    parking(b, sub_rect(rect, 0.55, 0.04, 0.95, 0.22), garage=True)
    r = fit(sub_rect(rect, 0.25, 0.3, 0.75, 0.55), 100, 60, rng)
    if r:
        pitch(b, r, "soccer") or pitch(b, r, "american_football")
    for k in range(3):
        pitch(b, (x0 + 40 + k * 38, y0 + (y1 - y0) * 0.24, x0 + 74 + k * 38, y0 + (y1 - y0) * 0.24 + 17), "tennis")


@lot_site(size=(1, 2), zones=(0, 3), fallback=(4,))
def _stadium(b: Builder, rect):
    if not b.take("stadium"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 20
    from shapely import affinity
    outer = affinity.scale(pt(cx, cy).buffer(1, 32), 95, 70)
    inner = affinity.scale(pt(cx, cy).buffer(1, 32), 70, 45)
    sport = "american_football" if b.budget.get("american_football", 0) >= b.budget.get("soccer", 0) else "soccer"
    b.area(outer, {"leisure": "stadium", "name": "Memorial Stadium", "sport": sport}, "stadium", Z_GROUND,
           "stadium")
    building(b, outer.difference(inner), {"building": "grandstand"}, "stadium", ridge=False)
    r = (cx - 50, cy - 25, cx + 50, cy + 25)
    pitch(b, r, sport) or pitch(b, r, "soccer" if sport != "soccer" else "american_football")
    parking(b, (x0 + 6, y0 + 4, x1 - 6, cy - 75))


@lot_site(size=(1, 2), zones=(0, 4))
def _prison(b: Builder, rect):
    if not b.take("prison"):
        return
    x0, y0, x1, y1 = rect
    poly = box(*rect)
    i = b.area(poly, {"amenity": "prison", "landuse": "prison", "name": "County Correctional Facility"},
               "prison", Z_CONTAINER, "prison")
    b.mark(i, "fence", poly.buffer(-3).exterior, Z_BUILDING)
    b.mark(i, "fence", poly.buffer(-8).exterior, Z_BUILDING)
    w = x1 - x0
    for k in range(4):
        bx = x0 + 20 + k * (w - 40) / 4
        building(b, (bx, y0 + 40, bx + (w - 40) / 4 - 12, y0 + 70), {"building": "yes"}, "prison")
        building(b, (bx, y1 - 70, bx + (w - 40) / 4 - 12, y1 - 40), {"building": "yes"}, "prison")
    pitch(b, (x0 + w / 2 - 17, (y0 + y1) / 2 - 8, x0 + w / 2 + 17, (y0 + y1) / 2 + 9), "tennis") or \
        parking(b, (x0 + w / 2 - 30, (y0 + y1) / 2 - 15, x0 + w / 2 + 30, (y0 + y1) / 2 + 15))


@lot_site(size=(2, 4), zones=(0,), fallback=(0, 5))
def _airport(b: Builder, rect):
    if not b.take("airport"):
        return
    from shapely.geometry import LineString
    x0, y0, x1, y1 = rect
    poly = box(*rect)
    b.area(poly, {"aeroway": "aerodrome", "name": f"{b.code} Municipal Airport", "iata": "XTB"}, "airport",
           Z_CONTAINER, "airport")
    ry = y0 + (y1 - y0) * 0.62
    rwy = LineString([(x0 + 40, ry), (x1 - 40, ry)])
    b.take("runway")  # an airport always has its runway; it counts against the budget when there is one
    i = b.way(rwy, {"aeroway": "runway", "ref": "09/27", "surface": "asphalt", "width": "30"}, 30, "runway",
              Z_GROUND, "runway")
    b.mark(i, "runway_marking", LineString([(x0 + 70, ry), (x1 - 70, ry)]))
    for xe in (x0 + 44, x1 - 56):
        for k in range(6):
            yk = ry - 12 + k * 4.5
            b.mark(i, "runway_marking", box(xe, yk, xe + 12, yk + 1.8))
    ty = ry - 60
    b.way(LineString([(x0 + 60, ty), (x1 - 60, ty)]), {"aeroway": "taxiway"}, 15, "paved", Z_GROUND)
    for xc in (x0 + 60, x1 - 60):
        b.way(LineString([(xc, ty), (xc, ry)]), {"aeroway": "taxiway"}, 15, "paved", Z_GROUND)
    apron = (x0 + 120, y0 + 20, x1 - 120, ty - 12)
    b.area(box(*apron), {"aeroway": "apron", "surface": "concrete"}, "paved", Z_GROUND)
    ax0, ay0, ax1, ay1 = apron
    k = 0
    while b.budget.get("airport_hangar", 0) > 0 and k < 4:
        hx = ax0 + 8 + k * 45
        if hx + 35 > (ax0 + ax1) / 2 - 10:
            break
        building(b, (hx, ay0 + 6, hx + 35, ay0 + 36), {"aeroway": "hangar", "building": "hangar"},
                  "airport_hangar", "airport_hangar")
        b.take("airport_hangar")
        k += 1
    if b.take("airport_terminal"):
        building(b, ((ax0 + ax1) / 2 + 10, ay0 + 6, ax1 - 8, ay0 + 40),
                  {"aeroway": "terminal", "building": "terminal", "name": "Terminal"}, "airport_terminal",
                  "airport_terminal", ridge=False)
    for k in range(3):
        px = (ax0 + ax1) / 2 - 5 + k * 25
        b.mark(len(b.feats) - 1, "vehicle", box(px, ay1 - 20, px + 14, ay1 - 8), Z_GROUND)
    _helipad(b, x1 - 70, ay0 + 25)
    parking(b, (x0 + 20, y0 + 20, x0 + 110, y0 + 70))
    if b.budget.get("tower", 0) > 0:
        _tower(b, x0 + 115, ry - 30, "observation")


def _tower(b, x, y, kind="communication"):
    if not b.take("tower"):
        return None
    i = b.node(pt(x, y), {"man_made": "tower", "tower:type": kind, "height": "40"}, 7, "tower", Z_SMALL, "tower")
    from shapely.geometry import LineString
    b.mark(i, "shadow", LineString([(x + 2, y - 2), (x + 28, y - 22)]).buffer(1.2))
    return i


@lot_site(size=(2, 2), zones=(0,), fallback=(0, 5))
def _golf(b: Builder, rect):
    if not b.take("golf_course"):
        return
    rng = b.rng
    poly = blob(rect, rng, rough=0.12, fill=1.0)
    b.area(poly, {"leisure": "golf_course", "name": "Valley Golf Club"}, "golf_course", Z_COVER, "golf_course")
    x0, y0, x1, y1 = rect
    # a water hazard pond
    if b.take("pond"):
        b.area(blob(sub_rect(rect, 0.4, 0.4, 0.6, 0.55), rng), {"natural": "water", "water": "pond"}, "pond", Z_WATER,
               "pond")
    for k in range(5):
        c = pt(rng.uniform(x0 + 40, x1 - 40), rng.uniform(y0 + 40, y1 - 40))
        b.set_material(b.area(c.buffer(rng.uniform(5, 9), 8), {"golf": "bunker"}, "golf_course", Z_GROUND), "sand")


@lot_site(size=(3, 3), zones=(0, 5), fallback=(0,))
def _reserve(b: Builder, rect):
    if not b.take("nature_reserve"):
        return
    rng = b.rng
    poly = jrect(rect, rng, 20)
    b.area(poly, {"boundary": "protected_area", "leisure": "nature_reserve", "protect_class": "4",
                  "name": "Heron Marsh Preserve"}, "nature_reserve", Z_CONTAINER, "nature_reserve")
    subs = [sub_rect(rect, fx, fy, fx + 0.3, fy + 0.3) for fx in (0.02, 0.35, 0.68) for fy in (0.02, 0.35, 0.68)]
    for s in subs:
        opts = [o for o in ("forest", "wetland", "meadow", "pond") if b.budget.get(o, 0) > 0]
        if not opts or rng.random() < 0.25:
            continue
        o = opts[int(rng.integers(len(opts)))]
        _COVER_RECIPES[o](b, s)


def _cover_recipe(name, tags_options, cover=None, shape="blob"):
    def fn(b, rect):
        if not b.take(name):
            return
        rng = b.rng
        tags = tags_options[int(rng.integers(len(tags_options)))]
        poly = blob(rect, rng) if shape == "blob" else jrect(rect, rng, 6)
        b.area(poly, tags, cover or name, Z_COVER if name not in ("pond", "lake") else Z_WATER, name)
    return fn


def _forest_recipe(b, rect):
    if not b.take("forest"):
        return
    rng = b.rng
    tags = [{"landuse": "forest", "leaf_type": "needleleaved"}, {"natural": "wood", "leaf_type": "broadleaved"},
            {"natural": "wood", "leaf_type": "mixed"}][int(rng.integers(3))]
    poly = blob(rect, rng, rough=0.18)
    w = rect[2] - rect[0]
    if w > 150 and rng.random() < 0.4:
        hole = blob(sub_rect(rect, 0.35, 0.35, 0.62, 0.6), rng)
        poly = poly.difference(hole)
    b.area(poly, tags, "forest", Z_COVER, "forest")


def _lake_recipe(b, rect):
    if not b.take("lake"):
        return
    rng = b.rng
    poly = blob(rect, rng, rough=0.25)
    if rect[2] - rect[0] > 150 and rng.random() < 0.6:
        poly = poly.difference(blob(sub_rect(rect, 0.4, 0.4, 0.58, 0.58), rng))
    b.area(poly, {"natural": "water", "water": "lake", "name": "Clear Lake"}, "lake", Z_WATER, "lake")


def _farm_recipe(b, rect):
    if not b.take("farmland"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    vertical = rng.random() < 0.5
    parts = list(split(rect, rng.uniform(0.35, 0.65), vertical, gap=5))
    crop = ["wheat", "maize", "soy", "vegetables", "alfalfa"][int(rng.integers(5))]
    ang = 0 if rng.random() < 0.5 else 90
    if rng.random() < 0.35:
        # one field as a multipolygon of two parts
        geom = jrect(parts[0], rng, 3).union(jrect(parts[1], rng, 3))
        i = b.area(geom, {"landuse": "farmland", "crop": crop}, "farmland", Z_COVER, "farmland")
        b.mark(i, "crop_row", lines_across(geom, 4.0, ang, rng))
        barn_in = parts[1]
    else:
        poly = jrect(parts[0], rng, 3)
        i = b.area(poly, {"landuse": "farmland", "crop": crop}, "farmland", Z_COVER, "farmland")
        b.mark(i, "crop_row", lines_across(poly, 4.0, ang, rng))
        barn_in = parts[1]
        if b.take("farmland"):
            poly2 = jrect(parts[1], rng, 3)
            crop2 = ["wheat", "maize", "soy", "vegetables", "alfalfa"][int(rng.integers(5))]
            i = b.area(poly2, {"landuse": "farmland", "crop": crop2}, "farmland", Z_COVER, "farmland")
            b.mark(i, "crop_row", lines_across(poly2, 4.0, 90 - ang, rng))
    if b.take("barn"):
        bx, by = barn_in[0] + 8, barn_in[1] + 8
        b.set_material(b.area(box(bx - 4, by - 4, bx + 50, by + 40), {"landuse": "farmyard"}, "bare_soil", Z_GROUND),
                       "gravel")
        building(b, (bx, by, bx + 30, by + 18), {"building": "barn"}, "barn", "barn")
    if b.budget.get("pond", 0) > 0 and rng.random() < 0.3:
        b.take("pond")
        b.area(blob((x1 - 40, y1 - 35, x1 - 8, y1 - 8), rng), {"natural": "water", "water": "pond"}, "pond",
               Z_WATER, "pond")


def _ponds_recipe(b, rect):
    rng = b.rng
    k = 0
    for s in quarters(rect):
        if rng.random() < 0.5 and k > 0:
            continue
        if not b.take("pond"):
            break
        k += 1
        x0, y0, x1, y1 = s
        d = rng.uniform(25, min(x1 - x0, y1 - y0))
        b.area(blob(fit(s, d, d * rng.uniform(0.6, 1), rng), rng), {"natural": "water", "water": "pond"}, "pond",
               Z_WATER, "pond")


def _wetland_recipe(b, rect):
    if not b.take("wetland"):
        return
    rng = b.rng
    kind = ["marsh", "swamp", "wet_meadow", "reedbed"][int(rng.integers(4))]
    b.area(blob(rect, rng, rough=0.3), {"natural": "wetland", "wetland": kind}, "wetland", Z_COVER, "wetland")


_COVER_RECIPES: dict[str, Callable] = {
    "forest": _forest_recipe,
    "farmland": _farm_recipe,
    "lake": _lake_recipe,
    "pond": _ponds_recipe,
    "wetland": _wetland_recipe,
    "meadow": _cover_recipe("meadow", [{"landuse": "meadow"}, {"landuse": "meadow", "meadow": "agricultural"}],
                            shape="rect"),
    "chaparral": _cover_recipe("chaparral", [{"natural": "scrub"}]),
    "desert": _cover_recipe("desert", [{"natural": "desert"}]),
    "sand": _cover_recipe("sand", [{"natural": "sand"}]),
    "bareland": _cover_recipe("bareland", [{"natural": "bare_rock"}, {"natural": "scree"}, {"natural": "shingle"}]),
    "construction_site": _cover_recipe("construction_site", [{"landuse": "construction"}], shape="rect"),
    "surface_mine": _cover_recipe("surface_mine", [{"landuse": "quarry", "resource": "gravel"}]),
    "waste_disposal": _cover_recipe("waste_disposal", [{"landuse": "landfill"}]),
}


def _cover_site(name, size=(1, 1), zones=(0,), fallback=(0, 5)):
    @lot_site(size=size, zones=zones, fallback=fallback)
    def run(b, rect):
        _COVER_RECIPES[name](b, rect)
    return run


def _random_size(b, opts):
    return opts[int(b.rng.integers(len(opts)))]


def _sized_cover(name, sizes, zones=(0,), fallback=(0, 5)):
    def run(b: Builder):
        h, w = _random_size(b, sizes)
        rect, _ = b.alloc(h, w, zones)
        if rect is None:
            rect, _ = b.alloc(1, 1, fallback)
        if rect is None:
            return False
        _COVER_RECIPES[name](b, rect)
        return True
    return run


@lot_site(size=(1, 2), zones=(0,), fallback=(0, 4, 5))
def _solar(b: Builder, rect):
    if not b.take("solar_farm"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    if rng.random() < 0.5:
        poly = box(*rect)
        tags = {"power": "plant", "plant:source": "solar", "plant:method": "photovoltaic", "name": "Sun Ranch Solar"}
    else:
        poly = box(*sub_rect(rect, 0, 0, 0.47, 1)).union(box(*sub_rect(rect, 0.53, 0.1, 1, 0.9)))
        tags = {"power": "plant", "plant:source": "solar", "plant:method": "photovoltaic", "name": "Mesa Solar"}
    i = b.area(poly, tags, "solar_farm", Z_GROUND, "solar_farm")
    b.mark(i, "solar_row", lines_across(poly.buffer(-4), 6.0, 0, rng))


@lot_site(size=(2, 3), zones=(0,), fallback=(0, 5))
def _wind(b: Builder, rect):
    if not b.take("wind_farm"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    b.area(box(*rect), {"power": "plant", "plant:source": "wind", "name": "Prairie Wind"}, "wind_farm",
           Z_CONTAINER, "wind_farm")
    # farmland underneath, like real wind farms
    for part in quarters(rect):
        if b.take("farmland"):
            poly = jrect(part, rng, 4)
            i = b.area(poly, {"landuse": "farmland", "crop": "wheat"}, "farmland", Z_COVER, "farmland")
            b.mark(i, "crop_row", lines_across(poly, 4.0, 0, rng))
    from shapely.geometry import LineString
    for gx in np.linspace(x0 + 80, x1 - 80, 2):
        for gy in np.linspace(y0 + 70, y1 - 70, 2):
            x, y = gx + rng.uniform(-20, 20), gy + rng.uniform(-20, 20)
            tags = {"power": "generator", "generator:source": "wind", "generator:method": "wind_turbine",
                    "generator:type": "horizontal_axis"}
            i = b.node(pt(x, y), tags, 5, "wind_farm", Z_SMALL, "wind_farm")
            a = rng.uniform(0, 2 * np.pi)
            for k in range(3):
                t = a + k * 2 * np.pi / 3
                b.mark(i, "turbine_blade", LineString([(x, y), (x + 38 * np.cos(t), y + 38 * np.sin(t))]))
            b.mark(i, "shadow", LineString([(x + 2, y - 2), (x + 60, y - 50)]).buffer(1.5))


@lot_site(size=(1, 1), zones=(4,), fallback=(0,))
def _industrial(b: Builder, rect):
    if not b.take("industrial"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    b.area(box(*rect), {"landuse": "industrial"}, "industrial", Z_CONTAINER, "industrial")
    for q in quarters(rect):
        qx0, qy0, qx1, qy1 = q
        o = rng.random()
        if b.budget.get("warehouse", 0) > 0 and o < 0.5:
            b.take("warehouse")
            building(b, (qx0 + 4, qy0 + 4, qx1 - 4, qy1 - 20), {"building": "warehouse"}, "warehouse", "warehouse",
                      ridge=False)
            i = b.area(box(qx0 + 4, qy1 - 17, qx1 - 4, qy1 - 4), {"area:highway": "service"}, "paved", Z_GROUND)
            for k in range(int((qx1 - qx0 - 10) // 16)):
                b.mark(i, "vehicle", box(qx0 + 6 + k * 16, qy1 - 16, qx0 + 9 + k * 16, qy1 - 5))
        elif b.budget.get("electric_substation", 0) > 0 and o < 0.65:
            lot_substation(b, q)
        elif b.budget.get("tower", 0) > 0 and o < 0.75:
            _tower(b, (qx0 + qx1) / 2, (qy0 + qy1) / 2)
        elif b.budget.get("construction_site", 0) > 0 and o < 0.85:
            _COVER_RECIPES["construction_site"](b, q)
        else:
            building(b, (qx0 + 6, qy0 + 6, qx1 - 6, qy1 - 10), {"building": "industrial"}, "building")


@lot_site(size=(1, 1), zones=(0, 4), fallback=(0, 5))
def _water_treatment(b: Builder, rect):
    if not b.take("water_treatment_facility"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    tags = [{"man_made": "wastewater_plant", "name": "Wastewater Plant"},
            {"man_made": "water_works", "name": "Water Works"}][int(rng.integers(2))]
    poly = box(*rect)
    i = b.area(poly, tags, "water_treatment_facility", Z_CONTAINER, "water_treatment_facility")
    b.mark(i, "fence", poly.exterior)
    for k in range(3):
        cx, cy = x0 + 30 + k * 45, y1 - 35
        c = pt(cx, cy).buffer(17, 24)
        j = b.set_material(b.area(c, {"man_made": "storage_tank", "content": "water"}, "water_treatment_facility",
                                  Z_BUILDING), "water")
        b.mark(j, "tank_rim", c.buffer(-1).exterior)
        b.mark(j, "tank_rim", pt(cx, cy).buffer(3).exterior)
    for k in range(2):
        bx = x0 + 15 + k * 65
        j = b.set_material(b.area(box(bx, y0 + 15, bx + 55, y0 + 70), {"man_made": "basin", "natural": "water",
                                                                        "water": "basin"},
                                  "water_treatment_facility", Z_WATER), "water")
        b.mark(j, "fence", box(bx, y0 + 15, bx + 55, y0 + 70).exterior)


@lot_site(size=(1, 1), zones=(0,), fallback=(0, 5))
def _aquaculture(b: Builder, rect):
    if not b.take("aquaculture"):
        return
    x0, y0, x1, y1 = rect
    b.area(box(*rect), {"landuse": "aquaculture", "aquaculture": "fish"}, "aquaculture", Z_CONTAINER,
           "aquaculture")
    for gx in range(4):
        for gy in range(3):
            px = x0 + 6 + gx * (x1 - x0 - 6) / 4
            py = y0 + 6 + gy * (y1 - y0 - 6) / 3
            r = (px, py, px + (x1 - x0 - 6) / 4 - 6, py + (y1 - y0 - 6) / 3 - 6)
            b.area(box(*r), {"natural": "water", "water": "basin"}, "aquaculture", Z_WATER)


@lot_site(size=(1, 1), zones=(0,), fallback=(0, 5))
def _park(b: Builder, rect):
    if not b.take("park"):
        return
    rng = b.rng
    x0, y0, x1, y1 = rect
    poly = jrect(rect, rng, 4)
    b.area(poly, {"leisure": "park", "name": "Riverside Park"}, "park", Z_COVER, "park")
    from shapely.geometry import LineString
    b.way(LineString([(x0 + 5, y0 + 5), ((x0 + x1) / 2, (y0 + y1) / 2 + 10), (x1 - 5, y1 - 5)]),
          {"highway": "footway"}, 3, "paved", Z_GROUND)
    for k in range(int(rng.integers(3, 8))):
        b.node(pt(rng.uniform(x0 + 8, x1 - 8), rng.uniform(y0 + 8, y1 - 8)), {"natural": "tree"},
               rng.uniform(6, 11), "trees", Z_SMALL)
    opts = [o for o in ("tennis", "baseball_field", "skate_park", "swimming_pool", "pond") if b.budget.get(o, 0) > 0]
    if opts:
        o = opts[int(rng.integers(len(opts)))]
        sub = sub_rect(rect, 0.55, 0.05, 0.97, 0.45)
        if o == "tennis":
            pitch(b, (sub[0], sub[1], sub[0] + 34, sub[1] + 17), "tennis")
        elif o == "baseball_field":
            r = fit(sub, 60, 60, rng)
            if r:
                pitch(b, r, "baseball")
        elif o == "skate_park":
            lot_skate(b, sub)
        elif o == "swimming_pool":
            pool(b, (sub[0] + sub[2]) / 2, (sub[1] + sub[3]) / 2, rng, public=True)
        else:
            _ponds_recipe(b, sub)


def _coast_site(b: Builder, n_cells=1):
    """Reserve n consecutive coast cells; return (u0, u1) along the coast or None."""
    side = b.rs.coast
    if side == "none":
        return None
    along = b.nc if side in ("south", "north") else b.nr
    sw = b.sea_cells
    idx = [(k, sw) for k in range(along)]
    order = b.rng.permutation(along - n_cells + 1) if along >= n_cells else []
    for k0 in order:
        cells = []
        for k in range(k0, k0 + n_cells):
            if side == "west":
                cells.append((k, sw))
            elif side == "east":
                cells.append((k, b.nc - 1 - sw))
            elif side == "south":
                cells.append((sw, k))
            else:
                cells.append((b.nr - 1 - sw, k))
        if all(b.zone[r, c] == 2 and not b.used[r, c] for r, c in cells):
            # not crossed by a road/rail running perpendicular to the coast
            if side in ("west", "east"):
                rs = [r for r, _ in cells]
                if any(b.block_h[r, cells[0][1]] for r in rs[1:]):
                    continue
            else:
                cs = [c for _, c in cells]
                if any(b.block_v[cells[0][0], c] for c in cs[1:]):
                    continue
            for r, c in cells:
                b.used[r, c] = True
            return k0 * b.cell + b.m, (k0 + n_cells) * b.cell - b.m
    return None


def _coast_poly(b, u0, u1, v_from_coast0, v1, n=20):
    """Polygon between the coastline (offset by v_from_coast0) and depth v1 from the sea edge, u in [u0, u1]."""
    from shapely.geometry import Polygon
    us = np.linspace(u0, u1, n)
    near = [b.coast_xy(u, b.coast_v(u) + v_from_coast0) for u in us]
    far = [b.coast_xy(u, v1) for u in us[::-1]]
    return Polygon(near + far)


def _beach(b: Builder):
    s = _coast_site(b, 1)
    if s is None or not b.take("beach"):
        return False
    u0, u1 = s
    poly = _coast_poly(b, u0 - b.m, u1 + b.m, 0.0, b.sea_cells * b.cell + 45)
    b.area(poly, {"natural": "beach", "surface": "sand"}, "beach", Z_COVER, "beach")
    return True


def _port(b: Builder):
    s = _coast_site(b, 2)
    if s is None or not b.take("port"):
        return False
    rng = b.rng
    u0, u1 = s
    depth = b.sea_cells * b.cell + b.cell - b.m
    poly = _coast_poly(b, u0, u1, -25.0, depth)
    i = b.area(poly, {"landuse": "port", "name": "Port Terminal"}, "port", Z_GROUND, "port")
    # container stacks, a quay and cranes
    v0 = b.sea_cells * b.cell + 20
    for k in range(int((u1 - u0 - 20) // 14)):
        u = u0 + 10 + k * 14
        for vv in (v0 + 20, v0 + 50, v0 + 80):
            x0_, y0_ = b.coast_xy(u, vv)
            x1_, y1_ = b.coast_xy(u + 12, vv + 2.5)
            b.mark(i, "vehicle", box(x0_, y0_, x1_, y1_))
    for k in range(3):
        u = u0 + 30 + k * (u1 - u0 - 60) / 2
        x, y = b.coast_xy(u, b.coast_v(u) - 10)
        b.mark(i, "shadow", box(x - 3, y - 3, x + 3, y + 3).buffer(6))
    ux = (u0 + u1) / 2
    if b.take("warehouse"):
        xa, ya = b.coast_xy(ux - 40, depth - 60)
        xb, yb = b.coast_xy(ux + 40, depth - 10)
        building(b, box(xa, ya, xb, yb), {"building": "warehouse"}, "warehouse", "warehouse", ridge=False)
    return True


def _shipyard(b: Builder):
    s = _coast_site(b, 1)
    if s is None or not b.take("shipyard"):
        return False
    u0, u1 = s
    depth = b.sea_cells * b.cell + b.cell - b.m
    poly = _coast_poly(b, u0, u1, -15.0, depth)
    b.area(poly, {"landuse": "industrial", "industrial": "shipyard", "man_made": "shipyard",
                  "name": "Harbor Shipyard"}, "shipyard", Z_GROUND, "shipyard")
    # dry dock (water) and a big shed
    um = (u0 + u1) / 2
    xa, ya = b.coast_xy(um - 15, b.coast_v(um) - 10)
    xb, yb = b.coast_xy(um + 15, b.coast_v(um) + 90)
    b.set_material(b.area(box(xa, ya, xb, yb), {"waterway": "dock", "dock": "drydock"}, "shipyard", Z_WATER),
                   "water")
    xa, ya = b.coast_xy(u0 + 5, depth - 60)
    xb, yb = b.coast_xy(um - 25, depth - 5)
    building(b, box(xa, ya, xb, yb), {"building": "industrial"}, "shipyard", ridge=False)
    return True


def _marina(b: Builder):
    s = _coast_site(b, 1)
    if s is None or not b.take("marina"):
        return False
    rng = b.rng
    u0, u1 = s
    poly = _coast_poly(b, u0, u1, -110.0, b.sea_cells * b.cell + 40)
    i = b.area(poly, {"leisure": "marina", "name": "Harbor Marina"}, "marina", Z_GROUND, "marina")
    from shapely.geometry import LineString
    for k in range(4):
        u = u0 + 20 + k * (u1 - u0 - 40) / 3
        a = b.coast_xy(u, b.coast_v(u) + 2)
        c = b.coast_xy(u, b.coast_v(u) - 95)
        j = b.way(LineString([a, c]), {"man_made": "pier", "floating": "yes"}, 3, "paved", Z_SMALL)
        for t in np.linspace(10, 85, 6):
            for side in (-1, 1):
                x, y = b.coast_xy(u + side * 5, b.coast_v(u) - t)
                b.mark(j, "boat", box(x - 2, y - 1.2, x + 2, y + 1.2).buffer(0.4), Z_SMALL)
    return True


def _station(b: Builder):
    """A railway station beside the line, preferably in town."""
    cl = b.c_rl
    rect, rc = b.alloc(1, 1, (3, 4, 0), pick=lambda r, c: c == cl)
    if rect is None or not b.take("railway_station"):
        return False
    x0, y0, x1, y1 = rect
    xr = b.x_rl
    plat = (xr + 5, y0 + 10, xr + 12, y1 - 10)
    j = b.area(box(*plat), {"railway": "platform", "public_transport": "platform"}, "paved", Z_GROUND)
    i = b.area(box(xr + 14, y0 + 60, xr + 50, y0 + 95), {"railway": "station", "public_transport": "station",
                                                          "building": "train_station", "name": "Union Station"},
               "railway_station", Z_BUILDING, "railway_station")
    parking(b, (xr + 55, y0 + 10, x1 - 4, y1 - 10))
    return True


def _tower_site(b: Builder):
    rect, _ = b.alloc(1, 1, (0, 4, 5))
    if rect is None:
        return False
    x0, y0, x1, y1 = rect
    x, y = (x0 + x1) / 2, (y0 + y1) / 2
    if _tower(b, x, y) is None:
        return False
    b.set_material(b.area(box(x - 12, y - 12, x + 12, y + 12), {"surface": "gravel", "area:highway": "service"},
                          "bare_soil", Z_GROUND), "gravel")
    if b.budget.get("electric_substation", 0) > 0:
        lot_substation(b, (x0, y0, (x0 + x1) / 2, (y0 + y1) / 2 - 15))
    return True


def _helipad_site(b: Builder):
    rect, _ = b.alloc(1, 1, (0, 4, 3))
    if rect is None:
        return False
    x0, y0, x1, y1 = rect
    b.area(box(x0 + 40, y0 + 40, x1 - 40, y1 - 40), {"surface": "grass", "landuse": "grass"}, "grass", Z_COVER)
    if _helipad(b, (x0 + x1) / 2, (y0 + y1) / 2) is None:
        return False
    if b.budget.get("fire_station", 0) > 0:
        lot_fire(b, (x0, y0, (x0 + x1) / 2, (y0 + y1) / 2))
    return True


def _sports_site(b: Builder):
    """A sports complex for pitches left over after schools, parks and blocks."""
    rect, _ = b.alloc(1, 1, (0, 3, 5))
    if rect is None:
        return False
    rng = b.rng
    x0, y0, x1, y1 = rect
    did = False
    lots = quarters(rect)
    for q in lots:
        for sport, name, (w, h) in (("soccer", "soccer", (70, 45)), ("american_football", "american_football",
                                                                      (70, 40)), ("baseball", "baseball_field",
                                                                                  (60, 60)),
                                    ("skateboard", "skate_park", (30, 25)), ("tennis", "tennis", (34, 17))):
            if b.budget.get(name, 0) > 0:
                r = fit(q, w, h, rng)
                if r and pitch(b, r, sport) is not None:
                    did = True
                    break
    if not did:
        parking(b, lots[0])
    return True


def _pool_site(b: Builder):
    rect, _ = b.alloc(1, 1, (3, 0))
    if rect is None:
        return False
    residential_block(b, rect)
    return True


SITE_ORDER: list[tuple[str, Callable]] = [
    ("airport", _airport), ("nature_reserve", _reserve), ("golf_course", _golf), ("wind_farm", _wind),
    ("university", _university), ("stadium", _stadium), ("shopping_mall", _mall), ("prison", _prison),
    ("port", _port), ("shipyard", _shipyard), ("marina", _marina), ("beach", _beach),
    ("railway_station", _station),
    ("lake", _sized_cover("lake", [(2, 2), (1, 2), (2, 1)], zones=(0,))),
    ("solar_farm", _solar), ("surface_mine", _sized_cover("surface_mine", [(1, 2), (1, 1)])),
    ("waste_disposal", _sized_cover("waste_disposal", [(1, 1)])),
    ("water_treatment_facility", _water_treatment), ("aquaculture", _aquaculture),
    ("school", school), ("hospital", _hospital), ("industrial", _industrial),
    ("religious_building", civic_block), ("gas_station", civic_block),
    ("park", _park),
    ("farmland", _sized_cover("farmland", [(1, 1), (1, 2), (2, 1), (2, 2)], zones=(0,))),
    ("forest", _sized_cover("forest", [(1, 1), (2, 2), (1, 2), (2, 3)], zones=(0, 5))),
    ("wetland", _sized_cover("wetland", [(1, 1), (1, 2)], zones=(5, 0))),
    ("meadow", _sized_cover("meadow", [(1, 1), (1, 2)], zones=(0, 5))),
    ("chaparral", _sized_cover("chaparral", [(1, 1), (2, 2), (1, 2)])),
    ("desert", _sized_cover("desert", [(2, 2), (1, 2), (1, 1)])),
    ("sand", _sized_cover("sand", [(1, 1)])),
    ("bareland", _sized_cover("bareland", [(1, 1)])),
    ("construction_site", _sized_cover("construction_site", [(1, 1)], zones=(0, 3, 4))),
    ("cemetery", civic_block), ("pond", _sized_cover("pond", [(1, 1)], zones=(0, 5))),
]

LEFTOVER: list[tuple[str, Callable]] = [
    ("swimming_pool", _pool_site), ("tennis", _sports_site), ("soccer", _sports_site),
    ("american_football", _sports_site), ("baseball_field", _sports_site), ("skate_park", _sports_site),
    ("tower", _tower_site), ("helipad", _helipad_site), ("electric_substation", _tower_site),
    ("warehouse", _industrial), ("office", civic_block), ("police_station", civic_block),
    ("fire_station", civic_block), ("supermarket", civic_block), ("car_dealership", civic_block),
    ("parking_lot", civic_block), ("parking_garage", civic_block),
]


