"""The fetch step: one plan row (one scene) -> one staged sample, or a typed rejection.

``fetch_scene(row, profile, workdir, provider)`` is the one path for every provider: the provider
reads the pixels (``provider.read_lr`` / ``provider.read_hr``, :mod:`gl10m.sources.base`: COG
windows for STAC, :mod:`gl10m.sources.cog`; ``computePixels`` for Earth Engine,
:mod:`gl10m.sources.earthengine`), and :func:`assemble` checks them (:mod:`gl10m.qc`), cuts the
HR tiles, writes the metadata and the staged sample (:mod:`gl10m.samples`) with its full
provenance.

Outcomes:

* ``ok``: the sample is at ``W/staged/{split}/{key}/`` (``FetchOutcome.path``);
* ``rejected`` with a reason (deterministic; the ledger records ``rejected:<reason>``):
  ``asset_missing`` (HTTP 404/410 or a missing file), ``asset_corrupt`` (unreadable or
  truncated COG: the same read failure twice; a NAIP image without R, G, B bands; a raster
  without CRS or geotransform, or whose CRS contradicts the item's ``proj:epsg``), ``s2_masked`` (no usable S2
  item, or an LR black ratio >= ``qc.max_black_ratio``; pixels without any valid observation
  after SCL masking are black), ``hr_black`` (HR tiles at or above that ratio, listed in the
  detail), ``naip_gap`` (no quarter-quad covers any of the footprint; pixels a partial mosaic leaves
  uncovered stay black and the black-pixel QC decides, as in GL-10M);
* an exception for transient trouble (HTTP 429/5xx, timeouts, refused connections after the
  retries; a 403 that survives re-signing): the pipeline records ``failed:<error>`` and a
  later run tries again.

The LR image is read and checked first: a scene rejected on its Sentinel-2 side costs no NAIP
read. Every read of a scene retries transient errors within one time budget
(:data:`UNIT_BUDGET_S`, :func:`gl10m.sources.retry.unit_budget`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from gl10m import __version__, compose, qc, samples
from gl10m.geometry import georef_meta
from gl10m.sources.base import (ASSET_CORRUPT, ASSET_MISSING, HR_BLACK, NAIP_GAP, REASONS, S2_MASKED,  # noqa: F401
                                AccessDenied, HRImage, LRImage, ReadContext, Rejection, Timings, redact)
from gl10m.sources.cog import DEFAULT_RETRY, S2_RGB, UNIT_BUDGET_S, CogReader, identity, read_asset  # noqa: F401
from gl10m.sources.retry import unit_budget

OK, REJECTED = "ok", "rejected"
__all__ = ["ASSET_CORRUPT", "ASSET_MISSING", "HR_BLACK", "NAIP_GAP", "REASONS", "S2_MASKED", "OK", "REJECTED",
           "AccessDenied", "Rejection", "FetchOutcome", "DEFAULT_RETRY", "UNIT_BUDGET_S", "identity", "read_asset",
           "parse_row", "row_bounds", "check_lr", "check_hr", "build_meta", "assemble", "fetch_scene", "stage_sample",
           "redact"]
ROW_FIELDS = ("key", "scene_id", "state", "split", "west", "south", "east", "north", "concepts",
              "tile_idx", "tile_concept", "tile_frac", "naip_year", "naip_date", "naip_items",
              "s2_window", "s2_start", "s2_end", "s2_items")


@dataclass(frozen=True)
class FetchOutcome:
    status: str                      # "ok" | "rejected"
    reason: str | None = None        # one of REASONS when rejected
    detail: dict = field(default_factory=dict)
    path: Path | None = None         # the staged sample folder when ok

    @property
    def label(self) -> str:
        return self.status if not self.reason else f"{self.status}:{self.reason}"


# ---------------------------------------------------------------------------------------------
# The plan row
# ---------------------------------------------------------------------------------------------
def _json_list(v: Any, what: str) -> list:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan row {what} is not valid JSON ({e})") from None
    if not isinstance(v, list):
        raise ValueError(f"plan row {what} must be a JSON list")
    return v


def parse_row(row: Mapping) -> dict:
    """A plan row checked (every field present, a valid key) with ``s2_items`` and
    ``naip_items`` as lists (the plan stores them as JSON). Raises ValueError."""
    missing = [k for k in ROW_FIELDS if k not in row]
    if missing:
        raise ValueError(f"plan row {row.get('key', '?')} lacks field(s) {', '.join(missing)}")
    samples.check_key(str(row["key"]))
    return {**row, "s2_items": _json_list(row["s2_items"], "s2_items"),
            "naip_items": _json_list(row["naip_items"], "naip_items")}


def row_bounds(row: Mapping) -> tuple[float, float, float, float]:
    return (float(row["west"]), float(row["south"]), float(row["east"]), float(row["north"]))


# ---------------------------------------------------------------------------------------------
# QC (the same for every provider)
# ---------------------------------------------------------------------------------------------
def check_lr(rgb: np.ndarray, count: np.ndarray, n_dates: int, profile, info: dict) -> np.ndarray:
    """The LR QC shared by every provider: composite statistics and the black-pixel ratio into
    `info`; an ``s2_masked`` rejection at or above ``qc.max_black_ratio``. As in GL-10M (a masked
    median), LR pixels without any valid observation are black (0) and this check decides; a fully
    masked footprint fails it."""
    info["composite"] = qc.composite_stats(count, n_dates)
    info["black_ratio"] = round(qc.black_ratio(rgb, profile.qc.black_level), 6)
    if info["black_ratio"] >= profile.qc.max_black_ratio:
        raise Rejection(S2_MASKED, f"LR black ratio {info['black_ratio']:.3f} >= {profile.qc.max_black_ratio}", **info)
    return rgb


def check_hr(mosaic: np.ndarray, covered: np.ndarray, profile, info: dict, *,
             timings: Timings | None = None) -> np.ndarray:
    """The HR QC shared by every provider: the HR mosaic [H, W, 3] and its coverage -> tiles, with
    ``uncovered`` and the per-tile black ratios in `info`; ``naip_gap`` when nothing covers the
    footprint, ``hr_black`` for tiles at or above ``qc.max_black_ratio``. As in GL-10M, pixels no
    image covers stay black (0) and the black-pixel QC decides: a tile with too many of them fails
    as hr_black; a sliver along an edge does not."""
    gap = 1.0 - np.count_nonzero(covered) / covered.size
    info["uncovered"] = round(gap, 6)
    if gap >= 1.0:
        raise Rejection(NAIP_GAP, "no NAIP image covers any of the HR footprint", **info)
    t = timings if timings is not None else Timings()
    with t("tiling"):
        tiles = compose.cut_tiles(mosaic, profile.geometry.grid)
    with t("qc"):
        ratios = qc.black_ratios(tiles, profile.qc.black_level)
    info["black_ratios"] = [round(float(r), 4) for r in ratios]
    info["black_ratio_max"] = round(float(ratios.max()), 6)
    bad = qc.failing_tiles(ratios, profile.qc.max_black_ratio)
    if bad:
        raise Rejection(HR_BLACK, f"{len(bad)} HR tile(s) with black ratio >= {profile.qc.max_black_ratio}",
                        tiles=bad, **info)
    return tiles


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def build_meta(row: Mapping, profile, lr_grid: compose.Grid, hr_grid: compose.Grid, lr: dict, hr: dict) -> dict:
    s2p = profile.imagery.s2
    g = profile.geometry
    concepts = sorted({int(c) for c in row["concepts"]})
    lr_m, hr_m = compose.ground_px_m(lr_grid), compose.ground_px_m(hr_grid)
    return {
        "key": str(row["key"]), "scene_id": str(row["scene_id"]), "state": str(row["state"]),
        "split": str(row["split"]),
        "footprint": {"west": float(row["west"]), "south": float(row["south"]),
                      "east": float(row["east"]), "north": float(row["north"])},
        "crs": "EPSG:4326",
        "lr": {"width": lr_grid.width, "height": lr_grid.height, "px_deg": list(lr_grid.px_deg),
               "px_m_x": round(lr_m[0], 4), "px_m_y": round(lr_m[1], 4), "bands": list(S2_RGB)},
        "hr": {"width": hr_grid.width, "height": hr_grid.height, "px_deg": list(hr_grid.px_deg),
               "px_m_x": round(hr_m[0], 4), "px_m_y": round(hr_m[1], 4), "bands": ["R", "G", "B"],
               "grid": g.grid, "tile_px": g.tile_px,
               "tile_index": "row*grid + col, row 0 = north, col 0 = west"},
        "georef": georef_meta(lr_grid, hr_grid, g.grid),
        "concepts": [profile.concepts[c].name for c in concepts],
        "concept_ids": concepts,
        "naip": {"year": int(row["naip_year"]), "date": str(row["naip_date"]), "items": hr["items"],
                 "resampling": "bilinear", "mosaic": "newest first, first valid pixel wins"},
        "s2": {"window": str(row["s2_window"]), "start": str(row["s2_start"]), "end": str(row["s2_end"]),
               "items": lr["items"], "excluded": lr["excluded"],
               "harmonisation": {"enabled": bool(s2p.harmonize), "offset": int(s2p.offset),
                                 "offset_baseline": s2p.offset_baseline, "scale": compose.S2_SCALE,
                                 "rule": "subtract offset when processing baseline >= offset_baseline (item metadata)"},
               "scl_mask": list(s2p.scl_mask), "composite": "per-pixel median of unmasked dates",
               "resampling": {"reflectance": "bilinear", "scl": "nearest"},
               "stretch": list(s2p.stretch)},
        "qc": {"black_level": profile.qc.black_level, "max_black_ratio": profile.qc.max_black_ratio,
               "lr_black_ratio": lr["black_ratio"], "s2_composite": lr["composite"],
               "hr_black_ratio_max": hr["black_ratio_max"], "hr_black_ratios": hr["black_ratios"]},
        "provider": str(row.get("provider") or profile.provider.name),
        "plan_hash": str(row.get("plan_hash") or ""),
        "profile": {"name": profile.name, "version": profile.version, "hash": profile.hash()},
        "builder": {"name": "gl10m", "version": __version__},
    }


def assemble(row: Mapping, profile, lr: LRImage | Callable[[], LRImage], hr: HRImage | Callable[[], HRImage],
             out_root: str | Path, *, timings: Timings | None = None) -> FetchOutcome:
    """QC, tiles, metadata and the staged sample of a parsed plan row from a provider's LR and HR
    reads: ``ok`` (the sample written) or ``rejected:<reason>``; the same for every provider.

    `lr` and `hr` are the reads or functions that read them (called in that order, `hr` only
    once the LR image has passed its QC). A :class:`Rejection` raised by either becomes the
    outcome; anything else propagates (transient trouble)."""
    t = timings if timings is not None else Timings()
    try:
        if not row["s2_items"]:
            raise Rejection(S2_MASKED, "no usable Sentinel-2 item", items=[], excluded=[])
        lr = lr() if callable(lr) else lr
        with t("qc"):
            check_lr(lr.rgb, lr.count, lr.n_dates, profile, lr.info)
        if not row["naip_items"]:
            raise Rejection(NAIP_GAP, "no NAIP item in the plan row", uncovered=1.0)
        hr = hr() if callable(hr) else hr
        tiles = check_hr(hr.rgb, hr.covered, profile, hr.info, timings=t)  # times "tiling" and "qc"
    except Rejection as r:
        return FetchOutcome(REJECTED, r.reason, _clean(r.detail))
    bounds = row_bounds(row)
    meta = build_meta(row, profile, compose.lr_grid(bounds, profile), compose.hr_grid(bounds, profile),
                      lr.info, hr.info)
    for extra in (lr.meta, hr.meta):
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(meta.get(k), dict):
                meta[k].update(v)
            else:
                meta[k] = v
    bands, lr_x, hr_x = profile.imagery.bands, None, None
    if bands != "rgb":  # the extra members (gl10m/samples.py: EXTRA), cut like the RGB tiles
        if lr.extra is None or hr.extra is None:
            raise ValueError(f"imagery.bands {bands}: the provider delivered no extra bands")
        sel = samples.extra_channels(bands)
        lr_x = np.ascontiguousarray(lr.extra[..., sel])
        hr_x = compose.cut_tiles(hr.extra[..., sel], profile.geometry.grid)
        meta["bands"] = samples.extra_meta(bands)
    return stage_sample(row, profile, out_root, lr.rgb, tiles, meta, lr.info, hr.info, timings=timings,
                        bands=bands, lr_extra=lr_x, hr_extra=hr_x)


def fetch_scene(row: Mapping, profile, out_root: str | Path, provider: Any = None, *,
                sign: Callable[[str], str] = identity, resign: Callable[[str], str] | None = None,
                limiter: Any = None, gdal_env: Mapping[str, Any] | None = None,
                retry_opts: Mapping[str, Any] | None = None, timings: Timings | None = None) -> FetchOutcome:
    """Fetch, compose, check and stage one scene (see the module docstring).

    `provider` reads the pixels (``read_lr`` / ``read_hr``); None reads the row's COG hrefs
    directly (:class:`gl10m.sources.cog.CogReader` with `sign` / `resign`). `out_root` is the work
    dir W (the sample goes to ``W/staged/{split}/{key}/``). `limiter` caps concurrent requests;
    `gdal_env` overrides GDAL options; `retry_opts` overrides ``attempts``/``base_delay``/
    ``max_delay``/``budget`` (default: every read of the scene retries transient errors within
    one :class:`~gl10m.sources.retry.Budget` of UNIT_BUDGET_S seconds, or
    ``$GL10M_RETRY_BUDGET_S``). `timings` collects the seconds per part (the bench).
    Raises ValueError for a malformed row, TransientError / AccessDenied for transient trouble.
    """
    ctx = ReadContext(limiter=limiter, gdal_env=gdal_env, timings=timings,
                      retry_opts={"budget": unit_budget(UNIT_BUDGET_S), **(retry_opts or {})})
    row = parse_row(row)
    bounds = row_bounds(row)
    lrg, hrg = compose.lr_grid(bounds, profile), compose.hr_grid(bounds, profile)
    reader = provider if provider is not None else CogReader(sign, resign)
    return assemble(row, profile, lambda: reader.read_lr(row, lrg, profile, ctx),
                    lambda: reader.read_hr(row, hrg, profile, ctx), out_root, timings=timings)


def stage_sample(row: Mapping, profile, out_root: str | Path, lr_rgb: np.ndarray, tiles: np.ndarray, meta: dict,
                 lr_info: dict, hr_info: dict, *, timings: Timings | None = None, bands: str = "rgb",
                 lr_extra: np.ndarray | None = None, hr_extra: np.ndarray | None = None) -> FetchOutcome:
    """Write the checked LR image and HR tiles of a plan row (and their extra bands) as its staged
    sample -> ``ok``."""
    n = profile.n_concepts
    sample = samples.Sample(
        key=str(row["key"]), split=str(row["split"]), lr=lr_rgb, hr=tiles,
        labels=samples.labels_from_concepts(row["concepts"], n),
        tile_frac=samples.dense_tile_frac(list(row["tile_idx"]), list(row["tile_concept"]), list(row["tile_frac"]),
                                          n, profile.geometry.grid ** 2),
        meta=meta, bands=bands, lr_extra=lr_extra, hr_extra=hr_extra)
    if timings is None:
        path = samples.write_staged(out_root, sample)
    else:  # the bench: encoding and writing timed apart
        with timings("encode"):
            fields = samples.encode_sample(sample)
        with timings("staging writes"):
            path = samples.write_staged(out_root, sample, fields=fields)
    detail = {"lr_black_ratio": lr_info["black_ratio"], "hr_black_ratio_max": hr_info["black_ratio_max"],
              "s2_items": len(lr_info["items"]), "s2_excluded": len(lr_info["excluded"]),
              "naip_items": len(hr_info["items"]), "s2_min_obs": lr_info["composite"]["min_obs"]}
    return FetchOutcome(OK, None, detail, path)


def _clean(detail: dict) -> dict:
    """JSON-safe detail without signed URLs."""
    return json.loads(redact(json.dumps(detail, default=str)))
