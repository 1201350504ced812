"""histovi: one latent space for spatial transcriptomics spots from expression, H&E morphology
and spatial neighbourhoods, aligned across samples and patients (built on scvi-tools).

The submodules (``histovi.pp``, ``histovi.tl``, ...) and :class:`histovi.HistoVI` are imported on
first use, so that ``histovi --help`` and a bad command line answer without loading torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("histovi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_SUBMODULES = ("datasets", "io", "metrics", "pl", "pp", "tl", "pipeline", "model", "module", "data")

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from . import datasets, io, metrics, pipeline, pl, pp, tl
    from .model import HistoVI


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name == "HistoVI":
        from .model import HistoVI

        globals()["HistoVI"] = HistoVI
        return HistoVI
    raise AttributeError(f"module 'histovi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, "HistoVI"})


__all__ = ["HistoVI", "datasets", "io", "metrics", "pipeline", "pl", "pp", "tl", "__version__"]
