"""Helpers shared by the figures: colours, saving."""

from __future__ import annotations

from os import PathLike

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.figure import Figure


def finish(fig: Figure, save: str | PathLike | None) -> Figure:
    """Save the figure when asked; never show it (library code leaves that to the caller)."""
    if save is not None:
        fig.savefig(save, bbox_inches="tight", dpi=150)
    return fig


def is_categorical(values: pd.Series) -> bool:
    """Whether a column should be drawn with discrete colours."""
    return not pd.api.types.is_float_dtype(values) or isinstance(values.dtype, pd.CategoricalDtype)


def category_colors(adata: AnnData, key: str, categories: list[str]) -> dict[str, str]:
    """Colour per category: ``adata.uns[f'{key}_colors']`` when it fits (scanpy convention),
    otherwise scanpy's default palettes."""
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) == len(categories):
        return dict(zip(categories, list(stored), strict=True))
    from scanpy.plotting import palettes

    n = len(categories)
    if n <= 20:
        palette = palettes.default_20
    elif n <= 28:
        palette = palettes.default_28
    else:
        palette = palettes.default_102
    return {c: palette[i % len(palette)] for i, c in enumerate(categories)}


def as_categories(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """String values (missing -> 'NA') and the ordered list of categories present."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in values.cat.categories]
    else:
        cats = sorted({str(v) for v in values.dropna().unique()}, key=_natural_key)
    strs = np.where(values.notna().to_numpy(), values.astype(str).to_numpy(), "NA")
    if (strs == "NA").any() and "NA" not in cats:
        cats.append("NA")
    return strs, cats


def _natural_key(s: str) -> tuple:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)
