"""Atomic file writes shared by the command-line tools and the savers of all three packages.

A file is written under a temporary name in its final directory and moved into place with ``os.replace`` only
once it is complete, so an interrupted write never leaves a half-written file; the temporary file is removed on
failure. The finished file gets the permissions a plain ``open()`` would give it (``0o666`` minus the umask), not
the owner-only ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "check_file_path", "dir_mode", "file_mode"]


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


def check_file_path(path: str | os.PathLike[str], what: str = "path", example: str = "pruned_model.pt") -> Path:
    """``path`` as a ``Path`` if a file can be written there, else a ``ValueError`` that says why.

    Called before any work: an existing directory, or a path under an existing file, would otherwise fail only
    when :func:`atomic_path` moves the finished file into place, with an error naming its temporary file.
    ``what`` names the path in the message (``"--out"`` on the command line), ``example`` is the file name the
    message suggests inside a directory.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     check_file_path(d, "--out")
    Traceback (most recent call last):
    ...
    ValueError: --out '...' is a directory; pass a file name such as '.../pruned_model.pt'.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; pass a file name such as {str(path / example)!r}.")
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{what} {str(path)!r} lies under {str(above)!r}, which is a file, not a directory.")
    return path


def check_dir_path(path: str | os.PathLike[str], what: str = "directory") -> Path:
    """``path`` as a ``Path`` if a new directory can be written there (it does not exist, or is an empty
    directory; missing parents are made by the writer), else a ``ValueError`` that says why (``what`` names it).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (pathlib.Path(d) / "taken").write_text("x")
    ...     check_dir_path(pathlib.Path(d) / "taken", "--out")
    Traceback (most recent call last):
    ...
    ValueError: --out '.../taken' exists and is not an empty directory: choose a new path.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{what} {str(path)!r} exists and is not an empty directory: choose a new path.")
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{what} {str(path)!r} lies under {str(above)!r}, which is a file, not a directory.")
    return path


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


@contextmanager
def atomic_dir(path: str | os.PathLike[str], what: str = "directory") -> Iterator[Path]:
    """Yield a new temporary directory next to ``path`` (checked first by :func:`check_dir_path`; ``what`` names it
    in the error); on normal exit move it to ``path`` (an empty directory there is replaced), else delete it with
    what was written in it: nothing half-written is left.

    Examples
    --------
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with atomic_dir(os.path.join(d, "model")) as tmp:
    ...     _ = (tmp / "weights.txt").write_text("done")
    >>> os.listdir(d), os.listdir(os.path.join(d, "model"))
    (['model'], ['weights.txt'])
    """
    final = check_dir_path(path, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes it owner-only; give it a plain mkdir's permissions
        yield tmp
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
