"""Cross-sample anchors: mutual nearest neighbours between samples in the current latent space.

Every ``every`` epochs (after a warm-up) the callback embeds the training spots with the current
encoders and finds, for each pair of samples, the pairs of spots that are each other's
``k`` nearest neighbours (MNN, as in Haghverdi et al. 2018 and STAligner). A spot's *anchor
target* is the mean latent of its partners; the model then pulls each anchored spot towards its
target (``HistoVAE.anchor_weight``). Unlike a sample classifier, anchors only match spots that
already look alike, so samples with different tissue compositions are not forced onto each other.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def mutual_nearest_neighbors(
    z: np.ndarray, batches: np.ndarray, k: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual ``k``-nearest-neighbour pairs between every two batches.

    Returns ``(i, j)`` row arrays with ``batches[i] != batches[j]``; each unordered pair appears
    in both orders.
    """
    z_t = torch.as_tensor(np.asarray(z, dtype=np.float32))
    codes = np.asarray(batches).ravel()
    groups = [np.flatnonzero(codes == b) for b in np.unique(codes)]
    rows_i, rows_j = [], []
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            ia, ib = groups[a], groups[b]
            d = torch.cdist(z_t[ia], z_t[ib])
            ka, kb = min(k, len(ib)), min(k, len(ia))
            nn_ab = torch.zeros_like(d, dtype=torch.bool)
            nn_ab.scatter_(1, d.topk(ka, dim=1, largest=False).indices, True)
            nn_ba = torch.zeros_like(d, dtype=torch.bool)
            nn_ba.scatter_(0, d.topk(kb, dim=0, largest=False).indices, True)
            pa, pb = torch.nonzero(nn_ab & nn_ba, as_tuple=True)
            rows_i += [ia[pa.numpy()], ib[pb.numpy()]]
            rows_j += [ib[pb.numpy()], ia[pa.numpy()]]
    if not rows_i:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows_i).astype(np.int64), np.concatenate(rows_j).astype(np.int64)


class AnchorCallback(Callback):
    """Recompute the MNN anchor targets of the training spots every ``every`` epochs.

    The targets are written into the training dataset (:class:`NeighborhoodDataset`), which
    hands them to the module with each minibatch. Nothing is anchored during the first
    ``warmup`` share of the epochs, while the latent space is still forming.
    """

    def __init__(self, k: int = 5, every: int = 1, warmup: float = 0.2, batch_size: int = 1024):
        self.k = k
        self.every = max(int(every), 1)
        self.warmup = warmup
        self.batch_size = batch_size
        self.n_anchored: list[int] = []

    @torch.no_grad()
    def _latent(self, module, dataset, rows: np.ndarray) -> np.ndarray:
        was_training = module.training
        module.eval()
        out = []
        for start in range(0, len(rows), self.batch_size):
            tensors = dataset.base[rows[start : start + self.batch_size]]
            tensors = {
                key: torch.as_tensor(np.asarray(value)).to(module.device)
                for key, value in tensors.items()
            }
            inference = module.inference(**module._get_inference_input(tensors))
            out.append(inference["qz"].loc.cpu().numpy())
        module.train(was_training)
        return np.concatenate(out)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        start = int(np.ceil(self.warmup * (trainer.max_epochs or 1)))
        if epoch < start or (epoch - start) % self.every:
            return
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "set_anchor_targets"):
            return
        module = pl_module.module
        rows = np.asarray(dataset.indices)
        z = self._latent(module, dataset, rows)
        batches = dataset.batch_codes[rows]
        i, j = mutual_nearest_neighbors(z, batches, k=self.k)
        target = np.zeros_like(z)
        count = np.zeros(len(rows), dtype=np.float32)
        np.add.at(target, i, z[j])
        np.add.at(count, i, 1.0)
        anchored = count > 0
        target[anchored] /= count[anchored, None]
        dataset.set_anchor_targets(rows, target, anchored)
        self.n_anchored.append(int(anchored.sum()))
        pl_module.log("anchored_spots", float(anchored.mean()), on_epoch=True, on_step=False)
