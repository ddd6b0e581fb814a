"""`--concepts NAME,...` on the real pipeline: the served testbed world (tests/conftest.py's
built_world and built_server), index -> catalog -> plan -> fetch -> shard, the CLI and the ledger.

The subset is taken at plan (gl10m.plan.concept_subset): the index is the full one, the plan
holds the full run's eligible scenes that hold a named concept, subsampled within them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from gl10m import anchors
from gl10m import plan as planmod
from gl10m import profile as prof
from gl10m.ledger import Ledger
from gl10m.pipelines import download, index

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def catalogued(built_world, built_server, tmp_path_factory):
    """A work dir indexed and catalogued once (no plan yet); tests plan in copies of it."""
    wd = tmp_path_factory.mktemp("concepts-cat")
    p = prof.load(built_world / "profile.yaml")
    ix = index.run_index(p, wd, quiet=True)
    assert set(ix.outcomes.values()) == {"ok"}, ix.outcomes
    res = download.run_download(p, wd, stages=("catalog",), stac_url=built_server.stac_url, quiet=True)
    assert set(res.outcomes.values()) == {"ok"}, res.outcomes
    return p, wd


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _plan(p, wd, server, **kw):
    res = download.run_download(p, wd, stages=("catalog", "plan"), stac_url=server.stac_url, quiet=True, **kw)
    assert not res.failures(), res.outcomes
    return res


def _planned(p, wd) -> dict[str, set[int]]:
    """key -> concept ids of every planned scene of every region."""
    out = {}
    for r in sorted(p.regions):
        rows = planmod.read_plan(planmod.plan_path(wd, r))
        out.update({str(k): {int(c) for c in cs} for k, cs in zip(rows["key"], rows["concepts"])})
    return out


def _rejections(p, wd) -> dict[str, str]:
    frames = [pd.read_parquet(wd / "plan" / f"{r}.rejections.parquet") for r in sorted(p.regions)]
    df = pd.concat(frames, ignore_index=True)
    return dict(zip(df["key"], df["reason"]))


def _ledger(wd, stage) -> dict:
    with Ledger.for_workdir(wd) as led:
        return {o.unit: o for o in led.outcomes(stage)}


def _rare_concepts(planned: dict[str, set[int]], k: int = 2) -> list[int]:
    """The k concepts held by the fewest planned scenes (at least one), ties by id."""
    counts = Counter(c for cs in planned.values() for c in cs)
    return sorted(counts, key=lambda c: (counts[c], c))[:k]


def test_subset_holds_exactly_the_full_runs_scenes_with_a_named_concept(catalogued, built_server, tmp_path):
    p, base = catalogued
    full_wd, sub_wd = _copy(base, tmp_path / "full"), _copy(base, tmp_path / "sub")
    _plan(p, full_wd, built_server)
    full = _planned(p, full_wd)
    ids = _rare_concepts(full)
    want = {k for k, cs in full.items() if cs & set(ids)}
    assert want and want != set(full)  # a real subset of the planned scenes
    _plan(p, sub_wd, built_server, concepts=ids)
    sub = _planned(p, sub_wd)
    assert set(sub) == want
    assert all(sub[k] == full[k] for k in sub)  # every scene keeps all its labels
    # the other candidates: no_named_concept when they hold none; the full run's verdict otherwise
    rej_full, rej_sub = _rejections(p, full_wd), _rejections(p, sub_wd)
    cands = {}
    for r in sorted(p.regions):
        c = anchors.read_candidates(index.anchors_path(sub_wd, r))
        cands.update({planmod.scene_key(r, str(s)): {int(x) for x in cs} for s, cs in zip(c["scene_id"], c["concepts"])})
    for key, cs in cands.items():
        if not cs & set(ids):
            assert rej_sub[key] == planmod.NO_NAMED_CONCEPT, key
        elif key not in want:
            assert rej_sub[key] == rej_full[key] != planmod.NO_NAMED_CONCEPT, key
    assert set(cands) == set(sub) | set(rej_sub)
    scene_rows = _ledger(sub_wd, "plan-scene")
    assert {k for k, o in scene_rows.items() if o.status == "ok"} == want
    assert {k for k, o in scene_rows.items() if o.reason == planmod.NO_NAMED_CONCEPT} == {
        k for k, cs in cands.items() if not cs & set(ids)}
    for r in sorted(p.regions):
        names = [p.concepts[i].name for i in sorted(ids)]
        assert planmod.read_plan_stats(planmod.plan_path(sub_wd, r))["concepts"] == names
        assert planmod.read_plan_stats(planmod.plan_path(full_wd, r))["concepts"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subsampling_fills_the_target_from_the_subset(catalogued, built_server, tmp_path, seed):
    """Target 1 scene per state: the full run picks one scene; a concept held only by scenes it
    left out still gets a scene when named. Filtering the full run's pick would leave none."""
    p, base = catalogued
    full_wd = _copy(base, tmp_path / "full")
    _plan(p, full_wd, built_server, max_scenes=1, seed=seed)
    full, rej = _planned(p, full_wd), _rejections(p, full_wd)
    cands = {}
    for r in sorted(p.regions):
        c = anchors.read_candidates(index.anchors_path(full_wd, r))
        cands.update({planmod.scene_key(r, str(s)): {int(x) for x in cs} for s, cs in zip(c["scene_id"], c["concepts"])})
    left_out = [k for k, why in sorted(rej.items()) if why == planmod.SUBSAMPLED_OUT]
    state, chosen = None, None
    for k in left_out:  # a concept of a left-out scene that its state's chosen scene lacks
        st = k.split("-", 1)[0]
        picked = [cands[x] for x in full if x.startswith(f"{st}-")]
        extra = sorted(cands[k] - set().union(*picked))
        if extra:
            state, chosen = st, extra[0]
            break
    assert chosen is not None, "the full run's pick holds every concept of the scenes it left out"
    sub_wd = _copy(base, tmp_path / "sub")
    _plan(p, sub_wd, built_server, max_scenes=1, seed=seed, concepts=[chosen])
    sub = _planned(p, sub_wd)
    mine = [k for k in sub if k.startswith(f"{state}-")]
    assert len(mine) == 1 and chosen in sub[mine[0]]
    assert not [k for k, cs in full.items() if chosen in cs and k.startswith(f"{state}-")]  # filter-after: none
    assert all(chosen in cs for cs in sub.values())


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "gl10m.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_cli_subset_download_and_shard_record_it_and_rerun_is_a_no_op(catalogued, built_world, built_server, tmp_path):
    p, base = catalogued
    wd = _copy(base, tmp_path / "w")
    prof_path = built_world / "profile.yaml"
    c = anchors.read_candidates(index.anchors_path(wd, "TX"))
    tx = {planmod.scene_key("TX", str(s)): {int(x) for x in cs} for s, cs in zip(c["scene_id"], c["concepts"])}
    first, second = _rare_concepts(tx, k=2)
    names = [p.concepts[first].name]
    # index --concepts: the index is the full one (nothing reruns); it says how big the subset is
    r = _cli("index", "-p", prof_path, "-w", wd, "--states", "TX", "--concepts",
             f" {names[0].replace('_', ' ').upper()} ", "--no-dask", "-q")
    assert "nothing to do" in r.stdout
    n_sub = sum(1 for cs in tx.values() if first in cs)
    assert f"--concepts {names[0]}: {n_sub} of {len(tx)} TX candidates hold one of them" in r.stdout

    common = ["-p", prof_path, "-w", wd, "--states", "TX", "--stac-url", built_server.stac_url]
    _cli("download", *common, "--concepts", names[0], "--no-dask", "-q")
    _cli("shard", "-p", prof_path, "-w", wd, "--states", "TX", "--concepts", names[0], "-q")
    man = json.loads((wd / "shards" / "manifest.json").read_text())
    assert man["concept_subset"] == {"concepts": names, "ids": [first]}
    assert man["not_planned"].get(planmod.NO_NAMED_CONCEPT) == sum(1 for cs in tx.values() if first not in cs)
    idx = pd.read_parquet(wd / "shards" / "index.parquet")
    assert len(idx) >= 1 and all(k in tx and first in tx[k] for k in idx["key"])
    card = (wd / "shards" / "README.md").read_text()
    assert f"**Concept subset** (`--concepts`): only scenes holding at least one of `{names[0]}`" in card
    fetched = {k: o.updated for k, o in _ledger(wd, "fetch").items()}
    assert fetched and all(first in tx[k] for k in fetched)  # only scenes of the subset were fetched

    # the same command again: nothing is redone, nothing is rewritten
    before = {s: {k: o.updated for k, o in _ledger(wd, s).items()} for s in ("plan", "fetch", "shard")}
    shard_bytes = {f.name: f.read_bytes() for f in (wd / "shards").rglob("*") if f.is_file()}
    r = _cli("download", *common, "--concepts", names[0], "--no-dask", "-q")
    assert "nothing to fetch" in r.stdout
    r = _cli("shard", "-p", prof_path, "-w", wd, "--states", "TX", "--concepts", names[0], "-q")
    assert "nothing to do" in r.stdout
    assert {s: {k: o.updated for k, o in _ledger(wd, s).items()} for s in before} == before
    assert {f.name: f.read_bytes() for f in (wd / "shards").rglob("*") if f.is_file()} == shard_bytes

    # shard without the plan's subset: one line, exit 2, the shards untouched
    r = _cli("shard", "-p", prof_path, "-w", wd, "--states", "TX", "-q", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"the plan of TX was made with --concepts {names[0]}, this shard with no --concepts" in r.stderr
    assert {f.name: f.read_bytes() for f in (wd / "shards").rglob("*") if f.is_file()} == shard_bytes

    # another subset: the plan reruns, scenes fetched before are not fetched again
    both = sorted([first, second])
    both_names = [p.concepts[i].name for i in both]
    _cli("download", *common, "--concepts", ",".join(reversed(both_names)), "--no-dask", "-q")
    after = {k: o.updated for k, o in _ledger(wd, "fetch").items()}
    assert all(after[k] == v for k, v in fetched.items())
    planned = set(planmod.read_plan(planmod.plan_path(wd, "TX"))["key"])
    assert planned == {k for k in planned if tx[k] & set(both)} and planned <= set(after)
    assert _ledger(wd, "plan")["TX"].updated != before["plan"]["TX"]
    _cli("shard", "-p", prof_path, "-w", wd, "--states", "TX", "--concepts", ",".join(both_names), "-q")
    man = json.loads((wd / "shards" / "manifest.json").read_text())
    assert man["concept_subset"]["concepts"] == both_names
    assert set(pd.read_parquet(wd / "shards" / "index.parquet")["key"]) <= planned


@pytest.mark.parametrize("command", ["index", "plan", "download", "shard"])
def test_unknown_concept_is_one_line_with_suggestions_and_exit_2(command, tmp_path):
    wd = tmp_path / "W"
    r = _cli(command, "-w", wd, "--concepts", "tennis,swiming_pool", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: unknown concept 'swiming_pool' (did you mean: swimming_pool?)"], r.stderr
    assert not wd.exists()  # nothing created before the names were checked
