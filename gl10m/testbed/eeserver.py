"""A local stand-in for the Earth Engine REST API, answering the real earthengine-api client from a
testbed world.

Earth Engine cannot be reached here, so the ``earthengine`` provider is exercised against this
server: ``ee.Initialize(credentials=None, url=server.url, project=...)`` sends every call to it.
It serves the discovery document and the algorithm list that ship with earthengine-api
(``ee/tests``), evaluates the serialized expression graphs of ``value:compute`` and
``image:computePixels`` with a small interpreter over the world's rasters, answers pixels as NPY
(structured arrays, one field per band, masked pixels 0, like Earth Engine) and **records every
request body** (:attr:`EEStandIn.requests`) so tests can assert the expressions the client built.

The world's STAC items become two image collections:

* ``COPERNICUS/S2_SR_HARMONIZED``: bands ``B2 B3 B4 B8`` (the +1000 offset of processing baselines
  >= 04.00 removed, as Earth Engine's harmonised collection does) and ``SCL``; properties
  ``CLOUDY_PIXEL_PERCENTAGE``, ``MGRS_TILE``, ``PROCESSING_BASELINE`` (``05.09``), ``PRODUCT_ID``,
  ``SENSING_ORBIT_NUMBER``, ``SPACECRAFT_NAME``, ``system:time_start``, ``system:footprint``
  (a LinearRing, as Earth Engine answers); ``system:index`` is the STAC item id.
* ``USDA/NAIP/DOQQ``: bands ``R G B N``; ``system:index`` the STAC item id (no state property:
  Earth Engine's NAIP has none).

Only the functions the provider uses are implemented (:data:`FUNCTIONS`); anything else is a 400
naming the function, so a change in the client's expressions fails loudly. Pixels are sampled
from the COGs at the requested grid's pixel centres (``nearest`` unless ``Image.resample`` said
``bilinear``), each pixel from its own centre only, so a grid split into blocks gives exactly the
whole grid's pixels; source nodata (0) is masked. A missing asset file answers Earth Engine's
"not found" error, an unreadable one "is corrupt" (the testbed's deliberate faults).
"""
from __future__ import annotations

import datetime as dt
import io
import json
import re
import threading
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gl10m.errors import UserError

S2_ID = "COPERNICUS/S2_SR_HARMONIZED"
NAIP_ID = "USDA/NAIP/DOQQ"
S2_BAND_FILES = {"B2": "B02", "B3": "B03", "B4": "B04", "B8": "B08", "SCL": "SCL"}
NAIP_BANDS = ("R", "G", "B", "N")


class EEStandInError(Exception):
    """An expression the stand-in cannot evaluate: answered as HTTP 400 with the message."""


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
@dataclass
class Grid:
    width: int
    height: int
    transform: tuple  # affine (a, b, c, d, e, f) in EPSG:4326
    crs: str = "EPSG:4326"

    @classmethod
    def from_request(cls, g: dict) -> "Grid":
        try:
            dims, at = g["dimensions"], g["affineTransform"]
            t = (float(at.get("scaleX", 0)), float(at.get("shearX", 0)), float(at.get("translateX", 0)),
                 float(at.get("shearY", 0)), float(at.get("scaleY", 0)), float(at.get("translateY", 0)))
            return cls(int(dims["width"]), int(dims["height"]), t, str(g.get("crsCode") or "EPSG:4326"))
        except (KeyError, TypeError, ValueError) as e:
            raise EEStandInError(f"computePixels: bad grid ({e})") from None


@dataclass
class Img:
    """A lazy image: band names, dtypes, and render(grid) -> ({band: float64 [H, W]}, {band: mask})."""
    bands: list[str]
    dtypes: dict[str, str]
    render: Callable[[Grid], tuple[dict, dict]]
    props: dict = field(default_factory=dict)
    footprint: Any = None
    assets: tuple | None = None  # ({band: _Asset}, resampling) for an image read straight from files


def _const(v: float) -> Img:
    def render(g):
        return ({"constant": np.full((g.height, g.width), float(v))},
                {"constant": np.ones((g.height, g.width), bool)})
    return Img(["constant"], {"constant": "float64"}, render)


def _as_img(v) -> Img:
    return v if isinstance(v, Img) else _const(float(v))


def _derive(img: Img, bands, dtypes, fn) -> Img:
    def render(g):
        return fn(*img.render(g))
    return Img(list(bands), dict(dtypes), render, img.props, img.footprint)


def _binary(op) -> Callable:
    def f(image1, image2):
        a, b = _as_img(image1), _as_img(image2)
        n = max(len(a.bands), len(b.bands))
        names = a.bands if len(a.bands) == n else b.bands

        def render(g):
            va, ma = a.render(g)
            vb, mb = b.render(g)
            out, msk = {}, {}
            for i, name in enumerate(names):
                x = va[a.bands[min(i, len(a.bands) - 1)]]
                y = vb[b.bands[min(i, len(b.bands) - 1)]]
                out[name] = op(x, y).astype(np.float64)
                msk[name] = ma[a.bands[min(i, len(a.bands) - 1)]] & mb[b.bands[min(i, len(b.bands) - 1)]]
            return out, msk
        return Img(list(names), {n_: "uint8" for n_ in names}, render, a.props, a.footprint)
    return f


# ---------------------------------------------------------------------------------------------
# The catalog of a world
# ---------------------------------------------------------------------------------------------
def _ring(geom: dict) -> dict:
    coords = geom["coordinates"][0] if geom["type"] == "Polygon" else geom["coordinates"][0][0]
    return {"type": "LinearRing", "coordinates": coords}


def _ms(iso: str) -> int:
    t = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return int(t.timestamp() * 1000)


def _baseline_num(b: str | None) -> tuple[int, int] | None:
    m = re.match(r"^(\d{2})\.(\d{2})$", str(b or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


class _Asset:
    """One band of an image file."""

    def __init__(self, path: Path, band: int, offset: float = 0.0, dtype: str = "uint16"):
        self.path, self.band, self.offset, self.dtype = path, band, offset, dtype


def _read_bands(path: Path, indexes: list[int], g: Grid, resampling: str) -> np.ndarray:
    """Bands of one file sampled at the grid's pixel centres -> float64 [n, H, W] (0 = no data).

    Each output pixel is computed from its own centre only (transformed to the file's CRS, then
    nearest or bilinear over the valid neighbours, nodata 0 excluded), so a grid split into blocks
    gives exactly the pixels of the whole grid, as Earth Engine's tiled computation does."""
    import rasterio
    from pyproj import Transformer
    from rasterio.windows import Window

    if not path.exists():
        raise EEStandInError(f"Image.load: Image asset '{path.name}' not found (does not exist or "
                             "caller does not have access).")
    a, _, c, _, e, f = g.transform
    lon = c + a * (np.arange(g.width) + 0.5)
    lat = f + e * (np.arange(g.height) + 0.5)
    out = np.zeros((len(indexes), g.height, g.width))
    try:
        with rasterio.open(path) as src:
            tr = Transformer.from_crs(g.crs, src.crs, always_xy=True)
            xs, ys = tr.transform(*np.meshgrid(lon, lat))
            col, row = ~src.transform * (xs, ys)               # fractional pixel coordinates
            if resampling == "nearest":
                col, row = np.floor(col), np.floor(row)
            else:                                              # bilinear: pixel centres at +0.5
                col, row = col - 0.5, row - 0.5
            c0, r0 = int(max(0, np.floor(col.min()) - 1)), int(max(0, np.floor(row.min()) - 1))
            c1, r1 = int(min(src.width, np.floor(col.max()) + 3)), int(min(src.height, np.floor(row.max()) + 3))
            if c1 <= c0 or r1 <= r0:
                return out
            data = src.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float64)
    except rasterio.errors.RasterioError as err:
        raise EEStandInError(f"Image.load: Image asset '{path.name}' is corrupt ({str(err)[:80]})") from None
    h, w = data.shape[1:]
    x, y = (col - c0).ravel(), (row - r0).ravel()
    sel = np.flatnonzero((x > -1) & (x < w) & (y > -1) & (y < h))   # pixels this file can reach
    x, y = x[sel], y[sel]
    flat = out.reshape(len(indexes), -1)
    if resampling == "nearest":
        xi, yi = x.astype(np.int64), y.astype(np.int64)
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        xi, yi = np.clip(xi, 0, w - 1), np.clip(yi, 0, h - 1)
        for k in range(len(indexes)):
            flat[k, sel] = np.where(inside, data[k][yi, xi], 0.0)
        return out
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    corners = []
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        corners.append((np.clip(yi, 0, h - 1) * w + np.clip(xi, 0, w - 1), np.where(ok, wt, 0.0)))
    for k in range(len(indexes)):
        band = data[k].ravel()
        num = np.zeros(x.shape)
        den = np.zeros(x.shape)
        for idx, wt in corners:
            v = band[idx]
            wv = np.where(v != 0, wt, 0.0)
            num += wv * v
            den += wv
        with np.errstate(invalid="ignore", divide="ignore"):
            flat[k, sel] = np.where(den > 1e-9, num / den, 0.0)
    return out


def _asset_image(bands: dict[str, _Asset], props: dict, footprint, resampling: str = "nearest") -> Img:
    def render(g):
        vals, masks = {}, {}
        groups: dict[tuple, list[str]] = {}
        for name, a in bands.items():
            mode = resampling if name != "SCL" else "nearest"
            groups.setdefault((a.path, mode), []).append(name)
        for (path, mode), names in groups.items():
            arr = _read_bands(path, [bands[n].band for n in names], g, mode)
            for n, v in zip(names, arr):
                masks[n] = v != 0  # source nodata (0) and pixels outside the file stay 0
                off = bands[n].offset
                vals[n] = np.maximum(v - off, 0.0) if off else v
        return vals, masks
    return Img(list(bands), {k: a.dtype for k, a in bands.items()}, render, props, footprint, (bands, resampling))


def build_catalog(world: str | Path) -> dict[str, list[Img]]:
    """The world's STAC items as the stand-in's two image collections (sorted by id)."""
    from shapely.geometry import shape

    from gl10m.sources.stac import normalise_item
    from gl10m.testbed.serve import load_world_stac

    world = Path(world)
    _, items = load_world_stac(world)
    s2, naip = [], []
    for raw in sorted(items, key=lambda it: it["id"]):
        it = normalise_item(raw)
        p = raw.get("properties") or {}
        fp = shape(raw["geometry"])
        base = {"system:index": it["id"], "system:time_start": _ms(it["datetime"]),
                "system:footprint": _ring(raw["geometry"])}
        href = {k: world / v for k, v in (it["hrefs"] or {}).items() if v}
        if it["mgrs_tile"]:
            bl = _baseline_num(it["baseline"])
            off = 1000.0 if bl is not None and bl >= (4, 0) else 0.0
            product = str(p.get("s2:product_uri") or "").removesuffix(".SAFE")
            orbit = re.search(r"_R(\d{3})_", product)
            props = {**base, "CLOUDY_PIXEL_PERCENTAGE": it["cloud_cover"], "MGRS_TILE": it["mgrs_tile"],
                     "PROCESSING_BASELINE": it["baseline"], "PRODUCT_ID": product,
                     "SENSING_ORBIT_NUMBER": int(orbit.group(1)) if orbit else None,
                     "SPACECRAFT_NAME": p.get("platform")}
            bands = {ee_b: _Asset(href.get(f, world / "missing" / f), 1, off if ee_b != "SCL" else 0.0,
                                  "uint8" if ee_b == "SCL" else "uint16")
                     for ee_b, f in S2_BAND_FILES.items()}
            s2.append(_asset_image(bands, props, fp))
        elif "image" in href:
            bands = {b: _Asset(href["image"], i + 1, 0.0, "uint8") for i, b in enumerate(NAIP_BANDS)}
            naip.append(_asset_image(bands, base, fp))
    return {S2_ID: s2, NAIP_ID: naip}


# ---------------------------------------------------------------------------------------------
# The interpreter
# ---------------------------------------------------------------------------------------------
def _date_ms(v) -> int:
    if isinstance(v, (int, float)):
        return int(v)
    s = str(v)
    if len(s) == 10:
        s += "T00:00:00"
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


def _prop(el: Img, name: str):
    if name not in el.props:
        raise EEStandInError(f"Element.get: property '{name}' is missing")
    return el.props[name]


def _select(input, bandSelectors, newNames=None):
    img = input
    names = []
    for sel in bandSelectors:
        hit = [b for b in img.bands if b == sel] or [b for b in img.bands if re.fullmatch(str(sel), b)]
        if not hit:
            raise EEStandInError(f"Image.select: Pattern '{sel}' did not match any bands.")
        names.extend(h for h in hit if h not in names)
    new = list(newNames) if newNames else names
    if len(new) != len(names):
        raise EEStandInError("Image.select: newNames must match the selected bands")
    if img.assets is not None:  # an image read from files: read only the selected bands
        assets, mode = img.assets
        return _asset_image({n2: assets[n1] for n1, n2 in zip(names, new)}, img.props, img.footprint, mode)

    def fn(v, m):
        return {n2: v[n1] for n1, n2 in zip(names, new)}, {n2: m[n1] for n1, n2 in zip(names, new)}
    return _derive(img, new, {n2: img.dtypes[n1] for n1, n2 in zip(names, new)}, fn)


def _update_mask(image, mask):
    mk = _as_img(mask)

    def render(g):
        v, m = image.render(g)
        mv, mm = mk.render(g)
        out = {}
        for i, b in enumerate(image.bands):
            k = mk.bands[min(i, len(mk.bands) - 1)]
            out[b] = m[b] & mm[k] & (mv[k] != 0)
        return v, out
    return Img(list(image.bands), dict(image.dtypes), render, image.props, image.footprint)


def _remap(image, **kw):
    frm, to, default = kw["from"], kw["to"], kw.get("defaultValue")
    if len(frm) != len(to):
        raise EEStandInError("Image.remap: from and to must have the same length")

    def fn(v, m):
        out, msk = {}, {}
        for b in image.bands:
            x = v[b]
            y = np.full_like(x, np.nan if default is None else float(default))
            for f, t in zip(frm, to):
                y[x == f] = t
            out[b] = np.nan_to_num(y)
            msk[b] = m[b] & (~np.isnan(y) if default is None else True)
        return out, msk
    return _derive(image, image.bands, {b: "uint8" for b in image.bands}, fn)


def _resample(image, mode):
    if mode not in ("bilinear", "bicubic"):
        raise EEStandInError(f"Image.resample: unknown mode '{mode}'")
    if image.assets is None:
        raise EEStandInError("Image.resample: only images read from assets can be resampled here")
    return _asset_image(image.assets[0], image.props, image.footprint, mode)


def _rename(input, names):
    if len(names) != len(input.bands):
        raise EEStandInError(f"Image.rename: {len(names)} names for {len(input.bands)} bands")

    def fn(v, m):
        return ({n: v[b] for b, n in zip(input.bands, names)}, {n: m[b] for b, n in zip(input.bands, names)})
    return _derive(input, names, {n: input.dtypes[b] for b, n in zip(input.bands, names)}, fn)


def _add_bands(dstImg, srcImg, names=None, overwrite=False):
    bands = dstImg.bands + [b for b in srcImg.bands if b not in dstImg.bands]

    def render(g):
        v, m = dstImg.render(g)
        v2, m2 = srcImg.render(g)
        return {**v, **{b: v2[b] for b in srcImg.bands if b not in v}}, {**m, **{b: m2[b] for b in srcImg.bands if b not in m}}
    return Img(bands, {**srcImg.dtypes, **dstImg.dtypes}, render, dstImg.props, dstImg.footprint)


def _reduce(collection, how: str):
    if not collection:
        return Img([], {}, lambda g: ({}, {}))
    first = collection[0]
    names = list(first.bands)

    def render(g):
        rendered = [c.render(g) for c in collection]
        out, msk = {}, {}
        for b in names:
            stack = np.stack([np.where(m[b], v[b], np.nan) for v, m in rendered])
            valid = ~np.isnan(stack)
            cnt = valid.sum(axis=0)
            if how == "count":
                out[b] = cnt.astype(np.float64)
                msk[b] = np.ones(cnt.shape, bool)
            else:
                with warnings.catch_warnings():  # all-NaN pixels (no valid date) are expected
                    warnings.simplefilter("ignore", RuntimeWarning)
                    med = np.nanmedian(stack, axis=0)
                out[b] = np.nan_to_num(med)
                msk[b] = cnt > 0
        return out, msk
    dtype = "int32" if how == "count" else "float64"
    return Img(names, {b: dtype for b in names}, render)


def _mosaic(collection):
    if not collection:
        return Img([], {}, lambda g: ({}, {}))
    names = list(collection[0].bands)

    def render(g):
        out = {b: np.zeros((g.height, g.width)) for b in names}
        msk = {b: np.zeros((g.height, g.width), bool) for b in names}
        for c in collection:  # later images on top
            v, m = c.render(g)
            for b in names:
                out[b] = np.where(m[b], v[b], out[b])
                msk[b] |= m[b]
        return out, msk
    return Img(names, dict(collection[0].dtypes), render)


def _intersects(leftField=".all", rightValue=None, **_):
    geom = rightValue
    return lambda el: el.footprint is not None and el.footprint.intersects(geom)


def _date_range_contains(leftValue, rightField):
    s, e = leftValue
    return lambda el: s <= int(_prop(el, rightField)) < e


def _list_contains(leftValue, rightField):
    allowed = set(leftValue)
    return lambda el: _prop(el, rightField) in allowed


def _less_than(leftField, rightValue):
    return lambda el: _prop(el, leftField) is not None and _prop(el, leftField) < rightValue


def _sort(collection, key, ascending=True):
    return sorted(collection, key=lambda el: _prop(el, key), reverse=not ascending)


def _rectangle(coordinates, crs=None, geodesic=None, evenOdd=None):
    from shapely.geometry import box

    w, s, e, n = [float(v) for v in coordinates]
    return box(w, s, e, n)


def _polygon(coordinates, crs=None, geodesic=None, maxError=None, evenOdd=None):
    from shapely.geometry import Polygon
    return Polygon(coordinates[0], coordinates[1:])


FUNCTIONS: dict[str, Callable] = {
    "ImageCollection.load": None,  # bound per server (needs the catalog)
    "Collection.filter": lambda collection, filter: [el for el in collection if filter(el)],
    "Collection.size": lambda collection: len(collection),
    "Collection.toList": lambda collection, count, offset=0: list(collection[int(offset):int(offset) + int(count)]),
    "Collection.map": lambda collection, baseAlgorithm, dropNulls=False: [baseAlgorithm(el) for el in collection],
    "Collection.limit": lambda collection, limit=None, key=None, ascending=True: (
        _sort(collection, key, ascending) if key else list(collection))[: int(limit) if limit is not None else None],
    "ImageCollection.fromImages": lambda images: list(images),
    "ImageCollection.mosaic": _mosaic,
    "AggregateFeatureCollection.array": lambda collection, property: [_prop(el, property) for el in collection],
    "Filter.intersects": _intersects,
    "Filter.dateRangeContains": _date_range_contains,
    "Filter.listContains": _list_contains,
    "Filter.lessThan": _less_than,
    "Filter.and": lambda filters: (lambda el: all(f(el) for f in filters)),
    "DateRange": lambda start, end=None, timeZone=None: (_date_ms(start), _date_ms(end)),
    "Feature": lambda geometry, metadata=None: geometry,
    "Projection": lambda crs, transform=None: crs,
    "GeometryConstructors.Rectangle": _rectangle,
    "GeometryConstructors.Polygon": _polygon,
    "Image.select": _select,
    "Image.updateMask": _update_mask,
    "Image.remap": _remap,
    "Image.resample": _resample,
    "Image.rename": _rename,
    "Image.addBands": _add_bands,
    "Image.constant": lambda value: _const(value),
    "Image.neq": _binary(lambda x, y: x != y),
    "Image.eq": _binary(lambda x, y: x == y),
    "Image.and": _binary(lambda x, y: (x != 0) & (y != 0)),
    "Image.or": _binary(lambda x, y: (x != 0) | (y != 0)),
    "reduce.median": lambda collection: _reduce(collection, "median"),
    "reduce.count": lambda collection: _reduce(collection, "count"),
}


class Interpreter:
    """Evaluates one serialized expression ({"result": id, "values": {id: node}})."""

    def __init__(self, catalog: dict[str, list[Img]]):
        self.catalog = catalog

    def load(self, id):
        if id not in self.catalog:
            raise EEStandInError(f"ImageCollection.load: ImageCollection asset '{id}' not found.")
        return list(self.catalog[id])

    def evaluate(self, expr: dict) -> Any:
        try:
            values, result = expr["values"], expr["result"]
        except (KeyError, TypeError):
            raise EEStandInError("expression: expected {'result', 'values'}") from None
        return self._node(values[result], values, {})

    def _node(self, node: dict, values: dict, env: dict) -> Any:
        if "constantValue" in node:
            return node["constantValue"]
        if "integerValue" in node:
            return int(node["integerValue"])
        if "nullValue" in node:
            return None
        if "valueReference" in node:
            return self._node(values[node["valueReference"]], values, env)
        if "argumentReference" in node:
            name = node["argumentReference"]
            if name not in env:
                raise EEStandInError(f"unbound argument {name}")
            return env[name]
        if "arrayValue" in node:
            return [self._node(v, values, env) for v in node["arrayValue"].get("values", [])]
        if "dictionaryValue" in node:
            return {k: self._node(v, values, env) for k, v in node["dictionaryValue"].get("values", {}).items()}
        if "functionDefinitionValue" in node:
            fd = node["functionDefinitionValue"]
            names, body = fd["argumentNames"], fd["body"]

            def fn(*args):
                return self._node(values[body], values, {**env, **dict(zip(names, args))})
            return fn
        if "functionInvocationValue" in node:
            inv = node["functionInvocationValue"]
            name = inv.get("functionName")
            if name is None:
                raise EEStandInError("functionReference invocations are not supported")
            args = {k: self._node(v, values, env) for k, v in (inv.get("arguments") or {}).items()}
            if name == "ImageCollection.load":
                return self.load(**args)
            fn = FUNCTIONS.get(name)
            if fn is None:
                raise EEStandInError(f"the stand-in does not implement {name}")
            try:
                return fn(**args)
            except TypeError as e:
                raise EEStandInError(f"{name}: {e}") from None
        raise EEStandInError(f"unknown expression node {sorted(node)}")


def to_json(v: Any) -> Any:
    if isinstance(v, Img):
        return {"type": "Image", "bands": [{"id": b, "data_type": v.dtypes.get(b)} for b in v.bands],
                "properties": v.props}
    if isinstance(v, list):
        return [to_json(x) for x in v]
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if callable(v) or hasattr(v, "geom_type"):
        raise EEStandInError("value:compute: the result is not a plain value")
    return v


_NP_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int32": np.int32, "float64": np.float64}


def pixels_npy(img: Img, grid: Grid, band_ids: list[str] | None) -> bytes:
    names = list(band_ids or img.bands)
    missing = [b for b in names if b not in img.bands]
    if missing:
        raise EEStandInError(f"computePixels: band '{missing[0]}' is not in the image ({img.bands})")
    vals, masks = img.render(grid)
    dtype = [(b, _NP_DTYPES.get(img.dtypes.get(b), np.float64)) for b in names]
    out = np.zeros((grid.height, grid.width), dtype=dtype)
    for b, t in dtype:
        v = np.where(masks[b], vals[b], 0.0)
        out[b] = np.clip(np.rint(v), np.iinfo(t).min, np.iinfo(t).max).astype(t) if np.issubdtype(t, np.integer) else v
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------
def _ee_tests_file(name: str) -> bytes:
    import ee

    return (Path(ee.__file__).parent / "tests" / name).read_bytes()


class EEStandIn:
    """The running stand-in: ``url`` for ``ee.Initialize(url=...)``, ``requests`` (method, path,
    parsed body) in arrival order. Use as a context manager or call :meth:`close`."""

    def __init__(self, world: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 throttle_every: int = 0, log: str | Path | None = None):
        self.catalog = build_catalog(world)
        self.interp = Interpreter(self.catalog)
        self.requests: list[dict] = []
        self.throttle_every = int(throttle_every)   # answer every Nth compute call with a 429 once
        self._n_compute = 0
        self._lock = threading.Lock()
        self._log = Path(log) if log else None
        self._discovery = _ee_tests_file("cloud_api_discovery_document.json")
        self._algorithms = _ee_tests_file("algorithms.json")
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, code: int, msg: str, status: str):
                self._send(code, json.dumps({"error": {"code": code, "message": msg, "status": status}}).encode())

            def do_GET(self):
                stand_in._record("GET", self.path, None)
                if self.path.startswith("/$discovery/rest"):
                    return self._send(200, stand_in._discovery)
                if re.match(r"^/v1(alpha|beta)?/projects/[^/]+/algorithms", self.path):
                    return self._send(200, stand_in._algorithms)
                self._error(404, f"no such resource {self.path.split('?')[0]}", "NOT_FOUND")

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except ValueError:
                    return self._error(400, "request body is not JSON", "INVALID_ARGUMENT")
                path = self.path.split("?")[0]
                stand_in._record("POST", path, body)
                if stand_in._throttle():
                    return self._error(429, "Too many concurrent aggregations.", "RESOURCE_EXHAUSTED")
                try:
                    if path.endswith("/value:compute"):
                        res = to_json(stand_in.interp.evaluate(body.get("expression")))
                        return self._send(200, json.dumps({"result": res}).encode())
                    if path.endswith("/image:computePixels"):
                        img = stand_in.interp.evaluate(body.get("expression"))
                        if not isinstance(img, Img):
                            raise EEStandInError("computePixels: the expression is not an image")
                        if body.get("fileFormat") not in ("NPY", None):
                            raise EEStandInError(f"computePixels: the stand-in answers NPY only, not {body.get('fileFormat')}")
                        data = pixels_npy(img, Grid.from_request(body.get("grid") or {}), body.get("bandIds"))
                        return self._send(200, data, "application/octet-stream")
                except EEStandInError as e:
                    return self._error(400, str(e), "INVALID_ARGUMENT")
                self._error(404, f"no such method {path}", "NOT_FOUND")

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def _record(self, method: str, path: str, body: Any) -> None:
        rec = {"method": method, "path": path, "body": body}
        with self._lock:
            self.requests.append(rec)
        if self._log is not None:
            with self._lock, open(self._log, "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")

    def _throttle(self) -> bool:
        if self.throttle_every <= 0:
            return False
        with self._lock:
            self._n_compute += 1
            return self._n_compute % self.throttle_every == 0

    def expressions(self, kind: str = "computePixels") -> list[dict]:
        """Recorded expression graphs of one kind of call ("computePixels" or "compute")."""
        end = "/image:computePixels" if kind == "computePixels" else "/value:compute"
        with self._lock:
            return [r["body"]["expression"] for r in self.requests if r["path"].endswith(end)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "EEStandIn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def invocations(expr: dict, name: str | None = None) -> list[tuple[str, dict]]:
    """(function name, argument nodes) of every invocation in an expression graph (only those of
    `name` when given), in document order: for assertions on what a client sent."""
    out: list[tuple[str, dict]] = []

    def walk(o):
        if isinstance(o, dict):
            fn = o.get("functionName")
            if fn is not None and (name is None or fn == name):
                out.append((fn, o.get("arguments") or {}))
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(expr)
    return out


def functions_in(expr: dict) -> list[str]:
    """The function names an expression graph invokes (sorted, unique)."""
    return sorted({fn for fn, _ in invocations(expr)})


def serve_ee(world: str | Path, **kw) -> EEStandIn:
    if not Path(world).is_dir():
        raise UserError(f"world folder {world} does not exist")
    return EEStandIn(world, **kw)


__all__ = ["EEStandIn", "EEStandInError", "FUNCTIONS", "Interpreter", "build_catalog", "functions_in", "invocations",
           "pixels_npy", "serve_ee"]

