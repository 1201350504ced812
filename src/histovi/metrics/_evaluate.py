"""One call that scores an embedding with every histovi metric."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
from anndata import AnnData

from .._constants import LATENT_KEY, NEIGHBORS_KEY
from .._threads import keeps_torch_threads
from .._validation import check_adata, get_rep, require_obs
from ._clustering import cluster_and_score, per_sample_scores, summarize
from ._integration import integration_scores
from ._spatial import spatial_coherence

_COLUMNS = ["group", "method", "metric", "value", "std"]


@keeps_torch_threads
def evaluate(
    adata: AnnData,
    use_rep: str = LATENT_KEY,
    label_key: str = "label",
    batch_key: str = "sample",
    sample_key: str = "sample",
    cluster_key: str | None = None,
    methods: Sequence[str] = ("gmm", "kmeans"),
    seeds: Sequence[int] = (0, 1, 2),
    ignore: Iterable[str] = ("undetermined",),
    neighbors_key: str = NEIGHBORS_KEY,
    integration: bool = True,
) -> pd.DataFrame:
    """Score an embedding: clustering protocol, integration metrics and spatial coherence.

    - ``group='clustering'``: :func:`cluster_and_score` + :func:`summarize` on
      ``adata.obsm[use_rep]``; ``method`` is the clustering method, ``value``/``std`` the mean
      and spread over seeds of the per-section mean ARI / NMI.
    - ``group='domains'`` (only with ``cluster_key``): :func:`per_sample_scores` of an
      existing clustering; ``value`` is the mean over sections, ``std`` the spread over them.
    - ``group='batch'`` / ``'bio'`` (when ``integration``): :func:`integration_scores`.
    - ``group='spatial'`` (only with ``cluster_key`` and when ``adata.obsm[neighbors_key]``
      exists): overall :func:`spatial_coherence` and its kappa.

    Parameters
    ----------
    adata
        AnnData with the embedding, labels, batch and sample columns.
    use_rep
        ``adata.obsm`` key of the embedding.
    label_key
        ``adata.obs`` column of the ground truth (NaN where unlabelled).
    batch_key
        ``adata.obs`` column of the batch used for the mixing metrics.
    sample_key
        ``adata.obs`` column of the section (unit of the per-section scores).
    cluster_key
        Optional ``adata.obs`` column of domains to score as they are.
    methods, seeds, ignore
        Passed to :func:`cluster_and_score`.
    neighbors_key
        ``adata.obsm`` key of the spatial neighbour matrix for the coherence.
    integration
        Compute the scib-metrics scores (the slowest part on large pools).

    Returns
    -------
    Tidy DataFrame with columns ``group, method, metric, value, std``.
    """
    check_adata(adata)
    X = get_rep(adata, use_rep)
    labels = require_obs(adata, label_key)
    samples = require_obs(adata, sample_key)
    rows: list[dict] = []
    summary = summarize(
        cluster_and_score(X, labels, samples, methods=methods, seeds=seeds, ignore=ignore)
    )
    for _, r in summary.iterrows():
        for m in ("ARI", "NMI"):
            rows.append(
                {
                    "group": "clustering",
                    "method": r["method"],
                    "metric": m,
                    "value": r[f"{m}_mean"],
                    "std": r[f"{m}_std"],
                }
            )
    if cluster_key is not None:
        per = per_sample_scores(adata, label_key, cluster_key, sample_key, ignore=ignore)
        for m in ("ARI", "NMI"):
            rows.append(
                {
                    "group": "domains",
                    "method": cluster_key,
                    "metric": m,
                    "value": float(per[m].mean()),
                    "std": float(per[m].std(ddof=1)) if len(per) > 1 else 0.0,
                }
            )
        if neighbors_key in adata.obsm:
            coh = spatial_coherence(adata, cluster_key, neighbors_key, sample_key)
            overall = coh.iloc[-1]
            for m in ("coherence", "kappa"):
                rows.append(
                    {
                        "group": "spatial",
                        "method": cluster_key,
                        "metric": m,
                        "value": float(overall[m]),
                        "std": float("nan"),
                    }
                )
    if integration:
        scores = integration_scores(adata, use_rep, batch_key, label_key, ignore=ignore)
        for _, r in scores.iterrows():
            rows.append(
                {
                    "group": r["kind"],
                    "method": "scib-metrics",
                    "metric": r["metric"],
                    "value": r["value"],
                    "std": float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=_COLUMNS)
