"""imagery.bands end to end on the served testbed: index -> download -> shard in rgb, rgbn and raw,
checked against the truth the testbed was rendered from (gl10m.testbed: truth classes ->
materials -> MATERIAL_LOOKS surface reflectance), and rgb against main's bytes.
"""
import hashlib
import json
import shutil

import numpy as np
import pytest

from gl10m import compose
from gl10m import profile as prof
from gl10m import samples as smp
from gl10m import shards
from gl10m.pipelines import download, index, shard

pytestmark = pytest.mark.timeout(1500)
MAX_SCENES = 2  # per region: up to 6 scenes a mode
# sha256 over every staged file (key/field + bytes, sorted) of this run made by main (52a03a6, before
# imagery.bands existed) on the same world: the rgb default must stay byte-identical
MAIN_RGB_STAGED = "1bf7217f5687a1cb4a175a983bb1bddf884a193bb7eb1bfa9796fcf22f07dd37"


def _mode(p, bands):
    d = p.model_dump(mode="json", exclude={"source"})
    d["imagery"]["bands"] = bands
    return prof.from_dict(d, p.source)


def staged_digest(wd) -> str:
    h = hashlib.sha256()
    for folder in sorted((wd / "staged").glob("*/*")):
        if folder.name.startswith("."):
            continue
        for f in sorted(folder.iterdir()):
            h.update(f"{folder.name}/{f.name}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(built_world, built_server, tmp_path_factory):
    p = prof.load(built_world / "profile.yaml")
    base = tmp_path_factory.mktemp("bands-indexed")
    assert set(index.run_index(p, base, quiet=True).outcomes.values()) == {"ok"}
    out = {}
    for bands in ("rgb", "rgbn", "raw"):
        wd = tmp_path_factory.mktemp(f"bands-{bands}")
        shutil.copytree(base, wd, dirs_exist_ok=True)
        q = p if bands == "rgb" else _mode(p, bands)
        download.run_download(q, wd, stac_url=built_server.stac_url, max_scenes=MAX_SCENES, quiet=True)
        shard.run_shard(q, wd, quiet=True)
        folders = {f.name: f for f in (wd / "staged").glob("*/*") if not f.name.startswith(".")}
        out[bands] = {"wd": wd, "p": q, "folders": folders}
    assert out["rgb"]["folders"] and set(out["rgb"]["folders"]) == set(out["raw"]["folders"]) \
        == set(out["rgbn"]["folders"])
    return out


def test_rgb_default_is_byte_identical_to_main(runs):
    assert staged_digest(runs["rgb"]["wd"]) == MAIN_RGB_STAGED
    man = (runs["rgb"]["wd"] / "shards" / shards.MANIFEST_NAME).read_text()
    assert '"bands"' not in man


def test_extra_bands_leave_the_rgb_members_untouched(runs):
    """The same scenes in rgbn and raw: lr.png, every hr_NN.jpg, labels and tile fractions are the
    rgb run's bytes; only meta.json (bands, hashes) and the extra members are added or differ."""
    rgb = runs["rgb"]["folders"]
    for bands in ("rgbn", "raw"):
        for key, folder in runs[bands]["folders"].items():
            names = sorted(p.name for p in folder.iterdir())
            assert names == sorted(smp.fields_for(bands)), key
            for f in smp.FIELDS:
                if f != smp.META_FIELD:
                    assert (folder / f).read_bytes() == (rgb[key] / f).read_bytes(), (bands, key, f)
            meta = smp.decode_meta((folder / smp.META_FIELD).read_bytes())
            assert meta["bands"] == smp.extra_meta(bands)
            assert meta["bands"]["lr"]["scale"] == 1e-4 and meta["bands"]["lr"]["offset"] == 0.0


def test_rgbn_is_the_nir_of_raw(runs):
    for key, folder in runs["raw"]["folders"].items():
        raw = smp.read_staged(folder)
        nir = smp.read_staged(runs["rgbn"]["folders"][key])
        assert np.array_equal(nir.lr_extra[..., 0], raw.lr_extra[..., 3])
        assert np.array_equal(nir.hr_extra[..., 0], raw.hr_extra[..., 3])


def _truth_materials(world, meta) -> np.ndarray:
    """The truth's material name index per HR pixel of a sample (nearest resampling of the truth
    classes onto the HR grid; classes -> their default material)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    from gl10m.testbed.classes import CLASS_MATERIAL

    fp = meta["footprint"]
    grid = compose.footprint_grid((fp["west"], fp["south"], fp["east"], fp["north"]), 2680)
    with rasterio.open(world / "truth" / f"{meta['state']}.tif") as src:
        cls = np.full(grid.shape, 255, np.uint8)
        reproject(rasterio.band(src, 1), cls, dst_transform=grid.transform, dst_crs=grid.crs,
                  resampling=Resampling.nearest, dst_nodata=255)
    lut = np.zeros(256, np.int16) - 1
    lut[:len(CLASS_MATERIAL)] = CLASS_MATERIAL
    return lut[cls]


def test_raw_reflectance_is_the_rendered_surface_within_tolerance(runs, built_world):
    """Harmonised LR reflectance over pure water is the water look's (the +1000 offset removed:
    otherwise it would be 0.1 too high); NIR is far higher over vegetation than over water, at 10 m
    and at 1 m; the raw RGB is what lr.png was stretched from."""
    from gl10m.testbed.classes import MATERIALS
    from gl10m.testbed.surface import MATERIAL_LOOKS

    water_err, veg_nir, water_nir, hr_veg, hr_water, n_water = [], [], [], [], [], 0
    for key, folder in sorted(runs["raw"]["folders"].items()):
        s = smp.read_staged(folder)
        mat = _truth_materials(built_world, s.meta)
        refl = s.lr_extra.astype(np.float64) * 1e-4  # B02, B03, B04, B08
        valid = s.lr_extra.any(-1)
        # lr.png is the stretch of the same composite (rounding apart)
        lo, hi = s.meta["s2"]["stretch"]
        re = np.clip(np.floor((refl[..., [2, 1, 0]] - lo) * 255 / (hi - lo) + 0.5), 0, 255)
        assert np.abs(re - s.lr.astype(int))[valid].max() <= 1, key
        # LR pixels whose 10 x 10 m (and neighbours) hold one material only
        blocks = mat.reshape(268, 10, 268, 10).transpose(0, 2, 1, 3).reshape(268, 268, 100)
        pure = (blocks == blocks[..., :1]).all(-1) & (blocks[..., 0] >= 0)
        m0 = blocks[..., 0]
        core = pure.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                core &= np.roll(pure, (dy, dx), (0, 1)) & (np.roll(m0, (dy, dx), (0, 1)) == m0)
        core[[0, -1], :] = core[:, [0, -1]] = False
        core &= valid
        for mi, name in enumerate(MATERIALS):
            look = MATERIAL_LOOKS.get(name)
            if look is None:
                continue
            sel = core & (m0 == mi)
            if look.kind == "water" and name in ("water", "sea") and sel.any():
                want = np.array([look.rgbn[2], look.rgbn[1], look.rgbn[0], look.rgbn[3]])
                water_err.append(np.abs(np.median(refl[sel], axis=0) - want))
                water_nir += list(refl[sel][:, 3])
                n_water += int(sel.sum())
            if look.kind == "veg" and name in ("trees", "grass", "lawn", "crop") and sel.any():
                veg_nir += list(refl[sel][:, 3])
        hr_mat = mat.reshape(10, 268, 10, 268).transpose(0, 2, 1, 3).reshape(100, 268, 268)
        kinds = np.array([getattr(MATERIAL_LOOKS.get(n), "kind", "") for n in MATERIALS])
        hr_kind = np.where(hr_mat >= 0, kinds[np.clip(hr_mat, 0, None)], "")
        hr_veg += list(s.hr_extra[..., 3][hr_kind == "veg"][::97])
        hr_water += list(s.hr_extra[..., 3][hr_kind == "water"][::97])
    assert n_water >= 20 and len(veg_nir) >= 200, (n_water, len(veg_nir))
    assert np.max(water_err) < 0.02, water_err
    assert np.median(veg_nir) > 0.15 > 0.05 > np.median(water_nir)
    assert len(hr_veg) > 1000 and len(hr_water) > 100
    assert np.median(hr_veg) > 3 * np.median(hr_water) and np.median(hr_veg) > 80


def test_shards_of_every_mode_verify_and_load_their_bands(runs):
    pytest.importorskip("torch")
    from gl10m import data

    for bands in ("rgb", "rgbn", "raw"):
        out = runs[bands]["wd"] / "shards"
        assert shards.verify(out)["samples"] >= 1
        man = (out / shards.MANIFEST_NAME).read_text()
        assert (f'"bands": "{bands}"' in man) == (bands != "rgb")
        split = sorted(json.loads(man)["shards"])[0]
        if bands == "rgb":
            with pytest.raises(data.LoaderError, match="hold no extra bands"):
                data.load(out, split, bands="rgbn")
            continue
        g = next(iter(data.load(out, split, tiles=[0, 99], bands=bands)))
        c = 1 if bands == "rgbn" else 4
        assert tuple(g["lr_extra"].shape) == (c, 268, 268) and tuple(g["hr_extra"].shape) == (2, c, 268, 268)
        assert int(g["lr_extra"].max()) > 255  # reflectance * 10000, not a stretched byte
        card = (out / "README.md").read_text() if (out / "README.md").exists() else ""
        if card:
            assert f"hr_00_{smp.EXTRA[bands][0]}.npz" in card


def test_earth_engine_fills_the_same_extra_bands(runs, built_world, built_server):
    """The earthengine provider (the testbed's stand-in) gives a scene's extra bands close to the
    stac provider's: the same B08 and N, through computePixels."""
    from gl10m import fetch
    from gl10m.sources import earthengine as E
    from gl10m.sources.base import ReadContext
    from gl10m.sources.stac import StacProvider
    from gl10m.testbed.eeserver import serve_ee

    from gl10m import plan as planmod

    p = runs["raw"]["p"]
    rows = []
    for r in sorted(p.regions):
        rows += planmod.read_plan(planmod.plan_path(runs["raw"]["wd"], r)).drop(columns="geometry").to_dict("records")
    row = fetch.parse_row(next(r for r in rows if r["key"] in runs["raw"]["folders"]))
    b = fetch.row_bounds(row)
    lrg, hrg = compose.lr_grid(b, p), compose.hr_grid(b, p)
    with serve_ee(built_world) as srv:
        ee_p = E.EarthEngineProvider("testbed", url=srv.url, collections={
            p.imagery.s2.collection: E.S2_COLLECTION, p.imagery.naip.collection: E.NAIP_COLLECTION})
        lr, hr = ee_p.read_lr(row, lrg, p, ReadContext()), ee_p.read_hr(row, hrg, p, ReadContext())
        bands = {bb for req in srv.requests for bb in (req.get("body") or {}).get("bandIds") or []}
    st = StacProvider(built_server.stac_url)
    ref_lr, ref_hr = st.read_lr(row, lrg, p, ReadContext()), st.read_hr(row, hrg, p, ReadContext())
    assert {"B8", "N"} <= bands
    assert lr.extra.shape == ref_lr.extra.shape == (268, 268, 4) and lr.extra.dtype == np.uint16
    assert hr.extra.shape == ref_hr.extra.shape == (2680, 2680, 4) and hr.extra.dtype == np.uint8
    both = lr.extra.any(-1) & ref_lr.extra.any(-1)
    assert both.mean() > 0.5
    assert np.abs(lr.extra.astype(int) - ref_lr.extra.astype(int))[both].mean() < 60  # reflectance 0.006
    assert np.abs(hr.extra[..., 3].astype(int) - ref_hr.extra[..., 3].astype(int)).mean() < 3.0
