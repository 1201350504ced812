"""Minibatch loading that gathers each spot's spatial neighbours.

The neighbour graph is a fixed-k matrix of global row numbers (``obsm``). For a minibatch of
``n`` rows the loader reads the ``n * k`` neighbour rows of the count matrix (a sparse row
selection), densifies that block only and sums it over the ``k`` neighbours: the counts stay
sparse (and are never copied) until the minibatch, never an n x n matrix. This was 2.4 times
faster than a sparse (n x n_obs) aggregation matrix times the counts (1.9 vs 4.6 ms per
minibatch of 128, k = 6, 2,000 genes, 100k spots) and gives the same sums.

Backed AnnData (``anndata.read_h5ad(path, backed="r")``): the counts stay on disk and each
minibatch reads its own rows and its neighbours' rows (in increasing order, as HDF5 needs), so a
study larger than memory trains and embeds; the rows of a minibatch are then in increasing order,
as scvi-tools' own dataset returns them.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from scvi import REGISTRY_KEYS, settings
from scvi.dataloaders import BatchDistributedSampler, DataSplitter
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ..module._module import NEIGHBORS_REGISTRY_KEY, NICHE_KEY


class NeighborhoodDataset(Dataset):
    """Rows ``indices`` of a registered AnnData, plus the summed counts of their neighbours
    (``gather_niche``)."""

    def __init__(
        self,
        adata_manager,
        indices,
        data_and_attributes=None,
        gather_niche: bool = True,
    ):
        self.indices = np.asarray(indices)
        registry = adata_manager.data_registry
        keys = data_and_attributes
        if keys is None:
            keys = [k for k in registry if k != NEIGHBORS_REGISTRY_KEY]
        elif isinstance(keys, dict):
            keys = {k: v for k, v in keys.items() if k != NEIGHBORS_REGISTRY_KEY}
        else:
            keys = [k for k in keys if k != NEIGHBORS_REGISTRY_KEY]
        self.base = adata_manager.create_torch_dataset(data_and_attributes=keys)
        self.n_total = adata_manager.adata.n_obs
        self.batch_codes = np.asarray(
            adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)
        ).ravel()
        self.neighbors = None
        if NEIGHBORS_REGISTRY_KEY in registry and gather_niche:
            # Row numbers must stay int64: the default float32 loading would corrupt them.
            self.neighbors = np.asarray(
                adata_manager.get_from_registry(NEIGHBORS_REGISTRY_KEY)
            ).astype(np.int64)
            counts = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            if sp.issparse(counts):
                # a reference to the registered matrix when it is CSR (no copy); row access
                # needs CSR, so another sparse format is converted, a copy per loader
                if counts.format != "csr":
                    warnings.warn(
                        f"The counts are a {counts.format.upper()} matrix: each data loader "
                        "converts them to CSR, a copy of the counts. Store them as CSR "
                        "(adata.X = adata.X.tocsr(), or the layer) before setup_anndata.",
                        UserWarning,
                        stacklevel=2,
                    )
                counts = counts.tocsr()
            elif not _is_backed(counts):
                counts = np.asarray(counts)
            self.counts = counts
            self.n_obs = self.counts.shape[0]
        # scvi-tools' dataset returns the rows of a backed AnnData sorted (HDF5 reads increasing
        # rows); the neighbours' counts must follow the same order
        self.sort_rows = bool(getattr(adata_manager.adata, "isbacked", False))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, local_indices):
        rows = self.indices[np.asarray(local_indices)]
        if self.sort_rows:
            rows = np.sort(rows)
        data = self.base[rows]
        if self.neighbors is not None:
            data[NICHE_KEY] = self.niche_counts(rows)
        return data

    def niche_counts(self, rows: np.ndarray) -> np.ndarray:
        """Summed counts of the neighbours of ``rows`` (``len(rows) x n_genes``, float32)."""
        nbrs = self.neighbors[rows]
        n, k = nbrs.shape
        flat = nbrs.ravel()
        if _is_backed(self.counts):
            # on disk: read each needed row once, in increasing order
            needed, inverse = np.unique(flat, return_inverse=True)
            block = self.counts[needed]
            block = block[inverse.ravel()]
        else:
            block = self.counts[flat]
        if sp.issparse(block):
            block = block.toarray()
        return np.asarray(block).reshape(n, k, -1).sum(1).astype(np.float32, copy=False)


def _is_backed(counts) -> bool:
    """Counts on disk (anndata's backed sparse datasets, h5py or zarr arrays)."""
    return not (sp.issparse(counts) or isinstance(counts, np.ndarray)) and hasattr(counts, "shape")


class NeighborhoodDataLoader(DataLoader):
    """Drop-in for :class:`scvi.dataloaders.AnnDataLoader` that adds ``niche_counts``."""

    def __init__(
        self,
        adata_manager,
        indices=None,
        batch_size: int = 128,
        shuffle: bool = False,
        drop_last: bool = False,
        data_and_attributes=None,
        load_sparse_tensor: bool = False,
        gather_niche: bool = True,
        **kwargs,
    ):
        if indices is None:
            indices = np.arange(adata_manager.adata.shape[0])
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        self.indices = indices
        dataset = NeighborhoodDataset(
            adata_manager, indices, data_and_attributes, gather_niche=gather_niche
        )
        if kwargs.pop("distributed_sampler", False):
            # DDP (scvi-tools asks for it when strategy="ddp"...): each rank reads its own share
            # of the rows, whole minibatches at a time; Lightning sets the epoch of the shuffle
            sampler = BatchDistributedSampler(
                dataset, batch_size=batch_size, drop_last=drop_last, shuffle=shuffle
            )
        else:
            sampler = BatchSampler(
                RandomSampler(dataset) if shuffle else SequentialSampler(dataset),
                batch_size=batch_size,
                drop_last=drop_last,
            )
        kwargs.pop("iter_ndarray", None)
        kwargs.setdefault("num_workers", settings.dl_num_workers)
        kwargs.setdefault("persistent_workers", settings.dl_persistent_workers)
        # The sampler yields whole minibatches of indices (one __getitem__ per batch, which keeps
        # sparse row access fast), so automatic batching is off.
        super().__init__(dataset, sampler=sampler, batch_size=None, **kwargs)


class NeighborhoodDataSplitter(DataSplitter):
    """scvi-tools' train/validation splitter with the neighbour-gathering loader."""

    data_loader_cls = NeighborhoodDataLoader

    def setup(self, stage: str | None = None):
        distributed = self.data_loader_kwargs.get("distributed_sampler", False)
        if not (distributed and settings.seed is None and self.external_indexing is None):
            return super().setup(stage)
        # Every DDP rank runs this in its own process: without scvi.settings.seed each would
        # draw another train/validation split and the ranks would train on overlapping spots.
        indices = np.arange(self.adata_manager.adata.n_obs)
        if self.shuffle_set_split:
            indices = np.random.RandomState(seed=0).permutation(indices)
        self.val_idx = indices[: self.n_val]
        self.train_idx = indices[self.n_val : self.n_val + self.n_train]
        self.test_idx = indices[self.n_val + self.n_train :]
