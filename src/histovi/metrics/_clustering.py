"""Per-section clustering scores and the shared evaluation protocol (EVALUATION.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import product
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from tqdm.auto import tqdm

from .._threads import keeps_torch_threads
from .._validation import (
    as_str_array,
    check_adata,
    check_embedding,
    get_cluster_column,
    is_whole_number,
    require_obs,
)
from ..tl._domains import cluster_embedding
from ..tl._utils import labelled_mask

#: Columns holding scores or bookkeeping in the protocol's tidy tables; every other column is
#: treated as an identifier (method, embedding, ...) by :func:`summarize`.
_VALUE_COLUMNS = ("seed", "sample", "n_spots", "ARI", "NMI")


def _score_by_sample(
    labels: np.ndarray, clusters: np.ndarray, samples: np.ndarray, mask: np.ndarray
) -> list[dict[str, Any]]:
    rows = []
    for sample in pd.unique(samples[mask]):
        sel = mask & (samples == sample)
        rows.append(
            {
                "sample": sample,
                "n_spots": int(sel.sum()),
                "ARI": float(adjusted_rand_score(labels[sel], clusters[sel])),
                "NMI": float(normalized_mutual_info_score(labels[sel], clusters[sel])),
            }
        )
    return rows


def per_sample_scores(
    adata: AnnData,
    label_key: str,
    cluster_key: str,
    sample_key: str = "sample",
    ignore: Iterable[str] = ("undetermined",),
) -> pd.DataFrame:
    """ARI and NMI between ground-truth labels and clusters, one row per labelled section.

    Spots with a missing label or a label in ``ignore`` are left out; sections without any
    remaining labelled spot get no row.

    Parameters
    ----------
    adata
        AnnData with both columns in ``adata.obs``.
    label_key
        ``adata.obs`` column of the ground-truth labels (NaN where unlabelled).
    cluster_key
        ``adata.obs`` column of the clusters (e.g. from :func:`histovi.tl.domains`).
    sample_key
        ``adata.obs`` column of the section id.
    ignore
        Label values not scored (compared as strings).

    Returns
    -------
    DataFrame with columns ``sample, n_spots, ARI, NMI``.
    """
    check_adata(adata)
    labels = as_str_array(require_obs(adata, label_key))
    clusters = get_cluster_column(adata, cluster_key)
    samples = as_str_array(require_obs(adata, sample_key))
    mask = labelled_mask(labels, ignore)
    if not mask.any():
        raise ValueError(
            f"adata.obs['{label_key}'] has no usable label (all missing or in ignore={tuple(ignore)}):"
            " pass the column that holds the annotations."
        )
    rows = _score_by_sample(labels, as_str_array(clusters), samples, mask)
    return pd.DataFrame(rows, columns=["sample", "n_spots", "ARI", "NMI"])


def n_label_classes(labels: Any, ignore: Iterable[str] = ("undetermined",)) -> int:
    """Number of distinct labels among labelled spots (missing and ignored values excluded)."""
    labels = as_str_array(labels, "labels")
    return int(len(np.unique(labels[labelled_mask(labels, ignore)].astype(str))))


@keeps_torch_threads
def cluster_and_score(
    embedding: Any,
    labels: Sequence[Any] | np.ndarray | pd.Series,
    samples: Sequence[Any] | np.ndarray | pd.Series,
    n_clusters: int | None = None,
    methods: Sequence[str] = ("gmm", "kmeans"),
    seeds: Sequence[int] = (0, 1, 2),
    ignore: Iterable[str] = ("undetermined",),
) -> pd.DataFrame:
    """Evaluate one embedding with the histovi protocol (EVALUATION.md).

    For every clustering method and seed: cluster **all** spots of the pool (labelled or not)
    with k clusters, k being the number of distinct labels among labelled spots (missing and
    ``ignore``-d labels excluded) unless ``n_clusters`` is given; then score only the labelled,
    non-ignored spots, section by section, with ARI and NMI.

    Parameters
    ----------
    embedding
        (n_spots, n_dims) array, e.g. ``adata.obsm['X_histovi']``.
    labels
        Ground truth per spot, NaN/None where unlabelled.
    samples
        Section id per spot.
    n_clusters
        Override of k.
    methods
        Clustering methods of :func:`histovi.tl.cluster_embedding` (``'gmm'``, ``'kmeans'``,
        ``'leiden'``).
    seeds
        Clustering seeds (EVALUATION.md asks for at least 3).
    ignore
        Label values left out of k and of the scores.

    Returns
    -------
    Tidy DataFrame with columns ``method, seed, sample, n_spots, ARI, NMI``; pass it to
    :func:`summarize` for mean and spread.
    """
    labels = as_str_array(labels, "labels")
    samples = as_str_array(samples, "samples")
    if labels.shape[0] != samples.shape[0]:
        raise ValueError(
            f"`labels` ({labels.shape[0]}) and `samples` ({samples.shape[0]}) differ in length: "
            "pass one value per spot for both."
        )
    if pd.isna(pd.Series(samples)).any():
        raise ValueError("`samples` has missing values: give every spot a section id.")
    X = check_embedding(embedding, n_obs=labels.shape[0])
    mask = labelled_mask(labels, ignore)
    if not mask.any():
        raise ValueError(
            f"`labels` has no usable label (all missing or in ignore={tuple(ignore)}): pass the "
            "annotation column."
        )
    k = n_clusters if n_clusters is not None else n_label_classes(labels, ignore)
    # one method or one seed given alone: not the characters of a name, not an error on len()
    methods = [methods] if isinstance(methods, str) else list(methods)
    seeds = [seeds] if isinstance(seeds, int | np.integer) else list(seeds)
    if not all(is_whole_number(s, minimum=0) for s in seeds):
        raise ValueError(f"`seeds`={seeds!r} must be whole numbers >= 0.")
    if len(seeds) == 0 or len(methods) == 0:
        raise ValueError("`methods` and `seeds` must each name at least one value.")
    rows = []
    runs = list(product(methods, seeds))
    for method, seed in tqdm(runs, desc="cluster_and_score", disable=len(runs) < 2):
        clusters = cluster_embedding(X, k, method, random_state=int(seed)).astype(str)
        for row in _score_by_sample(labels, clusters, samples, mask):
            rows.append({"method": method, "seed": int(seed), "n_clusters": int(k), **row})
    return pd.DataFrame(
        rows, columns=["method", "seed", "n_clusters", "sample", "n_spots", "ARI", "NMI"]
    )


def summarize(df: pd.DataFrame, metrics: Sequence[str] = ("ARI", "NMI")) -> pd.DataFrame:
    """Mean and spread over seeds of the per-section mean score.

    Rows are first averaged over sections within each (identifier columns, seed) group, then
    the mean and standard deviation (ddof=1; 0 with one seed) over seeds are taken.
    Identifier columns are all columns other than ``seed, sample, n_spots, n_clusters`` and
    the metrics, so a table concatenating several embeddings (e.g. with an ``embedding``
    column) is summarised per embedding and method.

    Returns
    -------
    DataFrame with the identifier columns, ``n_seeds`` and ``{metric}_mean`` /
    ``{metric}_std`` for each metric.
    """
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ValueError(
            "`df` must be a non-empty DataFrame from histovi.metrics.cluster_and_score."
        )
    missing = [c for c in ("seed", *metrics) if c not in df.columns]
    if missing:
        raise KeyError(
            f"`df` lacks columns {missing}: pass the table returned by "
            "histovi.metrics.cluster_and_score (or name its score columns with `metrics=`)."
        )
    ids = [c for c in df.columns if c not in (*_VALUE_COLUMNS, "n_clusters", *metrics)]
    per_seed = df.groupby([*ids, "seed"], sort=False, dropna=False)[list(metrics)].mean()
    per_seed = per_seed.reset_index()
    grouped = per_seed.groupby(ids, sort=False, dropna=False) if ids else [((), per_seed)]
    out = []
    for key, group in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(ids, key, strict=True))
        row["n_seeds"] = len(group)
        for m in metrics:
            row[f"{m}_mean"] = float(group[m].mean())
            row[f"{m}_std"] = float(group[m].std(ddof=1)) if len(group) > 1 else 0.0
        out.append(row)
    return pd.DataFrame(out)
