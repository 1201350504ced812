"""Batch mixing and biology conservation with scib-metrics."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import LATENT_KEY
from .._threads import keeps_torch_threads
from .._validation import as_str_array, check_adata, check_whole_number, get_rep, require_obs
from ..tl._utils import labelled_mask, well_scaled

#: (metric, kind) in the order of the returned table. Higher is better for all of them.
INTEGRATION_METRICS = (
    ("iLISI", "batch"),
    ("silhouette_batch", "batch"),
    ("BRAS", "batch"),
    ("graph_connectivity", "batch"),
    ("cLISI", "bio"),
    ("silhouette_label", "bio"),
)


@keeps_torch_threads
def integration_scores(
    adata: AnnData,
    use_rep: str = LATENT_KEY,
    batch_key: str = "sample",
    label_key: str = "label",
    ignore: Iterable[str] = ("undetermined",),
    n_neighbors: int = 90,
) -> pd.DataFrame:
    """scib-metrics batch-mixing and biology-conservation scores on labelled spots.

    Only spots with a usable label (not missing, not in ``ignore``) are scored. The kNN graph
    (exact, :class:`sklearn.neighbors.NearestNeighbors`, self included as scib-metrics expects)
    has ``n_neighbors`` neighbours as in scib-metrics' ``Benchmarker`` (capped at n - 1).

    Metrics (all in [0, 1], higher is better): ``iLISI`` (:func:`scib_metrics.ilisi_knn`),
    ``silhouette_batch`` (:func:`scib_metrics.silhouette_batch`), ``BRAS``
    (:func:`scib_metrics.bras`), ``graph_connectivity``
    (:func:`scib_metrics.graph_connectivity`), ``cLISI`` (:func:`scib_metrics.clisi_knn`) and
    ``silhouette_label`` (:func:`scib_metrics.silhouette_label`).

    Parameters
    ----------
    adata
        AnnData with the embedding, batches and labels.
    use_rep
        ``adata.obsm`` key of the embedding.
    batch_key
        ``adata.obs`` column of the batch (section).
    label_key
        ``adata.obs`` column of the ground-truth labels (NaN where unlabelled).
    ignore
        Label values left out.
    n_neighbors
        Size of the kNN graph (including the spot itself).

    Returns
    -------
    Tidy DataFrame with columns ``metric, kind ('batch'|'bio'), value``.
    """
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    check_adata(adata)
    (X_all,) = well_scaled(get_rep(adata, use_rep))
    labels = as_str_array(require_obs(adata, label_key))
    batches = as_str_array(require_obs(adata, batch_key))
    mask = labelled_mask(labels, ignore)
    n = int(mask.sum())
    X = X_all[mask].astype(np.float32)
    lab = labels[mask].astype(str)
    bat = batches[mask].astype(str)
    if len(np.unique(lab)) < 2:
        raise ValueError(
            f"adata.obs['{label_key}'] has fewer than 2 usable label classes on {n} spots: "
            "integration scores need at least two classes; pass another `label_key`."
        )
    if len(np.unique(bat)) < 2:
        raise ValueError(
            f"the labelled spots come from a single batch of adata.obs['{batch_key}']: batch "
            "mixing needs labelled spots in at least two batches; pass another `batch_key`."
        )
    check_whole_number(
        n_neighbors,
        "n_neighbors",
        minimum=3,
        what="the kNN graph includes each spot itself; scib-metrics' default is 90",
    )
    k = int(min(n_neighbors, n - 1))
    if k < 2:
        raise ValueError(f"only {n} labelled spots: need at least 3 to build a kNN graph.")
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    nn = NeighborsResults(indices=idx, distances=dist.astype(np.float32))
    values = {
        "iLISI": scib_metrics.ilisi_knn(nn, bat),
        "silhouette_batch": scib_metrics.silhouette_batch(X, lab, bat),
        "BRAS": scib_metrics.bras(X, lab, bat),
        "graph_connectivity": scib_metrics.graph_connectivity(nn, lab),
        "cLISI": scib_metrics.clisi_knn(nn, lab),
        "silhouette_label": scib_metrics.silhouette_label(X, lab),
    }
    return pd.DataFrame(
        [{"metric": m, "kind": kind, "value": float(values[m])} for m, kind in INTEGRATION_METRICS]
    )
