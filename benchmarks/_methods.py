"""The method registry: every method of the benchmarks, ``(adata, seed, ctx) -> embeddings``.

Every method reads the same prepared AnnData (:mod:`_data`): raw counts of the same genes in
``layers['counts']``, ``obs['sample']`` as batch, the spatial coordinates and, where the study
has one, ``obsm['X_morphology']``. Spatial methods build their graph within each section and
train on the pooled sections. The training seed is the clustering seed. A method returns one
embedding, or a dict ``suffix -> embedding`` when one training gives several (``''``: the
method's own name; ``'@own'``: HistoVI's own latent; ``'+anchors'``: HistoVI's latent averaged
half-way to its mutual nearest neighbours in other sections (:func:`anchor_sections`); ``'+agg'``:
scVI's latent aggregated over two rings, the CellCharter recipe). Heavy libraries are imported inside the functions.

Variant syntax (one for every model): ``BASE`` or ``BASE:key=value,...`` with ``BASE`` a
HistoVI shorthand (:data:`VARIANTS`) or ``scVI``; keys ``plan.*`` go to the training plan,
``train.*`` to ``train()``, ``setup.*`` to ``setup_anndata``, the others to the model; the tag
``@own`` scores the own latent (``spatial=False``) of the same trained HistoVI.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from _data import LABEL_KEY, MORPHOLOGY_KEY, NEIGHBORS_KEY, SAMPLE_KEY
from anndata import AnnData

N_LATENT = 16  # HistoVI's default, given to scVI too
N_PCS = 30

#: HistoVI shorthands: name -> model keyword arguments.
VARIANTS: dict[str, dict[str, Any]] = {
    "HistoVI": {},
    "HistoVI-noMorph": {"use_morphology": False},
    "HistoVI-noNiche": {"use_niche": False},
    "HistoVI-noSpatial": {"spatial_context": False},
}
#: Derived embeddings: tag -> the suffix a method's training returns it under.
TAGS = ("@own", "+anchors", "+agg")


class NotApplicable(Exception):
    """The method does not apply to this study (reported with the reason, costs nothing)."""


@dataclass
class Context:
    """What a method may need besides the data and the seed: ``max_epochs`` of every neural
    method (``None``: each method's own default) and ``info``, filled by the method (epochs,
    settings)."""

    max_epochs: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _scratch_cwd() -> Iterator[None]:
    """Run in a scratch folder: Lightning writes ``lightning_logs/`` into the working folder."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="histovi_bench_") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def _device() -> str:
    """The GPU where there is one (scvi-tools models pick it by themselves)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _samples(adata: AnnData) -> np.ndarray:
    return adata.obs[SAMPLE_KEY].astype(str).to_numpy()


def _counts_adata(adata: AnnData, obs: list[str] | None = None) -> AnnData:
    """Counts (``X`` and ``layers['counts']``), the chosen ``obs`` columns and the spatial
    coordinates, in a fresh AnnData (the shared one stays untouched)."""
    a = AnnData(
        X=adata.layers["counts"].copy(),
        obs=adata.obs[obs or [SAMPLE_KEY]].copy(),
        var=pd.DataFrame(index=adata.var_names),
    )
    a.layers["counts"] = a.X
    a.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    return a


def _lognorm(adata: AnnData) -> AnnData:
    """normalize_total(1e4) + log1p of the counts, float32."""
    import scanpy as sc

    a = _counts_adata(adata)
    a.X = a.X.astype(np.float32)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def _dense(X) -> np.ndarray:
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


def _pca(adata: AnnData, seed: int, n_comps: int = N_PCS) -> np.ndarray:
    import scanpy as sc

    x = _lognorm(adata)
    sc.pp.pca(x, n_comps=int(min(n_comps, x.n_vars - 1, x.n_obs - 1)), random_state=seed)
    return np.asarray(x.obsm["X_pca"], dtype=np.float32)


def _harmony(X: np.ndarray, batches: np.ndarray, seed: int) -> np.ndarray:
    import harmonypy

    meta = pd.DataFrame({"batch": batches})
    Z = np.asarray(harmonypy.run_harmony(X, meta, "batch", random_state=seed, verbose=False).Z_corr)
    return (Z.T if Z.shape[0] != X.shape[0] else Z).astype(np.float32)  # harmonypy < 2: (d, n)


def aggregate(adata: AnnData, Z: np.ndarray, n_hops: int = 2) -> np.ndarray:
    """CellCharter's recipe: ``Z`` beside its mean over the 1..n_hops spatial rings within each
    section (:func:`histovi.tl.aggregate_neighbors`)."""
    import histovi

    light = AnnData(obs=adata.obs[[SAMPLE_KEY]].copy(), shape=(adata.n_obs, 0))
    light.obsm["Z"], light.obsm[NEIGHBORS_KEY] = Z, np.asarray(adata.obsm[NEIGHBORS_KEY])
    return histovi.tl.aggregate_neighbors(
        light, "Z", n_hops=n_hops, neighbors_key=NEIGHBORS_KEY, sample_key=SAMPLE_KEY, inplace=False
    )


def anchor_sections(adata: AnnData, Z: np.ndarray) -> np.ndarray:
    """``Z`` moved half-way to its anchors in other sections (:func:`histovi.tl.anchor_sections`,
    its defaults)."""
    import histovi

    light = AnnData(obs=adata.obs[[SAMPLE_KEY]].copy(), shape=(adata.n_obs, 0))
    light.obsm["Z"] = Z
    return histovi.tl.anchor_sections(light, "Z", sample_key=SAMPLE_KEY, inplace=False)


# --------------------------------------------------------------------------- baselines


def pca(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """PCA without correction: normalize_total + log1p, 30 PCs."""
    return _pca(adata, seed)


def harmony(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """Harmony (harmonypy) on the 30 PCs, batch = section."""
    return _harmony(_pca(adata, seed), _samples(adata), seed)


def banksy(adata: AnnData, seed: int, ctx: Context, lambda_param: float = 0.2) -> np.ndarray:
    """BANKSY's multi-sample workflow (pybanksy, as its DLPFC / Harmony vignettes): per section
    the ``scaled_gaussian``-weighted mean of the 6 nearest spots' expression
    (``generate_spatial_weights_fixed_nbrs``, ``create_nbr_matrix``), own and neighbour matrices
    z-scored within the section and weighted ``sqrt(1 - lambda)`` / ``sqrt(lambda)``
    (``concatenate_all``); sections stacked, 20 PCs, Harmony (batch = section)."""
    import io

    from banksy.embed_banksy import create_nbr_matrix
    from banksy.main import concatenate_all, generate_spatial_weights_fixed_nbrs
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    X = _dense(_lognorm(adata).X)
    xy, samples = np.asarray(adata.obsm["spatial"])[:, :2], _samples(adata)
    rows = np.empty((adata.n_obs, 2 * X.shape[1]), dtype=np.float32)
    for s in dict.fromkeys(samples):
        idx = np.flatnonzero(samples == s)
        nn = NearestNeighbors(algorithm="ball_tree").fit(xy[idx])
        with contextlib.redirect_stdout(io.StringIO()):  # pybanksy prints per call
            w = generate_spatial_weights_fixed_nbrs(
                xy[idx],
                m=0,
                num_neighbours=6,
                decay_type="scaled_gaussian",
                nbr_object=nn,
                verbose=False,
            )[0]
            sub = AnnData(X=X[idx])
            nbr = create_nbr_matrix(
                sub, {"scaled_gaussian": {"weights": {0: w}}}, "scaled_gaussian", 0, verbose=False
            )
            rows[idx] = concatenate_all([sub.X, nbr[0]], lambda_param, None)
    Z = PCA(n_components=min(20, rows.shape[1] - 1), random_state=seed).fit_transform(rows)
    ctx.info["settings"] = f"k_geom=6, lambda={lambda_param}, 20 PCs, Harmony(batch=sample)"
    return _harmony(Z.astype(np.float32), samples, seed)


def aestetik(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """AESTETIK (``used_obs_batch='sample'``) on 15 expression PCs and 15 PCs of the study's
    morphology view; spots without an image get the mean, and without any view the morphology
    input is constant (AESTETIK then gives it no weight). ``num_repeats_predict`` 100 (default
    1000) to keep CPU time in check; epochs: AESTETIK's default unless ``--max-epochs``. Single
    cells are placed on a pseudo-grid (:func:`_data._grid_from_coordinates`)."""
    from aestetik import AESTETIK
    from sklearn.decomposition import PCA

    m = np.asarray(adata.obsm.get(MORPHOLOGY_KEY, np.full((adata.n_obs, 1), np.nan)), float)
    present = ~np.isnan(m).any(1)
    morph = np.zeros((adata.n_obs, 15), dtype=np.float32)
    if present.sum() > 15:
        z = (m[present] - m[present].mean(0)) / (m[present].std(0) + 1e-8)
        pcs = PCA(n_components=min(15, m.shape[1]), random_state=seed).fit_transform(z)
        morph = np.tile(pcs.mean(0), (adata.n_obs, 1)).astype(np.float32)
        morph[present] = pcs
    a = AnnData(obs=adata.obs[[SAMPLE_KEY, "x_array", "y_array"]].copy(), shape=(adata.n_obs, 0))
    a.obsm["X_pca_transcriptomics"], a.obsm["X_pca_morphology"] = _pca(adata, seed, 15), morph
    labels = adata.obs[LABEL_KEY].dropna().astype(str)
    kwargs = {"max_epochs": ctx.max_epochs} if ctx.max_epochs else {}
    model = AESTETIK(
        n_cluster=int(labels[labels != "undetermined"].nunique()),
        used_obs_batch=SAMPLE_KEY,
        num_repeats_predict=100,
        random_state=seed,
        latent_dim=N_LATENT,
        **kwargs,
    )
    with _scratch_cwd():
        model.fit(a)
    ctx.info["epochs"] = int(model.trainer_.current_epoch)
    ctx.info["settings"] = f"15 expression + 15 morphology PCs ({int(present.sum())} with image)"
    return np.asarray(model.embedding_, dtype=np.float32)


# --------------------------------------------------------------------------- spatial peers


def stagate(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """STAGATE (stagate-modern, PyG) as its multi-section tutorial: log-normalised genes,
    ``Cal_Spatial_Net`` within each section (here KNN, k = 6), the sections' networks
    concatenated, ``train_STAGATE`` on the pool (1000 epochs, hidden [512, 30])."""
    import STAGATE_pyG

    x = _lognorm(adata)
    samples, nets = _samples(adata), []
    for s in dict.fromkeys(samples):
        sub = x[samples == s].copy()
        STAGATE_pyG.Cal_Spatial_Net(sub, k_cutoff=6, model="KNN", verbose=False)
        nets.append(sub.uns["Spatial_Net"])
    x.uns["Spatial_Net"] = pd.concat(nets, ignore_index=True)
    epochs = ctx.max_epochs or 1000
    STAGATE_pyG.train_STAGATE(x, n_epochs=epochs, random_seed=seed, device=_device(), verbose=False)
    ctx.info.update(epochs=epochs, settings="KNN k=6 per section, hidden [512, 30]")
    return np.asarray(x.obsm["STAGATE"], dtype=np.float32)


def graphst(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """GraphST (graphst-modern) as its tutorial: GraphST's preprocessing (normalize_total,
    log1p, scale without centring, max 10) of the benchmark's genes, its graph of the 3 nearest
    spots, ``GraphST.GraphST(adata, device=...).train()`` (600 epochs), then 20 PCs of the
    output as its clustering utility does. Sections are pooled with their coordinates offset far
    apart, so that the graph stays within each section."""
    import scanpy as sc
    import torch
    from GraphST import GraphST
    from sklearn.decomposition import PCA

    x = _lognorm(adata)
    sc.pp.scale(x, zero_center=False, max_value=10)
    x.var["highly_variable"] = True
    xy, samples = x.obsm["spatial"].copy(), _samples(adata)
    span = float(np.ptp(xy, axis=0).max()) + 1.0
    for i, s in enumerate(dict.fromkeys(samples)):
        xy[samples == s, 0] += 3 * span * i
    x.obsm["spatial"] = xy
    epochs = ctx.max_epochs or 600
    model = GraphST.GraphST(x, device=torch.device(_device()), epochs=epochs, random_seed=seed)
    emb = model.train().obsm["emb"]
    ctx.info.update(epochs=epochs, settings="3-NN graph per section, 20 PCs of the output")
    return PCA(n_components=20, random_state=seed).fit_transform(emb).astype(np.float32)


def fit_scvi(adata: AnnData, seed: int, ctx: Context, spec: dict | None = None):
    """A trained ``scvi.model.SCVI`` (n_latent 16, batch = section, HistoVI's epoch rule unless
    ``ctx.max_epochs``) with the variant's arguments."""
    import scvi

    from histovi.model._model import default_max_epochs

    kwargs, setup, train = split_kwargs(spec or {})
    scvi.settings.seed = seed
    a = _counts_adata(adata)
    scvi.model.SCVI.setup_anndata(a, **{"layer": "counts", "batch_key": SAMPLE_KEY, **setup})
    model = scvi.model.SCVI(a, **{"n_latent": N_LATENT, **kwargs})
    train.setdefault("max_epochs", ctx.max_epochs or default_max_epochs(a.n_obs))
    return _train(model, ctx, train)


def scviva(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """scVIVA (scviva-tools) as its tutorial: an scVI latent as the expression embedding, niches
    of the 20 nearest cells within each section (``preprocessing_anndata``), ``SCVIVA(adata,
    prior_mixture=False, semisupervised=True, linear_classifier=True)`` trained up to 1000
    epochs with early stopping on 20 % validation."""
    import scanpy as sc
    import scvi
    from scviva.model import SCVIVA

    a = _counts_adata(adata, [SAMPLE_KEY, *(["cell_type"] if "cell_type" in adata.obs else [])])
    a.obsm["X_scVI"] = fit_scvi(adata, seed, ctx).get_latent_representation()
    if "cell_type" not in a.obs:
        # scVIVA's niches are cell-type compositions: spot data without cell types gets Leiden
        # clusters of the expression (the scVI latent) instead
        sc.pp.neighbors(a, use_rep="X_scVI", random_state=seed)
        sc.tl.leiden(a, key_added="cell_type", flavor="igraph", n_iterations=2, random_state=seed)
    keys = {
        "sample_key": SAMPLE_KEY,
        "labels_key": "cell_type",
        "expression_embedding_key": "X_scVI",
    }
    SCVIVA.preprocessing_anndata(a, k_nn=20, **keys)
    SCVIVA.setup_anndata(a, layer="counts", batch_key=SAMPLE_KEY, **keys)
    scvi.settings.seed = seed
    model = SCVIVA(a, prior_mixture=False, semisupervised=True, linear_classifier=True)
    train = {"max_epochs": ctx.max_epochs or 1000, "train_size": 0.8, "validation_size": 0.2}
    train.update(early_stopping=True, check_val_every_n_epoch=1)
    ctx.info["settings"] = f"k_nn=20, {a.obs['cell_type'].nunique()} cell types"
    return _train(model, ctx, train).get_latent_representation()


def novae_(adata: AnnData, seed: int, ctx: Context) -> np.ndarray:
    """Novae trained from scratch (no pretrained weights can be fetched), as its tutorial:
    ``novae.spatial_neighbors(adata, slide_key='sample')`` (Delaunay graph per section),
    ``novae.Novae(adata)``, ``model.fit()`` (up to 20 epochs, early stopping),
    ``model.compute_representations()``."""
    import lightning
    import novae

    a = _counts_adata(adata)
    a.X = a.X.astype(np.float32)
    lightning.seed_everything(seed, verbose=False)
    novae.spatial_neighbors(a, slide_key=SAMPLE_KEY, verbose=False)
    model = novae.Novae(a)
    epochs = ctx.max_epochs or 20
    with _scratch_cwd():
        model.fit(max_epochs=epochs, accelerator=_device())
        model.compute_representations(a, accelerator=_device())
    ctx.info.update(epochs=int(model.current_epoch), settings="Delaunay graph per section")
    return np.asarray(a.obsm["novae_latent"], dtype=np.float32)


# --------------------------------------------------------------------------- scVI / HistoVI


def parse_inline(text: str) -> dict[str, Any]:
    """``key=value,...`` as keyword arguments: ``True`` / ``False`` / ``None``, numbers, else
    the string."""
    kwargs: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(
                f"{part!r} in {text!r}: write key=value pairs separated by commas, e.g. "
                "'HistoVI:use_niche=False,plan.lr=0.002'."
            )
        consts = {"True": True, "False": False, "None": None}
        try:
            kwargs[key] = consts[value] if value in consts else int(value)
        except ValueError:
            try:
                kwargs[key] = float(value)
            except ValueError:
                kwargs[key] = value
    return kwargs


def split_kwargs(spec: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Model, ``setup_anndata`` and ``train`` keyword arguments of a variant: ``plan.*`` to
    ``train(plan_kwargs=...)``, ``train.*`` to ``train``, ``setup.*`` to ``setup_anndata``."""
    model, setup, train, plan = {}, {}, {}, {}
    for key, value in spec.items():
        prefix, dot, rest = key.partition(".")
        target = {"plan": plan, "train": train, "setup": setup}.get(prefix) if dot else None
        (target if target is not None else model)[rest if target is not None else key] = value
    if plan:
        train["plan_kwargs"] = plan
    return model, setup, train


def _train(model, ctx: Context, train: dict):
    with _scratch_cwd():
        model.train(enable_progress_bar=False, enable_model_summary=False, **train)
    ctx.info["epochs"] = len(model.history["elbo_train"])
    return model


def scvi_(adata: AnnData, seed: int, ctx: Context, spec: dict | None = None) -> dict:
    """scVI (n_latent 16, batch = section, HistoVI's epoch rule), and as ``+agg`` the
    CellCharter recipe: its latent beside its mean over 2 spatial rings."""
    z = fit_scvi(adata, seed, ctx, spec).get_latent_representation()
    ctx.info["settings"] = f"SCVI(n_latent={N_LATENT}), batch=sample" + (
        f"; {spec}" if spec else ""
    )
    return {"": z, "+agg": aggregate(adata, z)}


def fit_histovi(adata: AnnData, seed: int, ctx: Context, spec: dict | None = None):
    """A trained HistoVI with its defaults plus the variant's arguments (the study's image
    view and spatial neighbours registered)."""
    import scvi

    from histovi import HistoVI

    kwargs, setup, train = split_kwargs(spec or {})
    morph = adata.obsm.get(MORPHOLOGY_KEY)
    has_view = morph is not None and bool((~np.isnan(morph).any(1)).any())
    if not has_view and kwargs.get("use_morphology") is False:
        raise NotApplicable("the study has no image view: the same model as HistoVI")
    a = _counts_adata(adata)
    a.obsm[NEIGHBORS_KEY] = np.asarray(adata.obsm[NEIGHBORS_KEY])
    if has_view:
        a.obsm[MORPHOLOGY_KEY] = np.asarray(morph, dtype=np.float32)
    scvi.settings.seed = seed
    HistoVI.setup_anndata(
        a,
        layer="counts",
        batch_key=SAMPLE_KEY,
        neighbors_key=NEIGHBORS_KEY,
        morphology_key=MORPHOLOGY_KEY if has_view else None,
        **setup,
    )
    model = HistoVI(a, **kwargs)
    train.setdefault("max_epochs", ctx.max_epochs)  # None: HistoVI's rule
    _train(model, ctx, train)
    alpha = model.module.spatial_mix.detach().cpu().numpy()
    ctx.info["settings"] = model._model_summary_string + f"; alpha mean {alpha.mean():.2f}"
    ctx.info["settings"] += f"; {spec}" if spec else ""
    return model


def histovi_(adata: AnnData, seed: int, ctx: Context, spec: dict | None = None) -> dict:
    """HistoVI: the domain latent (``get_latent_representation()``), as ``@own`` each spot's own
    latent (``spatial=False``) of the same model, as ``+anchors`` the domain latent averaged
    with its anchors in other sections (:func:`anchor_sections`)."""
    model = fit_histovi(adata, seed, ctx, spec)
    own = model.get_latent_representation(spatial=False)
    z = model.get_latent_representation()
    return {"": z, "@own": own, "+anchors": anchor_sections(adata, z)}


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    """A registered method: its function and the top-level modules it needs."""

    run: Callable[..., np.ndarray | dict]
    modules: tuple[str, ...]


_HISTOVI = ("scvi", "histovi")
REGISTRY: dict[str, Method] = {
    "PCA": Method(pca, ("scanpy",)),
    "Harmony": Method(harmony, ("scanpy", "harmonypy")),
    "scVI": Method(scvi_, ("scvi", "histovi")),
    "BANKSY": Method(banksy, ("scanpy", "harmonypy", "banksy")),
    # BANKSY's setting for domain segmentation (lambda 0.8; the DLPFC vignette's 0.2 above)
    "BANKSY-0.8": Method(partial(banksy, lambda_param=0.8), ("scanpy", "harmonypy", "banksy")),
    "AESTETIK": Method(aestetik, ("scanpy", "aestetik")),
    "STAGATE": Method(stagate, ("scanpy", "STAGATE_pyG", "torch_geometric")),
    "GraphST": Method(graphst, ("scanpy", "GraphST", "ot")),
    "scVIVA": Method(scviva, ("scanpy", "scvi", "scviva", "histovi")),
    "Novae": Method(novae_, ("novae", "lightning")),
    **{name: Method(partial(histovi_, spec=spec), _HISTOVI) for name, spec in VARIANTS.items()},
}
GROUPS: dict[str, list[str]] = {
    "baselines": ["PCA", "Harmony", "scVI", "scVI+agg", "BANKSY", "BANKSY-0.8", "AESTETIK"],
    "peers": ["STAGATE", "GraphST", "scVIVA", "Novae"],
    "histovi": [
        "HistoVI",
        "HistoVI@own",
        "HistoVI-noMorph",
        "HistoVI-noNiche",
        "HistoVI-noSpatial",
    ],
}
GROUPS["all"] = [m for g in ("baselines", "peers", "histovi") for m in GROUPS[g]]


def split_tag(name: str) -> tuple[str, str]:
    """``'HistoVI:k=v@own'`` -> ``('HistoVI:k=v', '@own')``; ``'scVI+agg'`` -> ``('scVI',
    '+agg')``; no tag -> ``(name, '')``: the job that trains, and the suffix of its output."""
    for tag in TAGS:
        if name.endswith(tag) and len(name) > len(tag):
            return name[: -len(tag)], tag
    return name, ""


def resolve(job: str) -> Method:
    """The registered method, or an inline variant ``BASE:key=value,...``."""
    if job in REGISTRY:
        return REGISTRY[job]
    base, sep, inline = job.partition(":")
    if sep and base in VARIANTS:
        return Method(partial(histovi_, spec={**VARIANTS[base], **parse_inline(inline)}), _HISTOVI)
    if sep and base == "scVI":
        return Method(partial(scvi_, spec=parse_inline(inline)), REGISTRY["scVI"].modules)
    raise KeyError(
        f"Unknown method {job!r}: choose from {GROUPS['all']} or the groups {list(GROUPS)}, or "
        "write a variant inline as HistoVI:key=value,... or scVI:key=value,..."
    )


def check_name(name: str) -> None:
    """Refuse an unknown method or a tag its job does not produce."""
    job, tag = split_tag(name)
    resolve(job)
    produced = {"@own": (*VARIANTS,), "+anchors": (*VARIANTS,), "+agg": ("scVI",)}
    if tag and job.partition(":")[0] not in produced[tag]:
        raise KeyError(f"{name!r}: {tag} is given by {list(produced[tag])} and their variants.")


def unavailable_reason(job: str) -> str | None:
    """Why a method cannot run here (a package missing), or ``None``."""
    import importlib.util

    missing = [m for m in resolve(job).modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install 'histovi[benchmarks]')"
    return None
