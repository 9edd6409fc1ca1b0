"""Atomic file writes shared by the command-line tools and the savers of all three packages.

A file is written under a temporary name in its final directory and moved into place with ``os.replace`` only
once it is complete, so an interrupted write never leaves a half-written file; the temporary file is removed on
failure. The finished file gets the permissions a plain ``open()`` would give it (``0o666`` minus the umask), not
the owner-only ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "dir_mode", "file_mode"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """``0o666`` minus the process umask (the mode ``open(path, "w")`` creates files with)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """``0o777`` minus the process umask (the mode ``os.mkdir`` creates directories with)."""
    return 0o777 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on normal exit move it to ``path``, else delete it.

    Examples
    --------
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, "out.txt")) as tmp:
    ...     _ = open(tmp, "w").write("done")
    >>> open(os.path.join(d, "out.txt")).read(), len(os.listdir(d))
    ('done', 1)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
