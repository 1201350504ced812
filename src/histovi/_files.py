"""Files: atomic writes (a crash while writing leaves the previous file, or none, never half of
one), values made storable in h5ad or JSON, and reading that accepts regular files only."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


# ---------------------------------------------------------------------------- writing files
@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` (``.<name>.<random>.tmp``) to write to; once the
    block ends the file is flushed to disk and renamed to ``path``. On an error the temporary
    file is removed and ``path`` keeps its previous content (or stays absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def fsync_file(path) -> None:
    """Flush ``path``'s content to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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


# ---------------------------------------------------------------------------- storable values
def storable(value: Any, *, json: bool = False) -> Any:
    """``value`` as a tree of types that an AnnData's ``uns`` written to h5ad (default) or a JSON
    file (``json=True``) can hold: mappings get string keys and numpy scalars become Python
    numbers. For h5ad, ``None`` entries of mappings are dropped (h5ad cannot hold ``None``) and
    lists and tuples become numpy arrays (object arrays when they hold strings only); for JSON,
    arrays, lists and tuples become lists, ``None`` is kept and NaN / infinity become ``None``."""
    if isinstance(value, Mapping):
        return {str(k): storable(v, json=json) for k, v in value.items() if json or v is not None}
    if isinstance(value, np.generic):
        value = value.item()
    if json:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list | tuple):
            return [storable(v, json=True) for v in value]
        if isinstance(value, float) and not np.isfinite(value):
            return None  # strict JSON has no NaN / inf: other readers refuse the file
        return value
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, str) for v in value):
            return np.asarray(value, dtype=object)
        return np.asarray(value)
    return value


def record_uns(adata, name: str, settings: Mapping[str, Any], *, key: str | None = None) -> None:
    """Store ``settings`` (made :func:`storable`) as ``adata.uns['histovi'][name]``, or as
    ``adata.uns['histovi'][name][key]`` when ``key`` is given (one record per output key)."""
    from ._constants import UNS_KEY

    if not isinstance(adata.uns.get(UNS_KEY), dict):
        adata.uns[UNS_KEY] = {}
    uns = adata.uns[UNS_KEY]
    if key is None:
        uns[name] = storable(settings)
    else:
        uns.setdefault(name, {})[key] = storable(settings)


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
