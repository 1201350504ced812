"""Tests of histovi.metrics against hand-computed values on tiny examples."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _messages import raises_naming

from histovi import metrics

# 6 labelled spots: labels a a b b c c, clusters 0 0 1 1 1 1.
# Pair counts: same-label pairs 3, same-cluster pairs 1 + 6 = 7, both 3, all pairs 15.
# ARI = (3 - 3*7/15) / ((3+7)/2 - 3*7/15) = 1.6 / 3.6
TOY_ARI = 1.6 / 3.6
# clusters are a function of the labels, so MI = H(clusters); NMI (arithmetic) = 2 MI / (H_l + H_c)
_H_C = -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3))
TOY_NMI = 2 * _H_C / (np.log(3) + _H_C)


def _toy_adata() -> ad.AnnData:
    labels = ["a", "a", "b", "b", "c", "c", "undetermined", None, None, "a", "b", "b"]
    clusters = ["0", "0", "1", "1", "1", "1", "0", "1", "0", "5", "5", "6"]
    samples = ["s1"] * 9 + ["s2"] * 3
    obs = pd.DataFrame(
        {"label": labels, "domain": pd.Categorical(clusters), "sample": samples},
        index=[f"spot{i}" for i in range(12)],
    )
    return ad.AnnData(np.zeros((12, 1), dtype=np.float32), obs=obs)


def test_per_sample_scores_hand_computed():
    df = metrics.per_sample_scores(_toy_adata(), "label", "domain")
    assert list(df.columns) == ["sample", "n_spots", "ARI", "NMI"]
    s1 = df.set_index("sample").loc["s1"]
    assert s1["n_spots"] == 6  # undetermined and missing labels skipped
    assert s1["ARI"] == pytest.approx(TOY_ARI)
    assert s1["NMI"] == pytest.approx(TOY_NMI)
    # s2: labels a b b, clusters 5 5 6 -> pairs: same-label 1, same-cluster 1, both 0, total 3
    # ARI = (0 - 1/3) / (1 - 1/3) = -0.5
    assert df.set_index("sample").loc["s2", "ARI"] == pytest.approx(-0.5)


def test_per_sample_scores_skips_unlabelled_samples_and_validates():
    adata = _toy_adata()
    adata.obs.loc[adata.obs["sample"] == "s2", "label"] = None
    df = metrics.per_sample_scores(adata, "label", "domain")
    assert list(df["sample"]) == ["s1"]
    with raises_naming(KeyError, "obs['clusters']", "histovi.tl.domains", "cluster_key="):
        metrics.per_sample_scores(adata, "label", "clusters")
    with raises_naming(ValueError, "obs['label']", "no usable label", "annotations"):
        metrics.per_sample_scores(adata, "label", "domain", ignore=("a", "b", "c", "undetermined"))


def _protocol_data(seed: int = 0):
    """Two labelled sections and one unlabelled with an extra population, in 3-D."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0, 0], [6, 0, 0], [0, 6, 0]], dtype=float)
    lab = np.repeat([0, 1, 2], 20)
    X = np.vstack([centers[lab] + rng.normal(scale=0.3, size=(60, 3)) for _ in range(2)])
    labels = np.array(["tumour", "stroma", "fat"], dtype=object)[np.concatenate([lab, lab])]
    labels[:5] = "undetermined"  # still clustered, never scored, not a class
    samples = np.array(["A1"] * 60 + ["B1"] * 60, dtype=object)
    # unlabelled section: same populations
    X3 = centers[lab] + rng.normal(scale=0.3, size=(60, 3))
    X = np.vstack([X, X3])
    labels = np.concatenate([labels, np.full(60, np.nan, dtype=object)])
    samples = np.concatenate([samples, np.array(["C1"] * 60, dtype=object)])
    return X, labels, samples


def test_cluster_and_score_protocol():
    X, labels, samples = _protocol_data()
    df = metrics.cluster_and_score(X, labels, samples, seeds=(0, 1, 2))
    assert list(df.columns) == ["method", "seed", "n_clusters", "sample", "n_spots", "ARI", "NMI"]
    assert (df["n_clusters"] == 3).all()  # 'undetermined' and NaN are not classes
    assert set(df["sample"]) == {"A1", "B1"}  # the unlabelled section is clustered, not scored
    assert len(df) == 2 * 3 * 2
    assert (df.loc[df["sample"] == "A1", "n_spots"] == 55).all()
    assert (df.loc[df["sample"] == "B1", "n_spots"] == 60).all()
    np.testing.assert_allclose(df["ARI"], 1.0)
    summary = metrics.summarize(df)
    assert list(summary["method"]) == ["gmm", "kmeans"]
    np.testing.assert_allclose(summary["ARI_mean"], 1.0)
    assert (summary["n_seeds"] == 3).all()


def test_cluster_and_score_clusters_all_spots(monkeypatch):
    """The clustering sees every spot of the pool, labelled or not."""
    import histovi.metrics._clustering as mod

    seen = []

    def fake_cluster(X, k, method, random_state=0):
        seen.append((X.shape[0], k))
        return np.arange(X.shape[0]) % k

    monkeypatch.setattr(mod, "cluster_embedding", fake_cluster)
    X, labels, samples = _protocol_data()
    metrics.cluster_and_score(X, labels, samples, methods=("kmeans",), seeds=(0,))
    assert seen == [(180, 3)]
    metrics.cluster_and_score(X, labels, samples, n_clusters=5, methods=("kmeans",), seeds=(0,))
    assert seen[-1] == (180, 5)


def test_cluster_and_score_errors():
    X, labels, samples = _protocol_data()
    with raises_naming(ValueError, "`embedding`", "10 rows", "one row per spot"):
        metrics.cluster_and_score(X[:10], labels, samples)
    with raises_naming(ValueError, "`labels` (180)", "`samples` (5)", "one value per spot"):
        metrics.cluster_and_score(X, labels, samples[:5])
    bad = X.copy()
    bad[0, 0] = np.inf
    with raises_naming(ValueError, "`embedding`", "NaN/inf", "impute or drop"):
        metrics.cluster_and_score(bad, labels, samples)


def test_summarize_hand_computed():
    df = pd.DataFrame(
        {
            "embedding": ["pca"] * 4 + ["histovi"] * 4,
            "method": ["kmeans"] * 8,
            "seed": [0, 0, 1, 1] * 2,
            "sample": ["A1", "B1"] * 4,
            "ARI": [0.2, 0.4, 0.4, 0.6, 0.5, 0.5, 0.7, 0.7],
            "NMI": [0.1] * 8,
        }
    )
    out = metrics.summarize(df).set_index("embedding")
    # pca: per-seed means 0.3 and 0.5 -> mean 0.4, std (ddof=1) = sqrt(0.02)
    assert out.loc["pca", "ARI_mean"] == pytest.approx(0.4)
    assert out.loc["pca", "ARI_std"] == pytest.approx(np.sqrt(0.02))
    assert out.loc["histovi", "ARI_mean"] == pytest.approx(0.6)
    assert out.loc["histovi", "NMI_std"] == pytest.approx(0.0)
    with raises_naming(KeyError, "['seed']", "histovi.metrics.cluster_and_score"):
        metrics.summarize(df.drop(columns="seed"))


def _line_adata(labels, samples=None) -> ad.AnnData:
    n = len(labels)
    nbrs = np.stack([np.arange(n) - 1, np.arange(n) + 1], axis=1)
    nbrs[nbrs >= n] = -1
    obs = pd.DataFrame({"domain": pd.Categorical(labels)}, index=[str(i) for i in range(n)])
    if samples is not None:
        obs["sample"] = samples
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32), obs=obs)
    adata.obsm["spatial_neighbors"] = nbrs.astype(np.int64)
    return adata


def test_spatial_coherence_line_graph():
    # 0 0 0 1 1 1 on a line: 10 directed pairs, 8 agree; chance 0.5^2 + 0.5^2 = 0.5
    df = metrics.spatial_coherence(_line_adata(["0", "0", "0", "1", "1", "1"]))
    overall = df.iloc[-1]
    assert overall["sample"] == "all" and overall["n_pairs"] == 10
    assert overall["coherence"] == pytest.approx(0.8)
    assert overall["expected"] == pytest.approx(0.5)
    assert overall["kappa"] == pytest.approx(0.6)
    # alternating labels: no neighbour pair agrees
    alt = metrics.spatial_coherence(_line_adata(["0", "1"] * 3)).iloc[-1]
    assert alt["coherence"] == 0.0 and alt["kappa"] == pytest.approx(-1.0)


def test_spatial_coherence_per_sample_drops_cross_links():
    adata = _line_adata(["0", "0", "1", "1"], samples=["a", "a", "b", "b"])
    df = metrics.spatial_coherence(adata).set_index("sample")
    # the 1<->2 link crosses samples and is dropped: 2 pairs per sample, all agreeing
    assert df.loc["a", "n_pairs"] == 2 and df.loc["a", "coherence"] == 1.0
    assert df.loc["all", "n_pairs"] == 4 and df.loc["all", "coherence"] == 1.0
    with raises_naming(KeyError, "obsm['knn']", "histovi.pp.spatial_neighbors", "neighbors_key="):
        metrics.spatial_coherence(adata, neighbors_key="knn")


def _integration_adata(mixed: bool) -> ad.AnnData:
    rng = np.random.default_rng(0)
    lab = np.repeat([0, 1], 60)
    batch = np.tile([0, 1], 60)
    X = rng.normal(scale=0.2, size=(120, 3))
    X[:, 0] += 5 * lab
    if not mixed:
        X[:, 1] += 5 * batch  # batches separated inside each label
    labels = np.array(["x", "y"], dtype=object)[lab]
    labels[:4] = None
    obs = pd.DataFrame(
        {"label": labels, "sample": np.array(["b0", "b1"])[batch]},
        index=[str(i) for i in range(120)],
    )
    adata = ad.AnnData(np.zeros((120, 1), dtype=np.float32), obs=obs)
    adata.obsm["X_histovi"] = X
    return adata


def test_integration_scores_rank_mixing():
    good = metrics.integration_scores(_integration_adata(True), label_key="label", n_neighbors=30)
    bad = metrics.integration_scores(_integration_adata(False), label_key="label", n_neighbors=30)
    assert list(good["metric"]) == [m for m, _ in metrics.INTEGRATION_METRICS]
    assert set(good["kind"]) == {"batch", "bio"}
    g, b = good.set_index("metric")["value"], bad.set_index("metric")["value"]
    assert g["iLISI"] > 0.8 > 0.2 > b["iLISI"]
    assert g["silhouette_batch"] > b["silhouette_batch"]
    assert g["cLISI"] == pytest.approx(1.0, abs=1e-3)  # labels perfectly separated in both
    assert g["graph_connectivity"] == pytest.approx(1.0)
    assert ((good["value"] >= 0) & (good["value"] <= 1.0 + 1e-6)).all()


def test_integration_scores_errors():
    adata = _integration_adata(True)
    with raises_naming(KeyError, "obs['celltype']", "existing column", "'label'"):
        metrics.integration_scores(adata, label_key="celltype")
    one = adata.copy()
    one.obs["sample"] = "b0"
    with raises_naming(ValueError, "obs['sample']", "single batch", "batch_key"):
        metrics.integration_scores(one, label_key="label")


def test_evaluate_combines_everything():
    adata = _integration_adata(True)
    nbrs = np.stack([np.arange(120) - 2, np.arange(120) + 2], axis=1)  # same batch: step 2
    nbrs[(nbrs < 0) | (nbrs >= 120)] = -1
    adata.obsm["spatial_neighbors"] = nbrs.astype(np.int64)
    adata.obs["domain"] = pd.Categorical((adata.obsm["X_histovi"][:, 0] > 2.5).astype(int))
    table = metrics.evaluate(
        adata, label_key="label", cluster_key="domain", seeds=(0,), methods=("kmeans",)
    )
    assert list(table.columns) == ["group", "method", "metric", "value", "std"]
    assert set(table["group"]) == {"clustering", "domains", "spatial", "batch", "bio"}
    ari = table.query("group == 'clustering' and metric == 'ARI'")["value"].item()
    assert ari == pytest.approx(1.0)
    coh = table.query("group == 'spatial' and metric == 'coherence'")["value"].item()
    assert 0.9 < coh <= 1.0


def _probe_adata(seed: int = 0) -> ad.AnnData:
    """4 sections (2 per patient) of 3 labels x 20 spots; each patient's labels sit at their own
    place in ``obsm['X_patient']``, at one shared place in ``obsm['X_shared']``."""
    rng = np.random.default_rng(seed)
    lab = np.tile(np.repeat([0, 1, 2], 20), 4)
    section = np.repeat(np.arange(4), 60)
    patient = section // 2
    centers = np.eye(3) * 6
    shared = centers[lab] + rng.normal(size=(240, 3))
    labels = np.array(["tumour", "stroma", "fat"], dtype=object)[lab]
    labels[:3] = None  # unlabelled spots are skipped
    obs = pd.DataFrame(
        {
            "label": labels,
            "sample": [f"s{i}" for i in section],
            "patient": [f"p{i}" for i in patient],
        },
        index=[str(i) for i in range(240)],
    )
    adata = ad.AnnData(np.zeros((240, 1), dtype=np.float32), obs=obs)
    adata.obsm["X_shared"] = shared
    adata.obsm["X_patient"] = np.hstack([shared[:, [1, 2, 0]] * (patient == 1)[:, None], shared])
    adata.obsm["X_patient"][patient == 1, 3:] = 0  # patient 1 only in the first three dims
    adata.obsm["X_noise"] = rng.normal(size=(240, 3))
    return adata


def test_label_probe_tells_labels_from_noise_and_transfer_across_groups():
    adata = _probe_adata()
    shared = metrics.label_probe(adata, "X_shared", group_key="patient")
    assert list(shared.columns) == [
        "sample",
        "group",
        "n_spots",
        "n_classes",
        "chance",
        "within",
        "transfer",
    ]
    assert list(shared["sample"]) == ["s0", "s1", "s2", "s3"] and shared["n_classes"].eq(3).all()
    assert shared["n_spots"].tolist() == [57, 60, 60, 60]
    assert (shared["within"] > 0.95).all() and (shared["transfer"] > 0.95).all()
    noise = metrics.label_probe(adata, "X_noise", group_key="patient")
    assert (noise["within"] < 1 / 3 + 0.2).all() and (noise["transfer"] < 1 / 3 + 0.2).all()
    # each patient's labels at its own place: held within sections and between a patient's
    # sections, not across patients
    own = metrics.label_probe(adata, "X_patient", group_key="patient")
    assert (own["within"] > 0.95).all() and (own["transfer"] < 0.6).all()
    by_section = metrics.label_probe(adata, "X_patient")  # learns from the sibling section too
    assert "group" not in by_section and (by_section["transfer"] > own["transfer"]).all()
    alone = metrics.label_probe(adata[adata.obs["sample"] == "s1"].copy(), "X_shared")
    assert len(alone) == 1 and np.isnan(alone["transfer"].item())  # nothing to learn from


def test_label_probe_errors_name_the_key():
    adata = _probe_adata()
    with raises_naming(KeyError, "obsm['X_missing']", "embedding_key="):
        metrics.label_probe(adata, "X_missing")
    with raises_naming(KeyError, "obs['celltype']", "existing column", "'label'"):
        metrics.label_probe(adata, "X_shared", label_key="celltype")
    with raises_naming(KeyError, "obs['donor']", "existing column", "'patient'"):
        metrics.label_probe(adata, "X_shared", group_key="donor")
    with raises_naming(
        ValueError, "min_class_size=3", "n_folds=5", "raise `min_class_size`", "lower `n_folds`"
    ):
        metrics.label_probe(adata, "X_shared", min_class_size=3)
    with raises_naming(
        ValueError,
        "obs['sample']",
        "two classes",
        "obs['label']",
        "`label_key`",
        "`min_class_size`",
    ):
        metrics.label_probe(adata, "X_shared", min_class_size=21)


def test_cluster_composition_hand_computed():
    adata = _toy_adata()
    # labels a a b b c c undetermined None None | a b b; spot 7 alone in an unlabelled cluster
    adata.obs["domain"] = ["0", "0", "1", "1", "1", "1", "0", "9", "0", "5", "5", "6"]
    comp = metrics.cluster_composition(adata, "domain", "label", "sample")
    assert list(comp.columns) == [
        "cluster",
        "n_spots",
        "group",
        "group_share",
        "label",
        "label_share",
    ]
    assert comp["cluster"].tolist()[:2] == ["0", "1"] and comp["n_spots"].tolist()[:2] == [4, 4]
    c = comp.set_index("cluster")
    assert c.loc["0", "label"] == "a" and c.loc["0", "label_share"] == 1.0  # undetermined skipped
    assert c.loc["1", "label_share"] == 0.5 and c.loc["5", "label_share"] == 0.5
    assert c.loc["6", "label"] == "b" and c.loc["6", "group"] == "s2"
    assert c.loc["9", "label"] == "" and np.isnan(c.loc["9", "label_share"])
    assert (c["group_share"] == 1.0).all() and c["n_spots"].sum() == 12
    adata.obs["patient"] = ["p0"] * 3 + ["p1"] * 9
    assert c.loc["0", "group_share"] == 1.0
    mixed = metrics.cluster_composition(adata, "domain", "label", "patient").set_index("cluster")
    assert mixed.loc["0", "group_share"] == 0.5 and mixed.loc["1", "group"] == "p1"
    with raises_naming(KeyError, "obs['clusters']", "histovi.tl.domains", "cluster_key="):
        metrics.cluster_composition(adata, "clusters", "label", "sample")
    adata.obs.loc["spot0", "domain"] = None
    with raises_naming(
        ValueError, "obs['domain']", "missing values", "every spot needs a cluster", "recompute"
    ):
        metrics.cluster_composition(adata, "domain", "label", "sample")


def _her2st_path():
    import os
    from pathlib import Path

    root = os.environ.get("HISTOVI_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = (
        base / "her2st" / "her2st_dev.h5ad"
        if (base / "her2st").is_dir()
        else base / "her2st_dev.h5ad"
    )
    if not path.is_file():
        pytest.skip(f"her2st data not found at {path}")
    return path


@pytest.mark.slow
def test_protocol_on_her2st():
    """k comes from the 6 annotated classes; only A1, B1, C1, D1 are scored, on their labelled,
    non-'undetermined' spots; all 24 sections are clustered."""
    import scanpy as sc

    adata = ad.read_h5ad(_her2st_path())
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    df = metrics.cluster_and_score(
        adata.obsm["X_pca"],
        adata.obs["label"],
        adata.obs["sample"],
        methods=("kmeans",),
        seeds=(0,),
    )
    assert (df["n_clusters"] == 6).all()
    assert sorted(df["sample"]) == ["A1", "B1", "C1", "D1"]
    lab = adata.obs["label"].astype(object)
    expected = (
        lab[lab.notna() & (lab != "undetermined")].groupby(adata.obs["sample"].astype(str)).size()
    )
    assert dict(zip(df["sample"], df["n_spots"], strict=True)) == expected.to_dict()
    assert df["ARI"].between(-1, 1).all()
