"""Domains drawn on each section, over its H&E where one is stored."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.lines import Line2D

from .._constants import SPATIAL_KEY
from .._files import is_within
from ..tl._utils import check_adata, get_obs_column
from ._utils import as_categories, category_colors, finish, is_categorical


def _load_image(
    adata: AnnData, library_id: str, img_root: str | PathLike | None
) -> tuple[np.ndarray, float] | None:
    """Image of a section and the factor mapping ``obsm['spatial']`` to its pixels, or None."""
    lib = adata.uns.get("spatial", {}).get(library_id)
    if not isinstance(lib, dict):
        return None
    scalefactors = lib.get("scalefactors", {}) or {}
    images = lib.get("images", {}) or {}
    for res in ("hires", "lowres"):
        if res in images and f"tissue_{res}_scalef" in scalefactors:
            return np.asarray(images[res]), float(scalefactors[f"tissue_{res}_scalef"])
    # her2st-style: an image file named relative to the data folder
    image_file = lib.get("image_file")
    if image_file and "tissue_hires_scalef" in scalefactors:
        path = Path(str(image_file))
        if not path.is_absolute() and img_root is not None:
            path = Path(img_root) / path
            if not is_within(path, img_root):
                warnings.warn(
                    f"uns['spatial'][{library_id!r}]['image_file'] = {str(image_file)!r} leads "
                    f"out of img_root {str(img_root)!r}: not drawn (relative image paths must "
                    "stay inside img_root).",
                    UserWarning,
                    stacklevel=3,
                )
                return None
        if path.is_file():  # a regular file (or a link to one): never a FIFO, which blocks
            from ..io._image_source import open_image

            try:
                with open_image(path) as im:
                    image = np.asarray(im.convert("RGB"))
            except Exception as err:  # noqa: BLE001 - draw the section without its image
                warnings.warn(
                    f"the image of section {library_id!r} is not drawn: {err}",
                    UserWarning,
                    stacklevel=3,
                )
                return None
            return image, float(scalefactors["tissue_hires_scalef"])
    return None


def domains(
    adata: AnnData,
    color: str = "domain",
    sample_key: str = "sample",
    samples: Sequence[str] | None = None,
    spatial_key: str = SPATIAL_KEY,
    img: bool = True,
    ncols: int = 4,
    spot_size: float | None = None,
    img_root: str | PathLike | None = None,
    panel_size: float = 4.0,
    title: str | None = None,
    save: str | PathLike | None = None,
) -> plt.Figure:
    """One panel per section, spots coloured by ``adata.obs[color]``, with a shared legend.

    Where ``adata.uns['spatial'][sample]['images']['hires'|'lowres']`` exists (scanpy/squidpy
    layout; the library id is the sample name) the spots are drawn over the image, mapping
    ``obsm[spatial_key]`` with ``scalefactors['tissue_hires_scalef']`` (or the lowres one).
    A her2st-style ``uns['spatial'][sample]['image_file']`` is read from ``img_root``.
    Without an image the y axis is inverted so the section looks as it does on the slide.

    Parameters
    ----------
    adata
        AnnData with ``obs[color]``, ``obs[sample_key]`` and ``obsm[spatial_key]``.
    color
        ``adata.obs`` column to colour by (categorical, or float for a continuous colour map).
    sample_key
        ``adata.obs`` column of the section id.
    samples
        Sections to draw, in this order (default: all, in the order of
        ``adata.obs[sample_key]``'s categories / first appearance).
    spatial_key
        ``adata.obsm`` key of the spot coordinates (full-resolution pixels).
    img
        Draw the H&E behind the spots when available.
    ncols
        Panels per row.
    spot_size
        Marker area in points^2 (default: from the number of spots in the largest panel).
    img_root
        Folder against which relative ``image_file`` entries are resolved.
    panel_size
        Inches per panel.
    title
        Figure title.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`, one axis per section (plus a colour bar for a
    continuous ``color``).
    """
    check_adata(adata)
    values = get_obs_column(
        adata, color, hint="run histovi.tl.domains(adata) first or pass `color=`"
    )
    sample_col = get_obs_column(adata, sample_key).astype(str)
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm['{spatial_key}'] not found: store the spot centres there (pixels) or "
            "pass `spatial_key=`."
        )
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    present = list(pd.unique(sample_col))
    if samples is None:
        samples = present
    else:
        # one section id given as a string: not its characters
        samples = [samples] if isinstance(samples, str) else [str(s) for s in samples]
        unknown = [s for s in samples if s not in present]
        if unknown:
            raise ValueError(
                f"samples {unknown} are not in adata.obs['{sample_key}'] (available: {present}):"
                " pass existing section ids."
            )
    if len(samples) == 0:
        raise ValueError("`samples` is empty: pass at least one section id.")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"`ncols`={ncols!r} must be a positive integer.")

    categorical = is_categorical(values)
    if categorical:
        strs, cats = as_categories(values)
        colors = category_colors(adata, color, [c for c in cats if c != "NA"])
        colors["NA"] = "lightgrey"
        point_colors = np.array([colors[s] for s in strs], dtype=object)
    else:
        vals = values.to_numpy(dtype=np.float64)
        vmin, vmax = np.nanmin(vals), np.nanmax(vals)

    n = len(samples)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False
    )
    sizes = sample_col.value_counts()
    size = spot_size if spot_size is not None else float(np.clip(8000 / sizes.max(), 1, 60))
    mappable = None
    for ax, sample in zip(axes.ravel(), samples, strict=False):
        sel = (sample_col == sample).to_numpy()
        xy = coords[sel]
        image = _load_image(adata, sample, img_root) if img else None
        if image is not None:
            arr, scalef = image
            xy = xy * scalef
            ax.imshow(arr)  # imshow puts the origin top-left, as the pixel coordinates
        if categorical:
            ax.scatter(xy[:, 0], xy[:, 1], c=list(point_colors[sel]), s=size, linewidths=0)
        else:
            mappable = ax.scatter(
                xy[:, 0], xy[:, 1], c=vals[sel], s=size, linewidths=0, vmin=vmin, vmax=vmax
            )
        if image is None:
            ax.invert_yaxis()  # image convention: y grows downwards
        ax.set_aspect("equal")
        ax.set_title(sample)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        fig.delaxes(ax)
    if categorical:
        shown = [c for c in cats if c in set(strs)]
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colors[c], label=c) for c in shown
        ]
        fig.legend(
            handles=handles,
            title=color,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )
    elif mappable is not None:
        fig.colorbar(mappable, ax=list(axes.ravel()[:n]), label=color, shrink=0.8)
    if title:
        fig.suptitle(title)
    return finish(fig, save)
