"""The benchmark's studies, each laid out the same way so that every method reads the same data.

:func:`load` returns an AnnData with

* ``layers['counts']`` (and ``X``): raw counts of the benchmark's genes (her2st: 2,000 HVGs);
* ``obs['sample']`` (batch = section), ``obs['label']`` (ground truth, NaN where unlabelled),
  ``obs['patient']`` (patient, or animal), ``obs['x_array']`` / ``obs['y_array']`` (integer
  grid coordinates, for AESTETIK);
* ``obsm['spatial']`` and ``obsm['spatial_neighbors']`` (k = 6, within each section);
* ``obsm['X_morphology']`` where the study has an image view (NaN rows: no image);
* ``uns['benchmark']``: what was done.

:func:`load_raw` gives the same study with every gene and no neighbours (reference mapping
chooses genes on the reference).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

LABEL_KEY, SAMPLE_KEY, PATIENT_KEY = "label", "sample", "patient"
MORPHOLOGY_KEY, NEIGHBORS_KEY = "X_morphology", "spatial_neighbors"
N_NEIGHBORS = 6
N_HVG = 2000
IGNORE_LABELS = ("undetermined",)

#: A weak image view, strongly shifted per section, on every section (``simulate`` arguments).
_WEAK_VIEW: dict[str, Any] = {
    "morphology_signal": 0.4,
    "morphology_batch_effect": 2.0,
    "morphology_scale_effect": 0.3,
    "sections_without_image": 0,
}
_TINY: dict[str, Any] = {
    "n_patients": 2,
    "n_sections_per_patient": 2,
    "grid_size": (12, 12),
    "n_genes": 150,
    "morphology_dim": 8,
}

#: Simulator scenarios: name -> arguments of :func:`histovi.datasets.simulate`, or of
#: :func:`histovi.datasets.simulate_layers` when ``"layers": True``.
SIM_SCENARIOS: dict[str, dict[str, Any]] = {
    # tumour study: 4 patients x 2 sections; a morphology-only and a neighbourhood-only pair
    "sim": {},
    "sim_weak_batch": {"patient_effect": 0.3},
    "sim_strong_batch": {"patient_effect": 1.2},
    "sim_weak_view": _WEAK_VIEW,
    # ... and misleading: a smooth nuisance across each section (uneven staining) as well
    "sim_adverse_view": {**_WEAK_VIEW, "morphology_gradient": 2.0},
    # layered (cortex-like) tissue: 3 donors, 7 layers carried by depth and neighbourhood
    "sim_layers": {"layers": True},
    "sim_layers_one_donor": {"layers": True, "n_patients": 1, "n_sections_per_patient": 4},
    # a few hundred spots: the smoke test and quick checks of the harness
    "sim_tiny": {**_TINY, "n_markers": 10},
    "sim_layers_tiny": {**_TINY, "layers": True, "n_markers": 5},
}

#: Real studies first: they decide (EVALUATION.md).
SCENARIOS = ("starmap", "starmap_view", "starmap_spots", "her2st", *SIM_SCENARIOS)

#: The synthetic image view of ``starmap_view`` (issue 29): a section-specific shift, noise and
#: a weak domain signal, in ``VIEW_DIM`` dimensions.
VIEW_DIM, VIEW_SECTION_SD, VIEW_NOISE_SD, VIEW_SIGNAL_SD = 32, 2.0, 1.0, 0.4
#: Side of the square spots of ``starmap_spots`` in the study's pixels: about 5 cells a spot
#: (median), as many as a Visium spot holds, so the same cortex is seen as a spot technology.
SPOT_SIDE_PX = 600


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$HISTOVI_SHARED_DATA``."""
    env = os.environ.get("HISTOVI_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _read_shared(relative: str) -> AnnData:
    import anndata as ad

    path = shared_data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: put the shared data beside the checkout (../shared/data) or set "
            "HISTOVI_SHARED_DATA to the folder that holds it."
        )
    adata = ad.read_h5ad(path)
    if "counts" not in adata.layers:
        adata.layers["counts"] = adata.X.copy()
    return adata


def _grid_from_coordinates(xy: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Integer pseudo-grid of irregular positions (single cells): coordinates over the median
    nearest-neighbour distance of the section, rounded (AESTETIK reads a grid)."""
    from sklearn.neighbors import NearestNeighbors

    grid = np.zeros_like(xy, dtype=int)
    for s in np.unique(samples):
        sel = samples == s
        d = NearestNeighbors(n_neighbors=2).fit(xy[sel]).kneighbors(xy[sel])[0][:, 1]
        grid[sel] = np.rint((xy[sel] - xy[sel].min(0)) / np.median(d)).astype(int)
    return grid


def _tidy(adata: AnnData, morphology: str) -> AnnData:
    """Labels as a categorical with NaN where unlabelled, sample / patient as strings."""
    label = adata.obs[LABEL_KEY].astype(object)
    adata.obs[LABEL_KEY] = pd.Categorical(label.where(label.notna(), None))
    for key in (SAMPLE_KEY, PATIENT_KEY):
        adata.obs[key] = adata.obs[key].astype(str).astype("category")
    adata.uns["benchmark"] = {"morphology": morphology}
    return adata


def _starmap(view: bool = False) -> AnnData:
    """STARmap mPFC, 3 mice (one section each), 4 layers on every cell; ``view``: the
    synthetic image view of ``starmap_view``."""
    adata = _read_shared("starmap_mpfc/starmap_mpfc.h5ad")
    adata.obs[PATIENT_KEY] = adata.obs["mouse"]  # every section is another animal
    samples = adata.obs[SAMPLE_KEY].astype(str).to_numpy()
    grid = _grid_from_coordinates(np.asarray(adata.obsm["spatial"], float), samples)
    adata.obs["x_array"], adata.obs["y_array"] = grid[:, 0], grid[:, 1]
    if not view:
        return _tidy(adata, "none")
    rng = np.random.default_rng(0)
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    shift = {s: rng.normal(0, VIEW_SECTION_SD, VIEW_DIM) for s in np.unique(samples)}
    signal = {c: rng.normal(0, VIEW_SIGNAL_SD, VIEW_DIM) for c in np.unique(labels)}
    X = rng.normal(0, VIEW_NOISE_SD, (adata.n_obs, VIEW_DIM))
    X += np.stack([shift[s] for s in samples]) + np.stack([signal[c] for c in labels])
    adata.obsm[MORPHOLOGY_KEY] = X.astype(np.float32)
    return _tidy(
        adata,
        f"synthetic: section shift sd {VIEW_SECTION_SD}, noise sd {VIEW_NOISE_SD}, "
        f"domain signal sd {VIEW_SIGNAL_SD}, {VIEW_DIM} dims",
    )


def _starmap_spots() -> AnnData:
    """STARmap binned into square spots of :data:`SPOT_SIDE_PX` per section: counts summed, the
    label the commonest of the spot's cells (a tie goes to the first layer in order), the
    position the mean of its cells'."""
    import scipy.sparse as sp

    cells = _read_shared("starmap_mpfc/starmap_mpfc.h5ad")
    xy = np.asarray(cells.obsm["spatial"], float)
    samples = cells.obs[SAMPLE_KEY].astype(str).to_numpy()
    spot, grid = np.empty(cells.n_obs, dtype=object), np.zeros((cells.n_obs, 2), dtype=int)
    for s in np.unique(samples):
        sel = samples == s
        grid[sel] = np.floor((xy[sel] - xy[sel].min(0)) / SPOT_SIDE_PX).astype(int)
        spot[sel] = [f"{s}_{i}_{j}" for i, j in grid[sel]]
    codes, names = pd.factorize(spot)
    members = sp.csr_matrix(
        (np.ones(cells.n_obs, dtype=np.float32), (codes, np.arange(cells.n_obs))),
        shape=(len(names), cells.n_obs),
    )
    counts = sp.csr_matrix(members @ sp.csr_matrix(cells.layers["counts"]))
    obs = pd.DataFrame(
        {
            SAMPLE_KEY: pd.Series(samples).groupby(codes).first().to_numpy(),
            LABEL_KEY: pd.Series(cells.obs[LABEL_KEY].astype(str).to_numpy())
            .groupby(codes)
            .agg(lambda v: v.value_counts().sort_index().idxmax())
            .to_numpy(),
            "n_cells": np.asarray(members.sum(1)).ravel().astype(int),
        },
        index=pd.Index(names.astype(str), name=None),
    )
    obs[PATIENT_KEY] = obs[SAMPLE_KEY]
    adata = AnnData(X=counts, obs=obs, var=cells.var[[]].copy())
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["spatial"] = (members @ xy) / obs["n_cells"].to_numpy()[:, None]
    first = pd.DataFrame(grid).groupby(codes).first().to_numpy()  # the spot's square
    adata.obs["x_array"], adata.obs["y_array"] = first[:, 0], first[:, 1]
    return _tidy(adata, "none")


def _her2st_morphology(adata: AnnData, cache_dir: Path | None) -> tuple[np.ndarray | None, str]:
    """Stain-texture morphology of the 8 her2st sections with an image, cached on disk."""
    from histovi.pp import embed_morphology

    cache = Path(cache_dir) / "her2st_morphology_stain-texture.npz" if cache_dir else None
    names = adata.obs_names.to_numpy().astype(str)
    if cache is not None and cache.exists():
        saved = np.load(cache, allow_pickle=False)
        if np.array_equal(saved["obs_names"], names):
            return saved["X"], "stain-texture (cached)"
    light = AnnData(obs=adata.obs[[SAMPLE_KEY]].copy(), shape=(adata.n_obs, 0))
    light.obsm["spatial"], light.uns["spatial"] = adata.obsm["spatial"], adata.uns["spatial"]
    embed_morphology(light, encoder="stain-texture", image_dir=shared_data_dir() / "her2st")
    X = np.asarray(light.obsm[MORPHOLOGY_KEY], dtype=np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, X=X, obs_names=names)
    return X, "stain-texture"


def _her2st(cache_dir: Path | None) -> AnnData:
    """her2st patients A-D: 24 sections, labels on A1, B1, C1, D1; H&E on 8 sections."""
    adata = _read_shared("her2st/her2st_dev.h5ad")
    arr = np.asarray(adata.obsm["array"])
    adata.obs["x_array"], adata.obs["y_array"] = np.rint(arr[:, :2]).astype(int).T
    X, source = _her2st_morphology(adata, cache_dir)
    adata.obsm[MORPHOLOGY_KEY] = X
    return _tidy(adata, source)


def _sim(name: str, seed: int = 0) -> AnnData:
    """A simulator scenario of :data:`SIM_SCENARIOS` (labels = the simulated domains)."""
    import histovi
    from histovi.datasets._simulate import SPOT_SPACING_UM as spacing

    params = dict(SIM_SCENARIOS[name])
    simulate = histovi.datasets.simulate_layers if params.pop("layers", False) else None
    adata = (simulate or histovi.datasets.simulate)(seed=seed, **params)
    adata.obs[LABEL_KEY] = adata.obs["domain"].astype(str)
    # Visium-like hexagonal grid placed one spacing from the image corner: columns count half
    # spacings, so a spot's six neighbours are at (+-2, 0) and (+-1, +-1)
    xy = np.asarray(adata.obsm["spatial"]) - spacing
    adata.obs["y_array"] = np.rint(xy[:, 1] / (spacing * np.sqrt(3) / 2)).astype(int)
    adata.obs["x_array"] = np.rint(xy[:, 0] / (spacing / 2)).astype(int)
    return _tidy(adata, "simulated")


def load_raw(name: str, cache_dir: str | os.PathLike | None = None) -> AnnData:
    """A study of :data:`SCENARIOS` with all its genes and no spatial neighbours."""
    if name not in SCENARIOS:
        raise KeyError(f"Unknown data {name!r}: use one of {list(SCENARIOS)}.")
    if name in SIM_SCENARIOS:
        return _sim(name)
    if name == "her2st":
        return _her2st(Path(cache_dir) if cache_dir else None)
    if name == "starmap_spots":
        return _starmap_spots()
    return _starmap(view=name == "starmap_view")


def select_genes(adata: AnnData, n_top_genes: int = N_HVG) -> AnnData:
    """A copy restricted to the HVGs (scanpy ``seurat_v3`` on counts, per section); all genes
    when there are at most ``n_top_genes``."""
    import scanpy as sc

    if adata.n_vars <= n_top_genes:
        return adata.copy()
    hvg = sc.pp.highly_variable_genes(
        adata,
        n_top_genes=n_top_genes,
        flavor="seurat_v3",
        batch_key=SAMPLE_KEY,
        layer="counts",
        inplace=False,
    )
    return adata[:, hvg["highly_variable"].to_numpy()].copy()


def prepare(adata: AnnData, n_top_genes: int = N_HVG) -> AnnData:
    """The benchmark's genes and k = 6 spatial neighbours within each section (a copy)."""
    import histovi

    adata = select_genes(adata, n_top_genes)
    adata.X = adata.layers["counts"]
    histovi.pp.spatial_neighbors(adata, sample_key=SAMPLE_KEY, n_neighbors=N_NEIGHBORS)
    return adata


def load(name: str, cache_dir: str | os.PathLike | None = None) -> AnnData:
    """A study of :data:`SCENARIOS`, prepared for every method (module docstring)."""
    adata = prepare(load_raw(name, cache_dir))
    adata.uns["benchmark"].update(
        scenario=name,
        n_spots=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        n_samples=int(adata.obs[SAMPLE_KEY].nunique()),
        n_neighbors=N_NEIGHBORS,
    )
    return adata
