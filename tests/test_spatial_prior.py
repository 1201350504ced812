"""The spatial prior: each spot's prior (and posterior) borrows from its neighbours' latent."""

import numpy as np
import pytest
import torch

from histovi import HistoVI
from histovi.data._context import context_bank, hop_closure

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
    perm = np.random.default_rng(0).permutation(len(nbrs))
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


def test_the_prior_precision_is_learnt_and_logged(small_adata):
    model = _model(small_adata)
    before = model.module.spatial_log_precision.detach().clone()
    model.train(**TRAIN)
    assert not torch.equal(before, model.module.spatial_log_precision.detach())
    assert "spatial_precision_train" in model.history


def test_the_elbo_cannot_move_the_prior_precision(small_adata):
    """lambda is fitted to the posteriors only (empirical Bayes): the reconstruction and KL
    terms of the ELBO give it no gradient."""
    model = _model(small_adata)
    module = model.module
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    module.train()
    inference = module.inference(**module._get_inference_input(tensors))
    assert inference["pz_fit"] is not None
    generative = module.generative(**module._get_generative_input(tensors, inference))
    out = module.loss(tensors, inference, generative)
    elbo = out.reconstruction_loss["expression"].mean() + out.kl_local["kl_z"].mean()
    (grad,) = torch.autograd.grad(elbo, module.spatial_log_precision, allow_unused=True)
    assert grad is None or torch.all(grad == 0)
    (grad,) = torch.autograd.grad(out.loss, module.spatial_log_precision)
    assert torch.any(grad != 0)


def test_save_load_and_query_keep_the_spatial_prior(small_adata, tmp_path):
    model = _model(small_adata)
    model.train(**TRAIN)
    z = model.get_latent_representation()
    model.save(tmp_path / "m", save_anndata=False)
    loaded = HistoVI.load(tmp_path / "m", adata=small_adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
