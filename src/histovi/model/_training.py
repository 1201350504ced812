"""Training that survives faults: exact resumption from a checkpoint, atomic checkpoint files,
and a stop with a clear message when a loss term diverges.

* :func:`checkpointing` gives :meth:`histovi.HistoVI.train` the Lightning arguments behind its
  ``checkpoint_dir=``: ``last.ckpt`` written atomically after the first epoch, then at most every
  :data:`CHECKPOINT_INTERVAL_S` seconds and when training ends, and read back (after checking
  that it belongs to this model and data) when training starts again.
* :class:`ResumeStateCallback` stores what a checkpoint of Lightning lacks for a resumed run to
  continue *exactly* as the uninterrupted one: the random number generators (minibatch order,
  dropout, posterior samples, view dropout), captured at the end of every epoch and restored at
  the start of the next one (in uninterrupted runs as well, so both follow the same path).
  Everything else that carries over between epochs is in the checkpoint already (weights,
  buffers, optimizer and loop state).
* :class:`HistoTrainingPlan` refuses a minibatch whose loss or gradients are not finite, before
  the optimizer step, so the model keeps its last good weights, and names the view (expression,
  morphology, niche, ...) whose term diverged.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from scvi.train import TrainingPlan, TrainRunner

from .._files import atomic_write
from ._spatial import SpatialMixCallback

logger = logging.getLogger(__name__)

#: Key of histovi's record in a Lightning checkpoint written by ``train(checkpoint_dir=...)``.
CHECKPOINT_KEY = "histovi"
LAST_CHECKPOINT = "last.ckpt"
#: Seconds between two checkpoints of ``train(checkpoint_dir=...)`` (besides the first epoch's
#: and the last): a killed run loses at most this much training, and a short epoch does not
#: pay for writing (and syncing to disk) the weights and optimizer state every time.
CHECKPOINT_INTERVAL_S = 60.0

#: Training budget of the default ``max_epochs``, in spot passes (spots x epochs): about 4,700
#: minibatch updates at ``batch_size=128``. Measured with ``benchmarks/integration.py
#: --curve``: the domain ARI peaks after a few thousand updates and then falls while the
#: validation ELBO still improves (the latent over-integrates), on the simulator and on her2st
#: alike; scVI's rule (8 million spot passes, 400 epochs below 20,000 spots) lies far past that
#: peak.
DEFAULT_SPOT_PASSES = 600_000


def default_max_epochs(n_spots: int) -> int:
    """Default ``max_epochs`` of :meth:`HistoVI.train`: ``DEFAULT_SPOT_PASSES / n_spots``,
    between 20 and 400 epochs."""
    return int(max(20, min(400, round(DEFAULT_SPOT_PASSES / max(int(n_spots), 1)))))


#: The KL weight's linear warm-up spans this many times the training length, so that it ends
#: near 0.22 whatever the study's size (scvi-tools' fixed 400-epoch warm-up ended anywhere
#: between 0.05 and 1 under the epochs rule above: two different models).
KL_WARMUP_FACTOR = 4.5


def default_kl_warmup_epochs(max_epochs: int) -> int:
    """Default ``n_epochs_kl_warmup`` of :meth:`HistoVI.train` (:data:`KL_WARMUP_FACTOR` times
    ``max_epochs``)."""
    return max(1, round(KL_WARMUP_FACTOR * int(max_epochs)))


class TrainingDivergedError(RuntimeError):
    """A loss term or a gradient became NaN or infinite; the model keeps its last good weights.

    ``views`` names the parts of the model that diverged, ``epoch`` and ``step`` (optimizer steps
    done before) say when."""

    def __init__(self, message: str, views=(), epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.views = tuple(views)
        self.epoch = epoch
        self.step = step


# ---------------------------------------------------------------------------- random state
def rng_state() -> dict[str, Any]:
    """States of every random number generator training draws from."""
    # the global numpy state (what scvi.settings.seed seeds), as plain types and a tensor:
    # checkpoints are read back with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    numpy_state = (str(kind), torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state,
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = np.asarray(keys, dtype=np.int64).astype(np.uint32)
    np.random.set_state((kind, keys, int(pos), int(has_gauss), float(gauss)))  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # resumed on fewer devices
            logger.warning("Could not restore the CUDA random state: the resumed run may differ.")


class ResumeStateCallback(Callback):
    """Carry the random state across epochs and through the checkpoint, so that a resumed run
    follows the path of the uninterrupted one: captured at the end of every epoch, restored at
    the start of the next one (in uninterrupted runs too). The checkpoint also records what it
    belongs to (data, settings, seed) and the training history, so a resumed model's history
    starts with the interrupted session's epochs."""

    def __init__(self, fingerprint: dict[str, Any], path: Path | None = None):
        self.fingerprint = fingerprint
        self.path = path
        self.rng: dict[str, Any] | None = None
        self._resumed = False
        self.stopped_early = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.path is not None and not any(
            isinstance(c, _CheckpointWriter) for c in trainer.callbacks
        ):
            trainer.callbacks.append(_CheckpointWriter(self))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.rng is not None:
            set_rng_state(self.rng)
        if self._resumed:
            # Lightning fetched this epoch's first minibatch while restoring, before the random
            # state was restored and before the epoch-start callbacks refreshed what the
            # minibatches carry (the spatial prior's bank): fetch it again once those ran
            pl_module._histovi_refetch = True
            self._resumed = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rng = rng_state()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rng = state_dict.get("rng")
        self._resumed = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            **self.fingerprint,
            "history": _history_of(trainer),
            "stopped_early": self.stopped_early,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(CHECKPOINT_KEY) or {}
        # the resumed model's history starts with the epochs of the interrupted session
        _restore_history(trainer, record.get("history"))
        if record.get("stopped_early"):
            # that training had finished (early stopping): do not train on
            logger.info(
                f"{self.path} holds a training that stopped early at epoch "
                f"{checkpoint.get('epoch')}: nothing left to train (pass another checkpoint_dir "
                "to train again)."
            )
            trainer.fit_loop.max_epochs = int(checkpoint.get("epoch", trainer.max_epochs))


class _CheckpointWriter(Checkpoint):
    """Write ``last.ckpt`` after the first epoch (a resumable state early, and a folder that
    cannot be written fails at once), then at the end of an epoch when
    :data:`CHECKPOINT_INTERVAL_S` seconds have passed since the last one, and when training
    ends. Resuming from any of them gives the uninterrupted run's result.

    A Lightning ``Checkpoint``, so that it runs after every other callback (early stopping
    included, and after the spatial prior's end-of-training refit): the checkpoint holds the
    state an uninterrupted run continues from. It is added when fitting starts rather than
    passed to the Trainer, where scvi-tools would add its own checkpointing (and validate
    every epoch). Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)`` is not used: it
    writes only when training ends, so a killed run would leave nothing to resume from."""

    def __init__(self, owner: ResumeStateCallback):
        self.owner = owner
        self._saved_at: float | None = None  # time.monotonic() of the last checkpoint

    @property
    def state_key(self) -> str:
        return f"histovi.{type(self).__name__}"

    def _save(self, trainer) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.owner.path, weights_only=False)
            self._saved_at = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._saved_at is None or time.monotonic() - self._saved_at >= CHECKPOINT_INTERVAL_S:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        max_epochs = trainer.fit_loop.max_epochs
        self.owner.stopped_early = bool(
            trainer.should_stop and max_epochs is not None and trainer.current_epoch < max_epochs
        )
        self._save(trainer)


def _history_of(trainer) -> dict[str, Any] | None:
    """The training history (scvi-tools' SimpleLogger) as plain types, with the current
    epoch's metrics that Lightning logs only after the epoch-end hooks."""
    data = getattr(getattr(trainer.logger, "experiment", None), "data", None)
    if not isinstance(data, dict):
        return None
    history = {
        name: {
            "index_name": frame.index.name,
            "index": [int(i) if float(i).is_integer() else float(i) for i in frame.index],
            "values": [float(v) for v in frame[name].to_numpy()],
        }
        for name, frame in data.items()
    }
    epoch = int(trainer.current_epoch)
    try:  # the epoch-level metrics Lightning is about to log (private, hence guarded)
        pending = dict(trainer._logger_connector.metrics["log"])
    except Exception:  # noqa: BLE001
        pending = {}
    for name, value in pending.items():
        if name in ("epoch", "step"):
            continue
        rec = history.setdefault(name, {"index_name": "epoch", "index": [], "values": []})
        if rec["index_name"] == "epoch" and epoch not in rec["index"]:
            rec["index"].append(epoch)
            rec["values"].append(float(value))
    return history


def _restore_history(trainer, history: dict[str, Any] | None) -> None:
    import pandas as pd

    data = getattr(getattr(trainer.logger, "experiment", None), "data", None)
    if not history or not isinstance(data, dict):
        return
    for name, rec in history.items():
        frame = pd.DataFrame({name: rec["values"]}, index=pd.Index(rec["index"], dtype=object))
        frame.index.name = rec["index_name"]
        data[name] = frame


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside its target, flush it to disk and rename
    it over the target: a crash while saving leaves the previous checkpoint intact. Read a
    checkpoint with ``torch.load(weights_only=True)`` whatever Lightning asks for, so resuming
    never runs code from the file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint_file(Path(path))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder (then renamed)."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------- fingerprint
def _digest(values) -> str:
    h = hashlib.sha1()
    for v in values:
        h.update(str(v).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def training_fingerprint(model) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by ``model``: data, model settings, seed."""
    import scvi

    from .. import __version__

    manager = model.adata_manager
    adata = manager.adata
    init = dict(model.init_params_.get("non_kwargs", {}))
    init.update(model.init_params_.get("kwargs", {}).get("module_kwargs", {}) or {})
    params = {k: repr(v) for k, v in sorted(init.items())}
    return {
        "n_obs": int(adata.n_obs),
        "obs_names": _digest(adata.obs_names),
        "var_names": _digest(adata.var_names),
        "setup_args": repr(sorted(manager.registry["setup_args"].items())),
        "model_params": params,
        "state_keys": _digest(sorted(model.module.state_dict())),
        "seed": scvi.settings.seed,
        "histovi_version": __version__,
    }


def _compare_fingerprints(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    fix = (
        f"pass another checkpoint_dir, or delete {path} to train from scratch with the current "
        "settings"
    )
    what = {
        "n_obs": "number of spots",
        "obs_names": "spots (obs_names)",
        "var_names": "genes (var_names)",
        "setup_args": "setup_anndata arguments",
        "state_keys": "model layout",
    }
    differ = [label for key, label in what.items() if saved.get(key) != now.get(key)]
    saved_params, now_params = saved.get("model_params", {}), now.get("model_params", {})
    for key in sorted(set(saved_params) | set(now_params)):
        if saved_params.get(key) != now_params.get(key):
            differ.append(f"{key}={saved_params.get(key)} (now {now_params.get(key)})")
    if differ:
        raise ValueError(
            f"checkpoint_dir: {path} was written for another model or data set (differs: "
            f"{', '.join(differ)}): {fix}."
        )
    if saved.get("seed") != now.get("seed"):
        logger.warning(
            f"Resuming {path}, written with scvi.settings.seed={saved.get('seed')}, under seed "
            f"{now.get('seed')}: training continues, but the train/validation split and the "
            "minibatches differ from the interrupted run, so the result will not match an "
            "uninterrupted run."
        )


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)`` (tensors and plain
    values only: nothing in the file can run); a clear error when it is unreadable or holds
    anything else."""
    from ._safe_format import UnsafeFileError, safe_torch_load

    try:
        ckpt = safe_torch_load(path, "checkpoint")
    except UnsafeFileError as err:
        raise ValueError(
            f"checkpoint_dir: {path} is not a checkpoint written by HistoVI.train: it holds "
            f"Python objects ({str(err)[:200]}) that would run code when loaded, so it was not "
            "opened. Delete it (or pass another checkpoint_dir) to train from scratch."
        ) from None
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated zip, FIFO, unpickling errors, ...
        raise ValueError(
            f"checkpoint_dir: {path} cannot be read ({type(err).__name__}: {str(err)[:300]}); "
            "it was probably cut short by a crash. Delete it to train from scratch (the "
            "folder's other files are not used)."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"checkpoint_dir: {path} is not a Lightning checkpoint of HistoVI.train: delete it or "
            "pass another checkpoint_dir."
        )
    return ckpt


def read_checkpoint_record(path: Path) -> dict[str, Any]:
    """The histovi record of a Lightning checkpoint; a clear error when it is unreadable."""
    return load_checkpoint_file(path).get(CHECKPOINT_KEY) or {}


def checkpointing(model, checkpoint_dir, trainer_kwargs: dict) -> dict:
    """Lightning arguments for ``train(checkpoint_dir=...)``: write ``last.ckpt`` atomically
    (see :class:`_CheckpointWriter` for when), and resume from it (after checking it) when it
    exists."""
    path = Path(checkpoint_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"checkpoint_dir={str(checkpoint_dir)!r} is a file: pass a folder (it is created "
            "if needed)."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"checkpoint_dir={str(checkpoint_dir)!r} cannot be created ({err.strerror or err}): "
            "pass a writable folder."
        ) from err
    fingerprint = training_fingerprint(model)
    last = path / LAST_CHECKPOINT
    # First, so that the random state is restored before other callbacks draw from it at the
    # start of an epoch (the spatial prior's bank refresh samples the posterior). Lightning's
    # ModelCheckpoint(save_top_k=0, save_last=True) is not used: it writes last.ckpt only when
    # training ends, so a killed run would leave nothing to resume from.
    callbacks = [ResumeStateCallback(fingerprint, last)]
    callbacks += list(trainer_kwargs.get("callbacks") or [])
    plugins = trainer_kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    out = {"callbacks": callbacks, "plugins": plugins}
    if last.exists() and "ckpt_path" not in trainer_kwargs:
        _compare_fingerprints(read_checkpoint_record(last), fingerprint, last)
        logger.info(f"Resuming training from {last}.")
        out["ckpt_path"] = str(last)
    return out


def training_kwargs(
    model, max_epochs, batch_size, plan_kwargs, checkpoint_dir, trainer_kwargs: dict
) -> tuple[int, dict, dict]:
    """``max_epochs``, ``plan_kwargs`` and the Lightning arguments of :meth:`HistoVI.train`
    (see there for the defaults), after checking its arguments."""
    n = model.adata.n_obs
    is_query = getattr(model, "is_query_", False)
    record = model.histovi_setup_
    if max_epochs is None and is_query and record.get("train_spot_epochs"):
        max_epochs = int(max(10, min(200, round(0.1 * record["train_spot_epochs"] / n))))
    elif max_epochs is None:
        max_epochs = default_max_epochs(n)
    plan_kwargs = dict(plan_kwargs or {})
    if "n_epochs_kl_warmup" not in plan_kwargs and "n_steps_kl_warmup" not in plan_kwargs:
        plan_kwargs["n_epochs_kl_warmup"] = default_kl_warmup_epochs(max_epochs)
    if is_query:
        # weight decay would move the frozen reference weights
        plan_kwargs.setdefault("weight_decay", 0.0)
    trainer_kwargs = dict(trainer_kwargs)
    if trainer_kwargs.get("strategy") in ("ddp", "ddp_spawn", "ddp_notebook"):
        # parts of scvi-tools' decoders (zero-inflation heads) take no part in the loss:
        # DDP must be told, or it stops at the first step
        trainer_kwargs["strategy"] += "_find_unused_parameters_true"
    # argument checks, checkpoint and resume, stop on divergence
    trainer_kwargs.update(
        prepare_training(model, max_epochs, batch_size, checkpoint_dir, trainer_kwargs)
    )
    if model.spatial_context and not is_query:
        callbacks = list(trainer_kwargs.get("callbacks") or [])
        trainer_kwargs["callbacks"] = [*callbacks, SpatialMixCallback(model)]
    if not getattr(model.module, "use_niche", False):
        # no niche decoder: the loaders need not gather the neighbours' counts
        splitter_kwargs = dict(trainer_kwargs.pop("datasplitter_kwargs", None) or {})
        splitter_kwargs.setdefault("gather_niche", False)
        trainer_kwargs["datasplitter_kwargs"] = splitter_kwargs
    return max_epochs, plan_kwargs, trainer_kwargs


def record_training(model, max_epochs: int) -> None:
    """Count a reference's training work (spots x epochs): a query's default length is a
    tenth of it."""
    if not getattr(model, "is_query_", False):
        record = model.histovi_setup_
        record["train_spot_epochs"] = (
            record.get("train_spot_epochs", 0) + model.adata.n_obs * max_epochs
        )


def prepare_training(model, max_epochs, batch_size, checkpoint_dir, trainer_kwargs: dict) -> dict:
    """Trainer arguments of :meth:`HistoVI.train` after checking its arguments: the checkpoint
    callbacks when ``checkpoint_dir`` is given, and the handler of a diverged training."""
    check_train_args(model, max_epochs, batch_size)
    out = {}
    if checkpoint_dir is not None:
        out = checkpointing(model, checkpoint_dir, trainer_kwargs)
    elif trainer_kwargs.get("ckpt_path") is not None:
        # a checkpoint named by the user is read as ours are: weights_only=True, checked first
        ckpt_path = str(trainer_kwargs["ckpt_path"])
        if ckpt_path not in ("last", "best", "hpc", "registry"):  # Lightning's own names
            read_checkpoint_record(Path(ckpt_path).expanduser())
        plugins = trainer_kwargs.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        out["plugins"] = plugins
    callbacks = list(out.get("callbacks", trainer_kwargs.get("callbacks")) or [])
    out["callbacks"] = callbacks + [DivergenceCallback(model)]
    return out


class DivergenceCallback(Callback):
    """When training stopped on a diverged minibatch: leave the model in evaluation mode with
    its last good weights, usable (``is_trained_``) if it took at least one optimizer step."""

    def __init__(self, model):
        self.model = model

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, TrainingDivergedError):
            pl_module.module.eval()
            if exception.step > 0:
                self.model.is_trained_ = True


def check_train_args(model, max_epochs, batch_size) -> None:
    """Arguments of :meth:`HistoVI.train` checked before any work, and the registered data
    checked again (it may have been changed in place since ``setup_anndata``)."""
    from .._validation import check_counts, check_neighbors, is_whole_number
    from ..module._module import NEIGHBORS_REGISTRY_KEY
    from ._checks import check_trainable

    if max_epochs is not None and not is_whole_number(max_epochs):
        raise ValueError(
            f"max_epochs={max_epochs!r}: pass a positive whole number of epochs, or None for the "
            "default rule (histovi.model.default_max_epochs)."
        )
    if not is_whole_number(batch_size):
        raise ValueError(f"batch_size={batch_size!r}: pass a positive whole number of spots.")
    check_trainable(model)
    manager = model.adata_manager
    if not hasattr(manager.adata, "mod"):
        check_counts(manager.adata, manager.registry["setup_args"].get("layer"))
    if NEIGHBORS_REGISTRY_KEY in manager.data_registry:
        field = manager.data_registry[NEIGHBORS_REGISTRY_KEY]
        adata = manager.adata
        if hasattr(adata, "obsm") and field.attr_key in adata.obsm and not hasattr(adata, "mod"):
            batch_key = manager.registry["setup_args"].get("batch_key")
            check_neighbors(adata, field.attr_key, batch_key, check_digest=False)


# ---------------------------------------------------------------------------- divergence
def _view_of_parameter(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("view_encoders", "view_decoders") and len(parts) > 1:
        return parts[1]
    if parts[0].startswith("niche"):
        return "niche"
    return "expression"


#: minibatch keys -> the input a user would fix: the niche counts are the neighbours' expression
#: counts, so a NaN there (from a spot outside the minibatch) is a NaN in the expression counts
_INPUT_NAMES = {"X": "expression", "niche_counts": "expression"}

DIVERGENCE_FIX = (
    "The model keeps the weights from before this step (save or inspect it now). Check that "
    "view's input for extreme values (adata.obsm / raw counts), or train again with a lower "
    "learning rate (plan_kwargs={'lr': 1e-4}) or a larger batch_size."
)


class HistoTrainRunner(TrainRunner):
    """scvi-tools' runner; NaN reaching a torch distribution outside a training step (in the
    epoch-start refresh of the spatial prior's bank) stops with the input that holds it."""

    def __call__(self):
        try:
            return super().__call__()
        except ValueError as err:
            if "invalid values" not in str(err):
                raise
            from ._checks import nonfinite_registered_inputs

            bad = nonfinite_registered_inputs(self.model)
            what = (
                f"the input of {', '.join(repr(n) for n in bad)} holds NaN or inf values "
                "(changed since setup_anndata?)"
                if bad
                else "the model produced NaN or inf values"
            )
            trainer = self.trainer
            raise TrainingDivergedError(
                f"Training diverged at epoch {trainer.current_epoch}: {what}. {DIVERGENCE_FIX}",
                views=bad,
                epoch=trainer.current_epoch,
                step=trainer.global_step,
            ) from err


class HistoTrainingPlan(TrainingPlan):
    """scvi-tools' training plan that stops, before the optimizer step, on a minibatch whose
    loss or gradients are not finite (the model then keeps its last good weights)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self._last_loss_output = out[-1]
        return out

    def training_step(self, batch, batch_idx):
        try:
            loss = super().training_step(batch, batch_idx)
        except ValueError as err:
            # torch.distributions refuse NaN parameters: NaN inputs, or weights already NaN
            if "invalid values" not in str(err):
                raise
            names = self._nonfinite_input_names(batch)
            what = (
                f"the input of {', '.join(repr(n) for n in names)} holds NaN or inf values "
                "(changed since setup_anndata?)"
                if names
                else "the model produced NaN or inf values"
            )
            raise TrainingDivergedError(
                f"Training diverged at epoch {self.current_epoch}, minibatch {batch_idx}: "
                f"{what}. {DIVERGENCE_FIX}",
                views=names,
                epoch=self.current_epoch,
                step=self.global_step,
            ) from err
        value = loss["loss"] if isinstance(loss, dict) else loss
        if not bool(torch.isfinite(value).all()):
            # a NaN input is the commonest cause and the most useful name: a likelihood that
            # does not validate its parameters lets it through to the loss
            where = f"epoch {self.current_epoch}, minibatch {batch_idx}"
            names = self._nonfinite_input_names(batch)
            if names:
                bad = names
                what = (
                    f"the input of {', '.join(repr(n) for n in names)} holds NaN or inf values "
                    "(changed since setup_anndata?)"
                )
            else:
                bad = self._diverged_terms()
                what = (
                    f"the {', '.join(repr(b) for b in bad)} term{'s' if len(bad) > 1 else ''} "
                    "of the loss is NaN or infinite"
                    if bad
                    else "the loss (no single term) is NaN or infinite"
                )
            raise TrainingDivergedError(
                f"Training diverged at {where}: {what}. {DIVERGENCE_FIX}",
                views=bad,
                epoch=self.current_epoch,
                step=self.global_step,
            )
        return loss

    @staticmethod
    def _nonfinite_input_names(batch) -> list[str]:
        from ._checks import nonfinite_inputs

        names = [_INPUT_NAMES.get(k, k.removeprefix("view_")) for k in nonfinite_inputs(batch)]
        return list(dict.fromkeys(names))

    def _diverged_terms(self) -> list[str]:
        out = getattr(self, "_last_loss_output", None)
        bad = []
        if out is not None:
            terms = dict(out.reconstruction_loss or {})
            terms.update({f"KL ({k})": v for k, v in (out.kl_local or {}).items()})
            terms.update(dict(out.extra_metrics or {}))
            for name, value in terms.items():
                if torch.is_tensor(value) and not bool(torch.isfinite(value).all()):
                    bad.append(name)
        return bad

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if getattr(self, "_histovi_refetch", False):
            # after every epoch-start callback, as in an uninterrupted epoch (see
            # ResumeStateCallback): draw the minibatch order and the first minibatch again
            self._histovi_refetch = False
            fetcher = getattr(self.trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [(n, p) for n, p in self.module.named_parameters() if p.grad is not None]
        if params:
            # one fused kernel per device and a single host sync per step
            norms = torch.stack(torch._foreach_norm([p.grad.detach() for _, p in params]))
            if not bool(torch.isfinite(norms).all()):
                bad = [
                    n for (n, _), ok in zip(params, torch.isfinite(norms), strict=True) if not ok
                ]
                views = sorted({_view_of_parameter(n) for n in bad})
                raise TrainingDivergedError(
                    f"Training diverged at epoch {self.current_epoch}: the gradients of the "
                    f"{', '.join(repr(v) for v in views)} part of the model are NaN or infinite "
                    f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). " + DIVERGENCE_FIX,
                    views=views,
                    epoch=self.current_epoch,
                    step=self.global_step,
                )
        super().on_before_optimizer_step(optimizer)
