"""The user-facing HistoVI model."""

from ._model import HistoVI

__all__ = ["HistoVI"]
