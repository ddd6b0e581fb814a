"""Bad inputs fail clearly, and leave nothing half-written (issue #9).

For every bad input the user gets either a non-zero exit with exactly one clear error line on
stderr and no Python traceback (user errors: the real ``gl10m`` console script, in a
subprocess), or a typed outcome (a ``rejected:<reason>`` fetch, a ``rejected``/``failed`` ledger
row); and the output folders hold no partial output or temp file afterwards.

Covered elsewhere, not repeated here:
* junk bytes as a PBF, a missing PBF, a bad node index (library): tests/test_osm.py::test_bad_inputs;
  a missing or undecodable PBF in the index pipeline: tests/test_pipeline_index.py
  (test_missing_pbf_is_a_typed_outcome, test_missing_output_is_redone_and_bad_region_does_not_stop_the_run);
* a missing or truncated COG on disk, a 404 over HTTP: tests/test_fetch.py (test_missing_asset,
  test_corrupt_asset, test_http_404_is_asset_missing); those faults in a served world ending as
  typed rejections in the ledger: tests/test_pipeline_download.py::test_deliberate_faults_become_the_right_typed_rejections;
* every profile field rule (library): tests/test_profile.py::test_bad_values_give_one_error_naming_the_field;
* ``--states CA,ZZ``, ``--stage``, ``--workers 0``, ``status`` / ``osm`` / ``profile check`` on
  missing paths: tests/test_cli.py::test_user_errors_are_one_line_without_traceback;
* an interrupted atomic write: tests/test_io.py; a killed download: tests/test_pipeline_download.py.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from gl10m import fetch, profile as profile_mod, samples
from gl10m.ledger import Ledger
from gl10m.pipelines import index as ix
from tests.fixtures.cogs import write_cog
from tests.fixtures.pbf import write_region_pbf
from tests.test_fetch import BOUNDS, FaultServer, _utm_box, make_naip, make_s2, naip_item, plan_row, s2_item

GL10M = Path(sys.executable).with_name("gl10m")  # the installed console script, as a user runs it


def gl10m(*args, cwd: Path, fsize_limit: int | None = None, timeout: float = 300, env: dict | None = None,
          prefix: tuple = ()):
    """Run the real `gl10m` console script; `fsize_limit` (bytes) caps every file it writes
    (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk); `prefix` wraps the
    command (see unprivileged())."""
    if not GL10M.exists():
        pytest.skip(f"{GL10M} is not installed (pip install -e .)")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    return subprocess.run([*prefix, str(GL10M), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=limit if fsize_limit else None)


def unprivileged(tmp_path: Path) -> tuple:
    """A command prefix under which file permissions hold: none for a normal user; for root,
    `setpriv` without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (root then obeys mode bits like any
    owner). Skips when neither is possible (root without setpriv, or not allowed to drop caps)."""
    if os.geteuid() != 0:
        return ()
    sp = shutil.which("setpriv")
    if sp is None:
        pytest.skip("running as root (which ignores file permissions) and no setpriv to drop that")
    caps = "-dac_override,-dac_read_search"
    prefix = (sp, "--bounding-set", caps, "--inh-caps", caps)
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o500)
    try:
        r = subprocess.run([*prefix, "touch", str(probe / "x")], capture_output=True, timeout=30)
    finally:
        probe.chmod(0o700)
        shutil.rmtree(probe)
    if r.returncode == 0 or b"Permission denied" not in r.stderr:
        pytest.skip(f"running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: {r.stderr[-200:]!r}")
    return prefix


def one_error_line(r) -> str:
    """The run failed with exactly one line on stderr and no traceback; returns that line."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def usage_error_line(r) -> str:
    """A usage error of the CLI framework: exit 2, click's 'Usage:'/'Try' hint lines, and
    exactly one 'Error:' line; no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and all(ln.startswith(("Usage:", "Try ", "Error:")) for ln in lines), r.stderr
    return errors[0]


def leftovers(root: Path) -> list[Path]:
    """Temp files of atomic writes, partial downloads, and anything left in W/tmp."""
    out = []
    for p in Path(root).rglob("*"):
        rel = p.relative_to(root).parts
        if p.name.startswith(".") or ".tmp" in p.name or p.name.endswith(".part") or "tmp" in rel[:-1]:
            out.append(p)
        elif rel[0] == "tmp" and p.is_file():
            out.append(p)
    return out


def ledger_rows(wd: Path, stage: str) -> dict:
    with Ledger.for_workdir(wd) as led:
        return {o.unit: o for o in led.outcomes(stage)}


# -- a small OSM world: two regions, each with its own PBF -----------------------------------------
@pytest.fixture(scope="module")
def osm_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("osm-world")
    good = write_region_pbf(root / "co.osm.pbf", -105.0, 39.7)
    write_region_pbf(root / "az.osm.pbf", -111.9, 33.4)
    data = good.read_bytes()
    assert len(data) > 200
    (root / "truncated.osm.pbf").write_bytes(data[: len(data) // 2])  # cut inside the data blob
    (root / "cut-header.osm.pbf").write_bytes(data[:10])              # cut inside the first blob header
    (root / "empty.osm.pbf").write_bytes(b"")
    return root


def write_profile(root: Path, name: str, co_pbf: str = "co.osm.pbf", *, node_index: str | None = None,
                  mutate=None) -> Path:
    raw = yaml.safe_load(profile_mod.DEFAULT_PROFILE.read_text())
    raw["regions"] = {"CO": {**raw["regions"]["CO"], "pbf": co_pbf},
                      "AZ": {**raw["regions"]["AZ"], "pbf": "az.osm.pbf"}}
    for scheme in ("paper", "reference"):
        raw["splits"]["schemes"][scheme] = {"train": ["CO"], "val": [], "test": ["AZ"]}
    if node_index:
        raw["osm"]["node_index"] = node_index
    if mutate:
        mutate(raw)
    path = root / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BAD_PBFS = {"truncated": "truncated.osm.pbf", "cut_header": "cut-header.osm.pbf", "empty": "empty.osm.pbf"}


# -- PBFs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(BAD_PBFS))
def test_bad_pbf_to_gl10m_osm_is_one_line_and_writes_nothing(osm_world, tmp_path, case):
    out = tmp_path / "out"
    r = gl10m("osm", osm_world / BAD_PBFS[case], "-o", out / "f.parquet", "--report", out / "y.csv", cwd=tmp_path)
    assert r.returncode == 2
    line = one_error_line(r)
    assert BAD_PBFS[case] in line and "cannot read as OSM PBF" in line
    assert not out.exists() or not list(out.rglob("*"))


@pytest.mark.parametrize("case", ["truncated", "empty"])
def test_bad_pbf_in_the_index_stage_is_a_rejected_region(osm_world, tmp_path, case):
    """`gl10m index --stage osm`: the bad region is rejected (one line naming it), the good one is
    done, and the bad one leaves no features, no temp file and no node-index file behind.
    (The exit code: test_a_rejected_region_makes_gl10m_index_exit_2.)"""
    prof = write_profile(osm_world, f"p-{case}.yaml", BAD_PBFS[case])
    wd = tmp_path / "W"
    r = gl10m("index", "-p", prof, "-w", wd, "--stage", "osm", "--no-dask", "-q", cwd=tmp_path)
    assert "Traceback" not in r.stderr, r.stderr
    line, last = [ln for ln in r.stderr.splitlines() if ln.strip()]  # the unit, then the closing line
    assert line.startswith("osm/CO: rejected:OsmError:") and "cannot read as OSM PBF" in line
    assert last.startswith("1 region rejected as bad input (osm 1)")
    rows = ledger_rows(wd, "osm")
    assert rows["CO"].status == "rejected" and rows["AZ"].status == "ok"
    assert not ix.osm_path(wd, "CO").exists() and ix.osm_path(wd, "AZ").exists()
    assert not leftovers(wd), leftovers(wd)


def test_a_rejected_region_makes_gl10m_index_exit_2(osm_world, tmp_path):
    prof = write_profile(osm_world, "p-exit.yaml", BAD_PBFS["truncated"])
    r = gl10m("index", "-p", prof, "-w", tmp_path / "W", "--stage", "osm", "--no-dask", "-q", cwd=tmp_path)
    assert "osm/CO: rejected" in r.stderr
    assert r.returncode == 2  # bad input (gl10m.outcomes)


def test_unreachable_pbf_url_is_failed_not_rejected(osm_world, tmp_path, monkeypatch):
    """A download that keeps failing is the network, not the input: `failed` (the next run
    retries it), not `rejected` (which a rerun would skip while the profile is unchanged)."""
    import socket

    from gl10m import pbf

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    prof = profile_mod.load(write_profile(osm_world, "p-url.yaml", f"http://127.0.0.1:{port}/co-240101.osm.pbf"))
    monkeypatch.setattr(pbf.time, "sleep", lambda s: None)  # the retries' backoff
    wd = tmp_path / "W"
    res = ix.run_index(prof, wd, regions=["CO"], stages=("osm",), quiet=True)
    assert res.outcomes[("osm", "CO")].startswith("failed:PbfUnavailable:"), res.outcomes
    assert "download failed" in res.outcomes[("osm", "CO")]
    with Ledger.for_workdir(wd) as led:
        assert led.get("osm", "CO").status == "failed"
        assert led.decide("osm", "CO", ix.osm_input_hash(prof, "CO"))[0]  # the next run tries again
    assert not ix.osm_path(wd, "CO").exists() and not leftovers(wd), leftovers(wd)


# -- the work dir on a full disk -------------------------------------------------------------------
def test_full_disk_in_the_osm_stage_is_failed_and_retried(osm_world, tmp_path):
    """Every file the run writes is capped at 64 KiB (RLIMIT_FSIZE: the kernel fails the write
    with EFBIG, as a full disk fails it with ENOSPC): the ledger fits, libosmium's node-index file
    does not. The region is `failed` (the machine, not the PBF: retried), not `rejected`; nothing
    is left in W; the next run, with room, does it."""
    prof = write_profile(osm_world, "p-disk.yaml")
    wd = tmp_path / "W"
    r = gl10m("index", "-p", prof, "-w", wd, "--states", "CO", "--stage", "osm", "--no-dask", "-q",
              cwd=tmp_path, fsize_limit=64 * 1024)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr  # transient: rerun (gl10m.outcomes)
    line, last = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert last.startswith("1 unit failed transiently (osm 1): rerun `gl10m index`"), last
    assert line.startswith("osm/CO: failed:OsmIOError:") and "File too large" in line, line
    assert "cannot read as OSM PBF" not in line  # the PBF is fine; do not blame it
    assert ledger_rows(wd, "osm")["CO"].status == "failed"
    assert not ix.osm_path(wd, "CO").exists()
    assert not leftovers(wd), leftovers(wd)
    again = gl10m("index", "-p", prof, "-w", wd, "--states", "CO", "--stage", "osm", "--no-dask", "-q", cwd=tmp_path)
    assert again.returncode == 0 and not again.stderr.strip(), again.stderr
    assert ledger_rows(wd, "osm")["CO"].status == "ok" and ix.osm_path(wd, "CO").exists()


def test_full_disk_writing_features_with_gl10m_osm(osm_world, tmp_path):
    """Node locations in RAM (flex_mem), so the GeoParquet write itself (pyarrow, C++) is what
    fails: one line, exit 2, and neither the output nor its temp file is left."""
    prof = write_profile(osm_world, "p-flex.yaml", node_index="flex_mem")
    out = tmp_path / "out"
    out.mkdir()
    r = gl10m("osm", osm_world / "co.osm.pbf", "-p", prof, "-o", out / "f.parquet", cwd=tmp_path,
              fsize_limit=4096)
    assert r.returncode == 2
    line = one_error_line(r)
    assert "f.parquet" in line and "File too large" in line
    assert list(out.iterdir()) == []


def test_enospc_at_fsync_fails_the_region_atomically(osm_world, tmp_path, monkeypatch):
    """ENOSPC where a real file system reports it late: at fsync, after the bytes were accepted.
    The temp file is removed, the output never appears, the region is `failed` and the next run
    (disk freed) completes it."""
    prof = profile_mod.load(write_profile(osm_world, "p-enospc.yaml", node_index="flex_mem"))
    wd = tmp_path / "W"
    real_fsync = os.fsync

    def full_disk_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(wd / "osm")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    res = ix.run_index(prof, wd, regions=["CO"], stages=("osm",), quiet=True)
    assert res.outcomes[("osm", "CO")].startswith("failed:OsmIOError:")
    assert "No space left on device" in res.outcomes[("osm", "CO")]
    assert not ix.osm_path(wd, "CO").exists() and not leftovers(wd), leftovers(wd)
    monkeypatch.setattr(os, "fsync", real_fsync)
    res = ix.run_index(prof, wd, regions=["CO"], stages=("osm",), quiet=True)
    assert res.outcomes[("osm", "CO")] == "ok" and ix.osm_path(wd, "CO").exists()


# -- output folders that cannot be written -------------------------------------------------------
def _output_cases(blocked: Path, pbf: Path, prof: Path):
    return {
        "index -w": (["index", "-p", prof, "-w", blocked / "W", "--no-dask", "-q"], "work dir"),
        "download -w": (["download", "-p", prof, "-w", blocked / "W", "--no-dask", "-q"], str(blocked / "W")),
        "shard -w": (["shard", "-p", prof, "-w", blocked / "W", "-q"], str(blocked / "W")),
        "osm -o": (["osm", pbf, "-p", prof, "-o", blocked / "f.parquet"], "f.parquet"),
    }


@pytest.mark.parametrize("case", ["index -w", "download -w", "shard -w", "osm -o"])
def test_output_under_a_regular_file(osm_world, tmp_path, case):
    """An output path whose parent is a regular file (root ignores permissions; this cannot be
    written by anyone): one line, nothing created."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    prof = write_profile(osm_world, "p-out.yaml", node_index="flex_mem")
    args, needle = _output_cases(blocker, osm_world / "co.osm.pbf", prof)[case]
    r = gl10m(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    assert blocker.read_text() == "a file, not a folder"


def test_work_dir_that_is_a_file(osm_world, tmp_path):
    f = tmp_path / "W"
    f.write_text("x")
    r = gl10m("index", "-p", write_profile(osm_world, "p-wf.yaml"), "-w", f, "--no-dask", "-q", cwd=tmp_path)
    assert r.returncode == 2 and "is a file, not a folder" in one_error_line(r)
    assert f.read_text() == "x"


@pytest.mark.parametrize("case", ["index -w", "download -w", "shard -w", "osm -o"])
def test_non_writable_output_dir(osm_world, tmp_path, case):
    """chmod 0o500 on the output's parent. As root, run without the capability that lets root
    ignore permissions (setpriv); skipped where that cannot be done."""
    prefix = unprivileged(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    prof = write_profile(osm_world, "p-ro.yaml", node_index="flex_mem")
    args, _ = _output_cases(ro, osm_world / "co.osm.pbf", prof)[case]
    ro.chmod(0o500)
    try:
        r = gl10m(*args, cwd=tmp_path, prefix=prefix)
        assert r.returncode == 2
        line = one_error_line(r)
        assert str(ro) in line and ("permission denied" in line.lower() or "not writable" in line
                                    or "run `gl10m index` first" in line or "nothing to shard" in line)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


# -- imagery: corrupt and missing assets, wrong CRS ----------------------------------------------------
@pytest.fixture(scope="module")
def cogs(tmp_path_factory):
    """One NAIP quarter-quad covering the footprint, one Sentinel-2 granule, and broken files."""
    root = tmp_path_factory.mktemp("cogs")
    x0, y0, x1, y1 = _utm_box(26911)
    x0, y0, x1, y1 = np.floor(x0) - 20, np.floor(y0) - 20, np.ceil(x1) + 20, np.ceil(y1) + 20
    w = {"root": root, "box": (x0, y0, x1, y1), "naip": make_naip(root, "full", x0, x1, y0, y1), "s2": make_s2(root, "a")}
    data = Path(w["naip"]).read_bytes()
    bad = root / "naip" / "bad"
    bad.mkdir()
    (bad / "truncated.tif").write_bytes(data[: len(data) * 2 // 3])
    (bad / "empty.tif").write_bytes(b"")
    (bad / "html.tif").write_bytes(b"<html><body>Service temporarily unavailable</body></html>\n" * 20)
    # the same pixels and numbers, georeferenced as UTM zone 12: the item says zone 11
    with rasterio.open(w["naip"]) as src:
        arr, prof = src.read(), src.profile
    prof.update(driver="GTiff", crs="EPSG:26912")
    for k in ("blockxsize", "blockysize", "tiled", "interleave"):
        prof.pop(k, None)
    with rasterio.open(bad / "zone12.tif", "w", **prof) as dst:
        dst.write(arr)
    prof.update(crs=None)
    with rasterio.open(bad / "nocrs.tif", "w", **prof) as dst:
        dst.write(arr)
    # a consistent NAIP quarter-quad in a geographic CRS (not UTM): a constant colour
    w_, s_, e_, n_ = BOUNDS
    res = 1e-5
    width, height = int(round((e_ - w_ + 0.002) / res)), int(round((n_ - s_ + 0.002) / res))
    colour = np.array([120, 80, 40, 77], np.uint8)[:, None, None] * np.ones((1, height, width), np.uint8)
    w["geo"] = write_cog(root / "naip" / "geo.tif", colour, 4326, w_ - 0.001, n_ + 0.001, res)
    return w


@pytest.fixture(scope="module")
def prof():
    return profile_mod.load()


@pytest.fixture(scope="module")
def small(prof):
    """32-px LR and HR tiles: fast, for outcomes decided before a sample is written."""
    return prof.model_copy(update={"geometry": prof.geometry.model_copy(update={"tile_px": 32, "lr_px": 32})})


def _row(cogs, naip_href, *, naip_epsg=26911, s2_epsg=32611, key="CA-000001"):
    s2 = s2_item("S2A_20230501", "2023-05-01", "05.09", cogs["s2"])
    s2["epsg"] = s2_epsg
    naip = naip_item("ca_m_qq", str(naip_href))
    naip["epsg"] = naip_epsg
    return plan_row([s2], [naip], key=key)


@pytest.fixture
def http(cogs):
    s = FaultServer(cogs["root"])
    yield s
    s.close()


@pytest.mark.parametrize("name", ["truncated.tif", "empty.tif", "html.tif"])
def test_corrupt_naip_over_http_is_asset_corrupt_and_stages_nothing(cogs, http, small, tmp_path, name):
    """A truncated COG, an empty object, an HTML error page served with 200: each read over a real
    Range server after the LR image is composed; a typed rejection naming the asset, not a
    transient failure, and no staged folder or temp file."""
    row = _row(cogs, http.href(str(cogs["root"] / "naip" / "bad" / name)))
    s2 = json.loads(row["s2_items"])
    s2[0]["hrefs"] = {k: http.href(v) for k, v in s2[0]["hrefs"].items()}
    row["s2_items"] = json.dumps(s2)
    res = fetch.fetch_scene(row, small, tmp_path, gdal_env={"GDAL_HTTP_MAX_RETRY": 0},
                            retry_opts={"attempts": 2, "base_delay": 0.01, "max_delay": 0.02})
    assert (res.status, res.reason) == ("rejected", "asset_corrupt"), res
    assert res.detail["item"] == "ca_m_qq" and res.detail["asset"] == "image"
    assert list(tmp_path.iterdir()) == []


def test_rejected_refetch_removes_the_stale_sample(cogs, prof, tmp_path):
    """The pipeline's fetch step: a scene staged ok by an earlier run whose quarter-quad is now
    corrupt is rejected, and its old staged sample is removed (the shard stage must not pick it
    up); no temp folder remains."""
    from gl10m.pipelines.download import fetch_step

    wd = tmp_path / "W"
    ok = fetch_step(_row(cogs, cogs["naip"]), prof, str(wd), "http://127.0.0.1:9")
    staged = samples.staged_dir(wd, "train", "CA-000001")
    assert ok["status"] == "ok" and staged.is_dir()
    bad = fetch_step(_row(cogs, cogs["root"] / "naip" / "bad" / "truncated.tif"), prof, str(wd), "http://127.0.0.1:9")
    assert (bad["status"], bad["reason"]) == ("rejected", "asset_corrupt")
    assert not staged.exists()
    assert not leftovers(wd), leftovers(wd)


@pytest.mark.parametrize("case", ["naip_item_epsg_wrong", "naip_raster_in_another_zone", "naip_raster_without_crs",
                                  "s2_item_epsg_wrong"])
def test_wrong_crs_is_asset_corrupt(cogs, small, tmp_path, case):
    """The item's proj:epsg and the raster's own CRS must agree, and the raster must be
    georeferenced; otherwise pixels could land in the wrong place: a typed rejection."""
    bad = cogs["root"] / "naip" / "bad"
    row = {
        "naip_item_epsg_wrong": lambda: _row(cogs, cogs["naip"], naip_epsg=26912),       # raster is 26911
        "naip_raster_in_another_zone": lambda: _row(cogs, bad / "zone12.tif"),         # item says 26911
        "naip_raster_without_crs": lambda: _row(cogs, bad / "nocrs.tif"),
        "s2_item_epsg_wrong": lambda: _row(cogs, cogs["naip"], s2_epsg=32612),         # raster is 32611
    }[case]()
    res = fetch.fetch_scene(row, small, tmp_path)
    assert (res.status, res.reason) == ("rejected", "asset_corrupt"), res
    want_item = "S2A_20230501" if case.startswith("s2") else "ca_m_qq"
    assert res.detail["item"] == want_item
    msg = res.detail["message"]
    assert ("not georeferenced" in msg) if case.endswith("without_crs") else ("contradicts" in msg), msg
    assert list(tmp_path.iterdir()) == []


def test_naip_in_a_geographic_crs_is_warped_not_rejected(cogs, small, tmp_path, monkeypatch):
    """Not UTM is not wrong: a quarter-quad whose item and raster agree on EPSG:4326 is warped
    onto the HR grid like any other (its constant colour fills every tile)."""
    written = []
    monkeypatch.setattr(samples, "write_staged", lambda root, s: written.append(s) or Path(root))
    res = fetch.fetch_scene(_row(cogs, cogs["geo"], naip_epsg=4326), small, tmp_path)
    assert res.status == "ok", res
    hr = written[0].hr
    assert hr.shape == (100, 32, 32, 3)
    assert np.abs(hr.reshape(-1, 3).astype(int) - [120, 80, 40]).max() <= 1


# -- profiles -------------------------------------------------------------------------------------------
PROFILE_CASES = {
    "unknown_key": (lambda d: d["imagery"]["s2"].update(cloud_max=3), "imagery.s2.cloud_max: unknown key"),
    "bad_value": (lambda d: d["geometry"].update(grid="ten"), "geometry.grid"),
    "negative": (lambda d: d["qc"].update(black_level=-1), "qc.black_level"),
    "unknown_state_in_split": (lambda d: d["splits"]["schemes"]["paper"]["train"].append("XX"), "unknown regions ['XX']"),
    "bbox_three_numbers": (lambda d: d["regions"]["CA"].update(bbox=[1, 2, 3]), "regions.CA.bbox"),
    "bbox_string": (lambda d: d["regions"]["CA"].update(bbox="-124,32,-114,42"), "regions.CA.bbox"),
    "bad_date": (lambda d: d["imagery"]["naip"].update(end="2024-02-30"), "imagery.naip.end"),
}


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_bad_profile_via_profile_check_and_index(tmp_path, case):
    mutate, needle = PROFILE_CASES[case]
    raw = yaml.safe_load(profile_mod.DEFAULT_PROFILE.read_text())
    mutate(raw)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    r = gl10m("profile", "check", p, cwd=tmp_path)
    assert r.returncode == 2
    line = one_error_line(r)
    assert line.startswith("error: profile p.yaml: ") and needle in line, line
    r = gl10m("index", "-p", p, "-w", tmp_path / "W", "--no-dask", "-q", cwd=tmp_path)
    assert r.returncode == 2 and needle in one_error_line(r)
    assert not (tmp_path / "W").exists()


@pytest.mark.parametrize("case", ["not_yaml", "binary", "a_folder", "empty"])
def test_unreadable_profile_files(tmp_path, case):
    p = tmp_path / "p.yaml"
    if case == "not_yaml":
        p.write_text("name: [unclosed\n")
    elif case == "binary":
        p.write_bytes(bytes(range(256)) * 4)
    elif case == "a_folder":
        p.mkdir()
    else:
        p.write_text("")
    r = gl10m("profile", "check", p, cwd=tmp_path)
    assert r.returncode == 2
    assert one_error_line(r).startswith("error: profile ")


def test_error_messages_keep_their_square_brackets(tmp_path):
    raw = yaml.safe_load(profile_mod.DEFAULT_PROFILE.read_text())
    raw["regions"]["CA"]["bbox"] = [-114.13, 42.01, -124.48, 32.53]  # west > east
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    r = gl10m("profile", "check", p, cwd=tmp_path)
    assert "[west, south, east, north]" in one_error_line(r)


@pytest.mark.parametrize("command", ["index", "plan", "download", "shard"])
def test_unknown_state_creates_nothing(tmp_path, command):
    r = gl10m(command, "-w", tmp_path / "W", "--states", "XX", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown state XX" in one_error_line(r)
    assert not (tmp_path / "W").exists()


# -- CLI arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (("download", "-w", "W", "--no-such-flag"), "No such option: --no-such-flag"),
    (("download", "-w", "W", "--max-scenes", "many"), "'--max-scenes'"),
    (("index", "-w", "W", "--workers", "two"), "'--workers'"),
    (("shard", "-w", "W", "--shard-mb", "1.5"), "'--shard-mb'"),
    (("index",), "Missing option '--workdir'"),
    (("frobnicate",), "No such command 'frobnicate'"),
])
def test_usage_errors(tmp_path, args, needle):
    assert needle in usage_error_line(gl10m(*args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (("plan", "-w", "W", "--max-scenes", "-1"), "--max-scenes must be >= 0"),
    (("download", "-w", "W", "--max-scenes", "-1", "--no-dask"), "--max-scenes must be >= 0"),
    (("download", "-w", "W", "--max-scenes", "-1", "--quiet"), "--max-scenes must be >= 0"),
    (("index", "-w", "W", "--partitions", "0", "--no-dask"), "--partitions must be at least 1"),
    (("index", "-w", "W", "--threads", "0"), "--threads must be at least 1"),
    (("shard", "-w", "W", "--shard-mb", "0"), "--shard-mb must be at least 1"),
    (("show", "K", "--shards", ".", "-o", "x.png", "--mode", "3d"), "--mode must be dominant or outlines"),
])
def test_bad_option_values(tmp_path, args, needle):
    r = gl10m(*args, cwd=tmp_path)
    assert r.returncode == 2 and needle in one_error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_negative_max_scenes_fails_before_the_cluster_starts(tmp_path):
    r = gl10m("download", "-w", "W", "--max-scenes", "-3", cwd=tmp_path)
    assert r.returncode == 2 and "--max-scenes must be >= 0" in one_error_line(r)


@pytest.mark.parametrize("bbox", ["1,2,3", "west,south,east,north", "-100,40,-101,41", "0,0,1,1"])
def test_bad_bbox_option(tmp_path, bbox):
    r = gl10m("index", "-w", "W", f"--bbox={bbox}", "--dry-run", cwd=tmp_path)
    line = one_error_line(r)
    assert r.returncode == 2 and "--bbox" in line and "No such option" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (("download", "-w", "nowhere", "--no-dask"), "run `gl10m index` first"),
    (("plan", "-w", "nowhere"), "run `gl10m index` first"),
    (("shard", "-w", "nowhere"), "nothing to shard"),
    (("verify", "nowhere"), "nowhere: no such folder"),
    (("stats", "nowhere"), "no such shards folder"),
    (("show", "K", "--shards", "nowhere", "-o", "x.png"), "no such shards folder"),
    (("index", "-p", "nowhere.yaml", "-w", "W"), "profile nowhere.yaml: no such file"),
    (("osm", "nowhere.pbf", "-o", "x.parquet"), "nowhere.pbf: no such file"),
    (("testbed", "serve", "nowhere"), "nowhere does not exist"),
    (("testbed", "preview", "nowhere", "--state", "CA", "-o", "x.png"), "not a built testbed world"),
    (("model", "train", "--config", "nowhere.yaml", "--features", "nowhere", "--out", "O"), "nowhere.yaml"),
])
def test_missing_paths_are_one_line_and_create_nothing(tmp_path, args, needle):
    r = gl10m(*args, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert needle in one_error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_status_detail_on_a_missing_work_dir(tmp_path):
    r = gl10m("status", "-w", "nowhere", "--detail", cwd=tmp_path)
    assert r.returncode == 2 and "no ledger here" in one_error_line(r)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # ~25 s: it loads the text model before failing
def test_pretrain_encoder_on_missing_shards_is_one_line(tmp_path):
    r = gl10m("model", "pretrain-encoder", "nowhere", "out", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "not a shards folder" in one_error_line(r)
