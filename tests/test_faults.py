"""Faults, and nothing lost (issue 21): a training killed mid-epoch resumes to the latent of an
uninterrupted run; a diverging loss stops naming its view and keeps the last good weights;
saving is atomic and loading says what differs; ``histovi run`` never overwrites a finished run
and finishes a killed one; no entry point changes its input beyond its documented keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch
from _messages import assert_names, raises_naming, warns_naming
from _tiny import TRAIN, cli_args, tiny_model

import histovi
from histovi import HistoVI
from histovi.model import TrainingDivergedError

TESTS = Path(__file__).parent


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ interrupted training
def test_killed_training_resumes_to_the_uninterrupted_latent(tmp_path, tiny_adata):
    """A real process, killed (SIGKILL) in the middle of epoch 2, resumed here: same latent as
    an uninterrupted run with the same seed, and the same as a run without checkpoints."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "held"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(histovi.__file__).parents[1])])}
    # the same thread count as this process: bitwise equality holds for one thread count only
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "_train_child.py"), str(ckpt), str(marker), "2", "4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("child did not reach epoch 2")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    saved = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1  # the end of the last complete epoch before the kill

    resumed = tiny_model(tiny_adata.copy())
    epochs_run = []
    resumed.train(max_epochs=4, checkpoint_dir=ckpt, callbacks=[_epoch_log(epochs_run)], **TRAIN)
    assert epochs_run == [2, 3]  # only the missing epochs ran
    uninterrupted = tiny_model(tiny_adata.copy())
    uninterrupted.train(max_epochs=4, **TRAIN)
    np.testing.assert_array_equal(
        resumed.get_latent_representation(), uninterrupted.get_latent_representation()
    )
    assert _same_state(_state(resumed), _state(uninterrupted))
    _assert_same_history(resumed.history, uninterrupted.history)  # nothing of it lost


def _assert_same_history(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert list(a[key].index) == list(b[key].index), key
        np.testing.assert_array_equal(a[key].to_numpy(float), b[key].to_numpy(float), key)


def _epoch_log(epochs: list):
    from lightning.pytorch.callbacks import Callback

    class EpochLog(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            epochs.append(trainer.current_epoch)

    return EpochLog()


class _Crash(Exception):
    pass


def _crash_at(epoch: int, batch: int = 1):
    from lightning.pytorch.callbacks import Callback

    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx):
            if trainer.current_epoch == epoch and batch_idx == batch:
                raise _Crash

    return Crash()


#: early stopping that stops this tiny study after 2 of 12 epochs
STOPS_EARLY = {
    "early_stopping": True,
    "early_stopping_patience": 1,
    "early_stopping_min_delta": 2.0,
    "check_val_every_n_epoch": 1,
}


@pytest.mark.parametrize(
    ("model_kwargs", "train_kwargs", "crash_epoch"),
    [
        ({"view_gating": False, "niche_weight": 2.0}, {}, 2),
        ({"view_dropout": 0.5}, {"check_val_every_n_epoch": 1, "train_size": 0.8}, 2),
        ({}, STOPS_EARLY, 1),
    ],
    ids=["options", "validation-every-epoch", "early-stopping"],
)
def test_resume_reproduces_every_option(
    tmp_path, tiny_adata, model_kwargs, train_kwargs, crash_epoch
):
    """Callbacks that keep state between epochs (spatial prior bank and precision, anchors,
    early stopping) and random draws (cycle, dropout) all resume exactly."""
    kw, epochs = {**TRAIN, **train_kwargs}, 12 if train_kwargs is STOPS_EARLY else 4
    crashed = tiny_model(tiny_adata.copy(), **model_kwargs)
    with pytest.raises(_Crash):
        crashed.train(
            max_epochs=epochs, checkpoint_dir=tmp_path, callbacks=[_crash_at(crash_epoch)], **kw
        )
    resumed = tiny_model(tiny_adata.copy(), **model_kwargs)
    resumed.train(max_epochs=epochs, checkpoint_dir=tmp_path, **kw)
    plain = tiny_model(tiny_adata.copy(), **model_kwargs)
    plain.train(max_epochs=epochs, **kw)
    np.testing.assert_array_equal(
        resumed.get_latent_representation(), plain.get_latent_representation()
    )
    _assert_same_history(resumed.history, plain.history)


@pytest.mark.parametrize("train_kwargs", [{}, STOPS_EARLY], ids=["max-epochs", "early-stopping"])
def test_resuming_a_finished_training_changes_nothing(tmp_path, tiny_adata, train_kwargs):
    """Running the same training again with its checkpoint folder (a notebook run twice, a
    pipeline finished after a later step crashed) gives the finished model, trains nothing."""
    kw = {**TRAIN, **train_kwargs}
    first = tiny_model(tiny_adata.copy())
    first.train(max_epochs=4, checkpoint_dir=tmp_path, **kw)
    again, epochs_run = tiny_model(tiny_adata.copy()), []
    again.train(max_epochs=4, checkpoint_dir=tmp_path, callbacks=[_epoch_log(epochs_run)], **kw)
    assert epochs_run == []
    np.testing.assert_array_equal(
        again.get_latent_representation(), first.get_latent_representation()
    )
    _assert_same_history(again.history, first.history)


def test_checkpoint_of_another_model_or_data_is_refused(tmp_path, tiny_adata):
    tiny_model(tiny_adata.copy()).train(max_epochs=1, checkpoint_dir=tmp_path, **TRAIN)
    other = tiny_model(tiny_adata.copy(), n_layers=2)
    with raises_naming(
        ValueError, "last.ckpt", "n_layers=1 (now 2)", "another checkpoint_dir", "delete"
    ):
        other.train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    fewer = tiny_adata[:, :20].copy()
    with raises_naming(
        ValueError, "last.ckpt", "genes (var_names)", "another checkpoint_dir", "delete"
    ):
        tiny_model(fewer).train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)


def test_unreadable_checkpoint_is_reported(tmp_path, tiny_adata):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with raises_naming(ValueError, "last.ckpt", "cannot be read", "delete it"):
        tiny_model(tiny_adata).train(max_epochs=1, checkpoint_dir=tmp_path, **TRAIN)
    with raises_naming(ValueError, "checkpoint_dir=", "is a file", "pass a folder"):
        tiny_model(tiny_adata).train(max_epochs=1, checkpoint_dir=tmp_path / "last.ckpt", **TRAIN)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_adata, monkeypatch):
    from histovi.model import _training

    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of epoch 1: half written, then the process dies
            f.write(b"half a checkpoint")
            raise _Crash
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(_training.torch, "save", dying_save)
    with pytest.raises(_Crash):
        tiny_model(tiny_adata).train(max_epochs=3, checkpoint_dir=tmp_path, **TRAIN)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0


# ------------------------------------------------------------------ divergence
def _poison(model, at_call: int, view: str, keep: dict):
    """Make the ``view`` term of the loss NaN at the ``at_call``-th training forward pass, and
    remember the weights just before it."""
    loss, calls = model.module.loss, [0]

    def poisoned(*args, **kwargs):
        out = loss(*args, **kwargs)
        if model.module.training:
            calls[0] += 1
            if calls[0] == at_call:
                keep.update(_state(model))
                out.reconstruction_loss[view] = out.reconstruction_loss[view] * float("nan")
                out.loss = out.loss * float("nan")
        return out

    model.module.loss = poisoned


@pytest.mark.parametrize("view", ["morphology", "niche", "expression"])
def test_nan_loss_stops_naming_the_view_and_keeps_the_last_good_weights(tiny_adata, view):
    model = tiny_model(tiny_adata)
    before = {}
    _poison(model, at_call=6, view=view, keep=before)  # epoch 1, minibatch 1
    with raises_naming(
        TrainingDivergedError, f"'{view}'", "epoch 1, minibatch 1", "lower learning rate"
    ):
        model.train(max_epochs=3, **TRAIN)
    assert _same_state(_state(model), before)  # the diverged step was not applied
    assert not model.module.training
    z = model.get_latent_representation()
    assert np.isfinite(z).all()


def test_inf_gradient_stops_naming_the_view(tiny_adata):
    model = tiny_model(tiny_adata)
    param = model.module.view_decoders["morphology"].mean.weight
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == 3 else grad

    param.register_hook(hook)
    with raises_naming(
        TrainingDivergedError, "'morphology'", "gradients", "NaN or infinite", "lower learning rate"
    ):
        model.train(max_epochs=2, **TRAIN)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_diverged_first_step_leaves_an_untrained_model(tiny_adata):
    model = tiny_model(tiny_adata)
    _poison(model, at_call=1, view="expression", keep={})
    with raises_naming(
        TrainingDivergedError, "'expression'", "epoch 0, minibatch 0", "lower learning rate"
    ):
        model.train(max_epochs=1, **TRAIN)
    assert not model.is_trained_


# ------------------------------------------------------------------ save and load
def test_crash_mid_save_leaves_the_previous_model_loadable(tmp_path, tiny_trained, monkeypatch):
    import scvi.model.base._base_model as base

    path = tmp_path / "model"
    tiny_trained.save(path)
    z = tiny_trained.get_latent_representation()
    real_save = base.torch.save

    def dying_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a model")
        raise _Crash

    monkeypatch.setattr(base.torch, "save", dying_save)
    with pytest.raises(_Crash):
        tiny_trained.save(path, overwrite=True)
    monkeypatch.setattr(base.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    loaded = HistoVI.load(path, adata=tiny_trained.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    assert loaded.histovi_versions_["histovi"] == histovi.__version__
    with raises_naming(ValueError, "model", "already exists", "overwrite=True", "another folder"):
        tiny_trained.save(path)


def _saved(tiny_trained, tmp_path, edit=None):
    path = tmp_path / "model"
    tiny_trained.save(path, overwrite=True)
    if edit is not None:
        saved = torch.load(path / "model.pt", weights_only=True)
        edit(saved, path)
        if (path / "model.pt").exists() and saved:
            torch.save(saved, path / "model.pt")
    return path


def _other_version(saved, path):
    saved["attr_dict"]["histovi_versions_"] = {
        "histovi": "0.0.1",
        "scvi-tools": "1.1.0",
        "torch": "2.1.0",
    }
    del saved["model_state_dict"]["px_r"]


def _other_class(saved, path):
    saved["attr_dict"]["registry_"]["model_name"] = "SCVI"


def _not_histovi(saved, path):
    del saved["attr_dict"]["histovi_setup_"]


def _truncate(saved, path):
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])
    saved.clear()


LOAD_CASES = [
    # (id, edit of the saved folder, edit of adata, error, (key, *fix) the message names)
    (
        "folder-missing",
        "no folder",
        None,
        FileNotFoundError,
        ("nowhere", "no saved model", "model.save"),
    ),
    (
        "model-file-missing",
        lambda s, p: (p / "model.pt").unlink(),
        None,
        FileNotFoundError,
        ("model.pt", "holds no", "never completed"),
    ),
    ("truncated", _truncate, None, ValueError, ("model.pt", "cut short", "save the model again")),
    ("other-class", _other_class, None, ValueError, ("SCVI model", "scvi.model.SCVI")),
    ("not-histovi", _not_histovi, None, ValueError, ("model.pt", "not saved by histovi")),
    (
        "other-version",
        _other_version,
        None,
        ValueError,
        ("histovi 0.0.1", "px_r", "histovi version that saved it"),
    ),
    (
        "fewer-genes",
        None,
        lambda a: a[:, 3:].copy(),
        ValueError,
        ("3 of the model's 30 genes", "missing", "prepare_query_anndata"),
    ),
    (
        "genes-reordered",
        None,
        lambda a: a[:, ::-1].copy(),
        ValueError,
        ("adata", "genes in another order", "adata[:, model_genes]"),
    ),
    (
        "view-missing",
        None,
        lambda a: _drop_obsm(a, "X_morphology"),
        KeyError,
        ("obsm['X_morphology']", "not found", "histovi.pp.embed_morphology"),
    ),
    (
        "neighbours-missing",
        None,
        lambda a: _drop_obsm(a, "spatial_neighbors"),
        KeyError,
        ("obsm['spatial_neighbors']", "not found", "histovi.pp.spatial_neighbors"),
    ),
]


def _drop_obsm(adata, key):
    adata = adata.copy()
    del adata.obsm[key]
    return adata


@pytest.mark.parametrize(
    ("edit", "edit_adata", "error", "message"),
    [c[1:] for c in LOAD_CASES],
    ids=[c[0] for c in LOAD_CASES],
)
def test_load_reports_what_differs(tmp_path, tiny_trained, edit, edit_adata, error, message):
    path = _saved(tiny_trained, tmp_path, edit if callable(edit) else None)
    if edit == "no folder":
        path = tmp_path / "nowhere"
    adata = tiny_trained.adata.copy()
    if edit_adata is not None:
        adata = edit_adata(adata)
    with raises_naming(error, *message):
        HistoVI.load(path, adata=adata)


def test_model_of_another_histovi_version_loads_with_a_warning(tmp_path, tiny_trained):
    def older(saved, path):
        saved["attr_dict"]["histovi_versions_"]["histovi"] = "0.0.9"

    path = _saved(tiny_trained, tmp_path, older)
    with warns_naming(UserWarning, "histovi 0.0.9", "install the saving version"):
        HistoVI.load(path, adata=tiny_trained.adata.copy())


def test_query_from_a_corrupted_reference_folder(tmp_path, tiny_trained):
    path = _saved(tiny_trained, tmp_path, _truncate)
    query = tiny_trained.adata.copy()
    with raises_naming(ValueError, "model.pt", "cannot be read", "save the model again"):
        HistoVI.prepare_query_anndata(query, str(path))
    with raises_naming(ValueError, "model.pt", "cannot be read", "save the model again"):
        HistoVI.load_query_data(query, path)


# ------------------------------------------------------------------ reproducibility
def test_same_seed_same_latent_other_seed_another(tiny_adata):
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model(tiny_adata.copy(), seed=seed)
        model.train(max_epochs=2, **TRAIN)
        runs.append(model.get_latent_representation())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_resumed_run_under_another_seed_warns(tmp_path, tiny_adata, caplog):
    tiny_model(tiny_adata.copy()).train(max_epochs=1, checkpoint_dir=tmp_path, **TRAIN)
    model = tiny_model(tiny_adata.copy(), seed=5)
    with caplog.at_level("WARNING", logger="histovi"):
        model.train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    assert_names(caplog.text, "scvi.settings.seed=", "train/validation split", "will not match")
    scvi.settings.seed = 0


# ------------------------------------------------------------------ histovi run
CLI_TINY = cli_args(max_epochs=3)


def _latent(folder: Path) -> np.ndarray:
    import anndata as ad

    return np.asarray(ad.read_h5ad(folder / "adata.h5ad").obsm["X_histovi"])


def test_cli_killed_run_is_finished_and_a_finished_run_never_overwritten(
    tmp_path, capsys, monkeypatch
):
    import json

    from histovi import cli, pipeline

    out, ref = tmp_path / "out", tmp_path / "ref"
    assert cli.main(["run", "--out", str(ref), *CLI_TINY]) == 0
    # killed during epoch 1 of training
    real_train = HistoVI.train

    def crashing_train(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _crash_at(1, batch=0)]
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(HistoVI, "train", crashing_train)
    assert cli.main(["run", "--out", str(out), *CLI_TINY]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert json.loads((out / cli.STATUS_FILE).read_text())["status"] == "running"
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / "adata.h5ad").exists()
    # an unfinished run is only finished with the options it was started with
    assert cli.main(["run", "--out", str(out), *CLI_TINY, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert_names(
        err, "--seed 0 (now 1)", "unfinished run", "run the same command again", "--overwrite"
    )
    # the same command finishes it: training resumes, and the result is the uninterrupted one
    assert cli.main(["run", "--out", str(out), *CLI_TINY]) == 0
    np.testing.assert_array_equal(_latent(out), _latent(ref))
    assert json.loads((out / cli.STATUS_FILE).read_text())["status"] == "complete"
    assert json.loads((out / "metrics.json").read_text())["summary"]["epochs"] == 3
    assert not (out / "checkpoints").exists()
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]
    # killed after training (while drawing figures): the same command finishes it without
    # training again, from the finished checkpoint
    late = tmp_path / "late"
    monkeypatch.setattr(pipeline, "figures", lambda *a, **k: (_ for _ in ()).throw(_Crash()))
    assert cli.main(["run", "--out", str(late), *CLI_TINY]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["run", "--out", str(late), *CLI_TINY]) == 0
    np.testing.assert_array_equal(_latent(late), _latent(ref))
    assert json.loads((late / "metrics.json").read_text())["summary"]["epochs"] == 3
    assert (late / "training.png").exists()
    # a finished run is never overwritten without --overwrite
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert cli.main(["run", "--out", str(out), *CLI_TINY]) == 2
    err = capsys.readouterr().err
    assert_names(err, "--out", "outputs of a previous run", "--overwrite", "another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # --overwrite with an invalid input fails before removing anything
    assert cli.main(["run", "--out", str(out), *CLI_TINY, "--overwrite", "--sample-key", "x"]) == 2
    assert_names(capsys.readouterr().err, "--sample-key 'x'", "not a column")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # outputs of an older histovi (no status file) are protected too
    (ref / cli.STATUS_FILE).unlink()
    assert cli.main(["run", "--out", str(ref), *CLI_TINY]) == 2
    assert_names(capsys.readouterr().err, "adata.h5ad", "--overwrite")
    # --overwrite replaces only histovi's outputs, also inside its folders
    (out / "notes.txt").write_text("mine")
    (out / "model" / "notes.txt").write_text("mine too")
    assert cli.main(["run", "--out", str(out), *CLI_TINY, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model" / "notes.txt").read_text() == "mine too"
    written = json.loads((out / cli.STATUS_FILE).read_text())["written"]
    assert {"adata.h5ad", "metrics.json", "report.html", "model", "umap.png"} <= set(written)
    np.testing.assert_array_equal(_latent(out), _latent(ref))


def test_numba_tools_leave_torch_threads_alone():
    """numba's OpenMP layer sets every core's worth of threads the first time it runs (UMAP,
    Leiden, scib-metrics), which changed torch's thread count and so the next latent; histovi's
    functions that may run numba restore it."""
    from histovi._threads import keeps_torch_threads

    n = torch.get_num_threads()

    @keeps_torch_threads
    def like_numba():
        torch.set_num_threads(n + 1)
        raise _Crash

    with pytest.raises(_Crash):
        like_numba()
    assert torch.get_num_threads() == n
    for func in (
        histovi.pl.latent_umap,
        histovi.tl.domains,
        histovi.tl.cluster_embedding,
        histovi.metrics.evaluate,
        histovi.metrics.integration_scores,
        histovi.metrics.cluster_and_score,
        histovi.pp.embed_expression,
        histovi.pp.embed_morphology,
    ):
        assert hasattr(func, "__wrapped__"), func.__name__


# ------------------------------------------------------------------ inputs are not modified
def _flatten(value, prefix: str, out: dict) -> None:
    from collections.abc import Mapping

    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}/{k}", out)
    else:
        out[prefix] = value


def snapshot(adata) -> dict:
    """Every part of an AnnData as ``'attr/key' -> deep copy``."""
    import copy

    snap = {
        "X": copy.deepcopy(adata.X),
        "obs_names": list(adata.obs_names),
        "var_names": list(adata.var_names),
    }
    for attr in ("obs", "var"):
        for col in getattr(adata, attr).columns:
            snap[f"{attr}/{col}"] = getattr(adata, attr)[col].copy()
    for attr in ("layers", "obsm", "varm", "obsp", "varp"):
        for key, value in getattr(adata, attr).items():
            snap[f"{attr}/{key}"] = copy.deepcopy(value)
    _flatten(copy.deepcopy(dict(adata.uns)), "uns", snap)
    return snap


def _equal(a, b) -> bool:
    import pandas as pd
    import scipy.sparse as sp

    if type(a) is not type(b) and not (np.isscalar(a) and np.isscalar(b)):
        return False
    if isinstance(a, pd.Series | pd.DataFrame):
        return a.equals(b) and str(getattr(a, "dtype", "")) == str(getattr(b, "dtype", ""))
    if sp.issparse(a):
        return a.shape == b.shape and a.dtype == b.dtype and (a != b).nnz == 0
    if isinstance(a, np.ndarray):
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return a is b


def changed_keys(before: dict, after: dict) -> set[str]:
    return {
        k
        for k in set(before) | set(after)
        if k not in before or k not in after or not _equal(before[k], after[k])
    }


#: what registering an AnnData with scvi-tools adds (documented in HistoVI.setup_anndata)
SCVI_KEYS = (r"obs/_scvi_(batch|labels)", r"uns/_scvi_(uuid|manager_uuid)")


def _with_images(adata):
    from histovi.datasets._images import draw_he_images

    adata.uns["spatial"] = draw_he_images(adata, seed=0)
    return adata


def _query_pair(tiny_trained):
    query = tiny_trained.adata.copy()
    for c in [c for c in query.obs if c.startswith("_scvi")]:
        del query.obs[c]
    for k in [k for k in query.uns if k.startswith("_scvi")]:
        del query.uns[k]
    query.obs["sample"] = query.obs["sample"].astype(str) + "_q"
    return query


def _latent_adata(tiny_trained):
    adata = tiny_trained.adata.copy()
    adata.obsm["X_histovi"] = tiny_trained.get_latent_representation()
    return adata


# (entry point, call(data, model) -> the AnnData to compare, allowed changed keys, a key that
# must change (the call did its job), data: 'fresh' tiny study or 'latent' with X_histovi)
MODIFIES = [
    (
        "pp.spatial_neighbors",
        lambda a, m: histovi.pp.spatial_neighbors(a, sample_key="sample", n_neighbors=3),
        [r"obsm/spatial_neighbors(_distances)?", r"uns/histovi/spatial_neighbors/.*"],
        "obsm/spatial_neighbors",
        "fresh",
    ),
    (
        "pp.embed_morphology",
        lambda a, m: histovi.pp.embed_morphology(
            _with_images(a), key_added="X_he", tile_size_um=64.0, target_mpp=2.0, progress=False
        ),
        [r"obsm/X_he", r"obs/morphology_valid", r"uns/histovi/morphology/.*"],
        "obsm/X_he",
        "fresh",
    ),
    (
        "pp.embed_expression",
        lambda a, m: histovi.pp.embed_expression(a, "pca", layer="counts", n_comps=3),
        [r"obsm/X_expression_pca", r"uns/histovi/embeddings/.*"],
        "obsm/X_expression_pca",
        "fresh",
    ),
    ("io.to_spatialdata", lambda a, m: histovi.io.to_spatialdata(a), [], None, "fresh"),
    ("HistoVI.setup_anndata", lambda a, m: tiny_model(a), SCVI_KEYS, "obs/_scvi_batch", "fresh"),
    (
        "HistoVI.train",
        lambda a, m: tiny_model(a).train(max_epochs=1, **TRAIN),
        SCVI_KEYS,
        "obs/_scvi_batch",
        "fresh",
    ),
    (
        "get_latent_representation",
        lambda a, m: m.get_latent_representation(a),
        SCVI_KEYS,
        None,
        "fresh",
    ),
    ("HistoVI.load", None, SCVI_KEYS, None, "fresh"),
    ("prepare_query_anndata", None, [], None, "query"),
    ("load_query_data", None, SCVI_KEYS, "obs/_scvi_batch", "query"),
    (
        "tl.domains",
        lambda a, m: histovi.tl.domains(a, n_domains=3, spatial_smoothing=1),
        [r"obs/domain", r"uns/histovi/domains/.*"],
        "uns/histovi/domains/n_found",
        "latent",
    ),
    (
        "tl.aggregate_neighbors",
        lambda a, m: histovi.tl.aggregate_neighbors(a, "X_histovi", n_hops=1),
        [r"obsm/X_histovi_agg1", r"uns/histovi/aggregate_neighbors/.*"],
        "obsm/X_histovi_agg1",
        "latent",
    ),
    (
        "tl.anchor_sections",
        lambda a, m: histovi.tl.anchor_sections(a),
        [r"obsm/X_histovi_anchored", r"uns/histovi/anchor_sections/.*"],
        "obsm/X_histovi_anchored",
        "latent",
    ),
    (
        "tl.transfer_labels (reference)",
        lambda a, m: histovi.tl.transfer_labels(a, a.copy(), label_key="domain"),
        [],
        None,
        "latent",
    ),
    (
        "tl.transfer_labels (query)",
        lambda a, m: histovi.tl.transfer_labels(_latent_adata(m), a, label_key="domain"),
        [r"obs/domain(_uncertainty)?", r"uns/histovi/transfer_labels/.*"],
        "obs/domain_uncertainty",
        "latent",
    ),
    (
        "metrics.per_sample_scores",
        lambda a, m: histovi.metrics.per_sample_scores(a, "domain", "domain"),
        [],
        None,
        "latent",
    ),
    (
        "metrics.spatial_coherence",
        lambda a, m: histovi.metrics.spatial_coherence(a, cluster_key="domain"),
        [],
        None,
        "latent",
    ),
    (
        "metrics.evaluate",
        lambda a, m: histovi.metrics.evaluate(
            a, label_key="domain", seeds=(0,), cluster_key="domain", integration=False
        ),
        [],
        None,
        "latent",
    ),
    (
        "pl.latent_umap",
        lambda a, m: histovi.pl.latent_umap(a, color=["sample"]),
        [],
        None,
        "latent",
    ),
    ("pl.domains", lambda a, m: histovi.pl.domains(a, color="domain"), [], None, "latent"),
    # every other public entry point (issue 30): read-only ones change nothing, inplace=False
    # and copy=True change nothing, output methods add only scvi-tools' registry keys
    (
        "pp.embed_morphology (copy=True)",
        lambda a, m: histovi.pp.embed_morphology(
            a, tile_size_um=64.0, target_mpp=2.0, progress=False, copy=True
        ),
        [],
        None,
        "fresh",
    ),
    (
        "tl.domains (inplace=False)",
        lambda a, m: histovi.tl.domains(a, n_domains=3, inplace=False),
        [],
        None,
        "latent",
    ),
    (
        "tl.aggregate_neighbors (inplace=False)",
        lambda a, m: histovi.tl.aggregate_neighbors(a, "X_histovi", n_hops=1, inplace=False),
        [],
        None,
        "latent",
    ),
    (
        "tl.anchor_sections (inplace=False)",
        lambda a, m: histovi.tl.anchor_sections(a, inplace=False),
        [],
        None,
        "latent",
    ),
    (
        "tl.transfer_labels (inplace=False)",
        lambda a, m: histovi.tl.transfer_labels(
            _latent_adata(m), a, label_key="domain", inplace=False
        ),
        [],
        None,
        "latent",
    ),
    (
        "tl.cluster_embedding",
        lambda a, m: histovi.tl.cluster_embedding(a.obsm["X_histovi"], 3),
        [],
        None,
        "latent",
    ),
    (
        "tl.smooth_labels",
        lambda a, m: histovi.tl.smooth_labels(
            a.obs["domain"].cat.codes.to_numpy().astype(np.int64), a.obsm["spatial_neighbors"], 2
        ),
        [],
        None,
        "latent",
    ),
    (
        "metrics.cluster_and_score",
        lambda a, m: histovi.metrics.cluster_and_score(
            a.obsm["X_histovi"], a.obs["domain"], a.obs["sample"], methods=("kmeans",), seeds=(0,)
        ),
        [],
        None,
        "latent",
    ),
    (
        "metrics.n_label_classes",
        lambda a, m: histovi.metrics.n_label_classes(a.obs["domain"]),
        [],
        None,
        "latent",
    ),
    (
        "metrics.integration_scores",
        lambda a, m: histovi.metrics.integration_scores(a, label_key="domain", n_neighbors=10),
        [],
        None,
        "latent",
    ),
    (
        "metrics.label_probe",
        lambda a, m: histovi.metrics.label_probe(a, "X_histovi", label_key="domain"),
        [],
        None,
        "latent",
    ),
    (
        "metrics.cluster_composition",
        lambda a, m: histovi.metrics.cluster_composition(a, "domain", label_key="domain"),
        [],
        None,
        "latent",
    ),
    (
        "get_normalized_expression",
        lambda a, m: m.get_normalized_expression(a, indices=[0, 1, 2]),
        SCVI_KEYS,
        None,
        "fresh",
    ),
    (
        "get_latent_representation (own)",
        lambda a, m: m.get_latent_representation(a, spatial=False),
        SCVI_KEYS,
        None,
        "fresh",
    ),
    ("prepare_query_anndata (folder)", None, [], None, "query"),
    ("load_query_data (folder)", None, SCVI_KEYS, "obs/_scvi_batch", "query"),
]


@pytest.mark.parametrize(
    ("call", "allowed", "must_change", "data"),
    [c[1:] for c in MODIFIES],
    ids=[c[0] for c in MODIFIES],
)
def test_inputs_change_only_in_documented_keys(
    request, tmp_path, tiny_adata, tiny_trained, call, allowed, must_change, data
):
    import re

    import matplotlib.pyplot as plt

    name = request.node.callspec.id
    if data == "latent":
        adata = _latent_adata(tiny_trained)
    elif data == "query":
        adata = _query_pair(tiny_trained)
    else:
        adata = tiny_adata
    if name.startswith("pp.embed_morphology"):
        _with_images(adata)
    before = snapshot(adata)
    if name == "HistoVI.load":
        tiny_trained.save(tmp_path / "m")
        HistoVI.load(tmp_path / "m", adata=adata)
    elif name == "prepare_query_anndata":
        HistoVI.prepare_query_anndata(adata, tiny_trained)
    elif name == "load_query_data":
        HistoVI.load_query_data(adata, tiny_trained)
    elif name.endswith("(folder)"):
        tiny_trained.save(tmp_path / "m")
        if name.startswith("prepare"):
            HistoVI.prepare_query_anndata(adata, str(tmp_path / "m"))
        else:
            HistoVI.load_query_data(adata, str(tmp_path / "m"))
    else:
        call(adata, tiny_trained)
    plt.close("all")
    changed = changed_keys(before, snapshot(adata))
    unexpected = {k for k in changed if not any(re.fullmatch(p, k) for p in allowed)}
    assert not unexpected, f"{name} changed {sorted(unexpected)}"
    if must_change is not None:
        assert must_change in changed


def test_io_and_cli_leave_their_input_files_alone(tmp_path, tiny_adata):
    from histovi import cli

    sdata = histovi.io.to_spatialdata(_with_images(tiny_adata.copy()))
    table_before = snapshot(sdata.tables["table"])
    histovi.io.from_spatialdata(sdata)
    assert not changed_keys(table_before, snapshot(sdata.tables["table"]))
    path = tmp_path / "study.h5ad"
    tiny_adata.write_h5ad(path)
    data = path.read_bytes()
    argv = ["run", "--input", str(path), "--out", str(tmp_path / "out"), "--encoder", "none"]
    assert (
        cli.main([*argv, "--max-epochs", "1", "--label-key", "none", "--n-domains", "2", "--quiet"])
        == 0
    )
    assert path.read_bytes() == data
    histovi.io.read_folder(tmp_path, h5ad="study.h5ad")
    assert path.read_bytes() == data
