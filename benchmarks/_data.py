"""Data of the integration benchmark: simulator scenarios and her2st, prepared once.

Every scenario returns an AnnData laid out the same way, so that every method reads the same
genes, the same neighbours and the same morphology:

* ``layers['counts']`` (and ``X``): raw counts of the selected genes (HVGs for her2st);
* ``obs['sample']`` (batch = section), ``obs['label']`` (ground truth, NaN where unlabelled),
  ``obs['x_array']`` / ``obs['y_array']`` (integer grid coordinates, used by AESTETIK);
* ``obsm['spatial']``, ``obsm['spatial_neighbors']`` (k = 6 within each section);
* ``obsm['X_morphology']`` when the scenario has a morphology embedding (NaN rows = no image);
* ``obsm['X_fm']``: an expression-embedding view, as a transcriptomics foundation model would
  give: simulated with known signal on the simulator, and on her2st the only embedding that can
  be produced offline, ``histovi.pp.embed_expression(adata, "pca")`` (16 PCs of the log-normalised
  HVG counts; no pretrained FM weights can be downloaded here);
* ``uns['benchmark']``: what was done (scenario, genes, morphology source).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

LABEL_KEY = "label"
SAMPLE_KEY = "sample"
N_NEIGHBORS = 6
N_HVG = 2000
IGNORE_LABELS = ("undetermined",)
FM_KEY = "X_fm"  # the expression-embedding view (issue 7 ablations)
FM_DIM = 16

#: Simulator functions of :mod:`histovi.datasets` a scenario can name (``"simulator"`` entry;
#: default ``"tumour"``).
SIMULATORS: dict[str, str] = {"tumour": "simulate", "layers": "simulate_layers"}

#: A weak image view, strongly shifted per section, on every section (``simulate`` arguments).
_WEAK_VIEW: dict[str, Any] = {
    "morphology_signal": 0.4,
    "morphology_batch_effect": 2.0,
    "morphology_scale_effect": 0.3,
    "sections_without_image": 0,
}

#: Simulator scenarios: name -> keyword arguments of the simulator, plus an optional
#: ``"simulator"`` entry naming it (:data:`SIMULATORS`; default :func:`histovi.datasets.simulate`).
#: The default tumour study already holds a morphology-only pair (gland / gland_in_situ) and a
#: neighbourhood-only pair (stroma_adjacent / stroma_distal) of domains.
SIM_SCENARIOS: dict[str, dict[str, Any]] = {
    "sim": {},
    "sim_weak_batch": {"patient_effect": 0.3},
    "sim_strong_batch": {"patient_effect": 1.2},
    "sim_no_absent": {"absent_domains": False},
    # the study `histovi run` uses without --input (cli.DEFAULT_SIM): smaller 20 x 20 sections
    "sim_builtin": {"grid_size": (20, 20)},
    # a few hundred spots: for the smoke test and quick checks of the harness
    "sim_tiny": {
        "n_patients": 2,
        "n_sections_per_patient": 2,
        "grid_size": (12, 12),
        "n_genes": 150,
        "n_markers": 10,
        "morphology_dim": 8,
    },
    # the tumour study with a weak, strongly section-shifted morphology view on every section
    "sim_weak_view": _WEAK_VIEW,
    # ... and misleading: besides the shift, a smooth nuisance across each section (uneven
    # staining) that per-section standardisation cannot remove, stronger than the signal
    "sim_adverse_view": {**_WEAK_VIEW, "morphology_gradient": 2.0},
    # layered (cortex-like) tissue, histovi.datasets.simulate_layers() defaults: 3 donors with
    # 4, 2 and 2 sections, 7 layers carried mostly by depth and neighbourhood, weak morphology
    "sim_layers": {"simulator": "layers"},
    # ... as a single-donor study of four sections (the layout of the real cortex study on which
    # HistoVI trailed BANKSY and AESTETIK in issue 19): no donor effect to remove, only sections
    "sim_layers_one_donor": {"simulator": "layers", "n_patients": 1, "n_sections_per_patient": 4},
    "sim_layers_tiny": {
        "simulator": "layers",
        "n_patients": 2,
        "n_sections_per_patient": 2,
        "grid_size": (12, 12),
        "n_genes": 150,
        "n_markers": 5,
        "morphology_dim": 8,
    },
}

#: Pairs of simulated domains that only one view separates (reported as pair separation; a
#: scenario without a pair's domains, such as the layered one, reports none).
SIM_DOMAIN_PAIRS: dict[str, tuple[str, str]] = {
    "morphology-only: gland vs gland_in_situ": ("gland", "gland_in_situ"),
    "neighbourhood-only: stroma_adjacent vs stroma_distal": ("stroma_adjacent", "stroma_distal"),
}

SCENARIOS = (*SIM_SCENARIOS, "her2st")


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$HISTOVI_SHARED_DATA``."""
    env = os.environ.get("HISTOVI_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def her2st_dir() -> Path:
    """Folder of the her2st development data."""
    return shared_data_dir() / "her2st"


def _hex_array_coords(
    xy: np.ndarray, spacing: float, origin: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer (column, row) of a Visium-like hexagonal grid, Visium convention: columns count
    half spacings, so the six neighbours of a spot are at (±2, 0) and (±1, ±1). ``origin``: the
    position of grid spot (0, 0) (default: the smallest x and y)."""
    x0, y0 = (xy[:, 0].min(), xy[:, 1].min()) if origin is None else origin
    row = np.rint((xy[:, 1] - y0) / (spacing * np.sqrt(3) / 2)).astype(int)
    col = np.rint((xy[:, 0] - x0) / (spacing / 2)).astype(int)
    return col, row


def select_genes(adata: AnnData, n_top_genes: int = N_HVG, batch_key: str = SAMPLE_KEY) -> AnnData:
    """Highly variable genes (scanpy ``seurat_v3`` on counts, per batch); all genes when there
    are at most ``n_top_genes``. Returns a copy restricted to the selected genes."""
    import scanpy as sc

    if n_top_genes < 1:
        raise ValueError(f"n_top_genes={n_top_genes} must be positive: pass the number of HVGs.")
    if adata.n_vars <= n_top_genes:
        return adata.copy()
    hvg = sc.pp.highly_variable_genes(
        adata,
        n_top_genes=n_top_genes,
        flavor="seurat_v3",
        batch_key=batch_key,
        layer="counts",
        inplace=False,
    )
    keep = adata.var_names.isin(hvg.index[hvg["highly_variable"].to_numpy()])
    return adata[:, keep].copy()


def _finish(adata: AnnData, scenario: str, morphology: str, n_top_genes: int) -> AnnData:
    import histovi

    adata = select_genes(adata, n_top_genes)
    histovi.pp.spatial_neighbors(adata, sample_key=SAMPLE_KEY, n_neighbors=N_NEIGHBORS)
    adata.uns["benchmark"] = {
        "scenario": scenario,
        "n_genes": int(adata.n_vars),
        "n_spots": int(adata.n_obs),
        "n_samples": int(adata.obs[SAMPLE_KEY].nunique()),
        "morphology": morphology,
        "n_neighbors": N_NEIGHBORS,
    }
    return adata


def load_sim(scenario: str = "sim", seed: int = 0, n_top_genes: int = N_HVG) -> AnnData:
    """A simulator scenario of :data:`SIM_SCENARIOS` (labels = ``obs['domain']`` on every
    section, batch = section), simulated by the function its ``"simulator"`` entry names."""
    import histovi

    if scenario not in SIM_SCENARIOS:
        raise KeyError(
            f"Unknown simulator scenario {scenario!r}: use one of {list(SIM_SCENARIOS)}."
        )
    params = dict(SIM_SCENARIOS[scenario])
    simulator = params.pop("simulator", "tumour")
    if simulator not in SIMULATORS:
        raise KeyError(
            f"Scenario {scenario!r} names simulator {simulator!r}: use one of {list(SIMULATORS)}."
        )
    simulate = getattr(histovi.datasets, SIMULATORS[simulator])
    adata = simulate(seed=seed, **{"expression_embedding_dim": FM_DIM, **params})
    adata.obs[LABEL_KEY] = adata.obs["domain"].astype(str).astype("category")
    spacing = histovi.datasets._simulate.SPOT_SPACING_UM
    # every section is drawn on the same hexagonal grid, placed one spacing from the image
    # corner (the layered simulator leaves out spots beyond the pial surface, so the smallest
    # coordinates of a section need not be the grid's)
    col, row = _hex_array_coords(adata.obsm["spatial"], spacing, origin=(spacing, spacing))
    adata.obs["x_array"], adata.obs["y_array"] = col, row
    adata = _finish(adata, scenario, "simulated (obsm['X_morphology'])", n_top_genes)
    adata.uns["benchmark"]["expression_embedding"] = "simulated (obsm['X_fm'])"
    adata.uns["benchmark"]["simulator"] = SIMULATORS[simulator]
    return adata


def _her2st_morphology(
    adata: AnnData, data_dir: Path, cache_dir: Path | None
) -> tuple[np.ndarray | None, str]:
    """Stain-texture morphology of the 8 her2st sections with an image, cached on disk."""
    try:
        from histovi.pp import embed_morphology
    except ImportError as err:  # the morphology stage is written in parallel
        return None, f"none (histovi.pp.embed_morphology unavailable: {err})"
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / "her2st_morphology_stain-texture.npz"
        if cache.exists():
            saved = np.load(cache, allow_pickle=False)
            if np.array_equal(saved["obs_names"], adata.obs_names.to_numpy().astype(str)):
                return saved["X"], "stain-texture (cached)"
    light = AnnData(obs=adata.obs[[SAMPLE_KEY]].copy(), shape=(adata.n_obs, 0))
    light.obsm["spatial"] = adata.obsm["spatial"]
    light.uns["spatial"] = adata.uns["spatial"]
    embed_morphology(light, encoder="stain-texture", image_dir=data_dir, sample_key=SAMPLE_KEY)
    X = np.asarray(light.obsm["X_morphology"], dtype=np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, X=X, obs_names=adata.obs_names.to_numpy().astype(str))
    return X, "stain-texture"


def read_her2st_counts():
    """The shared her2st AnnData with raw counts copied to ``layers['counts']``."""
    import anndata as ad

    path = her2st_dir() / "her2st_dev.h5ad"
    if not path.exists():
        raise FileNotFoundError(
            f"her2st not found at {path}: put the shared data beside the checkout or set "
            "HISTOVI_SHARED_DATA to the folder holding her2st/."
        )
    adata = ad.read_h5ad(path)
    adata.layers["counts"] = adata.X.copy()
    return adata


def load_her2st(
    n_top_genes: int = N_HVG,
    morphology: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData:
    """her2st patients A-D: 24 sections pooled, batch = section, labels on A1, B1, C1, D1.

    Parameters
    ----------
    n_top_genes
        HVGs (scanpy ``seurat_v3`` on counts, ``batch_key='sample'``).
    morphology
        Embed the H&E tiles (8 sections have an image) with ``histovi.pp.embed_morphology``
        (``encoder='stain-texture'``); spots without an image get NaN rows.
    cache_dir
        Folder where the morphology embedding is cached between runs.
    """
    import histovi

    data_dir = her2st_dir()
    adata = read_her2st_counts()
    label = adata.obs["label"].astype(object)
    adata.obs[LABEL_KEY] = pd.Categorical(label.where(label.notna(), None))
    arr = np.asarray(adata.obsm["array"])
    adata.obs["x_array"] = np.rint(arr[:, 0]).astype(int)
    adata.obs["y_array"] = np.rint(arr[:, 1]).astype(int)
    source = "none (morphology=False)"
    if morphology:
        X, source = _her2st_morphology(adata, data_dir, Path(cache_dir) if cache_dir else None)
        if X is not None:
            adata.obsm["X_morphology"] = X
    adata = _finish(adata, "her2st", source, n_top_genes)
    histovi.pp.embed_expression(adata, "pca", layer="counts", key_added=FM_KEY, n_comps=FM_DIM)
    adata.uns["benchmark"]["expression_embedding"] = "pca (offline)"
    return adata


def load(name: str, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> AnnData:
    """Load a scenario by name (:data:`SCENARIOS`)."""
    loaders: dict[str, Callable[[], AnnData]] = {
        "her2st": lambda: load_her2st(cache_dir=cache_dir),
        **{s: (lambda s=s: load_sim(s, seed=seed)) for s in SIM_SCENARIOS},
    }
    if name not in loaders:
        raise KeyError(f"Unknown data {name!r}: use one of {list(loaders)}.")
    return loaders[name]()
