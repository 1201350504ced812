"""Neighbourhood aggregation of an embedding (the CellCharter recipe)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .._constants import NEIGHBORS_KEY
from .._files import record_uns
from .._validation import check_adata, check_whole_number, get_neighbors, get_rep
from ._utils import neighbor_graph


def hop_rings(adj: sp.csr_matrix, n_hops: int) -> list[sp.csr_matrix]:
    """Rings 1..n_hops of an undirected graph: ring h links each node to the nodes at exactly
    h hops (shortest path), found by sparse products (the non-zero pattern of A^h minus the
    earlier rings, expanded one ring at a time)."""
    n = adj.shape[0]
    adj01 = (adj != 0).astype(np.float64).tocsr()
    reached = sp.identity(n, format="csr", dtype=np.float64)
    frontier = sp.identity(n, format="csr", dtype=np.float64)
    rings = []
    for _ in range(n_hops):
        within = (frontier @ adj01).tocsr()
        within.data[:] = 1.0  # only reachability matters; keeps values bounded
        ring = (within - within.multiply(reached)).tocsr()  # reached now, not before
        ring.eliminate_zeros()
        rings.append(ring)
        reached = reached + ring
        # next hop only needs to expand from the new ring: (A^h reachability) = ring_h @ A
        frontier = ring
    return rings


def aggregate_neighbors(
    adata: AnnData,
    use_rep: str,
    n_hops: int = 2,
    neighbors_key: str = NEIGHBORS_KEY,
    sample_key: str = "sample",
    key_added: str | None = None,
    inplace: bool = True,
) -> np.ndarray | None:
    """Concatenate an embedding with its mean over the 1..``n_hops`` spatial rings.

    This is CellCharter's neighbourhood aggregation: the result is
    ``[X, mean_{ring 1}(X), ..., mean_{ring n_hops}(X)]`` where ring h holds the spots exactly
    h hops away in the spatial graph. The graph is the fixed-k neighbour matrix
    ``adata.obsm[neighbors_key]`` made undirected; links across samples are dropped, so rings
    never leave a section. A spot whose ring is empty gets its own embedding for that ring (a
    zero vector would put it far from every domain).

    Parameters
    ----------
    adata
        AnnData with ``adata.obsm[use_rep]`` and ``adata.obsm[neighbors_key]``.
    use_rep
        ``adata.obsm`` key of the embedding to aggregate (e.g. an scVI latent).
    n_hops
        Number of rings (CellCharter's default is 3; 2 is used in histovi's benchmarks).
    neighbors_key
        ``adata.obsm`` key of the (n_obs, k) int64 neighbour index matrix (-1 = no neighbour).
    sample_key
        ``adata.obs`` column of the section id, used to drop links across sections.
    key_added
        ``adata.obsm`` key written; defaults to ``f"{use_rep}_agg{n_hops}"``.
    inplace
        Write ``adata.obsm[key_added]`` (default) or return the array.

    Returns
    -------
    ``None`` when ``inplace``; otherwise the (n_obs, (n_hops + 1) * n_dims) array.
    """
    check_adata(adata)
    check_whole_number(n_hops, "n_hops", what="number of rings")
    key = key_added or f"{use_rep}_agg{n_hops}"
    if key in (use_rep, neighbors_key):
        raise ValueError(
            f"key_added={key!r} would replace adata.obsm[{key!r}], an input of this call "
            f"({'use_rep' if key == use_rep else 'neighbors_key'}): pass another key_added."
        )
    X = get_rep(adata, use_rep, hint="Pass use_rep= naming an existing obsm key.")
    nbrs = get_neighbors(adata, neighbors_key, sample_key=sample_key)
    adj = neighbor_graph(nbrs, symmetric=True)
    blocks = [X]
    for ring in hop_rings(adj, n_hops):
        deg = np.asarray(ring.sum(axis=1)).ravel()
        means = np.asarray(ring @ X) / np.maximum(deg, 1)[:, None]
        empty = deg == 0
        means[empty] = X[empty]
        blocks.append(means)
    out = np.hstack(blocks).astype(np.float32)
    if not inplace:
        return out
    adata.obsm[key] = out
    record_uns(
        adata,
        "aggregate_neighbors",
        {
            "use_rep": use_rep,
            "n_hops": int(n_hops),
            "neighbors_key": neighbors_key,
            "key_added": key,
        },
    )
    return None
