import os
import stat
from pathlib import Path

import pytest

from sparsify.errors import SparsifyError
from sparsify.fileio import atomic_path, atomic_write_bytes, atomic_write_text


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


def test_directory_and_special_targets_are_refused(tmp_path):
    """An existing directory, a device or an empty name is an error, and nothing is replaced."""
    (tmp_path / "d").mkdir()
    with pytest.raises(SparsifyError, match="is a directory"):
        atomic_write_bytes(tmp_path / "d", b"x")
    assert (tmp_path / "d").is_dir()
    with pytest.raises(SparsifyError, match="not a regular file"):
        atomic_write_bytes("/dev/null", b"x")
    assert Path("/dev/null").is_char_device()
    with pytest.raises(SparsifyError, match="give a file name"):
        atomic_write_bytes("", b"x")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_symlink_target_gets_the_content(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link.txt").symlink_to(real)
    atomic_write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and real.read_text() == "new"


def test_failed_write_is_a_typed_error_and_leaves_no_temp(tmp_path):
    import errno

    with pytest.raises(SparsifyError, match="No space left"):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"part")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
