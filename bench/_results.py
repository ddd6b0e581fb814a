"""Machine-readable bench results: the `--json PATH` option every bench script takes.

A bench script prints its human-readable table as before and, given ``--json PATH``, also
writes there ``{"bench": NAME, "params": {...}, "records": [record, ...]}`` where each record is

    {"name": figure, "value": v, "unit": u,
     "baseline_name": b, "baseline_value": bv, "ratio": r,
     "higher_is_better": True | False | None, "meaning": one line, "note": optional}

``ratio`` is the figure against its baseline measured in the same run (how it is formed is
said by ``meaning``). ``bench/run_all.py`` reads these files and writes ``bench/RESULTS.md``.
Files named with a leading underscore are helpers, not benches: run_all.py skips them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def add_json_arg(ap) -> None:
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write the figures (value, in-run baseline, ratio) as JSON records to PATH "
                         "(read by bench/run_all.py)")


def record(name: str, value: float, unit: str, baseline_name: str | None = None,
           baseline_value: float | None = None, ratio: float | None = None,
           higher_is_better: bool | None = None, meaning: str = "", note: str = "") -> dict:
    """One figure; `ratio` defaults to value / baseline_value."""
    if ratio is None and baseline_value:
        ratio = value / baseline_value
    r = {"name": name, "value": _num(value), "unit": unit, "baseline_name": baseline_name,
         "baseline_value": _num(baseline_value), "ratio": _num(ratio), "higher_is_better": higher_is_better,
         "meaning": meaning}
    if note:
        r["note"] = note
    return r


def write_json(path: Path | None, bench: str, records: list[dict], **params) -> None:
    """Write the records to `path` (atomically); no-op when `path` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"bench": bench, "params": params, "records": records}, indent=1))
    os.replace(tmp, path)


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
