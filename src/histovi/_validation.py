"""Input checks shared by the public entry points. Each error names the key and the fix."""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def is_whole_number(value, minimum: int = 1) -> bool:
    """``value`` is an integer (not a bool, which Python counts as one) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= minimum


def obs_names_digest(adata: AnnData) -> str:
    """Short digest of ``obs_names``: detects that row numbers refer to another AnnData."""
    h = hashlib.sha1()
    for name in adata.obs_names:
        h.update(name.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def require_obs(adata: AnnData, key: str, hint: str) -> None:
    if key not in adata.obs:
        raise KeyError(f"adata.obs['{key}'] not found. {hint}")


def require_adata(adata, name: str = "adata") -> None:
    """``TypeError`` naming the fix unless ``adata`` is an AnnData."""
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"{name} must be an AnnData, got {type(adata).__name__}: read it with "
            "anndata.read_h5ad, or convert a SpatialData object with histovi.io.from_spatialdata."
        )


def require_obsm(adata: AnnData, key: str, hint: str) -> np.ndarray:
    if key not in adata.obsm:
        raise KeyError(f"adata.obsm['{key}'] not found. {hint}")
    value = adata.obsm[key]
    if sp.issparse(value):
        raise ValueError(
            f"adata.obsm['{key}'] is a sparse matrix: store it dense "
            f"(adata.obsm['{key}'] = adata.obsm['{key}'].toarray())."
        )
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    value = np.asarray(value)
    if value.ndim != 2 or value.shape[0] != adata.n_obs:
        raise ValueError(
            f"adata.obsm['{key}'] must be a 2-D array with one row per spot ({adata.n_obs}), "
            f"got shape {value.shape}."
        )
    if value.shape[1] == 0:
        raise ValueError(f"adata.obsm['{key}'] has no columns (shape {value.shape}). {hint}")
    if value.dtype.kind not in "biuf":
        try:
            value = value.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"adata.obsm['{key}'] must hold numbers, got dtype {value.dtype} ({err}). {hint}"
            ) from err
    return value


def get_counts(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"adata.layers['{layer}'] not found (layers: {list(adata.layers)}). Pass the layer "
            "that holds raw counts, or layer=None to use adata.X."
        )
    return adata.layers[layer]


def check_counts(adata: AnnData, layer: str | None, n_check: int = 20_000) -> None:
    """Raw counts must be finite, non-negative integers (checked on up to ``n_check`` rows)."""
    X = get_counts(adata, layer)
    where = f"adata.layers['{layer}']" if layer is not None else "adata.X"
    if X is None:
        raise ValueError(f"{where} is empty: store raw counts there.")
    if X.shape[1] == 0:
        raise ValueError(f"{where} has no genes (shape {X.shape}): pass the genes' raw counts.")
    # sparse: every stored value (cheap); dense or backed: the first n_check rows
    rows = X if sp.issparse(X) else X[: min(n_check, X.shape[0])]
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
            raise ValueError(f"{where} contains NaN or inf: counts must be finite raw UMI counts.")
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


def check_neighbors(
    adata: AnnData, key: str, sample_key: str | None, check_digest: bool = True
) -> np.ndarray:
    """Validate a fixed-k neighbour index matrix; return it as int64."""
    hint = (
        "Compute it with histovi.pp.spatial_neighbors(adata, sample_key=..., "
        f"key_added='{key}'), or pass neighbors_key=None to train without the neighbourhood view."
    )
    nbrs = require_obsm(adata, key, hint)
    if not np.issubdtype(nbrs.dtype, np.integer):
        if not np.all(np.isfinite(nbrs)) or not np.allclose(nbrs, np.round(nbrs)):
            raise ValueError(f"adata.obsm['{key}'] must hold integer row indices. {hint}")
    nbrs = nbrs.astype(np.int64)
    if nbrs.size and (nbrs.min() < 0 or nbrs.max() >= adata.n_obs):
        raise ValueError(
            f"adata.obsm['{key}'] has neighbour indices outside [0, {adata.n_obs}): they refer to "
            f"rows of another AnnData (was it subset after computing neighbours?). {hint}"
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
