"""Input checks and graph helpers shared by :mod:`histovi.tl`, :mod:`histovi.metrics` and
:mod:`histovi.pl`.

Every check raises an error that names the offending key and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import UNS_KEY


def check_adata(adata: Any, name: str = "adata") -> None:
    """Raise unless ``adata`` is a non-empty :class:`~anndata.AnnData`."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"`{name}` must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError(f"`{name}` has no observations (0 spots): pass a non-empty AnnData.")


def get_rep(
    adata: AnnData,
    use_rep: str,
    name: str = "adata",
    hint: str = "run histovi.HistoVI(...).get_latent_representation() and store it there, "
    "or pass `use_rep=` naming an existing obsm key",
) -> np.ndarray:
    """Return ``adata.obsm[use_rep]`` as a finite float64 2-D array."""
    if use_rep not in adata.obsm:
        raise KeyError(
            f"{name}.obsm['{use_rep}'] not found (available: {list(adata.obsm.keys())}): {hint}."
        )
    rep = adata.obsm[use_rep]
    if sp.issparse(rep):
        rep = rep.toarray()
    rep = np.asarray(rep, dtype=np.float64)
    if rep.ndim != 2 or rep.shape[0] != adata.n_obs or rep.shape[1] == 0:
        raise ValueError(
            f"{name}.obsm['{use_rep}'] must be a 2-D (n_obs, n_dims) array with n_dims >= 1, "
            f"got shape {rep.shape}: store one row per spot."
        )
    if not np.isfinite(rep).all():
        n_bad = int((~np.isfinite(rep)).any(axis=1).sum())
        raise ValueError(
            f"{name}.obsm['{use_rep}'] has NaN/inf in {n_bad} rows: impute or drop those spots "
            "(e.g. adata[np.isfinite(adata.obsm[key]).all(1)]) before calling this function."
        )
    return rep


def check_embedding(
    embedding: Any, n_obs: int | None = None, name: str = "embedding"
) -> np.ndarray:
    """Return ``embedding`` as a finite float64 (n, d) array."""
    if sp.issparse(embedding):
        embedding = embedding.toarray()
    X = np.asarray(embedding, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 2-D (n_spots, n_dims) array, got shape {X.shape}."
        )
    if n_obs is not None and X.shape[0] != n_obs:
        raise ValueError(
            f"`{name}` has {X.shape[0]} rows but the labels/samples have {n_obs}: pass one row per spot."
        )
    if not np.isfinite(X).all():
        raise ValueError(f"`{name}` contains NaN/inf: impute or drop those spots first.")
    return X


#: Embeddings whose largest absolute value lies outside this range are rescaled before
#: clustering and nearest-neighbour searches (squared distances overflow or underflow there).
_SANE_SCALE = (1e-30, 1e30)


def well_scaled(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` divided by one power of two (exact: the geometry is unchanged) when their
    largest absolute value is far outside ``[1e-30, 1e30]``, where squared distances overflow
    to inf or underflow to 0 and clusterings and kNN votes silently degrade (one cluster, NaN
    weights); as they are otherwise, so that results on ordinary data do not change."""
    peak = max((float(np.abs(a).max()) if a.size else 0.0) for a in arrays)
    if peak == 0.0 or _SANE_SCALE[0] <= peak <= _SANE_SCALE[1]:
        return arrays
    factor = np.ldexp(1.0, -int(np.frexp(peak)[1]))  # 2**-e with peak = m * 2**e, 0.5 <= m < 1
    return tuple(np.asarray(a, dtype=np.float64) * factor for a in arrays)


def get_obs_column(adata: AnnData, key: str, name: str = "adata", hint: str = "") -> pd.Series:
    """Return ``adata.obs[key]`` or raise a KeyError naming the key."""
    if key not in adata.obs.columns:
        fix = hint or f"pass the name of an existing column (available: {list(adata.obs.columns)})"
        raise KeyError(f"{name}.obs['{key}'] not found: {fix}.")
    return adata.obs[key]


def get_cluster_column(adata: AnnData, cluster_key: str) -> pd.Series:
    """Return ``adata.obs[cluster_key]``, raising unless every spot has a cluster."""
    clusters = get_obs_column(
        adata, cluster_key, hint="run histovi.tl.domains(adata) first or pass `cluster_key=`"
    )
    if clusters.isna().any():
        raise ValueError(
            f"adata.obs['{cluster_key}'] has missing values: every spot needs a cluster; "
            "recompute it on all spots."
        )
    return clusters


def labelled_mask(labels: Any, ignore: Iterable[str] = ()) -> np.ndarray:
    """Boolean mask of spots with a usable label: not missing and not in ``ignore``."""
    s = pd.Series(np.asarray(labels, dtype=object))
    # one value to ignore given as a string: that value, not its characters
    ignored = {ignore} if isinstance(ignore, str) else {str(v) for v in ignore}
    return (s.notna() & ~s.astype(str).isin(ignored)).to_numpy()


def get_neighbors(
    adata: AnnData,
    neighbors_key: str,
    sample_key: str | None = None,
    name: str = "adata",
) -> np.ndarray:
    """Return the fixed-k neighbour index matrix ``adata.obsm[neighbors_key]`` as int64.

    Negative entries are read as padding (no neighbour). When ``sample_key`` is a column of
    ``adata.obs``, links that cross samples are set to -1 as well: neighbourhoods are defined
    within one section.
    """
    if neighbors_key not in adata.obsm:
        raise KeyError(
            f"{name}.obsm['{neighbors_key}'] not found: compute spatial neighbours first with "
            "histovi.pp.spatial_neighbors(adata) or pass `neighbors_key=` naming an existing "
            "(n_obs, k) int matrix of neighbour row indices."
        )
    nbrs = np.asarray(adata.obsm[neighbors_key])
    if nbrs.ndim != 2 or nbrs.shape[0] != adata.n_obs:
        raise ValueError(
            f"{name}.obsm['{neighbors_key}'] must be an (n_obs, k) matrix of row indices, got "
            f"shape {nbrs.shape}: recompute it with histovi.pp.spatial_neighbors."
        )
    if not np.issubdtype(nbrs.dtype, np.integer):
        if not (np.isfinite(nbrs).all() and np.equal(np.mod(nbrs, 1), 0).all()):
            raise ValueError(
                f"{name}.obsm['{neighbors_key}'] must hold integer row indices: recompute it "
                "with histovi.pp.spatial_neighbors."
            )
    nbrs = nbrs.astype(np.int64)
    if nbrs.size and nbrs.max() >= adata.n_obs:
        raise ValueError(
            f"{name}.obsm['{neighbors_key}'] has indices up to {nbrs.max()} but only "
            f"{adata.n_obs} rows: it was computed on another AnnData (e.g. before subsetting); "
            "recompute it with histovi.pp.spatial_neighbors on this object."
        )
    if sample_key is not None and sample_key in adata.obs.columns:
        codes = pd.Categorical(adata.obs[sample_key].astype(str)).codes
        valid = nbrs >= 0
        cross = valid & (codes[np.where(valid, nbrs, 0)] != codes[:, None])
        if cross.any():
            nbrs = nbrs.copy()
            nbrs[cross] = -1
    return nbrs


def neighbor_graph(nbrs: np.ndarray, symmetric: bool = False) -> sp.csr_matrix:
    """Sparse (n, n) 0/1 adjacency from a fixed-k index matrix (self-links dropped)."""
    n, k = nbrs.shape
    rows = np.repeat(np.arange(n), k)
    cols = nbrs.ravel()
    keep = (cols >= 0) & (cols != rows)
    adj = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float64), (rows[keep], cols[keep])), shape=(n, n)
    )
    if symmetric:
        adj = adj + adj.T
    adj.data[:] = 1.0  # duplicates summed above; keep a 0/1 graph
    adj.eliminate_zeros()
    return adj.tocsr()


def record_settings(adata: AnnData, name: str, settings: dict[str, Any]) -> None:
    """Store ``settings`` under ``adata.uns['histovi'][name]`` (None values dropped: h5ad cannot hold them)."""
    clean: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, tuple | list):
            value = [str(v) for v in value]
        clean[key] = value
    uns = adata.uns.setdefault(UNS_KEY, {})
    uns[name] = clean


def as_str_array(
    values: Sequence[Any] | pd.Series | np.ndarray, name: str = "values"
) -> np.ndarray:
    """Object array of strings, with missing values kept as None; one value per spot (1-D)."""
    if isinstance(values, str | bytes):
        raise ValueError(f"`{name}` is a single string: pass one value per spot.")
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ValueError(
            f"`{name}` has shape {arr.shape}: pass one value per spot (a 1-D list, array or "
            "Series)."
        )
    s = pd.Series(arr)
    return np.where(s.notna(), s.astype(str), None).astype(object)
