"""The index pipeline end to end: real PBFs -> osm -> anchors, the ledger's skip/redo rules, Dask."""
import json
import shutil

import pytest
import yaml

from gl10m import profile as prof
from gl10m.ledger import Ledger
from gl10m.pipelines import index as ix
from tests.fixtures.pbf import write_region_pbf


@pytest.fixture
def world(tmp_path):
    raw = yaml.safe_load(prof.DEFAULT_PROFILE.read_text())
    write_region_pbf(tmp_path / "co.osm.pbf", -105.0, 39.7)
    write_region_pbf(tmp_path / "az.osm.pbf", -111.9, 33.4)
    raw["regions"] = {
        "CO": {**raw["regions"]["CO"], "pbf": "co.osm.pbf"},
        "AZ": {**raw["regions"]["AZ"], "pbf": "az.osm.pbf"},
    }
    raw["splits"]["schemes"]["paper"] = {"train": ["CO"], "val": [], "test": ["AZ"]}
    raw["splits"]["schemes"]["reference"] = {"train": ["CO"], "val": [], "test": ["AZ"]}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path, path, raw


def outcomes(wd):
    with Ledger.for_workdir(wd) as led:
        return {(o.stage, o.unit): (o.status, o.input_hash) for o in led.outcomes()}


def test_index_runs_skips_and_redoes_only_what_changed(world):
    root, path, raw = world
    wd = root / "work"
    p = prof.load(path)
    res = ix.run_index(p, wd, quiet=True)
    assert set(res.outcomes.values()) == {"ok"}
    for r in ("AZ", "CO"):
        feats = __import__("gl10m.osm", fromlist=["x"]).read_features(ix.osm_path(wd, r))
        assert len(feats) == 7
        cand = __import__("gl10m.anchors", fromlist=["x"]).read_candidates(ix.anchors_path(wd, r))
        assert len(cand) == 2 and set(cand["state"]) == {r}
        stats = json.loads((wd / "anchors" / f"{r}.stats.json").read_text())
        assert stats["scenes"] == 2 and stats["dropped_min_concepts"] >= 1
        assert (wd / "osm" / f"{r}.yield.csv").exists()
    first = outcomes(wd)
    mtimes = {f: f.stat().st_mtime_ns for f in (wd / "osm").iterdir()}

    # same inputs: nothing runs, the ledger says so
    res = ix.run_index(p, wd, quiet=True)
    assert all(v.startswith("skipped (ok)") for v in res.outcomes.values())
    assert {f: f.stat().st_mtime_ns for f in (wd / "osm").iterdir()} == mtimes

    # a geometry parameter changes: anchors rerun, osm does not
    raw["geometry"]["min_concepts"] = 3
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = ix.run_index(prof.load(path), wd, quiet=True)
    assert res.outcomes[("osm", "CO")].startswith("skipped") and res.outcomes[("anchors", "CO")] == "ok"
    after = outcomes(wd)
    assert after[("osm", "CO")] == first[("osm", "CO")]
    assert after[("anchors", "CO")][1] != first[("anchors", "CO")][1]

    # one region's PBF changes: only that region reruns, both stages
    write_region_pbf(root / "co.osm.pbf", -105.0, 39.7, extra_pool=True)
    p3 = prof.load(path)
    plans = {(q.stage, q.region): q for q in ix.run_index(p3, wd, dry_run=True).plans}
    assert plans[("osm", "CO")].run and plans[("osm", "CO")].why == "inputs changed"
    assert not plans[("osm", "AZ")].run and not plans[("anchors", "AZ")].run
    res = ix.run_index(p3, wd, quiet=True)
    assert res.outcomes[("osm", "CO")] == "ok" and res.outcomes[("osm", "AZ")].startswith("skipped")


def test_a_concept_rule_change_reruns_osm(world):
    root, path, raw = world
    wd = root / "work"
    ix.run_index(prof.load(path), wd, quiet=True, stages=("osm",))
    raw["concepts"][32]["rule"] = {"leisure": ["park", "garden"]}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    plans = ix.run_index(prof.load(path), wd, dry_run=True, stages=("osm",)).plans
    assert all(q.run and q.why == "inputs changed" for q in plans)


def test_missing_output_is_redone_and_bad_region_does_not_stop_the_run(world):
    root, path, raw = world
    wd = root / "work"
    ix.run_index(prof.load(path), wd, quiet=True)
    ix.anchors_path(wd, "AZ").unlink()
    (root / "co.osm.pbf").write_bytes(b"this is not a pbf")
    res = ix.run_index(prof.load(path), wd, quiet=True)
    assert res.outcomes[("anchors", "AZ")] == "ok"
    assert res.outcomes[("osm", "CO")].startswith(("rejected", "failed"))
    assert res.outcomes[("anchors", "CO")] == "waiting for osm"
    assert ix.anchors_path(wd, "AZ").exists()


def test_missing_pbf_is_a_typed_outcome(world):
    root, path, raw = world
    (root / "az.osm.pbf").unlink()
    res = ix.run_index(prof.load(path), root / "work", quiet=True, stages=("osm",))
    assert res.outcomes[("osm", "AZ")].startswith("rejected")
    assert res.outcomes[("osm", "CO")] == "ok"


@pytest.mark.timeout(300)
def test_dask_run_equals_in_process_run(world):
    root, path, raw = world
    from gl10m.pipelines.runner import ClusterOptions, dask_client

    p = prof.load(path)
    ix.run_index(p, root / "a", quiet=True, n_partitions=2)
    with dask_client(ClusterOptions(workers=2, processes=False), quiet=True) as client:
        res = ix.run_index(p, root / "b", quiet=True, client=client, n_partitions=2)
    assert set(res.outcomes.values()) == {"ok"}
    for r in ("AZ", "CO"):
        assert ix.anchors_path(root / "a", r).read_bytes() == ix.anchors_path(root / "b", r).read_bytes()
        assert ix.osm_path(root / "a", r).read_bytes() == ix.osm_path(root / "b", r).read_bytes()


@pytest.mark.timeout(300)
def test_cli_index_on_a_local_cluster_then_nothing_to_do(world):
    import subprocess
    import sys

    root, path, raw = world
    cmd = [sys.executable, "-m", "gl10m.cli", "index", "-p", str(path), "-w", str(root / "w"), "--workers", "1",
           "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "dashboard" not in r.stderr  # --quiet
    assert ix.anchors_path(root / "w", "CO").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    dry = subprocess.run(cmd[:-3] + ["--dry-run"], capture_output=True, text=True, timeout=240)
    assert dry.returncode == 0 and "skip" in dry.stdout and "run" not in dry.stdout.replace("dry-run", "")
    st = subprocess.run([sys.executable, "-m", "gl10m.cli", "status", "-w", str(root / "w")],
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "anchors" in st.stdout and "osm" in st.stdout
