"""The package layout: every package on disk is one the distribution ships, and ``gl10m.model``
re-exports its main names without importing torch until one is used."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> set[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, rel in cfg["package-dir"].items():
        base = ROOT / rel
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            if "__pycache__" not in parts:
                found.add(".".join((name,) + parts))
    return found


def test_every_package_on_disk_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = _packages_on_disk()
    assert "gl10m.model.crossscale" in on_disk
    assert on_disk - listed == set(), "packages missing from pyproject's packages list"


def test_model_reexports_are_lazy():
    code = ("import sys, gl10m.model as m; assert 'torch' not in sys.modules, 'torch imported';"
            "from gl10m.model import Predictor, load_sampler, TileEncoder;"
            "from gl10m.model.crossscale.predictor import Predictor as P;"
            "from gl10m.model.crossscale.sampler import load_sampler as L;"
            "from gl10m.model.encoders import TileEncoder as T;"
            "assert (Predictor, load_sampler, TileEncoder) == (P, L, T);"
            "assert set(m.__all__) <= set(dir(m)); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_model_unknown_name_is_an_attribute_error():
    import gl10m.model as m

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        m.nope  # noqa: B018
    with pytest.raises(ImportError):
        from gl10m.model import nope  # noqa: F401
