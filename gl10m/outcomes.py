"""How a run ended, for people and for scripts: exit codes, failed units, their tracebacks.

Every stage command (``index``, ``plan``, ``download``, ``shard``) and ``demo`` exits with

* **0** everything done: rejections (no NAIP, cloudy, a black HR mosaic, ...) are outcomes;
* **3** some units failed transiently (the provider, the network, a full disk): the last line
  says how many and to rerun the same command, which retries exactly those;
* **2** bad input (a bad option or profile value, an unreadable PBF, an unreachable provider):
  one line on stderr;
* **1** anything else (a bug: an unexpected error in a unit, tracebacks in ``W/logs/``).

Which units failed (and whether a rejection is an outcome or bad input) is recorded by the stage
runner, :mod:`gl10m.pipelines.stage`, whose summaries hand their :class:`Failure` list here.
A failed unit is one line on the console (the first :data:`MAX_LINES`, then a count); the full
tracebacks go to ``W/logs/{command}-{time}.log`` (:func:`write_log`), never to the console.
"""
from __future__ import annotations

import datetime as dt
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from gl10m.errors import UserError

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_FAILED = 0, 1, 2, 3
EXIT_CODES_HELP = ("Exit codes: 0 everything done (rejections are outcomes), 3 some units failed "
                   "transiently (rerun the same command to retry them), 2 bad input (one line on stderr), "
                   "1 anything else.")
MAX_LINES = 5


class FailedUnits(UserError):
    """Work that stopped because units failed transiently: one line, exit code 3 (rerun)."""

    transient = True
    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class Failure:
    """One unit that did not finish: its stage, unit, one-line label, kind and full traceback."""

    stage: str
    unit: str
    label: str          # "failed:TransientError: ..." or "rejected:OsmError: ..."
    traceback: str = ""
    kind: str = ""      # "transient", "rejected" or "error" (a bug); default: from the label

    @property
    def transient(self) -> bool:
        return self.kind == "transient" if self.kind else self.label.startswith("failed")

    @property
    def rejected(self) -> bool:
        return self.kind == "rejected" if self.kind else self.label.startswith("rejected")

    def line(self) -> str:
        return f"{self.stage}/{self.unit}: {self.label}"


# a Dask worker that died or a connection to it that broke: the machine, not the input or the code
_TRANSIENT_NAMES = frozenset({"KilledWorker", "CommClosedError", "FutureCancelledError", "CancelledError"})


def kind_of(err: BaseException) -> str:
    """"rejected" (bad input), "transient" (a rerun may succeed) or "error" (anything else: a bug)."""
    from gl10m.errors import is_rejection
    from gl10m.sources.retry import is_transient

    if getattr(err, "gl10m_kind", None):  # decided on the worker (pipelines.runner.run_unit)
        return err.gl10m_kind
    if is_rejection(err):
        return "rejected"
    if getattr(err, "transient", False) or type(err).__name__ in _TRANSIENT_NAMES or is_transient(err):
        return "transient"
    return "error"


def failure(stage: str, unit: str, label: str, err: BaseException | None) -> Failure:
    """A :class:`Failure` with the kind and traceback of `err` (a Dask worker's, when it came from one)."""
    if err is None:
        return Failure(stage, unit, label)
    from gl10m.errors import redact

    tb = getattr(err, "gl10m_traceback", None) or "".join(traceback.format_exception(type(err), err,
                                                                                     err.__traceback__))
    return Failure(stage, unit, redact(label), redact(tb), kind_of(err))


@dataclass
class Verdict:
    """What the command prints last and how it exits."""

    code: int
    lines: list[str] = field(default_factory=list)  # one per failed unit (at most MAX_LINES + a count)
    last: str | None = None                          # the closing line (None when all is done)


def verdict(failures: Iterable[Failure], *, command: str, log: Path | None = None) -> Verdict:
    """The exit code and closing lines of a run whose units ended in `failures` (failed units,
    and rejections of whole regions; scene rejections are outcomes and do not belong here)."""
    fails = list(failures)
    if not fails:
        return Verdict(EXIT_OK)
    lines = [f.line() for f in fails[:MAX_LINES]]
    if len(fails) > MAX_LINES:
        lines.append(f"... and {len(fails) - MAX_LINES} more")
    where = f"; tracebacks in {log}" if log is not None else ""
    errors = [f for f in fails if not f.transient and not f.rejected]
    transient = [f for f in fails if f.transient]
    if errors:
        n = len(errors)
        return Verdict(EXIT_ERROR, lines,
                       f"{n} unit{'s' if n != 1 else ''} failed with an unexpected error ({_count(f.stage for f in errors)})"
                       + (f" and {len(transient)} transiently" if transient else "") + where)
    if transient:
        by_stage = _count(f.stage for f in transient)
        n = len(transient)
        return Verdict(EXIT_FAILED, lines,
                       f"{n} unit{'s' if n != 1 else ''} failed transiently ({by_stage}): rerun "
                       f"`gl10m {command}` with the same options to retry {'them' if n != 1 else 'it'}{where}")
    n = len(fails)
    return Verdict(EXIT_BAD_INPUT, lines,
                   f"{n} region{'s' if n != 1 else ''} rejected as bad input ({_count(f.stage for f in fails)}): "
                   f"fix the input named above and rerun `gl10m {command}`{where}")


def write_log(workdir: Path, command: str, failures: Iterable[Failure]) -> Path | None:
    """Write the tracebacks of `failures` to ``W/logs/{command}-{UTC time}-{pid}.log`` (atomically);
    None when there is nothing to write or the work dir does not exist."""
    fails = [f for f in failures if f.traceback]
    if not fails or not Path(workdir).is_dir():
        return None
    from gl10m.io import atomic_write_text

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(workdir) / "logs" / f"{command}-{stamp}-{os.getpid()}.log"
    from gl10m.errors import redact

    text = redact("".join(f"== {f.stage} {f.unit}: {f.label}\n{f.traceback.rstrip()}\n\n" for f in fails))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError:  # a full disk must not hide the failures themselves: they are still printed
        return None
    return path


def _count(stages: Iterable[str]) -> str:
    c: dict[str, int] = {}
    for s in stages:
        c[s] = c.get(s, 0) + 1
    return ", ".join(f"{s} {n}" for s, n in c.items())
