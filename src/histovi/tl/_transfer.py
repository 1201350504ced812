"""Label transfer from a reference to a query through their shared latent space."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import LATENT_KEY
from .._files import record_uns
from .._validation import check_adata, check_whole_number, get_rep, require_obs
from ._utils import well_scaled


def _knn_weights(distances: np.ndarray) -> np.ndarray:
    """Gaussian-kernel weights of each query's k neighbours, rows summing to 1.

    Same kernel as scArches' ``weighted_knn_transfer``: with ``s`` the standard deviation of
    a query's k distances, ``w = exp(-d / (2 / s)^2) = exp(-d s^2 / 4)``, normalised per row.
    When all k distances are equal (``s == 0``) the weights are uniform.

    The exponent is taken relative to each row's nearest distance (which the normalisation
    cancels): ``exp(-d s^2 / 4)`` alone underflows to 0 for every neighbour of a query far
    from the reference, and 0 / 0 gave NaN votes and a label picked from them.
    """
    distances = np.asarray(distances, dtype=np.float64)
    stds = distances.std(axis=1, keepdims=True)
    shifted = distances - distances.min(axis=1, keepdims=True)  # >= 0, 0 at the nearest
    with np.errstate(over="ignore", invalid="ignore"):
        exponent = shifted * (stds**2 / 4.0)
    exponent = np.where(shifted > 0, exponent, 0.0)  # 0 * inf (a huge s) is the nearest: 0
    kernel = np.exp(-exponent)  # the nearest neighbour weighs 1: the row sum is >= 1
    return kernel / kernel.sum(axis=1, keepdims=True)


def transfer_labels(
    reference: AnnData,
    query: AnnData,
    label_key: str = "domain",
    use_rep: str = LATENT_KEY,
    n_neighbors: int = 15,
    key_added: str | None = None,
    inplace: bool = True,
) -> pd.DataFrame | None:
    """Transfer labels from ``reference`` to ``query`` by a distance-weighted kNN vote.

    For each query spot the ``n_neighbors`` nearest labelled reference spots in the latent
    space are found and their labels voted (:class:`sklearn.neighbors.KNeighborsClassifier`,
    exact search), weighted with the Gaussian kernel of scArches' ``weighted_knn_transfer``.

    Parameters
    ----------
    reference
        AnnData with labels in ``reference.obs[label_key]`` (missing labels are ignored) and
        the latent in ``reference.obsm[use_rep]``.
    query
        AnnData with the latent in ``query.obsm[use_rep]`` of the same width (e.g. from a
        query model of :meth:`histovi.HistoVI.load_query_data`).
    label_key
        ``reference.obs`` column of the labels to transfer.
    use_rep
        ``obsm`` key of the latent in both objects.
    n_neighbors
        Number of reference neighbours (capped at the number of labelled reference spots).
    key_added
        ``query.obs`` column written; defaults to ``label_key``. The uncertainty goes to
        ``f"{key_added}_uncertainty"``.
    inplace
        Write into ``query.obs`` (default) or return a DataFrame with both columns.

    Returns
    -------
    ``None`` when ``inplace=True``; otherwise a DataFrame indexed like ``query.obs`` with the
    predicted label (categorical with the reference's categories) and the uncertainty
    ``1 - max vote probability``.
    """
    from sklearn.neighbors import KNeighborsClassifier

    check_adata(reference, "reference")
    check_adata(query, "query")
    key = key_added or label_key
    if inplace and query is reference and key in (label_key, f"{label_key}_uncertainty"):
        raise ValueError(
            f"query is the reference and key_added={key!r} would replace the labels "
            f"reference.obs[{label_key!r}] being transferred: pass another key_added (e.g. "
            f"'{label_key}_transferred') or inplace=False."
        )
    hint = (
        "Compute the latent for this object (e.g. model.get_latent_representation(adata)) and "
        "store it there, or pass use_rep= naming an existing obsm key."
    )
    ref_rep = get_rep(reference, use_rep, "reference", hint=hint)
    qry_rep = get_rep(query, use_rep, "query", hint=hint)
    if ref_rep.shape[1] != qry_rep.shape[1]:
        raise ValueError(
            f"reference.obsm['{use_rep}'] has {ref_rep.shape[1]} dimensions but "
            f"query.obsm['{use_rep}'] has {qry_rep.shape[1]}: both must come from the same model "
            "(map the query with HistoVI.load_query_data(query, reference_model) and take its "
            "latent)."
        )
    check_whole_number(n_neighbors, "n_neighbors", what="reference neighbours per query spot")
    labels = require_obs(
        reference,
        label_key,
        "Compute domains on the reference first (histovi.tl.domains(reference)) or pass "
        "label_key= naming an existing column.",
        name="reference",
    )
    if isinstance(labels.dtype, pd.CategoricalDtype):
        categories = list(labels.cat.categories)
    else:
        categories = sorted(labels.dropna().unique().tolist(), key=str)
    known = labels.notna().to_numpy()
    if not known.any():
        raise ValueError(
            f"reference.obs['{label_key}'] has no non-missing label: label some reference spots "
            "first."
        )
    codes = pd.Categorical(labels[known], categories=categories).codes
    n_cat = len(categories)
    ref_rep, qry_rep = well_scaled(ref_rep, qry_rep)  # distances that neither over- nor underflow
    k = int(min(n_neighbors, known.sum()))
    vote = KNeighborsClassifier(n_neighbors=k, weights=_knn_weights).fit(ref_rep[known], codes)
    probs = np.zeros((query.n_obs, n_cat))
    probs[:, vote.classes_] = vote.predict_proba(qry_rep)  # categories without a spot get 0
    if not np.isfinite(probs).all():  # cannot happen with finite latents; never vote on NaN
        raise ValueError(
            f"label transfer gave non-finite vote weights from query.obsm['{use_rep}']: check "
            "that both latents are finite and of a sane scale."
        )
    best = probs.argmax(axis=1)
    result = pd.DataFrame(
        {
            key: pd.Categorical.from_codes(best, categories=categories),
            # clip: rounding can leave 1 - max(p) at -1e-16 when one label takes all weight
            f"{key}_uncertainty": np.clip(1.0 - probs.max(axis=1), 0.0, 1.0),
        },
        index=query.obs_names,
    )
    if not inplace:
        return result
    query.obs[key] = result[key]
    query.obs[f"{key}_uncertainty"] = result[f"{key}_uncertainty"]
    record_uns(
        query,
        "transfer_labels",
        {"label_key": label_key, "use_rep": use_rep, "n_neighbors": k, "key_added": key},
    )
    return None
