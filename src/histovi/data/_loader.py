"""Minibatch loading that gathers each spot's spatial neighbours.

The neighbour graph is a fixed-k matrix of global row numbers (``obsm``). For a minibatch of rows
the loader builds a sparse (batch x n_obs) aggregation matrix and multiplies it with the count
matrix, so the niche counts of a batch cost one sparse product: never an n x n dense matrix.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scvi import REGISTRY_KEYS, settings
from scvi.dataloaders import BatchDistributedSampler, DataSplitter
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ..module._module import (
    ANCHOR_MASK_KEY,
    ANCHOR_TARGET_KEY,
    NEIGHBORS_REGISTRY_KEY,
    NICHE_KEY,
)


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
        # Cross-sample anchor targets (set during training by data._anchors.AnchorCallback).
        self.anchor_target: np.ndarray | None = None
        self.anchor_mask: np.ndarray | None = None
        self.neighbors = None
        if NEIGHBORS_REGISTRY_KEY in registry and gather_niche:
            # Row numbers must stay int64: the default float32 loading would corrupt them.
            self.neighbors = np.asarray(
                adata_manager.get_from_registry(NEIGHBORS_REGISTRY_KEY)
            ).astype(np.int64)
            counts = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            self.counts = counts.tocsr() if sp.issparse(counts) else np.asarray(counts)
            self.n_obs = self.counts.shape[0]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, local_indices):
        rows = self.indices[np.asarray(local_indices)]
        data = self.base[rows]
        if self.neighbors is not None:
            data[NICHE_KEY] = self.niche_counts(rows)
        if self.anchor_target is not None:
            data[ANCHOR_TARGET_KEY] = self.anchor_target[rows]
            data[ANCHOR_MASK_KEY] = self.anchor_mask[rows]
        return data

    def set_anchor_targets(self, rows: np.ndarray, target: np.ndarray, mask: np.ndarray) -> None:
        """Anchor targets (latent vectors) and their mask for the global ``rows``."""
        self.anchor_target = np.zeros((self.n_total, target.shape[1]), dtype=np.float32)
        self.anchor_mask = np.zeros(self.n_total, dtype=np.float32)
        self.anchor_target[rows] = target
        self.anchor_mask[rows] = mask

    def niche_counts(self, rows: np.ndarray) -> np.ndarray:
        nbrs = self.neighbors[rows]
        n, k = nbrs.shape
        if sp.issparse(self.counts):
            agg = sp.csr_matrix(
                (np.ones(n * k, dtype=np.float32), nbrs.ravel(), np.arange(0, n * k + 1, k)),
                shape=(n, self.n_obs),
            )
            return np.asarray((agg @ self.counts).todense(), dtype=np.float32)
        return self.counts[nbrs].sum(1).astype(np.float32)


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
