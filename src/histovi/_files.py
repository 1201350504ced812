"""Atomic file writes: a crash while writing leaves the previous file (or none), never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- reading files
def check_regular_file(path, what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path` when it names a regular file (a symbolic link to one
    is followed); ``FileNotFoundError`` when nothing is there, ``ValueError`` for a folder, a
    FIFO, a socket or a device, which would block a reader forever or never end."""
    import stat

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist: check the path.") from None
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({err.strerror or err}).") from err
    if not stat.S_ISREG(mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise ValueError(
            f"{what} {str(path)!r} is {kind}, not a regular file: histovi reads only regular "
            "files (a pipe or device could block forever); pass the file itself."
        )
    return path


def open_regular(path, what: str = "file") -> BinaryIO:
    """Open ``path`` for reading in binary mode after checking, on the opened file itself, that
    it is a regular file: a FIFO put in its place after a check of the name is refused too
    (it is opened without blocking, then checked)."""
    import stat

    path = check_regular_file(path, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(
                f"{what} {str(path)!r} is not a regular file: histovi reads only regular files."
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_store_tree(folder, what: str = "store") -> None:
    """Every entry under ``folder`` (a zarr store read file by file) is a folder or a regular
    file inside it: ``ValueError`` naming the first FIFO, device or socket (a reader would block
    on it) and the first symbolic link that leads out of the folder (a chunk read from a file
    elsewhere on the machine)."""
    import stat

    root = Path(folder)
    for base, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            entry = Path(base) / name
            if entry.is_symlink():
                if not is_within(entry, root):
                    raise ValueError(
                        f"{what} {str(root)!r} holds {str(entry.relative_to(root))!r}, a "
                        "symbolic link that leads out of it: a data store may only hold its own "
                        "files; replace the link by the file."
                    )
                if entry.is_dir():
                    continue
            mode = os.stat(entry).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ValueError(
                    f"{what} {str(root)!r} holds {str(entry.relative_to(root))!r}, which is not "
                    "a regular file (a FIFO, socket or device would block the reader): remove it."
                )


def is_within(path, folder) -> bool:
    """``path`` lies inside ``folder`` once both are resolved (symbolic links followed, ``..``
    removed)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True
