"""The testbed's vector world: a seeded, realistic-looking OSM world for every concept.

`generate` lays out each region of a spec (sea, river, highway, railway with a viaduct, an
overpass and a tunnel, a town with streets and blocks, an industrial zone, rural parcels, and
sites such as an airport, a port or a wind farm) in the region's UTM (NAD83) zone on a grid of
cells, and returns one `RegionWorld` per region with its features as a GeoDataFrame
(EPSG:4326). The recipes that fill the cells are in `recipes` (town lots) and `sites` (larger
sites and their placement order); `pbfwrite.write_pbf` writes the regions as an OSM PBF,
`raster.rasterize_truth` burns them into a truth raster (ids and draw order in `classes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gl10m.profile import Profile
from gl10m.testbed import classes as C
from gl10m.testbed.classes import (MARK, MATERIAL, Z_BRIDGE, Z_CONTAINER, Z_COVER, Z_MAJOR, Z_MINOR, Z_SMALL,
                                   Z_WATER)
from gl10m.testbed.recipes import residential_block
from gl10m.testbed.shapes import blob, box, jrect, transformer
from gl10m.testbed.sites import LEFTOVER, SITE_ORDER
from gl10m.testbed.spec import BIOMES, COASTAL, TestbedSpec


# ------------------------------------------------------------------------------------------
# Regions
# ------------------------------------------------------------------------------------------
def utm_zone(lon: float) -> int:
    return int(math.floor((lon + 180.0) / 6.0)) + 1


@dataclass
class RegionWorld:
    code: str
    bbox: tuple[float, float, float, float]
    utm_epsg_nad83: int
    utm_epsg_wgs84: int
    features: Any  # geopandas.GeoDataFrame, EPSG:4326 (see module doc for columns)
    marks: Any = None  # geopandas.GeoDataFrame: fid (owner), mark (MARK id), z, geometry (EPSG:4326)
    base_cover: int = 0  # truth id of unmapped land inside the region
    id_base: int = 0  # OSM ids of this region are id_base + 1 ...
    biome: str = ""
    split: str | None = None
    targets: dict[str, int] = field(default_factory=dict)  # planned instances per concept name

    def concept_counts(self) -> dict[int, int]:
        """Features per matched concept id (the generator's own view)."""
        vc = self.features["concept"].value_counts()
        return {int(k): int(v) for k, v in sorted(vc.items()) if k >= 0}


def concept_targets(spec: TestbedSpec, profile: Profile, rng: np.random.Generator) -> dict[str, dict[str, int]]:
    """Instances per region and concept: long-tailed from the profile counts, >=1 in two regions."""
    f = spec.frequency
    codes = sorted(spec.regions)
    out = {c: {} for c in codes}
    for con in profile.concepts:
        n = int(np.clip(round(f.scale * con.count), f.min_per_concept, f.max_per_concept))
        w = []
        for c in codes:
            r = spec.regions[c]
            wt = float(BIOMES[r.biome]["w"].get(con.name, 1.0))
            if con.name in COASTAL and r.coast == "none":
                wt = 0.0
            w.append(wt)
        w = np.asarray(w)
        if w.sum() <= 0:
            w = np.ones(len(codes))
        elig = [i for i in np.argsort(-w - rng.random(len(w)) * 1e-3, kind="stable") if w[i] > 0]
        alloc = np.zeros(len(codes), dtype=int)
        first = elig[:min(n, 2, len(elig))]
        for i in first:
            alloc[i] += 1
        rest = n - alloc.sum()
        if rest > 0:
            alloc += rng.multinomial(rest, w / w.sum())
        for i, c in enumerate(codes):
            out[c][con.name] = int(alloc[i])
    return out


# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# The region builder
# ------------------------------------------------------------------------------------------
class Builder:
    """One region's layout under construction: its cell grid, budget, features and marks; the recipes add to it."""
    def __init__(self, spec: TestbedSpec, code: str, rng: np.random.Generator, budget: dict[str, int],
                 matcher, fid_base: int):
        self.spec, self.code, self.rng, self.budget = spec, code, rng, dict(budget)
        self.rs = spec.regions[code]
        self.matcher = matcher
        self.fid_base = fid_base
        self.bbox = spec.region_bbox(code)
        lon, lat = self.rs.center
        z = utm_zone(lon)
        self.epsg_nad83, self.epsg_wgs84 = 26900 + z, 32600 + z
        fwd = transformer(4326, self.epsg_nad83)
        w, s, e, n = self.bbox
        cx, cy = fwd.transform([w, e, e, w], [s, s, n, n])
        # inner axis-aligned rectangle of the (slightly rotated) bbox in UTM, minus a small margin
        pad = 8.0
        self.x0, self.x1 = max(cx[0], cx[3]) + pad, min(cx[1], cx[2]) - pad
        self.y0, self.y1 = max(cy[0], cy[1]) + pad, min(cy[2], cy[3]) - pad
        cell = spec.cell_m
        self.cell, self.m = cell, spec.street_margin_m
        self.nc = int((self.x1 - self.x0) // cell)
        self.nr = int((self.y1 - self.y0) // cell)
        self.ox = self.x0 + ((self.x1 - self.x0) - self.nc * cell) / 2
        self.oy = self.y0 + ((self.y1 - self.y0) - self.nr * cell) / 2
        # zones: 0 rural, 1 sea, 2 coast, 3 town, 4 industrial, 5 riparian
        self.zone = np.zeros((self.nr, self.nc), dtype=np.int8)
        self.used = np.zeros((self.nr, self.nc), dtype=bool)
        self.block_h = np.zeros((self.nr + 1, self.nc), dtype=bool)  # road along bottom edge of row r
        self.block_v = np.zeros((self.nr, self.nc + 1), dtype=bool)  # road along left edge of col c
        self.feats: list[dict] = []
        self.marks: list[tuple[int, int, int, Any]] = []  # (feature index, mark, z, geom)
        self.placed: dict[str, int] = {}
        self.budget_network = False  # True: highway, railway and river only when the budget asks

    def want_line(self, name: str) -> bool:
        """Draw network line `name` (highway, railroad, river)? Always in the testbed world; in
        budget mode (model-scale scenes) only when the budget holds one (and it is taken)."""
        return not self.budget_network or self.take(name)

    # -- bookkeeping -----------------------------------------------------------------------
    def take(self, name: str, k: int = 1) -> bool:
        if self.budget.get(name, 0) >= k:
            self.budget[name] -= k
            return True
        return False

    def set_material(self, i: int, material: str) -> int:
        self.feats[i]["material"] = MATERIAL[material]
        return i

    def _add(self, osm_type, geom, tags, cover, z, width, intended=None) -> int:
        tags = {k: str(v) for k, v in tags.items()}
        matches = self.matcher.match(tags)
        if intended is not None and C.CID[intended] in matches:
            concept = C.CID[intended]
        else:
            concept = matches[0] if matches else -1
        if isinstance(cover, str):
            cover = C.CID[cover] if cover in C.CID else C.BG[cover]
        self.feats.append(dict(osm_type=osm_type, geometry=geom, tags=tags, concept=int(concept),
                               cover=int(cover), z=int(z), width_m=float(width),
                               material=C.CLASS_MATERIAL[int(cover)]))
        return len(self.feats) - 1

    def area(self, geom, tags, cover, z, intended=None) -> int:
        """A closed way (simple polygon) or a multipolygon relation (holes or several parts)."""
        geom = geom.buffer(0) if not geom.is_valid else geom
        multi = geom.geom_type == "MultiPolygon" or len(geom.interiors) > 0
        tags = dict(tags)
        if multi:
            tags = {"type": "multipolygon", **tags}
        return self._add("relation" if multi else "way", geom, tags, cover, z, 0.0, intended)

    def way(self, line, tags, width, cover, z, intended=None) -> int:
        return self._add("way", line, tags, cover, z, width, intended)

    def node(self, pt, tags, diameter, cover, z, intended=None) -> int:
        return self._add("node", pt, tags, cover, z, diameter, intended)

    def mark(self, owner: int, name: str, geom, z: int | None = None) -> None:
        if geom is None or geom.is_empty:
            return
        self.marks.append((owner, MARK[name], self.feats[owner]["z"] if z is None else z, geom))

    # -- grid ------------------------------------------------------------------------------
    def cell_rect(self, r, c, h=1, w=1, inset=None):
        m = self.m if inset is None else inset
        return (self.ox + c * self.cell + m, self.oy + r * self.cell + m,
                self.ox + (c + w) * self.cell - m, self.oy + (r + h) * self.cell - m)

    def alloc(self, h, w, zones=(0,), pick=None):
        """Reserve a free h x w block of cells in the given zones (no road through it); rect or None."""
        zs = np.isin(self.zone, zones) & ~self.used
        cands = [(r, c) for r in range(self.nr - h + 1) for c in range(self.nc - w + 1)]
        order = self.rng.permutation(len(cands))
        for i in order:
            r, c = cands[i]
            if not zs[r:r + h, c:c + w].all():
                continue
            if h > 1 and self.block_h[r + 1:r + h, c:c + w].any():
                continue
            if w > 1 and self.block_v[r:r + h, c + 1:c + w].any():
                continue
            if pick is not None and not pick(r, c):
                continue
            self.used[r:r + h, c:c + w] = True
            return self.cell_rect(r, c, h, w), (r, c)
        return None, None

    # -- coordinates for the coast side ------------------------------------------------------
    def coast_xy(self, u, v):
        side = self.rs.coast
        W, H = self.nc * self.cell, self.nr * self.cell
        if side == "west":
            return self.ox + v, self.oy + u
        if side == "east":
            return self.ox + W - v, self.oy + u
        if side == "south":
            return self.ox + u, self.oy + v
        return self.ox + u, self.oy + H - v  # north

    # ======================================================================================
    def build(self):
        rng = self.rng
        self.layout_sea()
        self.layout_network()
        self.layout_town()
        self.place_sites()
        self.fill_town()
        self.place_leftovers()
        self.fill_rural()

    # -- sea and coast ----------------------------------------------------------------------
    def layout_sea(self):
        side = self.rs.coast
        if side == "none":
            self.coast_v = None
            return
        rng = self.rng
        along = self.nc if side in ("south", "north") else self.nr
        sw = 2
        self.sea_cells = sw
        L = along * self.cell
        ph, ph2 = rng.uniform(0, 2 * np.pi, 2)
        us = np.linspace(-self.cell, L + self.cell, 90)
        base = sw * self.cell - 40

        def coast_v(u):
            return base + 22 * np.sin(u / 310 + ph) + 10 * np.sin(u / 97 + ph2)
        self.coast_v = coast_v
        outer = [self.coast_xy(u, -self.cell) for u in (us[-1], us[0])]
        poly_pts = [self.coast_xy(u, coast_v(u)) for u in us] + outer
        from shapely.geometry import Polygon
        sea = Polygon(poly_pts).intersection(box(self.x0 - 5, self.y0 - 5, self.x1 + 5, self.y1 + 5))
        # sea: a bay area (OSM natural=bay), background class "sea"
        self.area(sea, {"natural": "bay", "name": f"{self.code} Bay"}, "sea", Z_COVER)
        for i in range(sw):
            if side == "west":
                self.zone[:, i] = 1
            elif side == "east":
                self.zone[:, self.nc - 1 - i] = 1
            elif side == "south":
                self.zone[i, :] = 1
            else:
                self.zone[self.nr - 1 - i, :] = 1
        self.used[self.zone == 1] = True
        if side == "west":
            self.zone[:, sw] = 2
        elif side == "east":
            self.zone[:, self.nc - 1 - sw] = 2
        elif side == "south":
            self.zone[sw, :] = 2
        else:
            self.zone[self.nr - 1 - sw, :] = 2

    def land_extent_x(self):
        x0, x1 = self.ox, self.ox + self.nc * self.cell
        if self.rs.coast == "west":
            x0 += self.sea_cells * self.cell + 10
        if self.rs.coast == "east":
            x1 -= self.sea_cells * self.cell + 10
        return x0 + 2, x1 - 2

    def land_extent_y(self):
        y0, y1 = self.oy, self.oy + self.nr * self.cell
        if self.rs.coast == "south":
            y0 += self.sea_cells * self.cell + 10
        if self.rs.coast == "north":
            y1 -= self.sea_cells * self.cell + 10
        return y0 + 2, y1 - 2

    def land_rows(self):
        rows = [r for r in range(self.nr) if not (self.zone[r] == 1).all()]
        return rows[0], rows[-1]

    def land_cols(self):
        cols = [c for c in range(self.nc) if not (self.zone[:, c] == 1).all()]
        return cols[0], cols[-1]

    # -- network: highway, rail, river, roads -----------------------------------------------
    def _split_line(self, pts_axis, fixed, horizontal, cuts):
        """Split a straight road/rail [a, b] along one axis at cut intervals -> list of (a, b, tag)."""
        a, b = pts_axis
        segs, pos = [], a
        for (ca, cb, tag) in sorted(cuts):
            if cb <= a or ca >= b:
                continue
            ca, cb = max(ca, a), min(cb, b)
            if ca > pos:
                segs.append((pos, ca, None))
            segs.append((ca, cb, tag))
            pos = cb
        if pos < b:
            segs.append((pos, b, None))
        return segs

    def _seg_geom(self, a, b, fixed, horizontal, n=2):
        from shapely.geometry import LineString
        t = np.linspace(a, b, n)
        if horizontal:
            return LineString(np.column_stack([t, np.full(n, fixed)]).round(2))
        return LineString(np.column_stack([np.full(n, fixed), t]).round(2))

    def layout_network(self):
        rng, cell = self.rng, self.cell
        r0, r1 = self.land_rows()
        c0, c1 = self.land_cols()
        nr_land, nc_land = r1 - r0 + 1, c1 - c0 + 1
        # rows/cols of the main lines (boundaries), well apart
        self.r_hw = r0 + max(2, int(nr_land * rng.uniform(0.22, 0.3)))
        self.r_ter = r0 + int(nr_land * rng.uniform(0.55, 0.62))
        self.r_riv = r0 + int(nr_land * rng.uniform(0.8, 0.86))
        if self.r_riv <= self.r_ter + 1:
            self.r_riv = min(r1 - 1, self.r_ter + 2)
        self.c_sec = c0 + int(nc_land * rng.uniform(0.45, 0.55))
        self.c_rl = c0 + int(nc_land * rng.uniform(0.7, 0.78))
        if self.c_rl <= self.c_sec + 1:
            self.c_rl = min(c1 - 1, self.c_sec + 3)
        lx0, lx1 = self.land_extent_x()
        ly0, ly1 = self.land_extent_y()
        draw_river, draw_hw, draw_rail = self.want_line("river"), self.want_line("highway"), self.want_line("railroad")
        y_hw = self.oy + self.r_hw * cell
        y_ter = self.oy + self.r_ter * cell
        x_sec = self.ox + self.c_sec * cell
        x_rl = self.ox + self.c_rl * cell
        self.block_h[self.r_hw, :] = True
        self.block_h[self.r_ter, :] = True
        self.block_v[:, self.c_sec] = True
        self.block_v[:, self.c_rl] = True
        # river corridor row
        self.zone[self.r_riv, :][self.zone[self.r_riv, :] == 0] = 5
        y_riv_mid = self.oy + (self.r_riv + 0.5) * cell
        ph = rng.uniform(0, 2 * np.pi)
        xs = np.linspace(self.ox - 20, self.ox + self.nc * cell + 20, 120)
        ys = y_riv_mid + 42 * np.sin(xs / 230 + ph) + 8 * np.sin(xs / 61 + 2 * ph)
        from shapely.geometry import LineString, Point
        river = LineString(np.column_stack([xs, ys]).round(2)).intersection(
            box(lx0 - (self.sea_cells * cell if self.rs.coast == "west" else 0) - 60, ly0,
                 lx1 + (self.sea_cells * cell if self.rs.coast == "east" else 0) + 60, ly1))
        if river.geom_type == "MultiLineString":
            river = max(river.geoms, key=lambda g: g.length)
        self.river = river
        # split the river into reaches like OSM
        L = river.length
        cuts = np.linspace(0, L, 4)
        from shapely.ops import substring
        for i in range(3 if draw_river else 0):
            seg = substring(river, cuts[i], cuts[i + 1])
            self.way(seg, {"waterway": "river", "name": f"{self.code} River"}, 26, "river", Z_WATER, "river")
        river_y_at = lambda x: float(np.interp(x, xs, ys))  # noqa: E731

        # highway (motorway) along r_hw with an overpass over the rail, a toll plaza
        hw_kind = "motorway" if self.rs.biome in ("prairie", "coastal_plain", "desert") else "trunk"
        cuts = [(x_rl - 45, x_rl + 45, "bridge")] if draw_rail else []
        tolls = []
        xt = x_sec + rng.uniform(0.3, 0.5) * (x_rl - x_sec)
        while draw_hw and self.take("toll_booth") and len(tolls) < 3:
            tolls.append(xt)
            xt = lx0 + rng.uniform(0.1, 0.3) * (x_sec - lx0) if len(tolls) == 1 else xt + 30
        for (a, b, tag) in self._split_line((lx0, lx1), y_hw, True, cuts) if draw_hw else []:
            g = self._seg_geom(a, b, y_hw, True, n=max(2, int((b - a) // 150)))
            tags = {"highway": hw_kind, "ref": "I-5" if hw_kind == "motorway" else "SR 9", "lanes": "4",
                    "oneway": "no", "maxspeed": "65 mph"}
            if tag == "bridge":
                tags.update({"bridge": "yes", "layer": "1"})
                i = self.way(g, tags, 24, "overpass", Z_BRIDGE, "overpass")
            else:
                i = self.way(g, tags, 24, "highway", Z_MAJOR, "highway")
            self.mark(i, "road_marking", g)
            self.mark(i, "road_marking", g.parallel_offset(5.5, "left"))
            self.mark(i, "road_marking", g.parallel_offset(5.5, "right"))
        for xt in tolls:
            i = self.node(Point(round(xt, 2), round(y_hw, 2)), {"barrier": "toll_booth", "name": "Toll Plaza"},
                          14, "toll_booth", Z_SMALL, "toll_booth")
            for dx in (-4, 0, 4):
                self.mark(i, "vehicle", box(xt + dx - 1, y_hw - 6, xt + dx + 1, y_hw + 6))
        # tertiary road along r_ter; secondary road along c_sec crossing the highway on a bridge
        for (a, b, tag) in self._split_line((lx0, lx1), y_ter, True, [(x_sec - 20, x_sec + 20, "rb"),
                                                                       (x_rl - 8, x_rl + 8, "xing")]
                                            ) if draw_hw else []:
            if tag == "rb":
                continue
            g = self._seg_geom(a, b, y_ter, True, n=max(2, int((b - a) // 150)))
            i = self.way(g, {"highway": "tertiary", "name": "Main Street"}, 12, "highway", Z_MAJOR, "highway")
            self.mark(i, "road_marking", g)
        cuts = [(y_hw - 30, y_hw + 30, "bridge"), (y_ter - 20, y_ter + 20, "rb")]
        yr = river_y_at(x_sec)
        if draw_river:
            cuts.append((yr - 30, yr + 30, "bridge"))
        for (a, b, tag) in self._split_line((ly0, ly1), x_sec, False, cuts) if draw_hw else []:
            if tag == "rb":
                continue
            g = self._seg_geom(a, b, x_sec, False, n=max(2, int((b - a) // 150)))
            tags = {"highway": "secondary", "name": "Central Avenue"}
            if tag == "bridge":
                tags.update({"bridge": "yes", "layer": "1"})
                i = self.way(g, tags, 14, "overpass", Z_BRIDGE, "overpass")
            else:
                i = self.way(g, tags, 14, "highway", Z_MAJOR, "highway")
            self.mark(i, "road_marking", g)
        # roundabout at secondary x tertiary (a closed way)
        if draw_hw and self.take("roundabout"):
            self._roundabout(x_sec, y_ter, 20, "secondary")
        # railway along c_rl: viaduct over the river, tunnel through a hill near the far end
        yr = river_y_at(x_rl)
        cuts = [(yr - 70, yr + 70, "viaduct")] if draw_river else []
        if draw_rail and self.take("tunnel_opening"):
            yt0 = (y_hw + y_ter) / 2 - 110 if ly1 - (yr + 80) < 400 else yr + 160
            cuts.append((yt0, yt0 + 260, "tunnel"))
            # the hill the tunnel goes through: a forest on both sides of the line
            self.tunnel_span = (yt0, yt0 + 260)
        else:
            self.tunnel_span = None
        self.x_rl, self.y_hw, self.y_ter, self.x_sec = x_rl, y_hw, y_ter, x_sec
        for (a, b, tag) in self._split_line((ly0, ly1), x_rl, False, cuts) if draw_rail else []:
            g = self._seg_geom(a, b, x_rl, False, n=max(2, int((b - a) // 150)))
            tags = {"railway": "rail", "usage": "main", "gauge": "1435", "name": f"{self.code} Subdivision"}
            if tag == "viaduct":
                tags.update({"bridge": "viaduct", "layer": "1"})
                i = self.way(g, tags, 10, "viaduct", Z_BRIDGE, "viaduct")
            elif tag == "tunnel":
                tags.update({"tunnel": "yes", "layer": "-1"})
                i = self.way(g, tags, 12, "tunnel_opening", Z_BRIDGE, "tunnel_opening")
                continue
            else:
                i = self.way(g, tags, 6, "railroad", Z_MINOR, "railroad")
            self.mark(i, "rail_track", g.parallel_offset(0.75, "left"))
            self.mark(i, "rail_track", g.parallel_offset(0.75, "right"))
        if self.tunnel_span:
            ra = int((self.tunnel_span[0] - self.oy) // cell)
            rb = int((self.tunnel_span[1] - self.oy) // cell)
            for r in range(max(ra, 0), min(rb, self.nr - 1) + 1):
                for c in (self.c_rl - 1, self.c_rl):
                    if 0 <= c < self.nc and not self.used[r, c]:
                        self.used[r, c] = True
                        rect = self.cell_rect(r, c, inset=0)
                        if self.take("forest"):
                            self.area(jrect(rect, self.rng, 6), {"natural": "wood", "leaf_type": "mixed"},
                                      "forest", Z_COVER, "forest")
                        else:
                            self.area(jrect(rect, self.rng, 6), {"natural": "scrub"}, "chaparral", Z_COVER,
                                      "chaparral")
        # dams across the river
        dam_xs = [x for x in np.linspace(lx0 + 150, lx1 - 150, 7)
                  if abs(x - x_sec) > 80 and abs(x - x_rl) > 120]
        for xd in rng.permutation(dam_xs)[:3]:
            if not draw_river or not self.take("dam"):
                break
            yd = river_y_at(xd)
            g = LineString([(round(xd, 2), round(yd - 28, 2)), (round(xd, 2), round(yd + 28, 2))])
            i = self.way(g, {"waterway": "dam", "name": "Mill Dam"}, 9, "dam", Z_BRIDGE, "dam")
        # rural tracks
        return

    def _roundabout(self, x, y, r, kind):
        from shapely.geometry import LineString
        t = np.linspace(0, 2 * np.pi, 25)
        pts = np.column_stack([x + r * np.cos(t), y + r * np.sin(t)]).round(2)
        pts[-1] = pts[0]
        g = LineString(pts)
        i = self.way(g, {"highway": kind, "junction": "roundabout", "oneway": "yes"}, 9, "roundabout", Z_MAJOR,
                     "roundabout")
        self.mark(i, "road_marking", g.buffer(r - 5).exterior)
        return i

    # -- town ------------------------------------------------------------------------------
    def layout_town(self):
        tw, th = self.rs.town_cells
        r0, r1 = self.land_rows()
        c0, c1 = self.land_cols()
        # town centred on the secondary x tertiary crossing, kept between highway and river
        tc0 = int(np.clip(self.c_sec - tw // 2, c0, c1 + 1 - tw))
        tr0 = int(np.clip(self.r_ter - th // 2, self.r_hw, self.r_riv - th))
        tr0 = max(tr0, r0)
        th = min(th, self.r_riv - tr0)
        self.town = (tr0, tc0, th, tw)
        for r in range(tr0, tr0 + th):
            for c in range(tc0, tc0 + tw):
                if self.zone[r, c] == 0:
                    self.zone[r, c] = 3
        # landuse=residential over the town (a container)
        x0, y0 = self.ox + tc0 * self.cell, self.oy + tr0 * self.cell
        x1, y1 = x0 + tw * self.cell, y0 + th * self.cell
        self.area(box(x0 + 4, y0 + 4, x1 - 4, y1 - 4), {"landuse": "residential"}, "residential", Z_CONTAINER)
        # streets on the internal cell boundaries (not on the main roads)
        k = 0
        for r in range(tr0 + 1, tr0 + th):
            if r == self.r_ter:
                continue
            self.block_h[r, tc0:tc0 + tw] = True
            y = self.oy + r * self.cell
            g = self._seg_geom(x0 + 6, x1 - 6, y, True, 4)
            self.way(g, {"highway": "residential", "name": f"{_STREETS[k % len(_STREETS)]} Street"}, 8,
                     "minor_road", Z_MINOR)
            k += 1
        for c in range(tc0 + 1, tc0 + tw):
            if c in (self.c_sec, self.c_rl):
                continue
            self.block_v[tr0:tr0 + th, c] = True
            x = self.ox + c * self.cell
            g = self._seg_geom(y0 + 6, y1 - 6, x, False, 4)
            self.way(g, {"highway": "residential", "name": f"{_STREETS[k % len(_STREETS)]} Avenue"}, 8,
                     "minor_road", Z_MINOR)
            k += 1
        # small roundabouts at a few town junctions
        juncs = [(self.ox + c * self.cell, self.oy + r * self.cell)
                 for r in range(tr0 + 1, tr0 + th) for c in range(tc0 + 1, tc0 + tw)
                 if r != self.r_ter and c not in (self.c_sec, self.c_rl)]
        for j in self.rng.permutation(len(juncs))[:2]:
            if self.take("roundabout"):
                self._roundabout(juncs[j][0], juncs[j][1], 12, "residential")
        # industrial zone: a band of cells next to the railway, below the highway or above it
        r_lo = max(r0, self.r_hw - 3)
        for r in range(r_lo, min(self.r_hw + 2, self.nr)):
            for c in range(self.c_rl - 1, min(self.c_rl + 3, self.nc)):
                if self.zone[r, c] == 0:
                    self.zone[r, c] = 4

    # -- sites -----------------------------------------------------------------------------
    def place_sites(self):
        for name, fn in SITE_ORDER:
            guard = 0
            while self.budget.get(name, 0) > 0 and guard < 200:
                guard += 1
                before = self.budget[name]
                ok = fn(self)
                if not ok or self.budget[name] >= before:
                    break

    def fill_town(self):
        tr0, tc0, th, tw = self.town
        for r in range(tr0, tr0 + th):
            for c in range(tc0, tc0 + tw):
                if self.zone[r, c] == 3 and not self.used[r, c]:
                    self.used[r, c] = True
                    residential_block(self, self.cell_rect(r, c))

    def place_leftovers(self):
        for name, fn in LEFTOVER:
            guard = 0
            while self.budget.get(name, 0) > 0 and guard < 100:
                guard += 1
                before = self.budget[name]
                ok = fn(self)
                if not ok or self.budget[name] >= before:
                    break

    def fill_rural(self):
        """Unclaimed rural cells: a few stay unmapped (base cover); the rest get generic cover."""
        rng = self.rng
        base = BIOMES[self.rs.biome]["base"]
        for r in range(self.nr):
            for c in range(self.nc):
                if self.used[r, c] or self.zone[r, c] in (1,):
                    continue
                if rng.random() < 0.6:
                    continue
                self.used[r, c] = True
                rect = self.cell_rect(r, c)
                if base == "bare_soil":
                    self.area(blob(rect, rng), {"landuse": "grass"}, "grass", Z_COVER)
                else:
                    self.area(jrect(rect, rng, 8), {"landuse": "grass"}, "grass", Z_COVER)


_STREETS = ["Oak", "Pine", "Maple", "Cedar", "Elm", "Walnut", "Spruce", "Birch", "Willow", "Ash", "Chestnut",
            "Laurel", "Magnolia", "Hickory", "Sycamore", "Juniper"]



# ------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------
def generate(spec: TestbedSpec, seed: int | None = None) -> list[RegionWorld]:
    """Generate every region of the spec (sorted by code); the same seed gives the same world."""
    from gl10m.concepts import ConceptMatcher

    prof = spec.load_profile()
    matcher = ConceptMatcher(prof.concepts)
    seed = spec.seed if seed is None else int(seed)
    root = np.random.SeedSequence(seed)
    targets = concept_targets(spec, prof, np.random.default_rng(root.spawn(1)[0]))
    codes = sorted(spec.regions)
    children = root.spawn(len(codes) + 1)[1:]
    out = []
    for k, code in enumerate(codes):
        rng = np.random.default_rng(children[k])
        out.append(build_region(spec, code, rng, targets[code], matcher, (k + 1) * 10_000_000,
                                split=prof.split_of(code)))
    return out


def build_region(spec: TestbedSpec, code: str, rng: np.random.Generator, budget: dict[str, int], matcher,
                 id_base: int, *, split: str | None = None, budget_network: bool = False) -> RegionWorld:
    """Lay out one region of `spec` with the recipes (`Builder`) and return it in EPSG:4326.

    budget: planned instances per concept name; id_base: its OSM ids are id_base + 1 ...
    budget_network: draw the highway, railway, river and main roads only where the budget asks
    for them (highway, railroad, river), as the model-scale scenes do; the testbed world always
    draws its full network (False).
    """
    import geopandas as gpd
    import shapely
    from pyproj import Transformer

    b = Builder(spec, code, rng, budget, matcher, id_base)
    b.budget_network = budget_network
    b.build()
    inv = transformer(b.epsg_nad83, 4326)

    def to_ll(xy, inv=inv):
        x, y = inv.transform(xy[:, 0], xy[:, 1])
        return np.round(np.column_stack([x, y]), 7)

    geoms = shapely.transform(np.array([f["geometry"] for f in b.feats], dtype=object), to_ll)
    geoms = _repair(geoms)
    # OSM ids: nodes, ways and relations each count up from id_base in creation order
    counters = {"node": 0, "way": 0, "relation": 0}
    osm_ids = []
    for f in b.feats:
        counters[f["osm_type"]] += 1
        osm_ids.append(id_base + counters[f["osm_type"]])
    df = gpd.GeoDataFrame({
        "fid": np.arange(len(b.feats), dtype=np.int64) + id_base,
        "osm_type": [f["osm_type"] for f in b.feats],
        "osm_id": np.asarray(osm_ids, dtype=np.int64),
        "tags": [f["tags"] for f in b.feats],
        "concept": np.asarray([f["concept"] for f in b.feats], dtype=np.int64),
        "cover": np.asarray([f["cover"] for f in b.feats], dtype=np.int64),
        "z": np.asarray([f["z"] for f in b.feats], dtype=np.int64),
        "width_m": np.asarray([f["width_m"] for f in b.feats], dtype=np.float64),
        "material": np.asarray([f["material"] for f in b.feats], dtype=np.int64),
    }, geometry=list(geoms), crs="EPSG:4326")
    mgeoms = shapely.transform(np.array([m[3] for m in b.marks], dtype=object), to_ll) if b.marks else []
    marks = gpd.GeoDataFrame({
        "fid": np.asarray([m[0] + id_base for m in b.marks], dtype=np.int64),
        "mark": np.asarray([m[1] for m in b.marks], dtype=np.int64),
        "z": np.asarray([m[2] for m in b.marks], dtype=np.int64),
    }, geometry=list(mgeoms), crs="EPSG:4326")
    return RegionWorld(
        code=code, bbox=b.bbox, utm_epsg_nad83=b.epsg_nad83, utm_epsg_wgs84=b.epsg_wgs84, features=df,
        marks=marks, base_cover=C.BG[BIOMES[b.rs.biome]["base"]], id_base=id_base, biome=b.rs.biome,
        split=split, targets=dict(budget))


def _repair(geoms):
    """Rounding to 1e-7 degrees can make a polygon invalid; fix it (areas stay areas)."""
    import shapely
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        fixed = shapely.make_valid(geoms[bad])
        out = []
        for g in fixed:
            if g.geom_type == "GeometryCollection":
                polys = [p for p in g.geoms if p.geom_type in ("Polygon", "MultiPolygon")]
                g = shapely.union_all(polys) if polys else g
            out.append(g)
        geoms = geoms.copy()
        geoms[bad] = out
    return geoms


# ------------------------------------------------------------------------------------------
