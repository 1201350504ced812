"""The domain latent: each spot's own latent propagated over the spatial graph.

A tissue domain is a neighbourhood, not a spot: in a cortex a layer is a band of cells of many
types, and a cell's own expression names its type but not its layer. HistoVI's encoders give
each spot a latent from its own data (counts and views) that the niche decoder has already made
predictive of its surroundings; the *domain latent* mixes it with its neighbours' by a
personalised-PageRank propagation over the spatial graph (APPNP, Gasteiger et al. 2019)::

    m(0) = own,    m(t + 1) = (1 - alpha) * own + alpha * W m(t),    t < N_STEPS

``W`` averages a spot's k spatial neighbours (plain mean: neighbours that look unlike the spot
are exactly what defines its domain) and ``alpha``, one value per latent dimension, is the
neighbours' share.

How much of the neighbourhood to use differs between studies by an order of magnitude (single
cells of a layered cortex vs 100 um spots of tumour patches), so alpha is fitted to each study
after training, by generalised cross-validation (Craven & Wahba 1979) of the propagation as a
smoother of the own latents: alpha is large where a latent dimension varies from cell to cell
around a smooth field (cell types mixed within domains) and small where a spot already differs
from its neighbours as whole domains do. The smoother ``S = sum_t c_t W^t`` is linear, so
GCV(alpha) = n |own - S own|^2 / (n - tr S)^2, with tr S from Hutchinson's estimator (fixed
Rademacher probes). Under an intrinsic CAR prior on the domain field with independent cell-level
deviations, the propagation's fixed point is the domain field's posterior mean, alpha being the
cell-level share of the variance.

Only the spots within ``N_STEPS`` hops of the requested rows affect them, so a subset is
embedded exactly as within the whole data (:func:`hop_closure`).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import scvi
import torch
from lightning.pytorch.callbacks import Callback

from ..module._module import NEIGHBORS_REGISTRY_KEY

logger = logging.getLogger(__name__)

#: Propagation steps (APPNP's K): the domain latent of a spot reads spots up to this many hops.
N_STEPS = 10
#: alpha values searched by generalised cross-validation (0.01 ... 0.99, denser near 1).
ALPHA_GRID = 1.0 - np.geomspace(0.99, 0.01, 30)
#: Rademacher probes of Hutchinson's trace estimator.
N_PROBES = 8


def neighbor_matrix(adata_manager) -> np.ndarray:
    """The registered neighbour index matrix, int64 (``n_obs x k``)."""
    return np.asarray(adata_manager.get_from_registry(NEIGHBORS_REGISTRY_KEY), dtype=np.int64)


def hop_closure(neighbors: np.ndarray, rows: np.ndarray, hops: int) -> np.ndarray:
    """``rows`` and every spot within ``hops`` steps of them on the neighbour graph (sorted)."""
    needed = np.zeros(len(neighbors), dtype=bool)
    needed[rows] = True
    frontier = np.unique(np.asarray(rows, dtype=np.int64))
    for _ in range(hops):
        nxt = np.unique(neighbors[frontier].ravel())
        frontier = nxt[~needed[nxt]]
        if not len(frontier):
            break
        needed[frontier] = True
    return np.flatnonzero(needed)


def mean_operator(neighbors: np.ndarray, rows: np.ndarray | None = None) -> sp.csr_matrix:
    """Sparse ``W`` over ``rows`` (default: all spots): row i averages the neighbours of
    ``rows[i]`` that lie in ``rows``; a neighbour outside ``rows`` is replaced by the spot
    itself (only the outermost hop of a :func:`hop_closure` has such neighbours, and what it
    reads never reaches the inner spots within ``N_STEPS`` steps)."""
    n_all, k = neighbors.shape
    rows = np.arange(n_all) if rows is None else np.asarray(rows, dtype=np.int64)
    local = np.full(n_all, -1, dtype=np.int64)
    local[rows] = np.arange(len(rows))
    cols = local[neighbors[rows]]
    outside = cols < 0
    cols[outside] = np.repeat(np.arange(len(rows)), k).reshape(-1, k)[outside]
    data = np.full(cols.size, 1.0 / k, dtype=np.float32)
    indptr = np.arange(0, cols.size + 1, k)
    return sp.csr_matrix((data, cols.ravel(), indptr), shape=(len(rows), len(rows)))


def propagate(own: np.ndarray, W: sp.csr_matrix, alpha, n_steps: int = N_STEPS) -> np.ndarray:
    """``m(n_steps)`` of the propagation of ``own`` (rows of ``W``) with neighbours' share
    ``alpha`` (a scalar or one value per column)."""
    own = np.asarray(own, dtype=np.float32)
    alpha = np.asarray(alpha, dtype=np.float32)
    m = own
    for _ in range(n_steps):
        m = (1.0 - alpha) * own + alpha * (W @ m)
    return m


def fit_spatial_mix(
    own: np.ndarray, W: sp.csr_matrix, grid: np.ndarray = ALPHA_GRID, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """alpha per column of ``own`` (spots x latent dimensions) minimising the generalised
    cross-validation score of the propagation as a smoother; returns alpha and the scores
    (``len(grid) x columns``)."""
    n, d = own.shape
    centred = own - own.mean(0)
    probes = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, N_PROBES))
    stacked = np.concatenate([centred, probes], axis=1).astype(np.float32)
    scores = np.empty((len(grid), d))
    for i, alpha in enumerate(grid):
        smoothed = propagate(stacked, W, alpha)
        trace = float((probes * smoothed[:, d:]).sum(0).mean())
        rss = ((centred - smoothed[:, :d]) ** 2).sum(0)
        scores[i] = n * rss / max(n - trace, 1.0) ** 2
    return grid[scores.argmin(0)].astype(np.float32), scores


@torch.inference_mode()
def own_posterior(model, adata_manager, rows: np.ndarray, batch_size: int = 1024):
    """Mean and variance of each spot's posterior from its own data (``len(rows) x n_latent``),
    read with the model's data loader."""
    module = model.module
    loader = model._make_data_loader(
        adata=adata_manager.adata,
        indices=np.asarray(rows, dtype=np.int64),
        batch_size=batch_size,
        shuffle=False,
        gather_niche=False,
    )
    was_training = module.training
    module.eval()
    means, variances = [], []
    try:
        for tensors in loader:
            qz = module.inference(**module._get_inference_input(tensors))["qz"]
            means.append(qz.loc.cpu().numpy())
            variances.append(qz.scale.square().cpu().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(means), np.concatenate(variances)


def domain_latent(
    model, adata_manager, rows: np.ndarray | None = None, batch_size: int = 1024, rng=None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the domain latent of ``rows`` (default: every spot); with a numpy
    ``rng``, the mean is that of one sample of the own latents, propagated.

    The variance propagates each spot's own posterior variance with the squared weights of
    every step, which treats the paths from a spot to its neighbours' neighbours as
    independent (it is a lower bound where two paths meet)."""
    neighbors = neighbor_matrix(adata_manager)
    rows = np.arange(len(neighbors)) if rows is None else np.asarray(rows, dtype=np.int64)
    needed = hop_closure(neighbors, rows, N_STEPS)
    mean, var = own_posterior(model, adata_manager, needed, batch_size)
    if rng is not None:
        mean = mean + np.sqrt(var) * rng.standard_normal(mean.shape).astype(np.float32)
    W = mean_operator(neighbors, needed)
    alpha = model.module.spatial_mix.detach().cpu().numpy()
    m = propagate(mean, W, alpha)
    W2 = W.multiply(W).tocsr()
    v = var
    for _ in range(N_STEPS):
        v = (1.0 - alpha) ** 2 * var + alpha**2 * (W2 @ v)
    at = np.searchsorted(needed, rows)
    return m[at], v[at]


def has_spatial_context(model) -> bool:
    """Whether ``model`` gives the domain latent: a neighbour graph and a fitted share."""
    return bool(model.histovi_setup_.get("spatial_context")) and bool(
        (model.module.spatial_mix > 0).any()
    )


def latent_representation(
    model, adata, indices, give_mean: bool, batch_size, spatial: bool, return_dist: bool
):
    """The body of :meth:`HistoVI.get_latent_representation` (see there) after its argument
    checks: the domain latent, or each spot's own, of the rows ``indices`` of ``adata``."""
    model._check_if_trained(warn=False)
    adata = model._validate_anndata(adata)
    manager = model.get_anndata_manager(adata)
    rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices).reshape(-1)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows)
    rows = rows.astype(np.int64)
    batch_size = batch_size or 1024
    if spatial and has_spatial_context(model):
        rng = None if give_mean else np.random.default_rng(int(scvi.settings.seed or 0))
        mean, var = domain_latent(model, manager, rows, batch_size, rng=rng)
    else:
        mean, var = own_posterior(model, manager, rows, batch_size)
        if not give_mean:
            rng = np.random.default_rng(int(scvi.settings.seed or 0))
            mean = mean + np.sqrt(var) * rng.standard_normal(mean.shape)
    if return_dist:
        return mean.astype(np.float32), var.astype(np.float32)
    return mean.astype(np.float32)


def fit_to_data(model, adata_manager, batch_size: int = 1024) -> np.ndarray:
    """Fit the module's ``spatial_mix`` to every spot of ``adata_manager``; returns alpha."""
    neighbors = neighbor_matrix(adata_manager)
    own, _ = own_posterior(model, adata_manager, np.arange(len(neighbors)), batch_size)
    alpha, _ = fit_spatial_mix(own, mean_operator(neighbors))
    with torch.no_grad():
        model.module.spatial_mix.copy_(torch.as_tensor(alpha))
    logger.info(f"Neighbours' share of the domain latent: {np.round(alpha, 2).tolist()}.")
    return alpha


class SpatialMixCallback(Callback):
    """Fit the domain latent's neighbours' share when training ends."""

    def __init__(self, model):
        self.model = model

    def on_train_end(self, trainer, pl_module) -> None:
        fit_to_data(self.model, self.model.adata_manager)
