"""The shard stage: staged samples -> WebDataset shards per split, index, manifest, card.

Takes every scene that is in the current plan, fetched ``ok`` and staged; drops scenes that
break the border rule (gl10m/splits.py) and counts them; writes ``W/shards/`` with
gl10m.shards.build (byte copies, deterministic) and the dataset card. The ledger has one row
for the whole stage (unit ``all``) whose input hash names every sample's fetch hash, the shard
size and the profile values involved, so a rerun with nothing new does nothing, and one row per
dropped scene under ``shard-scene``. Every file is written atomically, so a killed run leaves
only temp files beside the outputs; the next run removes them before anything else, and its
rebuild is byte-identical to an uninterrupted one.

A concept subset (``--concepts``) is taken at plan; the shard stage only checks that every plan
it reads was made for the subset it is given (:func:`check_subset`) and records it in the
manifest (``concept_subset``), the card and its input hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gl10m import __version__
from gl10m.errors import UserError
from gl10m.io import ensure_dir
from gl10m.ledger import OK, REJECTED, Ledger, hash_inputs
from gl10m.outcomes import FailedUnits
from gl10m.pipelines.runner import progress_bar
from gl10m.pipelines.stage import Recorded, Stage, Unit, by_count, run_stage
from gl10m.profile import Profile

STAGE_VERSION = 1


@dataclass
class ShardResult:
    status: str = ""
    samples: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)   # planned key -> why it has no sample
    rejected: dict[str, int] = field(default_factory=dict)  # fetch rejection reason -> scenes
    not_planned: dict[str, int] = field(default_factory=dict)  # plan rejection reason -> candidates
    planned: int = 0
    out_dir: Path | None = None

    def summary(self) -> str:
        """One line: what became of the planned scenes, rejections by reason."""
        n = sum(self.samples.values())
        parts = [f"{self.planned} planned scene{'s' if self.planned != 1 else ''}: {n} in the shards"]
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped at split borders")
        parts.append(f"{sum(self.rejected.values())} rejected at fetch" + (f" ({by_count(self.rejected)})"
                                                                           if self.rejected else ""))
        parts.append(f"{len(self.missing)} missing (failed or not fetched)")
        line = ", ".join(parts)
        if self.not_planned:
            line += f"; candidates not planned: {sum(self.not_planned.values())} ({by_count(self.not_planned)})"
        return line


class IncompleteError(FailedUnits):
    """Planned scenes are failed or not fetched: shard only after a complete download (or
    ``--allow-incomplete``). Exit code 3: rerunning the download is the fix."""


def shards_dir(workdir: Path) -> Path:
    return Path(workdir) / "shards"


def collect(profile: Profile, workdir: Path, regions: Sequence[str], ledger: Ledger):
    """(scenes ready to shard, {key: why} of planned scenes without a sample that are not rejected,
    {reason: n} of planned scenes rejected at fetch): plan rows joined with the ledger."""
    from gl10m import plan as planmod
    from gl10m import samples

    ready, missing, rejected = [], {}, {}
    for r in regions:
        p = planmod.plan_path(workdir, r)
        if not p.exists():
            continue
        rows = planmod.read_plan(p)
        for row in rows.drop(columns="geometry").to_dict("records"):
            o = ledger.get("fetch", str(row["key"]))
            folder = samples.staged_dir(workdir, str(row["split"]), str(row["key"]))
            if o is not None and o.status == REJECTED:
                reason = o.reason or "unknown"
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            if o is None or o.status != OK or not folder.exists():
                missing[str(row["key"])] = ("not fetched" if o is None else
                                            o.label if o.status != OK else "staged sample missing")
                continue
            ready.append({"key": str(row["key"]), "split": str(row["split"]), "state": str(row["state"]),
                          "west": row["west"], "south": row["south"], "east": row["east"], "north": row["north"],
                          "folder": folder, "fetch_hash": o.input_hash})
    return sorted(ready, key=lambda s: s["key"]), dict(sorted(missing.items())), dict(sorted(rejected.items()))


def _not_planned(ledger: Ledger, regions: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in ledger.outcomes("plan-scene"):
        if o.status == REJECTED and o.unit.split("-", 1)[0] in regions:
            out[o.reason or "unknown"] = out.get(o.reason or "unknown", 0) + 1
    return dict(sorted(out.items()))


def check_subset(profile: Profile, workdir: Path, regions: Sequence[str], concepts: Sequence[int] | None) -> None:
    """The plans of `regions` must have been made for the concept subset `concepts` (ids; None: no
    subset), so that shards hold exactly that subset, subsampled within it. A mismatch is one
    error line (exit 2) saying what the plan holds and how to get what was asked."""
    from gl10m import plan as planmod

    want = planmod.concept_names(profile, concepts)
    for r in regions:
        p = planmod.plan_path(workdir, r)
        if not p.exists():
            continue
        have = planmod.read_plan_stats(p).get("concepts")
        if have != want:
            def say(names):
                return f"--concepts {','.join(names)}" if names else "no --concepts"
            raise UserError(f"the plan of {r} was made with {say(have)}, this shard with {say(want)}: shard with "
                            f"the plan's, or run `gl10m download` with {say(want)} first")


def run_shard(profile: Profile, workdir: str | Path, *, regions: Sequence[str] | None = None,
              max_bytes: int | None = None, force: bool = False, quiet: bool = False,
              card: bool = True, allow_incomplete: bool = False,
              concepts: Sequence[int] | None = None) -> ShardResult:
    """Shard the fetched scenes of `regions`. Raises :class:`IncompleteError` while planned scenes
    are failed or not fetched, unless `allow_incomplete` (then the manifest and the card list them).
    `concepts` (ids; ``--concepts``) must be the subset the plans were made for (:func:`check_subset`);
    the manifest and the card record it."""
    from gl10m import shards
    from gl10m.io import clean_temp
    from gl10m.splits import border_drops

    from gl10m import plan as planmod

    workdir = Path(workdir).resolve()
    regions = list(regions) if regions else profile.select_regions(None)
    max_bytes = max_bytes or shards.DEFAULT_SHARD_BYTES
    # nothing planned here (a mistyped -w, or download not run yet): an error, and nothing written
    if not (workdir / "ledger.sqlite").is_file() or not any(planmod.plan_path(workdir, r).exists() for r in regions):
        raise UserError(f"{workdir}: nothing to shard for {', '.join(regions)} (no plan; run `gl10m download` first)")
    check_subset(profile, workdir, regions, concepts)
    subset = planmod.concept_names(profile, concepts)
    out = shards_dir(workdir)
    res = ShardResult(out_dir=out)
    with Ledger.for_workdir(workdir) as ledger:
        scenes, res.missing, res.rejected = collect(profile, workdir, regions, ledger)
        res.not_planned = _not_planned(ledger, regions)
        res.planned = len(scenes) + len(res.missing) + sum(res.rejected.values())
        if res.missing and not allow_incomplete:
            n, first = len(res.missing), next(iter(res.missing.items()))
            raise IncompleteError(
                f"{n} of {res.planned} planned scenes have no sample (e.g. {first[0]}: {first[1]}): rerun "
                "`gl10m download` to fetch them, or pass --allow-incomplete to shard without them")
        if out.is_dir():
            clean_temp(out)  # half-written shards, index or card of a killed run are never outputs
        ensure_dir(out, "shards folder")
        res.dropped = border_drops(scenes, profile)
        kept = [s for s in scenes if s["key"] not in res.dropped]
        h = hash_inputs("shard", STAGE_VERSION, max_bytes, [(s["key"], s["fetch_hash"]) for s in kept],
                        sorted(res.dropped.items()), profile.splits.model_dump(mode="json"), card,
                        sorted(res.missing.items()), sorted(res.rejected.items()),
                        *(() if subset is None else ({"concepts": subset},)))
        entries = [shards.Entry(s["key"], s["split"], s["state"], s["folder"]) for s in kept]
        extra = {"profile": {"name": profile.name, "version": profile.version, "hash": profile.hash()},
                 "builder": {"name": "gl10m", "version": __version__},
                 "split_scheme": profile.splits.scheme,
                 "concepts": [{"id": c.id, "name": c.name, "label": c.label} for c in profile.concepts],
                 "dropped_border": len(res.dropped), "planned": res.planned,
                 "rejected_at_fetch": res.rejected, "not_planned": res.not_planned,
                 "not_fetched": len(res.missing),
                 "missing": [{"key": k, "why": v} for k, v in res.missing.items()]}
        if subset is not None:  # --concepts: only scenes holding one of these, subsampled within them
            extra["concept_subset"] = {"concepts": subset, "ids": sorted({int(c) for c in concepts})}
        if profile.imagery.bands != "rgb":  # the extra members (gl10m/samples.py EXTRA); rgb manifests unchanged
            extra["bands"] = profile.imagery.bands

        def on_ok(unit, manifest) -> None:  # the scenes dropped at split borders, then the stage's "done"
            ledger.forget("shard-scene")
            ledger.record_many("shard-scene", [(k, REJECTED, h, reason, None)
                                               for k, reason in sorted(res.dropped.items())])

        summary = run_stage(Stage(
            "shard", [Unit("all", h, (entries, out, max_bytes, extra, profile, card, quiet))], step=shard_step,
            output_ok=lambda u, o: (out / shards.MANIFEST_NAME).exists(), progress=False, raise_errors=True,
            result=lambda manifest: Recorded(OK, None, {"samples": manifest["samples"]}), on_ok=on_ok),
            ledger, force=force, quiet=quiet)
        if summary.skipped:
            res.status = f"skipped ({next(iter(summary.skipped))})"
            res.samples = _count_splits(kept)
            return res
        res.status = OK
        res.samples = ledger.get("shard", "all").detail["samples"]
    return res


def shard_step(entries, out: Path, max_bytes: int, extra: dict, profile: Profile, card: bool, quiet: bool) -> dict:
    """Write the shards, index and manifest of `entries` into `out` (and the dataset card); return
    the manifest."""
    from gl10m import shards

    with progress_bar(quiet) as bar:
        task = bar.add_task("shard", total=len(entries))
        manifest = shards.build(entries, out, max_bytes=max_bytes, manifest_extra=extra,
                                progress=lambda n: bar.advance(task, n))
    if card:
        from gl10m import card as cardmod

        cardmod.write_card(out, profile)
    return manifest


def _count_splits(scenes) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in scenes:
        out[s["split"]] = out.get(s["split"], 0) + 1
    return dict(sorted(out.items()))
