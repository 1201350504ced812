"""histovi: one latent space for spatial transcriptomics spots from expression, H&E morphology
and spatial neighbourhoods, aligned across samples and patients (built on scvi-tools)."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, metrics, pl, pp, tl
from .model import HistoVI

try:
    __version__ = version("histovi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["HistoVI", "datasets", "io", "metrics", "pl", "pp", "tl", "__version__"]
