"""Atomic file writes: a reader never sees a half-written file, a failed write leaves none."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from sparsify.errors import SparsifyError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    If the body raises, the temporary file is removed and ``path`` is left untouched (an
    existing file keeps its old content).
    """
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise SparsifyError(f"cannot write {str(path)!r}: give a file name")
    # a link is followed, so the file it points at gets the new content, as open() would do
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_dir():
        raise SparsifyError(f"cannot write {path}: it is a directory; give a file name in it")
    if target.exists() and not target.is_file():
        # renaming over it would replace a device (/dev/null) or a pipe with a regular file
        raise SparsifyError(f"cannot write {path}: it exists and is not a regular file; "
                            f"give the path of a new or regular file")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise SparsifyError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SparsifyError(f"cannot write {path}: directory {parent} is not writable")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise SparsifyError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as err:
            if err.errno in _WRITE_ERRNOS:  # the write itself failed: a typed error, no temp
                raise SparsifyError(f"cannot write {path}: {err.strerror}") from None
            raise
        # mkstemp creates the file private (0600); the result gets the mode a plain open() gives
        os.chmod(tmp_path, 0o666 & ~_umask())
        try:
            os.replace(tmp_path, target)
        except OSError as err:
            raise SparsifyError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# failures of the write itself (disk full, quota, read-only or failing disk, file too large)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
