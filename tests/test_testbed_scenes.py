"""`gl10m testbed scenes`: the model-scale synthetic world, written as `gl10m shard` writes.

One small world (N=12, seed 101) is built once, in-process without Dask (the step is a plain
function), and checked: the shard schema (verify, gl10m.data, plain webdataset), determinism
(a second build is byte-identical), splits, labels against the rendered truth, the HR-only
property, bad inputs, and resume after an interruption.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gl10m import profile as prof_mod
from gl10m import shards
from gl10m.errors import UserError
from gl10m.pipelines.scenes import build_world
from gl10m.testbed import scenes as S
from gl10m.testbed import visibility as V
from gl10m.testbed.classes import CONCEPT_NAMES, CID

N, SEED = 12, 101


@pytest.fixture(scope="module")
def profile():
    return prof_mod.load()


@pytest.fixture(scope="module")
def world(tmp_path_factory, profile):
    out = tmp_path_factory.mktemp("scenes") / "w"
    res = build_world(out, N, SEED, use_dask=False, truth=True, profile=profile, card=False)
    return res


def _digest_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_schema_is_the_shard_stage_schema(world):
    from gl10m import data, samples

    assert sum(world.samples.values()) == N and not world.failed
    assert shards.verify(world.shards_dir)["samples"] == N
    man = shards.read_index(world.shards_dir / shards.INDEX_NAME)
    assert len(man) == N
    for split in world.samples:
        for s in data.load(world.shards_dir, split):
            assert tuple(s["lr"].shape) == (3, 268, 268) and tuple(s["hr"].shape) == (100, 3, 268, 268)
            assert tuple(s["labels"].shape) == (66,) and tuple(s["tile_frac"].shape) == (100, 66)
            m = s["meta"]
            assert m["provenance"]["synthetic"] is True and m["provenance"]["seed"] == SEED
            assert m["key"] == f"{m['state']}-{m['scene_id']}" and m["split"] == split
            assert m["hr"]["px_m_x"] > 0 and m["lr"]["px_m_y"] > 0
            fp = m["footprint"]
            assert abs((fp["east"] - fp["west"]) - 0.024) < 1e-9
    # plain webdataset reads every field of every sample
    import webdataset as wds
    tars = sorted(str(p) for p in world.shards_dir.glob("*/*.tar"))
    got = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert len(got) == N and all(set(samples.FIELDS) <= set(g) for g in got)


def test_scenes_are_georeferenced_and_export(world, tmp_path):
    """Model-scale samples carry the same georef block as fetched ones (verify checks it against
    the footprint); `gl10m export` writes one at its footprint with its pixels."""
    import rasterio

    from gl10m import geometry
    from gl10m import inspect as insp
    from gl10m.export import export_sample

    idx = shards.read_index(world.shards_dir / shards.INDEX_NAME)
    for key in idx["key"]:
        m = insp.load_sample(world.shards_dir, key, tiles=[]).meta
        assert geometry.georef_problems(m, lr_size=268, tile_size=268) == [], key
        assert m["georef"]["crs"] == "EPSG:4326" and m["georef"]["tiles"]["grid"] == 10
    key = sorted(idx["key"])[0]
    s = insp.load_sample(world.shards_dir, key, tiles=[33])
    fp = s.meta["footprint"]
    w, so, e, n = (fp[c] for c in ("west", "south", "east", "north"))
    res = export_sample(world.shards_dir, key, tmp_path, tiles=[33])
    with rasterio.open(res.folder / "lr.tif") as d:
        assert tuple(d.bounds) == pytest.approx((w, so, e, n), abs=1e-12) and d.crs.to_epsg() == 4326
        np.testing.assert_array_equal(d.read().transpose(1, 2, 0), s.lr)
    with rasterio.open(res.folder / "hr_33.tif") as d:
        tw, th = (e - w) / 10, (n - so) / 10
        assert tuple(d.bounds) == pytest.approx((w + 3 * tw, n - 4 * th, w + 4 * tw, n - 3 * th), abs=1e-12)
        np.testing.assert_array_equal(d.read().transpose(1, 2, 0), s.hr[0])


def test_same_seed_and_n_give_byte_identical_shards(world, tmp_path, profile):
    again = build_world(tmp_path / "again", N, SEED, use_dask=False, profile=profile, card=False)
    a, b = _digest_tree(world.shards_dir), _digest_tree(again.shards_dir)
    assert a == b
    other = build_world(tmp_path / "other", 3, SEED + 1, use_dask=False, profile=profile, card=False)
    assert set(_digest_tree(other.shards_dir).values()).isdisjoint(
        v for k, v in a.items() if k.endswith(".tar"))


def test_splits_disjoint_and_proportional(world, profile):
    from gl10m.splits import border_drops

    idx = shards.read_index(world.shards_dir / shards.INDEX_NAME)
    assert dict(idx["split"].value_counts()) == S.split_counts(N, ["test", "train", "val"])
    for _, r in idx.iterrows():
        assert profile.split_of(r["state"]) == r["split"]
    # 2,000 scenes: ~83 / 8 / 9 %, distinct footprints, and the border rule drops nothing
    plans = S.plan_world(2000, 5, profile)
    c = {s: sum(p.split == s for p in plans) for s in ("train", "val", "test")}
    assert c == {"train": 1660, "val": 160, "test": 180}
    assert len({(p.lon, p.lat) for p in plans}) == 2000
    half = profile.geometry.footprint_deg / 2
    scenes = [{"key": str(p.index), "split": p.split, "state": p.state, "west": p.lon - half,
               "south": p.lat - half, "east": p.lon + half, "north": p.lat + half} for p in plans]
    assert border_drops(scenes, profile) == {}
    # every scene is its own layout: OSM ids never repeat across scenes
    bases = {p.id_base for p in plans}
    assert len(bases) == 2000


def test_every_biome_of_the_held_out_states_is_in_the_train_states(profile):
    """States are biome mixtures and every biome of a val/test state also occurs in a train state,
    so the held-out split judges new places, not new kinds of land; the plan draws them so."""
    from gl10m.testbed.scenes import STATE_LOOK, plan_world

    biomes = {s: set(STATE_LOOK[s][0]) for s in profile.regions if s in STATE_LOOK}
    train = set().union(*(b for s, b in biomes.items() if profile.split_of(s) == "train"))
    held = set().union(*(b for s, b in biomes.items() if profile.split_of(s) in ("val", "test")))
    assert held <= train, held - train
    plans = plan_world(600, 7, profile)
    seen = {sp: {p.biome for p in plans if p.split == sp} for sp in ("train", "val", "test")}
    assert seen["test"] <= seen["train"] and len(seen["train"]) >= 4


def test_concept_budgets_follow_the_long_tail(profile):
    plans = S.plan_world(2000, 5, profile)
    asked = np.zeros(66, int)
    for p in plans:
        assert len(p.budget) >= 2
        for name in p.budget:
            asked[CID[name]] += 1
    assert asked.min() >= 4  # every concept asked for at N = 2,000
    assert asked[CID["forest"]] > 50 * asked[CID["wind_farm"]]  # rare ones stay rare


def test_labels_agree_with_the_rendered_truth(world):
    from gl10m import samples

    for folder in sorted((world.out_dir / "staged").glob("*/*")):
        if folder.is_dir() and not folder.name.startswith("."):
            s = samples.read_staged(folder, tiles=[])
            truth = np.load(world.out_dir / "truth" / f"{s.key}.npy")
            assert truth.shape == (2680, 2680)
            labelled = set(np.flatnonzero(s.labels))
            assert len(labelled) >= 2
            cls, cnt = np.unique(truth, return_counts=True)
            seen = {int(c) for c, k in zip(cls, cnt) if c < 66 and k >= 400}
            assert seen <= labelled, (s.key, seen - labelled)
            # per-tile fractions where the truth shows a concept clearly
            tiles = truth.reshape(10, 268, 10, 268).swapaxes(1, 2).reshape(100, -1)
            for c in seen:
                frac_truth = (tiles == c).mean(1)
                big = frac_truth > 0.5
                assert (s.tile_frac[big, c].astype(float) > 0.3).all(), (s.key, CONCEPT_NAMES[c])


def _marked_plan(profile):
    p = S.plan_world(1, 3, profile, states="TX")[0]
    return dataclasses.replace(p, budget={"tennis": 3, "soccer": 1, "american_football": 1, "solar_farm": 1,
                                          "cemetery": 1, "swimming_pool": 6, "forest": 2, "school": 1})


def test_hr_only_property_fails_without_markings(profile):
    """Detail finer than a 10 m pixel inside pitches, solar rows and graves: present with the
    marks layer, gone when the same scene is rendered without it."""
    plan = _marked_plan(profile)
    region = S.layout(plan, profile)
    with_marks = S.render_scene(plan, region, profile, keep_truth=True)
    without = S.render_scene(plan, region, profile, marks=False)
    ids = [CID[c] for c in ("tennis", "soccer", "american_football", "solar_farm", "cemetery")]
    mask = np.isin(with_marks.truth, ids)
    assert mask.sum() > 5000
    e_with = V.detail_energy(with_marks.hr, mask)
    e_without = V.detail_energy(without.hr, mask)
    assert e_with > 2.5 * e_without, (e_with, e_without)
    # small objects are never seen pure at 10 m, large cover is
    n_pool, pure_pool = V.lr_purity(with_marks.truth, CID["swimming_pool"])
    n_forest, pure_forest = V.lr_purity(with_marks.truth, CID["forest"])
    assert n_pool > 0 and pure_pool == 0
    assert pure_forest / n_forest > 0.5


def test_bad_inputs_exit_2(tmp_path):
    for args in (["--scenes", "0"], ["--scenes", "-3"], ["--scenes", "2", "--states", "XX"]):
        p = subprocess.run([sys.executable, "-m", "gl10m.cli", "testbed", "scenes", "--out", str(tmp_path / "o"),
                            "--seed", "1", *args], capture_output=True, text=True)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "error" in p.stderr
    f = tmp_path / "file"
    f.write_text("x")
    p = subprocess.run([sys.executable, "-m", "gl10m.cli", "testbed", "scenes", "--out", str(f / "sub"),
                        "--scenes", "2", "--seed", "1"], capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError):
        build_world(tmp_path / "o2", 0, 1, use_dask=False)


def test_resume_after_kill_gives_the_same_bytes(tmp_path, profile):
    """kill -9 mid-run, rerun: the scenes already staged are skipped and the shards come out
    byte-identical to an uninterrupted build."""
    n, seed = 4, 202
    ref = build_world(tmp_path / "ref", n, seed, use_dask=False, profile=profile, card=False)
    out = tmp_path / "killed"
    code = ("import sys, os, signal\n"
            "from gl10m.testbed import scenes as S\n"
            "orig = S.build_scene\n"
            "calls = []\n"
            "def once(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return orig(*a, **k)\n"
            "S.build_scene = once\n"
            "from gl10m.pipelines.scenes import build_world\n"
            f"build_world({str(out)!r}, {n}, {seed}, use_dask=False, card=False)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    assert not (out / "shards" / "manifest.json").exists()
    res = build_world(out, n, seed, use_dask=False, profile=profile, card=False)
    assert res.skipped == 2 and res.built == 2
    assert _digest_tree(res.shards_dir) == _digest_tree(ref.shards_dir)


@pytest.mark.slow
def test_every_concept_present_at_2000_scenes(tmp_path):
    res = build_world(tmp_path / "w2k", 2000, 9002, workers=2, card=False)
    idx = shards.read_index(res.shards_dir / shards.INDEX_NAME)
    counts = np.stack(idx["labels"].to_numpy()).sum(0)
    assert (counts > 0).all(), [CONCEPT_NAMES[i] for i in np.flatnonzero(counts == 0)]


def test_the_card_says_the_scenes_are_synthetic(world, profile, tmp_path):
    """The dataset card of a model-scale world says what it is (no PBF downloaded, no provider)."""
    import json
    import shutil

    from gl10m import card as cardmod

    sd = tmp_path / "shards"
    shutil.copytree(world.shards_dir, sd)  # the module's world stays as built
    cardmod.write_card(sd, profile)
    text = (sd / "README.md").read_text()
    man = json.loads((sd / shards.MANIFEST_NAME).read_text())
    assert "**Synthetic scenes**" in text and f"seed {man['synthetic']['seed']}" in text


def test_rerun_of_a_finished_world_leaves_the_shards_alone(tmp_path, profile):
    """A rerun that renders nothing and finds the shards written from the same inputs skips the
    shard step (says so); a changed or missing shard file makes it re-shard to the same bytes."""
    import time

    out = tmp_path / "w"
    first = build_world(out, 3, 303, use_dask=False, profile=profile, card=False)
    assert not first.shards_up_to_date
    before = _digest_tree(first.shards_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in first.shards_dir.rglob("*") if p.is_file()}
    time.sleep(0.01)
    again = build_world(out, 3, 303, use_dask=False, profile=profile, card=False)
    assert again.shards_up_to_date and again.built == 0 and again.skipped == 3
    assert again.samples == first.samples and again.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in first.shards_dir.rglob("*") if p.is_file()} == mtimes
    # other inputs (a smaller shard size) or a damaged file: the shard step runs again
    tar = sorted(first.shards_dir.glob("*/*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:-512])
    fixed = build_world(out, 3, 303, use_dask=False, profile=profile, card=False)
    assert not fixed.shards_up_to_date and _digest_tree(fixed.shards_dir) == before
    p = subprocess.run([sys.executable, "-m", "gl10m.cli", "testbed", "scenes", "--out", str(out), "--scenes", "3",
                        "--seed", "303", "--no-card", "--quiet"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "up to date" in " ".join(p.stdout.split()) and _digest_tree(first.shards_dir) == before  # rich wraps
    other = build_world(out, 3, 303, use_dask=False, profile=profile, card=False, max_bytes=1 << 20)
    assert not other.shards_up_to_date
