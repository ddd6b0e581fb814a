"""Benchmark: MapSR on held-out testbed windows with known 1 m truth, against a supervised baseline.

    .venv/bin/python bench/mapsr.py [--bootstrap DIR] [--size 268] [--cells 30,268] [--train 24]
        [--val 12] [--test 50] [--chip 256] [--shifts 4] [--color 1.0] [--threads 1] [--json PATH]

For each frozen encoder (the tiny random ViT of `gl10m mapsr`, and the bootstrap encoder that
`gl10m model fit` trains on the model-scale world's shards, when it is there) and each coarse cell
size (30: NLCD-like 30 m cells; 268: one label per GL-10M tile): mIoU pooled over the test windows,
OA and per-window mIoU, with bootstrap 95 % intervals (resampling windows), of

* coarse      the coarse map (majority of the truth per cell) upsampled: nothing trained;
* cosine      MapSR fitted on the train windows' coarse labels (probe, prompts, cosine matching);
* refined     + graph refinement, its settings chosen on the val windows (never the test ones);
* supervised  a small dense head on the same features trained on the train windows' 1 m truth;

plus paired differences (refined - cosine, cosine - coarse, ...), trainable parameters and training
seconds. Train / val / test windows come from three different testbed world seeds (101, 2027,
7919), so they never overlap. The method and the statistics live in gl10m.model.mapsr.bench.

The bootstrap encoder: DIR/encoder.pt + encoder.json, by default bench/out/model_quality/model/encoder
(what bench/model_quality.py writes; with the default seed 7373). Without it only the tiny encoder
runs (a note says so). Torch runs on --threads threads (1 by default: on a shared 2-core machine
more threads are slower).
"""
# run_all: timeout 2400
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import add_json_arg, record, write_json  # noqa: E402

DEFAULT_BOOTSTRAP = ROOT / "bench" / "out" / "model_quality" / "model" / "encoder"
# How the bootstrap encoder is fed (chosen on the val windows; the README's MapSR section): 256 px chips
# shrunk to its 64 px input (near the 268 px tiles it was trained on), 4 x 4 shifted passes (a token
# every 16 px), the image's colour as extra channels.
BOOTSTRAP_FEATURES = {"chip": 256, "shifts": 4, "color": 1.0}


def encoders(bootstrap: Path | None, seed: int) -> tuple[dict, list[str]]:
    import torch

    from gl10m.model.encoders import build_encoder
    from gl10m.model.mapsr.cli import TINY_ENCODER

    notes = []
    torch.manual_seed(seed)
    out = {"tiny": build_encoder(dict(TINY_ENCODER), "cpu")[0]}
    if bootstrap is not None and (Path(bootstrap) / "encoder.pt").is_file():
        out["bootstrap"] = build_encoder(Path(bootstrap), "cpu")[0]
    else:
        notes.append(f"bootstrap encoder: {bootstrap}/encoder.pt not found (run bench/model_quality.py or pass "
                     "--bootstrap DIR); only the tiny encoder ran")
    return out, notes


def records(report: dict) -> list[dict]:
    recs = []
    for ename, re_ in report["results"].items():
        for cell, rc in re_["cells"].items():
            rows = rc["rows"]
            base = rows["coarse"]["miou"][0]
            for k, r in rows.items():
                mi = r["miou"]
                wm, oa = r["window_miou"], r["oa"]
                recs.append(record(f"{ename}/cell{cell}/{k}/miou", mi[0], "mIoU", "coarse upsampled", base,
                                   higher_is_better=True,
                                   meaning=f"mIoU pooled over the test windows / the coarse map's; 95 % "
                                           f"[{mi[1]:.3f}, {mi[2]:.3f}]; OA {oa[0]:.3f}; per-window mIoU {wm[0]:.3f}; "
                                           f"{r['params']} trainable params, {r['train_seconds']:.1f} s training"))
            for k, d in rc["diffs"].items():
                recs.append(record(f"{ename}/cell{cell}/{k}", d[0], "mIoU difference", higher_is_better=True,
                                   meaning=f"pooled mIoU difference on the same test windows, 95 % "
                                           f"[{d[1]:+.3f}, {d[2]:+.3f}]",
                                   note=f"refinement chosen on val: {rc['refine']}"))
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", type=Path, default=DEFAULT_BOOTSTRAP, help="bootstrap encoder folder")
    ap.add_argument("--size", type=int, default=268, help="window side in 1 m pixels")
    ap.add_argument("--cells", default="30,268", help="coarse cell sizes in pixels, comma-separated")
    ap.add_argument("--train", type=int, default=24, help="train windows (world seed 101)")
    ap.add_argument("--val", type=int, default=12, help="val windows (world seed 2027)")
    ap.add_argument("--test", type=int, default=50, help="test windows (world seed 7919)")
    ap.add_argument("--grid", default="default", choices=["default", "tiny"], help="refinement candidates")
    ap.add_argument("--chip", type=int, default=BOOTSTRAP_FEATURES["chip"],
                    help="bootstrap encoder: chip size in 1 m pixels (shrunk to its hr_size)")
    ap.add_argument("--shifts", type=int, default=BOOTSTRAP_FEATURES["shifts"],
                    help="bootstrap encoder: shifted passes per side (a token every chip/grid/shifts px)")
    ap.add_argument("--color", type=float, default=BOOTSTRAP_FEATURES["color"],
                    help="bootstrap encoder: weight of the image's colour as extra feature channels (0: off)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    add_json_arg(ap)
    a = ap.parse_args(argv)
    import torch

    from gl10m.model.mapsr import bench as B

    torch.set_num_threads(max(1, a.threads))
    t0 = time.perf_counter()
    encs, notes = encoders(a.bootstrap, a.seed)
    cfg = B.BenchConfig(size=a.size, cells=tuple(int(c) for c in a.cells.split(",")), n_train=a.train, n_val=a.val,
                        n_test=a.test, grid=a.grid, seed=a.seed,
                        features={"bootstrap": {"chip": a.chip, "shifts": a.shifts, "color": a.color}})
    report = B.run(encs, cfg, log=lambda s: print(s, flush=True))
    print()
    print(B.table(report))
    for n in notes:
        print(f"note: {n}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    write_json(a.json, "mapsr", records(report), size=a.size, cells=a.cells, train=a.train, val=a.val, test=a.test,
               bootstrap_features=cfg.features["bootstrap"],
               seeds=cfg.seeds, encoders=list(encs), bootstrap=str(a.bootstrap) if "bootstrap" in encs else None,
               threads=a.threads, seconds=round(time.perf_counter() - t0, 1), notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
