"""Split assignment by state, and the border rule that keeps splits apart.

A scene belongs to the split of its state (profile ``splits.scheme``). A scene whose footprint,
grown by ``splits.border_buffer_deg``, reaches a region of another split could share ground
with that split's scenes; such a scene is dropped from the *smaller* of the two splits (fewer
scenes; ties: test before val before train keep their scenes), so held-out data never overlaps
training data and the big split loses nothing. Regions are their profile bounding boxes, a
conservative stand-in for state boundaries (a box covers more than the state).
"""
from __future__ import annotations

from typing import Iterable, Mapping

KEEP_ON_TIE = {"test": 2, "val": 1, "train": 0}  # equal sizes: the held-out split keeps its scenes


def border_drops(scenes: Iterable[Mapping], profile) -> dict[str, str]:
    """{key: reason} of scenes to drop; `scenes` give key, split, state, west, south, east, north."""
    scenes = list(scenes)
    size: dict[str, int] = {}
    for s in scenes:
        size[s["split"]] = size.get(s["split"], 0) + 1
    buf = profile.splits.border_buffer_deg
    regions = [(code, profile.split_of(code), r.bbox) for code, r in sorted(profile.regions.items())]
    drops: dict[str, str] = {}
    for s in scenes:
        w, so, e, n = (float(s[c]) for c in ("west", "south", "east", "north"))
        w, so, e, n = w - buf, so - buf, e + buf, n + buf
        for code, split, (bw, bs, be, bn) in regions:
            if code == s["state"] or split is None or split == s["split"]:
                continue
            if w < be and e > bw and so < bn and n > bs:
                mine = (size[s["split"]], KEEP_ON_TIE.get(s["split"], -1))
                theirs = (size.get(split, 0), KEEP_ON_TIE.get(split, -1))
                if mine < theirs:
                    drops[s["key"]] = f"border:{code}"
                    break
    return drops
