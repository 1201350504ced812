"""Bar plot of a benchmark table."""

from __future__ import annotations

from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._utils import finish


def _mean_std(df: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Mean and spread of ``metric`` per group, following the evaluation protocol."""
    if f"{metric}_mean" in df.columns:  # already summarised (histovi.metrics.summarize)
        out = df[[*by, f"{metric}_mean"]].rename(columns={f"{metric}_mean": "mean"})
        std_col = f"{metric}_std"
        out["std"] = df[std_col].to_numpy() if std_col in df.columns else 0.0
        return out.groupby(by, sort=False, as_index=False).mean()
    if "seed" in df.columns:
        # per-section mean within a seed, then spread over seeds (as summarize)
        per_seed = df.groupby([*by, "seed"], sort=False)[metric].mean().reset_index()
    else:
        per_seed = df[[*by, metric]]
    grouped = per_seed.groupby(by, sort=False)[metric]
    return pd.DataFrame(
        {"mean": grouped.mean(), "std": grouped.std(ddof=1).fillna(0.0)}
    ).reset_index()


def scores(
    df: pd.DataFrame,
    metric: str = "ARI",
    x: str = "method",
    hue: str | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
    save: str | PathLike | None = None,
) -> plt.Figure:
    """Bars of a benchmark table: mean ``metric`` per ``x`` (and ``hue``) with error bars.

    Accepts the tidy output of :func:`histovi.metrics.cluster_and_score` (per-section rows:
    the bar is the mean over seeds of the per-section mean, the error bar its standard
    deviation over seeds), the output of :func:`histovi.metrics.summarize`
    (``{metric}_mean`` / ``{metric}_std`` columns), or any table with ``x`` and ``metric``
    columns (mean and std over its rows).

    Parameters
    ----------
    df
        Benchmark table.
    metric
        Score column (e.g. ``'ARI'``, ``'NMI'``).
    x
        Column of the bar groups (e.g. ``'method'`` or ``'embedding'``).
    hue
        Optional column split into side-by-side bars within each group.
    ax
        Axes to draw on (default: a new figure).
    title
        Axis title.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.
    """
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ValueError("`df` must be a non-empty DataFrame of benchmark scores.")
    by = [x] if hue is None else [x, hue]
    needed = [*by, metric] if f"{metric}_mean" not in df.columns else by
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise KeyError(
            f"`df` lacks columns {missing} (available: {list(df.columns)}): pass `x=`, `hue=` "
            "or `metric=` naming existing columns."
        )
    stats = _mean_std(df, by, metric)
    groups = list(pd.unique(stats[x]))
    hues = [None] if hue is None else list(pd.unique(stats[hue]))
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(3.0, 0.9 * len(groups) * len(hues) + 1.5), 3.5))
    else:
        fig = ax.figure
    width = 0.8 / len(hues)
    pos = np.arange(len(groups))
    for j, h in enumerate(hues):
        sub = stats if h is None else stats[stats[hue] == h]
        sub = sub.set_index(x).reindex(groups)
        ax.bar(
            pos - 0.4 + width * (j + 0.5),
            sub["mean"].to_numpy(dtype=float),
            width=width,
            yerr=sub["std"].to_numpy(dtype=float),
            capsize=3,
            label=None if h is None else str(h),
        )
    ax.set_xticks(pos)
    ax.set_xticklabels([str(g) for g in groups], rotation=30, ha="right")
    ax.set_ylabel(metric)
    if hue is not None:
        ax.legend(title=hue, frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return finish(fig, save)
