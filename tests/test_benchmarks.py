"""Smoke tests of the benchmark harness (benchmarks/), so that it cannot rot: tiny simulated
data, one or two epochs, in this process; the process-per-method run is under `slow`."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

integration = pytest.importorskip("integration")
reference_mapping = pytest.importorskip("reference_mapping")
import _harness  # noqa: E402
import _methods  # noqa: E402

FAST = {"seeds": [0], "max_epochs": 1, "isolate": False, "fast": True, "make_figures": False}


def test_integration_scores_methods_caches_and_reports_what_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setitem(
        _methods.REGISTRY, "Missing", _methods.Method(_methods.pca, ("not_a_module_here",))
    )
    methods = ["PCA", "HistoVI", "HistoVI@own", "Missing"]
    result = integration.run_benchmark("sim_tiny", methods, out=tmp_path, **FAST)
    table = {r["method"]: r for r in result["table"]}
    assert list(table) == methods
    for name in methods[:3]:
        row = table[name]
        assert row["status"] == "ok" and -1 <= row["ARI"] <= 1 and 0 <= row["NMI"] <= 1
        assert 0 < row["iLISI"] <= 1 and 0 < row["purity"] <= 1 and row["wall_s"] > 0
        assert -1 <= row["transfer"] <= 1
    assert table["HistoVI"]["epochs"] == "1" and table["PCA"]["epochs"] == ""
    # a method that cannot run is a row with its reason, never dropped
    assert table["Missing"]["status"] == "unavailable"
    assert "not_a_module_here" in table["Missing"]["note"]
    md = (tmp_path / "sim_tiny" / "table.md").read_text()
    assert "Missing" in md and "unavailable" in md and "not_a_module_here" in md
    emb = tmp_path / "sim_tiny" / "embeddings"
    z, own = (np.load(emb / f"{n}_seed0.npy") for n in ("HistoVI", "HistoVI_own"))
    assert z.shape == own.shape and not np.allclose(z, own)  # @own: the same model's own latent
    # cached per (study, method, seed): a rerun trains nothing, --reuse only scores
    stamp = (emb / "HistoVI_seed0.npy").stat().st_mtime_ns
    again = integration.run_benchmark("sim_tiny", methods[:3], out=tmp_path, **FAST)
    assert (emb / "HistoVI_seed0.npy").stat().st_mtime_ns == stamp
    assert again["table"][1]["ARI"] == pytest.approx(table["HistoVI"]["ARI"])
    reused = integration.run_benchmark(
        "sim_tiny", ["PCA", "scVI"], out=tmp_path, reuse=True, **{**FAST, "seeds": [0]}
    )
    assert [r["status"] for r in reused["table"]] == ["ok", "not run (--reuse)"]
    summary = integration.write_summary(tmp_path)
    assert "PCA" in summary and "sim_tiny" in summary


def test_variant_syntax_and_registry():
    assert _methods.parse_inline("a=1,b=0.5,c=True,d=None,e=x,f=1e-3") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": None,
        "e": "x",
        "f": 1e-3,
    }
    model, setup, train = _methods.split_kwargs(
        {"n_latent": 8, "plan.lr": 0.01, "train.batch_size": 64, "setup.labels_key": "x"}
    )
    assert model == {"n_latent": 8} and setup == {"labels_key": "x"}
    assert train == {"batch_size": 64, "plan_kwargs": {"lr": 0.01}}
    assert _methods.split_tag("HistoVI-noNiche:n_latent=8@own") == (
        "HistoVI-noNiche:n_latent=8",
        "@own",
    )
    assert _methods.split_tag("scVI+agg") == ("scVI", "+agg")
    assert integration.expand(["histovi"])[:2] == ["HistoVI", "HistoVI@own"]
    for name in ("HistoVI:view_gating=False@own", "scVI:n_hidden=32", "STAGATE", "Novae"):
        _methods.check_name(name)
    _methods.check_name("HistoVI-noMorph+anchors")
    for bad in ("Foo", "PCA@own", "scVI+anchors", "Foo:x=1", "HistoVI:use_niche"):
        with pytest.raises((KeyError, ValueError)):
            _methods.check_name(bad)
    assert _harness.safe_name("HistoVI:a=0.1") != _harness.safe_name("HistoVI:a=0_1")
    md = _harness.markdown(pd.DataFrame({"method": ["x"], "ARI": [0.12345]}))
    assert "0.123" in md and "x" in md


def test_subprocess_runner_measures_and_reports_failures(tmp_path):
    ok = _harness.run_job("_harness", "source_digest", {}, tmp_path / "ok.txt")
    assert isinstance(ok, str) and len(ok) == 12
    bad = _harness.run_job("_data", "load_raw", {"name": "nope"}, tmp_path / "bad.txt")
    assert bad["status"] == "failed" and "Unknown data 'nope'" in bad["error"]
    with _harness.Meter() as meter:
        block = np.ones(20 * 2**20 // 8)  # 20 MiB
    assert meter.wall_s > 0 and meter.peak_mb >= 15 and block.sum() > 0


def test_reference_mapping_runs_the_protocol(tmp_path):
    models = [*reference_mapping.MODELS, "HistoVI:n_latent=4"]
    result = reference_mapping.run(
        "sim_tiny", [0], tmp_path, max_epochs=2, query_epochs=1, holdout=["P1"], isolate=False,
        models=models,
    )  # fmt: skip
    (row,) = result["rows"]
    assert row["patient"] == "P1" and not result["failed"]
    for model in models:
        assert -1 <= row[f"{model} query"] <= 1 and row[f"{model} reference unchanged"]
        assert 0 < row[f"{model} reference purity"] <= 1
        assert f"{model} joint P1" in result["joints"][0]
    md = (tmp_path / "sim_tiny" / "table.md").read_text()
    assert "P1" in md and "**mean**" in md and "HistoVI:n_latent=4" in md
    assert json.loads((tmp_path / "sim_tiny" / "results.json").read_text())["seeds"] == [0]
    with pytest.raises(KeyError, match="Unknown model"):
        reference_mapping.run("sim_tiny", [0], tmp_path, models=["Harmony"], isolate=False)


@pytest.mark.slow
def test_isolated_run_with_figures_and_scib(tmp_path):
    """The default mode: one process per method, scib-metrics and figures."""
    result = integration.run_benchmark(
        "sim_tiny", ["PCA", "scVI", "scVI+agg"], [0, 1], tmp_path, max_epochs=2
    )
    for row in result["table"]:
        assert row["status"] == "ok" and row["n_seeds"] == 2 and row["peak_mb"] >= 0
        assert 0 <= row["BRAS"] <= 1 and 0 <= row["cLISI"] <= 1
    assert (tmp_path / "sim_tiny" / "ARI.png").exists()
    assert (tmp_path / "sim_tiny" / "domains_scVI_agg.png").exists()


def test_studies_are_laid_out_alike():
    import _data

    adata = _data.load("sim_layers_tiny")
    assert {"x_array", "y_array", "patient"} <= set(adata.obs.columns)
    assert not adata.obs.duplicated(["sample", "x_array", "y_array"]).any()
    assert adata.obsm["spatial_neighbors"].shape == (adata.n_obs, 6)
    if not (_data.shared_data_dir() / "starmap_mpfc" / "starmap_mpfc.h5ad").exists():
        pytest.skip("the shared STARmap data is not beside the checkout")
    view = _data.load("starmap_view")
    assert view.shape == (3190, 166) and view.obs["label"].notna().all()
    assert view.obs["patient"].nunique() == 3 and view.obsm["X_morphology"].shape[1] == 32
    shift = pd.DataFrame(view.obsm["X_morphology"]).groupby(view.obs["sample"].to_numpy()).mean()
    assert shift.std().mean() > 1  # the view is mostly section identity
    cells = _data.load_raw("starmap")
    spots = _data.load("starmap_spots")
    # every cell in exactly one spot, its counts kept; spots hold a Visium-like handful of cells
    assert spots.obs["n_cells"].sum() == cells.n_obs
    assert spots.layers["counts"].sum() == cells.layers["counts"].sum()
    assert 3 <= spots.obs["n_cells"].median() <= 8 and spots.obs["label"].notna().all()
    assert set(spots.obs["label"]) == set(cells.obs["label"].astype(str))
    assert not spots.obs.duplicated(["sample", "x_array", "y_array"]).any()


def test_scaling_step_mode(tmp_path):
    scaling = pytest.importorskip("scaling")
    scaling.main(
        [
            "--step",
            "--genes",
            "60",
            "--morphology-dim",
            "4",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path),
        ]
    )
    step = (tmp_path / "step.md").read_text()
    assert "HistoVI / scVI" in step and "0.45" in step


@pytest.mark.slow
def test_scaling_on_a_tiny_study(tmp_path):
    scaling = pytest.importorskip("scaling")
    path = scaling.study_path(tmp_path, 400, 150, 8)
    assert scaling.make_study(str(path), 400, n_genes=150, morph_dim=8)["n_spots"] == 400
    rows = [
        scaling.measure(m, str(path), epochs=1, limit_batches=2, batch_size=64)
        for m in scaling.METHODS
    ]
    for row in rows:
        assert row["n_spots"] == 400 and row["extrapolated"] and row["sec_per_epoch"] > 0
    md = scaling.scaling_table(rows)
    assert "HistoVI / scVI" in md and "~" in md


def test_transfer_ari_rewards_domains_shared_by_patients():
    """Domains that mean "this patient" do not transfer; domains shared by patients do."""
    rng = np.random.default_rng(0)
    n = 400
    patient = np.repeat(["P1", "P2"], n // 2)
    label = np.tile(np.repeat(["a", "b"], n // 4), 2)
    obs = pd.DataFrame({"patient": patient, "sample": patient, "label": label})
    adata = AnnData(obs=obs.set_index(pd.Index([f"s{i}" for i in range(n)])))
    domain = (label == "b").astype(float)[:, None]
    shared = np.hstack([domain * 5, rng.normal(size=(n, 1))])
    # each patient's domains shifted far apart and in a different direction: domain b of P2
    # lands where domain a of P1 is
    shifted = shared.copy()
    shifted[patient == "P2", 0] = 5 - shifted[patient == "P2", 0] + 20
    assert integration.transfer_ari(adata, shared, 2, 0) > 0.9
    assert integration.transfer_ari(adata, shifted, 2, 0) < 0.1
