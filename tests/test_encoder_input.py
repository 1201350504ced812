"""The encoder input (depth-normalised counts) and the simulated expression-embedding view."""

import numpy as np
import pytest
import scvi
import torch
from _messages import raises_naming

import histovi
from histovi import HistoVI

TRAIN = {"max_epochs": 4, "enable_progress_bar": False, "enable_model_summary": False}


def _model(adata, **kwargs):
    scvi.settings.seed = 0
    HistoVI.setup_anndata(
        adata,
        layer="counts",
        batch_key="sample",
        morphology_key="X_morphology",
        neighbors_key="spatial_neighbors",
    )
    return HistoVI(adata, n_latent=4, n_hidden=32, **kwargs)


@pytest.mark.parametrize("dim", [0, 6])
def test_simulated_expression_embedding_leaves_the_rest_unchanged(dim):
    kwargs = {"grid_size": (8, 8), "n_genes": 100, "n_markers": 10, "n_patients": 2}
    plain = histovi.datasets.simulate(**kwargs)
    with_fm = histovi.datasets.simulate(expression_embedding_dim=dim, **kwargs)
    assert (plain.X != with_fm.X).nnz == 0
    np.testing.assert_array_equal(plain.obs["domain"], with_fm.obs["domain"])
    if dim:
        assert with_fm.obsm["X_fm"].shape == (with_fm.n_obs, dim)
        again = histovi.datasets.simulate(expression_embedding_dim=dim, **kwargs)
        np.testing.assert_array_equal(with_fm.obsm["X_fm"], again.obsm["X_fm"])
    else:
        assert "X_fm" not in with_fm.obsm


@pytest.mark.parametrize(
    "kwargs", [{"niche_weight": -1.0}, {"niche_weight": float("nan")}, {"view_dropout": 1.5}]
)
def test_bad_weights_are_refused_by_name(small_adata, kwargs):
    name = next(iter(kwargs))
    with raises_naming(ValueError, f"{name}=", "pass a"):
        _model(small_adata, **kwargs)


def test_normalized_input_keeps_sequencing_depth_out_of_z(small_adata):
    """With normalize_input the posterior of a spot ignores its depth (the decoder models it)."""
    for normalize, depth_free in ((True, True), (False, False)):
        model = _model(small_adata, normalize_input=normalize)
        module = model.module.eval()
        tensors = next(iter(model._make_data_loader(model.adata, batch_size=16)))
        inputs = module._get_inference_input(tensors)
        deeper = dict(inputs, x=inputs["x"] * 3)
        with torch.no_grad():
            mean = module.inference(**inputs)["qz"].loc
            mean_deeper = module.inference(**deeper)["qz"].loc
        assert torch.allclose(mean, mean_deeper, atol=1e-5) == depth_free


def test_saved_models_load_with_the_encoder_input_they_were_trained_with(small_adata, tmp_path):
    model = _model(small_adata, normalize_input=False)
    model.train(**TRAIN)
    z = model.get_latent_representation()
    model.save(tmp_path / "m", save_anndata=False)
    loaded = HistoVI.load(tmp_path / "m", adata=small_adata)
    assert loaded.module.normalize_input is False
    assert np.array_equal(loaded.get_latent_representation(), z)
    assert _model(small_adata).module.normalize_input is True


def test_normalize_input_must_be_a_bool(small_adata):
    with raises_naming(ValueError, "normalize_input='yes'", "True", "False"):
        _model(small_adata, normalize_input="yes")
