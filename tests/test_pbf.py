"""Pinned PBF download against a real Range-capable HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading
from functools import partial

import pytest
from RangeHTTPServer import RangeRequestHandler

from gl10m.pbf import PbfError, fetch_pbf, file_digest

NAME = "state-240101.osm.pbf"


class Handler(RangeRequestHandler):
    """Records (method, path, Range) of each request; can drop the link mid-body."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def send_head(self):
        self.server.log.append((self.command, self.path, self.headers.get("Range")))
        if self.server.fail_first and self.path.endswith(".pbf"):  # hang up before any answer
            self.server.fail_first -= 1
            self.close_connection = True
            return None
        if not self.server.ranges:  # behave like a server without Range support
            self.range = None
            return http.server.SimpleHTTPRequestHandler.send_head(self)
        return super().send_head()

    def copyfile(self, source, outputfile):
        if self.server.drop_after and self.path.endswith(".pbf"):
            self.server.drop_after, n = 0, self.server.drop_after
            outputfile.write(source.read(n))
            self.close_connection = True
            return
        return super().copyfile(source, outputfile)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(3_000_000 + 12345)  # several 1 MiB chunks
    (root / NAME).write_bytes(data)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    srv.log, srv.drop_after, srv.ranges, srv.fail_first = [], 0, True, 0
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_port}/{NAME}"
    srv.root, srv.data = root, data
    yield srv
    srv.shutdown()
    srv.server_close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def pbf_gets(srv):
    return [x for x in srv.log if x[0] == "GET" and x[1].endswith(".pbf")]


def test_download_with_pinned_sha256(server, tmp_path):
    seen = []
    p = fetch_pbf(server.url, tmp_path / "dl", sha256=sha(server.data), progress=lambda d, t: seen.append((d, t)))
    assert p == tmp_path / "dl" / NAME and p.read_bytes() == server.data
    assert not (tmp_path / "dl" / (NAME + ".part")).exists()
    assert seen[-1] == (len(server.data), len(server.data))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # a second call reuses the verified file without a new transfer
    n = len(pbf_gets(server))
    assert fetch_pbf(server.url, tmp_path / "dl", sha256=sha(server.data)) == p
    assert len(pbf_gets(server)) == n


def test_resume_from_partial_file(server, tmp_path):
    dl = tmp_path / "dl"
    dl.mkdir()
    k = 1_234_567
    (dl / (NAME + ".part")).write_bytes(server.data[:k])
    p = fetch_pbf(server.url, dl, sha256=sha(server.data))
    assert p.read_bytes() == server.data
    assert pbf_gets(server) == [("GET", f"/{NAME}", f"bytes={k}-")]


def test_resume_after_dropped_connection(server, tmp_path):
    server.drop_after = 1_000_000
    p = fetch_pbf(server.url, tmp_path / "dl", sha256=sha(server.data), backoff_s=0)
    assert p.read_bytes() == server.data
    gets = pbf_gets(server)
    assert gets[0][2] is None and gets[1][2].startswith("bytes=")
    resumed_at = int(gets[1][2][len("bytes="):-1])
    assert 0 < resumed_at <= 1_000_000  # what arrived before the drop was kept


@pytest.mark.parametrize("fails", [1, 3])
def test_a_server_that_hangs_up_is_retried_through_the_retry_module(server, tmp_path, monkeypatch, fails):
    """A connection closed before any answer is retried with gl10m.sources.retry's backoff (one
    delay per retry, attempts counted from 0), up to `retries`; then one PbfUnavailable line."""
    from gl10m.pbf import PbfUnavailable
    from gl10m.sources import retry as retry_mod

    delays = []
    real = retry_mod.backoff_delay

    def spy(attempt, **kw):
        delays.append(attempt)
        return real(attempt, **kw)

    monkeypatch.setattr(retry_mod, "backoff_delay", spy)
    server.fail_first = fails
    p = fetch_pbf(server.url, tmp_path / "dl", sha256=sha(server.data), retries=3, backoff_s=0)
    assert p.read_bytes() == server.data
    assert delays == list(range(fails))
    assert len(pbf_gets(server)) == fails + 1

    delays.clear()
    server.fail_first = fails + 1  # one more hang-up than retries=fails allows
    with pytest.raises(PbfUnavailable, match=f"download failed after {fails} retries") as e:
        fetch_pbf(server.url, tmp_path / "dl2", sha256=sha(server.data), retries=fails, backoff_s=0)
    assert "\n" not in str(e.value)
    assert delays == list(range(fails))


def test_server_without_range_restarts(server, tmp_path):
    server.ranges = False
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / (NAME + ".part")).write_bytes(b"stale bytes that are not the file")
    p = fetch_pbf(server.url, dl, sha256=sha(server.data))
    assert p.read_bytes() == server.data


def test_complete_part_file_is_verified_not_refetched(server, tmp_path):
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / (NAME + ".part")).write_bytes(server.data)
    assert fetch_pbf(server.url, dl, sha256=sha(server.data)).read_bytes() == server.data


def test_sha256_mismatch(server, tmp_path):
    dl = tmp_path / "dl"
    with pytest.raises(PbfError, match="sha256 mismatch") as e:
        fetch_pbf(server.url, dl, sha256="0" * 64)
    assert "\n" not in str(e.value)
    assert not (dl / NAME).exists() and not (dl / (NAME + ".part")).exists()


def test_md5_sidecar_checked(server, tmp_path):
    (server.root / (NAME + ".md5")).write_text(f"{hashlib.md5(server.data).hexdigest()}  {NAME}\n")
    assert fetch_pbf(server.url, tmp_path / "a").read_bytes() == server.data
    (server.root / (NAME + ".md5")).write_text(f"{'f' * 32}  {NAME}\n")
    with pytest.raises(PbfError, match="md5 mismatch"):
        fetch_pbf(server.url, tmp_path / "b")
    assert not (tmp_path / "b" / NAME).exists()


def test_no_checksum_available_still_downloads(server, tmp_path):
    assert fetch_pbf(server.url, tmp_path / "dl").read_bytes() == server.data
    assert ("GET", f"/{NAME}.md5", None) in server.log


def test_http_errors_are_one_line(server, tmp_path):
    with pytest.raises(PbfError, match="HTTP 404"):
        fetch_pbf(server.url.replace(NAME, "missing.osm.pbf"), tmp_path / "dl")
    srv_port = server.server_port
    server.shutdown()
    server.server_close()
    with pytest.raises(PbfError, match="download failed") as e:
        fetch_pbf(f"http://127.0.0.1:{srv_port}/{NAME}", tmp_path / "dl", retries=1, backoff_s=0, timeout=2)
    assert "\n" not in str(e.value)


def test_local_paths(tmp_path):
    f = tmp_path / "x.osm.pbf"
    f.write_bytes(b"abc")
    assert fetch_pbf(str(f), tmp_path / "dl") == f
    assert fetch_pbf(f"file://{f}", tmp_path / "dl") == f
    assert fetch_pbf(str(f), tmp_path / "dl", sha256=sha(b"abc")) == f
    with pytest.raises(PbfError, match="sha256 mismatch"):
        fetch_pbf(str(f), tmp_path / "dl", sha256=sha(b"abd"))
    with pytest.raises(PbfError, match="no such PBF"):
        fetch_pbf(str(tmp_path / "nope.pbf"), tmp_path / "dl")
    with pytest.raises(PbfError, match="64 hex"):
        fetch_pbf(str(f), tmp_path / "dl", sha256="abc")
    with pytest.raises(PbfError, match="unsupported URL"):
        fetch_pbf("ftp://example.org/x.pbf", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()  # local sources are never copied


def test_file_digest(tmp_path):
    f = tmp_path / "big.bin"
    data = os.urandom(2 * (1 << 20) + 7)
    f.write_bytes(data)
    assert file_digest(f) == sha(data)
    assert file_digest(f, "md5") == hashlib.md5(data).hexdigest()
    assert file_digest(f, chunk=1000) == sha(data)
