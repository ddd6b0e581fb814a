"""Every transient class a hostile provider produces is classified transient and retried within
a per-unit time budget (gl10m.sources.retry), and survives the trip back from a Dask worker.

Real parts: the testbed's fault proxy in front of a real HTTP server, a STAC landing page served
garbled over real HTTP, pystac-client and requests as the pipeline uses them. The slow end-to-end
runs behind 20 % faults on several seeds are in tests/test_faults.py."""
import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from gl10m.sources.retry import Budget, TransientError, check_response, is_transient, retry
from gl10m.testbed.faults import FaultProxy, FaultSpec
from tests.test_faults import upstream  # noqa: F401 - the fixture

LANDING = {"type": "Catalog", "id": "t", "stac_version": "1.0.0", "description": "t", "conformsTo": [],
           "links": [{"rel": "self", "href": "/"}, {"rel": "root", "href": "/"}]}


class Garbling:
    """A STAC landing page on 127.0.0.1 whose first `bad` answers are cut mid-JSON (HTTP 200, a
    consistent Content-Length: nothing below the JSON parser notices)."""

    def __init__(self, bad: int):
        owner = self
        self.bad, self.hits = bad, 0

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = json.dumps({**LANDING, "links": [{**ln, "href": owner.url + "/"} for ln in LANDING["links"]]})
                owner.hits += 1
                data = (body[: len(body) // 2] if owner.hits <= owner.bad else body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_429_and_5xx_are_transient_with_their_retry_after(upstream):  # noqa: F811
    with FaultProxy(upstream.url, FaultSpec(throttle=1.0, retry_after="2")) as px:
        with pytest.raises(TransientError) as e:
            check_response(requests.get(px.url + "/blob.bin", timeout=10))
    assert is_transient(e.value) and e.value.status == 429 and e.value.retry_after == 2.0
    with FaultProxy(upstream.url, FaultSpec(server_error=1.0, seed=3)) as px:
        with pytest.raises(TransientError) as e:
            check_response(requests.get(px.url + "/blob.bin", timeout=10))
    assert is_transient(e.value) and e.value.status in (500, 502, 503, 504)


def test_a_body_cut_short_and_a_reset_are_transient(upstream):  # noqa: F811
    with FaultProxy(upstream.url, FaultSpec(drop=1.0, seed=2)) as px:
        with pytest.raises(requests.RequestException) as e:
            requests.get(px.url + "/blob.bin", timeout=10).content
    assert is_transient(e.value)
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))


def test_garbled_stac_json_is_transient_and_retried():
    """A landing page cut mid-JSON: pystac's own reading of it ends in `STACError ... does not
    resolve to a STAC object` or a JSON error; ours is a TransientError, retried until it parses."""
    from gl10m.sources.stac import StacProvider

    srv = Garbling(bad=10**6)
    try:
        with pytest.raises(Exception) as e:
            StacProvider(srv.url, retry_kw={"attempts": 2, "base_delay": 0.0, "max_delay": 0.0}).client()
        assert is_transient(e.value), repr(e.value)
    finally:
        srv.close()
    srv = Garbling(bad=3)
    try:
        client = StacProvider(srv.url, retry_kw={"attempts": 5, "base_delay": 0.0, "max_delay": 0.0}).client()
        assert client.id == "t" and srv.hits >= 4
    finally:
        srv.close()


def test_a_stac_error_over_a_cut_landing_page_is_transient(upstream):  # noqa: F811
    """pystac wraps the read error of a landing page cut short in STACError: the chain decides."""
    import pystac

    (upstream.root / "catalog.json").write_text(json.dumps(LANDING))
    with FaultProxy(upstream.url, FaultSpec(drop=1.0, seed=5)) as px:
        with pytest.raises(Exception) as e:
            pystac.Catalog.from_file(px.url + "/catalog.json")
    assert is_transient(e.value), repr(e.value)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, d):
        self.t += d


def test_a_budget_bounds_retrying_in_time_not_in_attempts():
    clock = Clock()
    calls = []

    def flaky():
        calls.append(clock.t)
        if len(calls) < 40:
            raise TransientError("HTTP 503", status=503)
        return "ok"

    # 39 failures in a row: far more than any count of attempts would allow, within the budget
    assert retry(flaky, attempts=None, budget=Budget(600, clock=clock), base_delay=0.5, max_delay=2.0,
                 sleep=clock.sleep) == "ok"
    # a provider that never recovers: the unit fails once the budget is spent, not before
    clock2 = Clock()
    n = []

    def down():
        n.append(1)
        raise TransientError("HTTP 503", status=503)

    with pytest.raises(TransientError):
        retry(down, attempts=None, budget=Budget(30, clock=clock2), base_delay=0.5, max_delay=2.0,
              sleep=clock2.sleep)
    assert 29.9 <= clock2.t <= 30.0 + 1e-9 and len(n) > 15
    # a Retry-After beyond what is left ends the retrying at once
    clock3 = Clock()
    with pytest.raises(TransientError):
        retry(lambda: (_ for _ in ()).throw(TransientError("429", retry_after=60, status=429)), attempts=None,
              budget=Budget(10, clock=clock3), sleep=clock3.sleep)
    assert clock3.t == 0.0
    with pytest.raises(ValueError):
        retry(lambda: 1, attempts=None)


def test_errors_travel_back_from_a_worker_with_their_kind():
    """A TransientError raised while handling a rasterio error (whose pickled form does not load
    under Dask's tblib pickling) arrives at the driver as a TransientError, classified transient,
    with the full traceback text; before, Dask sent a bare Exception("TransientError(...)")."""
    import rasterio
    from distributed.protocol import pickle as dask_pickle

    from gl10m.outcomes import failure, kind_of
    from gl10m.pipelines.runner import run_unit

    def step():
        try:
            rasterio.open("/nonexistent/x.tif")
        except rasterio.errors.RasterioIOError:
            raise TransientError("x image: Read failed", status=None) from None

    with pytest.raises(TransientError) as e:
        run_unit(step)
    back = dask_pickle.loads(dask_pickle.dumps(e.value))
    assert type(back) is TransientError and kind_of(back) == "transient"
    f = failure("fetch", "CA-1", "failed:TransientError: x", back)
    assert f.transient and "in step" in f.traceback and e.value.__context__ is None
    assert pickle.loads(pickle.dumps(TransientError("m", retry_after=3, status=429))).retry_after == 3
