"""What an embedding holds besides its clustering score: a kNN label probe per section, and where
the clusters of the pool go (which patient, which label)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import (
    as_str_array,
    check_adata,
    check_whole_number,
    get_cluster_column,
    get_rep,
    require_obs,
)
from ..tl._utils import labelled_mask, well_scaled


def _knn(n_neighbors: int, n_train: int):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(int(max(1, min(n_neighbors, n_train))))


def label_probe(
    adata: AnnData,
    embedding_key: str,
    label_key: str = "label",
    sample_key: str = "sample",
    group_key: str | None = None,
    n_neighbors: int = 15,
    n_folds: int = 5,
    min_class_size: int = 5,
    ignore: Iterable[str] = ("undetermined",),
    seed: int = 0,
) -> pd.DataFrame:
    """How much of the labels an embedding holds, section by section, without clustering it.

    Clustering scores (:func:`cluster_and_score`) can only find what the embedding holds; this
    asks whether the labels can be read from it at all. For every section (``sample_key``) with
    at least two label classes of ``min_class_size`` labelled spots (smaller classes of the
    section are left out):

    - ``within``: balanced accuracy of a k-nearest-neighbour classifier (``n_neighbors``)
      cross-validated with ``n_folds`` stratified folds on the section's labelled spots;
    - ``transfer``: balanced accuracy on the section of a kNN classifier fitted on the labelled
      spots of the other sections (of the other groups, e.g. other patients, when ``group_key``
      is given), over the classes both have: does the same tissue of different sections (or
      patients) lie in the same place? NaN where there is nothing to learn from.

    The embedding is used in its own geometry (not standardised), as the clusterings use it.
    Chance is ``1 / n_classes``.

    Parameters
    ----------
    adata
        AnnData with the embedding in ``adata.obsm[embedding_key]``.
    embedding_key
        ``adata.obsm`` key of the embedding (e.g. ``'X_histovi'``).
    label_key
        ``adata.obs`` column of the ground truth (NaN where unlabelled).
    sample_key
        ``adata.obs`` column of the section id.
    group_key
        Optional ``adata.obs`` column (e.g. ``'patient'``): transfer then learns only from
        sections of other groups.
    n_neighbors
        k of the kNN classifier (capped at the number of training spots).
    n_folds
        Folds of the within-section cross-validation.
    min_class_size
        Spots a class needs in a section to be scored there (at least ``n_folds``).
    ignore
        Label values left out.
    seed
        Seed of the fold split.

    Returns
    -------
    DataFrame, one row per scored section: ``sample`` (and ``group``), ``n_spots``,
    ``n_classes``, ``chance``, ``within``, ``transfer``.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    check_adata(adata)
    X = get_rep(adata, embedding_key, hint="Store the embedding there or pass embedding_key=.")
    (X,) = well_scaled(X)  # kNN distances that neither over- nor underflow
    labels = as_str_array(require_obs(adata, label_key))
    samples = as_str_array(require_obs(adata, sample_key)).astype(str)
    groups = samples if group_key is None else as_str_array(require_obs(adata, group_key))
    for name, value, low in (
        ("n_folds", n_folds, 2),
        ("n_neighbors", n_neighbors, 1),
        ("min_class_size", min_class_size, 1),
    ):
        check_whole_number(value, name, minimum=low)
    if n_folds < 2 or n_neighbors < 1:
        raise ValueError(f"n_folds={n_folds} must be >= 2 and n_neighbors={n_neighbors} >= 1.")
    if min_class_size < n_folds:
        raise ValueError(
            f"min_class_size={min_class_size} is below n_folds={n_folds}: every class needs a "
            "spot in each fold; raise `min_class_size` or lower `n_folds`."
        )
    ok = labelled_mask(labels, ignore)
    scored = {}  # section -> mask of its scored spots
    for s in pd.unique(samples[ok]):
        counts = pd.Series(labels[ok & (samples == s)]).value_counts()
        keep = counts.index[counts >= min_class_size]
        if len(keep) >= 2:
            scored[s] = ok & (samples == s) & pd.Series(labels).isin(keep).to_numpy()
    if not scored:
        raise ValueError(
            f"no section of adata.obs['{sample_key}'] has two classes of adata.obs['{label_key}'] "
            f"with {min_class_size}+ labelled spots: pass the annotation column as `label_key` "
            "(or lower `min_class_size`)."
        )
    rows = []
    for s, mask in scored.items():
        y = labels[mask].astype(str)
        folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
        clf = _knn(n_neighbors, len(y) - len(y) // n_folds - 1)
        within = cross_val_score(clf, X[mask], y, cv=folds, scoring="balanced_accuracy").mean()
        group = groups[mask][0]
        train = np.zeros(adata.n_obs, dtype=bool)
        for other, other_mask in scored.items():
            if other != s and groups[other_mask][0] != group:
                train |= other_mask
        test = mask & pd.Series(labels).isin(set(labels[train])).to_numpy()
        transfer = np.nan
        if train.any() and test.any():
            fit = _knn(n_neighbors, int(train.sum())).fit(X[train], labels[train].astype(str))
            transfer = balanced_accuracy_score(labels[test].astype(str), fit.predict(X[test]))
        rows.append(
            {
                "sample": s,
                **({"group": group} if group_key is not None else {}),
                "n_spots": int(mask.sum()),
                "n_classes": len(np.unique(y)),
                "chance": 1 / len(np.unique(y)),
                "within": float(within),
                "transfer": float(transfer),
            }
        )
    return pd.DataFrame(rows)


def cluster_composition(
    adata: AnnData,
    cluster_key: str,
    label_key: str = "label",
    group_key: str = "sample",
    ignore: Iterable[str] = ("undetermined",),
) -> pd.DataFrame:
    """Where the clusters go: size, commonest group and commonest label of every cluster.

    A cluster that is 95 % one patient's spots spends one of the k clusters on that patient,
    not on a tissue domain. The mean of ``group_share`` over clusters is the clustering's
    purity by group (1: every cluster is one group's; ``1 / n_groups``: perfectly mixed).

    Parameters
    ----------
    adata
        AnnData with the three columns in ``adata.obs``.
    cluster_key
        ``adata.obs`` column of the clusters (e.g. from :func:`histovi.tl.domains`), one per spot.
    label_key
        ``adata.obs`` column of the ground truth (NaN where unlabelled).
    group_key
        ``adata.obs`` column of the groups, e.g. ``'patient'`` or ``'sample'``.
    ignore
        Label values not counted as labels.

    Returns
    -------
    DataFrame, one row per cluster, largest first: ``cluster``, ``n_spots``, ``group`` (the
    commonest) and ``group_share`` (its share of the cluster's spots), ``label`` (the commonest
    among the cluster's labelled spots; ``''`` if none) and ``label_share`` (its share of them;
    NaN if none).
    """
    check_adata(adata)
    clusters = as_str_array(get_cluster_column(adata, cluster_key)).astype(str)
    labels = as_str_array(require_obs(adata, label_key))
    groups = as_str_array(require_obs(adata, group_key)).astype(str)
    labelled = labelled_mask(labels, ignore)
    rows = []
    for c in pd.unique(clusters):
        member = clusters == c
        group = pd.Series(groups[member]).value_counts(normalize=True)
        label = pd.Series(labels[member & labelled].astype(str)).value_counts(normalize=True)
        rows.append(
            {
                "cluster": c,
                "n_spots": int(member.sum()),
                "group": group.index[0],
                "group_share": float(group.iloc[0]),
                "label": label.index[0] if len(label) else "",
                "label_share": float(label.iloc[0]) if len(label) else np.nan,
            }
        )
    return pd.DataFrame(rows).sort_values(
        "n_spots", ascending=False, kind="stable", ignore_index=True
    )
