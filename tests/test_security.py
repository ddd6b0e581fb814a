"""Safety (issue #9): shards cannot write outside their folder or run code, checkpoints cannot run
code, and credentials never reach logs, the ledger, metadata or shards.

Covered elsewhere, not repeated here:
* absolute and '..' member names refused by ``shards.iter_members``:
  tests/test_shards.py::test_unsafe_member_names_are_rejected; by ``gl10m.data.load`` (streaming),
  with an extra pickle member: tests/test_data.py::test_unsafe_or_off_schema_shards_are_refused;
* signed URLs redacted from fetch errors and meta.json free of URLs:
  tests/test_fetch.py::test_good_scene_is_staged_with_provenance, test_http_403_resigns_once;
* the PC subscription key sent as a header, SAS tokens cached and re-signed:
  tests/test_sources_stac.py::test_pc_signing_caches_refreshes_and_resigns.
"""
from __future__ import annotations

import ast
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from gl10m import samples as smp
from gl10m import shards
from tests.fixtures.samples import make_sample as _make_sample
from tests.fixtures.tars import write_tar

ROOT = Path(__file__).resolve().parents[1]
GL10M = Path(sys.executable).with_name("gl10m")


def gl10m(*args, cwd: Path, env: dict | None = None, timeout: float = 600):
    if not GL10M.exists():
        pytest.skip(f"{GL10M} is not installed (pip install -e .)")
    return subprocess.run([str(GL10M), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class Marker:
    """Unpickling this creates the file `path`: a stand-in for arbitrary code run by a pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_npy(marker: Path) -> bytes:
    """A .npy holding an object array whose unpickling creates `marker`."""
    buf = io.BytesIO()
    np.save(buf, np.array([Marker(marker), 1], dtype=object), allow_pickle=True)
    return buf.getvalue()


# -- synthetic shards ------------------------------------------------------------------------------
def make_sample(key: str, split: str = "train") -> smp.Sample:
    """Flat, striped images (fast to encode, small)."""
    return _make_sample(key, split, look="flat")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    entries = []
    for i in range(2):
        key = f"CA-w{i + 1}"
        entries.append(shards.Entry(key, "train", "CA", smp.write_staged(root / "W", make_sample(key))))
    shards.build(entries, root / "shards")
    return root / "shards"


def members(shard_dir: Path) -> list[tuple[str, bytes]]:
    (tar,) = sorted((shard_dir / "train").glob("*.tar"))
    return list(shards.iter_members(tar))


def copy_with_tar(shard_dir: Path, dst: Path, mem: list, special: dict | None = None, index: bool = True) -> Path:
    """A copy of the shards folder whose train shard is replaced by a hand-made tar."""
    shutil.copytree(shard_dir, dst)
    (tar,) = sorted((dst / "train").glob("*.tar"))
    tar.unlink()
    write_tar(tar, mem, special)
    if not index:
        (dst / shards.INDEX_NAME).unlink()
    return dst


def _loaders():
    """Every way gl10m reads a shard: name -> callable(shards folder, tar path) that consumes it."""
    data = pytest.importorskip("gl10m.data")
    return {
        "shards.iter_members": lambda sd, tar: list(shards.iter_members(tar)),
        "shards.verify": lambda sd, tar: shards.verify(sd),
        "data.load streaming": lambda sd, tar: list(data.load([tar], tiles="all")),
        "data.load indexed": lambda sd, tar: list(data.load(sd, split="train", tiles="all", verify=True)),
    }


LOADERS = ["shards.iter_members", "shards.verify", "data.load streaming", "data.load indexed"]


# -- tar members -------------------------------------------------------------------------------------
UNSAFE_NAMES = ["/tmp/gl10m-escape/CA-w1.lr.png", "../CA-w1.lr.png", "a/../../CA-w1.lr.png",
                "CA-w1.lr.png/../../../escape.png", "..", "/"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_member_names_are_refused_by_every_loader(shard_dir, tmp_path, monkeypatch, loader, name):
    """A real tar whose second member is renamed: every loader refuses it, and nothing appears at
    the place the name points to (loaders never extract)."""
    from gl10m.errors import UserError

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    mem = members(shard_dir)
    mem[1] = (name, mem[1][1])
    sd = copy_with_tar(shard_dir, tmp_path / "sd", mem)
    (tar,) = sorted((sd / "train").glob("*.tar"))
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(UserError) as e:
        _loaders()[loader](sd, tar)
    msg = str(e.value)
    assert "\n" not in msg
    assert "unsafe" in msg or "does not match" in msg or "not a regular file" in msg, msg
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/gl10m-escape").exists()


def _special(kind: str, name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    if kind == "symlink":
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        ti.type, ti.linkname = tarfile.LNKTYPE, "CA-w1.meta.json"
    elif kind == "fifo":
        ti.type = tarfile.FIFOTYPE
    elif kind == "device":
        ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
    else:
        ti.type = tarfile.DIRTYPE
    return ti


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "device", "directory"])
def test_link_and_device_members_are_refused(shard_dir, tmp_path, loader, kind):
    from gl10m.errors import UserError

    mem = members(shard_dir)
    name = mem[4][0]  # a tile of the first sample
    sd = copy_with_tar(shard_dir, tmp_path / "sd", mem, special={4: _special(kind, name)})
    (tar,) = sorted((sd / "train").glob("*.tar"))
    with pytest.raises(UserError) as e:
        _loaders()[loader](sd, tar)
    assert "\n" not in str(e.value)


def test_gl10m_verify_names_an_unsafe_member(shard_dir, tmp_path):
    mem = members(shard_dir)
    mem[2] = ("../../" + mem[2][0], mem[2][1])
    sd = copy_with_tar(shard_dir, tmp_path / "sd", mem)
    r = gl10m("verify", sd, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unsafe tar member name" in lines[0], r.stderr


def test_feature_shards_refuse_unsafe_members(tmp_path):
    from gl10m.errors import UserError

    feats = pytest.importorskip("gl10m.model.crossscale.features")
    npy = io.BytesIO()
    np.save(npy, np.zeros((100, 4), np.float16), allow_pickle=False)
    for i, name in enumerate(["../CA-w1.hr_tokens.npy", "/tmp/CA-w1.hr_tokens.npy"]):
        path = write_tar(tmp_path / f"f{i}.tar", [(name, npy.getvalue())])
        with pytest.raises(UserError) as e:
            list(feats._iter_shard(path))
        assert "unsafe" in str(e.value), e.value
    link = write_tar(tmp_path / "link.tar", [("CA-w1.hr_tokens.npy", b"")],
                     special={0: _special("symlink", "CA-w1.hr_tokens.npy")})
    with pytest.raises(feats.FeatureError, match="not a regular file"):
        list(feats._iter_shard(link))


# -- nothing is unpickled --------------------------------------------------------------------------------
PACKAGE_DIRS = ("gl10m", "pipelines", "model")  # the three import packages of the distribution
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
              "_pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load", "dill.loads",
              "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads",
              "shelve.open", "pandas.read_pickle", "numpy.lib.format.read_array", "yaml.unsafe_load",
              "yaml.full_load", "torch.jit.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (``import numpy as np`` ->
    {'np': 'numpy'}; ``from pickle import loads as l`` -> {'l': 'pickle.loads'})."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls in `source` that can unpickle (or otherwise run code from) data: the unpicklers
    above, ``np.load`` with ``allow_pickle`` anything but False, ``torch.load`` without
    ``weights_only=True``, ``yaml.load`` without a safe loader."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        where = f"{filename}:{node.lineno} {name}"
        if name in UNPICKLERS:
            bad.append(where)
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                bad.append(where + " allow_pickle")
        elif name == "torch.load":
            if not _is_true(_kw(node, "weights_only")):
                bad.append(where + " without weights_only=True")
        elif name == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            lname = _dotted(loader, aliases) if loader is not None else None
            if lname not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
                bad.append(where + " without SafeLoader")
    return bad


def test_the_scanner_finds_every_unsafe_form():
    """The scan below is only worth something if it would see these."""
    src = '''
import pickle, torch, yaml
import numpy as np
from pickle import loads as l
import pandas as pd
pickle.load(f); pickle.loads(b); l(b); pickle.Unpickler(f).load()
np.load(p, allow_pickle=True); np.load(p, allow_pickle=flag)
torch.load(p); torch.load(p, weights_only=False); torch.load(p, map_location="cpu")
yaml.load(s); yaml.load(s, Loader=yaml.Loader); yaml.unsafe_load(s)
pd.read_pickle(p)
np.load(p); np.load(p, allow_pickle=False); torch.load(p, weights_only=True); yaml.safe_load(s)
yaml.load(s, Loader=yaml.SafeLoader)
'''
    found = unsafe_loads(src)
    assert len(found) == 13, found
    assert not [f for f in found if ":11 " in f or ":12 " in f]  # the safe forms on the last two lines


def test_no_code_path_unpickles_data():
    files = [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    bad = []
    for p in files:
        bad += unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))
    assert not bad, "\n".join(bad)


def test_the_marker_payload_is_live(tmp_path):
    """Sanity: loading the payload the way the loaders must not does create the marker."""
    marker = tmp_path / "pwned"
    np.load(io.BytesIO(evil_npy(marker)), allow_pickle=True)
    assert marker.exists()


@pytest.fixture
def evil_shards(tmp_path, monkeypatch):
    """A shards folder (index, manifest, tar) whose first sample's labels.npy is an object-array
    pickle, consistent with its index: as another tool (or an attacker) could write it."""
    marker = tmp_path / "pwned"
    w = tmp_path / "W"
    folder = smp.write_staged(w, make_sample("CA-w1"))
    (folder / smp.LABELS_FIELD).write_bytes(evil_npy(marker))
    with monkeypatch.context() as m:  # gl10m's build refuses it (next test); bypass that here
        m.setattr(smp, "decode_labels", lambda b: np.zeros(66, np.uint8))
        shards.build([shards.Entry("CA-w1", "train", "CA", folder)], tmp_path / "shards")
    assert not marker.exists()
    return tmp_path / "shards", folder, marker


@pytest.mark.parametrize("how", ["indexed", "streaming", "verify", "read_staged", "gl10m verify"])
def test_pickled_labels_are_refused_and_never_run(evil_shards, tmp_path, how):
    from gl10m.errors import UserError

    sd, folder, marker = evil_shards
    if how == "gl10m verify":
        r = gl10m("verify", sd, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "labels.npy" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    else:
        data = pytest.importorskip("gl10m.data")
        (tar,) = sorted((sd / "train").glob("*.tar"))
        run = {"indexed": lambda: list(data.load(sd, split="train", tiles=[0])),
               "streaming": lambda: list(data.load([tar], tiles=[0])),
               "verify": lambda: shards.verify(sd),
               "read_staged": lambda: smp.read_staged(folder)}[how]
        with pytest.raises(UserError, match="labels.npy"):
            run()
    assert not marker.exists()


def test_shard_build_refuses_a_pickled_staged_sample(tmp_path):
    marker = tmp_path / "pwned"
    folder = smp.write_staged(tmp_path / "W", make_sample("CA-w1"))
    (folder / smp.LABELS_FIELD).write_bytes(evil_npy(marker))
    out = tmp_path / "shards"
    with pytest.raises(smp.SampleError, match="labels.npy"):
        shards.build([shards.Entry("CA-w1", "train", "CA", folder)], out)
    assert not marker.exists()
    assert not [p for p in out.rglob("*") if p.is_file()]  # no partial shard, no temp file


def test_pickled_feature_arrays_and_text_are_never_run(tmp_path):
    feats = pytest.importorskip("gl10m.model.crossscale.features")
    marker = tmp_path / "pwned"
    path = write_tar(tmp_path / "feat.tar", [("CA-w1.hr_tokens.npy", evil_npy(marker))])
    with pytest.raises(ValueError):  # a FeatureError (a ValueError too)
        list(feats._iter_shard(path))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / feats.TEXT_NAME).write_bytes(evil_npy(marker))
    with pytest.raises(feats.FeatureError):
        feats.load_text(tmp_path / "cache")
    assert not marker.exists()


def test_pickled_feature_array_is_a_feature_error(tmp_path):
    feats = pytest.importorskip("gl10m.model.crossscale.features")
    path = write_tar(tmp_path / "feat.tar", [("CA-w1.hr_tokens.npy", evil_npy(tmp_path / "pwned"))])
    with pytest.raises(feats.FeatureError, match="hr_tokens"):
        list(feats._iter_shard(path))


# -- checkpoints -------------------------------------------------------------------------------------------
@pytest.fixture
def evil_checkpoint(tmp_path):
    """A checkpoint shaped like the trainer's whose unpickling (weights_only=False) creates a file."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt" / "step-00000001.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "config": {"task": "sampler"}, "dims": {"D": 8},
                "step": 1, "payload": Marker(marker)}, path)
    return path, marker


def test_the_checkpoint_payload_is_live(evil_checkpoint, tmp_path):
    import torch

    path, marker = evil_checkpoint
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", ["crossscale.train.load_checkpoint", "crossscale.sampler.load_sampler", "encoders.load_encoder",
                                    "crossscale.predictor.load_predictor"])
def test_checkpoints_load_with_weights_only(evil_checkpoint, tmp_path, loader):
    from gl10m.errors import UserError

    path, marker = evil_checkpoint
    if loader == "encoders.load_encoder":
        from gl10m.model import encoders

        enc_dir = tmp_path / "enc"
        enc_dir.mkdir()
        shutil.copy(path, enc_dir / encoders.WEIGHTS_NAME)
        (enc_dir / encoders.CONFIG_NAME).write_text(json.dumps({"encoder": {"backbone": "vit_tiny"}}))
        target, fn = enc_dir, encoders.load_encoder
    else:
        import importlib

        mod_name, fn_name = loader.rsplit(".", 1)
        fn = getattr(importlib.import_module(f"gl10m.model.{mod_name}"), fn_name)
        target = path
    with pytest.raises(UserError) as e:
        fn(target)
    assert "\n" not in str(e.value)
    assert not marker.exists()


# -- credentials -------------------------------------------------------------------------------------------
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAGL10MTESTKEYID0",
    "AWS_SECRET_ACCESS_KEY": "gl10mFakeAwsSecret/0123456789abcdefXYZ",
    "AWS_SESSION_TOKEN": "gl10mFakeSessionToken0123456789",
    "PC_SDK_SUBSCRIPTION_KEY": "gl10mfakepcsubscriptionkey0123",
    "GDAL_HTTP_HEADERS": "Authorization: Bearer gl10mFakeBearerToken0123",
}
URL_TOKEN = "gl10mFakeQueryToken0123"
URL_PASSWORD = "gl10mFakeUrlPassword0123"


def _secret_strings() -> list[str]:
    vals = [v.split("Bearer ")[-1] for v in SECRETS.values()] + [URL_TOKEN, URL_PASSWORD]
    return vals


def _with_credentials(url: str) -> str:
    """`url` with a user:password and a token in its query string."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://alice:{URL_PASSWORD}@{rest.rstrip('/')}/?token={URL_TOKEN}&subscription-key={URL_TOKEN}"


def find_secrets(root: Path, texts: list[str]) -> list[str]:
    """Where any secret occurs: files under `root` (every byte: ledger, parquet metadata, tars,
    JSON, cards) and the given texts (captured stdout/stderr)."""
    secrets = [s.encode() for s in _secret_strings()]
    hits = []
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            blob = p.read_bytes()
            hits += [f"{p}: {s.decode()}" for s in secrets if s in blob]
    for i, t in enumerate(texts):
        hits += [f"output {i}: {s.decode()}" for s in secrets if s.decode() in t]
    return hits


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_credentials_in_a_failing_stac_url_are_not_recorded(tmp_path):
    """The STAC API is unreachable: requests' error names the URL with its query string. The
    catalog failure is recorded and printed without the token; the password never appears."""
    from tests.fixtures.pbf import write_region_pbf

    write_region_pbf(tmp_path / "co.osm.pbf", -105.0, 39.7)
    raw = yaml.safe_load((ROOT / "manifests" / "gl10m-66.yaml").read_text())
    raw["regions"] = {"CO": {**raw["regions"]["CO"], "pbf": "co.osm.pbf"}}
    for scheme in ("paper", "reference"):
        raw["splits"]["schemes"][scheme] = {"train": ["CO"], "val": [], "test": []}
    raw["osm"]["node_index"] = "flex_mem"
    prof = tmp_path / "profile.yaml"
    prof.write_text(yaml.safe_dump(raw, sort_keys=False))
    wd = tmp_path / "W"
    ix = gl10m("index", "-p", prof, "-w", wd, "--no-dask", "-q", cwd=tmp_path, env=SECRETS)
    assert ix.returncode == 0, ix.stderr
    url = _with_credentials(f"http://127.0.0.1:{_closed_port()}/stac")
    r = gl10m("plan", "-p", prof, "-w", wd, "--stac-url", url, "-q", cwd=tmp_path, env=SECRETS)
    st = gl10m("status", "-w", wd, "--detail", cwd=tmp_path)
    assert "Traceback" not in r.stderr
    assert r.returncode == 2 and "is unreachable" in r.stderr  # the error path was taken (the preflight)
    assert "?<redacted>" in r.stderr
    assert not find_secrets(wd, [r.stdout, r.stderr, ix.stdout, ix.stderr, st.stdout, st.stderr])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_run_with_credentials_writes_and_prints_none_of_them(built_world, built_server, tmp_path):
    """index -> download -> shard -> status/verify/stats on the served testbed, with credentials
    in the environment (AWS keys, a Planetary Computer subscription key, an Authorization header
    for GDAL), Planetary Computer signing on, and a password and tokens in the STAC URL. None of
    them is in any file of the work dir (logs, ledger, catalog/plan metadata, staged samples,
    shards, index, manifest, card) or in anything printed."""
    raw = yaml.safe_load((built_world / "profile.yaml").read_text())
    raw["provider"]["signing"] = "planetary_computer"  # signs only *.blob.core.windows.net hrefs
    prof = built_world / "profile-credentials.yaml"
    prof.write_text(yaml.safe_dump(raw, sort_keys=False))
    wd = tmp_path / "W"
    url = _with_credentials(built_server.stac_url)
    runs = [
        gl10m("index", "-p", prof, "-w", wd, "--states", "WA", "--workers", "1", cwd=tmp_path, env=SECRETS),
        gl10m("download", "-p", prof, "-w", wd, "--states", "WA", "--stac-url", url, "--workers", "1",
              cwd=tmp_path, env=SECRETS),
        gl10m("shard", "-p", prof, "-w", wd, "--states", "WA", cwd=tmp_path, env=SECRETS),
        gl10m("status", "-w", wd, "--detail", cwd=tmp_path, env=SECRETS),
        gl10m("verify", wd / "shards", cwd=tmp_path, env=SECRETS),
        gl10m("stats", wd / "shards", cwd=tmp_path, env=SECRETS),
    ]
    for r in runs:
        assert r.returncode == 0 and "Traceback" not in r.stderr, (r.args, r.stderr[-2000:])
    from gl10m.ledger import Ledger

    with Ledger.for_workdir(wd) as led:
        fetched = led.outcomes("fetch")
        cats = led.outcomes("catalog")
    assert any(o.status == "ok" for o in fetched)
    assert {o.reason for o in fetched if o.status == "rejected"} >= {"asset_missing", "asset_corrupt"}  # messages with hrefs
    assert all(o.detail["source"]["url"] == built_server.stac_url.rstrip("/") + "/" for o in cats)
    texts = [t for r in runs for t in (r.stdout, r.stderr)]
    assert not find_secrets(wd, texts)
