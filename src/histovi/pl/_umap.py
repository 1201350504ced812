"""UMAP of the latent space, one panel per colour."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.lines import Line2D

from .._constants import LATENT_KEY
from .._threads import keeps_torch_threads
from ..tl._utils import check_adata, get_obs_column, get_rep
from ._utils import as_categories, category_colors, finish, is_categorical


@keeps_torch_threads
def latent_umap(
    adata: AnnData,
    use_rep: str = LATENT_KEY,
    color: str | Sequence[str] = ("sample", "domain"),
    n_neighbors: int = 15,
    key_added: str | None = None,
    random_state: int = 0,
    spot_size: float | None = None,
    panel_size: float = 4.0,
    save: str | PathLike | None = None,
) -> plt.Figure:
    """Compute a UMAP of ``adata.obsm[use_rep]`` with scanpy and draw one panel per colour.

    The neighbour graph and UMAP are computed on a light copy, so ``adata`` is not modified,
    unless ``key_added`` is given: then the coordinates are stored in
    ``adata.obsm[key_added]``. If ``adata.obsm[key_added]`` already holds a 2-D embedding it
    is drawn as it is instead of being recomputed.

    Parameters
    ----------
    adata
        AnnData with the latent and the ``obs`` columns to colour by.
    use_rep
        ``adata.obsm`` key of the latent.
    color
        ``adata.obs`` column(s), one panel each (missing columns raise a KeyError).
    n_neighbors
        Size of scanpy's kNN graph.
    key_added
        ``adata.obsm`` key to store (or reuse) the UMAP coordinates.
    random_state
        Seed of the UMAP layout.
    spot_size
        Marker area in points^2 (default from the number of spots).
    panel_size
        Inches per panel.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` with one axis per colour (plus colour bars for
    continuous columns).
    """
    import scanpy as sc

    check_adata(adata)
    colors = [color] if isinstance(color, str) else list(color)
    if not colors:
        raise ValueError("`color` is empty: pass at least one adata.obs column.")
    columns = {c: get_obs_column(adata, c) for c in colors}
    if key_added is not None and key_added == use_rep:
        raise ValueError(
            f"key_added={key_added!r} is use_rep: the UMAP would replace the latent it is computed "
            "from; pass another key_added (e.g. 'X_umap')."
        )
    if key_added is not None and key_added in adata.obsm and np.ndim(adata.obsm[key_added]) == 2:
        if np.shape(adata.obsm[key_added])[1] != 2:
            raise ValueError(
                f"adata.obsm[{key_added!r}] holds a {np.shape(adata.obsm[key_added])} array, not "
                "2-D UMAP coordinates: pass another key_added (it is not overwritten)."
            )
    if key_added is not None and key_added in adata.obsm and adata.obsm[key_added].shape[1] == 2:
        umap = np.asarray(adata.obsm[key_added])
    else:
        rep = get_rep(adata, use_rep)
        if adata.n_obs < 4:
            raise ValueError(f"UMAP needs at least 4 spots, got {adata.n_obs}.")
        tmp = AnnData(obs=adata.obs[[]].copy(), obsm={"X_rep": rep.astype(np.float32)})
        sc.pp.neighbors(
            tmp,
            use_rep="X_rep",
            n_neighbors=min(n_neighbors, adata.n_obs - 1),
            random_state=random_state,
        )
        sc.tl.umap(tmp, random_state=random_state)
        umap = tmp.obsm["X_umap"]
        if key_added is not None:
            adata.obsm[key_added] = umap
    size = spot_size if spot_size is not None else float(np.clip(20000 / adata.n_obs, 1, 40))
    fig, axes = plt.subplots(
        1, len(colors), figsize=(panel_size * len(colors) * 1.3, panel_size), squeeze=False
    )
    order = np.random.default_rng(random_state).permutation(adata.n_obs)  # no category on top
    for ax, key in zip(axes[0], colors, strict=True):
        values = columns[key]
        if is_categorical(values):
            strs, cats = as_categories(values)
            palette = category_colors(adata, key, [c for c in cats if c != "NA"])
            palette["NA"] = "lightgrey"
            ax.scatter(
                umap[order, 0],
                umap[order, 1],
                c=[palette[s] for s in strs[order]],
                s=size,
                linewidths=0,
            )
            present = set(strs)
            handles = [
                Line2D([], [], marker="o", linestyle="", color=palette[c], label=c)
                for c in cats
                if c in present
            ]
            ax.legend(
                handles=handles,
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                frameon=False,
                fontsize="small",
                ncols=1 if len(handles) <= 15 else 2,
            )
        else:
            sca = ax.scatter(
                umap[order, 0],
                umap[order, 1],
                c=values.to_numpy(dtype=np.float64)[order],
                s=size,
                linewidths=0,
            )
            fig.colorbar(sca, ax=ax)
        ax.set_title(key)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
    fig.tight_layout()
    return finish(fig, save)
