"""The card's Markdown text: one function per section, :func:`card_text` puts them in order."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from gl10m import inspect as gi
from gl10m import samples as smp
from gl10m.card.markdown import md_escape, table
from gl10m.card.plots import GL10M_TRAIN_VAL, card_splits, reference_scale
from gl10m.card.qc import meta_get, qc_summary
from gl10m.io import is_url
from gl10m.shards import INDEX_NAME

GL10M_PAPER = "Observe Less, Understand More: Cost-aware Cross-scale Observation for Remote Sensing Understanding"


SCHEMA = [
    ("`lr.png`", "uint8", "268 x 268 x 3", "Sentinel-2 L2A RGB (B04, B03, B02) median composite over the scene footprint, "
                                        "stretched from reflectance to 0..255 (PNG, lossless)"),
    ("`hr_00.jpg` .. `hr_99.jpg`", "uint8", "100 x (268 x 268 x 3)",
     "NAIP RGB tiles of the 2680 x 2680 HR mosaic of the same footprint; tile index `row*10 + col`, row 0 = "
     "north (top), col 0 = west (left), so `hr_00` is the north-west and `hr_09` the north-east corner "
     "(JPEG quality 95, 4:4:4)"),
    ("`labels.npy`", "uint8", "[66]", "multi-hot: 1 when the concept covers at least the profile's minimum area "
                                      "in the scene (order = concept id, table below)"),
    ("`tile_frac.npy`", "float16", "[100, 66]", "fraction of each HR tile (same row*10 + col index) covered by "
                                               "each concept's OSM geometry (buffered for lines and points)"),
    ("`meta.json`", "JSON object", "-", "provenance and QC: key, scene id, state, split, footprint (EPSG:4326), "
                                        "ground pixel size, concepts by name, every NAIP and Sentinel-2 item id "
                                        "with its date, S2 window mode, harmonisation, QC statistics, profile hash, "
                                        "builder version (keys below)"),
]

META_KEYS = [
    ("key, scene_id, state, split", "identity of the sample; `key` = `{state}-{scene id}` (no dots)"),
    ("footprint, crs", "west/south/east/north in degrees, EPSG:4326 (0.024 x 0.024 degrees)"),
    ("lr, hr", "image sizes, pixel size in degrees and in metres (x and y differ: degree footprints "
               "have anisotropic ground pixels), bands; hr also grid, tile size, tile index convention"),
    ("georef", "georeferencing (section below): crs, the GDAL geotransforms of the LR image (`lr`) and of the "
               "HR mosaic (`hr`) with their sizes, and `tiles` (grid, tile size, index, the rule that gives "
               "each tile's transform)"),
    ("concepts, concept_ids", "concepts present, by name and id"),
    ("naip", "year, date, quarter-quad items (id, date, EPSG, GSD; with the earthengine provider the "
             "Earth Engine asset id and the collection), resampling, mosaic rule"),
    ("s2", "window mode (aligned to the NAIP date, or the calendar-year fallback), date range, items used "
           "(id, datetime, processing baseline, offset subtracted, cloud cover, MGRS tile, per-date SCL "
           "fractions), items excluded and why, harmonisation, SCL mask, compositing, resampling, stretch; "
           "with the earthengine provider the asset ids and collection, harmonised by Earth Engine"),
    ("qc", "black level and threshold, LR black ratio, S2 composite coverage (dates, uncovered fraction, "
           "min/mean valid dates per pixel), HR black ratio per tile and maximum"),
    ("provider, plan_hash, profile, builder", "imagery provider, hash of the plan row, profile name/version/hash, "
                                              "builder name/version"),
]
BANDS_META_KEY = ("bands", "(`imagery.bands` rgbn or raw only) mode, and for `lr` / `hr`: the extra member's field, "
                           "the array's name, bands, dtype, shape, nodata; for `lr` the reflectance scale and offset")


def _extra_rows(bands: str) -> list[tuple[str, str, str, str]]:
    """Schema rows of the extra members of `bands` (none for rgb)."""
    if bands == "rgb":
        return []
    name, lc, ld, hc, hd, lb, hb = smp.EXTRA[bands]
    return [
        (f"`{smp.lr_extra_field(bands)}`", ld, f"268 x 268 x {lc}",
         f"Sentinel-2 {', '.join(lb)} median composite (same dates, masks and grid as `lr.png`) as harmonised "
         f"surface reflectance * 10000 (reflectance = value * {smp.REFLECTANCE_SCALE:g} + "
         f"{smp.REFLECTANCE_OFFSET:g}; the L2A +1000 offset already removed), 0 without a valid observation; "
         f"`.npz`, one array `{name}`"),
        (f"`hr_00_{name}.npz` .. `hr_99_{name}.npz`", hd, f"100 x (268 x 268 x {hc})",
         f"NAIP {', '.join(hb)} of the same HR mosaic and tiles as `hr_NN.jpg` (the same warp, uncompressed "
         f"8-bit values); `.npz`, one array `{name}`"),
    ]


def _data_load_call() -> str | None:
    """How to call gl10m.data.load on these shards; None when gl10m has no data module (it is
    looked up, not imported: importing it pulls in torch)."""
    if importlib.util.find_spec("gl10m.data") is None:
        return None
    return 'data.load("W/shards", split="train")  # a torch IterableDataset of sample dicts'


def _pbf_sources(profile, st: dict) -> str:
    """Where the OSM data of the regions in the data came from, as the profile says."""
    regions = sorted({k for s in card_splits(st) for k in st["states"][s]} & set(profile.regions)) or sorted(profile.regions)
    pinned = [r for r in regions if profile.regions[r].pbf]
    dated = [r for r in regions if not profile.regions[r].pbf]
    parts = []
    if dated:
        parts.append(f"per-state extracts `{profile.osm.base_url}/<state>-{profile.osm.extract_date}.osm.pbf` "
                     f"(dated {profile.osm.extract_date}) for {', '.join(dated)}")
    if pinned:
        files = ", ".join(f"{r} `{_pbf_name(profile.regions[r].pbf)}`" for r in pinned)
        parts.append(f"the PBF files the profile names per region: {files}")
    return "; ".join(parts)


def _pbf_name(pbf: str) -> str:
    """A URL as it is (credentials redacted); a local file by its name (no paths of this machine)."""
    from gl10m.errors import redact

    return redact(pbf) if is_url(pbf) else Path(pbf).name


def build_outcome(manifest: dict, total: int) -> list[str]:
    """What became of the planned scenes: rejections by reason, what is missing and why."""
    if "planned" not in manifest:
        return [f"- Planned but not fetched: {manifest['not_fetched']}."] if "not_fetched" in manifest else []
    rej = manifest.get("rejected_at_fetch") or {}
    out = [f"- Of {manifest['planned']} planned scenes, {total} are in the shards, "
           f"{manifest.get('dropped_border', 0)} were dropped at split borders, {sum(rej.values())} were rejected "
           "at fetch" + (" (" + ", ".join(f"`{k}` {v}" for k, v in sorted(rej.items(), key=lambda kv: (-kv[1], kv[0])))
                         + ")" if rej else "")
           + f" and {manifest.get('not_fetched', 0)} are missing."]
    npl = manifest.get("not_planned") or {}
    if npl:
        out.append(f"- Candidates not planned: {sum(npl.values())} ("
                   + ", ".join(f"`{k}` {v}" for k, v in sorted(npl.items(), key=lambda kv: (-kv[1], kv[0]))) + ").")
    missing = manifest.get("missing") or []
    if missing:
        shown = ", ".join(f"`{m['key']}` ({md_escape(m['why'])})" for m in missing[:10])
        out.append(f"- **Incomplete build** (`--allow-incomplete`): {len(missing)} planned scene(s) have no sample: "
                   f"{shown}" + (f" and {len(missing) - 10} more (all in `manifest.json`)" if len(missing) > 10 else "")
                   + ".")
    return out


def _intro(st: dict, profile, splits: list[str]) -> list[str]:
    """Title, what the data is, and the at-a-glance table."""
    counts = st["concept_counts"]
    geo = profile.geometry
    total = st["total_samples"]
    L: list[str] = []
    A = L.append
    A(f"# {profile.name}: a GL-10M-style Sentinel-2 / NAIP dataset with OpenStreetMap concepts")
    A("")
    if profile.description:
        A(f"> {profile.description}")
        A("")
    A("This folder is a GL-10M-style paired multi-resolution remote-sensing dataset written as "
      "[WebDataset](https://github.com/webdataset/webdataset) shards. Each sample is one scene: a "
      f"{geo.footprint_deg:g} x {geo.footprint_deg:g} degree footprint seen at two resolutions, a "
      f"Sentinel-2 L2A 10 m RGB image (LR, {geo.lr_px} x {geo.lr_px} px) and NAIP 1 m-class aerial "
      f"imagery of the same footprint cut into a {geo.grid} x {geo.grid} grid of {geo.tile_px} x {geo.tile_px} px "
      f"tiles (HR), labelled with {profile.n_concepts} OpenStreetMap concepts (a multi-hot vector per scene and "
      "the area fraction of every concept in every tile). GL-10M is the dataset of "
      f"*{GL10M_PAPER}* (arXiv 2604.11415: 104,020 scenes in 11 US states, 10,402,000 HR tiles); this "
      "dataset was built the same way by `gl10m` from the profile named below, so its size and states are "
      "those of this build.")
    A("")
    A("## At a glance")
    A("")
    rows = [
        ["samples (scenes)", *[str(st["samples"][s]) for s in splits], str(total)],
        ["states", *[", ".join(st["states"][s]) for s in splits],
         ", ".join(sorted({k for s in splits for k in st["states"][s]}))],
        ["HR tiles", *[str(st["samples"][s] * smp.N_TILES) for s in splits], str(st["hr_tiles"])],
        ["shards", *[str(st["shards"][s]) for s in splits], str(st["total_shards"])],
        ["size on disk", *[gi.human_bytes(st["shard_bytes"][s]) for s in splits], gi.human_bytes(st["total_bytes"])],
    ]
    L += table(["", *splits, "total"], rows, ["---"] + ["--:"] * (len(splits) + 1))
    A("")
    A(f"Mean sample payload: {gi.human_bytes(st['mean_sample_bytes'])}. Concepts present in at least one "
      f"scene: {sum(1 for v in counts['all'] if v > 0)} of {profile.n_concepts}.")
    if st["missing_shards"]:
        A("")
        A(f"**Warning:** {len(st['missing_shards'])} shard file(s) listed in the index are missing: "
          f"{', '.join(st['missing_shards'][:5])}.")
    A("")
    return L


def _provenance(st: dict, manifest: dict, profile, metas: list[tuple[str, dict]]) -> list[str]:
    """"How it was built": profile, builder, providers, sources, pipeline, imagery rules, splits, outcome."""
    geo, s2p, naip = profile.geometry, profile.imagery.s2, profile.imagery.naip
    prof_m = manifest.get("profile") or {"name": profile.name, "version": profile.version, "hash": profile.hash()}
    builder = manifest.get("builder") or {}
    providers = sorted({str(m.get("provider")) for _, m in metas if m.get("provider")})
    builders = sorted({f"{meta_get(m, 'builder.name')} {meta_get(m, 'builder.version')}" for _, m in metas
                       if meta_get(m, "builder.version")})
    prof_hashes = sorted({str(meta_get(m, "profile.hash")) for _, m in metas if meta_get(m, "profile.hash")})
    naip_years = sorted({str(meta_get(m, "naip.year")) for _, m in metas if meta_get(m, "naip.year") is not None})
    total = st["total_samples"]
    L: list[str] = []
    A = L.append
    A("## How it was built")
    A("")
    A(f"- Profile: `{prof_m.get('name')}` version {prof_m.get('version')}, hash `{prof_m.get('hash')}`"
      + (f" (samples carry profile hash{'es' if len(prof_hashes) > 1 else ''} "
         f"{', '.join(f'`{h}`' for h in prof_hashes)})" if prof_hashes else "") + ".")
    A(f"- Builder: {builder.get('name', 'gl10m')} {builder.get('version', '?')}"
      + (f" (samples: {', '.join(builders)})" if builders else "") + ".")
    A(f"- Imagery provider(s): {', '.join(providers) if providers else profile.provider.name}"
      f" (profile default `{profile.provider.name}`).")
    syn = manifest.get("synthetic")
    if syn:  # `gl10m testbed scenes`: no PBF was downloaded and no provider was asked
        A(f"- **Synthetic scenes**, not imagery of real places: {syn.get('n_scenes')} scenes of seed {syn.get('seed')} "
          f"by `{syn.get('generator')}` version {syn.get('generator_version')} (`gl10m testbed scenes`): each scene "
          "its own seeded layout of the testbed's recipes, rendered by the testbed's NAIP and Sentinel-2 renderer; "
          "labels from the layout written as a PBF and read by the osm and anchors stages. The OpenStreetMap, "
          "NAIP and Sentinel-2 lines below describe the profile the scenes imitate, not downloads.")
    A(f"- OpenStreetMap: {_pbf_sources(profile, st)}.")
    A(f"- Pipeline: OSM features matching a concept rule -> anchors (a point on the surface of each feature, "
      f"always inside it, unlike a centroid; {geo.footprint_deg:g}-degree "
      f"footprints, thinned so that footprints overlap by at most {geo.max_overlap:g}, at least "
      f"{geo.min_concepts} concepts of at least {geo.min_concept_area_m2:g} m2 per scene) -> provider catalogue -> "
      "plan (coverage check, class-aware subsampling, matched NAIP state-year and Sentinel-2 window) -> fetch "
      "(compose, QC, stage one sample per scene) -> shards (byte copies, deterministic order and assignment).")
    sub = (manifest.get("concept_subset") or {}).get("concepts")
    if sub:
        A(f"- **Concept subset** (`--concepts`): only scenes holding at least one of {', '.join(f'`{c}`' for c in sub)} "
          "were planned, fetched and sharded (every scene keeps all its labels); the class-aware subsampling target "
          "was filled from that subset. Candidates without them are counted as `no_named_concept` below.")
    A(f"- NAIP (`{naip.collection}`): the most recent state-year between {naip.start} and {naip.end}, bands "
      f"{', '.join(naip.bands)}, mosaicked newest first and resampled bilinearly onto the "
      f"{geo.hr_px} x {geo.hr_px} HR grid." + (f" NAIP years in the data: {', '.join(naip_years)}." if naip_years else ""))
    A(f"- Sentinel-2 L2A (`{s2p.collection}`): dates within +-{s2p.window_days} days of the NAIP date, clipped to "
      f"{s2p.clip_start}..{s2p.clip_end} (`aligned`); if none is valid, {s2p.fallback_start}..{s2p.fallback_end} "
      f"(`fallback`). Scenes with cloudy pixels >= {s2p.max_cloud_pct:g} % are skipped; pixels with SCL classes "
      f"{s2p.scl_mask} are masked; the per-pixel median of the remaining dates is the composite. Harmonisation: "
      + (f"the +{s2p.offset} DN offset is subtracted from items with processing baseline >= {s2p.offset_baseline}"
         if s2p.harmonize else "off")
      + f"; reflectance {s2p.stretch[0]:g}..{s2p.stretch[1]:g} is stretched to 0..255.")
    sch = profile.splits.schemes[profile.splits.scheme]
    A(f"- Splits by state (scheme `{manifest.get('split_scheme', profile.splits.scheme)}`): train "
      f"{', '.join(sch.train) or '-'}; val {', '.join(sch.val) or '-'}; test {', '.join(sch.test) or '-'}. Scenes within "
      f"{profile.splits.border_buffer_deg:g} degrees of a state of another split are dropped from the smaller split"
      + (f" ({manifest['dropped_border']} dropped in this build)" if "dropped_border" in manifest else "") + ".")
    L += build_outcome(manifest, total)
    A("")
    return L


def _per_state(st: dict, profile, splits: list[str]) -> list[str]:
    """Samples per split and state."""
    L: list[str] = []
    A = L.append
    A("## Samples per split and state")
    A("")
    rows = []
    for s in splits:
        for state, n in st["states"][s].items():
            reg = profile.regions.get(state)
            rows.append([s, state, reg.name if reg else "", str(n), str(reg.target) if reg else ""])
    L += table(["split", "state", "name", "samples", "profile download target"], rows,
                ["---", "---", "---", "--:", "--:"])
    A("")
    return L


def _schema(profile) -> list[str]:
    """The sample schema, the tile index convention, meta.json keys, the index."""
    geo = profile.geometry
    L: list[str] = []
    A = L.append
    A("## Sample schema")
    A("")
    A("Every sample has exactly these fields; in a shard each is the tar member `{key}.{field}` (keys have no "
      "dots), small fields first (`meta.json`, `labels.npy`, `lr.png`, `tile_frac.npy`) then `hr_00.jpg` .. "
      "`hr_99.jpg`, so a reader that needs only the LR image stops early.")
    A("")
    bands = getattr(profile.imagery, "bands", "rgb")
    L += table(["field", "dtype", "shape", "meaning"], [list(r) for r in SCHEMA + _extra_rows(bands)])
    A("")
    if bands != "rgb":
        A(f"**Extra bands** (`imagery.bands: {bands}`): one more member for the LR image and one per HR tile, "
          "so a reader that wants 12 tiles reads 12 extra members. They are `.npz` (deflate, lossless; one "
          "array): plain webdataset's default decoders give `dict(np.load(...))` and Hugging Face `datasets`' "
          "webdataset builder `np.load(..., allow_pickle=False)`, so neither needs gl10m. (`.npy` is not "
          "compressed; 16-bit PNG holds 1 or 3 channels and webdataset's Pillow decoder reduces 16-bit RGB to "
          "8 bits.) Pixels without a valid observation are 0.")
        A("")
    A(f"**Tile index convention** (as in GL-10M): index = `row*{geo.grid} + col`, row 0 = north (top), col 0 = "
      f"west (left). Tile `hr_{{index:02d}}.jpg` covers rows `[row*{geo.tile_px}, (row+1)*{geo.tile_px})` and "
      f"columns `[col*{geo.tile_px}, (col+1)*{geo.tile_px})` of the HR mosaic; the {geo.grid ** 2} tiles exactly "
      "tessellate the LR footprint. `tile_frac[index]` refers to the same tile. (The older SAR downloader used "
      "col*10 + row-from-south: do not mix the two.)")
    A("")
    A("`meta.json` keys:")
    A("")
    L += table(["key(s)", "content"], [list(r) for r in META_KEYS + ([BANDS_META_KEY] if bands != "rgb" else [])])
    A("")
    L += georef_section()
    A(f"The sidecar `{INDEX_NAME}` has one row per sample: `key`, `split`, `state`, `shard`, `fields`, `offsets` and "
      f"`sizes` (byte offset and length of each member's data in the shard), `sha256` (of the sample's fields), "
      f"`labels` ({profile.n_concepts} uint8) and `nbytes`. `manifest.json` lists the shards (name, bytes, samples, "
      "sha256), samples and states per split, and the profile and builder.")
    A("")
    return L


def georef_section() -> list[str]:
    """How to place the LR image and any HR tile on the map from meta.json alone."""
    return [
        "**Georeferencing.** `meta.json`'s `georef` block places every image in EPSG:4326 (`crs`): "
        "`georef.lr.transform` and `georef.hr.transform` are GDAL geotransforms (`[west edge, pixel width, 0, "
        "north edge, 0, -pixel height]` in degrees, north-up; a pixel's corner is at `x = t[0] + col*t[1]`, "
        "`y = t[3] + row*t[5]`) of the LR image and of the 2680 x 2680 HR mosaic, with their `width` and "
        "`height`. Both cover the footprint exactly. The 100 tiles are blocks of that mosaic, so their transforms "
        "are not stored one by one (they would add ~10 KB of JSON to every sample, more than the rest of "
        "`meta.json`, and could only repeat the mosaic's); tile `i` is block `row, col = divmod(i, grid)` and "
        "its transform follows from `georef.tiles` (`grid`, `width`, `height`) without gl10m:",
        "",
        "```python",
        'g = meta["georef"]; hr = g["hr"]["transform"]; t = g["tiles"]',
        'row, col = divmod(i, t["grid"])',
        'tile_gt = [hr[0] + col * t["width"] * hr[1], hr[1], 0.0, hr[3] + row * t["height"] * hr[5], 0.0, hr[5]]',
        "# rasterio: affine.Affine.from_gdal(*tile_gt); GDAL: ds.SetGeoTransform(tile_gt)",
        "```",
        "",
        "With gl10m: `gl10m.geometry.tile_transform(meta, i)`, `gl10m.geometry.image_bounds(meta, i)`, "
        "`gl10m.data.load(..., georef=True)` (adds `crs`, `bounds`, `transform`, `tile_bounds`, `tile_transform` "
        "to each sample), and `gl10m export KEY --shards W/shards --out DIR` (writes `DIR/KEY/lr.tif` and "
        "`DIR/KEY/hr_XX.tif`, RGB GeoTIFFs at their place). `gl10m verify` checks every sample's georef against "
        "its footprint.",
        "",
    ]


def _concepts(st: dict, profile, splits: list[str]) -> list[str]:
    """Concept frequencies: the plot, most/least frequent, absent, the table."""
    counts = st["concept_counts"]
    L: list[str] = []
    A = L.append
    A("## Concepts")
    A("")
    factor, n_ref = reference_scale(st)
    A("![label frequency](card/label_frequency.png)")
    A("")
    A("Scenes containing each concept, per split (log scale, most frequent on top). Black ticks: the GL-10M "
      f"paper's Figure 6 counts (train+val of {GL10M_TRAIN_VAL:,} scenes) scaled to this dataset's "
      f"{n_ref} train+val scenes, i.e. where each bar would end if this data had GL-10M's label distribution.")
    A("")
    order = sorted(range(profile.n_concepts), key=lambda i: (-counts["all"][i], i))
    present = [i for i in order if counts["all"][i] > 0]
    k = min(10, len(present))
    if present:
        A("Most frequent: " + ", ".join(f"{profile.concepts[i].label} ({counts['all'][i]})" for i in present[:k]) + ".")
        A("")
        A("Least frequent (present): " + ", ".join(f"{profile.concepts[i].label} ({counts['all'][i]})"
                                                     for i in present[::-1][:k]) + ".")
        A("")
    absent = [i for i in range(profile.n_concepts) if counts["all"][i] == 0]
    if absent:
        A(f"Absent from every split ({len(absent)}): " + ", ".join(profile.concepts[i].label for i in absent) + ".")
        A("")
    rows = []
    for c in profile.concepts:
        rows.append([str(c.id), f"`{c.name}`", c.label, *[str(counts[s][c.id]) for s in splits],
                     str(counts["all"][c.id]), f"{c.count:,}", "/".join(c.kinds)])
    L += table(["id", "name", "label", *splits, "total", "GL-10M count", "OSM kinds"], rows,
                ["--:", "---", "---"] + ["--:"] * (len(splits) + 2) + ["---"])
    A("")
    return L


def _quality(st: dict, profile, values: dict, n_meta: int) -> list[str]:
    """The QC rules applied and the QC statistics of the samples."""
    geo, s2p, qc = profile.geometry, profile.imagery.s2, profile.qc
    total = st["total_samples"]
    L: list[str] = []
    A = L.append
    A("## Quality control")
    A("")
    A("Rules applied while building (a scene failing any of them is not in the data; the build ledger "
      "records why):")
    A("")
    A(f"- Black pixels: a pixel is black when all channels are <= {qc.black_level}; an image is invalid when its "
      f"black ratio is >= {qc.max_black_ratio:g}. An invalid LR image drops the scene; so does any missing, corrupt "
      f"or invalid HR tile, so every sample has one LR image and {smp.N_TILES} HR tiles.")
    A(f"- Sentinel-2: scene-level cloudy pixels < {s2p.max_cloud_pct:g} %; SCL classes {s2p.scl_mask} masked per "
      "pixel; the composite is the per-pixel median of the remaining dates, and an LR pixel left with no valid "
      "date is black, so it counts toward the LR black ratio above (as in GL-10M's masked median).")
    A("- Coverage: the whole LR footprint inside Sentinel-2 coverage and the HR footprint fully covered by the "
      "state's NAIP quarter-quads.")
    A(f"- Labels: at least {geo.min_concepts} concepts per scene, each covering at least "
      f"{geo.min_concept_area_m2:g} m2; footprints thinned to overlap by at most {geo.max_overlap:g}.")
    A(f"- Splits: states never mix; border scenes dropped (buffer {profile.splits.border_buffer_deg:g} degrees).")
    A("")
    A("![QC statistics](card/qc.png)")
    A("")
    sub = f"{n_meta} of {total} samples (evenly spaced by key)" if n_meta < total else f"all {total} samples"
    A(f"QC statistics from the samples' `meta.json` ({sub}):")
    A("")
    summary = qc_summary(values)
    if summary:
        L += table(["statistic", "n", "min / counts", "median", "mean", "max"], summary,
                    ["---", "--:", "--:", "--:", "--:", "--:"])
    else:
        A("(the samples' meta.json hold no QC statistics)")
    A("")
    return L


def _examples(examples: list[str]) -> list[str]:
    """The example scenes (none: no section)."""
    L: list[str] = []
    A = L.append
    if examples:
        A("## Examples")
        A("")
        A("LR (left, Sentinel-2, nearest-neighbour zoom) and the 10 x 10 HR mosaic (right, NAIP) with the tile grid "
          "and each tile's dominant concept (largest area fraction in `tile_frac`). Made with "
          "`gl10m show KEY --shards W/shards -o out.png`.")
        A("")
        for i, key in enumerate(examples):
            A(f"### `{key}`")
            A("")
            A(f"![example {i}: {key}](card/example_{i}.png)")
            A("")
    return L


def _loading(bands: str = "rgb") -> list[str]:
    """How to load the shards: gl10m, webdataset, Hugging Face datasets, the index."""
    L: list[str] = []
    A = L.append
    A("## Loading")
    A("")
    load_call = _data_load_call()
    if load_call:
        A("With gl10m installed, its documented loader (`help(gl10m.data.load)`):")
        A("")
        A("```python")
        A("from gl10m import data")
        A(f"ds = {load_call}")
        A("```")
        A("")
    A("Plain [webdataset](https://github.com/webdataset/webdataset):")
    A("")
    A("```python")
    A("import glob, webdataset as wds")
    A("urls = sorted(glob.glob(\"W/shards/train/*.tar\"))")
    A("ds = wds.WebDataset(urls, shardshuffle=False).decode(\"rgb8\")  # png/jpg -> uint8 HWC, .npy, .json")
    A("for s in ds:")
    A("    lr, tile_00, labels = s[\"lr.png\"], s[\"hr_00.jpg\"], s[\"labels.npy\"]")
    A("    tile_frac, meta = s[\"tile_frac.npy\"], s[\"meta.json\"]")
    if bands != "rgb":
        nm = smp.EXTRA[bands][0]
        A(f"    lr_{nm}, tile_00_{nm} = s[\"lr_{nm}.npz\"][\"{nm}\"], s[\"hr_00_{nm}.npz\"][\"{nm}\"]  # npz -> dict of arrays")
    A("```")
    A("")
    if bands != "rgb":
        A(f"With gl10m, `data.load(..., bands=\"{bands}\")` also returns `lr_extra` and `hr_extra` (the requested "
          "tiles' extra bands, read by offset like the tiles).")
        A("")
    A("Hugging Face `datasets` (its `webdataset` builder; images come back as PIL images):")
    A("")
    A("```python")
    A("from datasets import load_dataset")
    A("files = {\"train\": \"W/shards/train/*.tar\", \"validation\": \"W/shards/val/*.tar\", \"test\": \"W/shards/test/*.tar\"}")
    A("ds = load_dataset(\"webdataset\", data_files=files, split=\"train\", streaming=True)")
    A("```")
    A("")
    A("Random access to one sample (or a few tiles) through the index, without scanning a shard:")
    A("")
    A("```python")
    A("from gl10m import inspect")
    A("s = inspect.load_sample(\"W/shards\", \"KEY\", tiles=[0, 9, 90, 99])  # gl10m.samples.Sample")
    A("```")
    A("")
    A("From the command line: `gl10m stats W/shards` (counts), `gl10m show KEY --shards W/shards -o out.png` "
      "(one sample), `gl10m export KEY --shards W/shards --out DIR` (one sample as GeoTIFFs), `gl10m verify "
      "W/shards` (checksums against the index, georeferencing against the footprints).")
    A("")
    return L


def _licences(profile, metas: list[tuple[str, dict]]) -> list[str]:
    """Licences and attribution of the three sources."""
    s2p = profile.imagery.s2
    s2_years = sorted({str(it.get("datetime"))[:4] for _, m in metas for it in (meta_get(m, "s2.items") or [])
                       if isinstance(it, dict) and it.get("datetime")})
    if not s2_years:
        s2_years = sorted({str(s2p.clip_start.year), str(s2p.clip_end.year)})
    cop_year = ", ".join(s2_years)
    L: list[str] = []
    A = L.append
    A("## Licences and attribution")
    A("")
    A("This dataset combines three sources, each under its own terms; keep these notices with any copy or "
      "derivative of the data:")
    A("")
    A("- **Labels: OpenStreetMap.** Map data (c) OpenStreetMap contributors, available under the Open Database "
      "License (ODbL) 1.0, https://www.openstreetmap.org/copyright. The labels (`labels.npy`, `tile_frac.npy`, "
      "concept names in `meta.json`) are derived from OpenStreetMap data; a derived database made public must "
      "be offered under the ODbL.")
    A("- **HR imagery: NAIP.** National Agriculture Imagery Program, USDA Farm Production and Conservation "
      "Business Center / Farm Service Agency (FSA). Public domain (US government work); credit USDA FSA.")
    A(f"- **LR imagery: Copernicus Sentinel-2.** Contains modified Copernicus Sentinel data [{cop_year}], "
      "processed by gl10m. Free and open use under the Copernicus data licence (legal notice on the use of "
      "Copernicus Sentinel Data and Service Information, EU Regulation 1159/2013).")
    A("")
    A("The card and its plots are generated from the data by `gl10m.card.write_card`; rebuilding the same "
      "shards gives the same card.")
    return L


def card_text(st: dict, manifest: dict, profile, metas: list[tuple[str, dict]], values: dict,
              examples: list[str], *, n_meta: int) -> str:
    """The card's Markdown: its sections in order."""
    splits = card_splits(st)
    sections = [_intro(st, profile, splits), _provenance(st, manifest, profile, metas),
                _per_state(st, profile, splits), _schema(profile), _concepts(st, profile, splits),
                _quality(st, profile, values, n_meta), _examples(examples), _loading(getattr(profile.imagery, "bands", "rgb")),
                _licences(profile, metas)]
    return "\n".join(line for lines in sections for line in lines) + "\n"
