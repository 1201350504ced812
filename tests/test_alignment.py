"""Alignment terms across samples: latent cycle consistency and mutual-nearest-neighbour anchors."""

import numpy as np
import pytest
import scvi
import torch

import histovi
from histovi import HistoVI
from histovi.data._anchors import AnchorCallback, mutual_nearest_neighbors

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


def test_mutual_nearest_neighbors_by_hand():
    # batch 0 at 0, 1, 10; batch 1 at 0.1, 10.2, 50. With k = 1: 0<->0.1 and 10<->10.2 are
    # mutual; 1's nearest is 0.1, but 0.1's nearest is 0, so 1 has no partner; 50's nearest
    # is 10, whose nearest is 10.2, so 50 has none either.
    z = np.array([[0.0], [1.0], [10.0], [0.1], [10.2], [50.0]])
    batches = np.array([0, 0, 0, 1, 1, 1])
    i, j = mutual_nearest_neighbors(z, batches, k=1)
    pairs = set(zip(i.tolist(), j.tolist(), strict=True))
    assert pairs == {(0, 3), (3, 0), (2, 4), (4, 2)}
    # never within a batch, and symmetric for larger k
    i, j = mutual_nearest_neighbors(z, batches, k=2)
    assert (batches[i] != batches[j]).all()
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(
        zip(j.tolist(), i.tolist(), strict=True)
    )


def test_mutual_nearest_neighbors_single_batch_is_empty():
    i, j = mutual_nearest_neighbors(np.random.default_rng(0).normal(size=(5, 2)), np.zeros(5))
    assert len(i) == len(j) == 0


def test_cycle_consistency_trains_and_is_logged(small_adata):
    model = _model(small_adata, cycle_weight=2.0, alignment_weight=0.0)
    model.train(**TRAIN)
    assert "cycle_train" in model.history
    assert "adversarial_ce_train" not in model.history
    cycle = model.history["cycle_train"].to_numpy(dtype=float).ravel()
    assert np.isfinite(cycle).all() and (cycle >= 0).all()
    assert np.isfinite(model.get_latent_representation()).all()


def test_cycle_goes_through_another_sample_and_trains_encoder_and_decoder(small_adata):
    model = _model(small_adata, cycle_weight=1.0, alignment_weight=0.0)
    module = model.module
    batch = torch.arange(module.n_batch).repeat(500).view(-1, 1)
    other = module._other_samples(batch)
    assert (other != batch).all()
    # uniform over the other samples: every other code turns up for every sample
    for b in range(module.n_batch):
        seen = set(other[batch == b].tolist())
        assert seen == set(range(module.n_batch)) - {b}
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=32)))
    module.train()
    inference = module.inference(**module._get_inference_input(tensors))
    loss = module._cycle_loss(tensors, inference)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    # the views take part in the cycle too (decoded in the other sample, re-encoded), so the
    # latent keeps what only the morphology tells
    for net in (
        module.z_encoder,
        module.decoder,
        *module.view_encoders.values(),
        *module.view_decoders.values(),
    ):
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


def test_anchor_callback_sets_targets_and_pulls(small_adata):
    model = _model(small_adata, anchor_weight=5.0)
    model.train(**TRAIN)
    history = model.history
    assert "anchor_train" in history and "anchored_spots" in history
    share = history["anchored_spots"].to_numpy(dtype=float).ravel()
    assert ((share > 0) & (share <= 1)).all()


def test_anchor_targets_are_means_of_partners():
    """The callback's targets are the mean latent of each spot's MNN partners."""

    class _Dataset:
        def __init__(self):
            self.indices = np.arange(6)
            self.batch_codes = np.array([0, 0, 0, 1, 1, 1])
            self.got = None

        def set_anchor_targets(self, rows, target, mask):
            self.got = (rows, target, mask)

    z = np.array([[0.0], [1.0], [10.0], [0.1], [10.2], [50.0]], dtype=np.float32)
    callback = AnchorCallback(k=1, warmup=0.0)
    callback._latent = lambda module, dataset, rows: z[rows]  # skip the encoder

    class _Trainer:
        current_epoch = 0
        max_epochs = 3
        train_dataloader = type("L", (), {"dataset": _Dataset()})()

    class _PL:
        module = None

        def log(self, *args, **kwargs):
            pass

    trainer = _Trainer()
    callback.on_train_epoch_start(trainer, _PL())
    rows, target, mask = trainer.train_dataloader.dataset.got
    np.testing.assert_array_equal(mask, [True, False, True, True, True, False])
    np.testing.assert_allclose(target[[0, 2, 3, 4], 0], [0.1, 10.2, 0.0, 10.0])


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
    "kwargs", [{"cycle_weight": -1.0}, {"anchor_weight": float("nan")}, {"view_dropout": 1.5}]
)
def test_bad_weights_are_refused_by_name(small_adata, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
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
    # a model saved before the option existed records neither the argument nor the setting
    del model.histovi_setup_["normalize_input"]
    model.init_params_["non_kwargs"].pop("normalize_input")
    model.save(tmp_path / "old", save_anndata=False)
    old = HistoVI.load(tmp_path / "old", adata=small_adata)
    assert old.module.normalize_input is False
    assert np.array_equal(old.get_latent_representation(), z)
    assert _model(small_adata).module.normalize_input is True


def test_normalize_input_must_be_a_bool(small_adata):
    with pytest.raises(ValueError, match="normalize_input"):
        _model(small_adata, normalize_input="yes")
