"""Graph and label helpers shared by :mod:`histovi.tl`, :mod:`histovi.metrics` and
:mod:`histovi.pl`. The input checks live in :mod:`histovi._validation`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

# re-exported for histovi.pl, which reads its inputs through these names
from .._validation import check_adata, get_rep
from .._validation import require_obs as get_obs_column

__all__ = [
    "check_adata",
    "get_obs_column",
    "get_rep",
    "labelled_mask",
    "neighbor_graph",
    "well_scaled",
]

#: Embeddings whose largest absolute value lies outside this range are rescaled before
#: clustering and nearest-neighbour searches (squared distances overflow or underflow there).
_SANE_SCALE = (1e-30, 1e30)


def well_scaled(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` divided by one power of two (exact: the geometry is unchanged) when their
    largest absolute value is far outside ``[1e-30, 1e30]``, where squared distances overflow
    to inf or underflow to 0 and clusterings and kNN votes silently degrade (one cluster, NaN
    weights); as they are otherwise, so that results on ordinary data do not change."""
    peak = max((float(np.abs(a).max()) if a.size else 0.0) for a in arrays)
    if peak == 0.0 or _SANE_SCALE[0] <= peak <= _SANE_SCALE[1]:
        return arrays
    factor = np.ldexp(1.0, -int(np.frexp(peak)[1]))  # 2**-e with peak = m * 2**e, 0.5 <= m < 1
    return tuple(np.asarray(a, dtype=np.float64) * factor for a in arrays)


def labelled_mask(labels: Any, ignore=()) -> np.ndarray:
    """Boolean mask of spots with a usable label: not missing and not in ``ignore``."""
    s = pd.Series(np.asarray(labels, dtype=object))
    # one value to ignore given as a string: that value, not its characters
    ignored = {ignore} if isinstance(ignore, str) else {str(v) for v in ignore}
    return (s.notna() & ~s.astype(str).isin(ignored)).to_numpy()


def neighbor_graph(nbrs: np.ndarray, symmetric: bool = False) -> sp.csr_matrix:
    """Sparse (n, n) 0/1 adjacency from a fixed-k index matrix (self-links dropped)."""
    n, k = nbrs.shape
    rows = np.repeat(np.arange(n), k)
    cols = nbrs.ravel()
    keep = (cols >= 0) & (cols != rows)
    adj = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float64), (rows[keep], cols[keep])), shape=(n, n)
    )
    if symmetric:
        adj = adj + adj.T
    adj.data[:] = 1.0  # duplicates summed above; keep a 0/1 graph
    adj.eliminate_zeros()
    return adj.tocsr()
