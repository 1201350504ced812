"""Spatial coherence of a clustering: do spatial neighbours share their label?"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import NEIGHBORS_KEY
from .._validation import as_str_array, check_adata, get_cluster_column, get_neighbors


def _coherence_row(same: np.ndarray, codes: np.ndarray, n_cat: int) -> dict[str, float]:
    """Observed agreement, chance agreement and their kappa-like normalisation."""
    observed = float(same.mean()) if same.size else float("nan")
    freq = np.bincount(codes, minlength=n_cat) / max(codes.size, 1)
    expected = float((freq**2).sum())
    kappa = (observed - expected) / (1 - expected) if expected < 1 else float("nan")
    return {"coherence": observed, "expected": expected, "kappa": float(kappa)}


def spatial_coherence(
    adata: AnnData,
    cluster_key: str = "domain",
    neighbors_key: str = NEIGHBORS_KEY,
    sample_key: str = "sample",
) -> pd.DataFrame:
    """Fraction of spatial neighbour pairs whose spots share a cluster, per section and overall.

    Each (spot, neighbour) entry of ``adata.obsm[neighbors_key]`` is one directed pair
    (padding entries < 0, self-links and links across sections are skipped).

    Besides the observed fraction (``coherence``) the table gives the fraction expected if
    labels were placed at random with the section's cluster frequencies (``expected`` =
    sum of squared frequencies) and ``kappa = (coherence - expected) / (1 - expected)``:
    1 for perfectly contiguous domains, about 0 for salt-and-pepper labels.

    Parameters
    ----------
    adata
        AnnData with ``adata.obs[cluster_key]`` and ``adata.obsm[neighbors_key]``.
    cluster_key
        ``adata.obs`` column of the clusters.
    neighbors_key
        ``adata.obsm`` key of the (n_obs, k) int64 neighbour index matrix.
    sample_key
        ``adata.obs`` column of the section id; if absent, all spots form one section.

    Returns
    -------
    DataFrame with columns ``sample, n_pairs, coherence, expected, kappa``; the last row has
    ``sample='all'`` (pairs pooled over sections, ``expected`` from pooled per-section chance).
    """
    check_adata(adata)
    clusters = get_cluster_column(adata, cluster_key)
    codes = pd.Categorical(as_str_array(clusters)).codes.astype(np.int64)
    n_cat = int(codes.max()) + 1
    if sample_key in adata.obs.columns:
        samples = as_str_array(adata.obs[sample_key])
    else:
        samples = np.full(adata.n_obs, "all", dtype=object)
    nbrs = get_neighbors(adata, neighbors_key, sample_key=sample_key)
    rows_idx = np.repeat(np.arange(adata.n_obs), nbrs.shape[1])
    cols_idx = nbrs.ravel()
    keep = (cols_idx >= 0) & (cols_idx != rows_idx)
    rows_idx, cols_idx = rows_idx[keep], cols_idx[keep]
    same = codes[rows_idx] == codes[cols_idx]
    out = []
    n_expected = 0.0
    for sample in pd.unique(samples):
        in_sample = samples == sample
        pair_sel = in_sample[rows_idx]
        row = _coherence_row(same[pair_sel], codes[in_sample], n_cat)
        n_expected += row["expected"] * int(pair_sel.sum())
        out.append({"sample": sample, "n_pairs": int(pair_sel.sum()), **row})
    n_pairs = int(same.size)
    observed = float(same.mean()) if n_pairs else float("nan")
    expected = n_expected / n_pairs if n_pairs else float("nan")
    kappa = (observed - expected) / (1 - expected) if expected < 1 else float("nan")
    out.append(
        {
            "sample": "all",
            "n_pairs": n_pairs,
            "coherence": observed,
            "expected": expected,
            "kappa": float(kappa),
        }
    )
    return pd.DataFrame(out, columns=["sample", "n_pairs", "coherence", "expected", "kappa"])
