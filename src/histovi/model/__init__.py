"""The user-facing HistoVI model."""

from ._model import HistoVI
from ._training import TrainingDivergedError

__all__ = ["HistoVI", "TrainingDivergedError"]
