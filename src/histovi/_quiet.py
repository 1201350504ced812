"""Library chatter kept off the console unless asked for.

Lightning announces the hardware it found, advertises its cloud services and reports why
``fit`` stopped; scvi-tools, squidpy (through spatialdata's logger) and scanpy log INFO lines in
colour; Lightning and the libraries under it emit deprecation warnings about one another. None
of it is about the user's data. :func:`quiet_libraries` lowers those loggers to WARNING and
ignores deprecation warnings (and, for the command line, every warning) for the duration of a
call; ``verbose=True`` leaves everything as it is.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: Loggers of the libraries histovi calls; their INFO lines are chatter for a histovi user.
LIBRARY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "scvi",
    "squidpy",
    "spatialdata._logging",  # squidpy logs through spatialdata's logger (its own handler)
    "scanpy",
    "anndata",
)


@contextlib.contextmanager
def quiet_libraries(
    verbose: bool = False, all_warnings: bool = False, level: int = logging.WARNING
) -> Iterator[None]:
    """Within the block: library loggers at ``level`` (WARNING: their INFO lines go), and
    deprecation warnings (and Lightning's "possible user warnings") ignored; with
    ``all_warnings`` every warning is ignored. With ``verbose`` nothing changes."""
    if verbose:
        yield
        return
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        with warnings.catch_warnings():
            if all_warnings:
                warnings.simplefilter("ignore")
            else:
                for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                    warnings.filterwarnings("ignore", category=category)
                _ignore_lightning_hints()
            yield
    finally:
        for name, lvl in saved.items():
            logging.getLogger(name).setLevel(lvl)


def _ignore_lightning_hints() -> None:
    """Lightning's ``PossibleUserWarning`` (few batches for the logging interval, no workers in
    the data loader, ...): hints about Lightning settings that histovi chooses, not the user."""
    try:
        from lightning.fabric.utilities.warnings import PossibleUserWarning
    except ImportError:  # pragma: no cover - Lightning is a dependency
        return
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
