"""Benchmark: does the cross-scale model do what the paper claims, on a held-out model-scale world?

    .venv/bin/python bench/model_quality.py [--seed 7373] [--out bench/out/model_quality] [--scenes N] [--workers K]
        [--config model/configs/fit-cpu.yaml] [--target-obr 0.12] [--json PATH]

One run, three commands, each the user's own:

1. ``gl10m testbed scenes --out DIR/world --scenes N --seed S`` (the model-scale world; reused
   when DIR/world/shards already holds it for this seed and size);
2. ``gl10m model fit --shards DIR/world/shards --out DIR/model`` (encoder bootstrap, feature
   cache, sampler, predictors, ablations; resumes what is done);
3. ``gl10m model eval --checkpoint DIR/model --shards DIR/world/shards --split test
   --target-obr X --out DIR/eval``: the threshold is calibrated on the val split to the target
   OBR, then every row is scored on test in one space, with bootstrap 95 % intervals.

It prints and records mAP@100 (all concepts) of: lr_only, full_hr, default (the sampler at the
calibrated threshold + the predictor), random and random_predictor (random tiles at the
default's OBR), sampler_only, lr_fill, predictor_nolr, and "gap recovered" =
(default - lr_only) / (full_hr - lr_only); and checks the issue's targets (full_hr - lr_only >=
0.05; gap recovered >= 0.8 at OBR <= 0.15; default - random_predictor >= 0.02; default -
sampler_only >= 0.01; predictor_nolr < default). A missed target is printed as MISSED with the
numbers; the exit status is 0 when the bench ran (the table says what held), 1 when it failed.

Seeds: tuning (configs, world parameters, the scene pooling and stage II head, the encoder's
loss) was done on seed 101 and on the train/val splits of seed 2027 (whose test split was
reported once, before that tuning, and is spent); report on other seeds (default 7373). The default size, 3,400 scenes, gives ~2,800 train / ~270 val / ~300 test scenes
(the paper's 83 / 8 / 9 %).
"""
# run_all: timeout 5400
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import add_json_arg, record, write_json  # noqa: E402

ROWS = ("lr_only", "full_hr", "default", "random", "random_predictor", "sampler_only", "lr_fill", "predictor_nolr")
TUNED_ON_SEEDS = (101, 2027)


def _gl10m() -> list[str]:
    return [sys.executable, "-m", "gl10m.cli"]


def run(cmd: list[str], what: str) -> float:
    """Run one gl10m command (its output streams through); its wall time; exit 1 on failure."""
    print(f"\n$ gl10m {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        print(f"bench/model_quality: {what} failed (exit {r.returncode})", file=sys.stderr)
        sys.exit(1)
    return time.perf_counter() - t0


def row(rep: dict, name: str, group: str = "all", k: int = 100) -> dict | None:
    """A report row's mAP@k (group), its 95 % interval and OBR, or None when the row is absent."""
    r = rep["rows"].get(name)
    if r is None:
        return None
    ci = ((r.get("ci95") or {}).get(f"map{k}") or {}).get(group) or [None, None]
    return {"map": r[f"map{k}"].get(group), "lo": ci[0], "hi": ci[1], "obr": r.get("obr")}


def targets(v: dict[str, float | None], obr: float | None) -> list[tuple[str, bool | None, str]]:
    """The issue's targets: (name, met (None: not measurable), the numbers)."""
    def diff(a, b):
        return None if v.get(a) is None or v.get(b) is None else v[a] - v[b]

    out = []
    gap = diff("full_hr", "lr_only")
    out.append(("full_hr - lr_only >= 0.05", None if gap is None else gap >= 0.05, f"{gap!s:.6}"))
    rec = None if gap is None or gap <= 0 or v.get("default") is None else (v["default"] - v["lr_only"]) / gap
    ok = None if rec is None else (rec >= 0.8 and obr is not None and obr <= 0.15)
    out.append(("gap recovered >= 0.8 at OBR <= 0.15", ok, f"recovered {rec!s:.6}, OBR {obr!s:.5}"))
    d = diff("default", "random_predictor")
    out.append(("default - random_predictor >= 0.02", None if d is None else d >= 0.02, f"{d!s:.6}"))
    d = diff("default", "sampler_only")
    out.append(("default - sampler_only >= 0.01", None if d is None else d >= 0.01, f"{d!s:.6}"))
    d = diff("default", "predictor_nolr")
    out.append(("predictor_nolr < default", None if d is None else d > 0, f"default - nolr {d!s:.6}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7373,
                    help=f"world seed (default 7373; tuned on {', '.join(map(str, TUNED_ON_SEEDS))}: report on another)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "model_quality",
                    help="work folder: world/, model/, eval/ (default bench/out/model_quality; reused when there)")
    ap.add_argument("--scenes", type=int, default=3400, help="scenes in the world (default 3400)")
    ap.add_argument("--workers", type=int, default=2, help="world builder workers")
    ap.add_argument("--config", type=Path, default=ROOT / "model" / "configs" / "fit-cpu.yaml", help="fit config")
    ap.add_argument("--target-obr", type=float, default=0.12, help="OBR the threshold is calibrated to on val")
    ap.add_argument("--device", default=None, help="auto, cpu or cuda (default: the fit config's)")
    ap.add_argument("--allow-small", action="store_true", help="evaluate a test split under 100 scenes (a smoke run)")
    add_json_arg(ap)
    a = ap.parse_args(argv)

    out = a.out.resolve()
    world, md, ev = out / "world", out / "model", out / "eval"
    times = {}
    if a.seed in TUNED_ON_SEEDS:
        print(f"note: seed {a.seed} is the tuning seed; its numbers are not a held-out result", flush=True)
    times["world"] = run(_gl10m() + ["testbed", "scenes", "--out", str(world), "--scenes", str(a.scenes),
                                     "--seed", str(a.seed), "--workers", str(a.workers)], "the world build")
    fit_cmd = _gl10m() + ["model", "fit", "--shards", str(world / "shards"), "--out", str(md), "--config", str(a.config)]
    times["fit"] = run(fit_cmd + (["--device", a.device] if a.device else []), "the fit")
    eval_cmd = _gl10m() + ["model", "eval", "--checkpoint", str(md), "--shards", str(world / "shards"), "--split",
                           "test", "--target-obr", str(a.target_obr), "--out", str(ev), "--no-sweep"]
    eval_cmd += (["--device", a.device] if a.device else []) + (["--allow-small"] if a.allow_small else [])
    times["eval"] = run(eval_cmd, "the evaluation")
    rep = json.loads((ev / "report.json").read_text())

    vals = {name: row(rep, name) for name in ROWS}
    v = {k: (r or {}).get("map") for k, r in vals.items()}
    obr = (vals["default"] or {}).get("obr")
    n_test = rep.get("scenes")
    print(f"\nmodel quality: world seed {a.seed}, {a.scenes} scenes, test split {n_test} scenes, "
          f"device {rep.get('device', {}).get('name')}, threshold calibrated on val to OBR {a.target_obr}")
    print(f"{'row':<18} {'mAP@100':>8} {'95 % interval':>17} {'OBR':>6}")
    for name in ROWS:
        r = vals[name]
        if r is None:
            print(f"{name:<18} {'absent':>8}")
            continue
        ci = "" if r["lo"] is None else f"[{r['lo']:.3f}, {r['hi']:.3f}]"
        print(f"{name:<18} {r['map'] if r['map'] is not None else float('nan'):>8.3f} {ci:>17} "
              f"{r['obr'] if r['obr'] is not None else float('nan'):>6.3f}")
    gap = None if v["full_hr"] is None or v["lr_only"] is None else v["full_hr"] - v["lr_only"]
    recovered = None if not gap or gap <= 0 or v["default"] is None else (v["default"] - v["lr_only"]) / gap
    print(f"gap recovered: {recovered if recovered is not None else 'n/a'}")
    for pair, d in sorted((rep.get("paired") or {}).items()):
        m = (d.get("map100") or {}).get("all") or {}
        est = m.get("diff", m.get("ratio"))
        ci = m.get("ci95") or [None, None]
        if est is not None and ci[0] is not None:
            print(f"  {pair:<32} {est:+.3f}  95 % interval [{ci[0]:+.3f}, {ci[1]:+.3f}] (paired bootstrap)")
    checks = targets(v, obr)
    for name, ok, nums in checks:
        print(f"  {'met   ' if ok else 'MISSED' if ok is False else 'n/a   '} {name}  ({nums})")
    print(f"times: world {times['world']:.0f} s, fit {times['fit']:.0f} s, eval {times['eval']:.0f} s")

    recs = []
    for name in ROWS:
        r = vals[name]
        if r is None or r["map"] is None:
            continue
        recs.append(record(f"mAP@100 {name}", r["map"], "mAP", "mAP@100 lr_only", v["lr_only"],
                           higher_is_better=True, meaning=f"{name} / lr_only, test split of {n_test} scenes",
                           note=f"95 % CI [{r['lo']}, {r['hi']}], OBR {r['obr']:.3f}" if r["lo"] is not None
                           else f"OBR {r['obr']:.3f}"))
    if recovered is not None:
        recs.append(record("gap recovered", recovered, "fraction", higher_is_better=True,
                           meaning="(default - lr_only) / (full_hr - lr_only); target >= 0.8"))
    recs.append(record("targets met", sum(1 for _, ok, _ in checks if ok), "of 5", higher_is_better=True,
                       meaning="the issue's five targets", note="; ".join(f"{n}: {'met' if ok else 'MISSED'}"
                                                                          for n, ok, _ in checks)))
    recs.append(record("bench time", sum(times.values()), "s", higher_is_better=False,
                       meaning="world + fit + eval wall time", note=json.dumps({k: round(t) for k, t in times.items()})))
    write_json(a.json, "model_quality", recs, seed=a.seed, scenes=a.scenes, test_scenes=n_test,
               target_obr=a.target_obr, config=str(a.config), tuned_on_seeds=list(TUNED_ON_SEEDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
