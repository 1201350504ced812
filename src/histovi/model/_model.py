"""HistoVI: the user-facing scvi-tools model (thin: data registration, training, outputs)."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager, fields
from scvi.model.base import (
    ArchesMixin,
    BaseModelClass,
    RNASeqMixin,
    UnsupervisedTrainingMixin,
    VAEMixin,
)
from scvi.nn import FCLayers

from .._constants import UNS_KEY
from .._validation import (
    check_counts,
    check_finite_or_nan_rows,
    check_indices,
    check_neighbors,
    get_counts,
    require_obs,
    require_obsm,
)
from ..data._anchors import AnchorCallback
from ..data._loader import NeighborhoodDataLoader, NeighborhoodDataSplitter
from ..data._spatial import SpatialPriorCallback, spatial_posterior
from ..module._module import NEIGHBORS_REGISTRY_KEY, HistoVAE, view_registry_key
from ._checks import (
    check_categorical_covariates,
    check_inference_adata,
    check_key_lists,
    check_labels_column,
    check_mudata_inputs,
    check_query_genes,
    query_neighbors_context,
)
from ._saving import (
    VERSIONS_ATTR,
    SavedReference,
    atomic_save,
    check_load_adata,
    current_versions,
    load_model,
    load_registry,
    read_saved_model,
    version_note,
    warn_if_other_version,
    write_model,
)
from ._training import HistoTrainingPlan, HistoTrainRunner, prepare_training

logger = logging.getLogger(__name__)

MORPHOLOGY_VIEW = "morphology"


#: Training budget of the default ``max_epochs``, in spot passes (spots x epochs): about 4,700
#: minibatch updates at ``batch_size=128``. Measured with ``benchmarks/integration.py
#: --curve``: the domain ARI peaks after a few thousand updates and then falls while the
#: validation ELBO still improves (the latent over-integrates), on the simulator and on her2st
#: alike; scVI's rule (8 million spot passes, 400 epochs below 20,000 spots) lies far past that
#: peak.
DEFAULT_SPOT_PASSES = 600_000


def default_max_epochs(n_spots: int) -> int:
    """Default ``max_epochs`` of :meth:`HistoVI.train`: ``DEFAULT_SPOT_PASSES / n_spots``,
    between 20 and 400 epochs."""
    return int(max(20, min(400, round(DEFAULT_SPOT_PASSES / max(int(n_spots), 1)))))


#: The KL weight's linear warm-up spans this many times the training length, so that it ends
#: near 0.22 whatever the study's size. scvi-tools' warm-up is a fixed 400 epochs: with the
#: epochs rule above it ended at 0.05 for studies above 30,000 spots and at 1 below 1,500, two
#: different models, and the spatial prior reads the encoders' evidence through that weight.
#: 0.22 is where it ended on every study the defaults were measured on (her2st: 90 of 400
#: epochs; the simulated studies: 96 of 400).
KL_WARMUP_FACTOR = 4.5


def default_kl_warmup_epochs(max_epochs: int) -> int:
    """Default ``n_epochs_kl_warmup`` of :meth:`HistoVI.train` (:data:`KL_WARMUP_FACTOR` times
    ``max_epochs``)."""
    return max(1, round(KL_WARMUP_FACTOR * int(max_epochs)))


def _view_setup(morphology_key, embedding_keys) -> dict[str, str]:
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


class HistoVI(RNASeqMixin, VAEMixin, ArchesMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """One latent space for spatial spots from expression, morphology and neighbourhood.

    Parameters
    ----------
    adata
        AnnData (or MuData) registered with :meth:`setup_anndata` (or :meth:`setup_mudata`).
    n_latent, n_hidden, n_layers, dropout_rate
        Network sizes.
    use_morphology
        Use the morphology view when one was registered (``False`` for the ablation).
    use_embeddings
        Use the extra embedding views registered with ``embedding_keys``.
    use_niche
        Reconstruct each spot's neighbourhood counts (needs ``neighbors_key`` at setup). Worth
        +0.02 ARI on her2st (seeds 0-2) and on the simulator (seeds 0-1), for about a third
        more training time (benchmarks/README.md).
    niche_weight
        Weight of the neighbourhood reconstruction, per neighbour.
    cycle_weight
        Weight of the latent cycle-consistency term (as in sysVI): each spot's latent is decoded
        (expression and every embedding view) as if it came from another, random sample,
        re-encoded with that sample's covariates and asked to land on the same latent. 0
        (default) turns it off. It aligns samples faster, which rescues a run too short for the
        batch-conditioned encoder to do it alone, but at the default training length it did not
        help and weight 5 over-mixed her2st's patients (ARI 0.28 vs 0.35 without it, seeds 0-2;
        benchmarks/README.md). Try 1-5 when patients still form their own clusters and you
        cannot train longer.
    alignment_weight
        Weight of an adversarial sample classifier on the latent (gradient reversal); 0 (default)
        turns it off. It aligns the samples' *whole* latent distributions, so on studies whose
        patients differ in tissue composition it over-mixes (her2st: ARI 0.26 alone, 0.10-0.13
        together with the cycle term, patients fully mixed); it helps on the simulator, whose
        patients share most domains.
    anchor_weight
        Weight of a pull towards mutual nearest neighbours in other samples (MNN anchors,
        recomputed every epoch after the first 20 %, as in STAligner); 0 (default) turns it off.
        Measured on her2st it over-mixes patients as the adversary does.
    view_dropout
        Share of spots whose morphology / embedding views are hidden from the encoder at each
        training step (they are still reconstructed): spots and samples without an image then
        embed like those with one (modality dropout, as in multimodal VAEs). It also keeps the
        expression expert able to place a spot alone, which a weak or misleading view needs:
        without it ARI fell on 5 of 7 benchmark studies (by 0.10 with a misleading view;
        ``benchmarks/README.md``, "Defaults checked on every scenario").
    normalize_input
        Scale each spot's counts to 10,000 before the log transform that feeds the encoders
        (default), so that sequencing depth, which differs tenfold between her2st's patients,
        does not enter the latent; the decoders still see the observed library. ``False`` gives
        scVI's encoder input (log of the raw counts), which models saved before this option
        existed used; they load back with it.
    view_gating
        Scale each view expert's precision by a gate per latent dimension that learns only from
        how well the latent explains the counts (default): a weak or section-shifted image view
        is gated out instead of overriding the expression (docs: "How HistoVI combines the
        views"). ``False``: the plain product of experts.
    view_standardization
        ``"global"`` (default): centre and scale each view feature over all spots; ``"sample"``:
        within each sample (removes stain shifts before the encoder, and a section's real
        composition difference with them).
    spatial_prior
        After training, fit a spatial prior (``N(0, I) x N(neighbours' mean latent,
        1 / lambda)``, lambda per latent dimension by empirical Bayes) so that
        :meth:`get_latent_representation` gives each spot's posterior given its own data and its
        neighbours' (default when a neighbour graph is registered; docs: "How HistoVI combines
        the views"). Training itself uses the standard prior.
    **module_kwargs
        Passed to :class:`~histovi.module.HistoVAE`, e.g. ``encode_covariates=False`` or
        ``view_agreement_weight=1``.

    Examples
    --------
    >>> adata = histovi.datasets.simulate()
    >>> histovi.pp.spatial_neighbors(adata, sample_key="sample")
    >>> histovi.HistoVI.setup_anndata(adata, layer="counts", batch_key="sample",
    ...     morphology_key="X_morphology", neighbors_key="spatial_neighbors")
    >>> model = histovi.HistoVI(adata)
    >>> model.train()
    >>> adata.obsm["X_histovi"] = model.get_latent_representation()
    """

    _module_cls = HistoVAE
    _data_splitter_cls = NeighborhoodDataSplitter
    # stops on a NaN / inf loss before the optimizer step, naming the view (model/_training.py)
    _training_plan_cls = HistoTrainingPlan
    _train_runner_cls = HistoTrainRunner
    # Inference loads the neighbours too (the niche encoder expert needs their counts).
    _data_loader_cls = NeighborhoodDataLoader

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        use_morphology: bool = True,
        use_embeddings: bool = True,
        use_niche: bool = True,
        niche_weight: float = 1.0,
        cycle_weight: float = 0.0,
        alignment_weight: float = 0.0,
        anchor_weight: float = 0.0,
        view_dropout: float = 0.3,
        normalize_input: bool = True,
        view_gating: bool = True,
        view_standardization: str = "global",
        spatial_prior: bool = True,
        **module_kwargs,
    ):
        super().__init__(adata)
        if adata is None:
            raise ValueError("HistoVI needs a registered AnnData: HistoVI(adata).")
        for name, value in (
            ("cycle_weight", cycle_weight),
            ("alignment_weight", alignment_weight),
            ("anchor_weight", anchor_weight),
            ("niche_weight", niche_weight),
        ):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r}: pass a finite weight >= 0 (0 turns it off).")
        if not isinstance(normalize_input, bool | np.bool_):
            raise ValueError(
                f"normalize_input={normalize_input!r}: pass True (depth-normalised encoder input, "
                "the default) or False (raw log counts, as scVI)."
            )
        if not 0 <= view_dropout <= 1:
            raise ValueError(f"view_dropout={view_dropout!r}: pass a share in [0, 1].")
        setup = self.adata_manager.registry["setup_args"]
        views = self._registered_views()
        if not use_morphology:
            views.pop(MORPHOLOGY_VIEW, None)
        if not use_embeddings:
            views = {k: v for k, v in views.items() if k == MORPHOLOGY_VIEW}
        if view_standardization not in ("sample", "global"):
            raise ValueError(
                f"view_standardization={view_standardization!r}: pass 'sample' (centre and scale "
                "each view within each sample) or 'global'."
            )
        n_batch = self.summary_stats.n_batch
        batch_codes = (
            np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY))
            .ravel()
            .astype(np.int64)
        )
        view_dims, view_means, view_stds = {}, {}, {}
        for name in views:
            values = np.asarray(
                self.adata_manager.get_from_registry(view_registry_key(name)), dtype=np.float64
            )
            present = ~np.isnan(values).any(1)
            if not present.any():
                # Only a query (set up from a reference registry) gets here: its view scaling is
                # replaced by the reference's when the reference weights are loaded.
                present = slice(None)
                values = np.zeros_like(values)
            view_dims[name] = values.shape[1]
            mean, std = values[present].mean(0), values[present].std(0) + 1e-6
            if view_standardization == "sample":
                mean, std = _per_sample_moments(values, present, batch_codes, n_batch, mean, std)
            view_means[name] = torch.tensor(mean, dtype=torch.float32)
            view_stds[name] = torch.tensor(std, dtype=torch.float32)

        has_neighbors = NEIGHBORS_REGISTRY_KEY in self.adata_manager.data_registry
        if use_niche and not has_neighbors:
            logger.info("No neighbors_key registered: training without the neighbourhood view.")
        n_neighbors = (
            self.adata_manager.get_from_registry(NEIGHBORS_REGISTRY_KEY).shape[1]
            if has_neighbors
            else 1
        )
        cat_info = self.adata_manager.data_registry.get(REGISTRY_KEYS.CAT_COVS_KEY)
        n_cats_per_cov = (
            self.adata_manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY).n_cats_per_key
            if cat_info is not None
            else None
        )
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_batch=self.summary_stats.n_batch,
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
            cycle_weight=cycle_weight,
            alignment_weight=alignment_weight,
            anchor_weight=anchor_weight,
            view_dropout=view_dropout,
            normalize_input=normalize_input,
            spatial_prior=bool(spatial_prior) and has_neighbors,
            view_gating=bool(view_gating),
            n_cats_per_cov=n_cats_per_cov,
            n_continuous_cov=self.summary_stats.get("n_extra_continuous_covs", 0),
            **module_kwargs,
        )
        # What a query must match (checked by prepare_query_anndata / load_query_data).
        uns = self.adata.uns.get(UNS_KEY, {}) if isinstance(self.adata, AnnData) else {}
        self.histovi_setup_ = {
            "views": {name: views[name] for name in view_dims},
            "view_dims": view_dims,
            "n_neighbors": int(n_neighbors) if has_neighbors else None,
            "neighbors_key": setup.get("neighbors_key"),
            "batch_key": setup.get("batch_key"),
            "morphology_record": _plain(uns.get("morphology")),
            "embedding_records": _plain(uns.get("embeddings")),
            "spatial_neighbors_record": _plain(uns.get("spatial_neighbors")),
            "normalize_input": bool(normalize_input),
        }
        self._model_summary_string = (
            f"HistoVI: n_latent={n_latent}, views=expression"
            + "".join(f"+{v}" for v in view_dims)
            + (f"+niche(k={n_neighbors})" if use_niche and has_neighbors else "")
            + f", cycle_weight={cycle_weight}, alignment_weight={alignment_weight}"
            + f", normalize_input={normalize_input}"
            + (", view_gating" if view_gating and view_dims else "")
            + (", spatial_prior" if spatial_prior and has_neighbors else "")
            + (f", anchor_weight={anchor_weight}" if anchor_weight else "")
            + f", n_batch={self.summary_stats.n_batch}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ registration
    def _registered_views(self) -> dict[str, str]:
        setup = self.adata_manager.registry["setup_args"]
        if "morphology_layer" in setup:  # MuData
            views = (
                {MORPHOLOGY_VIEW: setup["morphology_layer"] or "X"}
                if setup.get("morphology_mod")
                else {}
            )
            return {
                k: v
                for k, v in views.items()
                if view_registry_key(k) in self.adata_manager.data_registry
            }
        return _view_setup(setup.get("morphology_key"), setup.get("embedding_keys"))

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        morphology_key: str | None = None,
        neighbors_key: str | None = None,
        embedding_keys: dict[str, str] | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ):
        """Register an AnnData for HistoVI.

        Parameters
        ----------
        adata
            Spots of all samples. Not modified, apart from what every scvi-tools model adds: the
            registry ids in ``uns`` and the encoded ``obs['_scvi_batch']`` /
            ``obs['_scvi_labels']`` columns.
        layer
            Layer with raw counts (``None``: ``adata.X``).
        batch_key
            ``adata.obs`` column of the sample (section); the unit that alignment removes.
        morphology_key
            ``adata.obsm`` key of the morphology embedding; NaN rows mark spots without an image.
        neighbors_key
            ``adata.obsm`` key of the neighbour index matrix from
            :func:`histovi.pp.spatial_neighbors`; enables the neighbourhood view.
        embedding_keys
            Extra embedding views, name -> ``adata.obsm`` key (e.g. ``{"scgpt": "X_scgpt"}``).
        labels_key
            Optional labels (kept for label transfer and metrics).
        categorical_covariate_keys, continuous_covariate_keys
            Extra covariates (e.g. patient, technology) given to every encoder and decoder.
        """
        if not isinstance(adata, AnnData):
            raise TypeError(
                f"setup_anndata needs an AnnData, got {type(adata).__name__}: use "
                "HistoVI.setup_mudata for MuData, or histovi.io.from_spatialdata for SpatialData."
            )
        _check_setup_inputs(
            adata,
            layer,
            batch_key,
            morphology_key,
            neighbors_key,
            embedding_keys,
            labels_key,
            categorical_covariate_keys,
            continuous_covariate_keys,
            # a query (set up from a reference's registry) may lack a view entirely
            allow_missing_views="source_registry" in kwargs,
            allow_missing_labels=bool(kwargs.get("allow_missing_labels")),
        )
        setup_method_args = cls._get_setup_method_args(**locals())
        anndata_fields = [
            fields.LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            fields.CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            fields.CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            fields.CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            fields.NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        for name, key in _view_setup(morphology_key, embedding_keys).items():
            anndata_fields.append(fields.ObsmField(view_registry_key(name), key))
        if neighbors_key is not None:
            anndata_fields.append(fields.ObsmField(NEIGHBORS_REGISTRY_KEY, neighbors_key))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
        batch_key: str | None = None,
        morphology_layer: str | None = None,
        neighbors_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ):
        """Register a MuData whose morphology embedding is its own modality.

        Parameters
        ----------
        mdata
            MuData with an expression modality and, optionally, a morphology modality whose ``X``
            (or ``layers[morphology_layer]``) holds one embedding row per spot (NaN = no image).
        rna_layer
            Layer of the expression modality with raw counts (``None``: its ``X``).
        modalities
            Setup argument -> modality name, e.g. ``{"rna_layer": "rna", "batch_key": "rna",
            "morphology": "morph", "neighbors_key": "rna"}`` (``"morphology"`` is an alias of
            ``"morphology_layer"``).
        """
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
        rna = mdata.mod[modalities["rna_layer"]]
        check_counts(rna, rna_layer)
        check_key_lists(categorical_covariate_keys, continuous_covariate_keys)
        check_mudata_inputs(
            mdata,
            modalities,
            batch_key,
            labels_key,
            neighbors_key,
            categorical_covariate_keys,
            continuous_covariate_keys,
        )
        morph_mod = modalities.get("morphology_layer")
        if morph_mod is not None:
            morph = mdata.mod[morph_mod]
            if morph.n_obs != mdata.n_obs or not np.array_equal(morph.obs_names, mdata.obs_names):
                raise ValueError(
                    f"Modality '{morph_mod}' must have one row per spot of the MuData, in the same "
                    "order; give spots without an image NaN rows instead of dropping them."
                )
            values = morph.layers[morphology_layer] if morphology_layer else morph.X
            check_finite_or_nan_rows(
                np.asarray(values.toarray() if sp.issparse(values) else values), morph_mod
            )
        morphology_mod = morph_mod  # recorded in the setup args
        setup_method_args = cls._get_setup_method_args(**locals())
        setup_method_args["setup_args"].pop("modalities", None)
        mods = cls._create_modalities_attr_dict(
            {k: v for k, v in modalities.items()},
            {
                "setup_args": {
                    k: None
                    for k in (
                        "rna_layer",
                        "batch_key",
                        "morphology_layer",
                        "neighbors_key",
                        "labels_key",
                        "categorical_covariate_keys",
                        "continuous_covariate_keys",
                    )
                }
            },
        )
        setup_method_args["setup_args"]["modalities"] = dict(mods)
        default_mod = mods.rna_layer
        mudata_fields = [
            fields.MuDataLayerField(
                REGISTRY_KEYS.X_KEY,
                rna_layer,
                mod_key=mods.rna_layer,
                is_count_data=True,
                mod_required=True,
            ),
            fields.MuDataCategoricalObsField(
                REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=mods.batch_key or default_mod
            ),
            fields.MuDataCategoricalObsField(
                REGISTRY_KEYS.LABELS_KEY, labels_key, mod_key=mods.labels_key or default_mod
            ),
            fields.MuDataCategoricalJointObsField(
                REGISTRY_KEYS.CAT_COVS_KEY,
                categorical_covariate_keys,
                mod_key=mods.categorical_covariate_keys or default_mod,
            ),
            fields.MuDataNumericalJointObsField(
                REGISTRY_KEYS.CONT_COVS_KEY,
                continuous_covariate_keys,
                mod_key=mods.continuous_covariate_keys or default_mod,
            ),
        ]
        if morph_mod is not None:
            mudata_fields.append(
                fields.MuDataLayerField(
                    view_registry_key(MORPHOLOGY_VIEW),
                    morphology_layer,
                    mod_key=morph_mod,
                    is_count_data=False,
                    mod_required=True,
                )
            )
        if neighbors_key is not None:
            mudata_fields.append(
                fields.MuDataObsmField(
                    NEIGHBORS_REGISTRY_KEY, neighbors_key, mod_key=mods.neighbors_key or default_mod
                )
            )
        adata_manager = AnnDataManager(fields=mudata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    def _validate_anndata(self, adata=None, copy_if_view=True):
        check_inference_adata(self, adata if adata is not None else self.adata)
        if adata is not None and isinstance(adata, AnnData) and adata is not self.adata:
            setup = self.adata_manager.registry["setup_args"]
            check_counts(adata, setup.get("layer"))
            for name, key in self.histovi_setup_["views"].items():
                if key in adata.obsm:
                    values = require_obsm(adata, key, "")
                    check_finite_or_nan_rows(values, key)
                    if values.shape[1] != self.histovi_setup_["view_dims"][name]:
                        raise ValueError(
                            f"adata.obsm['{key}'] has {values.shape[1]} columns but the model's "
                            f"'{name}' view has {self.histovi_setup_['view_dims'][name]}: embed it "
                            "with the reference's settings (histovi.pp.embed_morphology(..., "
                            "reference=...))."
                        )
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _make_data_loader(self, adata, indices=None, *args, **kwargs):
        # every output method of scvi-tools (expression, ELBO, samples ...) takes indices=:
        # a scalar or a 2-D array is refused here with the fix, not deep in the loader
        check_indices(indices, adata.n_obs)
        return super()._make_data_loader(adata, indices, *args, **kwargs)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int = 128,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        checkpoint_dir: str | None = None,
        **trainer_kwargs,
    ):
        """Train the model (arguments as :meth:`scvi.model.SCVI.train`).

        ``checkpoint_dir``: save a Lightning checkpoint there after every epoch
        (``last.ckpt``); if one is already there, training resumes from it (same model settings
        and data) instead of starting over, so an interrupted run loses at most one epoch.

        The KL weight warms up linearly over :data:`KL_WARMUP_FACTOR` times ``max_epochs``
        (unless ``plan_kwargs`` sets ``n_epochs_kl_warmup`` or ``n_steps_kl_warmup``), so it ends
        near 0.22 for every study size; scVI's fixed 400-epoch warm-up ended anywhere between
        0.05 and 1.

        ``max_epochs`` defaults to :func:`default_max_epochs`: 600,000 spot passes
        (``round(600_000 / n_spots)``, between 20 and 400 epochs), so that small and large
        studies get a comparable number of updates. That is fewer than scVI's rule (400 epochs
        below 20,000 spots): trained that long, the latent over-integrates and domains blur
        (her2st: ARI 0.21 after 400 epochs, about 0.28 after 90; see
        ``benchmarks/integration.py --curve``).
        A query model's default is a tenth of the reference's training work (spots x epochs),
        between 10 and 200 epochs. Lightning arguments (``strategy``, ``callbacks``, ``enable_checkpointing``,
        ``default_root_dir``, ``ckpt_path`` ...) pass through, so long runs can checkpoint and
        resume. Query models (from :meth:`load_query_data`) train with weight decay 0 so that the
        frozen reference weights stay bit-identical.
        """
        n = self.adata.n_obs
        record = self.histovi_setup_
        if (
            max_epochs is None
            and getattr(self, "is_query_", False)
            and record.get("train_spot_epochs")
        ):
            # A query trains a handful of covariate columns: a tenth of the reference's work
            # (spots x epochs) is plenty, and keeps mapping a patient cheap.
            max_epochs = int(max(10, min(200, round(0.1 * record["train_spot_epochs"] / n))))
        elif max_epochs is None:
            max_epochs = default_max_epochs(n)
        plan_kwargs = dict(plan_kwargs or {})
        if "n_epochs_kl_warmup" not in plan_kwargs and "n_steps_kl_warmup" not in plan_kwargs:
            plan_kwargs["n_epochs_kl_warmup"] = default_kl_warmup_epochs(max_epochs)
        if getattr(self, "is_query_", False):
            plan_kwargs.setdefault("weight_decay", 0.0)
        if trainer_kwargs.get("strategy") in ("ddp", "ddp_spawn", "ddp_notebook"):
            # parts of scvi-tools' decoders (dispersion / dropout heads) and the opt-in terms do
            # not take part in every loss: DDP must be told, or it stops at the first step
            trainer_kwargs["strategy"] += "_find_unused_parameters_true"
        # argument checks, checkpoint and resume, stop on divergence (model/_training.py)
        trainer_kwargs.update(
            prepare_training(self, max_epochs, batch_size, checkpoint_dir, trainer_kwargs)
        )
        if getattr(self.module, "spatial_prior", False) and not getattr(self, "is_query_", False):
            # fitted to the trained encoders; a query keeps the reference's, as every weight
            callbacks = list(trainer_kwargs.get("callbacks") or [])
            callbacks.append(SpatialPriorCallback(self.adata_manager))
            trainer_kwargs["callbacks"] = callbacks
        if not getattr(self.module, "use_niche", False):
            # no niche decoder: the loaders need not gather the neighbours' counts
            splitter_kwargs = dict(trainer_kwargs.pop("datasplitter_kwargs", None) or {})
            splitter_kwargs.setdefault("gather_niche", False)
            trainer_kwargs["datasplitter_kwargs"] = splitter_kwargs
        if getattr(self.module, "anchor_weight", 0) > 0 and not getattr(self, "is_query_", False):
            callbacks = list(trainer_kwargs.get("callbacks") or [])
            callbacks.append(AnchorCallback())
            trainer_kwargs["callbacks"] = callbacks
        out = super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            **trainer_kwargs,
        )
        if not getattr(self, "is_query_", False):
            record["train_spot_epochs"] = record.get("train_spot_epochs", 0) + n * max_epochs
        return out

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        spatial: bool | str | None = None,
        return_dist: bool = False,
        **kwargs,
    ) -> np.ndarray:
        """Latent representation (posterior mean by default) of every spot, shape (n, n_latent).

        ``indices`` are row numbers of ``adata`` (default: the registered AnnData).

        ``spatial`` (default ``"spot"`` when the model has a spatial prior, i.e. neighbours were
        registered; ``False`` otherwise) gives each spot's posterior given its own data *and*
        its neighbours' (the spatial prior fitted after training, :mod:`histovi.data._spatial`):

        * ``"spot"`` (or ``True``): the encoders' evidence as it is; a spot borrows little from
          its neighbours, the more the fewer counts it has. At or above ``False`` on seven of the
          eight benchmark studies.
        * ``"domain"``: the evidence tempered by the KL weight the encoders were trained with
          (what an empirical-Bayes fit of that weight finds too): spots borrow about as much
          from their neighbours as from themselves. For smooth, layered tissue (cortex): +0.04
          ARI on the layered simulator, +0.07 with one donor and four sections, but -0.03 on
          her2st and -0.04 with an image view that misleads within sections.
        * ``False``: the posterior from the spot's own data alone.

        The neighbours of ``indices`` are embedded as well, so a spot gets the same latent
        whether it is embedded alone or with the whole data set.
        """
        check_indices(indices, (adata if adata is not None else self.adata).n_obs)
        has_prior = getattr(self.module, "spatial_prior", False)
        if spatial is None:
            spatial = has_prior
        scale = "spot" if spatial is True else spatial
        if scale not in (False, "spot", "domain"):
            raise ValueError(f"spatial={spatial!r}: pass 'spot', 'domain', True or False.")
        if scale and not has_prior:
            raise ValueError(
                f"spatial={spatial!r} needs a model with a spatial prior: register the neighbour "
                "graph (setup_anndata(..., neighbors_key=...)) and keep spatial_prior=True."
            )
        if not scale or kwargs.get("dataloader") is not None:
            return super().get_latent_representation(
                adata=adata,
                indices=indices,
                give_mean=give_mean,
                batch_size=batch_size,
                return_dist=return_dist,
                **kwargs,
            )
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata)
        rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        mean, var = spatial_posterior(
            self.module, manager, rows.astype(np.int64), scale, batch_size=batch_size or 1024
        )
        if return_dist:
            return mean, var
        if give_mean:
            return mean
        rng = np.random.default_rng(int(scvi.settings.seed or 0))
        return (mean + np.sqrt(var) * rng.standard_normal(mean.shape)).astype(np.float32)

    # ------------------------------------------------------------------ reference mapping
    @classmethod
    def prepare_query_anndata(
        cls,
        adata: AnnData,
        reference_model: HistoVI | str,
        compute_neighbors: bool = True,
    ) -> AnnData:
        """Return a copy of ``adata`` laid out like the reference, ready for :meth:`load_query_data`.

        * genes reordered to the reference's; missing genes zero-filled (with a warning naming how
          many), extra genes dropped;
        * views the reference used but the query lacks are added as NaN (missing) with a warning;
          views whose width or recorded encoder differ from the reference are refused;
        * spatial neighbours computed within each query sample with the reference's settings when
          the reference used them and the query has none.
        """
        if not isinstance(adata, AnnData):
            raise TypeError(f"prepare_query_anndata needs an AnnData, got {type(adata).__name__}.")
        ref = _ReferenceInfo(reference_model)
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
                query.obsm[key] = np.full(
                    (query.n_obs, record["view_dims"][name]), np.nan, np.float32
                )
            elif np.asarray(query.obsm[key]).shape[1] != record["view_dims"][name]:
                raise ValueError(
                    f"adata.obsm['{key}'] has {np.asarray(query.obsm[key]).shape[1]} columns, the "
                    f"reference's '{name}' view has {record['view_dims'][name]}: embed the query with "
                    "histovi.pp.embed_morphology(query, reference=reference_adata)."
                )
        _check_view_records(query, record)
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
            elif (
                nkey in query.obsm
                and np.asarray(query.obsm[nkey]).shape[1] != record["n_neighbors"]
            ):
                raise ValueError(
                    f"adata.obsm['{nkey}'] has {np.asarray(query.obsm[nkey]).shape[1]} neighbours per "
                    f"spot, the reference used {record['n_neighbors']}: recompute with "
                    f"histovi.pp.spatial_neighbors(query, n_neighbors={record['n_neighbors']})."
                )
        return query

    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model: HistoVI | str, **kwargs) -> HistoVI:
        """Map a query into a trained reference (scArches).

        Only the columns of the covariate one-hot inputs that belong to the query's new categories
        train; every reference weight, including the reference's covariate columns, is frozen,
        so the reference's latent is unchanged bit for bit. Run :meth:`prepare_query_anndata` first.
        """
        if isinstance(reference_model, os.PathLike):
            reference_model = str(reference_model)
        ref = _ReferenceInfo(reference_model)
        record = ref.record
        check_query_genes(adata, ref.var_names)
        for name, key in record["views"].items():
            if key not in adata.obsm:
                raise KeyError(
                    f"adata.obsm['{key}'] ('{name}' view of the reference) not found: run "
                    "HistoVI.prepare_query_anndata(query, reference_model) first."
                )
        _check_view_records(adata, record)
        # a folder goes to scvi-tools as the model it holds, read safely (scvi-tools would
        # unpickle a folder's file with weights_only=False)
        source = SavedReference(ref.saved) if ref.saved is not None else reference_model
        model = super().load_query_data(adata, source, **kwargs)
        _restore_covariate_columns(model.module, ref.state_dict, ref.cat_list)
        # The adversary was trained on the reference batches only; aligning a lone query batch
        # against frozen reference batches is not what it learnt, so it is off for queries.
        model.module.alignment_weight = 0.0
        model.is_query_ = True
        # the reference's record (restored by scvi-tools), not shared with the reference object
        model.histovi_setup_ = copy.deepcopy(model.histovi_setup_)
        _restore_encoder_input(model)
        return model

    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the model (see :meth:`scvi.model.base.BaseModelClass.save`), atomically.

        The files are written into a temporary folder beside ``dir_path``, flushed to disk and
        then moved into ``dir_path`` (the model file last): a crash while saving leaves the
        model saved there before complete and loadable. The versions of histovi, scvi-tools and
        torch are saved with the model, so :meth:`load` can say what differs.
        """
        setattr(self, VERSIONS_ATTR, current_versions())
        # histovi's safe format (tensors and plain values), not scvi-tools' pickle
        atomic_save(
            lambda path, **kw: write_model(self, path, **kw),
            dir_path,
            prefix,
            overwrite,
            save_anndata=save_anndata,
            **kwargs,
        )

    @classmethod
    def load(cls, dir_path, adata=None, **kwargs) -> HistoVI:
        """Load a saved model (see :meth:`scvi.model.base.BaseModelClass.load`).

        The folder is checked first; each problem is one error naming the file and the fix:
        the folder or ``model.pt`` missing, the file corrupted or cut short, a model of another
        class, ``adata`` with other genes or genes in another order than the model's (which
        scvi-tools only warns about), weights that do not fit this version of histovi (with the
        versions that saved the model). A model saved with another histovi version loads with a
        warning.

        Loading never runs code from the folder: ``model.pt`` is read with
        ``torch.load(weights_only=True)`` (histovi's safe format); a file that needs more (a
        crafted file, or a model saved by histovi before that format) is refused with the fix
        (:func:`histovi.model.convert_saved_model` for files you trust).
        """
        saved = read_saved_model(dir_path, kwargs.get("prefix"))
        check_load_adata(adata, saved, dir_path)
        warn_if_other_version(saved, dir_path)
        try:
            model = load_model(cls, dir_path, adata=adata, saved=saved, **kwargs)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            detail = " ".join(str(err).split())[:400]
            raise ValueError(
                f"The weights saved in {dir_path} do not fit this version's HistoVI"
                f"{version_note(saved)}: {detail}. Load it with the histovi version that saved "
                "it."
            ) from err
        _restore_encoder_input(model)
        return model

    # scvi-tools' readers of a saved folder unpickle its file (weights_only=False): read safely
    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict:
        """The registry saved with a HistoVI model, read without running code."""
        return load_registry(dir_path, prefix)

    @staticmethod
    def view_setup_args(dir_path: str, prefix: str | None = None) -> None:
        """Print the setup arguments of a saved HistoVI model (read without running code)."""
        from scvi.data import AnnDataManager

        AnnDataManager.view_setup_method_args(load_registry(dir_path, prefix))

    @staticmethod
    def prepare_query_mudata(mdata, reference_model, **kwargs):
        """scvi-tools' ``prepare_query_mudata``; a saved folder is read without running code."""
        if isinstance(reference_model, str | os.PathLike):
            reference_model = SavedReference(read_saved_model(reference_model))
        return ArchesMixin.prepare_query_mudata(mdata, reference_model, **kwargs)

    @classmethod
    def convert_legacy_save(cls, *args, **kwargs):
        """Not for HistoVI: its models were never saved in scvi-tools' format before 0.15 (see
        :func:`histovi.model.convert_saved_model` for models of earlier histovi releases)."""
        raise NotImplementedError(
            "HistoVI.convert_legacy_save converts scvi-tools < 0.15 files, which no HistoVI was "
            "saved as. For a model saved by an earlier histovi, use "
            "histovi.model.convert_saved_model(old_dir, new_dir, trust_pickle=True) on files "
            "you trust."
        )


# ---------------------------------------------------------------------- helpers


#: A sample needs this many spots with a view for its own centring and scaling of that view.
MIN_SPOTS_PER_SAMPLE_MOMENTS = 20


def _per_sample_moments(values, present, batch_codes, n_batch, mean, std):
    """Mean and sd of a view within each sample (``n_batch x dim``); samples with too few
    spots with the view fall back to the moments of all spots."""
    means = np.tile(mean, (n_batch, 1))
    stds = np.tile(std, (n_batch, 1))
    for b in range(n_batch):
        rows = present & (batch_codes == b)
        if rows.sum() >= MIN_SPOTS_PER_SAMPLE_MOMENTS:
            means[b] = values[rows].mean(0)
            stds[b] = values[rows].std(0) + 1e-6
    return means, stds


def _restore_encoder_input(model: HistoVI) -> None:
    """Give a loaded model the encoder input it was trained with.

    scvi-tools rebuilds a loaded model with today's defaults for arguments its saved
    ``init_params_`` lack; models saved before ``normalize_input`` existed encoded raw log counts.
    """
    model.module.normalize_input = bool(model.histovi_setup_.get("normalize_input", False))


def _plain(value):
    """uns entries can be nested mappings / arrays; keep a plain, picklable copy."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


class _ReferenceInfo:
    """What query mapping needs from a reference given as a model or a saved-model folder."""

    def __init__(self, reference_model):
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
        elif isinstance(reference_model, HistoVI):
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


def _check_view_records(query: AnnData, record: dict) -> None:
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


def _restore_covariate_columns(module, ref_state: dict, ref_cats: list[int]) -> None:
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


def _check_setup_inputs(
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
    for name, key in _view_setup(morphology_key, embedding_keys).items():
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
