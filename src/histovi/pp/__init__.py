"""Preprocessing: spatial neighbours, morphology and expression embeddings."""

from ._neighbors import spatial_neighbors

__all__ = ["spatial_neighbors"]
