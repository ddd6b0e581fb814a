"""Inspection: stats from the index, samples read by offset, render/show pictures, errors."""
import io

import numpy as np
import pytest
from PIL import Image

from gl10m import inspect as gi
from gl10m import samples as smp
from gl10m import shards
from gl10m.errors import UserError
from tests.fixtures.samples import make_sample

LAYOUT = [("CA", "train")] * 3 + [("TX", "train")] * 1 + [("WA", "val")] * 2 + [("AZ", "test")] * 2


def make_meta(key, split, state, i):
    rng = np.random.default_rng(100 + i)
    meta = {
        "key": key, "split": split, "state": state, "scene_id": key.split("-")[1], "provider": "stac",
        "lr": {"px_m_x": 9.3, "px_m_y": 10.0},
        "naip": {"year": 2022 + i % 2, "date": f"{2022 + i % 2}-06-01", "items": [{"id": f"q{i}"}, {"id": f"r{i}"}]},
        "s2": {"window": "aligned" if i % 3 else "fallback", "start": "2023-01-01", "end": "2023-12-31",
               "items": [{"id": f"S2-{i}-{d}", "datetime": f"2023-0{d + 1}-10T18:00:00Z",
                          "scl": {"cloud": round(float(rng.random()) * 0.05, 4), "shadow": 0.01, "nodata": 0.0,
                                  "masked": 0.1, "valid": 0.9}} for d in range(1 + i % 3)],
               "excluded": []},
        "qc": {"black_level": 5, "max_black_ratio": 0.25, "lr_black_ratio": round(float(rng.random()) * 0.1, 4),
               "hr_black_ratio_max": round(float(rng.random()) * 0.2, 4),
               "s2_composite": {"dates": 1 + i % 3, "uncovered": 0.0, "min_obs": 1, "mean_obs": 1.5}},
        "profile": {"name": "gl10m-66", "version": 1, "hash": "0123456789abcdef"},
        "builder": {"name": "gl10m", "version": "0.1.0"},
    }
    if i == 0:  # one sample without QC statistics or S2 block: readers must skip what is missing
        del meta["qc"], meta["s2"]
    return meta


def make_shards(root):
    """Staged samples under root/w, shards in root/w/shards (two shards in train)."""
    w = root / "w"
    entries, made = [], {}
    for i, (state, split) in enumerate(LAYOUT):
        key = f"{state}-s{100 + i}"
        s = make_sample(key, split, i, look="ramp", meta=make_meta(key, split, state, i))
        entries.append(shards.Entry(key, split, state, smp.write_staged(w, s)))
        made[key] = s
    shards.build(entries, w / "shards", max_bytes=2 * 1024 * 1024,
                 manifest_extra={"profile": {"name": "gl10m-66", "version": 1, "hash": "0123456789abcdef"}})
    return w / "shards", made


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("inspect"))


def test_stats_numbers_equal_the_index(built):
    root, made = built
    idx = shards.read_index(root / "index.parquet")
    st = gi.stats(root)
    assert st["samples"] == {"train": 4, "val": 2, "test": 2} and st["total_samples"] == 8
    assert st["hr_tiles"] == 800
    assert st["states"] == {"train": {"CA": 3, "TX": 1}, "val": {"WA": 2}, "test": {"AZ": 2}}
    for split in ("train", "val", "test"):
        want = np.zeros(66, int)
        for key, s in made.items():
            if s.split == split:
                want += s.labels.astype(int)
        assert st["concept_counts"][split] == want.tolist()
        tars = sorted((root / split).glob("*.tar"))
        assert st["shards"][split] == len(tars)
        assert st["shard_bytes"][split] == sum(p.stat().st_size for p in tars)
    assert st["shards"]["train"] >= 2  # several shards per split are counted
    assert st["concept_counts"]["all"] == np.sum([s.labels for s in made.values()], axis=0).tolist()
    assert st["mean_sample_bytes"] == pytest.approx(idx["nbytes"].mean())
    for split in ("train", "val", "test"):
        assert st["mean_sample_bytes_split"][split] == pytest.approx(idx.loc[idx["split"] == split, "nbytes"].mean())
    assert st["concepts"][3] == "swimming_pool" and st["missing_shards"] == []
    text = gi.format_stats(st)
    assert "train" in text and " 8 " in text
    top = max(range(66), key=lambda c: (st["concept_counts"]["all"][c], -c))
    line = next(ln for ln in text.splitlines() if ln.split()[:2] == [str(top), st["concepts"][top]])
    assert line.split()[-1] == str(st["concept_counts"]["all"][top])


def test_stats_reports_a_missing_shard_file(built, tmp_path):
    import shutil

    root, _ = built
    copy = tmp_path / "shards"
    shutil.copytree(root, copy)
    victim = sorted((copy / "val").glob("*.tar"))[0]
    victim.unlink()
    st = gi.stats(copy)
    assert st["missing_shards"] == [f"val/{victim.name}"]
    assert "MISSING" in gi.format_stats(st)


def test_load_sample_reads_by_offset(built):
    root, made = built
    key = "WA-s104"
    s = gi.load_sample(root, key)
    ref = made[key]
    assert s.key == key and s.split == "val"
    assert np.array_equal(s.lr, ref.lr) and np.array_equal(s.labels, ref.labels)
    assert np.array_equal(s.tile_frac, ref.tile_frac)
    some = gi.load_sample(root, key, tiles=[0, 37, 99])
    assert some.tiles == (0, 37, 99) and some.hr.shape == (3, 268, 268, 3)
    assert np.array_equal(some.hr[1], s.hr[37])
    assert abs(int(s.hr[37][5, 5, 1]) - 74) <= 3  # tile 37 is where the index says (JPEG tolerance)
    every = gi.load_sample(root, key, tiles="all")  # as gl10m.data.load takes it
    assert every.tiles == tuple(range(100)) and np.array_equal(every.hr, s.hr)
    with pytest.raises(UserError, match="tiles must be 'all'"):
        gi.load_sample(root, key, tiles="some")


def test_unknown_key_and_bad_folders_are_one_line_errors(built, tmp_path):
    root, _ = built
    with pytest.raises(UserError, match="unknown sample key 'CA-nope'") as e:
        gi.show("CA-nope", root, tmp_path / "x.png")
    assert "\n" not in str(e.value) and not (tmp_path / "x.png").exists()
    with pytest.raises(UserError, match=r"did you mean .*CA-s100"):
        gi.load_sample(root, "CA-s10O")
    with pytest.raises(UserError, match="no such shards folder"):
        gi.stats(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no index.parquet"):
        gi.stats(tmp_path / "empty")
    with pytest.raises(UserError, match="unknown mode 'blobs'"):
        gi.show("CA-s100", root, tmp_path / "x.png", mode="blobs")


def _png(path_or_bytes):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("mode", ["dominant", "outlines"])
def test_show_png_holds_the_lr_pixels(built, tmp_path, mode):
    root, made = built
    key = "AZ-s106"
    out = gi.show(key, root, tmp_path / f"{mode}.png", mode=mode, zoom=2)
    assert out == tmp_path / f"{mode}.png"
    img = _png(out)
    fig = gi.render(gi.load_sample(root, key), mode=mode, zoom=2)
    fig.canvas.draw()
    bb = fig.axes[0].get_window_extent()
    assert img.shape[:2] == (round(fig.bbox.height), round(fig.bbox.width))
    x0, y0 = int(round(bb.x0)), int(round(img.shape[0] - bb.y1))
    panel = img[y0:y0 + 536, x0:x0 + 536]
    for dy in (0, 1):
        for dx in (0, 1):
            assert np.array_equal(panel[dy::2, dx::2], made[key].lr)
    assert out.read_bytes() == gi.show(key, root, tmp_path / "again.png", mode=mode, zoom=2).read_bytes()


def test_render_dominant_labels_each_tile_with_its_largest_concept(built):
    root, made = built
    s = made["CA-s101"]
    labels = [f"L{c}" for c in range(66)]
    fig = gi.render(s, mode="dominant", concept_labels=labels, zoom=3)
    lr_ax, hr_ax = fig.axes[:2]
    assert np.array_equal(np.asarray(lr_ax.images[0].get_array()), s.lr)
    frac = s.tile_frac.astype(np.float32)
    texts = {(int(t.get_position()[1] - 0.5), int(t.get_position()[0] - 0.5)): t.get_text() for t in hr_ax.texts}
    assert len(texts) == int((frac.max(axis=1) > 0).sum())
    for (r, c), text in texts.items():
        assert text.splitlines()[0] == labels[int(frac[r * 10 + c].argmax())]
    mos = np.asarray(hr_ax.images[0].get_array())
    assert mos.shape == (800, 800, 3)  # 10 tiles x round(268*3/10)


def test_outline_segments_trace_the_tile_region():
    mask = np.zeros((10, 10), bool)
    mask[2, 3] = mask[3, 3] = mask[3, 4] = True  # an L of three tiles: perimeter 8 tile edges
    segs = gi.outline_segments(mask, 0.0, res=4)
    length = np.abs(segs[:, 1] - segs[:, 0]).sum()
    assert length == pytest.approx(8.0)
    assert segs[..., 0].min() == 3 and segs[..., 0].max() == 5 and segs[..., 1].min() == 2 and segs[..., 1].max() == 4
    inset = gi.outline_segments(mask, 0.25, res=4)
    assert inset[..., 0].min() == pytest.approx(3.25) and inset[..., 1].max() == pytest.approx(3.75)
    assert len(gi.outline_segments(np.zeros((10, 10), bool))) == 0


def test_concept_names_come_from_the_manifest_when_no_profile_is_given(built, tmp_path):
    import json
    import shutil

    root, _ = built
    copy = tmp_path / "shards"
    shutil.copytree(root, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["concepts"] = [{"id": i, "name": f"thing_{i}", "label": f"Thing {i}"} for i in range(66)]
    (copy / "manifest.json").write_text(json.dumps(man))
    assert gi.stats(copy)["concepts"][3] == "thing_3"
    assert gi.concept_labels(66, None, copy)[65] == "Thing 65"
    from gl10m import profile as prof_mod

    assert gi.stats(copy, prof_mod.load())["concepts"][3] == "swimming_pool"  # an explicit profile wins
