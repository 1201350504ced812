"""Large data: the loader's neighbour gathering, backed (on-disk) counts, the count check in
slices, and the scaling benchmark's harness (benchmarks/scaling.py) on a tiny study."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from histovi import HistoVI
from histovi.data._loader import NeighborhoodDataLoader

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

TRAIN = {
    "max_epochs": 1,
    "batch_size": 32,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
}


def _setup(adata, layer=None):
    HistoVI.setup_anndata(
        adata,
        layer=layer,
        batch_key="sample",
        morphology_key="X_morphology",
        neighbors_key="spatial_neighbors",
    )


@pytest.fixture
def on_disk(small_adata, tmp_path):
    """The small study with its counts in X only, written to h5ad; (in-memory, backed)."""
    adata = ad.AnnData(
        X=small_adata.layers["counts"].copy(),
        obs=small_adata.obs.copy(),
        var=small_adata.var[[]].copy(),
        obsm={k: np.asarray(v) for k, v in small_adata.obsm.items()},
    )
    path = tmp_path / "study.h5ad"
    adata.write_h5ad(path)
    return adata, ad.read_h5ad(path, backed="r")


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_niche_counts_are_the_neighbours_summed_counts(small_adata, kind):
    adata = small_adata.copy()
    counts = adata.layers["counts"]
    adata.layers["counts"] = {
        "csr": sp.csr_matrix(counts),
        "csc": sp.csc_matrix(counts),
        "dense": counts.toarray(),
    }[kind]
    if kind == "csc":
        with pytest.warns(UserWarning, match="CSR"):  # scvi-tools' warning
            _setup(adata, layer="counts")
    else:
        _setup(adata, layer="counts")
    model = HistoVI(adata, n_latent=4, n_hidden=16)
    rows = np.array([5, 0, 77, 300, 12])
    if kind == "csc":
        with pytest.warns(UserWarning, match="a copy of the counts"):
            loader = NeighborhoodDataLoader(model.adata_manager, indices=rows, batch_size=5)
    else:
        loader = NeighborhoodDataLoader(model.adata_manager, indices=rows, batch_size=5)
    batch = next(iter(loader))
    expected = counts.toarray()[adata.obsm["spatial_neighbors"][rows]].sum(1)
    assert batch["niche_counts"].dtype == torch.float32
    np.testing.assert_array_equal(batch["niche_counts"].numpy(), expected)


def test_csr_counts_are_not_copied_by_the_loader(small_adata):
    _setup(small_adata, layer="counts")
    model = HistoVI(small_adata, n_latent=4, n_hidden=16)
    loader = NeighborhoodDataLoader(model.adata_manager, batch_size=16)
    assert loader.dataset.counts is small_adata.layers["counts"]


def test_backed_counts_train_and_embed_as_in_memory(on_disk):
    memory, backed = on_disk
    assert backed.isbacked and not sp.issparse(backed.X)
    _setup(memory)
    _setup(backed)
    model = HistoVI(memory, n_latent=4, n_hidden=16)
    model_backed = HistoVI(backed, n_latent=4, n_hidden=16)
    model_backed.module.load_state_dict(model.module.state_dict())

    # a minibatch of a backed AnnData: rows in increasing order, their neighbours' counts
    rows = np.array([40, 3, 17, 200])
    loader = NeighborhoodDataLoader(model_backed.adata_manager, indices=rows, batch_size=4)
    batch = next(iter(loader))
    order = np.sort(rows)
    counts = memory.X.toarray()
    np.testing.assert_array_equal(batch["X"].numpy(), counts[order])
    np.testing.assert_array_equal(
        batch["niche_counts"].numpy(),
        counts[memory.obsm["spatial_neighbors"][order]].sum(1),
    )

    model_backed.train(**TRAIN)
    z = model_backed.get_latent_representation()
    assert z.shape == (backed.n_obs, 4) and np.isfinite(z).all()
    # the same weights give the same latent from the counts on disk and in memory
    model.module.load_state_dict(model_backed.module.state_dict())
    model.module.eval()
    model.is_trained_ = True
    np.testing.assert_allclose(model.get_latent_representation(), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.get_latent_representation(spatial=False),
        model_backed.get_latent_representation(spatial=False),
        rtol=1e-5,
        atol=1e-6,
    )


def test_count_check_runs_in_slices(monkeypatch):
    from histovi import _validation

    monkeypatch.setattr(_validation, "_CHECK_SLICE", 7)
    X = sp.random(40, 30, density=0.3, format="csr", random_state=0)
    X.data = np.round(X.data * 10) + 1
    _validation.check_counts(ad.AnnData(X), None)
    for bad, match in ((0.5, "non-integer"), (-1.0, "negative"), (np.nan, "NaN or inf")):
        Y = X.copy()
        Y.data[-1] = bad  # in the last slice
        with pytest.raises(ValueError, match=match):
            _validation.check_counts(ad.AnnData(Y), None)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_nb_log_likelihood_matches_scvi_in_value_and_gradient(density):
    """The lean negative-binomial likelihood of the training loss (sparse and dense paths) gives
    scvi-tools' ``NegativeBinomial.log_prob(x).sum(-1)`` and its gradients."""
    from scvi.distributions import NegativeBinomial

    from histovi.module._module import nb_log_likelihood

    gen = torch.Generator().manual_seed(0)
    rate = torch.full((40, 300), -float(np.log1p(-density)))
    x = torch.poisson(rate, generator=gen) * (1 + torch.randint(0, 5, rate.shape, generator=gen))
    mu0 = torch.rand(40, 300, generator=gen) * 4 + 0.05
    log_theta0 = torch.randn(300, generator=gen)

    results = []
    for fn in (
        lambda mu, theta: NegativeBinomial(mu=mu, theta=theta).log_prob(x).sum(-1),
        lambda mu, theta: nb_log_likelihood(x, mu, theta),
    ):
        mu = mu0.clone().requires_grad_()
        log_theta = log_theta0.clone().requires_grad_()
        ll = fn(mu, log_theta.exp())
        (ll * torch.linspace(0.5, 1.5, 40)).sum().backward()
        results.append((ll.detach(), mu.grad, log_theta.grad))
    assert results[1][0].shape == (40,)
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
