"""Tests of histovi.tl: domains, spatial smoothing, label transfer, neighbourhood aggregation,
anchors across sections."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _messages import raises_naming, warns_naming
from sklearn.metrics import adjusted_rand_score

from histovi import tl


def _line_neighbors(n: int) -> np.ndarray:
    """Left/right neighbours of spots on a line, -1 where there is none."""
    nbrs = np.stack([np.arange(n) - 1, np.arange(n) + 1], axis=1)
    nbrs[nbrs >= n] = -1
    return nbrs.astype(np.int64)


def _blobs(n_per: int = 40, n_samples: int = 2, seed: int = 0) -> ad.AnnData:
    """Three well separated blobs in 4-D, spread over samples, with within-sample neighbours."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), n_per * n_samples)
    X = rng.normal(scale=0.3, size=(truth.size, 4))
    X[:, 0] += truth * 5.0
    samples = np.tile([f"s{i}" for i in range(n_samples)], 3 * n_per)
    obs = pd.DataFrame(
        {"sample": samples, "truth": truth.astype(str)},
        index=[f"spot{i}" for i in range(truth.size)],
    )
    adata = ad.AnnData(np.zeros((truth.size, 1), dtype=np.float32), obs=obs)
    adata.obsm["X_histovi"] = X.astype(np.float32)
    nbrs = np.full((truth.size, 2), -1, dtype=np.int64)
    for s in np.unique(samples):
        rows = np.flatnonzero(samples == s)
        local = _line_neighbors(rows.size)
        nbrs[rows] = np.where(local >= 0, rows[np.clip(local, 0, None)], -1)
    adata.obsm["spatial_neighbors"] = nbrs
    return adata


@pytest.mark.parametrize("method", ["gmm", "kmeans", "leiden"])
def test_domains_recovers_blobs(method):
    adata = _blobs()
    tl.domains(adata, n_domains=3, method=method)
    dom = adata.obs["domain"]
    assert isinstance(dom.dtype, pd.CategoricalDtype)
    assert list(dom.cat.categories) == ["0", "1", "2"]
    assert adjusted_rand_score(adata.obs["truth"], dom) == pytest.approx(1.0)
    settings = adata.uns["histovi"]["domains"]
    assert settings["method"] == method and settings["n_found"] == 3
    # one clustering of the pool: a domain means the same blob in every sample
    for s in ("s0", "s1"):
        sub = adata.obs[adata.obs["sample"] == s]
        assert (sub.groupby("truth", observed=True)["domain"].nunique() == 1).all()


def test_gmm_warns_when_it_fills_fewer_domains_than_asked():
    X = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0]], dtype=np.float32), 50, axis=0)
    with warns_naming(UserWarning, "2 of the 3 domains asked for"):
        codes = tl.cluster_embedding(X, 3, "gmm")
    assert set(np.unique(codes)) == {0, 1}  # dense codes of the domains it did use


def test_leiden_resolution_search_reaches_n_domains():
    X = _blobs().obsm["X_histovi"]
    free = tl.cluster_embedding(X, None, "leiden", resolution=1.0)
    assert len(np.unique(free)) > 3  # resolution 1 splits the blobs
    searched = tl.cluster_embedding(X, 3, "leiden", resolution=1.0)
    assert len(np.unique(searched)) == 3


def test_domains_not_inplace_leaves_adata_untouched():
    adata = _blobs()
    before = adata.obs.copy()
    labels = tl.domains(adata, n_domains=3, method="kmeans", inplace=False)
    assert isinstance(labels, pd.Series) and labels.index.equals(adata.obs_names)
    pd.testing.assert_frame_equal(adata.obs, before)
    assert "histovi" not in adata.uns


def test_smooth_labels_flips_isolated_spot_and_keeps_ties():
    nbrs = _line_neighbors(5)
    out = tl.smooth_labels(np.array([0, 0, 1, 0, 0]), nbrs, n_iter=1)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0])
    # spot 1 votes for itself (1) and its neighbours (0, 2): a three-way tie keeps its label
    out = tl.smooth_labels(np.array([0, 1, 2]), _line_neighbors(3), n_iter=1)
    assert out[1] == 1


def test_domains_spatial_smoothing_within_samples():
    # 1-D rep: one spot of sample s0 sits in the middle of the other cluster's stretch
    rep = np.array([0, 0, 0, 10, 0, 0, 10, 10, 10, 10], dtype=float)[:, None]
    samples = ["s0"] * 6 + ["s1"] * 4
    adata = ad.AnnData(
        np.zeros((10, 1), dtype=np.float32),
        obs=pd.DataFrame({"sample": samples}, index=[str(i) for i in range(10)]),
    )
    adata.obsm["X_histovi"] = rep
    nbrs = _line_neighbors(10)
    nbrs[5, 1] = 6  # a link across samples, which smoothing must ignore
    nbrs[6, 0] = 5
    adata.obsm["spatial_neighbors"] = nbrs
    raw = tl.domains(adata, n_domains=2, method="kmeans", inplace=False).to_numpy()
    assert raw[3] != raw[2]
    tl.domains(adata, n_domains=2, method="kmeans", spatial_smoothing=1)
    smooth = adata.obs["domain"].to_numpy()
    assert len(set(smooth[:6])) == 1  # isolated spot voted away
    assert smooth[5] != smooth[6]  # the cross-sample link did not merge the two sections
    assert adata.uns["histovi"]["domains"]["spatial_smoothing"] == 1


def test_domains_errors_name_key_and_fix():
    adata = _blobs()
    with raises_naming(KeyError, "obsm['X_missing']", "get_latent_representation", "use_rep="):
        tl.domains(adata, n_domains=3, use_rep="X_missing")
    with raises_naming(ValueError, "method='gmm'", "n_domains", "method='leiden'"):
        tl.domains(adata, method="gmm")
    with raises_naming(ValueError, "'dbscan'", "'gmm'", "'kmeans'", "'leiden'"):
        tl.domains(adata, n_domains=3, method="dbscan")
    with raises_naming(KeyError, "obsm['nbrs']", "histovi.pp.spatial_neighbors", "neighbors_key="):
        tl.domains(adata, n_domains=3, spatial_smoothing=1, neighbors_key="nbrs")
    bad = adata.copy()
    bad.obsm["spatial_neighbors"] = bad.obsm["spatial_neighbors"] + bad.n_obs
    with raises_naming(
        ValueError,
        "obsm['spatial_neighbors']",
        "[0, 240)",
        "recompute",
        "histovi.pp.spatial_neighbors",
    ):
        tl.domains(bad, n_domains=3, spatial_smoothing=1)
    nan = adata.copy()
    nan.obsm["X_histovi"][0, 0] = np.nan
    with raises_naming(ValueError, "obsm['X_histovi']", "NaN/inf", "impute or drop"):
        tl.domains(nan, n_domains=3)


def _transfer_pair():
    ref = ad.AnnData(
        np.zeros((5, 1), dtype=np.float32),
        obs=pd.DataFrame(
            {"domain": pd.Categorical(["a", "b", None, "a", "b"], categories=["a", "b", "c"])},
            index=[f"r{i}" for i in range(5)],
        ),
    )
    # 1-D latent: 'a' at 0 and 0.1, 'b' at 1 and 1.1, an unlabelled spot at 0.25
    ref.obsm["X_histovi"] = np.array([[0.0], [1.0], [0.25], [0.1], [1.1]])
    query = ad.AnnData(np.zeros((2, 1), dtype=np.float32), obs=pd.DataFrame(index=["q0", "q1"]))
    query.obsm["X_histovi"] = np.array([[0.25], [1.05]])
    return ref, query


def test_transfer_labels_matches_hand_computed_kernel():
    ref, query = _transfer_pair()
    tl.transfer_labels(ref, query, n_neighbors=2)
    pred = query.obs["domain"]
    assert list(pred.cat.categories) == ["a", "b", "c"]  # reference categories kept
    assert list(pred) == ["a", "b"]  # the unlabelled reference spot at 0.25 did not vote
    # q0: neighbours 'a' at distances 0.15 and 0.25 -> both 'a', uncertainty 0
    assert query.obs["domain_uncertainty"].iloc[0] == pytest.approx(0.0)
    # with 3 neighbours q0 sees a (0.15), a (0.25), b (0.75): scArches kernel by hand
    tl.transfer_labels(ref, query, n_neighbors=3, key_added="pred")
    d = np.array([0.15, 0.25, 0.75])
    w = np.exp(-d / (2 / d.std()) ** 2)
    w /= w.sum()
    assert query.obs["pred"].iloc[0] == "a"
    assert query.obs["pred_uncertainty"].iloc[0] == pytest.approx(1 - w[:2].sum())
    assert "domain" in query.obs  # earlier output untouched


def test_transfer_labels_not_inplace_and_errors():
    ref, query = _transfer_pair()
    out = tl.transfer_labels(ref, query, n_neighbors=2, inplace=False)
    assert list(out.columns) == ["domain", "domain_uncertainty"]
    assert "domain" not in query.obs
    wide = query.copy()
    wide.obsm["X_histovi"] = np.zeros((2, 3))
    with raises_naming(ValueError, "X_histovi", "1 dimensions", "3", "load_query_data"):
        tl.transfer_labels(ref, wide)
    with raises_naming(
        KeyError, "reference.obsm['X_other']", "get_latent_representation", "use_rep="
    ):
        tl.transfer_labels(ref, query, use_rep="X_other")
    no_rep = query.copy()
    del no_rep.obsm["X_histovi"]
    with raises_naming(KeyError, "query.obsm['X_histovi']", "get_latent_representation"):
        tl.transfer_labels(ref, no_rep)
    with raises_naming(
        KeyError, "reference.obs['cell_type']", "histovi.tl.domains(reference)", "label_key="
    ):
        tl.transfer_labels(ref, query, label_key="cell_type")


def test_hop_rings_on_a_line():
    adj = tl._utils.neighbor_graph(_line_neighbors(6), symmetric=True)
    ring1, ring2 = tl._aggregate.hop_rings(adj, 2)
    assert sorted(ring1[2].indices) == [1, 3]
    assert sorted(ring2[2].indices) == [0, 4]
    assert sorted(ring2[0].indices) == [2]


def test_aggregate_neighbors_values():
    n = 5
    adata = ad.AnnData(
        np.zeros((n, 1), dtype=np.float32),
        obs=pd.DataFrame({"sample": ["s"] * n}, index=[str(i) for i in range(n)]),
    )
    adata.obsm["X_rep"] = np.arange(n, dtype=float)[:, None] ** 2  # 0 1 4 9 16
    adata.obsm["spatial_neighbors"] = _line_neighbors(n)
    tl.aggregate_neighbors(adata, "X_rep", n_hops=2)
    out = adata.obsm["X_rep_agg2"]
    assert out.shape == (n, 3)
    # spot 2: itself 4, ring 1 = {1, 3} -> 5, ring 2 = {0, 4} -> 8
    np.testing.assert_allclose(out[2], [4, 5, 8])
    # spot 0: ring 1 = {1} -> 1, ring 2 = {2} -> 4
    np.testing.assert_allclose(out[0], [0, 1, 4])
    assert adata.uns["histovi"]["aggregate_neighbors"]["n_hops"] == 2
    arr = tl.aggregate_neighbors(adata, "X_rep", n_hops=1, inplace=False)
    np.testing.assert_allclose(arr[:, :2], out[:, :2])


def test_aggregate_neighbors_stays_in_sample_and_fills_empty_rings():
    adata = ad.AnnData(
        np.zeros((3, 1), dtype=np.float32),
        obs=pd.DataFrame({"sample": ["a", "a", "b"]}, index=["0", "1", "2"]),
    )
    adata.obsm["X_rep"] = np.array([[1.0], [3.0], [100.0]])
    adata.obsm["spatial_neighbors"] = np.array([[1], [2], [1]], dtype=np.int64)  # 1->2 crosses
    out = tl.aggregate_neighbors(adata, "X_rep", n_hops=2, inplace=False)
    np.testing.assert_allclose(out[1], [3, 1, 3])  # ring 2 empty -> own value
    np.testing.assert_allclose(out[2], [100, 100, 100])  # isolated in its sample
    with raises_naming(ValueError, "n_hops=0", "positive integer"):
        tl.aggregate_neighbors(adata, "X_rep", n_hops=0)


def test_anchor_sections_meets_anchors_half_way_and_leaves_the_rest():
    a = np.arange(30.0)[:, None] * np.array([[1.0, 2.0, 0.0]])  # spots 2.2 apart
    shifted = a + np.array([0.3, 0.0, 0.0])  # section t: section s moved a little
    X = np.vstack([a, shifted, [[50.0, 50.0, 50.0]]])
    adata = ad.AnnData(
        np.zeros((len(X), 1), dtype=np.float32),
        obs=pd.DataFrame({"sample": ["s"] * 30 + ["t"] * 31}, index=[str(i) for i in range(61)]),
    )
    adata.obsm["X_histovi"] = X.copy()
    tl.anchor_sections(adata, n_neighbors=1)
    out = adata.obsm["X_histovi_anchored"]
    # each spot's anchor is its copy in the other section: both meet half-way
    np.testing.assert_allclose(out[:30], out[30:60], atol=1e-5)
    np.testing.assert_allclose(out[:30], a + [0.15, 0, 0], atol=1e-5)
    np.testing.assert_array_equal(out[60], X[60])  # no anchor (a domain of one section): kept
    np.testing.assert_array_equal(adata.obsm["X_histovi"], X)  # input untouched
    record = adata.uns["histovi"]["anchor_sections"]["X_histovi_anchored"]
    assert record["share"] == 0.5 and record["spots_with_anchors"] == pytest.approx(60 / 61)
    onto = tl.anchor_sections(adata, n_neighbors=1, share=1.0, inplace=False)
    np.testing.assert_allclose(onto[:30], shifted, atol=1e-5)  # share 1: onto the anchors
    adata.obs["sample"] = "one"
    alone = tl.anchor_sections(adata, inplace=False)
    np.testing.assert_allclose(alone, X)  # one section: nothing to anchor to
