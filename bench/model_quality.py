# run_all: timeout 5400
"""Benchmark: does the cross-scale model do what the paper claims, on a held-out model-scale world?

    .venv/bin/python bench/model_quality.py [--seed 7127] [--out bench/out/model_quality] [--scenes N] [--workers K]
        [--config model/configs/fit-cpu.yaml] [--target-obr 0.12] [--json PATH]

One run, four commands, each the user's own:

1. ``gl10m testbed scenes --out DIR/world --scenes N --seed S`` (the model-scale world; reused
   when DIR/world/shards already holds it for this seed and size);
2. ``gl10m model fit --shards DIR/world/shards --out DIR/model`` (encoder bootstrap, feature
   cache, sampler, predictors, ablations, the scene head; resumes what is done);
3. ``gl10m model eval --checkpoint DIR/model --shards DIR/world/shards --split test --budget K
   --out DIR/eval`` with K = 100 x the target OBR: every scene gets the sampler's K best tiles
   (OBR exactly K/100 on every scene, the released code's per-scene top-k), every row scored on
   test in one space, with bootstrap 95 % intervals. **The targets are judged here.**
4. the same with ``--target-obr X --out DIR/eval-threshold``: the paper's shared threshold,
   calibrated on the val split to OBR X and applied unchanged to test. Reported beside (3): the
   sampler's score scale shifts between states, so a threshold set on the val state (WA) does not
   give the same OBR on the test states (AZ, ME); seed 7373 selected 0.447 of the tiles with it.

It prints and records mAP@100 (all concepts) of: lr_only, full_hr, default (the sampler's tiles +
the stage II predictor), random and random_predictor (random tiles at the default's OBR),
sampler_only, lr_fill, predictor_nolr, sampler_coverage and sampler_structural (samplers trained
on other targets than the paper's s_vis x s_gain: where the labelled concepts are, and s_vis alone;
+ the predictor), oracle_cover (an
upper bound, not a method: the tiles covering each scene's labelled concepts, read from its labels,
+ the predictor), and "gap recovered" = (default - lr_only) / (full_hr -
lr_only); and checks the issue's targets (full_hr - lr_only >= 0.05; gap recovered >= 0.8 at OBR
<= 0.15; default - random_predictor >= 0.02; default - sampler_only >= 0.01; predictor_nolr <
default). A missed target is printed as MISSED with the numbers; the exit status is 0 when the
bench ran (the table says what held), 1 when it failed.

Seeds: tuning (configs, world parameters, the scene pooling and stage II head, the encoder's
loss) was done on seed 101 and on the train/val splits of seed 2027 (whose test split was
reported once, before that tuning, and is spent); the scene head (model/crossscale/
scene_head.py) and the per-scene budget were then tried on seed 7373, whose test split had been
reported once (session 4) and was looked at again to find why the effect was missing there, so
7373 is a tuning seed too. The sampler's `coverage` supervision came from a diagnosis on the
spent test splits of 8819 and 3137 (an oracle sampler choosing the top 12 tiles of the paper's G*
itself, computed with HR, recovered only 0.54 / 0.77 of the gap there; one covering the scenes'
labelled concepts 0.87-0.96 / 0.78-0.80), was tried on both splits of tuning seed 7373 (gap
recovered 0.80 -> 0.88 on val, 0.87 -> 0.99 on test) and was the default for one held-out run,
seed 4409, where it recovered 0.62 against 0.81 for the paper's target and 0.96 for s_vis alone
(ablation rows of the same run). The default went back to the paper's target, the one reported on
8819 and 3137 (not to the best row on 4409); coverage and structural stay as ablation rows.
Reported held-out results (README, bench/RESULTS.md): seed 5151 (2,000
scenes), seeds 8819, 3137, 4409 and 6661 (3,400 scenes, the default size): their test splits are
spent, so a change judged on them is judged on a split it has been looked at on; the default is a
fresh seed, 7127.
The default size, 3,400 scenes,
gives ~2,800 train / ~270 val / ~300 test scenes (the paper's 83 / 8 / 9 %).
"""
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

ROWS = ("lr_only", "full_hr", "default", "random", "random_predictor", "sampler_only", "lr_fill", "predictor_nolr",
        "sampler_coverage", "sampler_structural", "oracle_cover")
TUNED_ON_SEEDS = (101, 2027, 7373)
REPORTED_SEEDS = (3137, 4409, 5151, 6661, 8819)  # held-out results already reported: their test splits are spent


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


def gap_recovered(v: dict) -> float | None:
    gap = None if v.get("full_hr") is None or v.get("lr_only") is None else v["full_hr"] - v["lr_only"]
    return None if not gap or gap <= 0 or v.get("default") is None else (v["default"] - v["lr_only"]) / gap


def obr_str(rep: dict) -> str:
    r = row(rep, "default")
    return "n/a" if r is None or r["obr"] is None else f"{r['obr']:.3f}"


def summarise(rep: dict, title: str):
    """Print one evaluation's rows, paired differences and targets -> (rows, mAPs, OBR, checks)."""
    vals = {name: row(rep, name) for name in ROWS}
    v = {k: (r or {}).get("map") for k, r in vals.items()}
    obr = (vals["default"] or {}).get("obr")
    print(f"\n{title}")
    print(f"{'row':<18} {'mAP@100':>8} {'95 % interval':>17} {'OBR':>6}")
    for name in ROWS:
        r = vals[name]
        if r is None:
            print(f"{name:<18} {'absent':>8}")
            continue
        ci = "" if r["lo"] is None else f"[{r['lo']:.3f}, {r['hi']:.3f}]"
        print(f"{name:<18} {r['map'] if r['map'] is not None else float('nan'):>8.3f} {ci:>17} "
              f"{r['obr'] if r['obr'] is not None else float('nan'):>6.3f}")
    rec = gap_recovered(v)
    print(f"gap recovered: {rec if rec is not None else 'n/a'}")
    for pair, d in sorted((rep.get("paired") or {}).items()):
        m = (d.get("map100") or {}).get("all") or {}
        est = m.get("diff", m.get("ratio"))
        ci = m.get("ci95") or [None, None]
        if est is not None and ci[0] is not None:
            print(f"  {pair:<32} {est:+.3f}  95 % interval [{ci[0]:+.3f}, {ci[1]:+.3f}] (paired bootstrap)")
    comp = rep.get("completion") or {}
    if comp.get("own_lr") is not None:
        f = lambda x: "n/a" if x is None else f"{x:.3f}"
        print(f"completion of the unobserved tiles (centred cosine to the true tokens, {comp['tiles']} tiles): "
              f"own LR {f(comp['own_lr'])}, another scene's LR {f(comp.get('other_lr'))}, "
              f"no-LR predictor {f(comp.get('no_lr'))}")
    checks = targets(v, obr)
    for name, ok, nums in checks:
        print(f"  {'met   ' if ok else 'MISSED' if ok is False else 'n/a   '} {name}  ({nums})")
    return vals, v, obr, checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7127,
                    help=f"world seed (default 7127; tuned on {', '.join(map(str, TUNED_ON_SEEDS))}: report on another)")
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
    world, md, ev, ev_th = out / "world", out / "model", out / "eval", out / "eval-threshold"
    times = {}
    if a.seed in TUNED_ON_SEEDS:
        print(f"note: seed {a.seed} is the tuning seed; its numbers are not a held-out result", flush=True)
    elif a.seed in REPORTED_SEEDS:
        print(f"note: seed {a.seed}'s test split was already reported; a rerun reproduces that result, but a "
              f"change judged on it is not judged on unseen scenes (use a fresh seed)", flush=True)
    times["world"] = run(_gl10m() + ["testbed", "scenes", "--out", str(world), "--scenes", str(a.scenes),
                                     "--seed", str(a.seed), "--workers", str(a.workers)], "the world build")
    fit_cmd = _gl10m() + ["model", "fit", "--shards", str(world / "shards"), "--out", str(md), "--config", str(a.config)]
    times["fit"] = run(fit_cmd + (["--device", a.device] if a.device else []), "the fit")
    base_cmd = _gl10m() + ["model", "eval", "--checkpoint", str(md), "--shards", str(world / "shards"), "--split",
                           "test", "--no-sweep"]
    base_cmd += (["--device", a.device] if a.device else []) + (["--allow-small"] if a.allow_small else [])
    budget = int(round(a.target_obr * 100))
    times["eval"] = run(base_cmd + ["--budget", str(budget), "--out", str(ev)], "the evaluation (per-scene budget)")
    times["eval_threshold"] = run(base_cmd + ["--target-obr", str(a.target_obr), "--out", str(ev_th)],
                                  "the evaluation (shared threshold)")
    rep = json.loads((ev / "report.json").read_text())
    rep_th = json.loads((ev_th / "report.json").read_text())
    n_test = rep.get("scenes")
    print(f"\nmodel quality: world seed {a.seed}, {a.scenes} scenes, test split {n_test} scenes, "
          f"device {rep.get('device', {}).get('name')}")
    vals, v, obr, checks = summarise(rep, f"per-scene budget: the sampler's {budget} best tiles of every scene "
                                          f"(OBR {budget / 100:g}); the targets are judged here")
    th = rep_th["selection"]
    vals_th, v_th, obr_th, checks_th = summarise(
        rep_th, f"shared threshold {th['threshold']:.4g}, calibrated on val to OBR {a.target_obr} (the paper's "
                f"protocol); OBR on test {obr_str(rep_th)}")
    print(f"times: world {times['world']:.0f} s, fit {times['fit']:.0f} s, eval {times['eval']:.0f} s + "
          f"{times['eval_threshold']:.0f} s")

    recs = []
    for name in ROWS:
        r = vals[name]
        if r is None or r["map"] is None:
            continue
        recs.append(record(f"mAP@100 {name}", r["map"], "mAP", "mAP@100 lr_only", v["lr_only"],
                           higher_is_better=True, meaning=f"{name} / lr_only, test split of {n_test} scenes",
                           note=f"95 % CI [{r['lo']}, {r['hi']}], OBR {r['obr']:.3f}" if r["lo"] is not None
                           else f"OBR {r['obr']:.3f}"))
    r = vals_th["default"]
    if r is not None and r["map"] is not None:
        recs.append(record("mAP@100 default, shared threshold", r["map"], "mAP", "mAP@100 lr_only", v_th["lr_only"],
                           higher_is_better=True, meaning=f"default / lr_only with the val-calibrated threshold "
                           f"{th['threshold']:.4g}", note=f"95 % CI [{r['lo']}, {r['hi']}], OBR on test {r['obr']:.3f}"))
    comp = rep.get("completion") or {}
    if comp.get("own_lr") is not None and comp.get("other_lr") is not None:
        recs.append(record("completion cosine, own LR", comp["own_lr"], "cos", "completion cosine, another scene's LR",
                           comp["other_lr"], higher_is_better=True,
                           meaning="the predictor's completion of the default's unobserved tiles with the scene's own "
                           "LR against another scene's (> 1: it uses LR)",
                           note=f"no-LR predictor {comp.get('no_lr')}; {comp['tiles']} tiles"))
    recovered = gap_recovered(v)
    if recovered is not None:
        recs.append(record("gap recovered", recovered, "fraction", higher_is_better=True,
                           meaning="(default - lr_only) / (full_hr - lr_only) at the per-scene budget; target >= 0.8"))
    recs.append(record("targets met", sum(1 for _, ok, _ in checks if ok), "of 5", higher_is_better=True,
                       meaning="the issue's five targets, at the per-scene budget",
                       note="; ".join(f"{n}: {'met' if ok else 'MISSED'}" for n, ok, _ in checks)))
    recs.append(record("targets met, shared threshold", sum(1 for _, ok, _ in checks_th if ok), "of 5",
                       higher_is_better=True, meaning="the same targets with the val-calibrated shared threshold",
                       note="; ".join(f"{n}: {'met' if ok else 'MISSED'}" for n, ok, _ in checks_th)))
    recs.append(record("bench time", sum(times.values()), "s", higher_is_better=False,
                       meaning="world + fit + both evals wall time",
                       note=json.dumps({k: round(t) for k, t in times.items()})))
    write_json(a.json, "model_quality", recs, seed=a.seed, scenes=a.scenes, test_scenes=n_test,
               target_obr=a.target_obr, config=str(a.config), tuned_on_seeds=list(TUNED_ON_SEEDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
