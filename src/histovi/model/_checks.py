"""Checks of HistoVI's entry points that need the model (its genes, views, neighbours): each
problem is one error naming the key and the fix, before scvi-tools or torch fail deep inside."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import REGISTRY_KEYS

from .._validation import (
    check_counts,
    check_finite_or_nan_rows,
    check_neighbors,
    check_var_names,
    require_obs,
    require_obsm,
)

QUERY_FIX = (
    "Map it as a query: HistoVI.prepare_query_anndata(adata, model) orders the genes like the "
    "model, fills missing genes with zeros and missing views with NaN, and computes the "
    "neighbours."
)


def model_genes(model) -> pd.Index:
    return pd.Index(model.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names)


def check_key_lists(
    categorical_covariate_keys, continuous_covariate_keys, embedding_keys=None
) -> None:
    """Keys given as one string instead of a list, or views not as a name -> key mapping."""
    for name, keys in (
        ("categorical_covariate_keys", categorical_covariate_keys),
        ("continuous_covariate_keys", continuous_covariate_keys),
    ):
        if isinstance(keys, str):
            raise TypeError(f"{name}={keys!r}: pass a list of obs columns, e.g. {name}=[{keys!r}].")
    if embedding_keys is not None and not isinstance(embedding_keys, dict):
        raise TypeError(
            f"embedding_keys={embedding_keys!r}: pass a mapping view name -> obsm key, e.g. "
            "embedding_keys={'scgpt': 'X_scgpt'}."
        )


def check_categorical_covariates(adata: AnnData, keys: Iterable[str] | None) -> None:
    for key in keys or []:
        require_obs(adata, key, "Remove it from the covariate keys or add the column.")
        if adata.obs[key].isna().any():
            n = int(adata.obs[key].isna().sum())
            raise ValueError(
                f"adata.obs['{key}'] has {n} missing values: every spot needs a value of each "
                "categorical covariate (fill them, e.g. with 'unknown')."
            )


def check_labels_column(adata: AnnData, key: str) -> None:
    """A labels column must give every spot a label (scvi-tools fails on NaN with a message
    about categories)."""
    missing = adata.obs[key].isna()
    if missing.any():
        raise ValueError(
            f"adata.obs['{key}'] (labels_key) has {int(missing.sum())} missing values of "
            f"{adata.n_obs}: every spot needs a label. Give unlabelled spots a label of their "
            f"own, e.g. adata.obs['{key}'] = adata.obs['{key}'].astype(object).fillna("
            "'unlabelled'), or pass labels_key=None (labels are not used in training)."
        )


def check_modality_spots(mdata, mod_name: str, arg: str) -> None:
    """The modality ``mod_name`` (named for ``arg``) must have every spot of the MuData, in the
    MuData's order: scvi-tools reads each field row by row of the MuData."""
    import numpy as np

    mod = mdata.mod[mod_name]
    if mod.n_obs == mdata.n_obs and np.array_equal(mod.obs_names, mdata.obs_names):
        return
    missing = mdata.obs_names.difference(mod.obs_names)
    what = "the expression counts" if arg == "rna_layer" else f"{arg}"
    if len(missing):
        shown = ", ".join(map(str, missing[:3])) + (" ..." if len(missing) > 3 else "")
        raise ValueError(
            f"Modality '{mod_name}' ({what}) has {mod.n_obs} of the MuData's {mdata.n_obs} "
            f"spots: {len(missing)} spots ({shown}) are only in other modalities. Every spot "
            f"needs {what}: keep the spots present in every modality "
            "(muon.pp.intersect_obs(mdata)), or add the missing spots to "
            f"'{mod_name}'."
        )
    raise ValueError(
        f"Modality '{mod_name}' ({what}) lists the MuData's spots in another order: reorder it "
        f"like the MuData (mdata.mod['{mod_name}'] = mdata.mod['{mod_name}'][mdata.obs_names]) "
        "and call mdata.update()."
    )


def check_inference_adata(model, adata) -> None:
    """An AnnData given to an output method (latent, expression, ...) must be laid out like the
    model's: same genes in the same order, the views and neighbours it uses, valid values."""
    if adata is None or not isinstance(adata, AnnData):
        return
    setup = model.adata_manager.registry["setup_args"]
    other = adata is not model.adata
    if other:
        check_var_names(adata, model_genes(model), "the model's", QUERY_FIX)
        check_counts(adata, setup.get("layer"))
        for name, key in model.histovi_setup_["views"].items():
            if key not in adata.obsm:
                raise KeyError(
                    f"adata.obsm['{key}'] (the model's '{name}' view) not found. {QUERY_FIX}"
                )
    nkey = setup.get("neighbors_key")
    if nkey is not None:
        if other and nkey not in adata.obsm:
            k = model.histovi_setup_.get("n_neighbors")
            raise KeyError(
                f"adata.obsm['{nkey}'] (the model's spatial neighbours) not found: compute it "
                f"with histovi.pp.spatial_neighbors(adata, n_neighbors={k}, key_added='{nkey}'). "
                + QUERY_FIX
            )
        check_neighbors(adata, nkey, setup.get("batch_key"), check_digest=other)


def check_model_adata(model, adata) -> None:
    """The checks of ``model._validate_anndata`` before scvi-tools': :func:`check_inference_adata`
    and, for an AnnData other than the model's, its counts and the width of its views."""
    check_inference_adata(model, adata if adata is not None else model.adata)
    if adata is None or not isinstance(adata, AnnData) or adata is model.adata:
        return
    check_counts(adata, model.adata_manager.registry["setup_args"].get("layer"))
    dims = model.histovi_setup_["view_dims"]
    for name, key in model.histovi_setup_["views"].items():
        if key not in adata.obsm:
            continue
        values = require_obsm(adata, key, "")
        check_finite_or_nan_rows(values, key)
        if values.shape[1] != dims[name]:
            raise ValueError(
                f"adata.obsm['{key}'] has {values.shape[1]} columns but the model's "
                f"'{name}' view has {dims[name]}: embed it with the reference's settings "
                "(histovi.pp.embed_morphology(..., reference=...))."
            )


def check_model_args(adata, niche_weight, normalize_input, view_dropout) -> None:
    """Arguments of :class:`HistoVI` checked before the module is built."""
    if adata is None:
        raise ValueError("HistoVI needs a registered AnnData: HistoVI(adata).")
    if not np.isfinite(niche_weight) or niche_weight < 0:
        raise ValueError(f"niche_weight={niche_weight!r}: pass a finite weight >= 0.")
    if not isinstance(normalize_input, bool | np.bool_):
        raise ValueError(
            f"normalize_input={normalize_input!r}: pass True (depth-normalised encoder input, "
            "the default) or False (raw log counts, as scVI)."
        )
    if not 0 <= view_dropout <= 1:
        raise ValueError(f"view_dropout={view_dropout!r}: pass a share in [0, 1].")


def check_query_genes(adata: AnnData, reference_genes) -> None:
    check_var_names(
        adata,
        reference_genes,
        "the reference's",
        "Run HistoVI.prepare_query_anndata(query, reference_model) first: it orders the genes "
        "like the reference and fills missing ones with zeros.",
    )


@contextlib.contextmanager
def query_neighbors_context(k: int):
    """Say that the neighbours of a query are computed with the reference's k."""
    try:
        yield
    except ValueError as err:
        raise ValueError(
            f"The query's spatial neighbours are computed with the reference's n_neighbors={k}, "
            f"which failed: {err} The reference model needs {k} neighbours per spot, so drop "
            f"query samples with at most {k} spots."
        ) from err


def check_mudata_inputs(
    mdata,
    modalities: dict,
    batch_key,
    labels_key,
    neighbors_key,
    categorical_covariate_keys,
    continuous_covariate_keys,
) -> None:
    """The keys of ``setup_mudata`` must exist in the modality that holds them."""
    default = modalities["rna_layer"]

    def mod(arg):
        return mdata.mod[modalities.get(arg) or default]

    # the expression modality first: a MuData whose counts miss spots is that modality's fault
    check_modality_spots(mdata, default, "rna_layer")
    for arg, key in (
        ("batch_key", batch_key),
        ("labels_key", labels_key),
        ("neighbors_key", neighbors_key),
        ("categorical_covariate_keys", categorical_covariate_keys),
        ("continuous_covariate_keys", continuous_covariate_keys),
    ):
        if key and modalities.get(arg) and modalities[arg] != default:
            check_modality_spots(mdata, modalities[arg], arg)

    for arg, key in (("batch_key", batch_key), ("labels_key", labels_key)):
        if key is not None:
            require_obs(
                mod(arg),
                key,
                f"It is looked up in modality '{modalities.get(arg) or default}': pass {arg}= "
                f"naming an existing column, or its modality in modalities={{'{arg}': ...}}.",
            )
    if batch_key is not None and mod("batch_key").obs[batch_key].isna().any():
        raise ValueError(f"adata.obs['{batch_key}'] has missing values: every spot needs a sample.")
    if labels_key is not None:
        check_labels_column(mod("labels_key"), labels_key)
    check_categorical_covariates(mod("categorical_covariate_keys"), categorical_covariate_keys)
    for key in continuous_covariate_keys or []:
        require_obs(mod("continuous_covariate_keys"), key, "Remove it or add the column.")
    if neighbors_key is not None:
        nmod = mod("neighbors_key")
        same = (modalities.get("batch_key") or default) == (
            modalities.get("neighbors_key") or default
        )
        check_neighbors(nmod, neighbors_key, batch_key if same else None)


def check_trainable(model) -> None:
    """A query model whose samples and covariates all exist in the reference has nothing to
    train (every reference weight is frozen)."""
    if not getattr(model, "is_query_", False):
        return
    if not any(p.requires_grad for p in model.module.parameters()):
        raise ValueError(
            "This query model has nothing to train: all its samples and covariate values are "
            "the reference's, whose weights are frozen. Embed it with the reference model "
            "directly (reference_model.get_latent_representation(query)), or give the query its "
            "own sample names."
        )


def nonfinite_inputs(batch: dict) -> list[str]:
    """Registry keys of a minibatch holding NaN or inf where they must not (views may hold NaN
    rows: missing)."""
    import torch

    bad = []
    for key, value in batch.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        if key.startswith("view_"):
            finite = ~torch.isinf(value).any()
        else:
            finite = torch.isfinite(value).all()
        if not bool(finite):
            bad.append(key)
    return bad


def nonfinite_registered_inputs(model) -> list[str]:
    """Views (expression, morphology, ...) whose registered data hold NaN or inf values where
    they must not (embedding views may have NaN rows: missing)."""
    import numpy as np
    import scipy.sparse as sp

    from ..module._module import view_registry_key

    manager = model.adata_manager
    bad = []
    for name, key in [("expression", REGISTRY_KEYS.X_KEY)] + [
        (v, view_registry_key(v)) for v in model.module.view_names
    ]:
        if key not in manager.data_registry:
            continue
        values = manager.get_from_registry(key)
        values = values.data if sp.issparse(values) else np.asarray(values)
        if values.dtype.kind not in "fc":
            continue
        finite = ~np.isinf(values).any() if key.startswith("view_") else np.isfinite(values).all()
        if not finite:
            bad.append(name)
    return bad


def check_setup_inputs(
    adata,
    layer,
    batch_key,
    morphology_key,
    neighbors_key,
    embedding_keys,
    labels_key,
    categorical_covariate_keys,
    continuous_covariate_keys,
    allow_missing_views=False,
    allow_missing_labels=False,
):
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no spots.")
    check_key_lists(categorical_covariate_keys, continuous_covariate_keys, embedding_keys)
    check_counts(adata, layer)
    check_categorical_covariates(adata, categorical_covariate_keys)
    for key, what in ((batch_key, "batch_key"), (labels_key, "labels_key")):
        if key is not None:
            require_obs(adata, key, f"Pass {what}= naming an existing column, or None.")
    if batch_key is not None and adata.obs[batch_key].isna().any():
        raise ValueError(f"adata.obs['{batch_key}'] has missing values: every spot needs a sample.")
    if labels_key is not None and not allow_missing_labels:
        check_labels_column(adata, labels_key)
    for key in list(categorical_covariate_keys or []) + list(continuous_covariate_keys or []):
        require_obs(adata, key, "Remove it from the covariate keys or add the column.")
    for key in continuous_covariate_keys or []:
        values = pd.to_numeric(adata.obs[key], errors="coerce").to_numpy()
        if not np.all(np.isfinite(values)):
            raise ValueError(f"adata.obs['{key}'] must be finite numbers (continuous covariate).")
    for name, key in view_setup(morphology_key, embedding_keys).items():
        hint = (
            "Compute it with histovi.pp.embed_morphology(adata), or pass morphology_key=None."
            if name == MORPHOLOGY_VIEW
            else f"Compute the '{name}' embedding first, or drop it from embedding_keys."
        )
        values = require_obsm(adata, key, hint)
        present = check_finite_or_nan_rows(values, key)
        if not present.any() and not allow_missing_views:
            raise ValueError(
                f"adata.obsm['{key}'] is NaN for every spot: no spot has this view. {hint}"
            )
    if neighbors_key is not None:
        nbrs = check_neighbors(adata, neighbors_key, batch_key)
        if nbrs.shape[1] < 1:
            raise ValueError(f"adata.obsm['{neighbors_key}'] has no columns (k = 0).")


#: Name of the morphology view (the other embedding views are named by the user).
MORPHOLOGY_VIEW = "morphology"


def view_setup(morphology_key, embedding_keys) -> dict[str, str]:
    """View name -> obsm key, morphology first."""
    views = {}
    if morphology_key is not None:
        views[MORPHOLOGY_VIEW] = morphology_key
    for name, key in (embedding_keys or {}).items():
        if name == MORPHOLOGY_VIEW:
            raise ValueError(
                "embedding_keys may not use the name 'morphology': pass the morphology embedding as "
                "morphology_key=... instead."
            )
        views[name] = key
    return views
