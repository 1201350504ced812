"""Keep torch's thread count as the user set it, and warnings at the user's line.

numba's OpenMP threading layer (UMAP, pynndescent, scanpy's neighbours and Leiden, scib-metrics)
calls ``omp_set_num_threads`` with its own count (every core) the first time it runs a parallel
loop. torch shares that OpenMP runtime, so after a UMAP the next training in the same process
ran on another number of threads and gave another latent in the last digits, although seed,
data and versions were the same. Every histovi function that may run numba restores torch's
thread count when it returns.

The decorator adds a frame between the user and the function, so a warning whose
``stacklevel`` was counted for the undecorated function would name this file. The outermost
decorated call therefore records the warnings raised inside it and, once it returns, emits them
again at the first line outside histovi (the user's), through the user's warning filters.
Recording is process-wide (``warnings.catch_warnings``), so one call records at a time: a call
nested in it, or made meanwhile by another thread, leaves its warnings to the one recording.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
_recording = threading.Lock()


def keeps_torch_threads[F: Callable](func: F) -> F:
    """Decorator: restore ``torch.get_num_threads()`` after ``func``, however it returns, and
    point the warnings raised inside it at the caller's line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import torch

        n_threads = torch.get_num_threads()
        recorder, caught = None, []
        if _recording.acquire(blocking=False):
            recorder = warnings.catch_warnings(record=True)
            caught = recorder.__enter__()
        try:
            return func(*args, **kwargs)
        finally:
            if recorder is not None:
                recorder.__exit__(None, None, None)
                _recording.release()
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)
            if caught:
                _warn_again(caught, _user_frame())

    return wrapper  # type: ignore[return-value]


def _inside_histovi(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(_PACKAGE)
    except (OSError, ValueError):
        return False


def _user_frame():
    """The first frame outside histovi (None when histovi is the whole stack)."""
    frame = sys._getframe(1)
    while frame is not None and _inside_histovi(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _warn_again(caught: list[warnings.WarningMessage], frame) -> None:
    """Emit recorded warnings again: histovi's own at ``frame``'s line, others where they were."""
    for w in caught:
        if frame is not None and _inside_histovi(w.filename):
            module_globals = frame.f_globals
            warnings.warn_explicit(
                w.message,
                w.category,
                frame.f_code.co_filename,
                frame.f_lineno,
                module=module_globals.get("__name__"),
                registry=module_globals.setdefault("__warningregistry__", {}),
                module_globals=module_globals,
            )
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
