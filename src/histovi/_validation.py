"""Input checks of histovi's entry points, in one module (the model's own checks in
``model/_checks.py`` build on these). Each error names the key or argument and the fix."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


# ---------------------------------------------------------------------------- arguments
def is_whole_number(value, minimum: int | None = 1) -> bool:
    """``value`` is an integer (not a bool, which Python counts as one) of at least ``minimum``
    (any integer when ``minimum`` is None)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return False
    return minimum is None or value >= minimum


def check_whole_number(
    value, name: str, minimum: int | None = 1, *, allow_none: bool = False, what: str = ""
) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer >= ``minimum`` (or None
    when ``allow_none``); ``what`` says what the number counts."""
    if (value is None and allow_none) or is_whole_number(value, minimum):
        return
    need = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )
    raise ValueError(
        f"{name}={value!r} must be {need}{' or None' if allow_none else ''}"
        f"{f' ({what})' if what else ''}."
    )


# ---------------------------------------------------------------------------- AnnData
def check_adata(adata: Any, name: str = "adata", *, allow_empty: bool = False) -> None:
    """``TypeError`` naming the fix unless ``adata`` is an AnnData; ``ValueError`` when it has
    no spots (unless ``allow_empty``)."""
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"{name} must be an AnnData, got {type(adata).__name__}: read it with "
            "anndata.read_h5ad, or convert a SpatialData object with histovi.io.from_spatialdata."
        )
    if not allow_empty and adata.n_obs == 0:
        raise ValueError(f"{name} has no spots (0 observations): pass a non-empty AnnData.")


def obs_names_digest(adata: AnnData) -> str:
    """Short digest of ``obs_names``: detects that row numbers refer to another AnnData."""
    h = hashlib.sha1()
    for name in adata.obs_names:
        h.update(name.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def require_obs(adata: AnnData, key: str, hint: str = "", *, name: str = "adata") -> pd.Series:
    """``adata.obs[key]``, or a ``KeyError`` naming the key and ``hint`` (by default: the
    columns there are)."""
    if key not in adata.obs.columns:
        fix = hint or f"Pass the name of an existing column (available: {list(adata.obs.columns)})."
        raise KeyError(f"{name}.obs['{key}'] not found. {fix}")
    return adata.obs[key]


def require_samples(adata: AnnData, key: str, hint: str = "", *, name: str = "adata"):
    """The sample column ``adata.obs[key]`` as a categorical; every spot must have a sample."""
    samples = require_obs(adata, key, hint, name=name)
    if samples.isna().any():
        raise ValueError(
            f"{name}.obs['{key}'] has {int(samples.isna().sum())} missing values: every spot needs "
            "a sample (fill them, or drop those spots)."
        )
    return samples.astype("category")


def get_cluster_column(adata: AnnData, cluster_key: str) -> pd.Series:
    """``adata.obs[cluster_key]``, raising unless every spot has a cluster."""
    clusters = require_obs(
        adata, cluster_key, "Run histovi.tl.domains(adata) first or pass cluster_key=."
    )
    if clusters.isna().any():
        raise ValueError(
            f"adata.obs['{cluster_key}'] has missing values: every spot needs a cluster; "
            "recompute it on all spots."
        )
    return clusters


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


# ---------------------------------------------------------------------------- embeddings
def require_obsm(
    adata: AnnData,
    key: str,
    hint: str,
    *,
    name: str = "adata",
    sparse_ok: bool = False,
    finite: bool = False,
) -> np.ndarray:
    """``adata.obsm[key]`` as a dense 2-D numeric array with one row per spot and at least one
    column. A sparse matrix is refused (or made dense with ``sparse_ok``); NaN and inf are
    refused with ``finite``."""
    where = f"{name}.obsm['{key}']"
    if key not in adata.obsm:
        raise KeyError(f"{where} not found (obsm keys: {list(adata.obsm.keys())}). {hint}")
    value = adata.obsm[key]
    if sp.issparse(value):
        if not sparse_ok:
            raise ValueError(
                f"{where} is a sparse matrix: store it dense "
                f"(adata.obsm['{key}'] = adata.obsm['{key}'].toarray())."
            )
        value = value.toarray()
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    value = np.asarray(value)
    if value.ndim != 2 or value.shape[0] != adata.n_obs:
        raise ValueError(
            f"{where} must be a 2-D array with one row per spot ({adata.n_obs}), got shape "
            f"{value.shape}: store one row per spot."
        )
    if value.shape[1] == 0:
        raise ValueError(f"{where} has no columns (shape {value.shape}). {hint}")
    if value.dtype.kind not in "biuf":
        try:
            value = value.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{where} must hold numbers, got dtype {value.dtype} ({err}). {hint}"
            ) from err
    if finite:
        _check_finite_rows(value, where)
    return value


def _check_finite_rows(value: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(value)
    if bad.any():
        raise ValueError(
            f"{where} has NaN/inf in {int(bad.any(axis=1).sum())} rows: impute or drop those spots "
            "(e.g. adata[np.isfinite(adata.obsm[key]).all(1)]) before calling this function."
        )


#: What to do when an embedding is not in ``obsm``, for the functions that read a latent.
LATENT_HINT = (
    "Run histovi.HistoVI(...).get_latent_representation() and store it there, or pass use_rep= "
    "naming an existing obsm key."
)


def get_rep(adata: AnnData, use_rep: str, name: str = "adata", hint: str = LATENT_HINT):
    """``adata.obsm[use_rep]`` as a finite float64 (n_obs, d) array (sparse is made dense)."""
    rep = require_obsm(adata, use_rep, hint, name=name, sparse_ok=True, finite=True)
    return rep.astype(np.float64, copy=False)


def check_embedding(embedding: Any, n_obs: int | None = None, name: str = "embedding"):
    """``embedding`` as a finite float64 (n, d) array with ``n_obs`` rows when given."""
    if sp.issparse(embedding):
        embedding = embedding.toarray()
    X = np.asarray(embedding, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 2-D (n_spots, n_dims) array, got shape {X.shape}."
        )
    if n_obs is not None and X.shape[0] != n_obs:
        raise ValueError(
            f"`{name}` has {X.shape[0]} rows but the labels/samples have {n_obs}: pass one row "
            "per spot."
        )
    _check_finite_rows(X, f"`{name}`")
    return X


def get_counts(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"adata.layers['{layer}'] not found (layers: {[k for k in adata.layers if k]}). Pass "
            "layer= naming the layer that holds raw counts, or layer=None to use adata.X."
        )
    return adata.layers[layer]


def check_counts(adata: AnnData, layer: str | None, n_check: int | None = 20_000) -> None:
    """Raw counts must be finite, non-negative integers (checked on up to ``n_check`` rows of a
    dense matrix, every row when None; every stored value of a sparse one)."""
    X = get_counts(adata, layer)
    where = f"adata.layers['{layer}']" if layer is not None else "adata.X"
    if X is None:
        raise ValueError(f"{where} is empty: store raw counts there.")
    if X.shape[1] == 0:
        raise ValueError(f"{where} has no genes (shape {X.shape}): pass the genes' raw counts.")
    # sparse: every stored value (cheap); dense or backed: the first n_check rows
    rows = X if sp.issparse(X) or n_check is None else X[: min(n_check, X.shape[0])]
    values = rows.data if sp.issparse(rows) else np.asarray(rows)
    if hasattr(values, "compute"):  # dask
        values = values.compute()
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise ValueError(
            f"{where} has dtype {values.dtype}, not numbers: store the raw counts as integers or "
            "floats (e.g. adata.X = adata.X.astype('float32'))."
        )
    if values.size == 0:
        return
    # in slices: the temporaries of isfinite / round / allclose over all stored values at once
    # took twice the size of the counts (14 GB for a million spots)
    values = values.reshape(-1)
    for start in range(0, values.size, _CHECK_SLICE):
        part = values[start : start + _CHECK_SLICE]
        if not np.all(np.isfinite(part)):
            raise ValueError(
                f"{where} contains NaN or inf: pass finite raw UMI counts (e.g. layer='counts')."
            )
        if part.min() < 0:
            raise ValueError(
                f"{where} contains negative values: pass raw counts (e.g. layer='counts'), "
                "not scaled or log-transformed data."
            )
        if not np.allclose(part, np.round(part)):
            raise ValueError(
                f"{where} contains non-integer values: HistoVI models raw UMI counts; pass the "
                "layer with raw counts (e.g. layer='counts') instead of normalised data."
            )


#: Stored values checked at once by :func:`check_counts` (16 MB of float32 temporaries).
_CHECK_SLICE = 1 << 22


def check_finite_or_nan_rows(values: np.ndarray, key: str) -> np.ndarray:
    """Morphology-like views: a row is either all finite or all NaN (missing). Returns the mask."""
    try:
        values = np.asarray(values)
        if values.dtype.kind != "f":  # float32 embeddings are checked as they are, not copied
            values = values.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adata.obsm['{key}'] must hold numbers ({err}).") from err
    if np.isinf(values).any():
        raise ValueError(
            f"adata.obsm['{key}'] contains inf values: recompute the embedding, or set the rows of "
            "spots without a valid tile to NaN (they are then treated as missing)."
        )
    nan = np.isnan(values)
    partial = nan.any(1) & ~nan.all(1)
    if partial.any():
        raise ValueError(
            f"adata.obsm['{key}'] has {int(partial.sum())} rows with some but not all values NaN: "
            "a spot's embedding must be complete or entirely NaN (missing)."
        )
    return ~nan.all(1)


def _neighbor_indices(adata: AnnData, key: str, hint: str, name: str = "adata") -> np.ndarray:
    """``adata.obsm[key]`` as an int64 (n_obs, k) matrix of row numbers below ``n_obs``."""
    nbrs = require_obsm(adata, key, hint, name=name)
    if not np.issubdtype(nbrs.dtype, np.integer):
        if not np.all(np.isfinite(nbrs)) or not np.allclose(nbrs, np.round(nbrs)):
            raise ValueError(f"{name}.obsm['{key}'] must hold integer row indices. {hint}")
    nbrs = nbrs.astype(np.int64)
    if nbrs.size and nbrs.max() >= adata.n_obs:
        raise ValueError(
            f"{name}.obsm['{key}'] has neighbour indices up to {nbrs.max()}, outside [0, "
            f"{adata.n_obs}): they refer to rows of another AnnData (was it subset after computing "
            f"neighbours?). {hint}"
        )
    return nbrs


def check_neighbors(
    adata: AnnData, key: str, sample_key: str | None, check_digest: bool = True
) -> np.ndarray:
    """Validate a fixed-k neighbour index matrix for the model (no padding, no link across
    samples, computed on these very spots); return it as int64."""
    hint = (
        "Compute it with histovi.pp.spatial_neighbors(adata, sample_key=..., "
        f"key_added='{key}'), or pass neighbors_key=None to train without the neighbourhood view."
    )
    nbrs = _neighbor_indices(adata, key, hint)
    if nbrs.size and nbrs.min() < 0:
        raise ValueError(
            f"adata.obsm['{key}'] has neighbour indices outside [0, {adata.n_obs}) (min "
            f"{nbrs.min()}): they refer to rows of another AnnData (was it subset after computing "
            f"neighbours?). {hint}"
        )
    record = adata.uns.get("histovi", {}).get("spatial_neighbors", {})
    if check_digest and record.get("key_added") == key and "obs_names_digest" in record:
        if record["obs_names_digest"] != obs_names_digest(adata):
            raise ValueError(
                f"adata.obsm['{key}'] was computed on a different set or order of spots (the AnnData "
                f"was subset, reordered or concatenated since). {hint}"
            )
    if sample_key is not None and sample_key in adata.obs:
        codes = adata.obs[sample_key].astype("category").cat.codes.to_numpy()
        crossing = codes[nbrs] != codes[:, None]
        if crossing.any():
            raise ValueError(
                f"adata.obsm['{key}'] links {int(crossing.any(1).sum())} spots to neighbours in "
                f"another sample ('{sample_key}'): neighbours must lie within the same section. {hint}"
            )
    return nbrs


def get_neighbors(
    adata: AnnData, neighbors_key: str, sample_key: str | None = None, name: str = "adata"
) -> np.ndarray:
    """The fixed-k neighbour index matrix ``adata.obsm[neighbors_key]`` as int64, for the tools.

    Negative entries are read as padding (no neighbour). When ``sample_key`` is a column of
    ``adata.obs``, links that cross samples are set to -1 as well: neighbourhoods are defined
    within one section.
    """
    hint = (
        "Compute (or recompute) it with histovi.pp.spatial_neighbors(adata) on this AnnData, or "
        "pass neighbors_key= naming an existing (n_obs, k) int matrix of neighbour row indices."
    )
    nbrs = _neighbor_indices(adata, neighbors_key, hint, name)
    if sample_key is not None and sample_key in adata.obs.columns:
        codes = pd.Categorical(adata.obs[sample_key].astype(str)).codes
        valid = nbrs >= 0
        cross = valid & (codes[np.where(valid, nbrs, 0)] != codes[:, None])
        if cross.any():
            nbrs = nbrs.copy()
            nbrs[cross] = -1
    return nbrs


def check_indices(indices, n_obs: int, name: str = "indices") -> None:
    """Row numbers must be whole numbers in ``[0, n_obs)`` (or a boolean mask of length n_obs)."""
    if indices is None:
        return
    if isinstance(indices, str | bytes):
        raise ValueError(
            f"{name}={indices!r} is a string: pass row numbers (adata.obs_names.get_indexer(names) "
            "turns spot names into row numbers)."
        )
    idx = np.asarray(indices)
    if idx.ndim != 1:
        shape = "a single number" if idx.ndim == 0 else f"a {idx.ndim}-D array of shape {idx.shape}"
        raise ValueError(
            f"{name} is {shape}: pass a 1-D list or array of row numbers (e.g. {name}=[5] for one "
            "spot) or a boolean mask with one value per spot."
        )
    if idx.dtype == bool:
        if idx.shape != (n_obs,):
            raise ValueError(
                f"{name} is a boolean mask of length {idx.size}, the AnnData has {n_obs} spots: "
                "pass one value per spot, or row numbers."
            )
        return
    if idx.size == 0:
        raise ValueError(f"{name} is empty: pass at least one row number.")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"{name} must be whole row numbers, got dtype {idx.dtype}.")
    if idx.min() < 0 or idx.max() >= n_obs:
        raise ValueError(
            f"{name} holds row numbers outside [0, {n_obs}) (min {idx.min()}, max {idx.max()}): "
            "they must be rows of the AnnData passed (adata.obs_names.get_indexer(names) turns "
            "spot names into row numbers)."
        )


def check_var_names(adata: AnnData, model_genes, owner: str, fix: str) -> None:
    """``adata``'s genes must be ``model_genes`` in the same order; say what differs.

    ``owner`` names whose genes they are, e.g. "the model's"."""
    import pandas as pd

    model_genes = pd.Index(np.asarray(model_genes).astype(str))
    genes = pd.Index(np.asarray(adata.var_names).astype(str))
    if genes.equals(model_genes):
        return
    missing = model_genes.difference(genes)
    extra = genes.difference(model_genes)

    def few(items):
        items = list(items)
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    if len(missing) or len(extra):
        raise ValueError(
            f"adata's genes differ from {owner}: {len(missing)} of {owner} {len(model_genes)} "
            f"genes are missing{f' ({few(missing)})' if len(missing) else ''} and {len(extra)} "
            f"are extra{f' ({few(extra)})' if len(extra) else ''}. {fix}"
        )
    raise ValueError(f"adata holds {owner} genes in another order. {fix}")
