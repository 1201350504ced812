"""HistoVI: the user-facing scvi-tools model, thin: its methods delegate to the modules beside
it (``_setup``, ``_checks``, ``_training``, ``_spatial``, ``_query``, ``_saving``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from anndata import AnnData
from mudata import MuData
from scvi.data import AnnDataManager
from scvi.model.base import (
    ArchesMixin,
    BaseModelClass,
    RNASeqMixin,
    UnsupervisedTrainingMixin,
    VAEMixin,
)

from .._quiet import quiet_libraries
from .._validation import check_indices
from ..data._loader import NeighborhoodDataLoader, NeighborhoodDataSplitter
from ..module._module import HistoVAE
from ._checks import check_model_adata, check_model_args, check_setup_inputs
from ._query import load_query, prepare_query
from ._saving import SafeLoadingMixin, load_checked, save_model
from ._setup import anndata_fields, build_module, check_mudata, mudata_fields
from ._spatial import latent_representation
from ._training import (  # noqa: F401 (the epochs rules, importable from here as before)
    DEFAULT_SPOT_PASSES,
    KL_WARMUP_FACTOR,
    HistoTrainingPlan,
    HistoTrainRunner,
    default_kl_warmup_epochs,
    default_max_epochs,
    record_training,
    training_kwargs,
)


class HistoVI(
    SafeLoadingMixin,
    RNASeqMixin,
    VAEMixin,
    ArchesMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """One latent space for spatial spots from expression, morphology and neighbourhood.

    Each spot's own latent comes from its counts and views (a product of experts; the niche
    decoder makes it predictive of the spot's surroundings). :meth:`get_latent_representation`
    returns the *domain latent*: the own latents propagated over the spatial graph with the
    neighbours' share fitted to the study after training (docs: "How HistoVI combines the
    views and the neighbourhood").

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
        Reconstruct each spot's neighbourhood counts (needs ``neighbors_key`` at setup).
    niche_weight
        Weight of the neighbourhood reconstruction, per neighbour.
    view_dropout
        Share of spots whose morphology / embedding views are hidden from the encoder at each
        training step (they are still reconstructed): spots and samples without an image then
        embed like those with one (modality dropout, as in multimodal VAEs).
    normalize_input
        Scale each spot's counts to 10,000 before the log transform that feeds the encoders
        (default), so that sequencing depth does not enter the latent; the decoders still see the
        observed library. ``False`` gives scVI's encoder input (log of the raw counts).
    view_gating
        Scale each view expert's precision by a gate per latent dimension that learns only from
        how well the latent explains the counts (default): a weak or section-shifted view is
        gated out instead of overriding the expression. ``False``: the plain product of experts.
    view_standardization
        ``"global"`` (default): centre and scale each view feature over all spots; ``"sample"``:
        within each sample (removes stain shifts before the encoder, and a section's real
        composition difference with them).
    spatial_context
        Fit the neighbours' share of the domain latent after training (default when a
        neighbour graph is registered); ``False``: the latent is each spot's own.
    **module_kwargs
        Passed to :class:`~histovi.module.HistoVAE`, e.g. ``encode_covariates=False``.

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
        view_dropout: float = 0.3,
        normalize_input: bool = True,
        view_gating: bool = True,
        view_standardization: str = "global",
        spatial_context: bool = True,
        **module_kwargs,
    ):
        super().__init__(adata)
        check_model_args(adata, niche_weight, normalize_input, view_dropout)
        # views, their scaling, the neighbours and the record a query must match (model/_setup.py)
        self.module, self.histovi_setup_, self._model_summary_string = build_module(
            self, module_kwargs, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers,
            dropout_rate=dropout_rate, use_morphology=use_morphology,
            use_embeddings=use_embeddings, use_niche=use_niche, niche_weight=niche_weight,
            view_dropout=view_dropout, normalize_input=normalize_input, view_gating=view_gating,
            view_standardization=view_standardization, spatial_context=spatial_context,
        )  # fmt: skip
        self.spatial_context = self.histovi_setup_["spatial_context"]
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ registration
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
            :func:`histovi.pp.spatial_neighbors`; enables the niche decoder and the domain latent.
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
        # first, with nothing but the arguments in locals(): they are what the registry records
        setup_method_args = cls._get_setup_method_args(**locals())
        keys = (layer, batch_key, morphology_key, neighbors_key, embedding_keys, labels_key)
        covariates = (categorical_covariate_keys, continuous_covariate_keys)
        # a query (set up from a reference's registry) may lack a view entirely
        check_setup_inputs(
            adata,
            *keys,
            *covariates,
            allow_missing_views="source_registry" in kwargs,
            allow_missing_labels=bool(kwargs.get("allow_missing_labels")),
        )
        manager = AnnDataManager(
            fields=anndata_fields(*keys, *covariates), setup_method_args=setup_method_args
        )
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

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
        setup = {k: v for k, v in locals().items() if k not in ("cls", "mdata", "kwargs")}
        modalities = check_mudata(mdata, modalities, setup)
        morphology_mod = modalities.get("morphology_layer")  # noqa: F841 (recorded in setup args)
        setup_method_args = cls._get_setup_method_args(**locals())
        mu_fields, mods = mudata_fields(cls, modalities, setup)
        setup_method_args["setup_args"].pop("setup", None)
        setup_method_args["setup_args"]["modalities"] = mods
        manager = AnnDataManager(fields=mu_fields, setup_method_args=setup_method_args)
        manager.register_fields(mdata, **kwargs)
        cls.register_manager(manager)

    def _validate_anndata(self, adata=None, copy_if_view=True):
        check_model_adata(self, adata)
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
        verbose: bool = False,
        **trainer_kwargs,
    ):
        """Train the model (arguments as :meth:`scvi.model.SCVI.train`).

        ``max_epochs`` defaults to :func:`default_max_epochs` (600,000 spot passes, between 20
        and 400 epochs: trained as long as scVI's rule, the latent over-integrates and domains
        blur); a query model's default is a tenth of the reference's training work, between 10
        and 200 epochs. The KL weight warms up over :data:`KL_WARMUP_FACTOR` times
        ``max_epochs`` unless ``plan_kwargs`` sets a warm-up.

        ``checkpoint_dir``: save a checkpoint there (``last.ckpt``) after the first epoch, then
        at most once a minute and when training ends; if one is already there, training resumes
        from it (same model settings and data). ``verbose``: show Lightning's and scvi-tools'
        log lines and deprecation warnings (hardware found, tips, why training stopped). Lightning
        arguments (``strategy``, ``callbacks``, ...) pass through. After training, the
        neighbours' share of the domain latent is fitted to the data (not for a query, which
        keeps the reference's).
        """
        # default length and KL warm-up, checkpoints, DDP, niche gathering (model/_training.py)
        max_epochs, plan_kwargs, trainer_kwargs = training_kwargs(
            self, max_epochs, batch_size, plan_kwargs, checkpoint_dir, trainer_kwargs
        )
        with quiet_libraries(verbose=verbose):
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
        record_training(self, max_epochs)
        return out

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        spatial: bool = True,
        return_dist: bool = False,
        **kwargs,
    ) -> np.ndarray:
        """Latent representation of every spot (posterior mean by default), ``(n, n_latent)``.

        ``indices`` are row numbers of ``adata`` (default: the registered AnnData).

        ``spatial=True`` (default) gives the domain latent: each spot's own latent propagated
        over the spatial graph with the neighbours' share fitted to the study after training
        (:mod:`histovi.model._spatial`); a spot gets the same value whether it is embedded alone
        or with the whole data set. ``spatial=False``, or a model without neighbours, gives each
        spot's latent from its own data only. ``give_mean=False`` draws one sample of each own
        latent and propagates it; ``return_dist=True`` returns ``(mean, variance)``.
        """
        check_indices(indices, (adata if adata is not None else self.adata).n_obs)
        if not isinstance(spatial, bool | np.bool_):
            raise ValueError(f"spatial={spatial!r}: pass True (domain latent) or False (own).")
        if kwargs.get("dataloader") is not None:
            return super().get_latent_representation(
                adata=adata, indices=indices, give_mean=give_mean, batch_size=batch_size,
                return_dist=return_dist, **kwargs,
            )  # fmt: skip
        return latent_representation(
            self, adata, indices, give_mean, batch_size, spatial, return_dist
        )

    # ------------------------------------------------------------------ reference mapping
    @classmethod
    def prepare_query_anndata(
        cls, adata: AnnData, reference_model: HistoVI | str, compute_neighbors: bool = True
    ) -> AnnData:
        """Return a copy of ``adata`` laid out like the reference, ready for :meth:`load_query_data`.

        * genes reordered to the reference's; missing genes zero-filled (with a warning naming how
          many), extra genes dropped;
        * views the reference used but the query lacks are added as NaN (missing) with a warning;
          views whose width or recorded encoder differ from the reference are refused;
        * spatial neighbours computed within each query sample with the reference's settings when
          the reference used them and the query has none.
        """
        return prepare_query(adata, reference_model, compute_neighbors)

    @classmethod
    def load_query_data(cls, adata: AnnData, reference_model: HistoVI | str, **kwargs) -> HistoVI:
        """Map a query into a trained reference (scArches).

        Only the columns of the covariate one-hot inputs that belong to the query's new categories
        train; every reference weight, including the reference's covariate columns and the
        neighbours' share of the domain latent, is frozen, so the reference's latent is unchanged
        bit for bit. The query's domain latent propagates over the query's own neighbours. Run
        :meth:`prepare_query_anndata` first.
        """
        return load_query(cls, adata, reference_model, super().load_query_data, **kwargs)

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
        save_model(self, dir_path, prefix, overwrite, save_anndata, **kwargs)

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
        return load_checked(cls, dir_path, adata, **kwargs)
