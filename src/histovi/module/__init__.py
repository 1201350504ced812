"""The torch modules behind HistoVI (no AnnData in here)."""

from ._module import HistoVAE

__all__ = ["HistoVAE"]
