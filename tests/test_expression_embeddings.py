"""Tests of histovi.pp.embed_expression with tiny randomly initialised Geneformer-style models."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _messages import raises_naming, warns_naming

from histovi.pp._expression import _rank_value_encode, embed_expression

N_GENES_VOCAB = 120  # genes of the AnnData that are in the vocabulary
N_GENES_UNKNOWN = 30  # genes of the AnnData that are not
N_VOCAB_GENES = 200  # gene tokens in the model's vocabulary
MAX_POS = 64


def _ens(i: int) -> str:
    return f"ENSG{i:011d}"


def _write_model(folder: Path, *, special: bool = True, seed: int = 0) -> Path:
    """Save a 2-layer BertForMaskedLM and Geneformer-format dictionaries into ``folder``."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if special else [])
    token_dict = {t: i for i, t in enumerate(specials)}
    for g in range(N_VOCAB_GENES):
        token_dict[_ens(g)] = len(token_dict)
    rng = np.random.default_rng(1)
    median_dict = {_ens(g): float(rng.uniform(0.5, 5.0)) for g in range(N_VOCAB_GENES)}
    name_dict = {f"GENE{g}": _ens(g) for g in range(N_VOCAB_GENES)}
    config = transformers.BertConfig(
        vocab_size=len(token_dict),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_POS,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    for name, d in [
        ("token_dictionary.pkl", token_dict),
        ("gene_median_dictionary.pkl", median_dict),
        ("gene_name_id_dict.pkl", name_dict),
    ]:
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _write_model(tmp_path_factory.mktemp("gf") / "Geneformer-tiny")


def _make_adata(n_obs: int = 30, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n_vars = N_GENES_VOCAB + N_GENES_UNKNOWN
    X = rng.poisson(rng.gamma(0.5, 2.0, size=(1, n_vars)), size=(n_obs, n_vars)).astype(np.float32)
    symbols = [f"GENE{g}" for g in range(N_GENES_VOCAB)] + [
        f"UNKNOWN{g}" for g in range(N_GENES_UNKNOWN)
    ]
    # Versioned Ensembl ids on half the genes: the mapping must strip the version.
    ensembl = [_ens(g) + (".3" if g % 2 else "") for g in range(N_GENES_VOCAB)] + [
        f"ENSG9{g:010d}" for g in range(N_GENES_UNKNOWN)
    ]
    var = pd.DataFrame({"gene_ids": ensembl}, index=symbols)
    obs = pd.DataFrame(index=[f"spot{i}" for i in range(n_obs)])
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
    adata.layers["counts"] = adata.X.copy()
    return adata


def test_geneformer_shapes_record_and_input_untouched(model_dir):
    adata = _make_adata()
    before = adata.copy()
    embed_expression(adata, "geneformer", model_path=model_dir, show_progress=False)

    emb = adata.obsm["X_geneformer"]
    assert emb.shape == (adata.n_obs, 32)
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert np.abs(emb).sum() > 0

    rec = adata.uns["histovi"]["embeddings"]["X_geneformer"]
    assert rec["model"] == "geneformer"
    assert rec["source"] == str(model_dir)
    assert rec["n_genes_mapped"] == N_GENES_VOCAB
    assert rec["n_genes_total"] == adata.n_vars
    assert rec["gene_id_type"] == "symbol"
    assert rec["max_length"] == MAX_POS
    assert len(rec["weights_sha256"]) == 64 and len(rec["weights_file_sha256"]) == 64
    assert rec["dim"] == 32

    # Only the documented keys were added.
    assert (adata.X != before.X).nnz == 0
    assert adata.var.equals(before.var) and adata.obs.equals(before.obs)
    assert set(adata.obsm) == {"X_geneformer"}
    assert set(adata.uns) == {"histovi"}


def test_symbols_and_ensembl_ids_give_the_same_embedding(model_dir):
    a1, a2 = _make_adata(), _make_adata()
    embed_expression(a1, "geneformer", model_path=model_dir, show_progress=False)
    embed_expression(
        a2, "geneformer", model_path=model_dir, gene_id_key="gene_ids", show_progress=False
    )
    rec = a2.uns["histovi"]["embeddings"]["X_geneformer"]
    assert rec["gene_id_type"] == "ensembl"
    assert rec["n_genes_mapped"] == N_GENES_VOCAB
    np.testing.assert_array_equal(a1.obsm["X_geneformer"], a2.obsm["X_geneformer"])


def test_deterministic_and_batch_independent(model_dir):
    a1, a2, a3 = (_make_adata(n_obs=12) for _ in range(3))
    kw = {"model_path": model_dir, "show_progress": False}
    embed_expression(a1, "geneformer", batch_size=5, **kw)
    embed_expression(a2, "geneformer", batch_size=5, **kw)
    embed_expression(a3, "geneformer", batch_size=1, **kw)
    np.testing.assert_array_equal(a1.obsm["X_geneformer"], a2.obsm["X_geneformer"])
    # Padding to a batch's longest spot must not change a spot's embedding.
    np.testing.assert_allclose(a1.obsm["X_geneformer"], a3.obsm["X_geneformer"], atol=1e-5)
    assert (
        a1.uns["histovi"]["embeddings"]["X_geneformer"]["weights_sha256"]
        == a2.uns["histovi"]["embeddings"]["X_geneformer"]["weights_sha256"]
    )


def test_rank_value_encoding_matches_definition():
    # Two spots, three vocabulary genes with medians 1, 2, 4 and tokens 10, 11, 12.
    X = sp.csr_matrix(np.array([[4.0, 4.0, 4.0], [0.0, 1.0, 8.0]]))
    n_counts = np.array([20.0, 10.0])  # totals include genes outside the vocabulary
    medians = np.array([1.0, 2.0, 4.0])
    tokens = np.array([10, 11, 12])
    seqs = _rank_value_encode(X, n_counts, medians, tokens, max_genes=10)
    # spot 0: 4/20*1e4/[1,2,4] -> gene 0 > 1 > 2
    np.testing.assert_array_equal(seqs[0], [10, 11, 12])
    # spot 1: gene 1 -> 1/10*1e4/2 = 500, gene 2 -> 8/10*1e4/4 = 2000; gene 0 not detected
    np.testing.assert_array_equal(seqs[1], [12, 11])
    # truncation keeps the highest ranks
    np.testing.assert_array_equal(_rank_value_encode(X, n_counts, medians, tokens, 1)[0], [10])
    # ties keep column order
    Xt = sp.csr_matrix(np.array([[2.0, 0.0, 8.0]]))
    np.testing.assert_array_equal(
        _rank_value_encode(Xt, np.array([10.0]), np.array([1.0, 1.0, 4.0]), tokens, 10)[0],
        [10, 12],
    )


def test_embedding_equals_manual_forward_pass(model_dir):
    """Pooling check: mean of the gene tokens' last hidden states, <cls>/<eos> excluded."""
    transformers = pytest.importorskip("transformers")
    import torch

    adata = _make_adata(n_obs=3)
    embed_expression(adata, "geneformer", model_path=model_dir, show_progress=False)
    with open(model_dir / "token_dictionary.pkl", "rb") as f:
        token_dict = pickle.load(f)
    with open(model_dir / "gene_median_dictionary.pkl", "rb") as f:
        median_dict = pickle.load(f)
    x = adata.X[0].toarray().ravel()
    total = x.sum()
    scored = [
        (x[g] / total * 10_000 / median_dict[_ens(g)], g) for g in range(N_GENES_VOCAB) if x[g] > 0
    ]
    # stable descending order: by score, ties by column
    order = [g for _, g in sorted(scored, key=lambda t: (-t[0], t[1]))][: MAX_POS - 2]
    ids = [token_dict["<cls>"]] + [token_dict[_ens(g)] for g in order] + [token_dict["<eos>"]]
    bert = transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    with torch.no_grad():
        h = bert(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    expected = h[0, 1:-1].mean(0).numpy()
    np.testing.assert_allclose(adata.obsm["X_geneformer"][0], expected, atol=1e-5)


def test_zero_count_spots_get_nan_rows(model_dir):
    adata = _make_adata(n_obs=10)
    X = adata.X.toarray()
    X[2] = 0
    X[5, :N_GENES_VOCAB] = 0  # counts only in genes outside the vocabulary
    X[5, N_GENES_VOCAB] = 3
    adata.X = sp.csr_matrix(X)
    with warns_naming(UserWarning, "obsm['X_geneformer']", "2 of 10 spots", "no counts", "NaN"):
        embed_expression(adata, "geneformer", model_path=model_dir, show_progress=False)
    emb = adata.obsm["X_geneformer"]
    assert np.isnan(emb[[2, 5]]).all()
    assert np.isfinite(np.delete(emb, [2, 5], axis=0)).all()
    assert adata.uns["histovi"]["embeddings"]["X_geneformer"]["n_spots_empty"] == 2


def test_few_genes_mapped_warns_and_none_mapped_refuses(model_dir):
    adata = _make_adata()
    few = adata[:, list(range(10)) + list(range(N_GENES_VOCAB, adata.n_vars))].copy()
    with warns_naming(UserWarning, "adata.var_names", "only 10 of 40 genes", "gene_id_key"):
        embed_expression(few, "geneformer", model_path=model_dir, show_progress=False)
    assert few.uns["histovi"]["embeddings"]["X_geneformer"]["n_genes_mapped"] == 10

    none = adata[:, N_GENES_VOCAB:].copy()
    with raises_naming(ValueError, "adata.var_names", "none of the 30 genes", "gene_id_key="):
        embed_expression(none, "geneformer", model_path=model_dir, show_progress=False)
    assert "X_geneformer" not in none.obsm


def test_duplicate_symbols_are_summed(model_dir):
    adata = _make_adata()
    names = adata.var_names.tolist()
    names[1] = names[0]  # two rows for GENE0
    adata.var_names = names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about non-unique var names
        embed_expression(adata, "geneformer", model_path=model_dir, show_progress=False)
    assert adata.uns["histovi"]["embeddings"]["X_geneformer"]["n_genes_mapped"] == N_GENES_VOCAB - 1


def test_symbols_without_name_dictionary_refused(tmp_path):
    folder = _write_model(tmp_path / "m")
    (folder / "gene_name_id_dict.pkl").unlink()
    adata = _make_adata()
    with raises_naming(
        ValueError, "adata.var_names", "gene symbols", "gene_id_key=", "dictionary_files="
    ):
        embed_expression(adata, "geneformer", model_path=folder, show_progress=False)
    embed_expression(
        adata, "geneformer", model_path=folder, gene_id_key="gene_ids", show_progress=False
    )
    assert adata.obsm["X_geneformer"].shape == (adata.n_obs, 32)


def test_max_length_truncates(model_dir):
    a_full, a_short = _make_adata(), _make_adata()
    embed_expression(a_full, "geneformer", model_path=model_dir, show_progress=False)
    embed_expression(
        a_short,
        "geneformer",
        model_path=model_dir,
        max_length=6,
        key_added="X_gf6",
        show_progress=False,
    )
    assert a_short.uns["histovi"]["embeddings"]["X_gf6"]["max_length"] == 6
    assert not np.allclose(a_full.obsm["X_geneformer"], a_short.obsm["X_gf6"])
    with raises_naming(ValueError, "max_length=65", "max_position_embeddings=64", "max_length<=64"):
        embed_expression(_make_adata(), "geneformer", model_path=model_dir, max_length=MAX_POS + 1)


def test_v1_dictionary_without_cls(tmp_path):
    folder = _write_model(tmp_path / "v1", special=False)
    adata = _make_adata()
    embed_expression(adata, "geneformer", model_path=folder, hidden_layer=-2, show_progress=False)
    assert np.isfinite(adata.obsm["X_geneformer"]).all()
    with raises_naming(ValueError, "pooling='cls'", "<cls>", "pooling='mean'"):
        embed_expression(adata, "geneformer", model_path=folder, pooling="cls")


def test_loaded_model_object_matches_path_route(model_dir):
    transformers = pytest.importorskip("transformers")
    mlm = transformers.BertForMaskedLM.from_pretrained(str(model_dir))
    mlm.train()
    a_obj, a_path = _make_adata(), _make_adata()
    embed_expression(a_obj, mlm, model_path=model_dir, show_progress=False)
    embed_expression(a_path, "geneformer", model_path=model_dir, show_progress=False)
    np.testing.assert_allclose(a_obj.obsm["X_geneformer"], a_path.obsm["X_geneformer"], atol=1e-6)
    r_obj = a_obj.uns["histovi"]["embeddings"]["X_geneformer"]
    r_path = a_path.uns["histovi"]["embeddings"]["X_geneformer"]
    assert r_obj["weights_sha256"] == r_path["weights_sha256"]
    assert mlm.training  # the user's model is left in the mode it was in

    # A different initialisation is a different model: the hash tells them apart.
    other = _write_model(model_dir.parent / "other", seed=1)
    a_other = _make_adata()
    embed_expression(a_other, "geneformer", model_path=other, show_progress=False)
    assert (
        a_other.uns["histovi"]["embeddings"]["X_geneformer"]["weights_sha256"]
        != (r_path["weights_sha256"])
    )


def test_hub_route_downloads_snapshot_and_picks_matching_dictionaries(tmp_path, monkeypatch):
    """The hub code path, with snapshot_download replaced by a local folder (no network)."""
    pytest.importorskip("transformers")
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    _write_model(snapshot / "Geneformer-tiny")
    # Lay the dictionaries out as the hub repository does: in geneformer/, next to another
    # version's dictionaries whose vocabulary size does not match this model.
    dicts = snapshot / "geneformer"
    dicts.mkdir()
    for stem in ("token_dictionary", "gene_median_dictionary", "gene_name_id_dict"):
        (snapshot / "Geneformer-tiny" / f"{stem}.pkl").rename(dicts / f"{stem}_tiny.pkl")
    with open(dicts / "token_dictionary_other.pkl", "wb") as f:
        pickle.dump({"<pad>": 0, _ens(0): 1}, f)
    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls["repo_id"] = repo_id
        calls["allow_patterns"] = allow_patterns
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    adata = _make_adata()
    embed_expression(
        adata, "geneformer", model_path="someone/Geneformer/Geneformer-tiny", show_progress=False
    )
    assert calls["repo_id"] == "someone/Geneformer"
    assert "Geneformer-tiny/*" in calls["allow_patterns"]
    rec = adata.uns["histovi"]["embeddings"]["X_geneformer"]
    assert rec["token_dictionary"] == "token_dictionary_tiny.pkl"
    assert rec["n_genes_mapped"] == N_GENES_VOCAB


def test_bad_inputs_are_refused(model_dir):
    adata = _make_adata()
    with raises_naming(ValueError, "model='bert'", "'geneformer'", "'pca'"):
        embed_expression(adata, "bert")
    with raises_naming(KeyError, "layers['raw']", "layer=", "layer=None"):
        embed_expression(adata, "geneformer", model_path=model_dir, layer="raw")
    with raises_naming(KeyError, "gene_id_key='ensembl'"):
        embed_expression(adata, "geneformer", model_path=model_dir, gene_id_key="ensembl")
    logged = adata.copy()
    logged.X = logged.X.log1p()
    with raises_naming(ValueError, "adata.X", "non-integer", "raw counts", "layer="):
        embed_expression(logged, "geneformer", model_path=model_dir)
    # the counts layer works on the same object
    embed_expression(
        logged, "geneformer", model_path=model_dir, layer="counts", show_progress=False
    )
    negative = adata.copy()
    negative.X = -negative.X
    with raises_naming(ValueError, "negative"):
        embed_expression(negative, "pca")
    with raises_naming(ValueError, "does not exist"):
        embed_expression(adata, "geneformer", model_path=model_dir / "missing")
    with raises_naming(ValueError, "batch_size"):
        embed_expression(adata, "pca", batch_size=0)
    with raises_naming(ValueError, "model of type"):
        embed_expression(adata, object())


def test_scgpt_raises_with_precomputed_route():
    with raises_naming(
        ImportError, "model='scgpt'", "precomputed-embedding route", "embedding_keys="
    ):
        embed_expression(_make_adata(), "scgpt")


def test_pca_view(tmp_path):
    adata = _make_adata(n_obs=40)
    before = adata.X.copy()
    embed_expression(adata, "pca", n_comps=10)
    emb = adata.obsm["X_expression_pca"]
    assert emb.shape == (40, 10) and emb.dtype == np.float32
    assert (adata.X != before).nnz == 0
    rec = adata.uns["histovi"]["embeddings"]["X_expression_pca"]
    assert rec["model"] == "pca" and rec["transferable"] is False
    again = _make_adata(n_obs=40)
    embed_expression(again, "pca", n_comps=10)
    np.testing.assert_array_equal(emb, again.obsm["X_expression_pca"])
    assert (
        rec["weights_sha256"]
        == again.uns["histovi"]["embeddings"]["X_expression_pca"]["weights_sha256"]
    )
    # The uns record survives an h5ad round trip (no None values).
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["histovi"]["embeddings"]["X_expression_pca"]["n_comps"] == 10
    np.testing.assert_array_equal(back.obsm["X_expression_pca"], emb)


def test_geneformer_record_survives_h5ad(model_dir, tmp_path):
    adata = _make_adata()
    embed_expression(adata, "geneformer", model_path=model_dir, show_progress=False)
    adata.write_h5ad(tmp_path / "g.h5ad")
    back = ad.read_h5ad(tmp_path / "g.h5ad")
    rec = back.uns["histovi"]["embeddings"]["X_geneformer"]
    assert rec["n_genes_mapped"] == N_GENES_VOCAB
    assert (
        rec["weights_sha256"]
        == adata.uns["histovi"]["embeddings"]["X_geneformer"]["weights_sha256"]
    )


def test_pca_top_genes_and_empty_spots():
    adata = _make_adata(n_obs=40)
    X = adata.X.toarray()
    X[7] = 0
    adata.X = sp.csr_matrix(X)
    with warns_naming(UserWarning, "obsm['X_expression_pca']", "1 of 40 spots", "no counts", "NaN"):
        embed_expression(adata, "pca", n_comps=5, n_top_genes=50)
    emb = adata.obsm["X_expression_pca"]
    assert np.isnan(emb[7]).all() and np.isfinite(np.delete(emb, 7, axis=0)).all()
    rec = adata.uns["histovi"]["embeddings"]["X_expression_pca"]
    assert rec["n_genes_mapped"] == 50 and rec["n_spots_empty"] == 1
    with raises_naming(ValueError, "n_top_genes=1", "integer >= 2", "None"):
        embed_expression(adata, "pca", n_top_genes=1)
