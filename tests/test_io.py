import pytest

from gl10m.io import atomic_path, atomic_write_bytes, clean_temp


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in p.parent.iterdir()] == ["f.bin"]


def test_crash_leaves_old_content_and_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as t:
            t.write_text("half")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_clean_temp_removes_leftovers(tmp_path):
    (tmp_path / ".f.parquet.abc.tmp.parquet").write_text("x")
    (tmp_path / "keep.parquet").write_text("y")
    assert clean_temp(tmp_path) == 1
    assert [x.name for x in tmp_path.iterdir()] == ["keep.parquet"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == 0o666 & ~mask
