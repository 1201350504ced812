"""The domain latent: own latents propagated over the spatial graph, the neighbours' share
fitted by generalised cross-validation after training (histovi.model._spatial)."""

import numpy as np
import torch
from _messages import raises_naming

from histovi import HistoVI
from histovi.model._spatial import (
    N_STEPS,
    fit_spatial_mix,
    hop_closure,
    mean_operator,
    propagate,
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


def _grid_neighbors(side: int) -> np.ndarray:
    """4-neighbour grid graph (edges wrap around), one row per node."""
    idx = np.arange(side * side).reshape(side, side)
    return np.stack(
        [np.roll(idx, s, axis=a).ravel() for a in (0, 1) for s in (1, -1)], axis=1
    ).astype(np.int64)


def test_hop_closure_by_hand():
    nbrs = np.array([[1], [2], [3], [4], [0]])  # a ring 0 -> 1 -> 2 -> 3 -> 4 -> 0
    np.testing.assert_array_equal(hop_closure(nbrs, np.array([0]), 0), [0])
    np.testing.assert_array_equal(hop_closure(nbrs, np.array([0]), 2), [0, 1, 2])
    np.testing.assert_array_equal(hop_closure(nbrs, np.array([3]), 9), [0, 1, 2, 3, 4])


def test_propagation_is_the_appnp_recursion():
    rng = np.random.default_rng(0)
    nbrs = _grid_neighbors(5)
    own = rng.normal(size=(25, 3)).astype(np.float32)
    alpha = np.array([0.0, 0.5, 0.9], dtype=np.float32)
    W = np.zeros((25, 25))
    for i, row in enumerate(nbrs):
        W[i, row] += 1 / nbrs.shape[1]
    m = own.astype(np.float64)
    for _ in range(N_STEPS):
        m = (1 - alpha) * own + alpha * (W @ m)
    got = propagate(own, mean_operator(nbrs), alpha)
    np.testing.assert_allclose(got, m, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], own[:, 0])  # alpha 0: the spot's own latent


def test_gcv_smooths_cell_level_variation_and_keeps_the_field():
    rng = np.random.default_rng(0)
    side = 40
    nbrs = _grid_neighbors(side)
    y, x = np.mgrid[0:side, 0:side] / side
    smooth = np.sin(2 * np.pi * x).ravel()  # one domain-scale wave
    columns = [
        smooth + rng.normal(scale=1.5, size=side * side),  # cells varying around a domain
        rng.normal(size=side * side),  # no spatial structure: no domain in it
        smooth + rng.normal(scale=0.05, size=side * side),  # already smooth
    ]
    alpha, scores = fit_spatial_mix(np.stack(columns, 1).astype(np.float32), mean_operator(nbrs))
    assert scores.shape[1] == 3 and np.isfinite(scores).all()
    # cell-level variation around a field, or with no field at all, is averaged away; a field
    # that is smooth already is left nearly as it is
    assert alpha[0] > 0.8 and alpha[1] > 0.8 and alpha[2] < alpha[0], alpha
    m = propagate(np.stack(columns, 1).astype(np.float32), mean_operator(nbrs), alpha)
    assert np.mean((m[:, 0] - smooth) ** 2) < 0.2 * np.mean((columns[0] - smooth) ** 2)
    assert m[:, 1].std() < 0.3 * columns[1].std()
    assert np.corrcoef(m[:, 2], smooth)[0, 1] > 0.99


def test_on_by_default_with_neighbours_off_without(small_adata):
    model = _model(small_adata)
    assert model.spatial_context
    assert not isinstance(model.module.spatial_mix, torch.nn.Parameter)  # not by gradient
    assert float(model.module.spatial_mix.abs().sum()) == 0  # fitted after training
    model.train(**TRAIN)
    alpha = model.module.spatial_mix.numpy()
    assert ((alpha > 0) & (alpha < 1)).all()
    own = model.get_latent_representation(spatial=False)
    domain = model.get_latent_representation()
    assert not np.allclose(own, domain)
    with raises_naming(ValueError, "spatial='domain'", "True", "False"):
        model.get_latent_representation(spatial="domain")

    for off in (_model(small_adata, neighbors=False), _model(small_adata, spatial_context=False)):
        off.train(**TRAIN)
        assert not off.spatial_context
        np.testing.assert_array_equal(
            off.get_latent_representation(), off.get_latent_representation(spatial=False)
        )


def test_a_subset_is_embedded_exactly_as_within_the_whole(small_adata):
    model = _model(small_adata)
    model.train(**TRAIN)
    whole = model.get_latent_representation()
    rows = np.array([0, 57, 58, 399])
    np.testing.assert_allclose(
        model.get_latent_representation(indices=rows), whole[rows], atol=1e-6
    )
    mask = np.zeros(small_adata.n_obs, dtype=bool)
    mask[rows] = True
    np.testing.assert_allclose(
        model.get_latent_representation(indices=mask), whole[rows], atol=1e-6
    )
    # the domain latent of a spot reads its neighbourhood: change a neighbour's counts
    other = small_adata.copy()
    nbr = int(small_adata.obsm["spatial_neighbors"][0, 0])
    counts = other.layers["counts"].toarray()
    counts[nbr] = counts[nbr][::-1]  # another spot's expression profile
    other.layers["counts"] = counts
    changed = model.get_latent_representation(other, indices=[0])
    assert not np.allclose(changed, whole[:1])
    np.testing.assert_array_equal(
        model.get_latent_representation(other, indices=[0], spatial=False),
        model.get_latent_representation(indices=[0], spatial=False),
    )


def test_samples_and_distribution(small_adata):
    model = _model(small_adata)
    model.train(**TRAIN)
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(mean, model.get_latent_representation())
    _, own_var = model.get_latent_representation(spatial=False, return_dist=True)
    assert (var > 0).all() and (var <= own_var + 1e-6).all()  # neighbours add evidence
    sample = model.get_latent_representation(give_mean=False)
    assert sample.shape == mean.shape and not np.allclose(sample, mean)


def test_save_load_keeps_the_fitted_share(small_adata, tmp_path):
    model = _model(small_adata)
    model.train(**TRAIN)
    model.save(tmp_path / "m")
    loaded = HistoVI.load(tmp_path / "m", adata=small_adata)
    np.testing.assert_array_equal(loaded.module.spatial_mix, model.module.spatial_mix)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
