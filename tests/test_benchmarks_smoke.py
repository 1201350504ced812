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
    """The default mode: one worker process per method, relative --out resolved correctly; an
    inline variant and its curve pass through the worker."""
    monkeypatch.chdir(tmp_path)
    inline = "scVI:n_hidden=16"
    result = integration.run_benchmark(
        "sim_tiny",
        ["PCA", inline],
        seeds=[0, 1],
        out="rel_out",
        make_figures=False,
        max_epochs=2,
        curve_every=1,
    )
    for row in result["table"]:
        assert row["status"] == "ok", result["records"][row["method"]].get("error")
        assert row["n_seeds"] == 2 and row["peak_mb"] >= 0
    work = tmp_path / "rel_out" / "sim_tiny" / "work"
    assert (work / "record_PCA.json").exists()
    assert (work / f"record_{integration._safe(inline)}.json").exists()
    curve = pd.read_csv(tmp_path / "rel_out" / "sim_tiny" / "curve.csv")
    assert len(curve) == 2 * 2 and set(curve["method"]) == {inline}  # 2 seeds x 2 epochs


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


def test_inline_variants_parse_and_name_safe_files():
    assert _methods.parse_inline("a=1,b=0.5,c=True,d=None,e=x,f=1e-3,") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": None,
        "e": "x",
        "f": 1e-3,
    }
    model, setup, train = _methods.split_kwargs(
        {
            "n_latent": 8,
            "plan.lr": 0.01,
            "train.batch_size": 64,
            "setup.categorical_covariate_keys": "patient",
            "train_kwargs": {"early_stopping": True},
        }
    )
    assert model == {"n_latent": 8} and setup == {"categorical_covariate_keys": ["patient"]}
    assert train == {"early_stopping": True, "batch_size": 64, "plan_kwargs": {"lr": 0.01}}
    ctx = _methods.Context()
    assert _methods.variant_of("HistoVI-noMorph:n_latent=8", ctx) == (
        "HistoVI",
        {"use_morphology": False, "n_latent": 8},
    )
    assert _methods.variant_of("scVI:n_hidden=32", ctx) == ("scVI", {"n_hidden": 32})
    assert _methods.variant_of("PCA", ctx) is None and _methods.variant_of("scVI", ctx) is None
    with pytest.raises(ValueError, match="key=value"):
        _methods.variant_of("HistoVI:use_niche", ctx)
    with pytest.raises(KeyError, match="Unknown methods.*inline"):
        integration.run_benchmark("sim_tiny", ["Foo:x=1"], seeds=[0], out="unused")
    # old names keep their files; inline ones are file-system safe and never collide
    assert integration._safe("scVI+agg") == "scVI_agg"
    a, b = integration._safe("HistoVI:a=0.1"), integration._safe("HistoVI:a=0_1")
    assert a != b and a.startswith("HistoVI_a_0_1-") and all(c.isalnum() or c in "-_" for c in a)
    assert len(integration._safe("HistoVI:" + "n_latent=8," * 50)) <= 89


def test_inline_variants_fast_curve_and_extras(tmp_path, capsys):
    """Inline HistoVI / scVI variants (plan.* reaches the training plan), --fast, --curve, and
    variant_sweep's extras (patient purity, latent and posterior sd) in the table."""
    methods = ["PCA", "HistoVI:use_niche=False,plan.n_epochs_kl_warmup=None", "scVI:n_hidden=32"]
    kw = {"out": tmp_path, "in_process": True, "fast": True, "max_epochs": 3, "curve_every": 2}
    result = integration.run_benchmark("sim_tiny", methods, seeds=[0], **kw)
    out = tmp_path / "sim_tiny"
    table = {row["method"]: row for row in result["table"]}
    assert list(table) == methods and all(r["status"] == "ok" for r in table.values())
    assert "batch" not in table["PCA"] and not list(out.glob("*.png"))  # --fast
    for name, row in table.items():
        assert 0.0 < row["patient_purity"] <= 1.0  # sim_tiny has obs['patient']
        neural = name != "PCA"
        assert (row.get("latent_sd") is not None) == neural
        assert (row.get("posterior_sd") is not None) == neural
    assert "n_hidden" in table["scVI:n_hidden=32"]["settings"]
    assert "'use_niche': False" in table[methods[1]]["settings"]
    names = sorted(p.name for p in (out / "work" / "embeddings").glob("*.npy"))
    # one per method, plus HistoVI's other latents (spatial='domain' and its own), kept so that
    # '<variant>@domain' / '<variant>@own' are scored without training again
    assert len(names) == 5 and not any(c in n for n in names for c in ":,=")
    assert sum("_domain-" in n for n in names) == 1 and sum("_own-" in n for n in names) == 1
    curve = pd.read_csv(out / "curve.csv")
    assert sorted(set(curve["method"])) == sorted(methods[1:])
    for name, part in curve.groupby("method"):
        assert part["epoch"].tolist() == [2, 3]  # every 2 epochs and the last
        assert np.isfinite(part["elbo_validation"]).all()
        # the last row scores the final latent, as the table does
        assert part["ARI"].iloc[-1] == pytest.approx(table[name]["ARI"])
    kl = curve.groupby("method")["kl_weight"].first()
    assert kl[methods[1]] == 1.0 and kl["scVI:n_hidden=32"] < 1.0  # plan.* reached the plan
    assert (out / "curve.md").read_text().count("####") == 2
    capsys.readouterr()
    integration.run_benchmark("sim_tiny", methods, seeds=[0], reuse=True, **kw)
    assert capsys.readouterr().out.count("reused from") == 3


def test_main_probe_embedding_summary_and_rebuild(tmp_path):
    """One entry point: a precomputed embedding, --probe (histovi.metrics.label_probe and
    cluster_composition) and the cross-scenario summary, rebuilt with --rebuild-report."""
    import shutil

    import _data

    adata = _data.load("sim_tiny")
    rng = np.random.default_rng(0)
    labels = adata.obs[_data.LABEL_KEY].astype(str).to_numpy()
    codes = np.unique(labels, return_inverse=True)[1]
    planted = np.eye(codes.max() + 1)[codes] * 20 + rng.normal(size=(adata.n_obs, codes.max() + 1))
    np.save(tmp_path / "planted.npy", planted)
    out = tmp_path / "out"
    args = ["--data", "sim_tiny", "--methods", "PCA", "--seeds", "0", "--fast", "--probe"]
    args += ["--in-process", "--embedding", f"planted={tmp_path / 'planted.npy'}"]
    assert integration.main([*args, "--out", str(out)]) == 0
    probe = pd.read_csv(out / "sim_tiny" / "label_probe.csv")
    by = probe.groupby("embedding")[["within", "transfer"]].mean()
    assert by.loc["planted", "within"] > 0.95 and by.loc["planted", "transfer"] > 0.95
    assert by.loc["PCA", "within"] < by.loc["planted", "within"]
    refs = probe[probe["embedding"].str.contains("section alone")]
    assert len(refs) == 2 * 4 and refs["transfer"].isna().all()  # 2 references x 4 sections
    comp = pd.read_csv(out / "sim_tiny" / "composition.csv")
    mine = comp[comp["embedding"] == "planted"]
    assert len(mine) == codes.max() + 1 and mine["n_spots"].sum() == adata.n_obs
    assert (mine["label_share"] > 0.9).all() and mine["ARI"].iloc[0] > 0.9
    assert "| planted | 0 |" in (out / "sim_tiny" / "composition.md").read_text()
    # a second scenario (a doctored copy where PCA is called Harmony) joins the summary
    shutil.copytree(out / "sim_tiny", out / "sim")
    res = json.loads((out / "sim" / "results.json").read_text())
    res["data"] = "sim"
    for row in res["table"]:
        row["method"] = {"PCA": "Harmony"}.get(row["method"], row["method"])
    (out / "sim" / "results.json").write_text(json.dumps(res))
    assert integration.main(["--rebuild-report", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    ari = {r["method"]: r["ARI"] for r in res["table"]}
    assert summary.loc["planted", "sim ARI/best_ref"] == pytest.approx(
        ari["planted"] / ari["Harmony"]
    )
    assert np.isnan(summary.loc["planted", "sim_tiny ARI/best_ref"])  # no reference ran there
    assert summary.loc["planted", "sim rank"] == 1 and summary.loc["planted", "mean rank"] == 1
    md = (out / "summary.md").read_text()
    assert "| method | sim | sim_tiny |" in md and "best reference Harmony" in md


def test_main_refuses_bad_arguments(tmp_path, capsys):
    for args in (["--curve", "0"], ["--embedding", f"x={tmp_path / 'missing.npy'}"]):
        with pytest.raises(SystemExit):
            integration.main(["--data", "sim_tiny", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert "--curve 0" in err and "existing .npy" in err


def test_other_latents_of_one_histovi_model_are_scored_without_retraining(tmp_path):
    """'HistoVI@domain' and 'HistoVI@own' read the latents the 'HistoVI' run saved;
    'HistoVI@agg' aggregates the saved '@own' latent over two rings (as scVI+agg)."""
    methods = ["HistoVI", "HistoVI@domain", "HistoVI@own", "HistoVI@agg"]
    kw = {"out": tmp_path, "in_process": True, "fast": True, "max_epochs": 2}
    result = integration.run_benchmark("sim_tiny", methods, seeds=[0], **kw)
    table = {row["method"]: row for row in result["table"]}
    assert all(table[m]["status"] == "ok" for m in methods)
    emb = tmp_path / "sim_tiny" / "work" / "embeddings"
    z = {m: np.load(emb / f"{integration._safe(m)}_seed0.npy") for m in methods}
    assert not np.allclose(z["HistoVI"], z["HistoVI@own"])
    assert not np.allclose(z["HistoVI"], z["HistoVI@domain"])
    for m in methods[1:]:
        assert result["records"][m]["runs"][0]["info"]["reused_model"]
    own = z["HistoVI@own"]
    assert z["HistoVI@agg"].shape == (own.shape[0], 3 * own.shape[1])
    np.testing.assert_array_equal(z["HistoVI@agg"][:, : own.shape[1]], own)


def test_pair_ceiling_is_the_ari_of_the_truth_with_the_pair_merged():
    import anndata as ad

    labels = ["stroma_adjacent"] * 4 + ["stroma_distal"] * 4 + ["tumour"] * 4 + ["undetermined"]
    adata = ad.AnnData(
        obs=pd.DataFrame({"label": labels * 2, "sample": ["s1"] * 13 + ["s2"] * 13}),
    )
    ceilings = integration.pair_ceilings(adata)
    # only the neighbourhood pair is in the data; 'undetermined' spots are not scored
    assert list(ceilings) == ["neighbourhood-only: stroma_adjacent vs stroma_distal"]
    from sklearn.metrics import adjusted_rand_score

    truth = np.array(labels[:12])
    expected = adjusted_rand_score(
        truth, np.where(truth == "stroma_adjacent", "stroma_distal", truth)
    )
    assert ceilings["neighbourhood-only: stroma_adjacent vs stroma_distal"] == pytest.approx(
        expected
    )
    assert 0 < expected < 1
