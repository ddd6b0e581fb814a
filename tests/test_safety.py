"""Issue #21: one writer per work dir, bounded reads, a verify that never crashes, strict YAML,
secrets redacted at the source.

Real parts only: real tars written by gl10m.shards and broken by hand, the installed `gl10m`
script run as a subprocess, a real HTTP server standing in for a STAC API, real flocks held by
real processes (killed with SIGKILL where the test is about a dead holder).
"""
from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gl10m import samples as smp
from gl10m import shards
from tests.test_bad_inputs import gl10m, one_error_line, osm_world, write_profile  # noqa: F401 - fixture
from tests.fixtures.tars import sparse_member_tar
from tests.test_security import SECRETS, URL_PASSWORD, URL_TOKEN, find_secrets, make_sample

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]


# -- a small shard folder: 3 samples, 3 shards --------------------------------------------------------
@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety-shards")
    entries = [shards.Entry(k, "train", "CA", smp.write_staged(root / "W", make_sample(k)))
               for k in ("CA-w1", "CA-w2", "CA-w3")]
    shards.build(entries, root / "shards", max_bytes=1)  # one sample per shard
    assert shards.verify(root / "shards")["shards"] == 3
    return root / "shards"


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def index_rows(sd: Path):
    return shards.read_index(sd / shards.INDEX_NAME)


def shard_of(sd: Path, key: str) -> Path:
    r = index_rows(sd).set_index("key").loc[key]
    return sd / r["split"] / r["shard"]


def set_index(sd: Path, key: str, field: str, *, offset: int | None = None, size: int | None = None) -> None:
    idx = index_rows(sd)
    rows = idx.to_dict("records")
    for r in rows:
        if r["key"] == key:
            j = list(r["fields"]).index(field)
            offs, sizes = [int(x) for x in r["offsets"]], [int(x) for x in r["sizes"]]
            if offset is not None:
                offs[j] = offset
            if size is not None:
                sizes[j] = size
            r["offsets"], r["sizes"] = offs, sizes
        r["fields"] = list(r["fields"])
        r["labels"] = [int(x) for x in r["labels"]]
    shards.write_index(rows, sd / shards.INDEX_NAME)


def bad_jpeg_same_checksum(sd: Path, key: str) -> None:
    """Replace hr_07.jpg of `key` by bytes that do not decode, at the same length, and recompute the
    sample's checksum in the index: only decoding can tell."""
    path = shard_of(sd, key)
    idx = index_rows(sd)
    r = idx[idx["key"] == key].iloc[0]
    j = list(r["fields"]).index("hr_07.jpg")
    off, size = int(r["offsets"][j]), int(r["sizes"][j])
    data = bytearray(path.read_bytes())
    data[off + 2:off + size] = b"\x00" * (size - 2)  # the SOI marker stays, the rest is garbage
    path.write_bytes(bytes(data))
    files = {}
    for name, blob in shards.iter_members(path):
        files[name.split(".", 1)[1]] = blob
    rows = idx.to_dict("records")
    for row in rows:
        row["fields"], row["labels"] = list(row["fields"]), [int(x) for x in row["labels"]]
        if row["key"] == key:
            row["sha256"] = shards.sample_digest(files)
    shards.write_index(rows, sd / shards.INDEX_NAME)


def huge_header(sd: Path, key: str, field: str = "lr.png", size: int = 64 * 2**30) -> None:
    """The tar header of `key`.`field` declares `size` bytes (checksum fixed: a valid header)."""
    path = shard_of(sd, key)
    idx = index_rows(sd)
    r = idx[idx["key"] == key].iloc[0]
    off = int(r["offsets"][list(r["fields"]).index(field)]) - 512
    data = bytearray(path.read_bytes())
    hdr = tarfile.TarInfo(f"{key}.{field}")
    hdr.size = size
    hdr.mtime, hdr.mode = 0, 0o444
    data[off:off + 512] = hdr.tobuf(tarfile.GNU_FORMAT)[:512]
    path.write_bytes(bytes(data))


BREAKS = {
    "truncated to half": lambda sd, k: shard_of(sd, k).write_bytes(shard_of(sd, k).read_bytes()[:shard_of(sd, k).stat().st_size // 2]),
    "jpeg that does not decode": bad_jpeg_same_checksum,
    "index size 2**40": lambda sd, k: set_index(sd, k, "hr_03.jpg", size=2**40),
    "index offset outside the file": lambda sd, k: set_index(sd, k, "hr_03.jpg", offset=2**45),
    "negative index offset": lambda sd, k: set_index(sd, k, "hr_03.jpg", offset=-4096),
    "tar header of 64 GiB": huge_header,
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_verify_names_the_bad_shard_and_sample_in_one_line(good_shards, tmp_path, case):
    sd = copy_shards(good_shards, tmp_path / "sd")
    BREAKS[case](sd, "CA-w2")
    r = gl10m("verify", sd, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = one_error_line(r)
    assert shard_of(sd, "CA-w2").name in line and "CA-w2" in line, line
    with pytest.raises(shards.ShardError):
        shards.verify(sd)


@pytest.mark.parametrize("case", ["jpeg that does not decode", "index size 2**40", "index offset outside the file",
                                  "negative index offset"])
def test_show_names_the_bad_sample_in_one_line(good_shards, tmp_path, case):
    sd = copy_shards(good_shards, tmp_path / "sd")
    BREAKS[case](sd, "CA-w2")
    r = gl10m("show", "CA-w2", "--shards", sd, "-o", tmp_path / "x.png", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = one_error_line(r)
    assert "CA-w2" in line and shard_of(sd, "CA-w2").name in line, line
    assert not (tmp_path / "x.png").exists()


def test_verify_of_a_folder_of_broken_shards_prints_one_line_per_bad_shard(good_shards, tmp_path):
    sd = copy_shards(good_shards, tmp_path / "sd")
    BREAKS["truncated to half"](sd, "CA-w1")
    BREAKS["tar header of 64 GiB"](sd, "CA-w2")
    BREAKS["jpeg that does not decode"](sd, "CA-w3")
    r = gl10m("verify", sd, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3, r.stderr
    for key in ("CA-w1", "CA-w2", "CA-w3"):  # one line per shard, naming its sample
        line = [ln for ln in lines if shard_of(sd, key).name in ln]
        assert len(line) == 1 and key in line[0], (key, lines)


READ_SPARSE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a loader that reads 20 GiB fails here, not the machine
from gl10m import data, shards
from gl10m.errors import UserError
for name, read in (("data.load", lambda: list(data.load([sys.argv[1]], tiles="all"))),
                   ("shards.iter_members", lambda: list(shards.iter_members(sys.argv[1])))):
    try:
        read()
        print(name, "read it")
    except UserError as e:  # LoaderError, ShardError
        print(name, "refused:", e)
"""


def test_the_loader_refuses_a_20_gib_member_before_reading_it(tmp_path):
    """A 20 GiB (sparse) lr.png in a shard read without an index: refused from its header, in a
    process whose address space is capped at 8 GiB (reading it would be a MemoryError there)."""
    pytest.importorskip("gl10m.data")
    tar = tmp_path / "gl10m-train-000000.tar"
    sparse_member_tar(tar, "CA-w1.lr.png", 20 * 2**30)
    r = subprocess.run([sys.executable, "-c", READ_SPARSE, str(tar)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all("refused:" in ln and "per-member cap" in ln for ln in lines), r.stdout
    assert "CA-w1" in lines[0]


def test_the_indexed_loader_refuses_index_sizes_above_the_cap(good_shards, tmp_path):
    data = pytest.importorskip("gl10m.data")
    sd = copy_shards(good_shards, tmp_path / "sd")
    set_index(sd, "CA-w2", "hr_03.jpg", size=2**40)
    with pytest.raises(data.LoaderError, match="CA-w2.*per-member cap"):
        list(data.load(sd, split="train", tiles=[3]))


# -- strict YAML ----------------------------------------------------------------------------------------
def billion_laughs() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines)


def _profile_text(mutate) -> str:
    return mutate(yaml.safe_dump(yaml.safe_load((ROOT / "manifests" / "gl10m-66.yaml").read_text()), sort_keys=False))


def test_a_billion_laughs_profile_is_refused_at_once(tmp_path):
    """The bomb sits inside a concept's rule; refused on its first anchor, in well under a second
    of the command's own time."""
    def plant(text: str) -> str:
        bomb = "\n".join("      " + ln for ln in billion_laughs().splitlines())
        i = text.index("  rule:")
        return text[:i] + "  rule:\n    bomb:\n" + bomb + "\n" + text[text.index("\n", i) + 1:]
    p = tmp_path / "bomb.yaml"
    p.write_text(_profile_text(plant))
    line_no = p.read_text().splitlines().index(next(ln for ln in p.read_text().splitlines() if "&a0" in ln)) + 1
    t0 = time.monotonic()
    r = gl10m("profile", "check", p, cwd=tmp_path, timeout=60)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2
    line = one_error_line(r)
    assert "anchors" in line and f"line {line_no}" in line, line


def test_duplicate_top_level_keys_are_refused_naming_the_line(tmp_path):
    text = _profile_text(lambda t: t + "qc:\n  max_cloud_pct: 99\n")
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    n = len(text.splitlines()) - 1  # the second qc:
    r = gl10m("profile", "check", p, cwd=tmp_path)
    assert r.returncode == 2
    line = one_error_line(r)
    assert "duplicate key 'qc'" in line and f"line {n}" in line, line


def test_model_configs_use_the_strict_loader(tmp_path):
    from gl10m.model.crossscale.sampler import load_model_config

    p = tmp_path / "sampler-x.yaml"
    p.write_text("d: &d 8\nheads: *d\n")
    with pytest.raises(Exception, match="anchors"):
        load_model_config(str(p))


def test_the_strict_loader_reads_every_shipped_yaml():
    from gl10m import safeyaml

    files = sorted((ROOT / "manifests").glob("*.yaml")) + sorted((ROOT / "model" / "configs").glob("*.yaml"))
    assert files
    for f in files:
        assert safeyaml.load(f.read_text()) == yaml.safe_load(f.read_text()), f


# -- one writer per work dir ----------------------------------------------------------------------------
HOLDER = """
import sys, time
from gl10m.lock import workdir_lock
with workdir_lock(sys.argv[1], "gl10m shard --test-holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(wd: Path, seconds: float = 60) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(wd), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_exits_2_at_once_naming_the_holder(osm_world, tmp_path):
    wd = tmp_path / "W"
    prof = write_profile(osm_world, "p-lock.yaml", node_index="flex_mem")
    holder = hold(wd)
    try:
        for args in (["index", "-p", prof, "-w", wd, "--no-dask", "-q"],
                     ["shard", "-p", prof, "-w", wd, "-q"],
                     ["download", "-p", prof, "-w", wd, "--no-dask", "-q"],
                     ["demo", "-w", wd, "-q"]):
            t0 = time.monotonic()
            r = gl10m(*args, cwd=tmp_path, timeout=60)
            assert time.monotonic() - t0 < 20
            assert r.returncode == 2, (args, r.stderr)
            line = one_error_line(r)
            assert f"pid {holder.pid}" in line and socket.gethostname() in line and "--test-holder" in line, line
            assert "since 20" in line
        assert sorted(p.name for p in wd.iterdir()) == ["gl10m.lock"]  # nothing written
        st = gl10m("status", "-w", wd, cwd=tmp_path)  # readers never need the lock
        assert "being written" not in st.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_writer_is_taken_over(osm_world, tmp_path):
    wd = tmp_path / "W"
    prof = write_profile(osm_world, "p-lock2.yaml", node_index="flex_mem")
    holder = hold(wd)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    rec = json.loads((wd / "gl10m.lock").read_text())
    assert rec["pid"] == holder.pid  # the dead holder's record is still there
    r = gl10m("index", "-p", prof, "-w", wd, "--no-dask", "-q", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (wd / "gl10m.lock").read_text() == ""  # released: no holder


@pytest.mark.parametrize("command", [("fit", "--shards", "{W}/shards", "--out", "{W}/model/run"),
                                     ("features", "{W}/shards", "{W}/model/run", "--encoder", "{W}/enc")])
def test_model_commands_lock_the_work_dir_they_write_into(tmp_path, command):
    wd = tmp_path / "W"
    wd.mkdir()
    (wd / "ledger.sqlite").write_bytes(b"")
    holder = hold(wd)
    try:
        r = gl10m("model", *(a.format(W=wd) for a in command), cwd=tmp_path, timeout=120)
        assert r.returncode == 2
        assert f"pid {holder.pid}" in one_error_line(r)
        assert not (wd / "model").exists()
    finally:
        holder.kill()
        holder.wait()


def test_clean_temp_removes_only_orphans(tmp_path):
    from gl10m.io import clean_temp, temp_prefix

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        mine = tmp_path / f"{temp_prefix('a.tar')}x1.tmp.tar"
        theirs = tmp_path / f".a.tar.{live.pid}-x2.tmp.tar"
        orphan = tmp_path / f".a.tar.{dead.pid}-x3.tmp.tar"
        legacy = tmp_path / ".a.tar.abc123.tmp.tar"
        for p in (mine, theirs, orphan, legacy):
            p.write_bytes(b"x")
        assert clean_temp(tmp_path) == 2
        assert mine.exists() and theirs.exists() and not orphan.exists() and not legacy.exists()
    finally:
        live.kill()
        live.wait()


# -- secrets never reach any output ---------------------------------------------------------------------
class FakeStac(http.server.BaseHTTPRequestHandler):
    """A STAC API stand-in. Mode "fail": the driver's preflight (``Accept: application/json``) gets
    a landing page, every other request (the workers' STAC client) HTTP 400. Mode "ok": landing
    pages answer and searches return no items."""

    mode = "fail"

    def log_message(self, *a):
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _landing(self) -> dict:
        base = f"http://127.0.0.1:{self.server.server_address[1]}/stac"
        return {"type": "Catalog", "id": "fake", "description": "fake", "stac_version": "1.0.0",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                "links": [{"rel": "self", "href": base + "/"}, {"rel": "root", "href": base + "/"},
                          {"rel": "search", "href": base + "/search", "type": "application/geo+json", "method": "POST"},
                          {"rel": "search", "href": base + "/search", "type": "application/geo+json", "method": "GET"}]}

    def do_GET(self):
        preflight = self.headers.get("Accept") == "application/json"
        if "/search" not in self.path and (self.mode == "ok" or preflight):
            return self._json(200, self._landing())
        if self.mode == "ok":
            return self._json(200, {"type": "FeatureCollection", "features": [], "links": []})
        self._json(400, {"code": "BadRequest", "description": "refused"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        if self.mode == "ok":
            return self._json(200, {"type": "FeatureCollection", "features": [], "links": []})
        self._json(400, {"code": "BadRequest", "description": "refused"})


@pytest.fixture
def fake_stac():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeStac)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_credentials_never_reach_any_output_of_a_failing_or_a_succeeding_run(osm_world, fake_stac, tmp_path):
    """A user:password and a subscription-key query in --stac-url; the provider fails every request
    after the preflight (Dask workers raise errors naming the URL), then a run that succeeds. No
    output stream, ledger, log, catalog or plan file holds the password or the key."""
    prof = write_profile(osm_world, "p-secrets.yaml", node_index="flex_mem")
    wd = tmp_path / "W"
    port = fake_stac.server_address[1]
    url = f"http://alice:{URL_PASSWORD}@127.0.0.1:{port}/stac/?subscription-key={URL_TOKEN}&token={URL_TOKEN}"
    runs = [gl10m("index", "-p", prof, "-w", wd, "--states", "CO", "--no-dask", "-q", cwd=tmp_path, env=SECRETS)]
    assert runs[0].returncode == 0, runs[0].stderr
    FakeStac.mode = "fail"
    fail = gl10m("download", "-p", prof, "-w", wd, "--states", "CO", "--stac-url", url, "--workers", "1",
                 cwd=tmp_path, env=SECRETS, timeout=300)
    runs.append(fail)
    assert fail.returncode != 0 and "Traceback" not in fail.stderr, fail.stderr[-3000:]
    assert "HTTP 400" in fail.stderr and "<redacted>" in fail.stderr, fail.stderr[-3000:]  # the failure path was taken
    assert list((wd / "logs").glob("download-*.log")), "no traceback log was written"
    FakeStac.mode = "ok"
    ok = gl10m("download", "-p", prof, "-w", wd, "--states", "CO", "--stac-url", url, "--workers", "1",
               cwd=tmp_path, env=SECRETS, timeout=300)
    runs.append(ok)
    assert ok.returncode == 0, ok.stderr[-3000:]
    runs.append(gl10m("status", "-w", wd, "--detail", cwd=tmp_path, env=SECRETS))
    texts = [t for r in runs for t in (r.stdout, r.stderr)]
    assert not find_secrets(wd, texts)


DRIVER = """
import sys
from gl10m.pipelines.runner import ClusterOptions, dask_client, map_units

def fetch_like(url):  # a step whose argument is the credentialed URL and whose error names it
    import requests
    raise requests.HTTPError(f"500 Server Error: Internal Server Error for url: {url}")

with dask_client(ClusterOptions(scheduler=sys.argv[1]), quiet=True) as client:
    map_units(client, fetch_like, [(sys.argv[2],)], keys=["CO-w1"], description="fetch", quiet=True,
              on_result=lambda key, res, err: print("result:", type(err).__name__, err))
"""


def test_dask_worker_logs_of_a_failed_task_hold_no_credentials(tmp_path):
    """An external Dask cluster (`--scheduler`), whose worker logs "Compute Failed" with the task's
    arguments and its error: neither the worker's nor the scheduler's log, nor the driver's output,
    holds the password or the key (the error is redacted on the worker, log records everywhere)."""
    dask = Path(sys.executable).with_name("dask")
    if not dask.exists():
        pytest.skip("the dask CLI is not installed")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    addr = f"tcp://127.0.0.1:{port}"
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("scheduler", "worker")}
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=logs["scheduler"], stderr=subprocess.STDOUT, cwd=tmp_path)]
    try:
        procs.append(subprocess.Popen([str(dask), "worker", addr, "--nthreads", "1", "--no-dashboard",
                                       "--no-nanny"], stdout=logs["worker"], stderr=subprocess.STDOUT, cwd=tmp_path))
        url = f"http://alice:{URL_PASSWORD}@127.0.0.1:9/stac/?subscription-key={URL_TOKEN}"
        r = subprocess.run([sys.executable, "-c", DRIVER, addr, url], capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
        assert "result: HTTPError" in r.stdout and "<redacted>" in r.stdout, (r.stdout, r.stderr[-2000:])
        time.sleep(0.5)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()
    worker_log = (tmp_path / "worker.log").read_text()
    assert "Compute Failed" in worker_log and "<redacted>" in worker_log, worker_log[-2000:]
    assert not find_secrets(tmp_path, [r.stdout, r.stderr])
