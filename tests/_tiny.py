"""A tiny study and model shared by the reliability tests (test_bad_input.py, test_faults.py)
and by the child processes test_faults.py starts (so both build exactly the same data)."""

from __future__ import annotations

#: 2 patients x 1 section of 8 x 8 spots, 30 genes, a 4-dimensional morphology view.
TINY = {
    "n_patients": 2,
    "n_sections_per_patient": 1,
    "grid_size": (8, 8),
    "n_genes": 30,
    "n_markers": 5,
    "morphology_dim": 4,
    "sections_without_image": 0,
}
#: neighbours per spot
K = 4
#: four minibatches per epoch
TRAIN = {"batch_size": 32, "enable_progress_bar": False, "enable_model_summary": False}
SETUP = {
    "layer": "counts",
    "batch_key": "sample",
    "morphology_key": "X_morphology",
    "neighbors_key": "spatial_neighbors",
}


def tiny_study(seed: int = 0):
    import histovi

    adata = histovi.datasets.simulate(**TINY, seed=seed)
    histovi.pp.spatial_neighbors(adata, sample_key="sample", n_neighbors=K)
    return adata


def tiny_model(adata, seed: int = 0, setup: dict | None = None, **model_kwargs):
    """Register ``adata`` and build a small HistoVI under ``scvi.settings.seed = seed``."""
    import scvi

    from histovi import HistoVI

    scvi.settings.seed = seed
    HistoVI.setup_anndata(adata, **{**SETUP, **(setup or {})})
    return HistoVI(adata, n_latent=3, n_hidden=8, **model_kwargs)


def cli_args(max_epochs: int = 1) -> list[str]:
    """Arguments of a tiny `histovi run` on the built-in simulator (2 patients x 1 section of
    8 x 8 spots, 40 genes, precomputed morphology, no labels, quiet)."""
    return [
        "--sim-grid", "8", "--sim-patients", "2", "--sim-sections", "1", "--sim-genes", "40",
        "--max-epochs", str(max_epochs), "--label-key", "none", "--n-domains", "3",
        "--encoder", "precomputed", "--quiet",
    ]  # fmt: skip
