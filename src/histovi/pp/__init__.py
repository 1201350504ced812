"""Preprocessing: spatial neighbours, morphology and expression embeddings."""

from ._expression import embed_expression
from ._morphology import embed_morphology
from ._neighbors import spatial_neighbors

__all__ = ["embed_expression", "embed_morphology", "spatial_neighbors"]
