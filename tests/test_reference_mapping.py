"""Reference mapping of new patients, beyond tests/test_model.py: what exactly trains in a query,
gene alignment values, queries without (or with partial) morphology, encoder-record refusals,
a reference loaded from a saved folder, and label transfer end to end."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from _messages import raises_naming, warns_naming
from conftest import TINY_STUDY

import histovi
from histovi import HistoVI

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
SETUP = {
    "layer": "counts",
    "batch_key": "sample",
    "morphology_key": "X_morphology",
    "neighbors_key": "spatial_neighbors",
}


@pytest.fixture(scope="module")
def study():
    """Reference = patient P1 (2 sections), query = patient P2 (2 new sections), no query
    neighbours (prepare_query_anndata computes them)."""
    adata = histovi.datasets.simulate(**TINY_STUDY, seed=2)
    is_q = (adata.obs["patient"] == "P2").to_numpy()
    ref, query = adata[~is_q].copy(), adata[is_q].copy()
    histovi.pp.spatial_neighbors(ref, sample_key="sample", n_neighbors=6)
    return ref, query


@pytest.fixture(scope="module")
def reference(study):
    ref, _ = study
    scvi.settings.seed = 0
    HistoVI.setup_anndata(ref, **SETUP)
    model = HistoVI(ref, n_latent=4, n_hidden=32)
    model.train(max_epochs=10, **QUIET)
    return model


def _map(query, reference_model, epochs=3, seed=0):
    scvi.settings.seed = seed
    prepared = HistoVI.prepare_query_anndata(query, reference_model)
    qmodel = HistoVI.load_query_data(prepared, reference_model)
    qmodel.train(max_epochs=epochs, **QUIET)
    return prepared, qmodel


def _first_layers(module):
    """name -> weight of every first layer that takes the covariates."""
    return {
        k: v for k, v in module.state_dict().items() if k.endswith("fc_layers.Layer 0.0.weight")
    }


def test_only_new_category_columns_train(study, reference):
    _, query = study
    ref_state = {k: v.clone() for k, v in reference.module.state_dict().items()}
    prepared = HistoVI.prepare_query_anndata(query, reference)
    qmodel = HistoVI.load_query_data(prepared, reference)
    assert qmodel.module.cat_list == [4]  # 2 reference + 2 new sections
    before = {k: v.clone() for k, v in qmodel.module.state_dict().items()}
    scvi.settings.seed = 0
    qmodel.train(max_epochs=3, **QUIET)
    after = qmodel.module.state_dict()
    grown = _first_layers(qmodel.module)
    assert grown, "HistoVAE has covariate layers"
    for key, w in grown.items():
        n_ref = ref_state[key].shape[1]
        # reference columns (genes/latent and the 2 reference sections) bit for bit
        torch.testing.assert_close(w[:, :n_ref], ref_state[key], rtol=0, atol=0)
        # the 2 new sections' columns moved in the expression encoder (the query's only input
        # through which its batch shapes the latent)
        if key.startswith("z_encoder"):
            assert not torch.equal(w[:, n_ref:], before[key][:, n_ref:])
    for key, v in after.items():
        if key in grown:
            continue
        torch.testing.assert_close(v, before[key], rtol=0, atol=0, msg=f"{key} must stay frozen")
    # the neighbours' share of the domain latent is the reference's (a buffer, not refitted)
    torch.testing.assert_close(qmodel.module.spatial_mix, reference.module.spatial_mix)


def test_reference_unchanged(study, reference):
    ref, query = study
    z_ref = reference.get_latent_representation()
    state = {k: v.clone() for k, v in reference.module.state_dict().items()}
    _, qmodel = _map(query, reference, epochs=3)
    for k, v in reference.module.state_dict().items():
        assert torch.equal(v, state[k]), k
    np.testing.assert_array_equal(reference.get_latent_representation(), z_ref)
    # The query model's first layers are wider (zero inputs in the new columns), and BLAS may sum
    # a wider dot product in another order: equal weights, equal up to float rounding.
    np.testing.assert_allclose(qmodel.get_latent_representation(ref), z_ref, rtol=0, atol=1e-5)


def test_gene_alignment_values(study, reference):
    _, query = study
    rng = np.random.default_rng(0)
    # shuffled genes, 7 reference genes missing, 3 genes the reference never saw
    keep = rng.permutation(query.n_vars)[7:]
    sub = query[:, keep]
    extra = rng.poisson(3, size=(query.n_obs, 3)).astype(np.float32)
    counts = sp.hstack([sub.layers["counts"], sp.csr_matrix(extra)]).tocsr()
    q = ad.AnnData(
        X=counts,
        obs=query.obs.copy(),
        var=pd.DataFrame(index=[*sub.var_names, "NEW1", "NEW2", "NEW3"]),
        obsm={k: v.copy() for k, v in query.obsm.items()},
        uns=dict(query.uns),
    )
    q.layers["counts"] = counts
    with warns_naming(
        UserWarning, "7 of the reference's 150 genes", "missing from the query", "filled with zeros"
    ):
        prepared = HistoVI.prepare_query_anndata(q, reference)
    ref_genes = reference.adata.var_names
    assert list(prepared.var_names) == list(ref_genes)
    got = prepared.layers["counts"].toarray()
    want = query.layers["counts"].toarray()
    present = ref_genes.isin(q.var_names)
    np.testing.assert_array_equal(
        got[:, present], want[:, query.var_names.get_indexer(ref_genes[present])]
    )
    assert (got[:, ~present] == 0).all()
    assert q.n_vars == 146  # the user's query keeps its own genes


def test_query_without_or_with_partial_morphology(study, reference):
    _, query = study
    # no morphology at all: the query model uses the reference's view scaling, not zeros
    q = query.copy()
    del q.obsm["X_morphology"]
    with warns_naming(
        UserWarning, "obsm['X_morphology']", "'morphology' view", "treated as missing"
    ):
        _, qmodel = _map(q, reference, epochs=2)
    for name in ("_view_mean_morphology", "_view_std_morphology"):
        assert torch.equal(qmodel.module.state_dict()[name], reference.module.state_dict()[name])
    z_none = qmodel.get_latent_representation()
    assert np.isfinite(z_none).all()
    # one query section with images, one without
    q = query.copy()
    m = q.obsm["X_morphology"].copy()
    no_image = (q.obs["sample"] == "P2_S2").to_numpy()
    m[no_image] = np.nan
    q.obsm["X_morphology"] = m
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to warn about here
        prepared = HistoVI.prepare_query_anndata(q, reference)
    qmodel = HistoVI.load_query_data(prepared, reference)
    scvi.settings.seed = 0
    qmodel.train(max_epochs=2, **QUIET)
    z = qmodel.get_latent_representation()
    assert np.isfinite(z).all()
    # the imaged section's latent uses its morphology: it differs from a no-morphology mapping
    assert not np.allclose(z[~no_image], z_none[~no_image])


@pytest.mark.parametrize(
    "field, ref_value, query_value",
    [
        ("weights_hash", "abc123", "def456"),
        ("tile_size_um", 100.0, 150.0),
        ("target_mpp", 0.5, 1.0),
    ],
)
def test_query_refused_on_morphology_record_mismatch(
    study, reference, monkeypatch, field, ref_value, query_value
):
    _, query = study
    # the record the reference's setup took from ref.uns['histovi']['morphology']
    monkeypatch.setitem(
        reference.histovi_setup_, "morphology_record", {"encoder": "uni", field: ref_value}
    )
    q = query.copy()
    q.uns.setdefault("histovi", {})["morphology"] = {"encoder": "uni", field: query_value}
    with raises_naming(ValueError, field, "histovi.pp.embed_morphology(query, reference="):
        HistoVI.prepare_query_anndata(q, reference)
    # the same record passes
    q.uns["histovi"]["morphology"] = {"encoder": "uni", field: ref_value}
    prepared = HistoVI.prepare_query_anndata(q, reference)
    HistoVI.load_query_data(prepared, reference)


def test_reference_from_saved_folder(study, reference, tmp_path, monkeypatch):
    ref, query = study
    path = tmp_path / "reference"
    reference.save(str(path), save_anndata=False)
    prepared_mem, qmodel_mem = _map(query, reference, epochs=3, seed=4)
    prepared_disk, qmodel_disk = _map(query, str(path), epochs=3, seed=4)
    # the folder holds everything query mapping needs: same layout, same query latent
    np.testing.assert_array_equal(
        prepared_disk.layers["counts"].toarray(), prepared_mem.layers["counts"].toarray()
    )
    np.testing.assert_array_equal(
        prepared_disk.obsm["spatial_neighbors"], prepared_mem.obsm["spatial_neighbors"]
    )
    np.testing.assert_array_equal(
        qmodel_disk.get_latent_representation(), qmodel_mem.get_latent_representation()
    )
    # the saved record still refuses a query embedded with another encoder
    q = query.copy()
    q.uns.setdefault("histovi", {})["morphology"] = {"encoder": "resnet50"}
    record = {**reference.histovi_setup_, "morphology_record": {"encoder": "stain-texture"}}
    monkeypatch.setattr(reference, "histovi_setup_", record)
    reference.save(str(tmp_path / "ref2"), save_anndata=False)
    with raises_naming(
        ValueError,
        "encoder='resnet50'",
        "'stain-texture'",
        "histovi.pp.embed_morphology(query, reference=",
    ):
        HistoVI.prepare_query_anndata(q, str(tmp_path / "ref2"))
    with raises_naming(
        ValueError,
        "encoder='resnet50'",
        "'stain-texture'",
        "histovi.pp.embed_morphology(query, reference=",
    ):
        HistoVI.load_query_data(q, str(tmp_path / "ref2"))


def test_bad_reference_argument(study, reference):
    _, query = study
    with raises_naming(
        TypeError, "reference_model", "trained HistoVI", "folder of a saved HistoVI"
    ):
        HistoVI.prepare_query_anndata(query, 42)
    bad = query.copy()
    bad.var_names = [f"other_{i}" for i in range(bad.n_vars)]
    with raises_naming(
        ValueError, "var_names", "none of the reference's genes", "same gene identifiers"
    ):
        HistoVI.prepare_query_anndata(bad, reference)


def test_transfer_labels_end_to_end(study, reference):
    ref, query = study
    prepared, qmodel = _map(query, reference, epochs=5)
    r = ref.copy()
    r.obsm["X_histovi"] = reference.get_latent_representation()
    prepared.obsm["X_histovi"] = qmodel.get_latent_representation()
    histovi.tl.transfer_labels(r, prepared, label_key="domain", key_added="domain_pred")
    pred = prepared.obs["domain_pred"].astype(str).to_numpy()
    truth = prepared.obs["domain"].astype(str).to_numpy()
    unc = prepared.obs["domain_pred_uncertainty"].to_numpy()
    assert ((unc >= 0) & (unc <= 1)).all()
    assert set(pred) <= set(r.obs["domain"].astype(str))
    # far better than voting the most frequent reference label for every spot
    majority = r.obs["domain"].astype(str).value_counts().index[0]
    acc, baseline = (pred == truth).mean(), (truth == majority).mean()
    assert acc > baseline + 0.2, (acc, baseline)
    # confident transfers are the more accurate ones
    confident = unc <= np.median(unc)
    assert (pred == truth)[confident].mean() >= (pred == truth)[~confident].mean()
