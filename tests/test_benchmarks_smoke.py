"""Smoke run of the integration benchmark harness (benchmarks/integration.py) so it cannot rot:
a tiny simulated study, two cheap methods, one seed, in this process."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

integration = pytest.importorskip("integration")
_methods = pytest.importorskip("_methods")
pytest.importorskip("harmonypy")


def test_smoke_run_writes_table_json_and_figures(tmp_path, capsys):
    result = integration.run_benchmark(
        "sim_tiny", ["Harmony", "PCA"], seeds=[0], out=tmp_path, in_process=True
    )
    out = tmp_path / "sim_tiny"
    for name in (
        "table.md",
        "results.json",
        "per_section.csv",
        "scores_ARI.png",
        "domains_truth.png",
        "domains_PCA.png",
        "domains_Harmony.png",
    ):
        assert (out / name).exists(), name
    table = {row["method"]: row for row in result["table"]}
    assert list(table) == ["PCA", "Harmony"]  # the harness's order, not the caller's
    for row in table.values():
        assert row["status"] == "ok"
        assert 0.0 < row["ARI"] <= 1.0 and 0.0 < row["NMI"] <= 1.0
        assert 0.0 <= row["batch"] <= 1.0 and 0.0 <= row["bio"] <= 1.0
        assert row["wall_s"] > 0 and np.isfinite(row["peak_mb"])
    assert table["Harmony"]["ARI/Harmony"] == pytest.approx(1.0)
    # per-section scores: one row per clustering method and labelled section
    per = result["per_section"]
    assert {r["clustering"] for r in per} == {"gmm", "kmeans"}
    assert len(per) == 2 * 2 * 4  # 2 clusterings x 2 methods x 4 sections
    assert json.loads((out / "results.json").read_text())["config"]["seeds"] == [0]
    printed = capsys.readouterr().out
    assert "| PCA |" in printed and "| Harmony |" in printed
    assert "gland vs gland_in_situ" in printed  # pair separation on simulated data
    probes = [v for k, v in table["PCA"].items() if k.startswith("probe: ") and "gland" in k]
    assert "(probe)" in printed and len(probes) == 1 and 0.0 <= probes[0] <= 1.0


def test_pair_probe_sees_a_planted_difference_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 100 + ["b"] * 100 + ["c"] * 50)
    X = rng.normal(size=(250, 4))
    # chance level on noise (balanced accuracy near 0.5), near 1 once one dimension differs
    assert abs(integration.pair_probe(X, labels, ("a", "b"), seed=0) - 0.5) < 0.15
    X[labels == "a", 2] += 4.0
    assert integration.pair_probe(X, labels, ("a", "b"), seed=0) > 0.95
    assert np.isnan(integration.pair_probe(X, labels, ("a", "missing"), seed=0))


def test_rejects_unknown_method_and_bad_variant(tmp_path):
    with pytest.raises(KeyError, match="Unknown methods"):
        integration.run_benchmark("sim_tiny", ["NotAMethod"], seeds=[0], out=tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        integration.run_benchmark("sim_tiny", ["PCA"], seeds=[], out=tmp_path)
    name, kwargs = integration._parse_variant('HistoVI-a10={"alignment_weight": 10}')
    assert name == "HistoVI-a10" and kwargs == {"alignment_weight": 10}
    with pytest.raises(Exception, match="NAME"):
        integration._parse_variant("no-equals-sign")
    ctx = _methods.Context(histovi_variants={**_methods.HISTOVI_VARIANTS, name: kwargs})
    assert name in _methods.method_names(ctx)
    from histovi.model._model import default_max_epochs

    assert _methods.default_max_epochs(6696) == default_max_epochs(6696) == 90
    assert default_max_epochs(1000) == 400 and default_max_epochs(10**7) == 20


@pytest.mark.slow
def test_isolated_worker_run_with_relative_out(tmp_path, monkeypatch):
    """The default mode: one worker process per method, relative --out resolved correctly."""
    monkeypatch.chdir(tmp_path)
    result = integration.run_benchmark(
        "sim_tiny", ["PCA"], seeds=[0, 1], out="rel_out", make_figures=False
    )
    row = result["table"][0]
    assert row["status"] == "ok", result["records"]["PCA"].get("error")
    assert row["n_seeds"] == 2 and row["peak_mb"] >= 0
    assert (tmp_path / "rel_out" / "sim_tiny" / "work" / "record_PCA.json").exists()


def test_fm_variant_adds_the_expression_embedding_view():
    import _data

    adata = _data.load("sim_tiny")
    assert adata.obsm[_data.FM_KEY].shape == (adata.n_obs, _data.FM_DIM)
    ctx = _methods.Context(max_epochs=2)
    z = _methods.histovi_variant(adata, 0, ctx, "HistoVI+FM")
    assert z.shape == (adata.n_obs, _methods.N_LATENT) and np.isfinite(z).all()
    assert "+fm" in ctx.info["settings"]  # the model summary lists the view
    del adata.obsm[_data.FM_KEY]
    with pytest.raises(KeyError, match="X_fm"):
        _methods.histovi_variant(adata, 0, _methods.Context(max_epochs=2), "HistoVI+FM")


def test_merge_pools_runs_split_by_seed(tmp_path):
    """Seeds run in separate processes (or machines) pool into one table with every seed."""
    single = {}
    for seed in (0, 1):
        res = integration.run_benchmark(
            "sim_tiny",
            ["PCA"],
            seeds=[seed],
            out=tmp_path / f"s{seed}",
            in_process=True,
            make_figures=False,
        )
        single[seed] = sorted((r["sample"], r["clustering"], r["ARI"]) for r in res["per_section"])
    merged = integration.merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m", "sim_tiny")
    assert merged == ["PCA"]
    pooled = integration.run_benchmark(
        "sim_tiny",
        ["PCA"],
        seeds=[0, 1],
        out=tmp_path / "m",
        in_process=True,
        make_figures=False,
        reuse=True,
    )
    assert pooled["table"][0]["n_seeds"] == 2
    for seed in (0, 1):  # the same embeddings, scored the same way
        rows = sorted(
            (r["sample"], r["clustering"], r["ARI"])
            for r in pooled["per_section"]
            if r["seed"] == seed
        )
        assert rows == single[seed]

    # the same seed twice is refused (a library default may differ between the runs)
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\]"):
        integration.merge_runs([tmp_path / "s0", tmp_path / "s0"], tmp_path / "d", "sim_tiny")
    # ... unless the method is left out
    assert integration.merge_runs([tmp_path / "s0"] * 2, tmp_path / "e", "sim_tiny", []) == []

    # runs of another configuration are refused, not averaged together
    record = tmp_path / "s1" / "sim_tiny" / "work" / "record_PCA.json"
    rec = json.loads(record.read_text())
    rec["key"]["max_epochs"] = 5
    record.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="different settings"):
        integration.merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "x", "sim_tiny")


def test_reuse_resumes_the_finished_seeds_of_an_interrupted_method(tmp_path, capsys):
    """A method stopped after some seeds keeps them: --reuse trains only the missing seeds."""
    kw = {"out": tmp_path / "r", "in_process": True, "make_figures": False}
    integration.run_benchmark("sim_tiny", ["PCA"], seeds=[0], **kw)
    work = tmp_path / "r" / "sim_tiny" / "work"
    (work / "record_PCA.json").unlink()  # killed before the method's record was written
    emb0 = work / "embeddings" / "PCA_seed0.npy"
    before = (emb0.stat().st_mtime_ns, np.load(emb0))
    capsys.readouterr()
    res = integration.run_benchmark("sim_tiny", ["PCA"], seeds=[0, 1], reuse=True, **kw)
    assert "seeds [0] reused" in capsys.readouterr().out
    assert emb0.stat().st_mtime_ns == before[0]  # seed 0 was not run again
    record = json.loads((work / "record_PCA.json").read_text())
    assert record["resumed_seeds"] == [0] and [r["seed"] for r in record["runs"]] == [0, 1]
    assert res["table"][0]["n_seeds"] == 2
    fresh = integration.run_benchmark(
        "sim_tiny", ["PCA"], seeds=[0, 1], out=tmp_path / "f", in_process=True, make_figures=False
    )
    assert sorted((r["seed"], r["sample"], r["ARI"]) for r in res["per_section"]) == sorted(
        (r["seed"], r["sample"], r["ARI"]) for r in fresh["per_section"]
    )
    # an unreadable per-seed record is run again, not trusted
    (work / "record_PCA.json").unlink()
    (work / "embeddings" / "PCA_seed1.json").write_text("{trunc")
    capsys.readouterr()
    integration.run_benchmark("sim_tiny", ["PCA"], seeds=[0, 1], reuse=True, **kw)
    out = capsys.readouterr().out
    assert "seeds [0] reused" in out and "PCA_seed1.json is unreadable" in out
    # a finished seed run with other settings is not reused
    (work / "record_PCA.json").unlink()
    capsys.readouterr()
    integration.run_benchmark("sim_tiny", ["PCA"], seeds=[0, 1], reuse=True, max_epochs=3, **kw)
    assert "reused" not in capsys.readouterr().out


def test_epoch_curve_scores_every_n_epochs(tmp_path, capsys):
    """epoch_curve.py: one row per scored epoch (the last one included), JSON and figure written."""
    epoch_curve = pytest.importorskip("epoch_curve")
    args = ["--data", "sim_tiny", "--epochs", "5", "--every", "2", "--out", str(tmp_path)]
    assert epoch_curve.main(args) == 0
    result = json.loads((tmp_path / "sim_tiny_histovi_seed0.json").read_text())
    rows = result["rows"]
    assert [r["epoch"] for r in rows] == [2, 4, 5]
    for r in rows:
        assert -1.0 <= r["ARI"] <= 1.0 and np.isfinite(r["elbo_validation"])
    assert rows[0]["kl_weight"] < rows[-1]["kl_weight"]  # scvi-tools' KL warm-up is visible
    assert (tmp_path / "sim_tiny_histovi_seed0.png").stat().st_size > 0
    assert "| 5 |" in capsys.readouterr().out


def test_epoch_curve_refuses_bad_arguments(capsys):
    epoch_curve = pytest.importorskip("epoch_curve")
    for args in (["--every", "0"], ["--kwargs", "{cycle_weight: 0}"]):
        with pytest.raises(SystemExit):
            epoch_curve.main(["--data", "sim_tiny", *args])
    err = capsys.readouterr().err
    assert "--every 0" in err and "is not JSON" in err


def test_label_probe_tells_a_label_embedding_from_noise(tmp_path, monkeypatch):
    label_probe = pytest.importorskip("label_probe")
    import _data

    monkeypatch.setattr(label_probe, "CACHE", tmp_path / "cache")
    adata = _data.load("sim_tiny", cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(0)
    labels = adata.obs[_data.LABEL_KEY].astype(str).to_numpy()
    codes = np.unique(labels, return_inverse=True)[1]
    planted = np.eye(codes.max() + 1)[codes] * 20 + rng.normal(size=(adata.n_obs, codes.max() + 1))
    np.save(tmp_path / "planted.npy", planted)
    np.save(tmp_path / "noise.npy", rng.normal(size=(adata.n_obs, 4)))
    table = label_probe.main(
        [
            "--data",
            "sim_tiny",
            "--embeddings",
            f"planted={tmp_path / 'planted.npy'}",
            f"noise={tmp_path / 'noise.npy'}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    by = table.groupby("embedding")[["balanced_accuracy", "transfer"]].mean()
    chance = 1 / table["n_classes"].mean()
    assert by.loc["planted", "balanced_accuracy"] > 0.95 and by.loc["planted", "transfer"] > 0.95
    assert by.loc["noise", "balanced_accuracy"] < chance + 0.15
    assert by.loc["noise", "transfer"] < chance + 0.15
    # the section-alone count references are scored within sections only
    refs = table[table["embedding"].isin(label_probe.SECTION_ALONE)]
    assert len(refs) and refs["transfer"].isna().all()
    assert (refs["balanced_accuracy"] > chance).all()
    assert (tmp_path / "out" / "label_probe.md").read_text().count("| planted |") == 1
    # where the clusters go: the planted embedding's clusters are each one label, every spot in
    # exactly one cluster, and k is the number of labels
    comp = pd.read_csv(tmp_path / "out" / "composition.csv")
    planted_comp = comp[comp["embedding"] == "planted"]
    assert len(planted_comp) == codes.max() + 1
    assert planted_comp["n_spots"].sum() == adata.n_obs
    assert (planted_comp["label_share"] > 0.9).all()
    assert sorted(planted_comp["label"]) == sorted(np.unique(labels))
    assert not comp["embedding"].isin(label_probe.SECTION_ALONE).any()
    assert "| planted | 0 |" in (tmp_path / "out" / "composition.md").read_text()
    ari = comp.groupby("embedding")["ARI"].first()
    assert ari["planted"] > 0.9 and ari["noise"] < 0.2


def test_label_probe_refuses_bad_embeddings(tmp_path):
    label_probe = pytest.importorskip("label_probe")
    np.save(tmp_path / "nan.npy", np.full((5, 2), np.nan))
    for args, words in (
        (["--embeddings", "no_path_given"], "NAME=PATH"),
        (["--embeddings", f"x={tmp_path / 'missing.npy'}"], "existing .npy"),
        (["--embeddings", f"x={tmp_path / 'nan.npy'}"], "NaN/inf"),
        (["--runs", str(tmp_path)], "no saved embeddings"),
    ):
        with pytest.raises(SystemExit, match=words):
            label_probe.main(["--data", "sim_tiny", "--out", str(tmp_path / "o"), *args])
