"""Tissue domains: one clustering of the pooled latent space, optionally smoothed in space."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import LATENT_KEY, NEIGHBORS_KEY
from .._files import record_uns
from .._threads import keeps_torch_threads
from .._validation import check_adata, check_whole_number, get_neighbors, get_rep
from ._utils import neighbor_graph

ClusterMethod = Literal["gmm", "kmeans", "leiden"]

#: Covariance of the Gaussian mixture. 'full' lets each domain have its own correlated shape,
#: which suits VAE latents (a few tens of dimensions, correlated within a domain).
GMM_COVARIANCE = "full"


@keeps_torch_threads
def cluster_embedding(
    X: np.ndarray,
    n_clusters: int | None,
    method: ClusterMethod = "gmm",
    random_state: int = 0,
    resolution: float = 1.0,
    n_neighbors: int = 15,
) -> np.ndarray:
    """Cluster the rows of ``X`` and return integer labels ``0..n_clusters-1``.

    This is the single clustering routine used both by :func:`histovi.tl.domains` and by the
    evaluation protocol (:func:`histovi.metrics.cluster_and_score`), so that domains and
    benchmark scores come from the same procedure.

    Parameters
    ----------
    X
        (n_spots, n_dims) embedding.
    n_clusters
        Number of clusters. Required for ``gmm`` / ``kmeans``. For ``leiden``, when given, the
        resolution is searched by bisection to reach this number (closest count is kept).
    method
        ``'gmm'``: :class:`sklearn.mixture.GaussianMixture` with ``covariance_type='full'``
        on the embedding as it is (not standardised: scaling every axis to unit variance
        shrinks the axes that separate domains relative to noise axes, and on a toy with one
        informative axis it dropped ARI from 0.98 to 0.04), k-means initialisation, 1 init.
        ``'kmeans'``: :class:`sklearn.cluster.KMeans` with ``n_init=10``.
        ``'leiden'``: scanpy kNN graph on ``X`` (``n_neighbors``) and Leiden (igraph flavour).
    random_state
        Seed.
    resolution
        Leiden resolution (start of the search when ``n_clusters`` is given).
    n_neighbors
        Size of the kNN graph for ``leiden``.
    """
    from .._validation import check_embedding
    from ._utils import well_scaled

    if n_clusters is not None and isinstance(n_clusters, np.ndarray) and n_clusters.ndim == 0:
        n_clusters = n_clusters.item()
    X = check_embedding(X, name="X")
    (X,) = well_scaled(X)  # extreme scales: rescaled exactly, or GMM / k-means degrade silently
    n = X.shape[0]
    if n_clusters is not None and (
        isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer)
    ):
        raise ValueError(
            f"`n_domains`/`n_clusters`={n_clusters!r} must be a whole number of domains "
            f"(e.g. {int(n_clusters) if isinstance(n_clusters, float) else 5})."
            if isinstance(n_clusters, int | float | np.floating)
            else f"`n_domains`/`n_clusters`={n_clusters!r} must be a whole number of domains."
        )
    if n < 2:
        raise ValueError(
            f"clustering needs at least 2 spots, got {n}: pass the AnnData of all spots."
        )
    if method in ("gmm", "kmeans"):
        if n_clusters is None:
            raise ValueError(
                f"method='{method}' needs `n_domains`/`n_clusters`: pass the number of domains "
                "or use method='leiden'."
            )
        if int(n_clusters) < 1 or int(n_clusters) > n:
            raise ValueError(
                f"`n_domains`/`n_clusters`={n_clusters} must be between 1 and the number of "
                f"spots ({n}): pass a smaller number."
            )
        n_clusters = int(n_clusters)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=n_clusters, n_init=10, random_state=random_state).fit_predict(X)
    if method == "gmm":
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        gmm = GaussianMixture(
            n_components=n_clusters, covariance_type=GMM_COVARIANCE, random_state=random_state
        )
        # The EM steps are many small (n x d, d ~ 10-50) BLAS calls where threading costs more
        # than it gives: on the 2-core dev machine one BLAS thread fitted her2st-sized data
        # (6.7k x 20, k=6) in 2.6 s instead of 15 s.
        with threadpool_limits(limits=1, user_api="blas"):
            labels = gmm.fit_predict(X)
        # empty components are possible; relabel so codes are dense 0..m-1
        used, codes = np.unique(labels, return_inverse=True)
        if len(used) < n_clusters:
            warnings.warn(
                f"the Gaussian mixture put the spots into {len(used)} of the {n_clusters} "
                "domains asked for: the embedding holds fewer separable groups (an undertrained "
                "model, or fewer domains in the data). Ask for fewer domains, train longer, or "
                "use method='kmeans', which always fills every cluster.",
                UserWarning,
                stacklevel=3,  # past the thread-keeping wrapper, at the caller
            )
        return codes
    if method == "leiden":
        return _leiden(X, n_clusters, random_state, resolution, n_neighbors)
    raise ValueError(f"`method`='{method}' is not supported: use 'gmm', 'kmeans' or 'leiden'.")


def _leiden(
    X: np.ndarray,
    n_clusters: int | None,
    random_state: int,
    resolution: float,
    n_neighbors: int,
) -> np.ndarray:
    import scanpy as sc

    tmp = AnnData(obsm={"X_rep": X}, obs=pd.DataFrame(index=[str(i) for i in range(X.shape[0])]))
    sc.pp.neighbors(
        tmp,
        use_rep="X_rep",
        n_neighbors=min(n_neighbors, X.shape[0] - 1),
        random_state=random_state,
    )

    def run(res: float) -> np.ndarray:
        sc.tl.leiden(
            tmp,
            resolution=res,
            random_state=random_state,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            key_added="_leiden",
        )
        return tmp.obs["_leiden"].astype(int).to_numpy()

    labels = run(resolution)
    if n_clusters is None:
        return labels
    # Bisection on the resolution: the number of clusters grows (roughly) monotonically with it.
    best = labels
    lo, hi = 0.0, None
    res = resolution
    for _ in range(20):
        m = len(np.unique(labels))
        if abs(m - n_clusters) < abs(len(np.unique(best)) - n_clusters):
            best = labels
        if m == n_clusters:
            break
        if m < n_clusters:
            lo = res
            res = res * 2 if hi is None else (lo + hi) / 2
        else:
            hi = res
            res = (lo + hi) / 2
        labels = run(res)
    if abs(len(np.unique(labels)) - n_clusters) < abs(len(np.unique(best)) - n_clusters):
        best = labels
    return best


def smooth_labels(codes: np.ndarray, nbrs: np.ndarray, n_iter: int) -> np.ndarray:
    """Majority vote of each spot with its spatial neighbours, repeated ``n_iter`` times.

    Ties are resolved in favour of the spot's current label when it is among the winners
    (a small bonus on its own vote), otherwise the smallest code wins.
    """
    codes = np.asarray(codes)
    nbrs = np.asarray(nbrs)
    if codes.ndim != 1 or codes.size == 0 or codes.dtype.kind not in "iu" or codes.min() < 0:
        raise ValueError(
            f"`codes` must be a non-empty 1-D array of non-negative integer labels, got shape "
            f"{codes.shape}, dtype {codes.dtype}."
        )
    if nbrs.ndim != 2 or nbrs.shape[0] != codes.shape[0] or nbrs.dtype.kind not in "iu":
        raise ValueError(
            f"`nbrs` must be an (n_spots, k) integer matrix of neighbour rows with one row per "
            f"label ({codes.shape[0]}), got shape {nbrs.shape}, dtype {nbrs.dtype}."
        )
    if nbrs.size and nbrs.max() >= codes.shape[0]:
        raise ValueError(
            f"`nbrs` holds row numbers up to {nbrs.max()}, but there are {codes.shape[0]} spots."
        )
    check_whole_number(n_iter, "n_iter", minimum=0, what="majority-vote rounds")
    n = codes.shape[0]
    n_codes = int(codes.max()) + 1
    adj = neighbor_graph(nbrs) + sp.identity(n, format="csr")
    codes = codes.copy()
    for _ in range(n_iter):
        onehot = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_codes))
        votes = np.asarray((adj @ onehot).todense())
        votes[np.arange(n), codes] += 0.5  # tie-break: keep own label
        new = votes.argmax(axis=1)
        if np.array_equal(new, codes):
            break
        codes = new
    return codes


@keeps_torch_threads
def domains(
    adata: AnnData,
    n_domains: int | None = None,
    use_rep: str = LATENT_KEY,
    method: ClusterMethod = "gmm",
    spatial_smoothing: int = 0,
    sample_key: str = "sample",
    neighbors_key: str = NEIGHBORS_KEY,
    key_added: str = "domain",
    random_state: int = 0,
    resolution: float = 1.0,
    inplace: bool = True,
) -> pd.Series | None:
    """Assign spots to tissue domains by clustering the pooled latent space.

    One clustering is fitted on all spots of all samples together, so a domain means the same
    thing in every section. Optionally each spot's label is then replaced by the majority label
    of the spot and its spatial neighbours (within its sample), ``spatial_smoothing`` times.

    Parameters
    ----------
    adata
        AnnData with the embedding in ``adata.obsm[use_rep]``.
    n_domains
        Number of domains. Required for ``'gmm'`` and ``'kmeans'``. With ``'leiden'`` it is
        optional: when given, the Leiden resolution is bisected (starting from ``resolution``,
        at most 20 runs) to reach ``n_domains`` clusters, keeping the closest count found.
    use_rep
        ``adata.obsm`` key of the embedding.
    method
        ``'gmm'`` (Gaussian mixture, full covariance),
        ``'kmeans'`` (k-means, 10 inits) or ``'leiden'`` (scanpy kNN graph + Leiden).
        See :func:`histovi.tl.cluster_embedding`.
    spatial_smoothing
        Number of majority-vote rounds over each spot and its spatial neighbours
        (``adata.obsm[neighbors_key]``). 0 disables smoothing.
    sample_key
        ``adata.obs`` column of the section id; neighbour links across sections are ignored.
    neighbors_key
        ``adata.obsm`` key of the (n_obs, k) int matrix of neighbour row indices; only read
        when ``spatial_smoothing > 0``. Negative entries mean "no neighbour".
    key_added
        ``adata.obs`` column written (categorical, categories ``'0'..'n-1'``).
    random_state
        Seed of the clustering.
    resolution
        Leiden resolution.
    inplace
        Write ``adata.obs[key_added]`` and ``adata.uns['histovi']['domains']`` (default), or
        leave ``adata`` untouched and return the labels.

    Returns
    -------
    ``None`` when ``inplace=True``; otherwise a categorical :class:`pandas.Series` indexed like
    ``adata.obs``.
    """
    check_adata(adata)
    if inplace and key_added == sample_key and sample_key in adata.obs:
        raise ValueError(
            f"key_added={key_added!r} is the sample_key column: the domains would replace the "
            "sample of every spot; pass another key_added (default 'domain')."
        )
    X = get_rep(adata, use_rep)
    check_whole_number(
        spatial_smoothing,
        "spatial_smoothing",
        minimum=0,
        what="majority-vote rounds; 0 disables smoothing",
    )
    if method not in ("gmm", "kmeans", "leiden"):
        raise ValueError(f"`method`='{method}' is not supported: use 'gmm', 'kmeans' or 'leiden'.")
    codes = cluster_embedding(
        X, n_domains, method, random_state=random_state, resolution=resolution
    )
    if spatial_smoothing > 0:
        nbrs = get_neighbors(adata, neighbors_key, sample_key=sample_key)
        codes = smooth_labels(codes, nbrs, spatial_smoothing)
    # dense, size-independent relabelling: order codes as they were first numbered
    uniq = np.unique(codes)
    codes = np.searchsorted(uniq, codes)
    categories = [str(i) for i in range(len(uniq))]
    labels = pd.Series(
        pd.Categorical.from_codes(codes, categories=categories),
        index=adata.obs_names,
        name=key_added,
    )
    if not inplace:
        return labels
    adata.obs[key_added] = labels
    record_uns(
        adata,
        "domains",
        {
            "method": method,
            "n_domains": n_domains,
            "n_found": len(categories),
            "use_rep": use_rep,
            "spatial_smoothing": int(spatial_smoothing),
            "neighbors_key": neighbors_key if spatial_smoothing > 0 else None,
            "sample_key": sample_key,
            "key_added": key_added,
            "random_state": random_state,
            "resolution": resolution if method == "leiden" else None,
            "gmm_covariance_type": GMM_COVARIANCE if method == "gmm" else None,
        },
    )
    return None
