"""What the model-scale world lets Sentinel-2 see, per concept: LR-visible or HR-only.

Two measurements on the rendered truth of generated scenes (gl10m.testbed.scenes), both plain
functions of arrays:

* :func:`lr_purity` - the share of a concept's 1 m pixels whose Sentinel-2 footprint is pure:
  the 30 x 30 m window (the 10 m pixel and its 3 x 3 neighbourhood, where the PSF mixes) is at
  least 90 % that concept. A concept whose instances are smaller than that (a pool, a court, a
  tower, a car at the toll plaza) is only ever seen mixed with its surroundings at 10 m.
* :func:`mark_share` - the share of its pixels that carry a marking (court lines, solar rows,
  grave rows, runway and road markings, vehicles, boats ...): detail a few metres wide or less.
* :func:`detail_energy` - the fixed measure of the tests: mean squared difference between the
  HR image and its own 10 m block means over a mask, i.e. the energy of everything finer than a
  Sentinel-2 pixel. Rendered without the marks layer it drops (tests/test_testbed_scenes.py).

Classes (:func:`classify`): ``HR-only (small)`` when purity < :data:`PURE_MIN`; ``HR-only
(markings)`` when the concept is seen whole at 10 m but shares its surface material with another
concept and is told apart by its markings (turf pitches, courts, a solar farm's rows against
roofs, a cemetery's grave rows against lawn); ``LR-visible`` otherwise.
"""
from __future__ import annotations

import numpy as np

PURE_WINDOW = 30  # metres (pixels at 1 m): the 10 m pixel and its PSF neighbourhood
PURE_FRAC = 0.9
PURE_MIN = 0.25  # LR-visible needs a quarter of the concept's area seen pure at 10 m
MARK_MIN = 0.02  # "told apart by markings": at least 2 % of its pixels carry marks


def _box_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over k x k blocks (trailing rows/cols that do not fill a block are dropped)."""
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    return a[:h, :w].reshape(h // k, k, w // k, k).sum(axis=(1, 3), dtype=np.int64)


def lr_purity(truth: np.ndarray, cls: int, window: int = PURE_WINDOW, frac: float = PURE_FRAC) -> tuple[int, int]:
    """(pixels of class `cls`, those in a pure window): windows tile the grid (non-overlapping)."""
    m = truth == cls
    n = int(m.sum())
    if n == 0:
        return 0, 0
    s = _box_sum(m.astype(np.uint8), window)
    pure = s >= frac * window * window
    return n, int(s[pure].sum())


def mark_share(truth: np.ndarray, marks: np.ndarray, cls: int) -> tuple[int, int]:
    """(pixels of class `cls`, those carrying a mark)."""
    m = truth == cls
    return int(m.sum()), int(np.count_nonzero(marks[m]))


def detail_map(hr: np.ndarray, k: int = 10) -> np.ndarray:
    """Per pixel |HR - its k x k block mean|^2 (DN^2, summed over R, G, B): the image energy
    finer than a Sentinel-2 pixel, which the LR image cannot hold."""
    h, w = hr.shape[:2]
    x = hr.astype(np.float32)
    mean = x.reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))
    d = x - np.repeat(np.repeat(mean, k, 0), k, 1)
    return (d * d).sum(-1)


def detail_energy(hr: np.ndarray, mask: np.ndarray, k: int = 10) -> float:
    """Mean of :func:`detail_map` over `mask`."""
    return float(detail_map(hr, k)[mask].mean()) if mask.any() else 0.0


def classify(purity: float, marks: float, shares_material: bool) -> str:
    if purity < PURE_MIN:
        return "HR-only (small)"
    if shares_material and marks >= MARK_MIN:
        return "HR-only (markings)"
    return "LR-visible"


def material_twins() -> set[int]:
    """Concept ids whose default surface material another concept also has (tell-apart needs more
    than colour)."""
    from gl10m.testbed.classes import CLASS_MATERIAL, CONCEPT_NAMES
    mats = [CLASS_MATERIAL[i] for i in range(len(CONCEPT_NAMES))]
    return {i for i, m in enumerate(mats) if mats.count(m) > 1}


def measure(n: int, seed: int, profile=None) -> list[dict]:
    """Render the first `n` scenes of world (n, seed) in-process and measure every concept."""
    from gl10m import profile as prof_mod
    from gl10m.testbed import scenes as S
    from gl10m.testbed.classes import CONCEPT_NAMES

    profile = profile or prof_mod.load()
    nc = len(CONCEPT_NAMES)
    px, pure, marked, scenes = (np.zeros(nc, np.int64) for _ in range(4))
    e_hr = np.zeros(nc)
    for plan in S.plan_world(n, seed, profile):
        region = S.layout(plan, profile)
        r = S.render_scene(plan, region, profile, keep_truth=True)
        t = r.truth.ravel()
        cnt = np.bincount(t, minlength=256)[:nc]
        px += cnt
        scenes += cnt > 0
        marked += np.bincount(t[r.marks.ravel() > 0], minlength=256)[:nc]
        e_hr += np.bincount(t, weights=detail_map(r.hr).ravel(), minlength=256)[:nc]
        for c in np.flatnonzero(cnt):
            pure[c] += lr_purity(r.truth, int(c))[1]
    twins = material_twins()
    rows = []
    for c in range(nc):
        pu = pure[c] / px[c] if px[c] else 0.0
        ms = marked[c] / px[c] if px[c] else 0.0
        rows.append({"id": c, "concept": CONCEPT_NAMES[c], "scenes": int(scenes[c]), "pixels": int(px[c]),
                     "lr_purity": round(float(pu), 3), "mark_share": round(float(ms), 3),
                     "detail_energy": round(float(e_hr[c] / px[c]) if px[c] else 0.0, 1),
                     "class": classify(pu, ms, c in twins) if px[c] else "not seen"})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| id | concept | scenes | LR purity | marked | detail energy | class |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['id']} | {r['concept']} | {r['scenes']} | {r['lr_purity']:.2f} | {r['mark_share']:.2f} "
                   f"| {r['detail_energy']:.0f} | {r['class']} |")
    return "\n".join(out)


if __name__ == "__main__":  # python -m gl10m.testbed.visibility [N] [SEED]
    import sys
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 77
    print(markdown(measure(n, seed)))
