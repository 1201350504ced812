"""Registration of the data HistoVI reads: AnnData / MuData fields and the views' scaling."""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import fields

from .._constants import UNS_KEY
from .._validation import check_counts, check_finite_or_nan_rows
from ..module._module import NEIGHBORS_REGISTRY_KEY, view_registry_key
from ._checks import MORPHOLOGY_VIEW, check_key_lists, check_mudata_inputs, view_setup
from ._query import plain

logger = logging.getLogger(__name__)

#: A sample needs this many spots with a view for its own centring and scaling of that view.
MIN_SPOTS_PER_SAMPLE_MOMENTS = 20

_MUDATA_ARGS = (
    "rna_layer",
    "batch_key",
    "morphology_layer",
    "neighbors_key",
    "labels_key",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)


def anndata_fields(
    layer,
    batch_key,
    morphology_key,
    neighbors_key,
    embedding_keys,
    labels_key,
    categorical_covariate_keys,
    continuous_covariate_keys,
) -> list:
    out = [
        fields.LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
        fields.CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        fields.CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        fields.CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
        fields.NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
    ]
    for name, key in view_setup(morphology_key, embedding_keys).items():
        out.append(fields.ObsmField(view_registry_key(name), key))
    if neighbors_key is not None:
        out.append(fields.ObsmField(NEIGHBORS_REGISTRY_KEY, neighbors_key))
    return out


def check_mudata(mdata, modalities, setup: dict) -> dict:
    """Check a MuData and its ``modalities`` mapping; returns the normalised mapping."""
    if not isinstance(mdata, MuData):
        raise TypeError(f"setup_mudata needs a MuData, got {type(mdata).__name__}.")
    modalities = dict(modalities or {})
    if "morphology" in modalities:
        modalities["morphology_layer"] = modalities.pop("morphology")
    if "rna_layer" not in modalities:
        raise ValueError(
            "modalities must name the expression modality, e.g. modalities={'rna_layer': 'rna'}."
        )
    for arg, mod in modalities.items():
        if mod not in mdata.mod:
            raise KeyError(
                f"modalities['{arg}'] = '{mod}' is not a modality of the MuData "
                f"(modalities: {list(mdata.mod)})."
            )
    check_key_lists(setup["categorical_covariate_keys"], setup["continuous_covariate_keys"])
    check_mudata_inputs(
        mdata,
        modalities,
        setup["batch_key"],
        setup["labels_key"],
        setup["neighbors_key"],
        setup["categorical_covariate_keys"],
        setup["continuous_covariate_keys"],
    )
    check_counts(mdata.mod[modalities["rna_layer"]], setup["rna_layer"])
    morph_mod = modalities.get("morphology_layer")
    if morph_mod is not None:
        morph = mdata.mod[morph_mod]
        if morph.n_obs != mdata.n_obs or not np.array_equal(morph.obs_names, mdata.obs_names):
            raise ValueError(
                f"Modality '{morph_mod}' must have one row per spot of the MuData, in the same "
                "order; give spots without an image NaN rows instead of dropping them."
            )
        layer = setup["morphology_layer"]
        values = morph.layers[layer] if layer else morph.X
        check_finite_or_nan_rows(
            np.asarray(values.toarray() if sp.issparse(values) else values), morph_mod
        )
    return modalities


def mudata_fields(cls, modalities: dict, setup: dict) -> tuple[list, dict]:
    """The MuData fields of ``setup`` (the setup arguments) and the modalities record."""
    mods = cls._create_modalities_attr_dict(
        dict(modalities), {"setup_args": dict.fromkeys(_MUDATA_ARGS)}
    )
    default = mods.rna_layer
    out = [
        fields.MuDataLayerField(
            REGISTRY_KEYS.X_KEY,
            setup["rna_layer"],
            mod_key=mods.rna_layer,
            is_count_data=True,
            mod_required=True,
        ),
        fields.MuDataCategoricalObsField(
            REGISTRY_KEYS.BATCH_KEY, setup["batch_key"], mod_key=mods.batch_key or default
        ),
        fields.MuDataCategoricalObsField(
            REGISTRY_KEYS.LABELS_KEY, setup["labels_key"], mod_key=mods.labels_key or default
        ),
        fields.MuDataCategoricalJointObsField(
            REGISTRY_KEYS.CAT_COVS_KEY,
            setup["categorical_covariate_keys"],
            mod_key=mods.categorical_covariate_keys or default,
        ),
        fields.MuDataNumericalJointObsField(
            REGISTRY_KEYS.CONT_COVS_KEY,
            setup["continuous_covariate_keys"],
            mod_key=mods.continuous_covariate_keys or default,
        ),
    ]
    if modalities.get("morphology_layer") is not None:
        out.append(
            fields.MuDataLayerField(
                view_registry_key(MORPHOLOGY_VIEW),
                setup["morphology_layer"],
                mod_key=modalities["morphology_layer"],
                is_count_data=False,
                mod_required=True,
            )
        )
    if setup["neighbors_key"] is not None:
        out.append(
            fields.MuDataObsmField(
                NEIGHBORS_REGISTRY_KEY,
                setup["neighbors_key"],
                mod_key=mods.neighbors_key or default,
            )
        )
    return out, dict(mods)


def registered_views(adata_manager) -> dict[str, str]:
    """View name -> obsm key (or morphology modality layer) of a registered data set."""
    setup = adata_manager.registry["setup_args"]
    if "morphology_layer" in setup:  # MuData
        views = (
            {MORPHOLOGY_VIEW: setup["morphology_layer"] or "X"}
            if setup.get("morphology_mod")
            else {}
        )
        return {
            k: v for k, v in views.items() if view_registry_key(k) in adata_manager.data_registry
        }
    return view_setup(setup.get("morphology_key"), setup.get("embedding_keys"))


def view_moments(adata_manager, views, standardization: str, n_batch: int):
    """Width, centre and scale of each view (over all spots, or one row per sample)."""
    if standardization not in ("sample", "global"):
        raise ValueError(
            f"view_standardization={standardization!r}: pass 'sample' (centre and scale each view "
            "within each sample) or 'global'."
        )
    batch = adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)
    codes = np.asarray(batch).ravel().astype(np.int64)
    dims, means, stds = {}, {}, {}
    for name in views:
        values = np.asarray(
            adata_manager.get_from_registry(view_registry_key(name)), dtype=np.float64
        )
        present = ~np.isnan(values).any(1)
        if not present.any():
            # Only a query (set up from a reference registry) gets here: its view scaling is
            # replaced by the reference's when the reference weights are loaded.
            present = np.ones(len(values), dtype=bool)
            values = np.zeros_like(values)
        dims[name] = values.shape[1]
        mean, std = values[present].mean(0), values[present].std(0) + 1e-6
        if standardization == "sample":
            mean, std = np.tile(mean, (n_batch, 1)), np.tile(std, (n_batch, 1))
            for b in range(n_batch):
                rows = present & (codes == b)
                if rows.sum() >= MIN_SPOTS_PER_SAMPLE_MOMENTS:
                    mean[b] = values[rows].mean(0)
                    std[b] = values[rows].std(0) + 1e-6
        means[name] = torch.tensor(mean, dtype=torch.float32)
        stds[name] = torch.tensor(std, dtype=torch.float32)
    return dims, means, stds


def n_cats_per_cov(adata_manager):
    """Categories of each extra categorical covariate (``None`` without any)."""
    if REGISTRY_KEYS.CAT_COVS_KEY not in adata_manager.data_registry:
        return None
    return adata_manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY).n_cats_per_key


def build_module(
    model,
    module_kwargs: dict,
    *,
    n_latent,
    n_hidden,
    n_layers,
    dropout_rate,
    use_morphology,
    use_embeddings,
    use_niche,
    niche_weight,
    view_dropout,
    normalize_input,
    view_gating,
    view_standardization,
    spatial_context,
):
    """The module of ``model`` (a :class:`HistoVI` being built, arguments as there) and what
    ``__init__`` records with it: the setup record (``histovi_setup_``) and the summary."""
    manager = model.adata_manager
    setup = manager.registry["setup_args"]
    views = registered_views(manager)
    if not use_morphology:
        views.pop(MORPHOLOGY_VIEW, None)
    if not use_embeddings:
        views = {k: v for k, v in views.items() if k == MORPHOLOGY_VIEW}
    n_batch = model.summary_stats.n_batch
    view_dims, view_means, view_stds = view_moments(manager, views, view_standardization, n_batch)
    has_neighbors = NEIGHBORS_REGISTRY_KEY in manager.data_registry
    if use_niche and not has_neighbors:
        logger.info("No neighbors_key registered: training without the neighbourhood view.")
    n_neighbors = manager.get_from_registry(NEIGHBORS_REGISTRY_KEY).shape[1] if has_neighbors else 1
    module = model._module_cls(
        n_input=model.summary_stats.n_vars,
        n_batch=n_batch,
        view_dims=view_dims,
        view_means=view_means,
        view_stds=view_stds,
        n_latent=n_latent,
        n_hidden=n_hidden,
        n_layers=n_layers,
        dropout_rate=dropout_rate,
        use_niche=use_niche and has_neighbors,
        niche_weight=niche_weight,
        n_neighbors=n_neighbors,
        view_dropout=view_dropout,
        normalize_input=normalize_input,
        view_gating=bool(view_gating),
        n_cats_per_cov=n_cats_per_cov(manager),
        n_continuous_cov=model.summary_stats.get("n_extra_continuous_covs", 0),
        **module_kwargs,
    )
    spatial_context = bool(spatial_context) and has_neighbors
    # What a query must match (checked by prepare_query_anndata / load_query_data).
    uns = model.adata.uns.get(UNS_KEY, {}) if isinstance(model.adata, AnnData) else {}
    record = {
        "views": {name: views[name] for name in view_dims},
        "view_dims": view_dims,
        "n_neighbors": int(n_neighbors) if has_neighbors else None,
        "neighbors_key": setup.get("neighbors_key"),
        "batch_key": setup.get("batch_key"),
        "morphology_record": plain(uns.get("morphology")),
        "embedding_records": plain(uns.get("embeddings")),
        "spatial_neighbors_record": plain(uns.get("spatial_neighbors")),
        "spatial_context": spatial_context,
    }
    summary = (
        f"HistoVI: n_latent={n_latent}, views=expression"
        + "".join(f"+{v}" for v in view_dims)
        + (f"+niche(k={n_neighbors})" if use_niche and has_neighbors else "")
        + (", spatial context" if spatial_context else "")
        + f", n_batch={n_batch}"
    )
    return module, record, summary
