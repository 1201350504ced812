"""Figures (matplotlib). Every function returns its :class:`~matplotlib.figure.Figure`, saves
it when given ``save=``, and never calls ``plt.show()``."""

from ._domains import domains
from ._scores import scores
from ._training import training_curves
from ._umap import latent_umap
from ._utils import match_categories, match_colors

__all__ = [
    "domains",
    "latent_umap",
    "match_categories",
    "match_colors",
    "scores",
    "training_curves",
]
