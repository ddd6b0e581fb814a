"""The one stage runner (gl10m.pipelines.stage): decide, map, record, summarise. Plain steps that
write real files, a real ledger, no Dask (client=None runs the steps in this process)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gl10m.errors import UserError
from gl10m.ledger import FAILED, OK, REJECTED, Ledger
from gl10m.outcomes import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_FAILED, EXIT_OK
from gl10m.pipelines.stage import Recorded, Stage, StageSummary, Unit, decide, run_stage
from gl10m.sources.retry import TransientError

CALLS: list[str] = []


def write_step(key: str, out: str, fate: str = "ok") -> dict:
    """Writes OUT/KEY.txt and returns its size; `fate` makes it raise or reject instead."""
    CALLS.append(key)
    if fate == "bad-input":
        raise UserError(f"{key}: unreadable input")
    if fate == "transient":
        raise TransientError(f"{key}: HTTP 503")
    if fate == "bug":
        raise ZeroDivisionError("division by zero")
    if fate.startswith("reject:"):
        return {"status": REJECTED, "reason": fate.split(":", 1)[1], "detail": {"why": fate}}
    p = Path(out) / f"{key}.txt"
    p.write_text(key * 3)
    return {"status": OK, "reason": None, "detail": {"bytes": p.stat().st_size}}


def scene_result(res: dict) -> Recorded:
    return Recorded(res["status"], res["reason"], res["detail"])


def make_stage(out: Path, fates: dict[str, str], *, regions: bool = False, version: str = "h1",
               **kw) -> Stage:
    units = [Unit(k, f"{version}-{k}", (k, str(out)), {"fate": f}) for k, f in sorted(fates.items())]
    return Stage("demo", units, step=write_step, regions=regions, result=scene_result,
                 output_ok=lambda u, o: o.status != OK or (out / f"{u.key}.txt").exists(), **kw)


@pytest.fixture
def env(tmp_path):
    CALLS.clear()
    out = tmp_path / "out"
    out.mkdir()
    with Ledger(tmp_path / "ledger.sqlite") as led:
        yield out, led


def test_ok_rejected_and_failed_units_are_recorded_and_summarised(env):
    out, led = env
    fates = {"a": "ok", "b": "ok", "c": "reject:cloudy", "d": "reject:cloudy", "e": "reject:no_naip",
             "f": "transient"}
    s = run_stage(make_stage(out, fates), led, quiet=True)
    assert (s.done, s.rejected, s.failed, s.skipped) == (2, {"cloudy": 2, "no_naip": 1}, 1, {})
    assert s.counts() == {"ok": 2, "rejected:cloudy": 2, "rejected:no_naip": 1, "failed": 1}
    assert s.units == {}  # scene stages keep counts only
    rows = {o.unit: o for o in led.outcomes("demo")}
    assert rows["a"].status == OK and rows["a"].detail == {"bytes": 3} and rows["a"].input_hash == "h1-a"
    assert (rows["c"].status, rows["c"].reason, rows["c"].detail) == (REJECTED, "cloudy", {"why": "reject:cloudy"})
    assert rows["f"].status == FAILED and rows["f"].reason == "TransientError: f: HTTP 503"
    assert [f.line() for f in s.failures] == ["demo/f: failed:TransientError: f: HTTP 503"]
    assert s.exit_code() == EXIT_FAILED
    assert s.line() == "demo: 2 ok, 3 rejected (cloudy 2, no_naip 1), 1 failed"


def test_a_rerun_skips_what_is_done_and_retries_what_failed(env):
    out, led = env
    fates = {"a": "ok", "c": "reject:cloudy", "f": "transient"}
    run_stage(make_stage(out, fates), led, quiet=True)
    CALLS.clear()
    fates["f"] = "ok"  # the provider is back
    s = run_stage(make_stage(out, fates), led, quiet=True)
    assert CALLS == ["f"]
    assert (s.done, s.skipped, s.failed, s.exit_code()) == (1, {"ok": 1, "rejected:cloudy": 1}, 0, EXIT_OK)
    assert led.get("demo", "f").attempts == 2 and led.get("demo", "a").attempts == 1
    CALLS.clear()
    s = run_stage(make_stage(out, fates), led, quiet=True)
    assert CALLS == [] and s.ran == 0 and sum(s.skipped.values()) == 3
    assert s.line() == "demo: 3 skipped (done)"


def test_a_done_unit_whose_output_is_missing_is_redone(env):
    out, led = env
    fates = {"a": "ok", "b": "ok", "c": "reject:cloudy"}
    run_stage(make_stage(out, fates), led, quiet=True)
    (out / "b.txt").unlink()
    ds = {d.unit.key: d for d in decide(make_stage(out, fates), led)}
    assert (ds["a"].run, ds["a"].why) == (False, "ok")
    assert (ds["b"].run, ds["b"].why) == (True, "output missing")
    assert (ds["c"].run, ds["c"].why) == (False, "rejected:cloudy")  # a rejected scene has no output
    CALLS.clear()
    s = run_stage(make_stage(out, fates), led, quiet=True)
    assert CALLS == ["b"] and s.done == 1 and (out / "b.txt").read_text() == "bbb"


def test_force_redoes_everything_and_a_changed_input_redoes_its_unit(env):
    out, led = env
    fates = {"a": "ok", "b": "ok", "c": "reject:cloudy"}
    run_stage(make_stage(out, fates), led, quiet=True)
    CALLS.clear()
    assert all(d.why == "forced" for d in decide(make_stage(out, fates), led, force=True))
    s = run_stage(make_stage(out, fates), led, force=True, quiet=True)
    assert CALLS == ["a", "b", "c"] and s.done == 2 and s.rejected == {"cloudy": 1} and not s.skipped
    CALLS.clear()
    st = make_stage(out, fates)
    st = Stage(st.name, [Unit(u.key, "h2-a" if u.key == "a" else u.input_hash, u.args, u.kwargs) for u in st.units],
               step=st.step, regions=False, result=st.result, output_ok=st.output_ok)
    assert {d.unit.key: d.why for d in decide(st, led) if d.run} == {"a": "inputs changed"}
    run_stage(st, led, quiet=True)
    assert CALLS == ["a"] and led.get("demo", "a").attempts == 1  # a new input starts the count again


def test_region_stages_reject_bad_input_and_keep_every_label(env):
    out, led = env
    fates = {"AZ": "ok", "CO": "bad-input", "WA": "transient"}
    s = run_stage(make_stage(out, fates, regions=True), led, quiet=True)
    assert s.units == {"AZ": "ok", "CO": "rejected:UserError: CO: unreadable input",
                       "WA": "failed:TransientError: WA: HTTP 503"}
    assert s.rejected == {"UserError: CO: unreadable input": 1} and s.failed == 1
    assert led.get("demo", "CO").status == REJECTED
    assert {f.unit: (f.rejected, f.transient) for f in s.failures} == {"CO": (True, False), "WA": (False, True)}
    assert s.exit_code() == EXIT_FAILED  # transient wins over bad input: a rerun may finish
    only_bad = run_stage(make_stage(out, {"CO": "bad-input"}, regions=True, version="h9"), led, quiet=True)
    assert only_bad.exit_code() == EXIT_BAD_INPUT


def test_scene_stages_record_any_error_as_failed_and_a_bug_exits_1(env):
    out, led = env
    s = run_stage(make_stage(out, {"a": "bad-input", "b": "bug", "c": "ok"}), led, quiet=True)
    assert led.get("demo", "a").status == FAILED and led.get("demo", "b").status == FAILED
    assert s.failed == 2 and s.rejected == {} and s.exit_code() == EXIT_ERROR
    assert "ZeroDivisionError" in next(f for f in s.failures if f.unit == "b").traceback


def test_blocked_units_wait_and_are_not_recorded(env):
    out, led = env
    st = make_stage(out, {"a": "ok", "b": "ok"}, regions=True, blocked=lambda u: "waiting for osm" if u.key == "b" else None)
    s = run_stage(st, led, quiet=True)
    assert CALLS == ["a"] and s.units == {"a": "ok", "b": "waiting for osm"} and s.waiting == {"waiting for osm": 1}
    assert led.get("demo", "b") is None and s.exit_code() == EXIT_OK
    # a unit whose inputs cannot be hashed yet must be blocked
    st = Stage("demo", [Unit("x", None)], step=write_step, blocked=lambda u: "waiting for catalog")
    assert run_stage(st, led, quiet=True).units == {"x": "waiting for catalog"}
    with pytest.raises(ValueError, match="no input hash"):
        decide(Stage("demo", [Unit("x", None)], step=write_step), led)


def test_on_ok_and_before_hooks_and_the_default_result(env):
    out, led = env
    seen, before = [], []
    st = Stage("demo", [Unit(k, "h", (k, str(out))) for k in ("a", "b")], step=write_step,
               on_ok=lambda u, v: seen.append((u.key, v["status"], led.get("demo", u.key))),
               before=lambda units: before.append([u.key for u in units]))
    s = run_stage(st, led, quiet=True)
    assert before == [["a", "b"]] and s.done == 2
    assert [(k, st_) for k, st_, _ in seen] == [("a", OK), ("b", OK)]
    assert all(o is None for _, _, o in seen)  # called before the unit is recorded as done
    # the default result: ok, the step's return value (JSON-able) as the detail
    assert led.get("demo", "a").detail == {"status": "ok", "reason": None, "detail": {"bytes": 3}}
    before.clear()
    run_stage(st, led, quiet=True)
    assert before == []  # nothing to run: not called


def test_raise_errors_reraises_without_recording(env):
    out, led = env
    st = make_stage(out, {"all": "bug"}, raise_errors=True)
    with pytest.raises(ZeroDivisionError):
        run_stage(st, led, quiet=True)
    assert led.get("demo", "all") is None


def test_summaries_merge():
    a = StageSummary("fetch", done=2, rejected={"cloudy": 1}, skipped={"ok": 3})
    b = StageSummary("fetch", done=1, rejected={"cloudy": 2, "no_naip": 1}, failed=1, waiting={"waiting for plan": 1},
                     units={"CA": "waiting for plan"})
    m = a + b
    assert (m.done, m.rejected, m.failed, m.skipped, m.waiting, m.units) == (
        3, {"cloudy": 3, "no_naip": 1}, 1, {"ok": 3}, {"waiting for plan": 1}, {"CA": "waiting for plan"})
    assert (a.done, a.rejected) == (2, {"cloudy": 1})  # the parts are left as they were
    assert json.dumps(m.counts())  # plain counts
    assert m.line() == "fetch: 3 ok, 4 rejected (cloudy 3, no_naip 1), 1 failed, 3 skipped (done), 1 waiting for plan"
    with pytest.raises(ValueError):
        a + StageSummary("plan")
