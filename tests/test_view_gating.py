"""View gates: a view's expert enters the latent as far as it helps to explain the counts."""

import numpy as np
import pytest
import torch

from histovi import HistoVI

TRAIN = {"max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False}


def _model(adata, **kwargs):
    HistoVI.setup_anndata(
        adata,
        layer="counts",
        batch_key="sample",
        morphology_key="X_morphology",
        embedding_keys={"noise": "noise"},
        neighbors_key="spatial_neighbors",
    )
    return HistoVI(adata, n_latent=4, n_hidden=16, **kwargs)


@pytest.fixture
def adata(small_adata):
    rng = np.random.default_rng(0)
    small_adata.obsm["noise"] = rng.normal(0, 1, (small_adata.n_obs, 5)).astype(np.float32)
    return small_adata


def test_gates_per_view_and_latent_dimension_on_by_default(adata):
    module = _model(adata).module
    gates = module.view_gates()
    assert set(gates) == {"morphology", "noise"}
    assert all(g.shape == (4,) and torch.all(g == 1) for g in gates.values())
    assert "view_log_gates" in dict(module.named_parameters())
    plain = _model(adata, view_gating=False).module
    assert all(g is None for g in plain.view_gates().values())


def _losses(model, gates_value=None):
    module = model.module
    if gates_value is not None:
        with torch.no_grad():
            module.view_log_gates.fill_(gates_value)
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    module.train()
    torch.manual_seed(0)
    inference = module.inference(**module._get_inference_input(tensors))
    generative = module.generative(**module._get_generative_input(tensors, inference))
    return module, inference, module.loss(tensors, inference, generative)


def test_only_the_counts_open_or_close_a_gate(adata):
    model = _model(adata)
    module, _, out = _losses(model)
    rec = out.reconstruction_loss
    view_terms = (rec["morphology"] + rec["noise"]).mean()
    (grad,) = torch.autograd.grad(view_terms, module.view_log_gates, allow_unused=True)
    assert grad is None or torch.all(grad == 0)
    (grad,) = torch.autograd.grad(rec["expression"].mean(), module.view_log_gates)
    assert torch.any(grad != 0)
    # the encoders still learn from every view's reconstruction
    (grad,) = torch.autograd.grad(
        view_terms, module.view_encoders["noise"].encoder.fc_layers[0][0].weight
    )
    assert torch.any(grad != 0)


def test_a_closed_gate_removes_the_view_from_the_posterior(adata):
    model = _model(adata)
    module, inference, _ = _losses(model, gates_value=-30.0)
    module.eval()
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    closed = module.inference(**module._get_inference_input(tensors))
    mu_x, var_x = closed["experts"]["expression"]
    expected = (mu_x / var_x) / (1.0 + 1.0 / var_x)
    torch.testing.assert_close(closed["qz"].loc, expected, rtol=1e-4, atol=1e-5)


def test_training_moves_the_gates_and_old_models_load_with_open_gates(adata, tmp_path):
    model = _model(adata)
    model.train(**TRAIN)
    gates = model.module.view_log_gates.detach().clone()
    assert not torch.all(gates == 0)
    z = model.get_latent_representation()
    model.save(tmp_path / "m", save_anndata=False)
    np.testing.assert_array_equal(
        HistoVI.load(tmp_path / "m", adata=adata).get_latent_representation(), z
    )
    path = tmp_path / "m" / "model.pt"
    saved = torch.load(path, weights_only=True)
    del saved["model_state_dict"]["view_log_gates"]
    torch.save(saved, path)
    old = HistoVI.load(tmp_path / "m", adata=adata)
    assert torch.all(old.module.view_log_gates == 0)
