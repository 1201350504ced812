"""Child process of test_faults.py: train the tiny model with a checkpoint folder and, at
minibatch 1 of epoch ``hold_epoch``, write ``marker`` and wait there to be killed.

usage: python _train_child.py CHECKPOINT_DIR MARKER HOLD_EPOCH MAX_EPOCHS
"""

import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(checkpoint_dir: str, marker: str, hold_epoch: int, max_epochs: int) -> None:
    warnings.simplefilter("ignore")
    from _tiny import TRAIN, tiny_model, tiny_study
    from lightning.pytorch.callbacks import Callback

    from histovi.model import _training

    _training.CHECKPOINT_INTERVAL_S = (
        0.0  # a checkpoint after every epoch: the test kills mid-epoch
    )

    class Hold(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == hold_epoch and batch_idx == 1:
                Path(marker).write_text(str(os.getpid()))
                time.sleep(600)  # killed here, mid-epoch, by the test

    model = tiny_model(tiny_study())
    model.train(max_epochs=max_epochs, checkpoint_dir=checkpoint_dir, callbacks=[Hold()], **TRAIN)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
