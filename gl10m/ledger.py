"""The ledger: one row per (stage, unit) saying what was done, with which inputs, and how it ended.

A unit is a region for the index stages and a scene for the per-scene stages. Status is
``ok``, ``rejected`` (deterministic: recorded with its reason and not retried while the inputs
are unchanged) or ``failed`` (transient: retried on the next run). Each row carries the hash of
the inputs it was computed from, so a changed rule or parameter reruns exactly what depends on it.

SQLite in WAL mode, written only by the driver process (pipelines record outcomes there; Dask
workers never touch it), so a killed run leaves a consistent ledger.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

OK, REJECTED, FAILED = "ok", "rejected", "failed"
STATUSES = (OK, REJECTED, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    stage TEXT NOT NULL,
    unit TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'rejected', 'failed')),
    reason TEXT,
    input_hash TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    detail TEXT,
    updated TEXT NOT NULL,
    PRIMARY KEY (stage, unit)
);
"""


def hash_inputs(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (strings, numbers, dicts, lists)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Outcome:
    stage: str
    unit: str
    status: str
    reason: str | None
    input_hash: str
    attempts: int
    detail: dict
    updated: str

    @property
    def label(self) -> str:
        return self.status if not self.reason else f"{self.status}:{self.reason}"


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def for_workdir(cls, workdir: str | Path) -> "Ledger":
        return cls(Path(workdir) / "ledger.sqlite")

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading ---------------------------------------------------------------------------
    def get(self, stage: str, unit: str) -> Outcome | None:
        row = self._db.execute(
            "SELECT stage, unit, status, reason, input_hash, attempts, detail, updated "
            "FROM outcomes WHERE stage=? AND unit=?", (stage, unit)).fetchone()
        return _outcome(row) if row else None

    def outcomes(self, stage: str | None = None) -> list[Outcome]:
        q = "SELECT stage, unit, status, reason, input_hash, attempts, detail, updated FROM outcomes"
        args: tuple = ()
        if stage:
            q += " WHERE stage=?"
            args = (stage,)
        return [_outcome(r) for r in self._db.execute(q + " ORDER BY stage, unit", args)]

    def decide(self, stage: str, unit: str, input_hash: str) -> tuple[bool, str]:
        """Should this unit run? Returns (run, why)."""
        o = self.get(stage, unit)
        if o is None:
            return True, "new"
        if o.input_hash != input_hash:
            return True, "inputs changed"
        if o.status == FAILED:
            return True, f"retry after {o.reason or 'failure'}"
        return False, o.label

    def summary(self, stage: str | None = None) -> list[tuple[str, str, int]]:
        """(stage, status[:reason], count) rows, sorted."""
        q = ("SELECT stage, status, COALESCE(reason, ''), COUNT(*) FROM outcomes "
             + ("WHERE stage=? " if stage else "")
             + "GROUP BY stage, status, reason ORDER BY stage, status, reason")
        rows = self._db.execute(q, (stage,) if stage else ())
        return [(s, st if not r else f"{st}:{r}", n) for s, st, r, n in rows]

    def stages(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT stage FROM outcomes ORDER BY stage")]

    # -- writing ---------------------------------------------------------------------------
    def record(self, stage: str, unit: str, status: str, input_hash: str, *,
               reason: str | None = None, detail: dict | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown ledger status {status!r}")
        self.record_many(stage, [(unit, status, input_hash, reason, detail)])

    def record_many(self, stage: str, rows: Iterable[tuple]) -> None:
        """rows: (unit, status, input_hash, reason, detail); one transaction."""
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for unit, status, input_hash, reason, detail in rows:
                if status not in STATUSES:
                    raise ValueError(f"unknown ledger status {status!r}")
                cur.execute(
                    "INSERT INTO outcomes (stage, unit, status, reason, input_hash, attempts, detail, updated) "
                    "VALUES (?, ?, ?, ?, ?, 1, ?, ?) "
                    "ON CONFLICT(stage, unit) DO UPDATE SET status=excluded.status, reason=excluded.reason, "
                    "input_hash=excluded.input_hash, detail=excluded.detail, updated=excluded.updated, "
                    "attempts=CASE WHEN outcomes.input_hash=excluded.input_hash THEN outcomes.attempts + 1 ELSE 1 END",
                    (stage, unit, status, reason, input_hash, json.dumps(detail or {}, sort_keys=True), now))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def forget(self, stage: str, units: Iterable[str] | None = None) -> int:
        if units is None:
            return self._db.execute("DELETE FROM outcomes WHERE stage=?", (stage,)).rowcount
        n = 0
        for u in units:
            n += self._db.execute("DELETE FROM outcomes WHERE stage=? AND unit=?", (stage, u)).rowcount
        return n


def _outcome(row) -> Outcome:
    stage, unit, status, reason, h, attempts, detail, updated = row
    return Outcome(stage, unit, status, reason, h, attempts, json.loads(detail or "{}"), updated)
