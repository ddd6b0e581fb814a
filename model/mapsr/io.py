"""MapSR inputs and outputs: GeoTIFFs, class maps, gl10m samples, testbed scenes.

See :mod:`gl10m.model.mapsr.model` for the method. Here:

* :class:`ClassMap` (YAML/dict): coarse raster values -> base classes, with ``ignore`` values;
* :func:`read_image` (GeoTIFF -> uint8 RGB + rasterio profile), :func:`coarse_on_grid` (a coarse
  land-cover GeoTIFF on any grid/CRS -> class indices on the image grid, nearest resampling),
  :func:`write_map` (class indices -> uint8 GeoTIFF with the image's CRS/transform, atomic);
* :func:`sample_scene` (a decoded gl10m sample -> mosaic + per-tile dominant concept);
* :func:`testbed_scene` (a window of a generated testbed world, rendered like NAIP, with its 1 m
  truth grouped into :data:`TESTBED_BASE` classes and a majority-pooled coarse map).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gl10m.model.mapsr.model import IGNORE, NODATA_OUT, MapSRError, majority_pool, upsample_coarse


# ---------------------------------------------------------------------------------------------
# Class maps
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassMap:
    """``classes``: base class names (output code ``i + 1`` for ``classes[i]``, 0 = no data);
    ``mapping``: coarse value -> class name; ``ignore``: coarse values meaning "no label"."""

    classes: list[str]
    mapping: dict[int, str]
    ignore: set[int]

    @classmethod
    def from_dict(cls, d: dict, source: str = "class map") -> "ClassMap":
        if not isinstance(d, dict):
            raise MapSRError(f"{source}: expected a mapping with classes: and map:")
        bad = sorted(set(d) - {"classes", "map", "ignore"})
        if bad:
            raise MapSRError(f"{source}: unknown key {bad[0]!r} (known: classes, map, ignore)")
        classes = d.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise MapSRError(f"{source}: classes must be a non-empty list of names")
        if len(set(classes)) != len(classes):
            raise MapSRError(f"{source}: classes has duplicates")
        if len(classes) > 254:
            raise MapSRError(f"{source}: at most 254 classes (uint8 output)")
        raw = d.get("map")
        if not isinstance(raw, dict) or not raw:
            raise MapSRError(f"{source}: map must be a mapping of coarse value -> class name")
        mapping = {}
        for k, v in raw.items():
            try:
                key = int(k)
            except (TypeError, ValueError):
                raise MapSRError(f"{source}: map key {k!r} is not an integer raster value") from None
            if v not in classes:
                raise MapSRError(f"{source}: map {key}: unknown class {v!r} (classes: {', '.join(classes)})")
            mapping[key] = v
        ign = d.get("ignore") or []
        try:
            ignore = {int(v) for v in ign}
        except (TypeError, ValueError):
            raise MapSRError(f"{source}: ignore must be a list of integer raster values") from None
        both = sorted(ignore & set(mapping))
        if both:
            raise MapSRError(f"{source}: value {both[0]} is both mapped and ignored")
        return cls(list(classes), mapping, ignore)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassMap":
        from gl10m import safeyaml

        p = Path(path)
        if not p.is_file():
            raise MapSRError(f"class map {p}: no such file")
        return cls.from_dict(safeyaml.read_mapping(p, "class map", MapSRError), f"class map {p.name}")

    def to_dict(self) -> dict:
        return {"classes": self.classes, "map": {int(k): v for k, v in sorted(self.mapping.items())},
                "ignore": sorted(self.ignore)}

    def apply(self, values: np.ndarray, nodata: float | None = None) -> np.ndarray:
        """Coarse raster values -> int16 class indices (``-1`` for ignored values and ``nodata``).
        A value neither mapped nor ignored is an error."""
        v = np.asarray(values)
        out = np.full(v.shape, IGNORE, np.int16)
        seen = np.unique(v)
        idx = {c: i for i, c in enumerate(self.classes)}
        unknown = [x for x in seen.tolist() if int(x) not in self.mapping and int(x) not in self.ignore
                   and not (nodata is not None and x == nodata)]
        if unknown:
            raise MapSRError(f"coarse value {unknown[0]} is not in the class map (add it to map: or ignore:); "
                             f"unmapped values: {', '.join(str(u) for u in unknown[:8])}")
        for val, name in self.mapping.items():
            out[v == val] = idx[name]
        return out


# ---------------------------------------------------------------------------------------------
# GeoTIFFs
# ---------------------------------------------------------------------------------------------
def _open(path, what: str):
    import rasterio

    p = Path(path)
    if not p.is_file():
        raise MapSRError(f"{what} {p}: no such file")
    try:
        return rasterio.open(p)
    except rasterio.errors.RasterioIOError as e:
        raise MapSRError(f"{what} {p}: not a readable raster ({str(e).splitlines()[0]})") from None


def stretch_uint8(a: np.ndarray, nodata=None) -> np.ndarray:
    """Per-band 2-98 % linear stretch to uint8 (for non-uint8 imagery)."""
    out = np.empty(a.shape, np.uint8)
    for b in range(a.shape[0]):
        x = a[b].astype(np.float64)
        valid = np.isfinite(x) & ((x != nodata) if nodata is not None else True)
        lo, hi = (np.percentile(x[valid], [2, 98]) if valid.any() else (0.0, 1.0))
        out[b] = np.clip((x - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    return out


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """An image GeoTIFF -> (uint8 [3, H, W] RGB, rasterio profile). First three bands (a single
    band is repeated); non-uint8 data stretched (:func:`stretch_uint8`). Needs a CRS."""
    with _open(path, "image") as src:
        if src.crs is None:
            raise MapSRError(f"image {path}: has no CRS (georeference it first)")
        n = min(3, src.count)
        a = src.read(list(range(1, n + 1)))
        prof = src.profile.copy()
    if n < 3:
        a = np.repeat(a[:1], 3, 0)
    if a.dtype != np.uint8:
        a = stretch_uint8(a, prof.get("nodata"))
    return np.ascontiguousarray(a), prof


def coarse_on_grid(path: str | os.PathLike, image_profile: dict, class_map: ClassMap) -> np.ndarray:
    """A coarse land-cover GeoTIFF (any grid and CRS) -> int16 class indices ``[H, W]`` on the
    image grid (``-1`` = unlabelled). Values are mapped first, on the coarse grid, then the class
    indices are reprojected with nearest resampling (a coarse map is categorical). Errors: no CRS,
    no overlap with the image, values not in the class map."""
    import rasterio
    from rasterio.warp import Resampling, reproject, transform_bounds

    with _open(path, "coarse map") as src:
        if src.crs is None:
            raise MapSRError(f"coarse map {path}: has no CRS")
        vals = src.read(1)
        nodata = src.nodata
        crs, tr = src.crs, src.transform
        b = transform_bounds(crs, image_profile["crs"], *src.bounds)
    H, W = image_profile["height"], image_profile["width"]
    it = image_profile["transform"]
    ib = (it.c, it.f + H * it.e, it.c + W * it.a, it.f)
    if b[0] >= ib[2] or b[2] <= ib[0] or b[1] >= ib[3] or b[3] <= ib[1]:
        raise MapSRError(f"coarse map {path} does not overlap the image (after reprojecting to {image_profile['crs']})")
    idx = class_map.apply(vals, nodata)
    out = np.full((H, W), IGNORE, np.int16)
    reproject(idx, out, src_transform=tr, src_crs=crs, dst_transform=it, dst_crs=image_profile["crs"],
              resampling=Resampling.nearest, src_nodata=IGNORE, dst_nodata=IGNORE)
    return out


def write_map(path: str | os.PathLike, classes_idx: np.ndarray, profile: dict | None, class_names: Sequence[str],
              extra_tags: dict | None = None) -> Path:
    """Class indices ``[H, W]`` (``-1``/negative = no data) -> uint8 GeoTIFF, code ``i + 1`` for
    class ``i``, 0 = no data, with ``profile``'s CRS and transform (None: not georeferenced);
    tags ``classes`` (``1=name,...``). Written atomically (gl10m.io.atomic_path)."""
    import rasterio

    from gl10m.io import atomic_path

    a = np.asarray(classes_idx).astype(np.int32)
    out = np.where(a >= 0, a + 1, NODATA_OUT).astype(np.uint8)
    H, W = out.shape
    prof = {"driver": "GTiff", "height": H, "width": W, "count": 1, "dtype": "uint8", "nodata": NODATA_OUT,
            "compress": "deflate"}
    if profile is not None:
        if (profile.get("height"), profile.get("width")) != (H, W):
            raise MapSRError(f"map {H}x{W} does not match the image {profile.get('height')}x{profile.get('width')}")
        prof.update(crs=profile.get("crs"), transform=profile.get("transform"))
    p = Path(path)
    with atomic_path(p, suffix=".tif") as tmp:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **prof) as dst:
                dst.write(out, 1)
                dst.update_tags(classes=",".join(f"{i + 1}={n}" for i, n in enumerate(class_names)),
                                **{k: str(v) for k, v in (extra_tags or {}).items()})
    return p


def read_truth(path: str | os.PathLike, image_profile: dict, class_map: ClassMap) -> np.ndarray:
    """An HR reference map GeoTIFF -> class indices on the image grid (as :func:`coarse_on_grid`)."""
    return coarse_on_grid(path, image_profile, class_map)


# ---------------------------------------------------------------------------------------------
# gl10m samples
# ---------------------------------------------------------------------------------------------
N_GRID = 10


def sample_scene(sample: dict, min_frac: float = 0.0, coarse: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A decoded gl10m sample (``gl10m.data.load(..., tiles="all")``) -> (mosaic uint8 [3, 10*T,
    10*T], coarse labels int16 [10*T, 10*T]). The coarse map is each tile's dominant concept
    (argmax of ``tile_frac``; ``-1`` where the top fraction is ``<= min_frac``) unless ``coarse``
    (any ``[h, w]`` grid of concept ids, ``-1`` unlabelled) is given; it is upsampled nearest."""
    hr = np.asarray(sample["hr"])
    tiles = np.asarray(sample.get("tiles", np.arange(len(hr))))
    if len(hr) != N_GRID * N_GRID or not np.array_equal(np.sort(tiles), np.arange(N_GRID * N_GRID)):
        raise MapSRError(f"sample {sample.get('key')}: needs all 100 HR tiles (load with tiles='all')")
    t = hr.shape[-1]
    mosaic = np.zeros((3, N_GRID * t, N_GRID * t), np.uint8)
    for k, i in enumerate(tiles.tolist()):
        r, c = divmod(i, N_GRID)
        mosaic[:, r * t:(r + 1) * t, c * t:(c + 1) * t] = hr[k][:3]
    if coarse is None:
        frac = np.asarray(sample["tile_frac"], np.float32)
        order = np.argsort(tiles)
        frac = frac[order]
        dom = frac.argmax(1).astype(np.int16)
        dom[frac.max(1) <= min_frac] = IGNORE
        coarse = dom.reshape(N_GRID, N_GRID)
    return mosaic, upsample_coarse(np.asarray(coarse, np.int16), mosaic.shape[1:]).astype(np.int16)


def sample_profile(sample: dict, shape: tuple[int, int]) -> dict | None:
    """A rasterio profile (EPSG:4326, the footprint's bounds) for a sample's mosaic, when the meta
    has a footprint (gl10m's ``{"west", "south", "east", "north"}``, a GeoJSON polygon or a
    ``[w, s, e, n]`` list); approximate (the HR grid is UTM), for viewing in a GIS. None without one."""
    from rasterio.transform import from_bounds

    fp = (sample.get("meta") or {}).get("footprint")
    try:
        if isinstance(fp, dict) and all(k in fp for k in ("west", "south", "east", "north")):
            # what gl10m writes in meta.json (gl10m.fetch): {"west", "south", "east", "north"}
            pts = np.asarray([[fp["west"], fp["south"]], [fp["east"], fp["north"]]], float)
        elif isinstance(fp, dict) and "coordinates" in fp:
            pts = np.asarray(fp["coordinates"][0], float)
        elif isinstance(fp, (list, tuple)) and len(fp) == 4:
            pts = np.asarray([[fp[0], fp[1]], [fp[2], fp[3]]], float)
        else:
            return None
    except (TypeError, ValueError, IndexError):
        return None
    w, s = pts.min(0)
    e, n = pts.max(0)
    return {"crs": "EPSG:4326", "transform": from_bounds(w, s, e, n, shape[1], shape[0]), "height": shape[0],
            "width": shape[1]}


# ---------------------------------------------------------------------------------------------
# The offline testbed
# ---------------------------------------------------------------------------------------------
# Base classes of the testbed truth, by surface material (what the renderer paints), Chesapeake-like.
TESTBED_BASE: dict[str, tuple[str, ...]] = {
    "water": ("water", "sea", "pool", "marsh"),
    "tree_canopy": ("trees", "shrub"),
    "low_vegetation": ("grass", "lawn", "dry_grass", "crop", "turf"),
    "barren": ("sand", "desert", "soil", "rock", "gravel"),
    "impervious": ("asphalt", "concrete", "roof", "roof_metal", "court", "solar", "track"),
}


def material_to_base() -> np.ndarray:
    """uint8 LUT material id -> base class index (255 = none)."""
    from gl10m.testbed.classes import MATERIALS

    lut = np.full(256, 255, np.uint8)
    for i, (_, mats) in enumerate(TESTBED_BASE.items()):
        for m in mats:
            lut[MATERIALS.index(m)] = i
    return lut


@dataclass
class TestbedScene:
    image: np.ndarray   # uint8 [3, S, S] NAIP-like RGB
    truth: np.ndarray   # int16 [S, S] base class per 1 m pixel (-1 outside the region)
    coarse: np.ndarray  # int16 [S, S] majority base class per cell, upsampled (-1 unlabelled)
    coarse_grid: np.ndarray  # int16 [S/cell, S/cell]
    classes: list[str]
    crs: str
    transform: Any
    region: str

    __test__ = False  # not a pytest class

    @property
    def profile(self) -> dict:
        return {"crs": self.crs, "transform": self.transform, "height": self.image.shape[1],
                "width": self.image.shape[2]}


def testbed_scene(spec: Any = None, region: str = "CA", size: int = 256, cell: int = 32,
                  offset: tuple[int, int] | None = None, seed: int | None = None, regions: list | None = None
                  ) -> TestbedScene:
    """Render a ``size`` x ``size`` m window (1 m) of a testbed region like NAIP, with its truth.

    ``spec``: a testbed spec (path, dict or TestbedSpec; default manifests/testbed.yaml) or pass the
    already generated ``regions`` (``gl10m.testbed.layout.generate``). ``offset``: (row, col) of the
    window in the region's 1 m truth grid (default: centred on the region). The image is the
    testbed's own NAIP rendering (``surface_reflectance`` + the first NAIP year's look, shadows,
    noise) of the truth window; the truth is grouped by material into :data:`TESTBED_BASE`; the
    coarse map is its majority over ``cell`` x ``cell`` cells (a 30 m NLCD-like map for cell=30,
    gl10m's tile grid for cell=268)."""
    from affine import Affine

    from gl10m.testbed import imagery as I
    from gl10m.testbed import classes as C, layout as L, raster as R, spec as SP

    if regions is None:
        if spec is None or isinstance(spec, (str, os.PathLike)):
            spec = SP.load_spec(spec)
        elif isinstance(spec, dict):
            spec = SP.spec_from_dict(spec)
        regions = L.generate(spec, seed)
        ispec = I.imagery_spec(spec.imagery)
        tb_seed = spec.seed if seed is None else int(seed)
    else:
        ispec = I.imagery_spec(getattr(spec, "imagery", None) if spec is not None else None)
        tb_seed = int(seed if seed is not None else getattr(spec, "seed", 0))
    by = {r.code: r for r in regions}
    if region not in by:
        raise MapSRError(f"testbed region {region!r} unknown (have {', '.join(sorted(by))})")
    r = by[region]
    crs, tr, shape = R.truth_grid(r, 1.0)
    if offset is None:
        offset = ((shape[0] - size) // 2, (shape[1] - size) // 2)
    r0, c0 = int(offset[0]), int(offset[1])
    if r0 < 0 or c0 < 0 or r0 + size > shape[0] or c0 + size > shape[1]:
        raise MapSRError(f"testbed window {size} px at {offset} leaves the region grid {shape}")
    tw = tr * Affine.translation(c0, r0)
    layers = R.rasterize_layers(r, f"EPSG:{crs}", tw, (size, size))
    tables = I.default_tables()
    key = I.key_of(layers["classes"], layers["material"], tables, int(r.base_cover))
    xs, ys = I.pixel_centres(tw, (size, size))
    refl = I.surface_reflectance(key, layers["marks"], xs, ys, tables, I.subseed(tb_seed, "texture"))
    year = ispec.years_for(region)[0]
    lat = (r.bbox[1] + r.bbox[3]) / 2
    look = I.year_look(tb_seed, region, year, lat)
    shadow = I.shadow_mask(key, tables, look, 1.0)
    dn = I.naip_dn(refl, tables.veg[key], shadow, look, I.rng_for(tb_seed, "mapsr", region, r0, c0),
                   ispec.naip_noise_dn)
    mat = np.where(layers["material"] == 0, tables.class_material[np.where(layers["classes"] == C.NODATA,
                                                                          r.base_cover, layers["classes"])],
                   layers["material"])
    base = material_to_base()[mat].astype(np.int16)
    base[(base == 255) | (layers["classes"] == C.NODATA)] = IGNORE
    classes = list(TESTBED_BASE)
    grid = majority_pool(base, cell, len(classes)).astype(np.int16)
    coarse = upsample_coarse(grid, (size, size)).astype(np.int16)
    return TestbedScene(np.ascontiguousarray(dn[:3]), base, coarse, grid, classes, f"EPSG:{crs}", tw, region)
