import sqlite3

import pytest

from gl10m.ledger import FAILED, OK, REJECTED, Ledger, hash_inputs


def test_decide_record_and_summary(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        assert led.decide("fetch", "CA-1", "h1") == (True, "new")
        led.record("fetch", "CA-1", OK, "h1", detail={"bytes": 3})
        led.record("fetch", "CA-2", REJECTED, "h1", reason="no_naip")
        led.record("fetch", "CA-3", FAILED, "h1", reason="HTTP 503")
        assert led.decide("fetch", "CA-1", "h1") == (False, "ok")
        assert led.decide("fetch", "CA-2", "h1") == (False, "rejected:no_naip")
        run, why = led.decide("fetch", "CA-3", "h1")
        assert run and "HTTP 503" in why
        assert led.decide("fetch", "CA-2", "h2") == (True, "inputs changed")
        assert led.summary("fetch") == [("fetch", "failed:HTTP 503", 1), ("fetch", "ok", 1),
                                        ("fetch", "rejected:no_naip", 1)]
        assert led.get("fetch", "CA-1").detail == {"bytes": 3}


def test_attempts_count_retries_and_reset_on_new_inputs(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        led.record("osm", "CA", FAILED, "h1", reason="timeout")
        led.record("osm", "CA", FAILED, "h1", reason="timeout")
        assert led.get("osm", "CA").attempts == 2
        led.record("osm", "CA", OK, "h2")
        assert led.get("osm", "CA").attempts == 1


def test_persists_across_processes_and_rejects_bad_status(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        led.record("osm", "TX", OK, "abc")
        with pytest.raises(ValueError):
            led.record("osm", "TX", "done", "abc")
    assert sqlite3.connect(path).execute("SELECT status FROM outcomes").fetchall() == [("ok",)]
    with Ledger(path) as led:
        assert led.get("osm", "TX").status == OK


def test_record_many_is_one_transaction(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as led:
        with pytest.raises(ValueError):
            led.record_many("fetch", [("a", OK, "h", None, None), ("b", "bogus", "h", None, None)])
        assert led.outcomes("fetch") == []


def test_hash_inputs_is_order_insensitive_for_dicts():
    assert hash_inputs({"a": 1, "b": 2}) == hash_inputs({"b": 2, "a": 1})
    assert hash_inputs({"a": 1}) != hash_inputs({"a": 2})
