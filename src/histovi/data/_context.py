"""The spatial prior's context: the latent of each spot's neighbours, computed once per epoch.

HistoVAE's spatial prior centres a spot's prior on the mean latent of its spatial neighbours.
Encoding the k neighbours of every spot inside each minibatch would cost k extra encoder passes;
instead the latents of all spots are computed once per epoch with the current encoders (one
forward pass, no gradients) into a *bank*, and the data loader hands each minibatch the mean of
its spots' neighbour rows (an n x k gather of n_latent-wide rows: never an n x n matrix).

A bank row is the posterior mean after ``hops - 1`` rounds of the spatial prior, starting from
each spot's own data: with ``hops=1`` a spot's prior is centred on what its neighbours' own data
say; with ``hops=2`` the neighbours are first smoothed by theirs, and so on (Jacobi iterations
of the Gaussian Markov random field's mean). Rows needed for ``rows`` are those within ``hops``
steps of the graph, so a subset of spots is embedded exactly as in the whole data set.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ..module._module import NEIGHBORS_REGISTRY_KEY


class NeighborContext:
    """A bank of latent rows (``n_obs x n_latent``, NaN where not computed) that data loaders
    read to give each minibatch the mean latent of its spots' neighbours."""

    def __init__(self, neighbors: np.ndarray, bank: np.ndarray | None = None):
        self.neighbors = np.asarray(neighbors, dtype=np.int64)
        self.bank = bank

    def neighbor_mean(self, rows: np.ndarray) -> np.ndarray | None:
        if self.bank is None:
            return None
        # a NaN row (a neighbour outside the bank) makes the spot keep the standard prior
        return self.bank[self.neighbors[rows]].mean(1)


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


def fit_spatial_precision(
    data_precision: np.ndarray,
    data_weighted_mean: np.ndarray,
    neighbor_mean: np.ndarray,
    lam: np.ndarray,
    n_iter: int = 100,
    tol: float = 1e-4,
) -> np.ndarray:
    """Empirical-Bayes fit of the spatial prior's precision lambda, per latent dimension.

    Each spot's own data give a Gaussian likelihood of its latent (precision ``P``, weighted
    mean ``a``); the prior is ``N(0, 1) x N(zbar, 1 / lambda)``, with ``zbar`` the neighbours'
    mean latent. Expectation-maximisation of the marginal likelihood: the E-step is the
    posterior ``N((a + lambda zbar) / u', 1 / u')`` with ``u' = P + 1 + lambda``; the M-step has
    a closed form, ``1 + lambda = (1 + sqrt(1 + 4 D C)) / (2 D)`` with ``D`` the mean of
    ``E(z - zbar)^2`` and ``C`` the mean of ``zbar^2`` over the spots. lambda is large where a
    spot's latent is well predicted by its neighbours' (smooth tissue) and 0 where it is not.
    """
    known = ~np.isnan(neighbor_mean).any(1)
    P = data_precision[known].astype(np.float64)
    a = data_weighted_mean[known].astype(np.float64)
    zbar = neighbor_mean[known].astype(np.float64)
    lam = np.asarray(lam, dtype=np.float64).copy()
    if not len(P):
        return lam
    C = (zbar**2).mean(0)
    for _ in range(n_iter):
        precision = P + 1.0 + lam
        mu = (a + lam * zbar) / precision
        D = (1.0 / precision + (mu - zbar) ** 2).mean(0)
        u = (1.0 + np.sqrt(1.0 + 4.0 * D * C)) / (2.0 * D)
        new = np.maximum(u - 1.0, MIN_SPATIAL_PRECISION)
        done = np.max(np.abs(np.log(new) - np.log(lam))) < tol
        lam = new
        if done:
            break
    return lam


#: lambda is kept above this (its logarithm is stored): 1e-3 is no spatial context at all.
MIN_SPATIAL_PRECISION = 1e-3


def context_bank(
    module,
    adata_manager,
    rows: np.ndarray | None = None,
    hops: int = 1,
    batch_size: int = 1024,
    fit_precision: bool = False,
) -> NeighborContext:
    """The bank from which the neighbours of ``rows`` (default: every spot) get their latent.

    ``fit_precision``: first refit the module's spatial precision to the spots' current
    posteriors (:func:`fit_spatial_precision`; training only, with ``rows`` = every spot)."""
    neighbors = np.asarray(adata_manager.get_from_registry(NEIGHBORS_REGISTRY_KEY), dtype=np.int64)
    n_obs = len(neighbors)
    rows = np.arange(n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    hops = max(int(hops), 1)
    needed = hop_closure(neighbors, rows, hops)
    data_precision, data_weighted_mean = data_posteriors(module, adata_manager, needed, batch_size)
    own = np.full((n_obs, data_precision.shape[1]), np.nan, dtype=np.float32)
    own[needed] = data_weighted_mean / (data_precision + 1.0)

    def smoothed(lam):
        bank = own.copy()
        for _ in range(hops - 1):
            # one Jacobi step of the spatial prior; rows at the edge of `needed` read NaN and
            # keep their previous value, which only rows farther than `hops` from `rows` use
            nbr_mean = bank[neighbors[needed]].mean(1)
            known = ~np.isnan(nbr_mean).any(1)
            new = (data_weighted_mean + lam * np.nan_to_num(nbr_mean)) / (
                data_precision + 1.0 + lam
            )
            current = bank[needed]
            current[known] = new[known]
            bank[needed] = current
        return bank

    lam = module.spatial_precision().detach().cpu().numpy()
    bank = smoothed(lam)
    if fit_precision:
        lam = fit_spatial_precision(
            data_precision, data_weighted_mean, bank[neighbors[needed]].mean(1), lam
        )
        with torch.no_grad():
            module.spatial_log_precision.copy_(torch.as_tensor(np.log(lam)))
        if hops > 1:
            bank = smoothed(lam.astype(np.float32))
    return NeighborContext(neighbors, bank)


class NeighborContextCallback(Callback):
    """Refresh the bank of the training (and validation) loaders at the start of every epoch,
    after refitting the spatial prior's precision (unless ``fit_precision`` is off, as for a
    query mapped into a frozen reference); refit it once more when training ends."""

    def __init__(
        self, context: NeighborContext, adata_manager, hops: int = 1, fit_precision: bool = True
    ):
        self.context = context
        self.adata_manager = adata_manager
        self.hops = hops
        self.fit_precision = fit_precision

    def _refresh(self, module) -> None:
        fresh = context_bank(
            module, self.adata_manager, hops=self.hops, fit_precision=self.fit_precision
        )
        self.context.bank = fresh.bank

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._refresh(pl_module.module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.fit_precision:
            self._refresh(pl_module.module)
