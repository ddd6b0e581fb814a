"""Run every benchmark in bench/ and write RESULTS.md: each figure as a ratio against its baseline
measured in the same run, with the machine described.

    .venv/bin/python bench/run_all.py --out bench/RESULTS.md          # what `make bench` runs
    .venv/bin/python bench/run_all.py --only osm --only shard --out /tmp/r.md

Every ``bench/*.py`` except this file and files whose name starts with ``_`` (helpers) is a
bench; they run one after the other, sorted by name, each in its own subprocess with this
interpreter and its default sizes, as ``python bench/NAME.py --json TMP``. A bench prints its
own human-readable table (shown here as it runs) and writes its figures as JSON records to TMP
(``bench/_results.py`` describes them). RESULTS.md gets a header (date, git commit, machine:
CPU model, logical cores, RAM, OS/kernel, Python and key package versions, load average), then
one table per bench: figure, value, baseline, ratio and what the ratio means, and the bench's
own output. A bench that exits non-zero, times out or writes no records is listed as FAILED
with the last lines of its stderr; the file is still written (atomically: a temp file in the
same folder, then os.replace) and this script then exits with status 1.

Absolute values depend on the machine and its load (the dev machines are shared); the ratios
are the figures to compare, since each baseline is measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGES = ("numpy", "torch", "shapely", "geopandas", "osmium", "rasterio", "simplejpeg", "webdataset")
TAIL_LINES = 25


# -- discovery and running -------------------------------------------------------------------------
def discover(bench_dir: Path, only: list[str] | None = None) -> list[Path]:
    """The bench scripts in `bench_dir`, sorted; `only` keeps those named (stem or file name)."""
    found = sorted(p for p in bench_dir.glob("*.py")
                   if p.name != Path(__file__).name and not p.name.startswith("_"))
    if not only:
        return found
    want = {Path(n).stem for n in only}
    unknown = want - {p.stem for p in found}
    if unknown:
        raise SystemExit(f"run_all: no bench named {', '.join(sorted(unknown))} in {bench_dir} "
                         f"(have: {', '.join(p.stem for p in found) or 'none'})")
    return [p for p in found if p.stem in want]


def run_bench(script: Path, timeout: float, cwd: Path) -> dict:
    """Run one bench with `--json`; echo its stdout live; return its outcome."""
    with tempfile.TemporaryDirectory(prefix="gl10m-run-all-") as td:
        jpath = Path(td) / "results.json"
        errpath = Path(td) / "stderr.txt"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        with open(errpath, "w+") as err:
            # own session: on a timeout the whole group (worker pools, servers) is ended
            proc = subprocess.Popen([sys.executable, str(script), "--json", str(jpath)], cwd=cwd, env=env,
                                    stdout=subprocess.PIPE, stderr=err, text=True, errors="replace",
                                    start_new_session=True)
            out_lines: list[str] = []

            def pump():
                for line in proc.stdout:
                    out_lines.append(line)
                    sys.stdout.write("   " + line)
                    sys.stdout.flush()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.wait()
            reader.join(timeout=10)
            err.seek(0)
            stderr = err.read()
        elapsed = time.perf_counter() - t0
        outcome = {"script": script, "rc": rc, "elapsed": elapsed, "stdout": "".join(out_lines),
                   "stderr": stderr, "records": [], "params": {}, "error": None}
        if timed_out:
            outcome["error"] = f"timed out after {timeout:.0f} s (killed)"
        elif rc != 0:
            outcome["error"] = f"exit status {rc}"
        else:
            try:
                data = json.loads(jpath.read_text())
                recs = data if isinstance(data, list) else data.get("records", [])
                if not recs:
                    raise ValueError("no records")
                outcome["records"] = recs
                outcome["params"] = {} if isinstance(data, list) else data.get("params", {})
            except (OSError, ValueError, AttributeError) as e:
                outcome["error"] = f"exit status 0 but no JSON records from --json ({e})"
        return outcome


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the machine -----------------------------------------------------------------------------------
def machine_info() -> list[tuple[str, str]]:
    info = [("CPU", _cpu_model())]
    n = os.cpu_count()
    cores = f"{n} logical"
    try:
        aff = len(os.sched_getaffinity(0))
        if aff != n:
            cores += f" ({aff} usable by this process)"
    except (AttributeError, OSError):
        pass
    info.append(("Cores", cores))
    info.append(("RAM", _ram()))
    info.append(("OS", f"{platform.platform()} (kernel {platform.release()})"))
    info.append(("Python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"))
    vers = []
    for p in PACKAGES:
        try:
            vers.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    info.append(("Packages", ", ".join(vers) or "none of " + ", ".join(PACKAGES)))
    try:
        la = os.getloadavg()
        info.append(("Load average at start", f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (1/5/15 min)"))
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024 ** 3:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def git_commit(cwd: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode:
            return "not a git checkout"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30).stdout
        if not dirty.strip():
            return sha.stdout.strip()
        files = [ln[3:] for ln in dirty.splitlines() if ln.strip()]
        more = f" and {len(files) - 8} more" if len(files) > 8 else ""
        return f"{sha.stdout.strip()}, with uncommitted changes to {', '.join(files[:8])}{more}"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


# -- the report ------------------------------------------------------------------------------------
def fmt(x) -> str:
    if x is None:
        return "–"
    x = float(x)
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_ratio(x) -> str:
    if x is None:
        return "–"
    x = float(x)
    return f"{x:.2f}×" if abs(x) < 100 else f"{x:,.0f}×"


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _meaning(r: dict) -> str:
    m = r.get("meaning") or f"{r.get('name')} / {r.get('baseline_name')}"
    hib = r.get("higher_is_better")
    if hib is not None and "better" not in m:
        m += f" ({'higher' if hib else 'lower'} is better)"
    if r.get("note"):
        m += f"; {r['note']}"
    return m


def render(outcomes: list[dict], started: dt.datetime, commit: str, machine: list[tuple[str, str]],
           bench_dir: Path, timeout: float) -> str:
    total = sum(o["elapsed"] for o in outcomes)
    L = ["# Benchmark results", "",
         "Written by `bench/run_all.py` (`make bench`). Every figure is compared with a baseline "
         "measured in the same run of the same bench on the same machine; absolute values depend on the "
         "machine and its load, the ratios are what to compare across machines.", "",
         "## Run", "",
         f"- Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')}",
         f"- Git commit: {commit}",
         f"- Benches: {len(outcomes)} from `{_rel(bench_dir)}`, each with its default sizes, "
         f"timeout {timeout:.0f} s each; total {total:.0f} s", "",
         "## Machine", ""]
    L += [f"- {k}: {v}" for k, v in machine]
    L += ["", "## Summary", "", "| bench | status | time |", "|---|---|---|"]
    for o in outcomes:
        status = "ok" if not o["error"] else f"**FAILED** ({_cell(o['error'])})"
        L.append(f"| `{_rel(o['script'])}` | {status} | {_secs(o['elapsed'])} |")
    for o in outcomes:
        L += ["", f"## {o['script'].stem} (`{_rel(o['script'])}`, {_secs(o['elapsed'])})", ""]
        doc = _first_doc_line(o["script"])
        if doc:
            L += [doc, ""]
        if o["error"]:
            tail = (o["stderr"].strip() or o["stdout"].strip() or "(no output)").splitlines()[-TAIL_LINES:]
            L += [f"**FAILED**: {o['error']}. Last lines of its "
                  f"{'stderr' if o['stderr'].strip() else 'output'}:", "", "```", *tail, "```"]
        else:
            if o["params"]:
                L += ["Parameters: " + ", ".join(f"{k}={v}" for k, v in o["params"].items()), ""]
            L += ["| figure | value | baseline | ratio | meaning of the ratio |", "|---|---|---|---|---|"]
            for r in o["records"]:
                unit = r.get("unit") or ""
                val = f"{fmt(r.get('value'))} {unit}".strip()
                base = "–"
                if r.get("baseline_name") is not None:
                    base = f"{_cell(r['baseline_name'])}: {fmt(r.get('baseline_value'))} {unit}".strip()
                ratio = r.get("ratio")
                L.append(f"| {_cell(r.get('name', '?'))} | {val} | {base} | "
                         f"{fmt_ratio(ratio)} | {_cell(_meaning(r))} |")
        if o["stdout"].strip():
            L += ["", "<details><summary>its output</summary>", "", "```", o["stdout"].rstrip(), "```", "",
                  "</details>"]
    return "\n".join(L) + "\n"


def _first_doc_line(script: Path) -> str:
    try:
        import ast

        doc = ast.get_docstring(ast.parse(script.read_text()))
        return doc.strip().splitlines()[0] if doc else ""
    except (OSError, SyntaxError, ValueError):
        return ""


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def declared_timeout(script: Path) -> float:
    """A bench may ask for a longer limit than the default with a line ``# run_all: timeout N``
    (seconds) among its first 40 lines (the model-quality bench builds a world and trains a
    model); 0 when it does not."""
    import re

    try:
        head = script.read_text().splitlines()[:40]
    except OSError:
        return 0.0
    for line in head:
        m = re.match(r"#\s*run_all:\s*timeout\s+(\d+)\s*$", line.strip())
        if m:
            return float(m.group(1))
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Run every bench/*.py (except this file and _helpers), each as a subprocess with "
                    "`--json`, and write a Markdown report: the machine, then one table per bench with each "
                    "figure, its in-run baseline, the ratio and what the ratio means. A failed bench is "
                    "reported as FAILED (with its last stderr lines) and makes the exit status 1, after "
                    "the report is written.",
        epilog="Example: .venv/bin/python bench/run_all.py --out bench/RESULTS.md --only shard --only osm")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md",
                    help="the Markdown report to write, atomically (default: bench/RESULTS.md)")
    ap.add_argument("--only", action="append", metavar="NAME", default=None,
                    help="run only this bench (a stem such as 'osm' or a file name 'osm.py'); repeatable")
    ap.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                    help="wall-clock limit per bench; one that runs longer is killed and reported "
                         "FAILED (default: 1800)")
    ap.add_argument("--bench-dir", type=Path, default=HERE,
                    help="the folder of bench scripts (default: this script's folder)")
    a = ap.parse_args(argv)

    scripts = discover(a.bench_dir, a.only)
    if not scripts:
        print(f"run_all: no bench scripts in {a.bench_dir}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc).astimezone()
    machine = machine_info()
    commit = git_commit(ROOT)
    outcomes = []
    for s in scripts:
        print(f"== {_rel(s)}", flush=True)
        o = run_bench(s, max(a.timeout, declared_timeout(s)), ROOT)
        status = "ok" if not o["error"] else f"FAILED: {o['error']}"
        print(f"== {_rel(s)}: {status} in {o['elapsed']:.1f} s", flush=True)
        if o["error"] and o["stderr"].strip():
            for line in o["stderr"].strip().splitlines()[-TAIL_LINES:]:
                print("   " + line, file=sys.stderr)
        outcomes.append(o)
    write_atomic(a.out, render(outcomes, started, commit, machine, a.bench_dir, a.timeout))
    failed = [o["script"].name for o in outcomes if o["error"]]
    print(f"wrote {a.out}" + (f"; FAILED: {', '.join(failed)}" if failed else f"; {len(outcomes)} benches ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
