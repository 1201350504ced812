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


def match_categories(values: pd.Series, reference: pd.Series) -> dict[str, str]:
    """Pair each category of ``values`` with the category of ``reference`` it shares most spots
    with, one to one (Hungarian matching on the contingency table of the spots where both are
    set); categories left without a partner, or sharing no spot with theirs, are not paired.

    Returns
    -------
    ``{category of values: category of reference}`` (as strings).
    """
    from scipy.optimize import linear_sum_assignment

    both = values.notna().to_numpy() & reference.notna().to_numpy()
    if not both.any():
        return {}
    table = pd.crosstab(
        np.asarray(values.astype(str))[both], np.asarray(reference.astype(str))[both]
    )
    rows, cols = linear_sum_assignment(-table.to_numpy())
    return {
        str(table.index[r]): str(table.columns[c])
        for r, c in zip(rows, cols, strict=True)
        if table.iat[r, c] > 0
    }


def match_colors(adata: AnnData, key: str, reference: str) -> dict[str, str]:
    """Colour the categories of ``adata.obs[key]`` (e.g. domains) like the categories of
    ``adata.obs[reference]`` (e.g. ground-truth labels) they are paired with by
    :func:`match_categories`, so that a domain and its label share a colour in every figure.

    Writes ``adata.uns[f'{reference}_colors']`` (kept when it already fits) and
    ``adata.uns[f'{key}_colors']`` (scanpy's convention, read by :func:`histovi.pl.domains`,
    :func:`histovi.pl.latent_umap` and scanpy); categories without a partner get colours no
    label uses.

    Returns
    -------
    The pairing, ``{category of key: category of reference}``.
    """
    from ..tl._utils import get_obs_column

    values, ref = get_obs_column(adata, key), get_obs_column(adata, reference)
    ref_cats = [c for c in as_categories(ref)[1] if c != "NA"]
    ref_colors = category_colors(adata, reference, ref_cats)
    adata.uns[f"{reference}_colors"] = [ref_colors[c] for c in ref_cats]
    pairs = match_categories(values, ref)
    cats = [c for c in as_categories(values)[1] if c != "NA"]
    from scanpy.plotting import palettes

    used = {str(c).lower() for c in ref_colors.values()}
    spare = iter([c for c in palettes.default_102 if c.lower() not in used])
    colors = {c: ref_colors[pairs[c]] if c in pairs else next(spare) for c in cats}
    adata.uns[f"{key}_colors"] = [colors[c] for c in cats]
    return pairs
