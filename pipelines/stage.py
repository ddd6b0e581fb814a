"""One stage runner: decide per unit whether to run, map the step over what must run, record outcomes.

A :class:`Stage` names a stage (its ledger name), its units (each a :class:`Unit`: a key, the hash
of its inputs and the step's arguments), its step (a plain function, run on Dask workers or in
this process), its output check and how a step's result becomes a ledger row. :func:`run_stage`
then does, for every stage of every pipeline (index osm and anchors; download catalog, plan and
fetch; shard; the model-scale world's scenes), the same three things:

1. **decide** (:func:`decide`): a unit runs when the ledger has no row for it, its input hash
   changed, it failed last time, or the ledger says done but the stage's output check finds its
   output missing ("output missing"); ``force`` runs every unit ("forced"). Otherwise it is skipped,
   labelled ``skipped ({ledger label})``. A unit that would run but whose upstream is not done
   (``Stage.blocked``) is ``waiting for ...`` and does not run.
2. **map** the step over the units that run (:func:`gl10m.pipelines.runner.map_units`: one bad
   unit never stops the run), or with the stage's own ``mapper`` when its work has more than one
   step (anchors: thin, then scene statistics over spatial partitions, then write).
3. **record** each outcome in the ledger (the driver alone writes it) and in the returned
   :class:`StageSummary`: ``ok``, ``rejected:<reason>`` or ``failed:<error>``.

How errors are recorded depends on what a unit is (``Stage.regions``). Where units are regions
(osm, anchors, catalog, plan) a step that raises bad input (:func:`gl10m.errors.is_rejection`) is
``rejected`` and the region's rejection is a failure of the command (exit code 2); every unit's
label is kept. Where units are scenes (fetch, scenes) a scene is rejected only by the outcome its
step returns (no NAIP, cloudy, ...: an outcome, exit code 0); any error it raises is ``failed`` and
its kind decides the exit code (:func:`gl10m.outcomes.verdict`: 3 transient, 2 bad input, 1 a bug);
only counts are kept (millions of scenes).

Nothing here needs Dask: with ``client=None`` the steps run in this process, in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from gl10m.io import jsonable
from gl10m.ledger import FAILED, OK, REJECTED, Ledger, Outcome
from gl10m.outcomes import Failure, failure, verdict

FORCED, OUTPUT_MISSING = "forced", "output missing"


@dataclass(frozen=True)
class Unit:
    """One unit of a stage: its ledger key, the hash of its inputs (None: not computable yet, which
    only a blocked unit may be) and the step's arguments."""

    key: str
    input_hash: str | None
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """Whether a unit runs this time, and why (the ledger's label when it does not)."""

    unit: Unit
    run: bool
    why: str
    waiting: str | None = None  # "waiting for osm": it would run, but its upstream is not done


@dataclass(frozen=True)
class Recorded:
    """What a step's result puts in the ledger: status (ok / rejected), reason, detail."""

    status: str = OK
    reason: str | None = None
    detail: dict | None = None


def ok_with_detail(result: Any) -> Recorded:
    """The default: a step that returns is ``ok``, its result (JSON-able) is the row's detail."""
    return Recorded(OK, None, jsonable(result or {}))


@dataclass(frozen=True)
class Stage:
    """A stage: what :func:`run_stage` needs to decide, map and record.

    * ``step``: the plain function each unit's ``args``/``kwargs`` are handed to.
    * ``output_ok(unit, outcome)``: is the output of a unit the ledger has as done (ok or rejected)
      still there? If not, the unit runs again ("output missing"); None: the ledger alone decides.
      Region stages check their output file whatever the status, so a rejected region (which has
      none) is tried again on every run and keeps failing the command; scene stages check ``ok``
      units only (a rejected scene has no output).
    * ``blocked(unit)``: why a unit that would run cannot yet ("waiting for osm"), or None.
    * ``result(value)``: the :class:`Recorded` row of a step's return value (default
      :func:`ok_with_detail`).
    * ``on_ok(unit, value)``: called for an ``ok`` result just before its row is recorded (rows of
      another ledger stage, e.g. ``plan-scene``; a run killed between the two leaves the unit not
      done).
    * ``before(units)``: called once with the units about to run, before they run (not when none do).
    * ``mapper(client, units, on_result, quiet)``: runs the units and calls ``on_result(key, value,
      error)`` once per unit, in place of mapping ``step`` (a stage of several steps: anchors).
    * ``progress``: show the runner's bar over units (False where the step shows its own).
    * ``regions``: the units are regions (see the module docstring).
    * ``raise_errors``: a unit's error is re-raised, unrecorded, once the others are recorded (a
      one-unit stage whose failure is the command's, e.g. shard).
    """

    name: str
    units: Sequence[Unit]
    step: Callable | None = None
    output_ok: Callable[[Unit, Outcome], bool] | None = None
    blocked: Callable[[Unit], str | None] | None = None
    result: Callable[[Any], Recorded] = ok_with_detail
    on_ok: Callable[[Unit, Any], None] | None = None
    before: Callable[[list[Unit]], None] | None = None
    mapper: Callable | None = None
    description: str | None = None
    rate_unit: str | None = None
    progress: bool = True
    regions: bool = True
    raise_errors: bool = False


@dataclass
class StageSummary:
    """How the units of a stage ended, typed: done (ok), skipped by why, rejected by reason, failed,
    waiting by why; ``failures`` for the exit code. ``units`` keeps each unit's label where units
    are regions. Summaries merge (``a + b``, :meth:`merge`): several runs or stages into one."""

    stage: str
    done: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # why ("ok", "rejected:no_naip") -> units
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> units
    failed: int = 0
    waiting: dict[str, int] = field(default_factory=dict)   # "waiting for osm" -> units
    units: dict[str, str] = field(default_factory=dict)     # key -> label (region stages)
    failures: list[Failure] = field(default_factory=list)   # failed units; rejected regions

    @property
    def ran(self) -> int:
        return self.done + sum(self.rejected.values()) + self.failed

    def counts(self) -> dict[str, int]:
        """label -> units: ``ok``, ``rejected:<reason>``, ``failed``, ``skipped (<why>)``, ``waiting for ...``."""
        out: dict[str, int] = {}
        if self.done:
            out[OK] = self.done
        out.update({f"{REJECTED}:{r}": n for r, n in self.rejected.items()})
        if self.failed:
            out[FAILED] = self.failed
        out.update({f"skipped ({w})": n for w, n in self.skipped.items()})
        out.update(self.waiting)
        return out

    def merge(self, other: "StageSummary") -> "StageSummary":
        """A new summary with the counts of both (their stage names must agree, or either be "")."""
        if self.stage and other.stage and self.stage != other.stage:
            raise ValueError(f"cannot merge the summaries of {self.stage!r} and {other.stage!r}")
        return StageSummary(self.stage or other.stage, self.done + other.done, _add(self.skipped, other.skipped),
                            _add(self.rejected, other.rejected), self.failed + other.failed,
                            _add(self.waiting, other.waiting), {**self.units, **other.units},
                            self.failures + other.failures)

    __add__ = merge

    def exit_code(self, command: str = "") -> int:
        """0 done (rejected scenes are outcomes), 3 transient failures, 2 rejected regions (bad
        input), 1 anything else (:func:`gl10m.outcomes.verdict`)."""
        return verdict(self.failures, command=command or self.stage).code

    def line(self) -> str:
        """One line: ``fetch: 12 ok, 3 rejected (no_naip 2, cloudy 1), 1 failed, 4 skipped (done)``."""
        parts = [f"{self.done} ok"] if self.done or not (self.skipped or self.waiting) else []
        if self.rejected:
            parts.append(f"{sum(self.rejected.values())} rejected ({by_count(self.rejected)})")
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.skipped:
            parts.append(f"{sum(self.skipped.values())} skipped (done)")
        parts += [f"{n} {why}" for why, n in sorted(self.waiting.items())]
        return f"{self.stage}: " + ", ".join(parts)

    # -- filled by run_stage (and by pipelines for units they report themselves) --
    def note(self, key: str, label: str, kind: str) -> None:
        """Count a unit's end; ``kind`` one of ok, rejected, failed, skipped, waiting. For skipped
        and waiting, `label` is the why; for rejected, the reason; otherwise the unit's label."""
        if kind == OK:
            self.done += 1
            shown = OK
        elif kind == REJECTED:
            self.rejected[label] = self.rejected.get(label, 0) + 1
            shown = f"{REJECTED}:{label}"
        elif kind == FAILED:
            self.failed += 1
            shown = label
        elif kind == "skipped":
            self.skipped[label] = self.skipped.get(label, 0) + 1
            shown = f"skipped ({label})"
        elif kind == "waiting":
            self.waiting[label] = self.waiting.get(label, 0) + 1
            shown = label
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.units[key] = shown


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def by_count(counts: Mapping[str, int]) -> str:
    """``no_naip 2, cloudy 1``: most first, then by name."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def decide(stage: Stage, ledger: Ledger, *, force: bool = False) -> list[Decision]:
    """Per unit: run or skip, and why (the one home of "the ledger says done / its output is missing /
    --force"). Reads the ledger, writes nothing."""
    out = []
    for u in stage.units:
        if u.input_hash is None:
            run, why = True, "inputs not ready"
        else:
            run, why = ledger.decide(stage.name, u.key, u.input_hash)
            if not run and stage.output_ok is not None and not stage.output_ok(u, ledger.get(stage.name, u.key)):
                run, why = True, OUTPUT_MISSING
            if force:
                run, why = True, FORCED
        waiting = stage.blocked(u) if run and stage.blocked is not None else None
        if run and waiting is None and u.input_hash is None:
            raise ValueError(f"{stage.name}/{u.key}: no input hash, and not waiting for anything")
        out.append(Decision(u, run, why, waiting))
    return out


def run_stage(stage: Stage, ledger: Ledger, *, client=None, force: bool = False, quiet: bool = False,
              decisions: Sequence[Decision] | None = None) -> StageSummary:
    """Decide, map the step over the units that run, record each outcome; return the summary.

    decisions: what :func:`decide` said, when the caller needed them first (a dry run prints them)."""
    from gl10m.pipelines.runner import error_label, map_units

    summary = StageSummary(stage.name)
    todo: list[Unit] = []
    for d in decisions if decisions is not None else decide(stage, ledger, force=force):
        if not d.run:
            summary.note(d.unit.key, d.why, "skipped")
        elif d.waiting is not None:
            summary.note(d.unit.key, d.waiting, "waiting")
        else:
            todo.append(d.unit)
    if not stage.regions:
        summary.units.clear()
    if not todo:
        return summary
    by_key = {u.key: u for u in todo}
    raised: list[BaseException] = []

    def on_result(key: str, value: Any, err: BaseException | None) -> None:
        u = by_key[key]
        if err is None:
            rec = stage.result(value)
            if rec.status == OK and stage.on_ok is not None:  # its rows first, then the unit's "done"
                stage.on_ok(u, value)
            ledger.record(stage.name, key, rec.status, u.input_hash, reason=rec.reason, detail=rec.detail)
            if rec.status == OK:
                summary.note(key, OK, OK)
            else:
                summary.note(key, rec.reason or "unknown", REJECTED)
        elif stage.raise_errors:
            raised.append(err)
        else:
            status = REJECTED if stage.regions and _is_rejection(err) else FAILED
            reason = error_label(err)
            ledger.record(stage.name, key, status, u.input_hash, reason=reason)
            if status == REJECTED:
                summary.note(key, reason, REJECTED)
            else:
                summary.note(key, f"{FAILED}:{reason}", FAILED)
            # a failed unit, or a rejected region (bad input): the command's exit code
            summary.failures.append(failure(stage.name, key, f"{status}:{reason}", err))
        if not stage.regions:
            summary.units.pop(key, None)

    if stage.before is not None:
        stage.before(todo)
    description = stage.description or stage.name
    if stage.mapper is not None:
        stage.mapper(client, todo, on_result, quiet or not stage.progress)
    else:
        map_units(client, stage.step, [u.args for u in todo], kwargs=[dict(u.kwargs) for u in todo],
                  keys=[u.key for u in todo], description=description, quiet=quiet or not stage.progress,
                  on_result=on_result, unit=stage.rate_unit)
    if raised:
        raise raised[0]
    return summary


def _is_rejection(err: BaseException) -> bool:
    from gl10m.errors import is_rejection

    return is_rejection(err)
