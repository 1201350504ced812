"""The spatial prior: after training, a spot's latent is its posterior given its own data and its
neighbours' (histovi.data._spatial)."""

import numpy as np
import pytest
import torch

from histovi import HistoVI
from histovi.data._spatial import (
    data_posteriors,
    fit_spatial_precision,
    hop_closure,
    neighbor_mean,
    spatial_marginal_loglik,
)

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
    model = _model(small_adata, spatial_prior=False)
    assert not model.module.spatial_prior
    model.train(**TRAIN)
    with pytest.raises(ValueError, match="spatial_prior"):
        model.get_latent_representation(spatial=True)
    # a misspelled scale names the argument and the values it takes
    with pytest.raises(
        ValueError, match=r"spatial='dommain': pass 'spot', 'domain', True or False"
    ):
        model.get_latent_representation(spatial="dommain")


def test_hop_closure_by_hand():
    # a path 0 - 1 - 2 - 3 - 4 (each spot's neighbours: the spots next to it)
    nbrs = np.array([[1, 1], [0, 2], [1, 3], [2, 4], [3, 3]])
    assert hop_closure(nbrs, np.array([0]), 1).tolist() == [0, 1]
    assert hop_closure(nbrs, np.array([0]), 2).tolist() == [0, 1, 2]
    assert hop_closure(nbrs, np.array([4, 0]), 1).tolist() == [0, 1, 3, 4]
    assert hop_closure(nbrs, np.array([2]), 10).tolist() == [0, 1, 2, 3, 4]


def test_neighbour_mean_weighs_look_alike_neighbours_more():
    own = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    nbrs = np.array([[1, 2], [0, 2], [0, 1]])
    wide = neighbor_mean(own, nbrs, bandwidth=1e6)  # plain mean
    np.testing.assert_allclose(wide, own[nbrs].mean(1), atol=1e-4)
    sharp = neighbor_mean(own, nbrs, bandwidth=0.5)
    # spot 0 borrows from spot 1 (close), hardly from spot 2 across the "boundary"
    np.testing.assert_allclose(sharp[0], own[1], atol=1e-3)


def test_latent_depends_on_the_neighbours_and_a_subset_matches_the_whole(small_adata):
    model = _model(small_adata)
    model.train(**TRAIN)
    z = model.get_latent_representation()
    assert np.isfinite(z).all()
    rows = np.array([3, 150, 151, 399])
    np.testing.assert_allclose(model.get_latent_representation(indices=rows), z[rows], atol=1e-6)
    mask = np.zeros(small_adata.n_obs, dtype=bool)
    mask[rows] = True
    np.testing.assert_allclose(model.get_latent_representation(indices=mask), z[rows], atol=1e-6)
    own = model.get_latent_representation(spatial=False)
    assert not np.allclose(own, z, atol=1e-4)
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


@pytest.mark.parametrize("scale", ["spot", "domain"])
def test_the_latent_is_the_posterior_under_the_fitted_spatial_prior(small_adata, scale):
    model = _model(small_adata)
    model.train(**TRAIN)
    module = model.module
    lam = module.spatial_precision(scale).detach().numpy()
    assert lam.shape == (4,) and (lam > 0).all()
    # the KL weight of the last epoch trained (epoch 2 of a warm-up over 4.5 x 3 epochs)
    assert float(module.evidence_scale) == pytest.approx(2 / round(4.5 * 3))
    # "spot" reads the encoders' evidence as it is, "domain" tempered by that KL weight
    beta = 1.0 if scale == "spot" else float(module.evidence_scale)
    prec, wmean = data_posteriors(module, model.adata_manager, np.arange(small_adata.n_obs))
    prec, wmean = beta * prec, beta * wmean
    own = wmean / (prec + 1.0)
    bandwidth = float(module.neighbor_bandwidth[["spot", "domain"].index(scale)])
    zbar = neighbor_mean(own, small_adata.obsm["spatial_neighbors"], bandwidth)
    expected = (wmean + lam * zbar) / (prec + 1.0 + lam)
    mean, var = model.get_latent_representation(spatial=scale, return_dist=True)
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, 1.0 / (prec + 1.0 + lam), rtol=1e-4)
    if scale == "spot":
        np.testing.assert_array_equal(model.get_latent_representation(spatial=True), mean)
        np.testing.assert_array_equal(model.get_latent_representation(), mean)
    # lambda maximises the marginal likelihood of the spots' evidence (or sits at its cap)
    args = [np.asarray(v, dtype=np.float64) for v in (prec, wmean, zbar)]
    best = spatial_marginal_loglik(*args, lam)
    cap = np.median(args[0], 0) + 1.0
    for factor in (0.8, 1.25):
        other = np.clip(lam * factor, 1e-3, cap)
        assert np.all(best >= spatial_marginal_loglik(*args, other) - 1e-5)
    sample = model.get_latent_representation(spatial=scale, give_mean=False)
    assert sample.shape == mean.shape and not np.allclose(sample, mean)
    with pytest.raises(ValueError, match="spatial="):
        model.get_latent_representation(spatial="layers")


def test_the_neighbours_never_outweigh_a_typical_spot():
    P, a, zbar = _gmrf_draw(np.full(3, 1e6), precision=0.5)
    lam = fit_spatial_precision(P, a, zbar)
    np.testing.assert_allclose(lam, 1.5, rtol=1e-3)  # the cap: median(P) + 1


def test_the_spatial_prior_is_fitted_after_training_not_by_gradient(small_adata):
    model = _model(small_adata)
    module = model.module
    assert "spatial_log_precision" not in dict(module.named_parameters())
    before = module.spatial_log_precision.clone()
    model.train(**TRAIN)
    assert not torch.equal(before, module.spatial_log_precision)


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
def test_empirical_bayes_recovers_the_spatial_precision(true_lam):
    # evidence precise enough that the cap (median precision + 1) does not bind
    P, a, zbar = _gmrf_draw(np.full(3, true_lam), precision=40.0)
    lam = fit_spatial_precision(P, a, zbar)
    np.testing.assert_allclose(lam, true_lam, rtol=0.15)


def test_no_spatial_context_when_neighbours_tell_nothing():
    P, a, _ = _gmrf_draw(np.zeros(3))
    unrelated = np.random.default_rng(1).normal(0, 1, a.shape)
    lam = fit_spatial_precision(P, a, unrelated)
    assert (lam < 0.05).all()
    # spots whose neighbours are unknown (NaN rows) are left out of the fit
    nan_rows = unrelated.copy()
    nan_rows[:100] = np.nan
    assert np.isfinite(fit_spatial_precision(P, a, nan_rows)).all()


def test_save_load_keeps_the_spatial_prior_and_old_models_load_without_it(small_adata, tmp_path):
    model = _model(small_adata)
    model.train(**TRAIN)
    z = model.get_latent_representation()
    model.save(tmp_path / "m", save_anndata=False)
    loaded = HistoVI.load(tmp_path / "m", adata=small_adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    # a model saved before the spatial prior existed: no buffers in its state
    path = tmp_path / "m" / "model.pt"
    saved = torch.load(path, weights_only=True)
    for key in ("spatial_log_precision", "evidence_scale", "neighbor_bandwidth"):
        del saved["model_state_dict"][key]
    torch.save(saved, path)
    old = HistoVI.load(tmp_path / "m", adata=small_adata)
    assert (old.module.spatial_log_precision.exp() <= 1e-3 + 1e-9).all()
    own = old.get_latent_representation(spatial=False)
    np.testing.assert_allclose(old.get_latent_representation(), own, atol=0.02)
