"""Spatial neighbours within each sample, as a fixed-k index matrix in ``obsm``.

scvi-tools' AnnDataManager has no obsp field, so the graph is stored as an (n_obs, k) int64 matrix
of row numbers; the data loader gathers neighbour features per minibatch from it.
"""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from .._constants import NEIGHBORS_KEY, SPATIAL_KEY, UNS_KEY
from .._validation import (
    check_adata,
    check_whole_number,
    obs_names_digest,
    require_obsm,
    require_samples,
)


def spatial_neighbors(
    adata: AnnData,
    sample_key: str | None = "sample",
    n_neighbors: int = 6,
    spatial_key: str = SPATIAL_KEY,
    key_added: str = NEIGHBORS_KEY,
) -> None:
    """Find the ``n_neighbors`` nearest spots of each spot within its own sample.

    Uses :func:`squidpy.gr.spatial_neighbors_knn` (``library_key=sample_key``) on a light copy, so the user's ``obsp`` is left untouched.
    Six neighbours is the first ring of a Visium or legacy ST hexagonal grid.

    Parameters
    ----------
    adata
        Spots of one or more samples.
    sample_key
        ``adata.obs`` column naming each spot's section; ``None`` if all spots are one section.
    n_neighbors
        Number of neighbours per spot (k). Every sample needs more than k spots.
    spatial_key
        ``adata.obsm`` key of the spot coordinates.
    key_added
        Writes ``adata.obsm[key_added]`` (int64, shape ``(n_obs, k)``: row numbers of neighbours,
        nearest first), ``adata.obsm[key_added + '_distances']`` and
        ``adata.uns['histovi']['spatial_neighbors']`` (the settings, used to check queries).
    """
    import squidpy as sq

    check_adata(adata, allow_empty=True)
    for written in (key_added, f"{key_added}_distances"):
        if written == spatial_key:
            raise ValueError(
                f"key_added={key_added!r} would write adata.obsm[{written!r}], the spot "
                f"coordinates (spatial_key={spatial_key!r}) the neighbours are computed from: "
                "pass another key_added (default 'spatial_neighbors')."
            )
    check_whole_number(n_neighbors, "n_neighbors", what="neighbours per spot")
    coords = require_obsm(
        adata,
        spatial_key,
        "Store spot centres there (x, y), or pass spatial_key= naming the obsm key that holds them.",
    )
    if coords.shape[1] < 2:
        raise ValueError(
            f"adata.obsm['{spatial_key}'] has {coords.shape[1]} column: spot centres need two "
            "(x, y)."
        )
    coords = coords[:, :2].astype(np.float64)
    if not np.all(np.isfinite(coords)):
        bad = int((~np.isfinite(coords)).any(1).sum())
        raise ValueError(
            f"adata.obsm['{spatial_key}'] has {bad} spots with NaN/inf coordinates: remove those "
            "spots or fix their coordinates."
        )
    if sample_key is not None:
        samples = require_samples(
            adata, sample_key, "Pass sample_key= naming the section column, or None."
        )
        # categories without spots (left over after subsetting) are not samples
        samples = samples.cat.remove_unused_categories()
        sizes = samples.value_counts()
        small = sizes[sizes <= n_neighbors]
        if len(small):
            raise ValueError(
                f"Samples with at most n_neighbors={n_neighbors} spots in adata.obs['{sample_key}']: "
                f"{ {str(k): int(v) for k, v in small.items()} }. Remove them or lower n_neighbors."
            )
    elif adata.n_obs <= n_neighbors:
        raise ValueError(
            f"{adata.n_obs} spots is too few for n_neighbors={n_neighbors}: lower n_neighbors."
        )
    groups = samples.cat.codes.to_numpy() if sample_key is not None else np.zeros(adata.n_obs)
    for code in np.unique(groups):
        xy = coords[groups == code]
        if np.ptp(xy, axis=0).max() == 0:
            which = (
                f"sample '{samples.cat.categories[int(code)]}'"
                if sample_key is not None
                else "all spots"
            )
            raise ValueError(
                f"adata.obsm['{spatial_key}'] puts every spot of {which} at the same position "
                f"({xy[0, 0]:g}, {xy[0, 1]:g}): the coordinates are missing or were overwritten. Store each "
                "spot's centre (x, y) there, or pass spatial_key= naming the obsm key that holds "
                "them."
            )

    light = AnnData(
        obs=adata.obs[[sample_key]].copy() if sample_key else None, shape=(adata.n_obs, 0)
    )
    if sample_key is not None:
        light.obs[sample_key] = samples.to_numpy()
        light.obs[sample_key] = light.obs[sample_key].astype("category")
    light.obsm["spatial"] = coords
    sq.gr.spatial_neighbors_knn(
        light, spatial_key="spatial", library_key=sample_key, n_neighs=n_neighbors, key_added="knn"
    )
    dist = light.obsp["knn_distances"].tocsr()
    dist.sort_indices()
    indices = np.empty((adata.n_obs, n_neighbors), dtype=np.int64)
    distances = np.empty((adata.n_obs, n_neighbors), dtype=np.float32)
    per_row = np.diff(dist.indptr)
    full = np.flatnonzero(per_row == n_neighbors)
    if len(full):
        starts = dist.indptr[full][:, None] + np.arange(n_neighbors)
        cols, vals = dist.indices[starts], dist.data[starts]
        order = np.argsort(vals, axis=1, kind="stable")
        indices[full] = np.take_along_axis(cols, order, 1)
        distances[full] = np.take_along_axis(vals, order, 1)
    # Duplicated coordinates give zero distances, which the sparse matrix drops: search those
    # few spots directly.
    for i in np.flatnonzero(per_row != n_neighbors):
        indices[i], distances[i] = _nearest_in_sample(
            coords, i, samples if sample_key else None, n_neighbors
        )

    adata.obsm[key_added] = indices
    adata.obsm[f"{key_added}_distances"] = distances
    adata.uns.setdefault(UNS_KEY, {})["spatial_neighbors"] = {
        "key_added": key_added,
        "n_neighbors": int(n_neighbors),
        "sample_key": sample_key,
        "spatial_key": spatial_key,
        "n_obs": int(adata.n_obs),
        "obs_names_digest": obs_names_digest(adata),
    }


def _nearest_in_sample(coords, i, samples, k):
    same = np.arange(len(coords)) if samples is None else np.flatnonzero(samples == samples.iloc[i])
    same = same[same != i]
    d = np.linalg.norm(coords[same] - coords[i], axis=1)
    order = np.argsort(d, kind="stable")[:k]
    return same[order], d[order]
