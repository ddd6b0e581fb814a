"""The CLI as a user meets it: help that explains, one-line errors, exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

GL10M = [sys.executable, "-m", "gl10m.cli"]


def run(*args, **kw):
    return subprocess.run(GL10M + list(args), capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_the_stages():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("index", "status", "osm", "testbed", "profile"):
        assert cmd in r.stdout
    r = run("index", "--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--states" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (("index", "-w", "W", "--states", "CA,ZZ"), "unknown state ZZ"),
    (("index", "-w", "W", "--stage", "fetchx"), "unknown stage 'fetchx'"),
    (("index", "-w", "W", "--workers", "0"), "--workers must be at least 1"),
    (("profile", "check", "missing.yaml"), "no such file"),
    (("status", "-w", "nowhere"), "no ledger here"),
    (("osm", "absent.pbf", "-o", "x.parquet"), "absent.pbf: no such file"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, needle):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_profile_value_names_the_field(tmp_path):
    p = tmp_path / "p.yaml"
    from gl10m.profile import DEFAULT_PROFILE

    p.write_text(DEFAULT_PROFILE.read_text().replace("max_black_ratio: 0.25", "max_black_ratio: -1"))
    r = run("profile", "check", str(p))
    assert r.returncode == 2 and "qc.max_black_ratio" in r.stderr and "Traceback" not in r.stderr


def test_unknown_option_is_a_usage_error(tmp_path):
    r = run("index", "-w", "W", "--bogus", cwd=tmp_path)
    assert r.returncode == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr


def test_bbox_subset_keeps_the_index_inside_it(built_world, tmp_path):
    """`--bbox` clips the selected regions: every anchor footprint of the subset lies inside it."""
    import geopandas as gpd

    from gl10m import profile as prof

    p = prof.load(built_world / "profile.yaml")
    w, s, e, n = p.regions["TX"].bbox
    box = (w, s, w + 0.8 * (e - w), n)  # the western four fifths
    exe = str(Path(sys.executable).with_name("gl10m"))
    r = subprocess.run([exe, "index", "-p", str(built_world / "profile.yaml"), "-w", str(tmp_path / "W"),
                        "--states", "TX", "--bbox", ",".join(map(str, box)), "--no-dask", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    anchors = gpd.read_parquet(tmp_path / "W" / "anchors" / "TX.parquet")
    assert len(anchors)
    bw, bs, be, bn = anchors.total_bounds
    assert bw >= box[0] - 1e-9 and be <= box[2] + 1e-9 and bs >= box[1] - 1e-9 and bn <= box[3] + 1e-9
    full = subprocess.run([exe, "index", "-p", str(built_world / "profile.yaml"), "-w", str(tmp_path / "F"),
                           "--states", "TX", "--no-dask", "-q"], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    assert gpd.read_parquet(tmp_path / "F" / "anchors" / "TX.parquet").total_bounds[2] > box[2]  # it did clip
    sub, kept = p.subset(box, ["TX", "AZ"])
    assert kept == ["TX"] and sub.regions["TX"].bbox == box and sub.regions["AZ"].bbox == p.regions["AZ"].bbox
