"""The user-facing HistoVI model."""

from ._model import HistoVI
from ._saving import convert_saved_model
from ._training import TrainingDivergedError

__all__ = ["HistoVI", "TrainingDivergedError", "convert_saved_model"]
