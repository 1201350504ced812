"""`histovi run`: the default pipeline on a tiny simulated study, real data, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from histovi import cli

# A tiny simulated study: 2 patients x 1 section of 10 x 10 spots, 150 genes.
TINY = [
    "--sim-grid",
    "10",
    "--sim-patients",
    "2",
    "--sim-sections",
    "1",
    "--sim-genes",
    "150",
    "--max-epochs",
    "2",
    "--quiet",
]


def test_default_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--out", str(out), *TINY]) == 0
    for name in (
        "adata.h5ad",
        "metrics.json",
        "report.html",
        "domains.png",
        "labels.png",
        "umap.png",
        "training.png",
        "model/model.pt",
    ):
        assert (out / name).exists(), name
    adata = ad.read_h5ad(out / "adata.h5ad")
    assert adata.n_obs == 200
    assert adata.obsm["X_histovi"].shape == (200, 16)
    assert np.isfinite(adata.obsm["X_histovi"]).all()
    # the morphology came from the simulated images, not from the simulator's embedding
    assert adata.uns["histovi"]["morphology"]["encoder"] == "stain-texture"
    n_true = adata.obs["domain"].nunique()
    assert adata.obs[cli.DOMAIN_KEY].nunique() <= n_true

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["epochs"] == 2
    assert metrics["summary"]["label_key"] == "domain"
    assert {r["sample"] for r in metrics["per_sample"]} == {"P1_S1", "P2_S1"}
    for key in ("ARI_mean", "NMI_mean", "spatial_coherence", "iLISI", "cLISI"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["settings"]["simulate.grid_size"] == [10, 10]

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # figures embedded: self-contained
    assert "simulate.grid_size" in html and "ARI" in html
    assert "higher is better" in html  # each metric says which way is good
    # the section without an image (the simulator's last one) and what it costs
    missing = metrics["sections_without_image"]
    assert missing["sections"] == ["P2_S1"] and missing["morphology_only_pairs"]
    assert "Sections without an image" in html and "P2_S1" in html
    assert {r["sample"]: r["image"] for r in metrics["per_sample"]} == {
        "P1_S1": True,
        "P2_S1": False,
    }
    # each domain is drawn in the colour of the label it is matched to, in every figure
    labels, domains = adata.obs["domain"].cat.categories, adata.obs[cli.DOMAIN_KEY].cat.categories
    colors = dict(zip(labels, adata.uns["domain_colors"], strict=True))
    domain_colors = dict(zip(domains, adata.uns[f"{cli.DOMAIN_KEY}_colors"], strict=True))
    for row in metrics["domain_labels"]:
        if row["label"] is not None:
            assert domain_colors[row["domain"]] == colors[row["label"]]

    printed = capsys.readouterr()
    assert "report:" in printed.out and "ARI_mean" in printed.out
    assert printed.err == ""  # --quiet: no progress, no warnings


def test_input_h5ad_from_python_and_reload(tmp_path, small_adata, capfd):
    from histovi import pipeline

    path = tmp_path / "study.h5ad"
    small_adata.write_h5ad(path)
    out = tmp_path / "out"
    # the command line's run as a library call; no labels: the protocol and scib-metrics scores
    # are skipped, k comes from n_domains
    result = pipeline.run(
        out,
        input=str(path),
        label_key="none",
        n_domains=3,
        encoder="precomputed",
        samples=["P1_S1", "P2_S1"],
        n_top_genes=100,
        max_epochs=1,
    )
    assert result.report == out / "report.html" and result.adata.n_obs == 200
    assert result.summary["n_domains"] == 3 == result.adata.obs[cli.DOMAIN_KEY].nunique()
    # progress on stderr, none of the libraries' chatter (whatever stream it was sent to)
    printed = capfd.readouterr()
    assert "[5/9] train HistoVI" in printed.err
    for chatter in ("GPU available", "Tip:", "INFO", "Seed set", "deprecated", "Warning"):
        assert chatter not in printed.out + printed.err, chatter
    adata = ad.read_h5ad(out / "adata.h5ad")
    assert adata.n_vars == 100  # highly variable genes kept
    assert set(adata.obs["sample"]) == {"P1_S1", "P2_S1"}
    assert adata.obs[cli.DOMAIN_KEY].nunique() == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert "ARI_mean" not in metrics and 0 <= metrics["spatial_coherence"] <= 1
    assert metrics["summary"]["label_key"] is None
    # the saved model loads on the saved AnnData and gives the stored latent
    from histovi import HistoVI

    model = HistoVI.load(out / "model", adata=adata)
    np.testing.assert_allclose(
        model.get_latent_representation(), adata.obsm["X_histovi"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input", "does/not/exist.h5ad"], "does not exist"),
        (["--sample-key", "slide"], "--sample-key 'slide' is not a column"),
        (["--label-key", "celltype"], "--label-key 'celltype'"),
        (["--layer", "raw"], "--layer 'raw' is not in adata.layers"),
        (["--samples", "P9_S9"], "--samples P9_S9 not found"),
        (["--n-domains", "1"], "--n-domains 1 must be at least 2"),
    ],
)
def test_bad_input_exit_code_2(tmp_path, capsys, small_adata, extra, message):
    path = tmp_path / "study.h5ad"
    small_adata.write_h5ad(path)
    argv = ["run", "--out", str(tmp_path / "out"), "--input", str(path), "--max-epochs", "1"]
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("histovi: error: ")
    assert message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_unreadable_and_uncounted_input(tmp_path, capsys, small_adata):
    bad = tmp_path / "notes.txt"
    bad.write_text("not data")
    assert cli.main(["run", "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown format" in capsys.readouterr().err
    adata = small_adata.copy()
    adata.X = adata.X * 0.5
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "norm.h5ad")
    assert (
        cli.main(["run", "--input", str(tmp_path / "norm.h5ad"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "non-integer" in capsys.readouterr().err


def test_help_and_module_entry_point(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("--input", "--sample-key", "examples:", "report.html", "--n-top-genes"):
        assert word in help_text
    assert "--sim-grid" not in help_text  # test-only flags stay hidden
    # `python -m histovi` is the same command, with exit code 2 and one line for bad input;
    # the input is checked before the output folder: a finished run left in the default
    # --out (the README's first line, run in this folder) does not hide a missing input
    Path("histovi_out").mkdir()
    (Path("histovi_out") / "adata.h5ad").write_bytes(b"a previous run")
    proc = subprocess.run(
        [sys.executable, "-m", "histovi", "run", "--input", "/nonexistent.h5ad"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("histovi: error: --input")
    assert "does not exist" in proc.stderr
    # --help and a bad command line answer without loading torch, scanpy or anndata
    probe = (
        "import sys\n"
        "from histovi import cli\n"
        "for argv in (['run', '--help'], ['run', '--input', '/nonexistent.h5ad']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'scanpy', 'anndata', 'pandas') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


@pytest.mark.slow
def test_her2st_folder(tmp_path, her2st_dir):
    out = tmp_path / "out"
    argv = [
        "run",
        "--input",
        str(her2st_dir),
        "--samples",
        "A1",
        "B1",
        "C2",
        "--max-epochs",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["label_key"] == "label"
    assert metrics["summary"]["n_genes"] == 2000
    # labels exist on A1 and B1 only; C2 has the image
    assert {r["sample"] for r in metrics["per_sample"] if r.get("ARI") is not None} == {"A1", "B1"}
    adata = ad.read_h5ad(out / "adata.h5ad")
    valid = ~np.isnan(adata.obsm["X_morphology"]).any(1)
    assert valid[(adata.obs["sample"] == "C2").to_numpy()].mean() > 0.5
    assert not valid[(adata.obs["sample"] == "B1").to_numpy()].any()


@pytest.mark.parametrize(("interval", "saves"), [(3600.0, 2), (0.0, 5)])
def test_training_checkpoints_after_the_first_epoch_then_at_an_interval(
    tmp_path, tiny_adata, monkeypatch, interval, saves
):
    """`histovi run` trains with a checkpoint folder: written after the first epoch (a
    resumable state early), then when CHECKPOINT_INTERVAL_S have passed, and at the end; not
    after every epoch, which cost a short epoch its time."""
    from _tiny import TRAIN, tiny_model

    from histovi.model import _training

    written = []
    real = _training.atomic_torch_save
    monkeypatch.setattr(_training, "CHECKPOINT_INTERVAL_S", interval)
    monkeypatch.setattr(
        _training,
        "atomic_torch_save",
        lambda obj, path: (written.append(obj["epoch"]), real(obj, path)),
    )
    tiny_model(tiny_adata).train(max_epochs=4, checkpoint_dir=tmp_path, **TRAIN)
    assert len(written) == saves and written[0] == 0
