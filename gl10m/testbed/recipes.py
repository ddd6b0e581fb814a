"""The town recipes of the layout: buildings, parking, pitches, pools, residential blocks, the
school, and the four-lot civic blocks (church, gas station, fire and police stations...).

A recipe takes a layout `Builder`, reserves cells, adds features and consumes budget.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from gl10m.testbed.classes import Z_BUILDING, Z_CONTAINER, Z_COVER, Z_GROUND, Z_SMALL
from gl10m.testbed.shapes import blob, box, jrect, lines_across

if TYPE_CHECKING:
    from gl10m.testbed.layout import Builder


def building(b: Builder, rect_or_poly, tags, cover, intended=None, ridge=True):
    """A building on a rect (x0, y0, x1, y1) or polygon, with a roof material and a ridge mark; its feature index."""
    poly = box(*rect_or_poly) if isinstance(rect_or_poly, tuple) else rect_or_poly
    i = b.area(poly, tags, cover, Z_BUILDING, intended)
    metal = tags.get("building") in ("warehouse", "hangar", "barn", "industrial", "roof")
    b.set_material(i, "roof_metal" if metal else "roof")
    if ridge:
        x0, y0, x1, y1 = poly.bounds
        from shapely.geometry import LineString
        if x1 - x0 >= y1 - y0:
            g = LineString([(x0 + 1.5, (y0 + y1) / 2), (x1 - 1.5, (y0 + y1) / 2)])
        else:
            g = LineString([((x0 + x1) / 2, y0 + 1.5), ((x0 + x1) / 2, y1 - 1.5)])
        b.mark(i, "roof_ridge", g.intersection(poly))
    return i


def parking(b: Builder, rect, garage=False):
    """A surface parking lot with stripes and parked cars (with `garage`: a multi-storey garage), if the
    budget allows; its feature index or None."""
    if garage:
        if not b.take("parking_garage"):
            return None
        i = b.area(box(*rect), {"amenity": "parking", "parking": "multi-storey", "building": "parking",
                                 "levels": "4"}, "parking_garage", Z_BUILDING, "parking_garage")
        b.mark(i, "parking_stripe", lines_across(box(*rect).buffer(-3), 2.7, 90, b.rng))
        return i
    if not b.take("parking_lot"):
        return None
    poly = box(*rect)
    i = b.area(poly, {"amenity": "parking", "parking": "surface", "surface": "asphalt"}, "parking_lot",
               Z_GROUND, "parking_lot")
    b.mark(i, "parking_stripe", lines_across(poly.buffer(-2), 2.7, 90 if (rect[2] - rect[0]) > (rect[3] - rect[1])
                                              else 0, b.rng))
    # a few parked cars
    x0, y0, x1, y1 = rect
    for _ in range(int(b.rng.integers(3, 12))):
        cx, cy = b.rng.uniform(x0 + 3, x1 - 3), b.rng.uniform(y0 + 3, y1 - 3)
        b.mark(i, "vehicle", box(cx - 1, cy - 2.2, cx + 1, cy + 2.2), Z_GROUND)
    return i


def _court_lines(b, i, poly, kind):
    """Court / field markings inside a pitch rectangle."""
    from shapely.geometry import LineString
    x0, y0, x1, y1 = poly.bounds
    inner = box(x0 + 1.5, y0 + 1.5, x1 - 1.5, y1 - 1.5)
    b.mark(i, "court_line", inner.exterior)
    long_x = (x1 - x0) >= (y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "tennis":
        if long_x:
            b.mark(i, "court_line", LineString([(cx, y0 + 1.5), (cx, y1 - 1.5)]))
            b.mark(i, "court_line", LineString([(x0 + 6, cy), (x1 - 6, cy)]))
        else:
            b.mark(i, "court_line", LineString([(x0 + 1.5, cy), (x1 - 1.5, cy)]))
            b.mark(i, "court_line", LineString([(cx, y0 + 6), (cx, y1 - 6)]))
    elif kind == "american_football":
        n = 11
        for k in range(1, n):
            if long_x:
                x = x0 + (x1 - x0) * k / n
                b.mark(i, "court_line", LineString([(x, y0 + 1.5), (x, y1 - 1.5)]))
            else:
                y = y0 + (y1 - y0) * k / n
                b.mark(i, "court_line", LineString([(x0 + 1.5, y), (x1 - 1.5, y)]))
    elif kind == "soccer":
        if long_x:
            b.mark(i, "court_line", LineString([(cx, y0 + 1.5), (cx, y1 - 1.5)]))
        else:
            b.mark(i, "court_line", LineString([(x0 + 1.5, cy), (x1 - 1.5, cy)]))
        from shapely.geometry import Point
        b.mark(i, "court_line", Point(cx, cy).buffer(8).exterior)
    elif kind == "baseball":
        from shapely.geometry import Polygon
        s = min(x1 - x0, y1 - y0) * 0.28
        d = Polygon([(x0 + 4, y0 + 4), (x0 + 4 + s, y0 + 4), (x0 + 4 + s, y0 + 4 + s), (x0 + 4, y0 + 4 + s)])
        b.mark(i, "court_line", d.exterior)


def pitch(b, rect, sport, tags_extra=None):
    """leisure=pitch with the sport's marking; rect sized by the caller."""
    name = {"tennis": "tennis", "american_football": "american_football", "soccer": "soccer",
            "baseball": "baseball_field", "skateboard": "skate_park"}[sport]
    if not b.take(name):
        return None
    poly = box(*rect)
    tags = {"leisure": "pitch", "sport": sport, "surface": "grass" if sport != "tennis" else "hard"}
    if tags_extra:
        tags.update(tags_extra)
    i = b.area(poly, tags, name, Z_GROUND, name)
    if sport != "skateboard":
        _court_lines(b, i, poly, sport)
    return i


def fit(rect, w, h, rng, where="any"):
    """A w x h sub-rectangle inside rect (rotated 90 degrees if it fits better), or None."""
    x0, y0, x1, y1 = rect
    if w > x1 - x0 or h > y1 - y0:
        w, h = h, w
    if w > x1 - x0 or h > y1 - y0:
        return None
    x = rng.uniform(x0, x1 - w)
    y = rng.uniform(y0, y1 - h)
    return (x, y, x + w, y + h)


def split(rect, frac, vertical, gap=6.0):
    """Two rects side by side (`vertical`: left/right, else bottom/top) at `frac`, `gap` metres apart."""
    x0, y0, x1, y1 = rect
    if vertical:
        xm = x0 + (x1 - x0) * frac
        return (x0, y0, xm - gap / 2, y1), (xm + gap / 2, y0, x1, y1)
    ym = y0 + (y1 - y0) * frac
    return (x0, y0, x1, ym - gap / 2), (x0, ym + gap / 2, x1, y1)


def pool(b, x, y, rng, public=False):
    """A swimming pool centred at (x, y) (25 x 12.5 m when `public`), if the budget allows; its feature
    index or None."""
    if not b.take("swimming_pool"):
        return None
    if public:
        w, h = 25.0, 12.5
    else:
        w, h = rng.uniform(7, 11), rng.uniform(3.5, 5.5)
    if rng.random() < 0.5:
        w, h = h, w
    if not public and rng.random() < 0.35:
        poly = blob((x - w / 2, y - h / 2, x + w / 2, y + h / 2), rng, n=16, rough=0.3, fill=1.0)
    else:
        poly = box(x - w / 2, y - h / 2, x + w / 2, y + h / 2)
    i = b.area(poly, {"leisure": "swimming_pool", "access": "private" if not public else "yes"},
               "swimming_pool", Z_SMALL, "swimming_pool")
    b.mark(i, "pool_edge", poly.exterior)
    return i


def residential_block(b: Builder, rect):
    """Houses along the two long sides, back yards with pools, sometimes a private court."""
    rng = b.rng
    x0, y0, x1, y1 = rect
    lot = rng.uniform(19, 24)
    n = int((x1 - x0) // lot)
    mid = (y0 + y1) / 2
    for side in (0, 1):
        for k in range(n):
            lx = x0 + k * lot
            hw, hd = rng.uniform(10, min(15, lot - 5)), rng.uniform(11, 16)
            setback = rng.uniform(6, 9)
            hx = lx + (lot - hw) / 2
            if side == 0:
                hy0 = y0 + setback
                poly = (hx, hy0, hx + hw, hy0 + hd)
                yard = (lx + 2, hy0 + hd + 3, lx + lot - 2, mid - 2)
            else:
                hy1 = y1 - setback
                poly = (hx, hy1 - hd, hx + hw, hy1)
                yard = (lx + 2, mid + 2, lx + lot - 2, hy1 - hd - 3)
            building(b, poly, {"building": "house"}, "building")
            if yard[3] - yard[1] > 12 and rng.random() < 0.35:
                pool(b, (yard[0] + yard[2]) / 2, (yard[1] + yard[3]) / 2, rng)
            elif rng.random() < 0.25:
                b.node(pt(rng.uniform(yard[0], yard[2]), rng.uniform(yard[1], yard[3])), {"natural": "tree"},
                       rng.uniform(5, 9), "trees", Z_SMALL)
    # a private tennis court in the middle of some blocks
    if rng.random() < 0.3 and b.budget.get("tennis", 0) > 0:
        r = fit((x0 + n * lot * 0.3, mid - 9, x0 + n * lot * 0.7, mid + 9), 34, 17, rng)
        if r:
            pitch(b, r, "tennis", {"access": "private"})


def pt(x, y):
    """A shapely Point at (x, y), rounded to centimetres like every layout coordinate."""
    from shapely.geometry import Point
    return Point(round(float(x), 2), round(float(y), 2))


def civic_grounds(b, rect, tags, cover, intended):
    """The grounds of a civic site (hospital, school, university...) as a container area over rect."""
    return b.area(box(*rect), tags, cover, Z_CONTAINER, intended)


def school(b: Builder):
    """A school (grounds, building, parking, sports pitches) in a town cell; False when no cell or budget is left."""
    rect, _ = b.alloc(1, 1, (3,))
    if rect is None:
        rect, _ = b.alloc(1, 1, (0, 4))
    if rect is None or not b.take("school"):
        return False
    rng = b.rng
    civic_grounds(b, rect, {"amenity": "school", "name": "Lincoln School"}, "school", "school")
    left, right = split(rect, 0.42, True)
    # building (L shape) + parking on the left
    bx0, by0, bx1, by1 = left
    from shapely.geometry import Polygon
    L = Polygon([(bx0 + 5, by1 - 60), (bx1 - 5, by1 - 60), (bx1 - 5, by1 - 40), (bx0 + 25, by1 - 40),
                 (bx0 + 25, by1 - 5), (bx0 + 5, by1 - 5)])
    building(b, L, {"building": "school"}, "school")
    parking(b, (bx0 + 4, by0 + 4, bx1 - 4, by0 + 40))
    # fields on the right: football or soccer + baseball + tennis
    fx0, fy0, fx1, fy1 = right
    top = (fx0, (fy0 + fy1) / 2, fx1, fy1)
    bot = (fx0, fy0, fx1, (fy0 + fy1) / 2 - 4)
    placed = False
    for sport, (w, h) in (("american_football", (80, 42)), ("soccer", (78, 46))):
        r = fit(top, min(w, top[2] - top[0] - 2), min(h, top[3] - top[1] - 2), rng)
        if r and pitch(b, r, sport) is not None:
            placed = True
            break
    if not placed:
        r = fit(top, 34, 17, rng)
        if not (r and pitch(b, r, "tennis") is not None):
            # a running track (not a concept) so the grounds still look like a school's
            from shapely import affinity
            cx, cy = (top[0] + top[2]) / 2, (top[1] + top[3]) / 2
            rx, ry = (top[2] - top[0]) / 2 - 4, (top[3] - top[1]) / 2 - 4
            oval = affinity.scale(pt(cx, cy).buffer(1, 24), rx, ry)
            t = b.set_material(b.area(oval, {"leisure": "track", "sport": "running"}, "paved", Z_GROUND), "court")
            b.mark(t, "court_line", oval.buffer(-3).exterior)
    r = fit(bot, 62, 62, rng) if rng.random() < 0.6 else None
    if r and pitch(b, r, "baseball") is not None:
        pass
    else:
        for k in range(2):
            r = (bot[0] + 4 + k * 38, bot[1] + 4, bot[0] + 38 + k * 38, bot[1] + 21)
            if r[2] < bot[2]:
                pitch(b, r, "tennis")
    return True


def lot_site(size=(1, 1), zones=(3,), fallback=(0, 4)):
    """Decorator: a recipe fn(b, rect) as a site that allocates its own cells (`zones`, then `fallback`)."""
    def deco(fn):
        def run(b: Builder):
            rect, _ = b.alloc(size[0], size[1], zones)
            if rect is None and fallback:
                rect, _ = b.alloc(size[0], size[1], fallback)
            if rect is None:
                return False
            fn(b, rect)
            return True
        return run
    return deco


def quarters(rect):
    """The four quarter rects of rect (split in half both ways), each a lot of a civic block."""
    a, bb = split(rect, 0.5, True)
    return list(split(a, 0.5, False)) + list(split(bb, 0.5, False))


@lot_site()
def civic_block(b: Builder, rect):
    """A town block of four lots for small civic and commercial sites (church, fire, police, gas...)."""
    rng = b.rng
    opts = ["religious_building", "gas_station", "fire_station", "police_station", "supermarket",
            "car_dealership", "office", "skate_park", "electric_substation", "parking_lot", "cemetery"]
    lots = quarters(rect)
    for lot in lots:
        avail = [o for o in opts if b.budget.get(o, 0) > 0]
        if not avail:
            _houses_lot(b, lot)
            continue
        w = np.array([b.budget[o] for o in avail], dtype=float)
        o = avail[int(rng.choice(len(avail), p=w / w.sum()))]
        _LOT_FILL[o](b, lot)


def _houses_lot(b, lot):
    rng = b.rng
    x0, y0, x1, y1 = lot
    for k in range(int((x1 - x0) // 20)):
        hx = x0 + k * 20 + 3
        building(b, (hx, y0 + 5, hx + 13, y0 + 18), {"building": "house"}, "building")
        if rng.random() < 0.3:
            pool(b, hx + 6, y0 + 26, rng)


def _lot_church(b, lot):
    if not b.take("religious_building"):
        return
    from shapely.geometry import Polygon
    rng = b.rng
    x0, y0, x1, y1 = lot
    cx, cy = (x0 + x1) / 2, y0 + (y1 - y0) * 0.62
    L, W = rng.uniform(28, 38), rng.uniform(11, 14)
    cross = Polygon([(cx - W / 2, cy - L / 2), (cx + W / 2, cy - L / 2), (cx + W / 2, cy + L / 6),
                     (cx + W * 1.3, cy + L / 6), (cx + W * 1.3, cy + L / 6 + W), (cx + W / 2, cy + L / 6 + W),
                     (cx + W / 2, cy + L / 2), (cx - W / 2, cy + L / 2), (cx - W / 2, cy + L / 6 + W),
                     (cx - W * 1.3, cy + L / 6 + W), (cx - W * 1.3, cy + L / 6), (cx - W / 2, cy + L / 6)])
    building(b, cross, {"amenity": "place_of_worship", "religion": "christian", "building": "church",
                         "name": "St. Mary"}, "religious_building", "religious_building")
    parking(b, (x0 + 4, y0 + 4, x1 - 4, y0 + 26))


def _lot_gas(b, lot):
    if not b.take("gas_station"):
        return
    x0, y0, x1, y1 = lot
    site = (x0 + 3, y0 + 3, min(x1 - 3, x0 + 55), min(y1 - 3, y0 + 45))
    i = b.area(box(*site), {"amenity": "fuel", "brand": "Shell"}, "gas_station", Z_GROUND, "gas_station")
    sx0, sy0, sx1, sy1 = site
    canopy = (sx0 + 8, sy0 + 8, sx0 + 32, sy0 + 22)
    j = building(b, canopy, {"building": "roof", "layer": "1"}, "gas_station", ridge=False)
    for k in range(4):
        x = canopy[0] + 3 + k * 6
        b.mark(j, "vehicle", box(x, canopy[1] + 5, x + 1.2, canopy[3] - 5))
    building(b, (sx0 + 36, sy0 + 26, sx1 - 3, sy1 - 3), {"building": "retail", "shop": "convenience"},
              "gas_station")


def lot_fire(b, lot):
    """A fire station on one lot of a civic block: building, apron, vehicles."""
    if not b.take("fire_station"):
        return
    x0, y0, x1, y1 = lot
    i = building(b, (x0 + 8, y0 + 25, x0 + 45, y0 + 50), {"amenity": "fire_station", "building": "fire_station"},
                  "fire_station", "fire_station")
    b.area(box(x0 + 8, y0 + 4, x0 + 45, y0 + 24), {"area:highway": "service", "surface": "concrete"}, "paved",
           Z_GROUND)
    for k in range(3):
        b.mark(i, "vehicle", box(x0 + 12 + k * 11, y0 + 10, x0 + 15 + k * 11, y0 + 19), Z_GROUND)


def _lot_police(b, lot):
    if not b.take("police_station"):
        return
    x0, y0, x1, y1 = lot
    building(b, (x0 + 8, y0 + 30, x1 - 8, y1 - 8), {"amenity": "police", "building": "government"},
              "police_station", "police_station")
    parking(b, (x0 + 6, y0 + 4, x1 - 6, y0 + 24))


def _lot_supermarket(b, lot):
    if not b.take("supermarket"):
        return
    x0, y0, x1, y1 = lot
    building(b, (x0 + 5, y0 + (y1 - y0) * 0.5, x1 - 5, y1 - 4), {"shop": "supermarket", "building": "retail",
                                                                   "name": "Market"}, "supermarket", "supermarket",
              ridge=False)
    parking(b, (x0 + 5, y0 + 4, x1 - 5, y0 + (y1 - y0) * 0.5 - 5))


def _lot_cardealer(b, lot):
    if not b.take("car_dealership"):
        return
    x0, y0, x1, y1 = lot
    i = b.area(box(*lot), {"shop": "car", "name": "Motors"}, "car_dealership", Z_GROUND, "car_dealership")
    building(b, (x0 + 5, y1 - 25, x0 + 40, y1 - 5), {"building": "retail"}, "car_dealership")
    for gx in np.arange(x0 + 4, x1 - 4, 3.2):
        for gy in np.arange(y0 + 4, y1 - 30, 7.0):
            b.mark(i, "vehicle", box(gx, gy, gx + 1.9, gy + 4.5))


def _lot_office(b, lot):
    if not b.take("office"):
        return
    x0, y0, x1, y1 = lot
    building(b, (x0 + 6, y0 + (y1 - y0) * 0.45, x1 - 6, y1 - 6), {"building": "office", "levels": "5"},
              "office", "office", ridge=False)
    if parking(b, (x0 + 6, y0 + 4, x1 - 6, y0 + (y1 - y0) * 0.45 - 5), garage=True) is None:
        parking(b, (x0 + 6, y0 + 4, x1 - 6, y0 + (y1 - y0) * 0.45 - 5))


def lot_skate(b, lot):
    """A skate park on one lot of a civic block."""
    if not b.take("skate_park"):
        return
    x0, y0, x1, y1 = lot
    poly = blob((x0 + 10, y0 + 10, x0 + 45, y0 + 38), b.rng, n=18, rough=0.2)
    i = b.area(poly, {"leisure": "skate_park", "surface": "concrete"}, "skate_park", Z_GROUND, "skate_park")
    b.mark(i, "court_line", poly.buffer(-4).exterior if not poly.buffer(-4).is_empty else None)


def lot_substation(b, lot):
    """An electric substation on a lot: fenced yard with its equipment rows."""
    if not b.take("electric_substation"):
        return
    x0, y0, x1, y1 = lot
    poly = box(x0 + 8, y0 + 8, min(x1 - 8, x0 + 60), min(y1 - 8, y0 + 45))
    i = b.area(poly, {"power": "substation", "voltage": "115000"}, "electric_substation", Z_GROUND,
               "electric_substation")
    b.mark(i, "fence", poly.exterior)
    b.mark(i, "court_line", lines_across(poly.buffer(-4), 5, 0, b.rng))


def _lot_parking(b, lot):
    x0, y0, x1, y1 = lot
    parking(b, (x0 + 4, y0 + 4, x1 - 4, y1 - 4))


def _lot_cemetery(b, lot):
    if not b.take("cemetery"):
        return
    poly = jrect(lot, b.rng, 3)
    i = b.area(poly, {"landuse": "cemetery", "name": "Evergreen Cemetery"}, "cemetery", Z_COVER, "cemetery")
    b.mark(i, "grave_row", lines_across(poly.buffer(-4), 3.0, 0, b.rng))


_LOT_FILL: dict[str, Callable] = {
    "religious_building": _lot_church, "gas_station": _lot_gas, "fire_station": lot_fire,
    "police_station": _lot_police, "supermarket": _lot_supermarket, "car_dealership": _lot_cardealer,
    "office": _lot_office, "skate_park": lot_skate, "electric_substation": lot_substation,
    "parking_lot": _lot_parking, "cemetery": _lot_cemetery,
}
