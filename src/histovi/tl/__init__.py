"""Tools on the integrated latent space: tissue domains, label transfer, neighbourhood
aggregation. They read an embedding from ``adata.obsm`` and need no model."""

from ._aggregate import aggregate_neighbors
from ._domains import cluster_embedding, domains, smooth_labels
from ._transfer import transfer_labels

__all__ = [
    "aggregate_neighbors",
    "cluster_embedding",
    "domains",
    "smooth_labels",
    "transfer_labels",
]
