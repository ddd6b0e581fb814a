"""The evaluation report: per-row metrics with bootstrap intervals, paired differences, the
sweep, timings, and its Markdown and plot renderings (used by :mod:`gl10m.model.crossscale.evaluate`).

``report["rows"]`` maps a row name to::

    {"name", "description", "obr",
     "map20": {"all", "base", "novel"}, "map100": {"all", "base", "novel"},   # point estimates
     "ci95": {"map20": {group: [lo, hi]}, "map100": {group: [lo, hi]}},       # bootstrap, over scenes
     "metrics": {group: {"mAP@20", "mAP@100", "AP_macro", "AP_weighted", "concepts"}},
     "time": {"per_scene_s", "split_s", "io_per_scene_s", "io_split_s", "stages_s"}}

(groups ``base``/``novel`` only when novel concepts are declared). ``report["paired"]`` holds
bootstrap intervals of differences between rows on the same resamples (e.g. ``default-lr_only``)
and of the gap recovered, ``(default - lr_only) / (full_hr - lr_only)``.

Bootstrap: ``n_boot`` resamples of the scenes with replacement (seeded), every row's mAP
recomputed on each; the interval is the 2.5 and 97.5 percentiles. A concept without a positive in
a resample is skipped there, as in the point estimate.
"""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from gl10m.io import atomic_path

from . import metrics as M

IO_STAGES = ("io_lr", "io_hr")
N_BOOT = 1000
MIN_SCENES = 100
PAIRS = (("default", "lr_only"), ("full_hr", "lr_only"), ("default", "full_hr"), ("default", "random_predictor"),
         ("default", "random"), ("default", "sampler_only"), ("default", "lr_fill"), ("default", "predictor_nolr"))


def _timing(timer, shared, uses: Sequence[str], n: int) -> dict:
    stages = {k: v for k, v in timer.totals.items()}
    for u in uses:
        stages[u] = stages.get(u, 0.0) + shared.totals.get(u, 0.0)
    compute = sum(v for k, v in stages.items() if k not in IO_STAGES)
    io = sum(v for k, v in stages.items() if k in IO_STAGES)
    if "decode_lr" in uses:  # the LR read belongs to the rows that use LR
        io += shared.totals.get("io_lr", 0.0)
        stages["io_lr"] = shared.totals.get("io_lr", 0.0)
    return {"per_scene_s": compute / n, "split_s": compute, "io_per_scene_s": io / n, "io_split_s": io,
            "stages_s": {k: round(v, 6) for k, v in sorted(stages.items())}}


def _clean(x):
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else round(float(x), 6)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, " \
           f"{torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------
def _maps(scores: np.ndarray, y: np.ndarray, groups: Mapping[str, Sequence[int]]) -> dict[str, dict[str, float]]:
    s = M.summarise(M.per_concept(scores, y, ks=(20, 100)), groups, ks=(20, 100))
    return {"map20": {g: s[g]["mAP@20"] for g in groups}, "map100": {g: s[g]["mAP@100"] for g in groups}}


def bootstrap(scores: Mapping[str, np.ndarray], y: np.ndarray, groups: Mapping[str, Sequence[int]], *,
              n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{row: {"map20"|"map100": {group: [n_boot] values}}}, every row on the same resamples."""
    n = y.shape[0]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xB007])
    out = {r: {k: {g: np.empty(n_boot) for g in groups} for k in ("map20", "map100")} for r in scores}
    for b in range(n_boot):
        idx = np.sort(rng.integers(0, n, size=n))  # sorted: ties keep the split's order, as in the point estimate
        yb = y[idx]
        for r, s in scores.items():
            m = _maps(s[idx], yb, groups)
            for k in m:
                for g in groups:
                    out[r][k][g][b] = m[k][g]
    return out


def _ci(v: np.ndarray) -> list[float | None]:
    v = v[~np.isnan(v)]
    if v.size == 0:
        return [None, None]
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired(point: Mapping[str, dict], boot: Mapping[str, dict], groups: Sequence[str]) -> dict:
    """Differences of rows (same resamples) and the gap recovered, with 95 % intervals."""
    out = {}
    # and the default against every sampler variant, and the oracle's headroom over the default
    extra = tuple(("default", r) for r in sorted(boot) if r.startswith("sampler_") and r != "sampler_only")
    for a, b in PAIRS + extra + (("oracle_cover", "default"),):
        if a not in boot or b not in boot:
            continue
        d = {}
        for k in ("map20", "map100"):
            d[k] = {g: {"diff": _sub(point[a][k][g], point[b][k][g]),
                        "ci95": _ci(boot[a][k][g] - boot[b][k][g])} for g in groups}
        out[f"{a}-{b}"] = d
    if {"default", "lr_only", "full_hr"} <= set(boot):
        d = {}
        for k in ("map20", "map100"):
            d[k] = {}
            for g in groups:
                p = point
                num, den = _sub(p["default"][k][g], p["lr_only"][k][g]), _sub(p["full_hr"][k][g], p["lr_only"][k][g])
                bd = boot["full_hr"][k][g] - boot["lr_only"][k][g]
                with np.errstate(invalid="ignore", divide="ignore"):
                    br = np.where(np.abs(bd) > 1e-12, (boot["default"][k][g] - boot["lr_only"][k][g]) / bd, np.nan)
                d[k][g] = {"ratio": None if num is None or not den else num / den, "ci95": _ci(br)}
        out["gap_recovered"] = d
    return out


def _sub(a, b):
    return None if a is None or b is None or (isinstance(a, float) and math.isnan(a)) \
        or (isinstance(b, float) and math.isnan(b)) else a - b


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def build_report(res: dict, ctx: dict, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """``res``: :meth:`Evaluator.run`'s result; ``ctx``: what the report says about the run (split,
    shards, labels, novel, selection, scoring, device, ...)."""
    n, y = res["n"], res["labels"]
    labels = ctx["labels"]
    c = len(labels)
    novel = list(ctx["novel"])
    groups: dict[str, Sequence[int]] = {"all": range(c)}
    if novel:
        groups["base"] = [i for i in range(c) if i not in set(novel)]
        groups["novel"] = novel
    rows, point, per_concept = {}, {}, {}
    for r in res["rows"]:
        pc = M.per_concept(res["scores"][r.name], y)
        summ = M.summarise(pc, groups)
        point[r.name] = {"map20": {g: summ[g]["mAP@20"] for g in groups},
                         "map100": {g: summ[g]["mAP@100"] for g in groups}}
        rows[r.name] = {"name": r.name, "description": r.description,
                        "obr": float((res["masks"][r.name].sum(1) / 100).mean()), **point[r.name],
                        "metrics": summ, "time": _timing(res["timers"][r.name], res["shared"], r.uses, n)}
        per_concept[r.name] = pc
    boot = bootstrap({k: res["scores"][k] for k in rows}, y, groups, n_boot=n_boot, seed=seed) if n_boot else {}
    for name, b in boot.items():
        rows[name]["ci95"] = {k: {g: _ci(v) for g, v in b[k].items()} for k in b}
    sweep = []
    smp_uses = ("decode_lr", "encode_lr", "sampler")
    for name, th, k in res["sweep"]:
        m = M.summarise(M.per_concept(res["sweep_scores"][name], y), groups)
        sweep.append({"selection": name, "threshold": th, "top_k": k,
                      "obr": float(res["sweep_masks"][name].mean()),
                      "mAP@100": m["all"]["mAP@100"], "mAP@20": m["all"]["mAP@20"],
                      "novel_mAP@100": m.get("novel", {}).get("mAP@100"),
                      "time": _timing(res["sweep_timers"][name], res["shared"], smp_uses, n)})
    concepts, obr_scene = [], {}
    if "default" in per_concept:
        pc = per_concept["default"]
        for i, lab in enumerate(labels):
            concepts.append({"id": i, "name": lab, "novel": i in set(novel), "positives": int(pc["n_pos"][i]),
                             "AP@100": float(pc["AP@100"][i]), "AP": float(pc["AP"][i])})
        per = res["masks"]["default"].sum(1) / 100
        obr_scene = {k: float(v) for k, v in zip(ctx["keys"][:n], per)}
    rep = {
        "version": ctx["version"], "split": ctx["split"], "shards": ctx["shards"], "scenes": n,
        "small_split": n < MIN_SCENES,
        "device": {"type": ctx["device"].type, "name": device_name(ctx["device"])},
        "torch": torch.__version__, "batch_size": ctx["batch_size"], "seed": seed,
        "selection": ctx["selection"], "scoring": ctx["scoring"], "novel_holdout": ctx["novel_holdout"],
        "model": ctx["sources"],
        "concepts": {"n": c, "with_positives": int((y > 0).any(0).sum()), "novel": [labels[i] for i in novel]},
        "bootstrap": {"resamples": n_boot, "unit": "scene", "interval": "2.5-97.5 percentiles"},
        "rows": rows, "paired": paired(point, boot, list(groups)) if boot else {},
        "sweep": sweep, "obr_per_scene": obr_scene, "per_concept_default": concepts,
        "completion": res.get("completion"),
    }
    return _clean(rep)


def _fmt(x, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ms(x) -> str:
    return "n/a" if x is None else f"{1000 * x:.1f}"


def _with_ci(v, ci) -> str:
    if v is None:
        return "n/a"
    if not ci or ci[0] is None:
        return _fmt(v)
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def render_markdown(rep: dict, plot: str | None) -> str:
    rows = list(rep["rows"].values())
    groups = [g for g in ("all", "base", "novel") if rows and g in rows[0]["map100"]]
    sel, sc = rep["selection"], rep["scoring"]
    cal = sel.get("calibration")
    how = (f"calibrated on split `{cal['split']}` ({cal['scenes']} scenes) to target OBR {sel['target_obr']} "
           f"(OBR there {_fmt(cal['obr'])})" if cal else f"from the {sel['source']}")
    out = [f"# gl10m model evaluation: split `{rep['split']}`", ""]
    if rep.get("small_split"):
        out += [f"**{rep['scenes']} scenes only (< 100): these numbers are not meaningful** "
                "(reported because --allow-small was given).", ""]
    out += [f"{rep['scenes']} scenes from `{rep['shards']}`; device {rep['device']['name']}; batch "
            f"{rep['batch_size']}.", "",
            (f"Selection: {sel['source']} (OBR {sel['budget'] / 100:g} on every scene); no threshold." if
             sel.get("budget") else f"Selection: {sel['rule']}; threshold {_fmt(sel['threshold'], 4)}, {how}."), "",
            f"Scoring: every row through one scene space, {sc['space']}; {sc['text']}.", "",
            f"Concepts: {rep['concepts']['n']} ({rep['concepts']['with_positives']} with positives in this split); "
            f"novel: {', '.join(rep['concepts']['novel']) or 'none declared'}. Intervals: bootstrap 95 % over "
            f"scenes ({rep['bootstrap']['resamples']} resamples).", "", "## Baselines and ablations", ""]
    head = "| row | OBR | " + " | ".join(f"mAP@20 {g} | mAP@100 {g}" for g in groups) + " | ms/scene | IO ms/scene |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ci = r.get("ci95") or {}
        cells = " | ".join(f"{_with_ci(r['map20'][g], ci.get('map20', {}).get(g))} | "
                           f"{_with_ci(r['map100'][g], ci.get('map100', {}).get(g))}" for g in groups)
        out.append(f"| {r['name']} | {_fmt(r['obr'])} | {cells} | {_ms(r['time']['per_scene_s'])} | "
                   f"{_ms(r['time']['io_per_scene_s'])} |")
    out += ["", "Rows:", ""] + [f"- `{r['name']}`: {r['description']}" for r in rows]
    comp = rep.get("completion")
    if comp:
        out += ["", "## Does the predictor use LR? (completion of the default's unobserved tiles)", "",
                f"Centred cosine of the predicted to the true tile tokens, mean over {comp['tiles']} unobserved "
                "tiles (1 = exact, 0 = no better than the centre): with the scene's own LR "
                f"{_fmt(comp.get('own_lr'))}, with another scene's LR {_fmt(comp.get('other_lr'))}, "
                f"the predictor trained without LR {_fmt(comp.get('no_lr'))} "
                "(`gl10m.model.crossscale.completion`)."]
    if rep.get("paired"):
        out += ["", "## Paired differences (mAP@100, same bootstrap resamples)", "",
                "| comparison | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, d in rep["paired"].items():
            key = "ratio" if name == "gap_recovered" else "diff"
            out.append(f"| {name} | " + " | ".join(_with_ci(d["map100"][g][key], d["map100"][g]["ci95"])
                                                  for g in groups) + " |")
    if rep["sweep"]:
        out += ["", "## Threshold sweep (default pipeline)", "",
                "| selection | OBR | mAP@100 | mAP@20 | ms/scene | IO ms/scene |", "|---|---|---|---|---|---|"]
        for s in rep["sweep"]:
            out.append(f"| {s['selection']} | {_fmt(s['obr'])} | {_fmt(s['mAP@100'])} | {_fmt(s['mAP@20'])} | "
                       f"{_ms(s['time']['per_scene_s'])} | {_ms(s['time']['io_per_scene_s'])} |")
        if plot:
            out += ["", f"![mAP@100 against OBR]({plot})"]
    d = rep["rows"].get("default")
    if d is not None:
        out += ["", "## Time of the default pipeline, by stage (whole split, seconds)", "",
                "| stage | s |", "|---|---|"]
        out += [f"| {k} | {v:.4f} |" for k, v in d["time"]["stages_s"].items()]
    if rep.get("time_cpu"):
        tc = rep["time_cpu"]
        out += ["", f"## The same on the CPU ({tc['device']}, first {tc['scenes']} scenes)", "",
                "| row | ms/scene | IO ms/scene |", "|---|---|---|"]
        out += [f"| {k} | {_ms(v['per_scene_s'])} | {_ms(v['io_per_scene_s'])} |" for k, v in tc["rows"].items()]
    out += ["", "mAP@K: per concept, scenes ranked by score (stable sort); AP@K = sum_{i<=K} P@i rel_i / "
            "min(n_pos, K); concepts without positives skipped. OBR: selected tiles / 100. Times exclude IO "
            "(member reads), which is listed separately; CUDA is synchronised around every stage.", ""]
    return "\n".join(out)


def plot_sweep(rep: dict, path: Path) -> bool:
    """mAP@100 against OBR for the sweep, with LR-only and full HR as reference points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib ships with the model extra
        return False
    pts = [(s["obr"], s["mAP@100"], s["selection"]) for s in rep["sweep"] if s["mAP@100"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if pts:
        th = sorted((p for p in pts if p[2].startswith("threshold")), key=lambda p: p[0])
        ax.plot([p[0] for p in th], [p[1] for p in th], "o-", label="sampler + predictor (threshold)")
        for x, yv, lab in pts:
            ax.annotate(lab.replace("threshold ", "t="), (x, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        tk = [p for p in pts if p[2].startswith("top-")]
        if tk:
            ax.plot([p[0] for p in tk], [p[1] for p in tk], "s", label="sampler + predictor (top-k)")
    for name, marker in (("lr_only", "v"), ("full_hr", "^"), ("random", "x"), ("random_predictor", "+")):
        r = rep["rows"].get(name)
        if r is not None and r["map100"]["all"] is not None:
            ax.plot([r["obr"]], [r["map100"]["all"]], marker, label=name.replace("_", " "))
    ax.set_xlabel("OBR (requested HR area / scene area)")
    ax.set_ylabel("mAP@100 (all concepts)")
    ax.set_xlim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def summary_table(rep: dict) -> list[tuple[str, str, str, str]]:
    """(row, OBR, mAP@100 all [95 % interval], ms/scene) for printing."""
    return [(name, _fmt(r["obr"]), _with_ci(r["map100"]["all"], (r.get("ci95") or {}).get("map100", {}).get("all")),
             _ms(r["time"]["per_scene_s"])) for name, r in rep["rows"].items()]
