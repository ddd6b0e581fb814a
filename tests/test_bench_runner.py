"""bench/run_all.py: runs the bench scripts, writes RESULTS.md with the machine, the ratios and
FAILED benches, atomically, and exits non-zero when a bench failed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "bench" / "run_all.py"

GOOD = '''\
"""A tiny bench that succeeds: fast thing vs slow thing."""
import argparse, json
ap = argparse.ArgumentParser()
ap.add_argument("--json")
a = ap.parse_args()
print("fast 40.0 items/s, slow 10.0 items/s")
rec = {"name": "fast thing", "value": 40.0, "unit": "items/s", "baseline_name": "slow thing",
       "baseline_value": 10.0, "ratio": 4.0, "higher_is_better": True,
       "meaning": "fast / slow items per second"}
if a.json:
    open(a.json, "w").write(json.dumps({"bench": "good", "params": {"n": 3}, "records": [rec]}))
'''

BAD = '''\
"""A tiny bench that fails."""
import sys
print("starting")
print("something went wrong: boom-7431", file=sys.stderr)
sys.exit(3)
'''


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(RUN_ALL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_runner_writes_ratios_failures_and_machine(tmp_path):
    bd = tmp_path / "benches"
    bd.mkdir()
    (bd / "good.py").write_text(GOOD)
    (bd / "zbad.py").write_text(BAD)
    (bd / "_helper.py").write_text("raise SystemExit('helpers are not benches')\n")
    (bd / "run_all.py").write_text("raise SystemExit('the runner is not a bench')\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "RESULTS.md"
    p = _run("--bench-dir", bd, "--out", out)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "== " in p.stdout and "good.py" in p.stdout and "zbad.py" in p.stdout
    assert "_helper" not in p.stdout and "run_all.py" not in p.stdout.replace(str(RUN_ALL), "")
    text = out.read_text()
    assert "## Machine" in text
    for key in ("CPU:", "Cores:", "RAM:", "OS:", "Python:"):
        assert key in text
    assert "Git commit:" in text and "Date:" in text
    # the good bench: its figure, baseline and ratio
    assert "| fast thing | 40.0 items/s | slow thing: 10.0 items/s | 4.00× |" in text
    assert "fast / slow items per second" in text
    # the bad one: FAILED with its stderr tail
    assert "FAILED" in text and "boom-7431" in text and "exit status 3" in text
    assert "helpers are not benches" not in text and "the runner is not a bench" not in text
    # atomic write: nothing but the report in the output folder
    assert sorted(x.name for x in out_dir.iterdir()) == ["RESULTS.md"]


def test_runner_only_and_all_ok(tmp_path):
    bd = tmp_path / "benches"
    bd.mkdir()
    (bd / "good.py").write_text(GOOD)
    (bd / "zbad.py").write_text(BAD)
    out = tmp_path / "R.md"
    p = _run("--bench-dir", bd, "--out", out, "--only", "good.py")
    assert p.returncode == 0, p.stdout + p.stderr
    text = out.read_text()
    assert "4.00×" in text and "FAILED" not in text and "zbad" not in text
    p = _run("--bench-dir", bd, "--out", out, "--only", "nosuch")
    assert p.returncode != 0 and "nosuch" in p.stderr


def test_runner_timeout_and_missing_json(tmp_path):
    bd = tmp_path / "benches"
    bd.mkdir()
    (bd / "nojson.py").write_text("import sys\nprint('no records here')\n")
    (bd / "slow.py").write_text("import time\ntime.sleep(60)\n")
    out = tmp_path / "R.md"
    p = _run("--bench-dir", bd, "--out", out, "--timeout", "2")
    assert p.returncode != 0
    text = out.read_text()
    assert "no JSON records" in text and "timed out after 2 s" in text


def test_a_bench_can_declare_a_longer_timeout(tmp_path):
    """`# run_all: timeout N` in a bench's head raises its limit above --timeout (never lowers it)."""
    bd = tmp_path / "benches"
    bd.mkdir()
    (bd / "long.py").write_text('"""A bench that needs 3 s."""\n# run_all: timeout 30\nimport time, sys\n'
                                'time.sleep(3)\nsys.exit(4)\n')
    (bd / "short.py").write_text('"""Asks for less than the default."""\n# run_all: timeout 1\nimport time, sys\n'
                                 'time.sleep(3)\nsys.exit(4)\n')
    out = tmp_path / "R.md"
    p = _run("--bench-dir", bd, "--out", out, "--timeout", "2")
    text = out.read_text()
    assert p.returncode != 0
    assert "timed out after 30 s" not in text and "exit" in text.split("## long")[1].split("## short")[0]
    assert "timed out after 2 s" in text.split("## short")[1]
    sys.path.insert(0, str(ROOT / "bench"))
    import run_all
    assert run_all.declared_timeout(ROOT / "bench" / "model_quality.py") >= 3600
    assert run_all.declared_timeout(bd / "nothing.py") == 0.0


def test_help_explains():
    p = _run("--help")
    assert p.returncode == 0
    for opt in ("--out", "--only", "--timeout", "--bench-dir"):
        assert opt in p.stdout


def test_bench_scripts_take_json():
    """Every real bench accepts --json (what the runner passes)."""
    for s in sorted((ROOT / "bench").glob("*.py")):
        if s.name == "run_all.py" or s.name.startswith("_"):
            continue
        p = subprocess.run([sys.executable, str(s), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 0 and "--json" in p.stdout, (s.name, p.stderr[-2000:])


@pytest.mark.slow
def test_real_runner_on_the_cheapest_bench(tmp_path):
    """The real anchors bench (~25-40 s on 2 shared cores) through the runner."""
    out = tmp_path / "R.md"
    p = _run("--only", "anchors", "--out", out, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    text = out.read_text()
    assert "## anchors" in text and "FAILED" not in text and "per-anchor cost" in text
    assert "×" in text


def test_results_helper_roundtrip(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _results
    finally:
        sys.path.remove(str(ROOT / "bench"))
    r = _results.record("a", 2.0, "s", "b", 4.0, higher_is_better=False, meaning="a / b")
    assert r["ratio"] == 0.5
    _results.write_json(tmp_path / "x.json", "t", [r], n=1)
    d = json.loads((tmp_path / "x.json").read_text())
    assert d["records"] == [r] and d["params"] == {"n": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["x.json"]
