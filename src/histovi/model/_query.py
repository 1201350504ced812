"""Reference mapping (scArches): what a query needs from a reference, the query's layout, and
the covariate columns that scvi-tools pads in the wrong place."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.nn import FCLayers

from .._constants import UNS_KEY
from .._validation import get_counts
from ._checks import check_query_genes, query_neighbors_context
from ._saving import SavedReference, read_saved_model


def prepare_query(adata: AnnData, reference_model, compute_neighbors: bool = True) -> AnnData:
    """The body of :meth:`HistoVI.prepare_query_anndata` (see there)."""
    from ._model import HistoVI

    if not isinstance(adata, AnnData):
        raise TypeError(f"prepare_query_anndata needs an AnnData, got {type(adata).__name__}.")
    ref = ReferenceInfo(reference_model, HistoVI)
    ref_genes = ref.var_names
    layer = ref.setup_args.get("layer")
    missing = ref_genes.difference(adata.var_names)
    if len(missing) == len(ref_genes):
        raise ValueError(
            "None of the reference's genes are in the query's var_names: check that both use the "
            "same gene identifiers (symbols vs Ensembl ids)."
        )
    if len(missing):
        warnings.warn(
            f"{len(missing)} of the reference's {len(ref_genes)} genes are missing from the query "
            "and are filled with zeros.",
            UserWarning,
            stacklevel=2,
        )
    counts = get_counts(adata, layer)
    counts = counts.tocsr() if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    present = ref_genes.isin(adata.var_names)
    src = adata.var_names.get_indexer(ref_genes[present])
    cols = sp.csr_matrix(counts[:, src])
    # Place present genes at their reference positions via a column selection matrix.
    sel = sp.csr_matrix(
        (
            np.ones(present.sum(), dtype=np.float32),
            (np.arange(present.sum()), np.flatnonzero(present)),
        ),
        shape=(int(present.sum()), len(ref_genes)),
    )
    aligned = (cols @ sel).tocsr()
    query = AnnData(
        X=aligned if layer is None else aligned.copy(),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=ref_genes),
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        # a deep copy: the query's records (changed later, e.g. by embed_morphology or
        # load_query_data) must not be the caller's objects
        uns=copy.deepcopy(dict(adata.uns)),
    )
    if layer is not None:
        query.layers[layer] = aligned
    record = ref.record
    for name, key in record["views"].items():
        if key not in query.obsm:
            warnings.warn(
                f"The query has no adata.obsm['{key}'] ('{name}' view): it maps with the views "
                "it has (the view is treated as missing).",
                UserWarning,
                stacklevel=2,
            )
            query.obsm[key] = np.full((query.n_obs, record["view_dims"][name]), np.nan, np.float32)
        elif np.asarray(query.obsm[key]).shape[1] != record["view_dims"][name]:
            raise ValueError(
                f"adata.obsm['{key}'] has {np.asarray(query.obsm[key]).shape[1]} columns, the "
                f"reference's '{name}' view has {record['view_dims'][name]}: embed the query with "
                "histovi.pp.embed_morphology(query, reference=reference_adata)."
            )
    check_view_records(query, record)
    nkey = record.get("neighbors_key")
    if nkey is not None and record.get("n_neighbors"):
        if nkey not in query.obsm and compute_neighbors:
            from ..pp import spatial_neighbors

            nrec = record.get("spatial_neighbors_record") or {}
            with query_neighbors_context(int(record["n_neighbors"])):
                spatial_neighbors(
                    query,
                    sample_key=nrec.get("sample_key", record.get("batch_key")),
                    n_neighbors=int(record["n_neighbors"]),
                    spatial_key=nrec.get("spatial_key", "spatial"),
                    key_added=nkey,
                )
        elif nkey in query.obsm and np.asarray(query.obsm[nkey]).shape[1] != record["n_neighbors"]:
            raise ValueError(
                f"adata.obsm['{nkey}'] has {np.asarray(query.obsm[nkey]).shape[1]} neighbours per "
                f"spot, the reference used {record['n_neighbors']}: recompute with "
                f"histovi.pp.spatial_neighbors(query, n_neighbors={record['n_neighbors']})."
            )
    return query


def load_query(cls, adata: AnnData, reference_model, scvi_load_query_data, /, **kwargs):
    """The body of :meth:`HistoVI.load_query_data` (see there); ``scvi_load_query_data`` is
    scvi-tools' ``load_query_data`` bound to ``cls``."""
    if isinstance(reference_model, os.PathLike):
        reference_model = str(reference_model)
    ref = ReferenceInfo(reference_model, cls)
    record = ref.record
    check_query_genes(adata, ref.var_names)
    for name, key in record["views"].items():
        if key not in adata.obsm:
            raise KeyError(
                f"adata.obsm['{key}'] ('{name}' view of the reference) not found: run "
                "HistoVI.prepare_query_anndata(query, reference_model) first."
            )
    check_view_records(adata, record)
    # a folder goes to scvi-tools as the model it holds, read safely (scvi-tools would
    # unpickle a folder's file with weights_only=False)
    source = SavedReference(ref.saved) if ref.saved is not None else reference_model
    model = scvi_load_query_data(adata, source, **kwargs)
    restore_covariate_columns(model.module, ref.state_dict, ref.cat_list)
    model.is_query_ = True
    # the reference's record (restored by scvi-tools), not shared with the reference object
    model.histovi_setup_ = copy.deepcopy(model.histovi_setup_)
    return model


def plain(value):
    """uns entries can be nested mappings / arrays; keep a plain, picklable copy."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


class ReferenceInfo:
    """What query mapping needs from a reference given as a model or a saved-model folder."""

    def __init__(self, reference_model, model_cls):
        self.saved = None
        if isinstance(reference_model, str | os.PathLike):
            saved = self.saved = read_saved_model(reference_model)
            attr_dict, var_names, state_dict = (
                saved["attr_dict"],
                saved["var_names"],
                saved["model_state_dict"],
            )
            registry = attr_dict["registry_"]
            self.record = attr_dict["histovi_setup_"]
            self.state_dict = state_dict
            self.var_names = pd.Index(var_names)
        elif isinstance(reference_model, model_cls):
            registry = reference_model.adata_manager.registry
            self.record = reference_model.histovi_setup_
            self.state_dict = {
                k: v.detach().cpu().clone() for k, v in reference_model.module.state_dict().items()
            }
            self.var_names = pd.Index(
                reference_model.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
            )
        else:
            raise TypeError(
                "reference_model must be a trained HistoVI or the folder of a saved HistoVI, got "
                f"{type(reference_model).__name__}."
            )
        self.setup_args = registry["setup_args"]
        fr = registry["field_registries"]
        n_batch = fr[REGISTRY_KEYS.BATCH_KEY]["summary_stats"]["n_batch"]
        cats = (
            fr.get(REGISTRY_KEYS.CAT_COVS_KEY, {})
            .get("state_registry", {})
            .get("n_cats_per_key", [])
        )
        self.cat_list = [n_batch] + list(cats or [])


def check_view_records(query: AnnData, record: dict) -> None:
    """A query's morphology must come from the reference's encoder and settings."""
    ref = record.get("morphology_record")
    qry = query.uns.get(UNS_KEY, {}).get("morphology")
    if ref is None or qry is None:
        return
    for field in ("encoder", "weights_hash", "tile_size_um", "target_mpp"):
        if field in ref and field in qry and str(ref[field]) != str(qry[field]):
            raise ValueError(
                f"The query's morphology was embedded with {field}={qry[field]!r} but the reference "
                f"used {ref[field]!r}: re-embed the query with histovi.pp.embed_morphology(query, "
                "reference=reference_adata) so both use the same encoder and settings."
            )


def restore_covariate_columns(module, ref_state: dict, ref_cats: list[int]) -> None:
    """Put reference weights back in their columns and train only new-category columns.

    scvi-tools pads a grown first-layer weight at its end, which shifts the columns of every
    covariate after the first one that grew. Every FCLayers of HistoVAE takes the covariates
    ``[batch, *categorical covariates]``, so the layout of the columns is known exactly.
    """
    new_cats = list(module.cat_list)

    def cols(cats):  # scvi ignores covariates with a single category
        return [c if c > 1 else 0 for c in cats]

    ref_cols, new_cols = cols(ref_cats), cols(new_cats)
    state = module.state_dict()
    for name, mod in module.named_modules():
        if not isinstance(mod, FCLayers):
            continue
        for i, layers in enumerate(mod.fc_layers):
            if not mod.inject_into_layer(i):
                continue
            linear = layers[0]
            key = f"{name}.fc_layers.Layer {i}.0.weight"
            if key not in ref_state:
                continue
            w_ref = ref_state[key]
            n_other = w_ref.shape[1] - sum(ref_cols)
            w_new = torch.zeros_like(state[key])
            w_new[:, :n_other] = w_ref[:, :n_other]
            trainable = torch.zeros(w_new.shape[1], dtype=torch.bool)
            r0, q0 = n_other, n_other
            for rc, qc in zip(ref_cols, new_cols, strict=True):
                w_new[:, q0 : q0 + rc] = w_ref[:, r0 : r0 + rc]
                trainable[q0 + rc : q0 + qc] = True
                r0, q0 = r0 + rc, q0 + qc
            with torch.no_grad():
                linear.weight.copy_(w_new)
            # Replace scvi-tools' hooks (which let every covariate column train) by one that
            # lets only the new categories' columns train.
            for h in getattr(mod, "hooks", []):
                h.remove()
            mask = trainable.to(linear.weight.device).float()
            mod.hooks = [
                linear.weight.register_hook(lambda g, m=mask: g * m),
                linear.bias.register_hook(lambda g: g * 0),
            ]
            linear.weight.requires_grad_(bool(trainable.any()))
            linear.bias.requires_grad_(bool(trainable.any()))
        # Deeper layers without covariates stay frozen entirely.
        for i, layers in enumerate(mod.fc_layers):
            if not mod.inject_into_layer(i):
                for p in layers.parameters():
                    p.requires_grad_(False)
