"""The spatial posterior: each spot's latent given its own data and its neighbours'.

Once the encoders are trained, each spot's data (counts and views) give a Gaussian expert of its
latent, with precision ``P`` and precision-weighted mean ``a`` (the product of the expression and
view experts, :meth:`HistoVAE.inference`). The spatial prior of a spot is ``N(0, I)`` times
``N(zbar, 1 / lambda)``, ``zbar`` being the mean latent of its spatial neighbours, so that its
posterior is

    z | data, neighbours  ~  N((a' + lambda zbar) / (P' + 1 + lambda), 1 / (P' + 1 + lambda))

where ``a' = beta a`` and ``P' = beta P``: the encoders were trained with KL weight ``beta``
(below 1 for the whole of HistoVI's default training), which makes their posteriors narrower than
the evidence by ``1 / beta``; the spatial posterior uses the evidence as it is.

The neighbours' mean is edge-preserving: neighbour ``j`` of spot ``i`` weighs
``exp(-|m_i - m_j|^2 / (2 h^2))``, ``m`` being the spots' own posterior means and ``h^2`` the
median of ``|m_i - m_j|^2`` over the graph's edges, so that a spot borrows from the neighbours
that look like it, not across a domain boundary (a bilateral filter on the graph).

``lambda`` (one per latent dimension) is fitted by empirical Bayes after training
(:func:`fit_spatial_precision`): large where a spot's latent is well predicted by its
neighbours' (smooth, layered tissue), small where it is not, and a spot's own evidence ``P'``
sets how much it borrows (shallow spots borrow more). Only the spots within one step of the
graph are needed to embed a subset, so a subset is embedded exactly as within the whole data.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ..module._module import NEIGHBORS_REGISTRY_KEY

logger = logging.getLogger(__name__)

#: lambda is kept above this (its logarithm is stored): 1e-3 is no spatial context at all.
MIN_SPATIAL_PRECISION = 1e-3


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


@torch.no_grad()
def data_posteriors(
    module, adata_manager, rows: np.ndarray, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Natural parameters of each spot's posterior from its own data (expression and views,
    without any prior): precision and precision-weighted mean, each ``len(rows) x n_latent``."""
    keys = [k for k in adata_manager.data_registry if k != NEIGHBORS_REGISTRY_KEY]
    dataset = adata_manager.create_torch_dataset(data_and_attributes=keys)
    was_training = module.training
    module.eval()
    precision, weighted_mean = [], []
    try:
        for start in range(0, len(rows), batch_size):
            tensors = dataset[rows[start : start + batch_size]]
            tensors = {
                key: torch.as_tensor(np.asarray(value)).to(module.device)
                for key, value in tensors.items()
            }
            out = module.inference(**module._get_inference_input(tensors))
            precision.append(out["data_precision"].cpu().numpy())
            weighted_mean.append(out["data_weighted_mean"].cpu().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(precision), np.concatenate(weighted_mean)


def neighbor_mean(own: np.ndarray, neighbors: np.ndarray, bandwidth: float) -> np.ndarray:
    """Edge-preserving mean of the neighbours' latents (``len(neighbors) x n_latent``):
    weights ``exp(-|own_i - own_j|^2 / (2 bandwidth))``; ``own`` is indexed by the global row
    numbers in ``neighbors``, whose rows are the spots to average for."""
    return _weighted_neighbor_mean(own, neighbors, bandwidth)[0]


def _weighted_neighbor_mean(own, neighbors, bandwidth, rows=None):
    rows = np.arange(len(neighbors)) if rows is None else rows
    nbr = own[neighbors]  # (n, k, d)
    d2 = ((own[rows][:, None, :] - nbr) ** 2).sum(-1)
    weights = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2.0 * bandwidth))
    weights /= weights.sum(1, keepdims=True)
    return (weights[..., None] * nbr).sum(1), d2


def spatial_marginal_loglik(
    data_precision: np.ndarray,
    data_weighted_mean: np.ndarray,
    neighbor_latent: np.ndarray,
    lam: np.ndarray,
) -> np.ndarray:
    """Mean log-likelihood per spot of the spots' own evidence under the spatial prior, one
    value per latent dimension: the evidence ``y = a / P`` of a spot is ``N(z, 1 / P)`` and
    its latent ``z ~ N(lambda zbar / (1 + lambda), 1 / (1 + lambda))``, so
    ``y ~ N(lambda zbar / (1 + lambda), 1 / (1 + lambda) + 1 / P)``."""
    y = data_weighted_mean / data_precision
    var = 1.0 / (1.0 + lam) + 1.0 / data_precision
    resid = y - lam * neighbor_latent / (1.0 + lam)
    return (-0.5 * np.log(var) - 0.5 * resid**2 / var).mean(0)


def fit_spatial_precision(
    data_precision: np.ndarray,
    data_weighted_mean: np.ndarray,
    neighbor_latent: np.ndarray,
) -> np.ndarray:
    """Empirical-Bayes fit of the spatial prior's precision lambda, per latent dimension.

    Each spot's own data give a Gaussian likelihood of its latent (precision ``P``, weighted
    mean ``a``); the prior is ``N(0, 1) x N(zbar, 1 / lambda)``, with ``zbar`` the neighbours'
    mean latent. lambda maximises the marginal likelihood of the spots' evidence
    (:func:`spatial_marginal_loglik`, a one-dimensional search per latent dimension): large
    where a spot's latent is well predicted by its neighbours', ``MIN_SPATIAL_PRECISION`` where
    it is not, and at most ``median(P) + 1``, so that a typical spot's neighbours never outweigh
    its own evidence and the ``N(0, 1)`` prior together. Rows of ``neighbor_latent`` with NaN
    (unknown neighbours) are left out.
    """
    from scipy.optimize import minimize_scalar

    known = ~np.isnan(neighbor_latent).any(1)
    P = data_precision[known].astype(np.float64)
    a = data_weighted_mean[known].astype(np.float64)
    zbar = neighbor_latent[known].astype(np.float64)
    n_latent = data_precision.shape[1]
    if not len(P):
        return np.full(n_latent, MIN_SPATIAL_PRECISION)
    lam = np.empty(n_latent)
    for d in range(n_latent):
        # the neighbours of a typical spot never outweigh its own evidence and the N(0, 1)
        # prior together: with weak evidence (a short training) the marginal likelihood alone
        # can ask for lambda -> infinity, i.e. a latent that is only the neighbours' mean
        cap = min(MAX_SPATIAL_PRECISION, float(np.median(P[:, d])) + 1.0)
        lo, hi = np.log(MIN_SPATIAL_PRECISION), np.log(max(cap, MIN_SPATIAL_PRECISION))
        grid = np.linspace(lo, hi, 41)
        cols = (P[:, [d]], a[:, [d]], zbar[:, [d]])

        def loss(t, cols=cols):
            return -float(spatial_marginal_loglik(*cols, np.exp(t))[0])

        best = int(np.argmin([loss(t) for t in grid]))
        bounds = (grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)])
        lam[d] = np.exp(minimize_scalar(loss, bounds=bounds, method="bounded").x)
    return lam


#: the upper end of the search for lambda: a spot's prior sd 0.01 around its neighbours' mean
MAX_SPATIAL_PRECISION = 1e4


def _neighbors(adata_manager) -> np.ndarray:
    return np.asarray(adata_manager.get_from_registry(NEIGHBORS_REGISTRY_KEY), dtype=np.int64)


#: The two scales of the spatial posterior (rows of the module's spatial buffers).
SCALES = ("spot", "domain")


def _scaled_evidence(module, precision, weighted_mean, scale: str):
    """The spots' evidence at a scale: as the encoders give it (``"spot"``), or tempered by the
    KL weight they were trained with (``"domain"``)."""
    beta = 1.0 if scale == "spot" else float(module.evidence_scale)
    return beta * precision, beta * weighted_mean


def _scale_index(scale: str) -> int:
    if scale not in SCALES:
        raise ValueError(f"spatial={scale!r}: pass 'spot', 'domain', True or False.")
    return SCALES.index(scale)


def spatial_posterior(
    module,
    adata_manager,
    rows: np.ndarray | None = None,
    scale: str = "spot",
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the spatial posterior of ``rows`` (default: every spot) at
    ``scale``, with the module's fitted lambda, evidence scale and bandwidth."""
    k = _scale_index(scale)
    neighbors = _neighbors(adata_manager)
    rows = np.arange(len(neighbors)) if rows is None else np.asarray(rows, dtype=np.int64)
    needed = hop_closure(neighbors, rows, 1)
    precision, weighted_mean = data_posteriors(module, adata_manager, needed, batch_size)
    precision, weighted_mean = _scaled_evidence(module, precision, weighted_mean, scale)
    own = np.full((len(neighbors), precision.shape[1]), np.nan, dtype=np.float32)
    own[needed] = weighted_mean / (precision + 1.0)
    bandwidth = float(module.neighbor_bandwidth[k])
    zbar, _ = _weighted_neighbor_mean(own, neighbors[rows], bandwidth, rows=rows)
    lam = module.spatial_precision(scale).detach().cpu().numpy()
    at = np.searchsorted(needed, rows)
    total = precision[at] + 1.0 + lam
    return (
        ((weighted_mean[at] + lam * zbar) / total).astype(np.float32),
        (1.0 / total).astype(np.float32),
    )


def fit_spatial_prior(
    module, adata_manager, evidence_scale: float, batch_size: int = 1024
) -> dict[str, np.ndarray]:
    """Fit the spatial prior of a trained module to its data (every spot), at both scales:
    sets the module's evidence scale (the KL weight its encoders were trained with), the
    bandwidth of the neighbour weights and lambda (:func:`fit_spatial_precision`) of each.
    Returns lambda by scale."""
    neighbors = _neighbors(adata_manager)
    rows = np.arange(len(neighbors))
    raw_precision, raw_weighted_mean = data_posteriors(module, adata_manager, rows, batch_size)
    with torch.no_grad():
        module.evidence_scale.fill_(float(np.clip(evidence_scale, 1e-3, 1.0)))
    fitted = {}
    for k, scale in enumerate(SCALES):
        precision, weighted_mean = _scaled_evidence(module, raw_precision, raw_weighted_mean, scale)
        own = weighted_mean / (precision + 1.0)
        d2 = ((own[:, None, :] - own[neighbors]) ** 2).sum(-1)
        bandwidth = float(max(np.median(d2), 1e-8))
        zbar, _ = _weighted_neighbor_mean(own, neighbors, bandwidth)
        lam = fit_spatial_precision(precision, weighted_mean, zbar)
        with torch.no_grad():
            module.neighbor_bandwidth[k] = bandwidth
            module.spatial_log_precision[k] = torch.as_tensor(np.log(lam))
        fitted[scale] = lam
    return fitted


class SpatialPriorCallback(Callback):
    """Fit the spatial prior when training ends, with the KL weight the encoders ended at."""

    def __init__(self, adata_manager):
        self.adata_manager = adata_manager
        self.kl_weight = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # the KL weight of the epoch being trained (at the end of training the plan's property
        # already reads the next epoch's)
        self.kl_weight = float(getattr(pl_module, "kl_weight", 1.0))

    def on_train_end(self, trainer, pl_module) -> None:
        beta = self.kl_weight if self.kl_weight is not None else 1.0
        fitted = fit_spatial_prior(pl_module.module, self.adata_manager, evidence_scale=beta)
        for scale, lam in fitted.items():
            logger.info(f"Spatial prior ({scale}): lambda {np.round(lam, 2).tolist()}.")
