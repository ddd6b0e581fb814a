"""Write testbed regions (layout.RegionWorld) as a real OSM PBF with osmium.SimpleWriter.

Point features become tagged nodes; line features tagged ways; simple polygons closed tagged
ways; polygons with holes and multi-part polygons multipolygon relations whose outer/inner
members are untagged closed ways. Way vertices become untagged nodes, shared where two ways
meet at the same coordinate (1e-7 degrees), so roads split at bridges stay connected.
Ids: the features' own osm_id; vertex nodes and member ways count up from id_base + 5,000,000.
Objects are written sorted (nodes, ways, relations, each by id), with fixed metadata, so the
same world gives a byte-identical file.
"""
from __future__ import annotations

from pathlib import Path

from gl10m.io import atomic_path

_AUX = 5_000_000
_META = dict(version=1, changeset=1, uid=1, user="gl10m-testbed", timestamp="2024-01-01T00:00:00Z")


def _fixed(lonlat) -> tuple[int, int]:
    return (int(round(lonlat[0] * 1e7)), int(round(lonlat[1] * 1e7)))


def _region_objects(region):
    """(nodes, ways, relations) of one region: lists of (id, payload) ready for the writer."""
    nodes: dict[int, tuple[tuple[int, int], dict]] = {}
    ways: dict[int, tuple[list[int], dict]] = {}
    rels: dict[int, tuple[list[tuple[str, int, str]], dict]] = {}
    vertex: dict[tuple[int, int], int] = {}
    aux = {"node": region.id_base + _AUX, "way": region.id_base + _AUX}

    def vnode(c) -> int:
        key = _fixed(c)
        nid = vertex.get(key)
        if nid is None:
            aux["node"] += 1
            nid = aux["node"]
            vertex[key] = nid
            nodes[nid] = (key, {})
        return nid

    def ring_nodes(coords) -> list[int]:
        ids = [vnode(c) for c in coords]
        # drop consecutive duplicates that rounding may create, keep the ring closed
        out = [ids[0]]
        for i in ids[1:]:
            if i != out[-1]:
                out.append(i)
        return out

    df = region.features
    for osm_type, osm_id, tags, geom in zip(df["osm_type"], df["osm_id"], df["tags"], df.geometry):
        osm_id = int(osm_id)
        if geom is None or geom.is_empty:
            raise ValueError(f"feature {osm_type}/{osm_id} of region {region.code} has no geometry")
        if osm_type == "node":
            nodes[osm_id] = (_fixed((geom.x, geom.y)), dict(tags))
        elif osm_type == "way":
            coords = geom.exterior.coords if geom.geom_type == "Polygon" else geom.coords
            ids = ring_nodes(list(coords))
            if len(ids) < 2:
                raise ValueError(f"way {osm_id} of region {region.code} collapsed to one node")
            ways[osm_id] = (ids, dict(tags))
        elif osm_type == "relation":
            polys = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
            members = []
            for p in polys:
                for role, ring in [("outer", p.exterior)] + [("inner", r) for r in p.interiors]:
                    aux["way"] += 1
                    ways[aux["way"]] = (ring_nodes(list(ring.coords)), {})
                    members.append(("w", aux["way"], role))
            rels[osm_id] = (members, dict(tags))
        else:
            raise ValueError(f"unknown osm_type {osm_type!r}")
    return nodes, ways, rels


def write_pbf(regions, path: str | Path) -> Path:
    """Write the regions' features (sorted by code) as one OSM PBF at `path` (nodes, ways, relations,
    each sorted by id); atomic; returns the path."""
    import osmium
    from osmium.osm.mutable import Node, Relation, Way

    path = Path(path)
    regions = sorted(regions, key=lambda r: r.code)
    nodes, ways, rels = {}, {}, {}
    for r in regions:
        n, w, rel = _region_objects(r)
        for d, src in ((nodes, n), (ways, w), (rels, rel)):
            clash = d.keys() & src.keys()
            if clash:
                raise ValueError(f"region {r.code}: OSM id {min(clash)} is used twice")
            d.update(src)
    header = osmium.io.Header()
    header.set("generator", "gl10m-testbed")
    w = min(r.bbox[0] for r in regions)
    s = min(r.bbox[1] for r in regions)
    e = max(r.bbox[2] for r in regions)
    n = max(r.bbox[3] for r in regions)
    header.add_box(osmium.osm.Box(w, s, e, n))
    with atomic_path(path) as tmp:
        writer = osmium.SimpleWriter(str(tmp), header=header, overwrite=True)
        try:
            for nid in sorted(nodes):
                (x, y), tags = nodes[nid]
                writer.add_node(Node(location=(x / 1e7, y / 1e7), id=nid, tags=tags, **_META))
            for wid in sorted(ways):
                ids, tags = ways[wid]
                writer.add_way(Way(nodes=ids, id=wid, tags=tags, **_META))
            for rid in sorted(rels):
                members, tags = rels[rid]
                writer.add_relation(Relation(members=members, id=rid, tags=tags, **_META))
        finally:
            writer.close()
    return path


def write_pbfs(regions: list, osm_dir: str | Path) -> dict[str, Path]:
    """One PBF per region, DIR/osm/{CODE}.osm.pbf (how the pipeline reads one extract per state)."""
    return {r.code: write_pbf([r], Path(osm_dir) / f"{r.code}.osm.pbf") for r in regions}


def pbf_counts(path) -> dict[str, int]:
    """Count nodes, ways and relations in a PBF (a quick sanity helper)."""
    import osmium
    fp = osmium.FileProcessor(str(path))
    out = {"node": 0, "way": 0, "relation": 0}
    for o in fp:
        out[{"n": "node", "w": "way", "r": "relation"}[o.type_str()]] += 1
    return out


def write_vector_world(regions: list, out: str | Path, truth_res_m: float | None = 1.0) -> dict:
    """Write DIR/osm/{CODE}.osm.pbf and (unless truth_res_m is None) DIR/truth/{CODE}.tif; returns the paths."""
    from gl10m.testbed.raster import write_truth

    out = Path(out)
    paths = {"osm": write_pbfs(regions, out / "osm"), "truth": {}}
    if truth_res_m is not None:
        for r in regions:
            paths["truth"][r.code] = write_truth(r, out / "truth" / f"{r.code}.tif", truth_res_m)
    return paths


__all__ = ["write_pbf", "write_pbfs", "write_vector_world", "pbf_counts"]
