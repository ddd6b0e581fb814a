"""End to end against the served testbed: index -> catalog -> plan -> fetch -> shard.

A real world (gl10m.testbed.build: three regions, one per split, with the deliberate faults),
a real STAC API and Range HTTP server on 127.0.0.1, the real pipelines and the ledger.
"""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gl10m import plan as planmod
from gl10m import profile as prof
from gl10m import samples, shards
from gl10m.ledger import Ledger
from gl10m.pipelines import download, index, shard

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def run(built_world, built_server, tmp_path_factory):
    """One complete, uninterrupted run of the index and download stages."""
    wd = tmp_path_factory.mktemp("run")
    p = prof.load(built_world / "profile.yaml")
    ix = index.run_index(p, wd, quiet=True)
    assert set(ix.outcomes.values()) == {"ok"}, ix.outcomes
    snapshot = tmp_path_factory.mktemp("indexed")
    shutil.copytree(wd, snapshot, dirs_exist_ok=True)  # for the kill-and-resume run
    res = download.run_download(p, wd, stac_url=built_server.stac_url, quiet=True)
    return {"wd": wd, "profile": p, "res": res, "indexed": snapshot}


def ledger_rows(wd, stage):
    with Ledger.for_workdir(wd) as led:
        return {o.unit: o for o in led.outcomes(stage)}


def plan_rows(wd, p):
    rows = []
    for r in sorted(p.regions):
        rows += planmod.read_plan(planmod.plan_path(wd, r)).drop(columns="geometry").to_dict("records")
    return {r["key"]: r for r in rows}


def test_every_planned_scene_has_a_fetch_outcome(run):
    wd, p = run["wd"], run["profile"]
    planned = plan_rows(wd, p)
    fetched = ledger_rows(wd, "fetch")
    assert planned and set(fetched) == set(planned)
    assert {o.status for o in fetched.values()} <= {"ok", "rejected"}  # nothing transient here
    ok = [k for k, o in fetched.items() if o.status == "ok"]
    assert ok
    for k in ok:
        assert samples.staged_dir(wd, planned[k]["split"], k).is_dir()
    for k, o in fetched.items():
        if o.status != "ok":
            assert not samples.staged_dir(wd, planned[k]["split"], k).exists()


def test_deliberate_faults_become_the_right_typed_rejections(run, built_world):
    wd, p = run["wd"], run["profile"]
    faults = json.loads((built_world / "world.json").read_text())["faults"]
    kind_to_reason = {"black_wedge": "hr_black", "missing_href": "asset_missing", "corrupt_cog": "asset_corrupt"}
    planned = plan_rows(wd, p)
    fetched = ledger_rows(wd, "fetch")
    by_item = {f["item_id"]: f for f in faults}
    seen = set()
    for k, r in planned.items():
        used = [by_item[i["id"]] for i in json.loads(r["naip_items"]) if i["id"] in by_item]
        broken = [f for f in used if f["kind"] != "black_wedge"]
        o = fetched[k]
        if broken:
            # a missing or a corrupt quarter-quad: the scene is rejected for the one read first
            assert o.status == "rejected", (k, o.label)
            f = next(f for f in broken if f["item_id"] == o.detail.get("item"))
            assert o.reason == kind_to_reason[f["kind"]], (k, o.label)
            seen.add(f["kind"])
        elif used:
            # the wedge blackens part of a quarter-quad: scenes it reaches lose tiles, others pass
            assert o.status == "ok" or o.reason == "hr_black", (k, o.label)
            if o.reason == "hr_black":
                seen.add("black_wedge")
                assert o.detail["tiles"]
        else:
            assert o.reason not in ("asset_missing", "asset_corrupt", "hr_black"), (k, o.label)
    assert seen == {"black_wedge", "missing_href", "corrupt_cog"}


def test_samples_are_what_gl10m_defines(run):
    wd, p = run["wd"], run["profile"]
    planned = plan_rows(wd, p)
    ok = sorted(k for k, o in ledger_rows(wd, "fetch").items() if o.status == "ok")
    for k in ok:
        row = planned[k]
        s = samples.read_staged(samples.staged_dir(wd, row["split"], k))
        m = s.meta
        # footprint and grid: 268 px LR, 100 tiles of 268 px that tessellate the same footprint
        assert s.lr.shape == (268, 268, 3) and s.hr.shape == (100, 268, 268, 3)
        assert [m["footprint"][c] for c in ("west", "south", "east", "north")] == \
            pytest.approx([row[c] for c in ("west", "south", "east", "north")])
        assert m["footprint"]["east"] - m["footprint"]["west"] == pytest.approx(0.024)
        assert m["hr"]["width"] == m["hr"]["height"] == 2680 and m["lr"]["width"] == 268
        # the newest eligible NAIP state-year: TX 2024 is outside 2022-01-01..2024-04-01
        assert m["naip"]["year"] == {"TX": 2022, "WA": 2023, "AZ": 2023}[m["state"]]
        # harmonisation follows each item's baseline, never its date
        for it in m["s2"]["items"]:
            assert it["offset_subtracted"] == (1000 if it["baseline"] >= "04.00" else 0)
            assert it["cloud_cover"] < 2.0
        # the HR mosaic agrees with the LR composite (block means over the LR grid)
        mosaic = s.hr.reshape(10, 10, 268, 268, 3).transpose(0, 2, 1, 3, 4).reshape(2680, 2680, 3)
        down = mosaic.reshape(268, 10, 268, 10, 3).mean(axis=(1, 3))
        r = np.corrcoef(down.ravel(), s.lr.astype(float).ravel())[0, 1]
        assert r > 0.7, (k, r)
        # no black seams across quarter-quad borders in a kept sample
        black = ((mosaic[..., 0] <= 5) & (mosaic[..., 1] <= 5) & (mosaic[..., 2] <= 5)).mean()
        assert black < 0.01, (k, black)
        assert m["qc"]["hr_black_ratio_max"] < p.qc.max_black_ratio
        assert list(np.flatnonzero(s.labels)) == sorted(int(c) for c in row["concepts"])


def test_rerun_after_completion_fetches_nothing(run, built_server):
    wd, p = run["wd"], run["profile"]
    before = {k: o.updated for k, o in ledger_rows(wd, "fetch").items()}
    again = download.run_download(p, wd, stac_url=built_server.stac_url, quiet=True)
    assert again.counts["fetch"] and all(k.startswith("skipped") for k in again.counts["fetch"])
    assert all(v.startswith("skipped") for (s, _), v in again.outcomes.items() if s in ("catalog", "plan"))
    assert {k: o.updated for k, o in ledger_rows(wd, "fetch").items()} == before


def test_server_on_another_port_refetches_nothing(run, built_world):
    """Fetch hashes name item ids, not URLs: a world served again elsewhere is the same input."""
    from gl10m.testbed.serve import serve

    wd, p = run["wd"], run["profile"]
    with serve(built_world) as other:
        again = download.run_download(p, wd, stac_url=other.stac_url, quiet=True)
    assert all(k.startswith("skipped") for k in again.counts["fetch"])


def test_killed_download_resumes_to_the_same_samples(run, built_server, tmp_path):
    """kill -9 the CLI in the middle of fetch; a rerun completes with byte-identical samples."""
    wd_ref, p = run["wd"], run["profile"]
    wd = tmp_path / "w"
    shutil.copytree(run["indexed"], wd)
    cmd = [sys.executable, "-m", "gl10m.cli", "download", "-p", str(p.source), "-w", str(wd),
           "--stac-url", built_server.stac_url, "--no-dask", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if (wd / "ledger.sqlite").exists() and len(ledger_rows(wd, "fetch")) >= 2:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    proc.wait()
    assert killed, "the download finished before it could be killed"
    assert len(ledger_rows(wd, "fetch")) < len(ledger_rows(wd_ref, "fetch"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ref = {k: (o.status, o.reason) for k, o in ledger_rows(wd_ref, "fetch").items()}
    assert {k: (o.status, o.reason) for k, o in ledger_rows(wd, "fetch").items()} == ref
    a, b = wd_ref / "staged", wd / "staged"
    files_a = sorted(x.relative_to(a) for x in a.rglob("*") if x.is_file())
    files_b = sorted(x.relative_to(b) for x in b.rglob("*") if x.is_file())
    assert files_a == files_b and files_a
    for f in files_a:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert not [x for x in b.rglob(".*")]  # no temp files or folders left


def test_shards_from_the_run_verify_and_load(run):
    wd, p = run["wd"], run["profile"]
    res = shard.run_shard(p, wd, quiet=True)
    ok = {k for k, o in ledger_rows(wd, "fetch").items() if o.status == "ok"}
    assert sum(res.samples.values()) == len(ok) - len(res.dropped)
    assert shards.verify(res.out_dir)["samples"] == sum(res.samples.values())
    assert (res.out_dir / "README.md").exists()
    again = shard.run_shard(p, wd, quiet=True)
    assert again.status.startswith("skipped")
    data = pytest.importorskip("gl10m.data")
    train = list(data.load(res.out_dir, split="train", tiles=[0, 55, 99]))
    assert len(train) == res.samples.get("train", 0) > 0
    assert train[0]["hr"].shape == (3, 3, 268, 268)


def test_samples_are_georeferenced_and_export_where_the_footprint_says(run, tmp_path):
    """Every sample's meta.json georef places the LR image on its footprint and tile r*10+c at
    row r from the north, column c from the west (tile 0 NW, 99 SE); the loader returns them;
    `gl10m export` writes GeoTIFFs that open at those bounds with the sample's pixels."""
    import rasterio

    from gl10m import data, geometry

    wd, p = run["wd"], run["profile"]
    res = shard.run_shard(p, wd, quiet=True)  # done by the test above, or now
    n = 0
    for split in res.samples:
        for s in data.load(res.out_dir, split, tiles=[0, 9, 90, 99], georef=True):
            m = s["meta"]
            w, so, e, nn = (m["footprint"][c] for c in ("west", "south", "east", "north"))
            assert geometry.georef_problems(m, lr_size=268, tile_size=268) == [], s["key"]
            assert s["crs"] == "EPSG:4326" and s["bounds"].tolist() == pytest.approx([w, so, e, nn], abs=1e-12)
            tb = s["tile_bounds"].numpy()
            assert tb[0][[0, 3]].tolist() == [w, nn]                                   # tile 0: the NW corner
            assert tb[1][[2, 3]].tolist() == pytest.approx([e, nn], abs=1e-12)         # tile 9: NE
            assert tb[2][[0, 1]].tolist() == pytest.approx([w, so], abs=1e-12)         # tile 90: SW
            assert tb[3][[1, 2]].tolist() == pytest.approx([so, e], abs=1e-12)         # tile 99: SE
            assert m["georef"]["hr"]["width"] == 2680 and m["georef"]["tiles"]["width"] == 268
            n += 1
    assert n == sum(res.samples.values()) > 0
    key = sorted(shards.read_index(res.out_dir / shards.INDEX_NAME)["key"])[0]
    gl10m = Path(sys.executable).with_name("gl10m")
    r = subprocess.run([str(gl10m), "export", key, "--shards", str(res.out_dir), "--out", str(tmp_path), "--tiles",
                        "0,57"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from gl10m import inspect as insp

    sample = insp.load_sample(res.out_dir, key, tiles=[0, 57])
    fp = sample.meta["footprint"]
    w, so, e, nn = (fp[c] for c in ("west", "south", "east", "north"))
    with rasterio.open(tmp_path / key / "lr.tif") as d:
        assert d.crs.to_epsg() == 4326 and tuple(d.bounds) == pytest.approx((w, so, e, nn), abs=1e-12)
        np.testing.assert_array_equal(d.read().transpose(1, 2, 0), sample.lr)
    with rasterio.open(tmp_path / key / "hr_57.tif") as d:  # row 5 from the north, column 7 from the west
        tw, th = (e - w) / 10, (nn - so) / 10
        assert tuple(d.bounds) == pytest.approx((w + 7 * tw, nn - 6 * th, w + 8 * tw, nn - 5 * th), abs=1e-12)
        np.testing.assert_array_equal(d.read().transpose(1, 2, 0), sample.hr[1])
    bad = subprocess.run([str(gl10m), "export", "XX-nope", "--shards", str(res.out_dir), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown sample key" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_hash_names_items_not_urls(run, built_world, tmp_path):
    """Samples' meta carries the plan hash: it must not change when the world is served elsewhere,
    or rebuilt shards would differ only by the server's port."""
    from gl10m.testbed.serve import serve

    wd, p = run["wd"], run["profile"]
    w2 = tmp_path / "w"
    shutil.copytree(run["indexed"], w2)
    with serve(built_world) as other:
        download.run_download(p, w2, stages=("catalog", "plan"), stac_url=other.stac_url, quiet=True)
    a, b = plan_rows(wd, p), plan_rows(w2, p)
    assert set(a) == set(b)
    assert all(a[k]["plan_hash"] == b[k]["plan_hash"] for k in a)
    assert any(a[k]["naip_items"] != b[k]["naip_items"] for k in a)  # the hrefs did change


def test_two_shard_writers_leave_one_complete_result_or_a_clean_refusal(run, built_world, tmp_path):
    """Issue #21: `gl10m shard --force` twice at once on one work dir, with different --shard-mb,
    started at several offsets. Each time: one run completes and the other is refused at once
    (exit 2, one line naming the holder) or runs after it; the shards then verify, and the
    ledger's `shard ok` describes what is on disk (a plain rerun has nothing to do and verifies)."""
    gl10m = Path(sys.executable).with_name("gl10m")
    if not gl10m.exists():
        pytest.skip("gl10m is not installed")
    wd = tmp_path / "W"
    shutil.copytree(run["wd"], wd, ignore=shutil.ignore_patterns("shards"))
    prof = str(built_world / "profile.yaml")

    def start(mb: int) -> subprocess.Popen:
        return subprocess.Popen([str(gl10m), "shard", "-p", prof, "-w", str(wd), "--force", "--no-card", "-q",
                                 "--shard-mb", str(mb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    refused = 0
    for delay in (0.0, 0.05, 0.3, 0.8):
        a = start(2)
        time.sleep(delay)
        b = start(5)
        outs = [(p.wait(timeout=300), *p.communicate()) for p in (a, b)]
        codes = sorted(rc for rc, _, _ in outs)
        assert codes in ([0, 0], [0, 2]), [(rc, err[-1500:]) for rc, _, err in outs]
        for rc, _, err in outs:
            assert "Traceback" not in err
            if rc == 2:
                refused += 1
                lines = [ln for ln in err.splitlines() if ln.strip()]
                assert len(lines) == 1 and "is being written by pid" in lines[0], err
        manifest = json.loads((wd / "shards" / "manifest.json").read_text())
        assert shards.verify(wd / "shards", decode=False)["samples"] == sum(manifest["samples"].values())
        on_disk = sorted(p.name for p in (wd / "shards").rglob("*.tar"))
        assert on_disk == sorted(s["name"] for v in manifest["shards"].values() for s in v)
        assert not [p for p in (wd / "shards").rglob(".*")]  # no temp file of either run left
    assert refused >= 1  # at least one start overlapped
    again = subprocess.run([str(gl10m), "shard", "-p", prof, "-w", str(wd), "--no-card", "-q", "--shard-mb", "5"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
