"""The methods of the integration benchmark: one function per method, ``(adata, seed, ctx) ->
embedding``.

Every method reads the same prepared AnnData (:mod:`_data`): raw counts of the same genes in
``layers['counts']``, ``obs['sample']`` as batch, ``obsm['spatial_neighbors']`` and, where the
scenario has one, ``obsm['X_morphology']``. The training seed is the clustering seed. Heavy
libraries are imported inside the functions, so a worker process pays only for what its method
needs (see ``integration.py``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from anndata import AnnData

SAMPLE_KEY = "sample"
MORPHOLOGY_KEY = "X_morphology"
NEIGHBORS_KEY = "spatial_neighbors"
N_LATENT = 16  # HistoVI's default, given to scVI too
N_PCS = 30

#: HistoVI variants: name -> ``HistoVI(adata, **kwargs)``. A ``"train_kwargs"`` entry (a dict) is
#: passed to ``model.train`` instead, ``"embeddings"`` and ``"batch_key"`` to ``setup_anndata``;
#: keys ``plan.*`` go to the training plan, ``train.*`` to ``train``, ``setup.*`` to
#: ``setup_anndata`` (:func:`split_kwargs`). Add variants here, with ``--histovi-variant
#: NAME=JSON``, or inline as a method name ``HistoVI:key=value,...`` (:func:`parse_inline`).
HISTOVI_VARIANTS: dict[str, dict[str, Any]] = {
    "HistoVI": {},
    "HistoVI-noMorph": {"use_morphology": False},
    "HistoVI-noNiche": {"use_niche": False},
    # No sample covariate (``batch_key=None``) and no alignment term: the spots pooled naively.
    # (Until the default cycle weight became 0, this name meant cycle_weight=0.)
    "HistoVI-noAlign": {"batch_key": None},
    # the opt-in cycle-consistency term (default weight 0)
    "HistoVI-cycle1": {"cycle_weight": 1.0},
    "HistoVI-cycle5": {"cycle_weight": 5.0},
    # the alignment terms that were measured and not chosen as the default
    "HistoVI-adversarial": {"cycle_weight": 0.0, "alignment_weight": 20.0},
    # an expression-embedding view (obsm['X_fm'], see _data.py) beside the counts
    "HistoVI+FM": {"embeddings": {"fm": "X_fm"}},
}

#: Baselines, in the order they run (scVI before scVI+agg so that the latter reuses its latent).
BASELINES = ("PCA", "Harmony", "scVI", "scVI+agg", "BANKSY", "BANKSY-0.8", "AESTETIK")


@dataclass
class Context:
    """What a method may need besides the data and the seed.

    Attributes
    ----------
    max_epochs
        Epochs of every neural method; ``None``: HistoVI's rule (scVI gets the same number) and
        AESTETIK's own default.
    histovi_variants
        Name -> HistoVI keyword arguments.
    previous
        ``(method, seed) -> embedding`` of methods that already ran for this data, so that
        ``scVI+agg`` can reuse the scVI latent of the same seed.
    info
        Filled by the method: anything worth reporting (epochs trained, settings, notes).
    curve_every, score
        Score the latent of scVI / HistoVI every ``curve_every`` epochs during training with
        ``score(adata, latent, seed) -> dict``; the rows go to ``info['curve']``.
    files
        Name -> ``.npy`` path of precomputed embeddings, run as methods.
    """

    max_epochs: int | None = None
    histovi_variants: dict[str, dict[str, Any]] = field(
        default_factory=lambda: dict(HISTOVI_VARIANTS)
    )
    previous: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    curve_every: int | None = None
    score: Callable[[AnnData, np.ndarray, int], dict] | None = None
    files: dict[str, str] = field(default_factory=dict)
    #: further latents of the same trained model, tag -> embedding (HistoVI: ``domain``, the
    #: domain-scale spatial posterior, and ``own``, each spot's own data); saved by the harness
    #: as the method ``<method>@<tag>`` (see :data:`LATENT_TAGS`)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


#: Other latents of one trained HistoVI, scored as methods ``<variant>@<tag>`` without training
#: again: the spatial posterior at domain scale, and the posterior from each spot's own data
#: (the ablation of the spatial prior: training does not depend on it).
LATENT_TAGS = {"domain": {"spatial": "domain"}, "own": {"spatial": False}}

#: Latents built from another tag's latent of the same model, scored as ``<variant>@<tag>``:
#: tag -> (source tag, rings). ``agg`` is scVI+agg's recipe (CellCharter's neighbourhood
#: aggregation, :func:`histovi.tl.aggregate_neighbors`) on each spot's own-data latent: the
#: neighbourhood as features beside the latent, the alternative to the spatial prior.
AGGREGATED_TAGS = {"agg": ("own", 2)}


def parse_inline(text: str) -> dict[str, Any]:
    """``key=value,...`` as keyword arguments: ``True`` / ``False`` / ``None``, numbers (a float
    when the value has ``.`` or ``e``), else the string."""
    kwargs: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(
                f"{part!r} in {text!r}: write key=value pairs separated by commas, e.g. "
                "'HistoVI:use_niche=False,plan.lr=0.002'."
            )
        if value in ("True", "False", "None"):
            kwargs[key] = {"True": True, "False": False, "None": None}[value]
        else:
            try:
                kwargs[key] = float(value) if "." in value or "e" in value else int(value)
            except ValueError:
                kwargs[key] = value
    return kwargs


def split_kwargs(spec: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Model, ``setup_anndata`` and ``train`` keyword arguments of a variant: keys ``plan.*`` go
    to the training plan (``train(plan_kwargs=...)``), ``train.*`` and a ``train_kwargs`` dict to
    ``train``, ``setup.*`` to ``setup_anndata`` (a covariate key given as a string becomes a
    list of one key), the rest to the model."""
    model = dict(spec)
    train = dict(model.pop("train_kwargs", None) or {})
    plan = dict(train.pop("plan_kwargs", None) or {})
    setup: dict[str, Any] = {}
    for key in list(model):
        prefix, dot, rest = key.partition(".")
        if dot and prefix in ("plan", "train", "setup"):
            {"plan": plan, "train": train, "setup": setup}[prefix][rest] = model.pop(key)
    for key in ("categorical_covariate_keys", "continuous_covariate_keys"):
        if isinstance(setup.get(key), str):
            setup[key] = [setup[key]]
    if plan:
        train["plan_kwargs"] = plan
    return model, setup, train


def split_latent_tag(name: str) -> tuple[str, str | None]:
    """``'HistoVI:k=v@domain'`` -> ``('HistoVI:k=v', 'domain')``; no tag -> ``(name, None)``."""
    base, sep, tag = name.rpartition("@")
    if sep and (tag in LATENT_TAGS or tag in AGGREGATED_TAGS):
        return base, tag
    return name, None


def variant_of(name: str, ctx: Context) -> tuple[str, dict[str, Any]] | None:
    """``('HistoVI' | 'scVI', kwargs)`` of a named HistoVI variant or an inline method name
    (``HistoVI:key=value,...``, ``HistoVI-noMorph:key=value``, ``scVI:key=value``); ``None`` for
    other methods."""
    name, _ = split_latent_tag(name)
    if name in ctx.histovi_variants:
        return "HistoVI", dict(ctx.histovi_variants[name])
    base, sep, inline = name.partition(":")
    if sep and base in ctx.histovi_variants:
        return "HistoVI", {**ctx.histovi_variants[base], **parse_inline(inline)}
    if sep and base == "scVI":
        return "scVI", parse_inline(inline)
    return None


def default_max_epochs(n_obs: int) -> int:
    """HistoVI's epoch rule (``HistoVI.train`` with ``max_epochs=None``), so that scVI trains
    for the same number of epochs."""
    from histovi.model._model import default_max_epochs as rule

    return rule(n_obs)


@contextlib.contextmanager
def _quiet_cwd() -> Iterator[None]:
    """Run in a scratch folder: Lightning writes ``lightning_logs/`` into the working directory."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="histovi_bench_") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def _counts(adata: AnnData):
    return adata.layers["counts"] if "counts" in adata.layers else adata.X


def _lognorm(adata: AnnData) -> AnnData:
    """normalize_total + log1p of the counts, as a light AnnData (the user's stays untouched)."""
    import scanpy as sc

    x = AnnData(X=_counts(adata).astype(np.float32), obs=adata.obs[[SAMPLE_KEY]].copy())
    x.var_names = adata.var_names
    sc.pp.normalize_total(x, target_sum=1e4)
    sc.pp.log1p(x)
    return x


def _pca_matrix(adata: AnnData, seed: int, n_comps: int = N_PCS) -> np.ndarray:
    import scanpy as sc

    x = _lognorm(adata)
    n_comps = int(min(n_comps, x.n_vars - 1, x.n_obs - 1))
    sc.pp.pca(x, n_comps=n_comps, random_state=seed)
    return np.asarray(x.obsm["X_pca"], dtype=np.float32)


def _harmony(X: np.ndarray, batches, seed: int) -> np.ndarray:
    import harmonypy
    import pandas as pd

    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    ho = harmonypy.run_harmony(
        X, meta, "batch", random_state=seed, verbose=False, ncores=min(2, os.cpu_count() or 1)
    )
    Z = np.asarray(ho.Z_corr)
    # harmonypy < 2 returns (d, n); 2.x returns (n, d)
    return (Z.T if Z.shape[0] != X.shape[0] else Z).astype(np.float32)


# --------------------------------------------------------------------------- baselines


def pca(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """PCA without correction: normalize_total + log1p + 30 PCs of the selected genes."""
    ctx.info["settings"] = f"normalize_total(1e4)+log1p, {N_PCS} PCs"
    return _pca_matrix(adata, seed)


def harmony(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """Harmony (harmonypy) on the PCA, batch = section."""
    ctx.info["settings"] = f"harmonypy on {N_PCS} PCs, batch=sample"
    return _harmony(_pca_matrix(adata, seed), adata.obs[SAMPLE_KEY], seed)


def _curve_callback(model, adata: AnnData, seed: int, ctx: Context):
    """Lightning callback: every ``ctx.curve_every`` epochs (and the last), the latent of all
    spots scored with ``ctx.score`` (module in eval mode, then back), with the train and
    validation ELBO and the KL weight, appended to ``ctx.info['curve']``. Its own time goes to
    ``ctx.info['curve_s']`` (taken off the method's wall time)."""
    import time

    from lightning.pytorch.callbacks import Callback

    rows = ctx.info.setdefault("curve", [])
    ctx.info["curve_s"] = 0.0
    t0 = time.perf_counter()

    class Curve(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            if epoch % ctx.curve_every and epoch != trainer.max_epochs:
                return
            t = time.perf_counter()
            pl_module.eval()
            trained, model.is_trained_ = model.is_trained_, True  # scvi-tools refuses otherwise
            if getattr(pl_module.module, "spatial_prior", False):
                # what a run stopped here would give: its spatial prior fitted now
                from histovi.data._spatial import fit_spatial_prior

                kl = float(getattr(pl_module, "kl_weight", 1.0))
                fit_spatial_prior(pl_module.module, model.adata_manager, evidence_scale=kl)
            try:
                z = model.get_latent_representation()
            finally:
                model.is_trained_ = trained
                pl_module.train()
            m = trainer.callback_metrics
            rows.append(
                {
                    "epoch": epoch,
                    **ctx.score(adata, z, seed),
                    **{k: float(m.get(k, np.nan)) for k in ("elbo_train", "elbo_validation")},
                    "kl_weight": float(getattr(pl_module, "kl_weight", np.nan)),
                    "train_s": t - t0 - ctx.info["curve_s"],
                }
            )
            ctx.info["curve_s"] += time.perf_counter() - t

    return Curve()


def _train_embed(model, adata: AnnData, seed: int, ctx: Context, train: dict) -> np.ndarray:
    """Train an scvi-tools model (scVI, HistoVI) quietly, with the curve callback when asked;
    record the epochs, the spread of the posterior means and the posterior sd (means over latent
    dimensions); return the posterior means."""
    if ctx.curve_every:
        train["callbacks"] = [*train.get("callbacks", []), _curve_callback(model, adata, seed, ctx)]
        train.setdefault("check_val_every_n_epoch", 1)  # the validation ELBO of the curve
    with _quiet_cwd():
        model.train(enable_progress_bar=False, enable_model_summary=False, **train)
    ctx.info["epochs"] = len(model.history["elbo_train"])
    z, var = model.get_latent_representation(return_dist=True)
    ctx.info["latent_sd"] = float(z.std(0).mean())
    ctx.info["posterior_sd"] = float(np.sqrt(var).mean())
    return np.asarray(z, dtype=np.float32)


def _scvi_latent(adata: AnnData, seed: int, ctx: Context, spec: dict | None = None) -> np.ndarray:
    import scvi

    kwargs, setup, train = split_kwargs(spec or {})
    scvi.settings.seed = seed
    a = AnnData(X=_counts(adata).copy(), obs=adata.obs.copy())
    scvi.model.SCVI.setup_anndata(a, **{"batch_key": SAMPLE_KEY, **setup})
    model = scvi.model.SCVI(a, **{"n_latent": N_LATENT, **kwargs})
    train.setdefault("max_epochs", ctx.max_epochs or default_max_epochs(a.n_obs))
    return _train_embed(model, adata, seed, ctx, train)


def scvi_(adata: AnnData, seed: int, ctx: Context, spec: dict | None = None) -> np.ndarray:
    """scVI (n_latent 16, batch = section, HistoVI's epoch rule); ``spec``: keyword arguments as
    in :func:`split_kwargs` (inline ``scVI:key=value,...``)."""
    ctx.info["settings"] = f"SCVI(n_latent={N_LATENT}), batch=sample" + (
        f"; {spec}" if spec else ""
    )
    return _scvi_latent(adata, seed, ctx, spec)


def scvi_agg(adata: AnnData, seed: int, ctx: Context, n_hops: int = 2) -> np.ndarray:
    """CellCharter recipe: scVI latent concatenated with its mean over the 1..n_hops spatial
    rings (:func:`histovi.tl.aggregate_neighbors`). Reuses the scVI latent of the same seed when
    scVI ran in this benchmark (its cost is then added by the harness)."""
    Z = ctx.previous.get(("scVI", seed))
    ctx.info["reused_scVI"] = Z is not None
    if Z is None:
        Z = _scvi_latent(adata, seed, ctx)
    ctx.info["settings"] = f"scVI + aggregate_neighbors(n_hops={n_hops})"
    return _aggregate(adata, Z, n_hops)


def _aggregate(adata: AnnData, Z: np.ndarray, n_hops: int) -> np.ndarray:
    """``Z`` beside its mean over the 1..n_hops spatial rings within each section."""
    import histovi

    light = AnnData(obs=adata.obs[[SAMPLE_KEY]].copy(), shape=(adata.n_obs, 0))
    light.obsm["X_latent"] = Z
    light.obsm[NEIGHBORS_KEY] = np.asarray(adata.obsm[NEIGHBORS_KEY])
    return histovi.tl.aggregate_neighbors(
        light,
        "X_latent",
        n_hops=n_hops,
        neighbors_key=NEIGHBORS_KEY,
        sample_key=SAMPLE_KEY,
        inplace=False,
    )


def banksy(
    adata: AnnData,
    seed: int,
    ctx: Context,
    k_geom: int = 6,
    lambda_param: float = 0.2,
    max_m: int = 0,
    n_pcs: int = 20,
) -> np.ndarray:
    """BANKSY's multi-sample workflow (pybanksy).

    As BANKSY's multi-sample / Harmony vignettes (DLPFC Visium: ``computeBanksy`` per sample with
    ``k_geom=6``, ``lambda=0.2``, no AGF; ``runBanksyPCA(group=sample)``, i.e. features z-scaled
    per sample; then Harmony on the BANKSY PCs): per section, the neighbour matrix is the
    ``scaled_gaussian``-weighted mean of the ``k_geom`` nearest spots' expression
    (``banksy.main.generate_spatial_weights_fixed_nbrs``), own and neighbour matrices are
    z-scored within the section and weighted by ``sqrt(1 - lambda)`` / ``sqrt(lambda)``
    (``banksy.main.concatenate_all``); sections are stacked, reduced to 20 PCs and corrected by
    Harmony (batch = section). Input: normalize_total + log1p of the selected genes.
    """
    import contextlib as _cl
    import io

    from banksy.embed_banksy import create_nbr_matrix
    from banksy.main import concatenate_all, generate_spatial_weights_fixed_nbrs
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    x = _lognorm(adata)
    X = x.X.toarray() if hasattr(x.X, "toarray") else np.asarray(x.X)
    coords = np.asarray(adata.obsm["spatial"])[:, :2]
    samples = adata.obs[SAMPLE_KEY].astype(str).to_numpy()
    rows = np.empty((adata.n_obs, X.shape[1] * (2 + max_m)), dtype=np.float32)
    for s in dict.fromkeys(samples):
        idx = np.flatnonzero(samples == s)
        xy = coords[idx]
        nn = NearestNeighbors(algorithm="ball_tree").fit(xy)
        weights = {}
        with _cl.redirect_stdout(io.StringIO()):  # pybanksy prints per call
            for m in range(max_m + 1):
                w, _, _ = generate_spatial_weights_fixed_nbrs(
                    xy,
                    m=m,
                    num_neighbours=k_geom,
                    decay_type="scaled_gaussian",
                    nbr_object=nn,
                    verbose=False,
                )
                weights[m] = w
            sub = AnnData(X=X[idx])
            nbr = create_nbr_matrix(
                sub,
                {"scaled_gaussian": {"weights": weights}},
                "scaled_gaussian",
                max_m,
                verbose=False,
            )
            mats = [sub.X] + [
                np.abs(nbr[m]) if np.iscomplexobj(nbr[m]) else nbr[m] for m in range(max_m + 1)
            ]
            rows[idx] = concatenate_all(mats, lambda_param, None)
    Z = PCA(n_components=min(n_pcs, rows.shape[1] - 1), random_state=seed).fit_transform(rows)
    ctx.info["settings"] = (
        f"k_geom={k_geom}, lambda={lambda_param}, max_m={max_m}, {n_pcs} PCs, per-sample "
        "z-scaling, Harmony(batch=sample)"
    )
    return _harmony(Z.astype(np.float32), samples, seed)


def aestetik(
    adata: AnnData,
    seed: int,
    ctx: Context,
    n_components: int = 15,
    num_repeats_predict: int = 100,
) -> np.ndarray:
    """AESTETIK (multi-sample: ``used_obs_batch='sample'``) on the expression PCA and the same
    morphology embedding as HistoVI.

    AESTETIK needs a morphology vector for every spot: spots without an image get the mean of
    the spots with one (a constant, uninformative input), and without any morphology the
    morphology input is constant (AESTETIK then sets its morphology weight to 0). Its
    ``num_repeats_predict`` (dropout passes averaged at inference, default 1000) is lowered to
    100 to keep CPU time in check. Epochs: AESTETIK's default (100, one full batch per epoch)
    unless ``ctx.max_epochs`` is set.
    """
    import logging

    from aestetik import AESTETIK
    from sklearn.decomposition import PCA

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    expr = _pca_matrix(adata, seed, n_comps=n_components)
    if MORPHOLOGY_KEY in adata.obsm:
        m = np.asarray(adata.obsm[MORPHOLOGY_KEY], dtype=np.float64)
        present = ~np.isnan(m).any(1)
    else:
        m, present = np.zeros((adata.n_obs, 1)), np.zeros(adata.n_obs, bool)
    n_morph = int(min(n_components, m.shape[1]))
    if present.sum() > n_morph:
        mu, sd = m[present].mean(0), m[present].std(0) + 1e-8
        pcs = PCA(n_components=n_morph, random_state=seed).fit((m[present] - mu) / sd)
        morph = np.zeros((adata.n_obs, n_morph))
        morph[present] = pcs.transform((m[present] - mu) / sd)
        morph[~present] = morph[present].mean(0)
    else:
        morph = np.zeros((adata.n_obs, n_components))
    a = AnnData(obs=adata.obs[[SAMPLE_KEY, "x_array", "y_array"]].copy(), shape=(adata.n_obs, 0))
    a.obsm["X_pca_transcriptomics"] = expr
    a.obsm["X_pca_morphology"] = morph.astype(np.float32)
    labels = adata.obs["label"].astype(object)
    labels = labels[labels.notna() & (labels.astype(str) != "undetermined")]
    kwargs = {
        "n_cluster": int(labels.nunique()),
        "used_obs_batch": SAMPLE_KEY,
        "num_repeats_predict": num_repeats_predict,
        "random_state": seed,
        "latent_dim": N_LATENT,
    }
    if ctx.max_epochs:
        kwargs["max_epochs"] = int(ctx.max_epochs)
    model = AESTETIK(**kwargs)
    with _quiet_cwd():
        model.fit(a)
    ctx.info["epochs"] = int(model.trainer_.current_epoch)
    ctx.info["settings"] = (
        f"{expr.shape[1]} expression PCs + {morph.shape[1]} morphology PCs "
        f"({int(present.sum())} spots with morphology), num_repeats_predict={num_repeats_predict}"
    )
    return np.asarray(model.embedding_, dtype=np.float32)


# --------------------------------------------------------------------------- HistoVI


def histovi_variant(adata: AnnData, seed: int, ctx: Context, name: str = "HistoVI") -> np.ndarray:
    """HistoVI with its defaults plus the variant's keyword arguments (no per-dataset tuning);
    ``name`` is a named variant or an inline one (:func:`variant_of`)."""
    import scvi

    from histovi import HistoVI

    variant = variant_of(name, ctx)
    if variant is None or variant[0] != "HistoVI":
        raise KeyError(
            f"Unknown HistoVI variant {name!r}: add it to HISTOVI_VARIANTS, pass "
            f"--histovi-variant {name}='{{...}}' or write it inline as HistoVI:key=value,... "
            f"(known: {list(ctx.histovi_variants)})."
        )
    kwargs, setup, train_kwargs = split_kwargs(variant[1])
    embeddings = dict(kwargs.pop("embeddings", {}) or {})
    batch_key = kwargs.pop("batch_key", SAMPLE_KEY)
    a = AnnData(X=_counts(adata).copy(), obs=adata.obs.copy(), var=adata.var[[]].copy())
    a.layers["counts"] = a.X
    a.obsm[NEIGHBORS_KEY] = np.asarray(adata.obsm[NEIGHBORS_KEY])
    morph = None
    if MORPHOLOGY_KEY in adata.obsm and (~np.isnan(adata.obsm[MORPHOLOGY_KEY]).any(1)).any():
        a.obsm[MORPHOLOGY_KEY] = np.asarray(adata.obsm[MORPHOLOGY_KEY], dtype=np.float32)
        morph = MORPHOLOGY_KEY
    for view, key in embeddings.items():
        if key not in adata.obsm:
            raise KeyError(
                f"Variant {name!r} needs obsm[{key!r}] (view {view!r}); the data has none."
            )
        a.obsm[key] = np.asarray(adata.obsm[key], dtype=np.float32)
    scvi.settings.seed = seed
    HistoVI.setup_anndata(
        a,
        **{
            "layer": "counts",
            "batch_key": batch_key,
            "morphology_key": morph,
            "neighbors_key": NEIGHBORS_KEY,
            "embedding_keys": embeddings or None,
            **setup,
        },
    )
    model = HistoVI(a, **kwargs)
    ctx.info["settings"] = f"{model._model_summary_string}; kwargs={kwargs}" + "".join(
        f"; {k}={v}" for k, v in (("setup", setup), ("train", train_kwargs)) if v
    )
    train_kwargs.setdefault("max_epochs", ctx.max_epochs)  # None: the model's own rule
    z = _train_embed(model, adata, seed, ctx, train_kwargs)
    if model.module.spatial_prior:
        ctx.extra = {
            tag: np.asarray(model.get_latent_representation(**kw), dtype=np.float32)
            for tag, kw in LATENT_TAGS.items()
        }
        ctx.info["spatial_precision"] = {
            scale: np.round(model.module.spatial_precision(scale).numpy(), 3).tolist()
            for scale in ("spot", "domain")
        }
    if model.module.view_gating:
        ctx.info["view_gates"] = {
            v: np.round(g.detach().numpy(), 3).tolist()
            for v, g in model.module.view_gates().items()
        }
    return z


def histovi_latent(adata: AnnData, seed: int, ctx: Context, name: str) -> np.ndarray:
    """Another latent (``<variant>@<tag>``, :data:`LATENT_TAGS`, :data:`AGGREGATED_TAGS`) of the
    HistoVI variant trained with this seed: read from the variant's run when it ran in this
    benchmark, else trained."""
    base, tag = split_latent_tag(name)
    source, n_hops = AGGREGATED_TAGS.get(tag, (tag, 0))
    saved = ctx.previous.get((f"{base}@{source}", seed))
    ctx.info["reused_model"] = saved is not None
    ctx.info["settings"] = f"{base}, get_latent_representation({LATENT_TAGS[source]})"
    if saved is None:
        histovi_variant(adata, seed, ctx, base)
        saved = ctx.extra[source]
    if not n_hops:
        return saved
    ctx.info["settings"] += f" + aggregate_neighbors(n_hops={n_hops})"
    return _aggregate(adata, saved, n_hops)


# --------------------------------------------------------------------------- registry

#: Baseline name -> (function, top-level modules it needs). The modules are imported before
#: the memory baseline of a worker is taken, so import cost is not counted as the method's.
_BASELINE_FUNCS: dict[str, tuple[Callable[..., np.ndarray], tuple[str, ...]]] = {
    "PCA": (pca, ("scanpy",)),
    "Harmony": (harmony, ("scanpy", "harmonypy")),
    "scVI": (scvi_, ("scanpy", "scvi")),
    "scVI+agg": (scvi_agg, ("scanpy", "scvi", "histovi")),
    "BANKSY": (banksy, ("scanpy", "harmonypy", "banksy", "sklearn")),
    # BANKSY's setting for domain segmentation (lambda 0.8; the DLPFC vignette's 0.2 above)
    "BANKSY-0.8": (
        lambda a, seed, c: banksy(a, seed, c, lambda_param=0.8),
        ("scanpy", "harmonypy", "banksy", "sklearn"),
    ),
    "AESTETIK": (aestetik, ("scanpy", "aestetik", "lightning")),
}


def method_names(ctx: Context | None = None) -> list[str]:
    """Every named method: baselines, HistoVI variants, then precomputed embeddings (inline
    variants, ``HistoVI:key=value,...``, are known too but not listed)."""
    ctx = ctx or Context()
    return [*BASELINES, *ctx.histovi_variants, *ctx.files]


def resolve(
    name: str, ctx: Context
) -> tuple[Callable[[AnnData, int, Context], np.ndarray], tuple[str, ...]]:
    """Function ``(adata, seed, ctx) -> embedding`` and required modules of a method."""
    if name in ctx.files:

        def load(adata: AnnData, seed: int, c: Context) -> np.ndarray:
            c.info["settings"] = f"precomputed: {ctx.files[name]}"
            return np.load(ctx.files[name])

        return load, ()
    if name in _BASELINE_FUNCS:
        return _BASELINE_FUNCS[name]
    variant = variant_of(name, ctx)
    if variant is not None and variant[0] == "scVI":
        return (lambda a, seed, c: scvi_(a, seed, c, variant[1])), ("scanpy", "scvi")
    if variant is not None and split_latent_tag(name)[1] is not None:
        return (lambda a, seed, c: histovi_latent(a, seed, c, name)), ("scanpy", "scvi", "histovi")
    if variant is not None:
        return (lambda a, seed, c: histovi_variant(a, seed, c, name)), ("scanpy", "scvi", "histovi")
    raise KeyError(
        f"Unknown method {name!r}: choose from {method_names(ctx)}, or write a variant inline "
        "as HistoVI:key=value,... or scVI:key=value,..."
    )


def unavailable_reason(name: str, ctx: Context) -> str | None:
    """Why a method cannot run here (a missing package), or ``None``."""
    import importlib.util

    _, modules = resolve(name, ctx)
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install 'histovi[benchmarks]')"
    return None
