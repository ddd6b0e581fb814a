"""Write small, real OSM PBF files for tests (osmium.SimpleWriter).

Usage::

    from tests.pbfgen import PbfBuilder, square, offset, bowtie

    b = PbfBuilder()
    b.node(-122.0, 37.0, {"man_made": "tower"})                    # a tagged node
    b.way([(-122.0, 37.0), (-122.0, 37.01)], {"railway": "rail"})  # an open way (nodes made for you)
    b.area(square(-122.0, 37.0, 50), {"leisure": "swimming_pool"}) # a closed way
    b.multipolygon([square(-122.0, 37.0, 400)], [square(-122.0, 37.0, 100)],
                   {"natural": "wood"})                             # relation, outer + inner ring
    b.area(bowtie(-122.0, 37.0, 30), {"building": "barn"})         # self-intersecting ring
    b.multipolygon([square(...)], tags={...}, closed=False)        # broken: unclosed outer ring
    path = b.write(tmp_path / "t.osm.pbf")

Coordinates are (lon, lat) in degrees. Objects are written sorted (nodes, then ways, then
relations, each by id), as osmium expects. Ids count up from 1 per type unless given.
A ring is given open (first point not repeated); `area`/`multipolygon` close it by reusing
the first node, so the way's first and last node ids are the same (a real closed way).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import osmium
from osmium.osm.mutable import Node, Relation, Way

M_PER_DEG_LAT = 111_320.0

Coord = tuple[float, float]


def offset(lon: float, lat: float, dx_m: float, dy_m: float) -> Coord:
    """The point dx_m east and dy_m north of (lon, lat) (small-distance approximation)."""
    return (lon + dx_m / (M_PER_DEG_LAT * math.cos(math.radians(lat))), lat + dy_m / M_PER_DEG_LAT)


def square(lon: float, lat: float, side_m: float) -> list[Coord]:
    """Open ring (4 corners, counter-clockwise) of a square of side `side_m` centred on (lon, lat)."""
    h = side_m / 2
    return [offset(lon, lat, -h, -h), offset(lon, lat, h, -h), offset(lon, lat, h, h), offset(lon, lat, -h, h)]


def bowtie(lon: float, lat: float, side_m: float) -> list[Coord]:
    """Open self-intersecting ring (a figure eight): an invalid polygon that can be repaired."""
    h = side_m / 2
    return [offset(lon, lat, -h, -h), offset(lon, lat, h, h), offset(lon, lat, h, -h), offset(lon, lat, -h, h)]


def line(lon: float, lat: float, length_m: float, n: int = 2, bearing: str = "east") -> list[Coord]:
    """`n` points on a straight line of `length_m` starting at (lon, lat), going east or north."""
    step = length_m / (n - 1)
    if bearing == "east":
        return [offset(lon, lat, i * step, 0) for i in range(n)]
    return [offset(lon, lat, 0, i * step) for i in range(n)]


class PbfBuilder:
    """Collect nodes, ways and relations; `write()` them to a sorted PBF."""

    def __init__(self) -> None:
        self.nodes: dict[int, tuple[Coord, dict]] = {}
        self.ways: dict[int, tuple[list[int], dict]] = {}
        self.relations: dict[int, tuple[list[tuple[str, int, str]], dict]] = {}
        self._next = {"n": 1, "w": 1, "r": 1}

    def _id(self, kind: str, given: int | None) -> int:
        if given is None:
            given = self._next[kind]
        self._next[kind] = max(self._next[kind], given + 1)
        return given

    def node(self, lon: float, lat: float, tags: Mapping[str, str] | None = None, *, id: int | None = None) -> int:
        """Add a node; return its id."""
        nid = self._id("n", id)
        if nid in self.nodes:
            raise ValueError(f"node {nid} already exists")
        self.nodes[nid] = ((float(lon), float(lat)), dict(tags or {}))
        return nid

    def way(self, points: Sequence[Coord] | Sequence[int], tags: Mapping[str, str] | None = None, *,
            closed: bool = False, id: int | None = None) -> int:
        """Add a way through `points` ((lon, lat) pairs, made into new untagged nodes, or existing
        node ids). closed=True appends the first node id again. Return the way id."""
        refs = [p if isinstance(p, int) else self.node(*p) for p in points]
        if closed:
            refs.append(refs[0])
        wid = self._id("w", id)
        if wid in self.ways:
            raise ValueError(f"way {wid} already exists")
        self.ways[wid] = (refs, dict(tags or {}))
        return wid

    def area(self, ring: Sequence[Coord], tags: Mapping[str, str] | None = None, *, id: int | None = None) -> int:
        """Add a closed way from an open ring; return the way id."""
        return self.way(ring, tags, closed=True, id=id)

    def multipolygon(self, outers: Iterable[Sequence[Coord]], inners: Iterable[Sequence[Coord]] = (),
                     tags: Mapping[str, str] | None = None, *, closed: bool = True,
                     rel_type: str = "multipolygon", id: int | None = None) -> int:
        """Add a multipolygon relation: one untagged way per ring, roles outer/inner.
        closed=False leaves every ring open (a broken relation osmium cannot assemble)."""
        members = [("w", self.way(r, closed=closed), "outer") for r in outers]
        members += [("w", self.way(r, closed=closed), "inner") for r in inners]
        return self.relation(members, {"type": rel_type, **dict(tags or {})}, id=id)

    def relation(self, members: Sequence[tuple[str, int, str]], tags: Mapping[str, str] | None = None, *,
                 id: int | None = None) -> int:
        """Add a relation with members (type 'n'|'w'|'r', ref, role); return its id."""
        rid = self._id("r", id)
        if rid in self.relations:
            raise ValueError(f"relation {rid} already exists")
        self.relations[rid] = (list(members), dict(tags or {}))
        return rid

    def write(self, path: str | Path) -> Path:
        """Write everything, sorted by type then id, to `path` (overwritten); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        w = osmium.SimpleWriter(str(path))
        try:
            for nid in sorted(self.nodes):
                (lon, lat), tags = self.nodes[nid]
                w.add_node(Node(id=nid, location=(lon, lat), tags=tags, version=1))
            for wid in sorted(self.ways):
                refs, tags = self.ways[wid]
                w.add_way(Way(id=wid, nodes=refs, tags=tags, version=1))
            for rid in sorted(self.relations):
                members, tags = self.relations[rid]
                w.add_relation(Relation(id=rid, members=members, tags=tags, version=1))
        finally:
            w.close()
        return path
