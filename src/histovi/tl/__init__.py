"""Tools on the integrated latent space: tissue domains, label transfer, neighbourhood
aggregation, anchors across sections. They read an embedding from ``adata.obsm`` and need no model."""

from ._aggregate import aggregate_neighbors
from ._anchors import anchor_sections
from ._domains import cluster_embedding, domains, smooth_labels
from ._transfer import transfer_labels

__all__ = [
    "aggregate_neighbors",
    "anchor_sections",
    "cluster_embedding",
    "domains",
    "smooth_labels",
    "transfer_labels",
]
