"""Exit codes a script can act on, for every stage command and the demo (gl10m.outcomes):
0 everything done (rejections are outcomes), 3 some units failed transiently (rerun), 2 bad input
(one line), 1 anything else. Run as a user runs them: the installed `gl10m` script against the
served testbed world, with real fault proxies in front of it."""
import json
import shutil

import pytest

from gl10m.ledger import Ledger
from gl10m.outcomes import MAX_LINES
from gl10m.testbed.faults import FaultProxy, FaultSpec
from tests.test_bad_inputs import gl10m, one_error_line
from tests.test_security import _closed_port
from tests.test_testbed_serve import wait_for_served

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def indexed(built_world, tmp_path_factory):
    """`gl10m index` of the built world: exit 0 (every region done)."""
    wd = tmp_path_factory.mktemp("exit") / "W"
    r = gl10m("index", "-p", built_world / "profile.yaml", "-w", wd, "--workers", "1", "-q", cwd=wd.parent)
    return wd, r


def _copy(indexed, tmp_path):
    wd = tmp_path / "W"
    shutil.copytree(indexed[0], wd)
    return wd


def fetch_rows(wd):
    with Ledger.for_workdir(wd) as led:
        return {o.unit: o for o in led.outcomes("fetch")}


def test_index_exits_0_when_every_region_is_done(indexed):
    wd, r = indexed
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


def test_plan_with_nothing_served_is_one_line_exit_2(built_world, indexed, tmp_path):
    """The testbed profile's provider is a placeholder (port 0) and no `gl10m testbed serve` has
    recorded its URLs beside it: one line naming the fix, exit 2, nothing retried."""
    assert not (built_world / "served.json").exists()
    wd = _copy(indexed, tmp_path)
    r = gl10m("plan", "-p", built_world / "profile.yaml", "-w", wd, "-q", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert "gl10m testbed serve" in line and "--stac-url" in line and "placeholder" in line
    assert not (wd / "catalog").exists()


def test_download_from_an_unreachable_provider_is_one_line_exit_2(built_world, indexed, tmp_path):
    wd = _copy(indexed, tmp_path)
    url = f"http://127.0.0.1:{_closed_port()}/"
    r = gl10m("download", "-p", built_world / "profile.yaml", "-w", wd, "--stac-url", url, "-q",
              cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert "unreachable" in line and "connection refused" in line and url in line
    assert "Traceback" not in r.stdout + r.stderr


def test_download_with_failing_units_exits_3_and_a_rerun_retries_them(built_world, built_server, indexed, tmp_path):
    """Every COG read answers 503 (the files server behind a proxy that fails everything): the
    scenes fail transiently within their retry budget; one line per failed scene (the first few,
    then a count), no Dask traceback, the tracebacks in W/logs/, exit 3 with a closing line that
    says to rerun. `gl10m shard` then refuses (exit 3) unless --allow-incomplete, which says what is
    missing in the manifest and the card. The provider recovers: the rerun fetches exactly the
    failed scenes and exits 0, and shard exits 0 with the rejections by reason."""
    wd = _copy(indexed, tmp_path)
    prof = built_world / "profile.yaml"
    with FaultProxy(built_server.http_url, FaultSpec(server_error=1.0), name="files") as files, \
            FaultProxy(built_server.stac_url, FaultSpec(), name="stac",
                       rewrite={built_server.http_url: files.url}) as stac:
        env = {"GL10M_RETRY_BUDGET_S": "1", "GDAL_HTTP_MAX_RETRY": "0"}
        r = gl10m("download", "-p", prof, "-w", wd, "--stac-url", stac.url, "--workers", "1", "-q",
                  cwd=tmp_path, env=env)
        assert r.returncode == 3, (r.returncode, r.stderr)
        rows = fetch_rows(wd)
        failed = [k for k, o in rows.items() if o.status == "failed"]
        assert failed and len(failed) == len(rows)
        err = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stdout + r.stderr and "Compute Failed" not in r.stdout + r.stderr
        assert len(err) <= MAX_LINES + 2, r.stderr
        assert err[-1].startswith(f"{len(failed)} units failed transiently (fetch {len(failed)})")
        assert "rerun `gl10m download`" in err[-1]
        logs = list((wd / "logs").glob("download-*.log"))
        assert len(logs) == 1 and logs[0].read_text().count("\n== fetch ") + 1 == len(failed)
        assert "Traceback (most recent call last)" in logs[0].read_text()
        assert logs[0].name in err[-1]

        sh = gl10m("shard", "-p", prof, "-w", wd, "-q", "--no-card", cwd=tmp_path)
        assert sh.returncode == 3, sh.stderr
        assert "--allow-incomplete" in one_error_line(sh) and "rerun `gl10m download`" in sh.stderr
        assert not (wd / "shards" / "manifest.json").exists()

        inc = gl10m("shard", "-p", prof, "-w", wd, "-q", "--allow-incomplete", cwd=tmp_path)
        assert inc.returncode == 0, inc.stderr
        manifest = json.loads((wd / "shards" / "manifest.json").read_text())
        assert sorted(m["key"] for m in manifest["missing"]) == sorted(failed)
        assert "Incomplete build" in (wd / "shards" / "README.md").read_text()

        files.spec = FaultSpec()  # the provider recovers
        again = gl10m("download", "-p", prof, "-w", wd, "--stac-url", stac.url, "--workers", "1", "-q",
                      cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    rows = fetch_rows(wd)
    assert {o.status for o in rows.values()} <= {"ok", "rejected"}
    rejected = {o.reason for o in rows.values() if o.status == "rejected"}
    done = gl10m("shard", "-p", prof, "-w", wd, "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((wd / "shards" / "manifest.json").read_text())
    assert manifest["missing"] == [] and manifest["planned"] == len(rows)
    card = (wd / "shards" / "README.md").read_text()
    assert "Incomplete build" not in card
    # rejections are visible where users look: by reason, in the shard summary and the card
    assert f"{len(rows)} planned scenes" in done.stdout
    for reason in rejected:
        assert reason in done.stdout and f"`{reason}`" in card


def test_verdict_codes():
    """A bug in a unit is exit 1 whatever else failed; transient failures 3; rejected regions 2."""
    from gl10m.outcomes import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_FAILED, EXIT_OK, Failure, verdict

    bug = Failure("fetch", "CA-1", "failed:ImportError: x", kind="error")
    flaky = Failure("fetch", "CA-2", "failed:TransientError: HTTP 503", kind="transient")
    bad = Failure("osm", "CO", "rejected:OsmError: cannot read", kind="rejected")
    assert verdict([], command="download").code == EXIT_OK
    assert verdict([flaky, bad], command="download").code == EXIT_FAILED
    assert verdict([bad], command="index").code == EXIT_BAD_INPUT
    v = verdict([flaky, bug], command="download")
    assert v.code == EXIT_ERROR and "unexpected error" in v.last
    many = verdict([flaky] * (MAX_LINES + 4), command="download")
    assert len(many.lines) == MAX_LINES + 1 and many.lines[-1] == "... and 4 more"


def test_demo_with_a_bad_work_dir_is_one_line_exit_2(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = gl10m("demo", "-w", tmp_path / "afile", "--no-model", "-q", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    one_error_line(r)


def test_the_demo_stops_with_exit_3_when_download_units_failed(tmp_path):
    """The demo's check of a stage: failed units become one line and exit code 3 (FailedUnits)."""
    from gl10m.outcomes import FailedUnits, failure
    from gl10m.pipelines.demo import _check
    from gl10m.pipelines.download import DownloadResult
    from gl10m.pipelines.stage import StageSummary
    from gl10m.sources.retry import TransientError

    res = DownloadResult()
    _check(res, "download", tmp_path)  # nothing failed: nothing raised
    try:
        raise TransientError("CA-1 image: HTTP 503")
    except TransientError as e:
        res.add(StageSummary("fetch", failed=1,
                             failures=[failure("fetch", "CA-1", "failed:TransientError: CA-1 image: HTTP 503", e)]))
    with pytest.raises(FailedUnits) as exc:
        _check(res, "download", tmp_path)
    assert exc.value.exit_code == 3 and "fetch/CA-1" in str(exc.value)
    assert list((tmp_path / "logs").glob("demo-download-*.log"))


def test_plan_and_download_read_the_urls_of_gl10m_testbed_serve(built_world, indexed, tmp_path):
    """`gl10m testbed serve WORLD --port P --files-port Q --faults 0` records its URLs in
    WORLD/served.json (the fault proxies' on the ports asked for); `gl10m plan` with the world's
    profile (a placeholder provider) reads them, no --stac-url; the file goes when serving stops."""
    import os
    import signal
    import subprocess

    from tests.test_bad_inputs import GL10M

    wd = _copy(indexed, tmp_path)
    info = built_world / "served.json"
    port, files_port = _closed_port(), _closed_port()
    p = subprocess.Popen([str(GL10M), "testbed", "serve", str(built_world), "--port", str(port),
                          "--files-port", str(files_port), "--faults", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        urls = wait_for_served(p, info, 60)
        assert urls["stac_url"] == f"http://127.0.0.1:{port}" and urls["http_url"] == f"http://127.0.0.1:{files_port}"
        r = gl10m("plan", "-p", built_world / "profile.yaml", "-w", wd, "-q", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert (wd / "plan").is_dir()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert not info.exists()
