"""Distributed training (Lightning DDP) with two CPU processes over gloo."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    import numpy as np
    from lightning.pytorch.callbacks import Callback
    import histovi

    out = sys.argv[1]
    adata = histovi.datasets.simulate(
        n_patients=2, n_sections_per_patient=2, grid_size=(10, 10), n_genes=150, n_markers=10,
        morphology_dim=8, sections_without_image=0, seed=1,
    )
    histovi.pp.spatial_neighbors(adata, sample_key="sample")
    histovi.HistoVI.setup_anndata(
        adata, layer="counts", batch_key="sample", morphology_key="X_morphology",
        neighbors_key="spatial_neighbors",
    )
    model = histovi.HistoVI(adata, n_latent=4, n_hidden=16)


    class Seen(Callback):
        """The rows each rank's loader iterates in every epoch (the sampler is deterministic
        given the epoch, so iterating it again lists what training read)."""

        def __init__(self):
            self.rows = {}

        def on_train_epoch_end(self, trainer, pl_module):
            loader = trainer.train_dataloader
            self.rows[trainer.current_epoch] = [
                int(loader.dataset.indices[i]) for batch in loader.sampler for i in batch
            ]

        def on_train_end(self, trainer, pl_module):
            record = {
                "rows": self.rows,
                "world": trainer.world_size,
                "train_idx": [int(i) for i in trainer.datamodule.train_idx],
            }
            with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump(record, f)


    model.train(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", batch_size=32,
        callbacks=[Seen()], enable_progress_bar=False,
    )
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        np.save(os.path.join(out, "latent.npy"), model.get_latent_representation())
    '''
)


@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes_share_the_spots_out(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    # Lightning's DDP launcher starts the second rank by running the script again
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    # both ranks split train / validation the same way (no global seed was set)
    assert ranks[0]["train_idx"] == ranks[1]["train_idx"]
    train = set(ranks[0]["train_idx"])
    for epoch in ranks[0]["rows"]:
        seen = [set(r["rows"][epoch]) for r in ranks]
        # every training spot seen once per epoch across the ranks, none by both
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == train
        assert abs(len(seen[0]) - len(seen[1])) <= 1
    z = np.load(tmp_path / "latent.npy")
    assert z.shape == (400, 4) and np.isfinite(z).all()
