"""The spatial prior: each spot's prior (and posterior) borrows from its neighbours' latent."""

import numpy as np
import pytest
import torch

from histovi import HistoVI
from histovi.data._context import context_bank, fit_spatial_precision, hop_closure

TRAIN = {"max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False}


def _model(adata, neighbors=True, **kwargs):
    HistoVI.setup_anndata(
        adata,
        layer="counts",
        batch_key="sample",
        morphology_key="X_morphology",
        neighbors_key="spatial_neighbors" if neighbors else None,
    )
    return HistoVI(adata, n_latent=4, n_hidden=16, **kwargs)


def test_on_by_default_with_neighbours_off_without(small_adata):
    assert _model(small_adata).module.spatial_prior
    assert not _model(small_adata, neighbors=False).module.spatial_prior
    assert not _model(small_adata, spatial_prior=False).module.spatial_prior


@pytest.mark.parametrize("hops", [0, 1.5, "2"])
def test_bad_hops_are_refused_by_name(small_adata, hops):
    with pytest.raises(ValueError, match="spatial_hops"):
        _model(small_adata, spatial_hops=hops)


def test_hop_closure_by_hand():
    # a path 0 - 1 - 2 - 3 - 4 (each spot's neighbours: the spots next to it)
    nbrs = np.array([[1, 1], [0, 2], [1, 3], [2, 4], [3, 3]])
    assert hop_closure(nbrs, np.array([0]), 1).tolist() == [0, 1]
    assert hop_closure(nbrs, np.array([0]), 2).tolist() == [0, 1, 2]
    assert hop_closure(nbrs, np.array([4, 0]), 1).tolist() == [0, 1, 3, 4]
    assert hop_closure(nbrs, np.array([2]), 10).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("hops", [1, 2])
def test_latent_depends_on_the_neighbours_and_a_subset_matches_the_whole(small_adata, hops):
    model = _model(small_adata, spatial_hops=hops)
    model.train(**TRAIN)
    z = model.get_latent_representation()
    assert np.isfinite(z).all()
    rows = np.array([3, 150, 151, 399])
    np.testing.assert_allclose(model.get_latent_representation(indices=rows), z[rows], atol=1e-6)
    # the same spots with other neighbours get another latent
    shuffled = small_adata.copy()
    nbrs = shuffled.obsm["spatial_neighbors"]
    # other spots' neighbour lists, within each sample (links across samples are refused)
    perm = np.arange(len(nbrs))
    rng = np.random.default_rng(0)
    for s in shuffled.obs["sample"].unique():
        rows = np.flatnonzero((shuffled.obs["sample"] == s).to_numpy())
        perm[rows] = rng.permutation(rows)
    shuffled.obsm["spatial_neighbors"] = nbrs[perm]
    del shuffled.uns["histovi"]  # the record would (rightly) flag the edited graph
    assert not np.allclose(model.get_latent_representation(shuffled), z, atol=1e-4)


def test_the_posterior_is_the_product_of_data_and_spatial_prior(small_adata):
    model = _model(small_adata, spatial_hops=2)
    model.train(**TRAIN)
    module = model.module
    lam = module.spatial_precision().detach().numpy()
    assert lam.shape == (4,) and (lam > 0).all()
    bank = context_bank(module, model.adata_manager, hops=2).bank
    nbrs = small_adata.obsm["spatial_neighbors"]
    # the bank after one Jacobi step, by hand from the spots' own-data posteriors
    from histovi.data._context import data_posteriors

    prec, wmean = data_posteriors(module, model.adata_manager, np.arange(small_adata.n_obs))
    own = wmean / (prec + 1.0)
    by_hand = (wmean + lam * own[nbrs].mean(1)) / (prec + 1.0 + lam)
    np.testing.assert_allclose(bank, by_hand, rtol=1e-4, atol=1e-5)
    z = model.get_latent_representation()
    expected = (wmean + lam * bank[nbrs].mean(1)) / (prec + 1.0 + lam)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)


def test_the_prior_precision_is_fitted_every_epoch_and_logged(small_adata):
    model = _model(small_adata)
    module = model.module
    # a buffer fitted by EM, not a parameter the optimiser (or a query) could move
    assert "spatial_log_precision" not in dict(module.named_parameters())
    before = module.spatial_log_precision.clone()
    model.train(**TRAIN)
    assert not torch.equal(before, module.spatial_log_precision)
    assert "spatial_precision_train" in model.history


def _gmrf_draw(lam, n=20_000, d=3, precision=4.0, seed=0):
    """Latents drawn from the spatial prior around given neighbour means, observed through a
    Gaussian likelihood of known precision (the spots' own data)."""
    rng = np.random.default_rng(seed)
    zbar = rng.normal(0, 1.0, (n, d))
    z = rng.normal(lam * zbar / (1 + lam), 1 / np.sqrt(1 + lam))
    obs = rng.normal(z, 1 / np.sqrt(precision))
    P = np.full((n, d), precision)
    return P, P * obs, zbar


@pytest.mark.parametrize("true_lam", [0.5, 4.0, 20.0])
def test_em_recovers_the_spatial_precision(true_lam):
    P, a, zbar = _gmrf_draw(np.full(3, true_lam))
    lam = fit_spatial_precision(P, a, zbar, np.ones(3))
    np.testing.assert_allclose(lam, true_lam, rtol=0.15)


def test_em_gives_no_spatial_context_when_neighbours_tell_nothing():
    P, a, _ = _gmrf_draw(np.zeros(3))
    unrelated = np.random.default_rng(1).normal(0, 1, a.shape)
    lam = fit_spatial_precision(P, a, unrelated, np.ones(3))
    assert (lam < 0.05).all()
    # spots whose neighbours are unknown (NaN rows) are left out of the fit
    nan_rows = unrelated.copy()
    nan_rows[:100] = np.nan
    assert np.isfinite(fit_spatial_precision(P, a, nan_rows, np.ones(3))).all()


def test_save_load_and_query_keep_the_spatial_prior(small_adata, tmp_path):
    model = _model(small_adata)
    model.train(**TRAIN)
    z = model.get_latent_representation()
    model.save(tmp_path / "m", save_anndata=False)
    loaded = HistoVI.load(tmp_path / "m", adata=small_adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
