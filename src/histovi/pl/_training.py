"""Training curves from scvi-tools' ``model.history``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._utils import finish

_SPLITS = ("train", "validation")


def _family(key: str) -> tuple[str, str] | None:
    """(family, split) of a history key; None for step-level logs.

    ``'elbo_train'`` -> ('elbo', 'train'), ``'train_loss_epoch'`` -> ('loss', 'train'),
    ``'validation_loss'`` -> ('loss', 'validation'), ``'kl_weight'`` -> ('kl_weight', '').
    """
    tokens = key.split("_")
    if "step" in tokens:
        return None  # per-minibatch logs are noisy and on another x axis
    split = next((s for s in _SPLITS if s in tokens), "")
    rest = [t for t in tokens if t not in (*_SPLITS, "epoch")]
    return ("_".join(rest) or key, split)


def training_curves(
    history: Mapping[str, pd.DataFrame | pd.Series],
    keys: Sequence[str] | None = None,
    ncols: int = 3,
    panel_size: float = 3.5,
    drop_flat: bool = True,
    save: str | PathLike | None = None,
) -> plt.Figure:
    """One panel per loss family: its training curve over epochs, and its validation curve
    when the model was trained with a validation split (``train_size < 1``).

    Parameters
    ----------
    history
        ``model.history`` of an scvi-tools model: a dict of one-column DataFrames indexed by
        epoch, e.g. ``'elbo_train'``, ``'reconstruction_loss_train'``, ``'kl_local_train'``,
        ``'elbo_validation'``, ``'train_loss_epoch'``, ``'validation_loss'``. Keys are grouped
        into families by removing ``train`` / ``validation`` / ``epoch`` from the name, so
        ``'train_loss_epoch'`` and ``'validation_loss'`` share the ``loss`` panel.
        Step-level keys (``*_step``) are skipped.
    keys
        Restrict to these history keys.
    ncols
        Panels per row.
    panel_size
        Inches per panel.
    drop_flat
        Leave out the families whose every curve is constant (e.g. ``kl_global`` of a model
        without a global latent: 0 at every epoch); the figure names them in a footnote.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`, one axis per family.
    """
    if not isinstance(history, Mapping) or not history:
        raise ValueError(
            "`history` must be a non-empty dict of DataFrames: pass model.history after "
            "model.train()."
        )
    if keys is not None:
        missing = [k for k in keys if k not in history]
        if missing:
            raise KeyError(
                f"history keys {missing} not found (available: {list(history)}): pass existing "
                "keys or keys=None."
            )
    families: dict[str, dict[str, pd.Series]] = {}
    for key in keys if keys is not None else list(history):
        fam = _family(key)
        if fam is None:
            continue
        frame = history[key]
        series = frame.iloc[:, 0] if isinstance(frame, pd.DataFrame) else pd.Series(frame)
        series = pd.to_numeric(series, errors="coerce").dropna()
        if series.empty:
            continue
        name, split = fam
        families.setdefault(name, {})[split or key] = series
    if not families:
        raise ValueError(
            f"no epoch-level numeric curve in `history` (keys: {list(history)}): train the "
            "model first."
        )
    flat = {name: curves for name, curves in families.items() if _is_flat(curves)}
    if drop_flat and len(flat) < len(families):
        families = {name: curves for name, curves in families.items() if name not in flat}
    else:
        flat = {}
    n = len(families)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * 0.8 * nrows), squeeze=False
    )
    for ax, (name, curves) in zip(axes.ravel(), families.items(), strict=False):
        for split, series in curves.items():
            ax.plot(series.index.to_numpy(dtype=float), series.to_numpy(), label=split, lw=1.5)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        if len(curves) > 1 or next(iter(curves)) in _SPLITS:
            ax.legend(frameon=False, fontsize="small")
    for ax in axes.ravel()[n:]:
        fig.delaxes(ax)
    fig.tight_layout()
    if flat:
        constant = ", ".join(
            f"{name} = {next(iter(curves.values())).iloc[0]:.3g}" for name, curves in flat.items()
        )
        fig.text(0.01, 0.0, f"constant, not drawn: {constant}", fontsize="small", va="top")
    return finish(fig, save)


def _is_flat(curves: dict[str, pd.Series]) -> bool:
    values = np.concatenate([s.to_numpy(dtype=float) for s in curves.values()])
    return bool(np.allclose(values, values[0], rtol=1e-9, atol=1e-12))
