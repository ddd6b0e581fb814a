"""The Dask client the pipelines run on.

A LocalCluster by default (workers and threads from flags), or an existing cluster via
``--scheduler tcp://host:port``. Pipelines only map plain step functions over units and gather
outcomes back into the driver, which alone writes the ledger.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

console = Console(stderr=True)


@dataclass(frozen=True)
class ClusterOptions:
    workers: int | None = None     # default: min(2, cores)
    threads: int = 1               # per worker
    scheduler: str | None = None   # tcp://host:port of an existing cluster
    processes: bool = True         # False: threads in this process (tests, debugging)
    memory_limit: str = "auto"


@contextlib.contextmanager
def dask_client(opts: ClusterOptions | None = None, *, quiet: bool = False) -> Iterator:
    """Start (or connect to) a Dask cluster; print the dashboard address; close it afterwards."""
    import distributed

    opts = opts or ClusterOptions()
    # a unit that raises is the pipeline's business (one line per failed unit, tracebacks in
    # W/logs/, gl10m.outcomes): Dask's own "Compute Failed" error logs never reach the console
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if opts.scheduler:
        client = distributed.Client(opts.scheduler)
        cluster = None
    else:
        workers = opts.workers or max(1, min(2, os.cpu_count() or 1))
        # processes: real worker processes on 127.0.0.1; otherwise threads in this process (inproc)
        extra = {"host": "127.0.0.1"} if opts.processes else {}
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=opts.threads, processes=opts.processes,
            dashboard_address="127.0.0.1:0", memory_limit=opts.memory_limit,
            silence_logs=logging.CRITICAL, **extra)
        client = distributed.Client(cluster)
    _redact_dask_logs(client)
    if not quiet:
        console.print(f"[dim]dask: {len(client.scheduler_info()['workers'])} workers, "
                      f"dashboard {client.dashboard_link}[/dim]")
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def install_log_redaction() -> None:
    """Redact URL credentials from every log record this process creates (Dask's own "Compute
    Failed" warnings print a failed task's arguments, which may hold a ``--stac-url`` with a
    password or a key). Idempotent."""
    from gl10m.errors import redact

    old = logging.getLogRecordFactory()
    if getattr(old, "gl10m_redacting", False):
        return

    def factory(*a, **kw):
        rec = old(*a, **kw)
        try:
            msg = rec.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's business
            return rec
        clean = redact(msg)
        if clean != msg:
            rec.msg, rec.args = clean, ()
        return rec

    factory.gl10m_redacting = True
    logging.setLogRecordFactory(factory)


def _redact_dask_logs(client) -> None:
    """Log redaction (:func:`install_log_redaction`) here, on every worker (a plugin: workers that
    join later too) and on the scheduler, so no Dask log line carries URL credentials."""
    import distributed

    install_log_redaction()

    class RedactLogs(distributed.WorkerPlugin):  # cloudpickled by value; the worker imports gl10m
        def setup(self, worker):
            from gl10m.pipelines.runner import install_log_redaction as install

            install()

    try:
        client.register_plugin(RedactLogs(), name="gl10m-redact-logs")
        client.run_on_scheduler(install_log_redaction)
    except Exception:  # noqa: BLE001 - a cluster that cannot import gl10m fails on its first task anyway
        pass


class RateColumn(ProgressColumn):
    """Units per second of a task (rich's own speed estimate), e.g. ``2.4 scenes/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} {self.unit}/s", style="progress.data.speed")


def progress_bar(quiet: bool = False, unit: str | None = None) -> Progress:
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if unit:
        cols.append(RateColumn(unit))
    return Progress(*cols, console=console, disable=quiet, transient=False)


def map_units(client, fn: Callable, args: Sequence[tuple], *, keys: Sequence[str],
              description: str, quiet: bool = False,
              on_result: Callable[[str, object, BaseException | None], None],
              kwargs: Sequence[dict] | None = None, unit: str | None = None) -> None:
    """Submit fn(*a, **kw) for each unit, call on_result(key, result, error) as each finishes.

    A task that raises never stops the run: its exception is handed to on_result. With
    client=None everything runs in this process (no Dask), in order. unit: show a rate column
    ("scenes" -> "2.40 scenes/s").
    """
    kwargs = list(kwargs) if kwargs is not None else [{}] * len(args)
    if client is None:
        from gl10m.memory import keep_freed_memory

        keep_freed_memory()
        with progress_bar(quiet, unit) as bar:
            task = bar.add_task(description, total=len(args))
            for key, a, kw in zip(keys, args, kwargs):
                try:
                    res, err = fn(*a, **kw), None
                except Exception as e:  # one bad unit never stops a run
                    res, err = None, e
                    _record_error(err)
                on_result(key, res, err)
                bar.advance(task)
        return
    import distributed

    futures = {}
    for key, a, kw in zip(keys, args, kwargs):
        fut = client.submit(run_unit, fn, *a, **kw, key=f"{description}-{key}-{os.urandom(4).hex()}", pure=False)
        futures[fut] = key
    with progress_bar(quiet, unit) as bar:
        task = bar.add_task(description, total=len(futures))
        for fut in distributed.as_completed(list(futures)):
            key = futures[fut]
            try:
                res, err = fut.result(), None
            except Exception as e:
                res, err = None, e
            on_result(key, res, err)
            fut.release()
            bar.advance(task)


def run_unit(fn: Callable, *a, **kw):
    """``fn(*a, **kw)`` on a Dask worker, its error made fit to travel back to the driver.

    Dask pickles a task's error with the whole ``__context__``/``__cause__`` chain (tblib); one
    link that does not unpickle (rasterio's ``CPLE_*`` errors do not) and the driver gets a bare
    ``Exception("TransientError(...)")``, which no longer classifies as transient. So the error
    keeps its type, its kind (:func:`gl10m.outcomes.kind_of`) and full traceback text are
    recorded on it here, and its chain is cut (whether a link unpickles depends on what Dask has
    patched into pickling by then, so it is not tried). URL credentials are redacted from the
    error's message and traceback here, on the worker, before Dask logs or pickles it. Freed
    memory stays in the worker (:func:`gl10m.memory.keep_freed_memory`): steps allocate large
    arrays, and fresh pages for each cost more than the arithmetic on them.
    """
    from gl10m.memory import keep_freed_memory

    keep_freed_memory()
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - reraised below
        err = e
    _record_error(err)
    err.__cause__ = err.__context__ = None  # what the chain says is in gl10m_kind and gl10m_traceback
    raise err


def _record_error(err: BaseException) -> None:
    """Record the kind (:func:`gl10m.outcomes.kind_of`) and the full traceback text of a unit's
    error on it, URL credentials redacted from both the traceback and the error's message
    (:func:`redact_error`): from here on nothing that prints, logs or pickles it can leak them."""
    import traceback

    from gl10m.errors import redact
    from gl10m.outcomes import kind_of

    try:
        err.gl10m_kind = kind_of(err)
        err.gl10m_traceback = redact("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    except AttributeError:  # pragma: no cover - an error type that takes no attributes
        pass
    redact_error(err)


def redact_error(err: BaseException) -> BaseException:
    """`err` with URL credentials (``user:password@``, query strings) removed from its message, in
    place, before it leaves the worker: Dask logs and pickles a failed task's error, and whatever
    prints it later (a log, the console) then never sees them. Its type and kind are kept."""
    from gl10m.errors import redact

    try:
        err.args = tuple(redact(a) if isinstance(a, str) else a for a in err.args)
    except (AttributeError, TypeError):  # pragma: no cover - read-only args
        pass
    for name in ("filename", "filename2", "strerror", "msg", "errmsg"):  # OSError, CPLE_* and friends
        v = getattr(err, name, None)
        if isinstance(v, str) and redact(v) != v:
            try:
                setattr(err, name, redact(v))
            except (AttributeError, TypeError):
                pass
    if redact(str(err)) != str(err):  # a message built elsewhere: keep the type, say no more than it
        try:
            err.args = (redact(str(err)),)
        except (AttributeError, TypeError):  # pragma: no cover
            pass
    for name in ("request", "response"):  # requests' errors carry the request (URL, auth header)
        if getattr(err, name, None) is not None:
            try:
                setattr(err, name, None)
            except (AttributeError, TypeError):
                pass
    return err


def error_label(err: BaseException) -> str:
    """A one-line, ledger-safe description of an exception (URL credentials redacted: an error of
    requests names the URL with its query string, e.g. a token given in ``--stac-url``)."""
    from gl10m.errors import redact

    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return redact(f"{type(err).__name__}: {msg}")[:300]
