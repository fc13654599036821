import os
import stat

import pytest

from sparsify.errors import SparsifyError
from sparsify.fileio import atomic_path, atomic_write_text


def test_write_replaces_and_gets_normal_mode(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(SparsifyError, match="does not exist"):
        atomic_write_text(tmp_path / "nope" / "out.txt", "x")
