"""Saving that a crash cannot half-do, and loading that says what does not match.

:func:`atomic_save` lets scvi-tools write the model into a temporary folder beside the target,
flushes every file to disk and only then renames them into the target folder (the model file
last), so a crash while saving leaves the previously saved model complete and loadable.

:func:`read_saved_model` opens a saved model folder and turns every way it can be wrong into one
error that names the file and the fix: folder or file missing, file cut short or corrupted, a
model of another class, weights that do not fit this version of histovi. :func:`check_load_adata`
compares the genes of the AnnData given to ``load`` with the model's (scvi-tools only warns).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._files import fsync_dir

MODEL_FILE = "model.pt"
#: attribute saved with every model (scvi-tools saves attributes whose name ends in ``_``)
VERSIONS_ATTR = "histovi_versions_"


def current_versions() -> dict[str, str]:
    import scvi
    import torch

    from .. import __version__

    return {"histovi": __version__, "scvi-tools": scvi.__version__, "torch": torch.__version__}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_save(save: Callable[..., None], dir_path, prefix: str | None, overwrite: bool, **kwargs):
    """Run scvi-tools' ``save`` into a temporary folder, then move its files into ``dir_path``."""
    target = Path(dir_path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file: pass a folder to save the model into.")
    if target.exists() and not overwrite:
        raise ValueError(
            f"{target} already exists: pass overwrite=True to replace the model saved there, or "
            "save into another folder."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    model_file = f"{prefix or ''}{MODEL_FILE}"
    try:
        save(str(tmp), prefix=prefix, overwrite=True, **kwargs)
        # the model file last: until it is replaced, the folder holds the previous model
        files = sorted(tmp.iterdir(), key=lambda p: (p.name == model_file, p.name))
        for f in files:
            if f.is_file():
                _fsync_file(f)
        target.mkdir(exist_ok=True)
        for f in files:
            dest = target / f.name
            if dest.is_dir() and not f.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_saved_model(dir_path, prefix: str | None = None, expected_class: str = "HistoVI"):
    """The content of a saved model's file, checked; a clear error for every way it is bad."""
    import torch

    folder = Path(dir_path).expanduser()
    path = folder / f"{prefix or ''}{MODEL_FILE}"
    if not folder.exists():
        raise FileNotFoundError(
            f"No saved model at {folder}: the folder does not exist. Pass the folder given to "
            "model.save(...)."
        )
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file: pass the folder given to model.save(...).")
    if not path.exists():
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        raise FileNotFoundError(
            f"{folder} holds no {path.name} (files: {found or 'none'}): it is not a saved model, "
            "or the save into it never completed; pass prefix= if the model was saved with one."
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(
            f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}): the file is "
            "corrupted or was cut short. Restore it from a backup or save the model again."
        ) from err
    if not isinstance(saved, dict) or not {"model_state_dict", "attr_dict"} <= set(saved):
        raise ValueError(
            f"{path} is not a model saved by scvi-tools' save(): it lacks the model state or "
            "attributes. Pass the folder given to model.save(...)."
        )
    attrs = saved["attr_dict"]
    registry = attrs.get("registry_", {}) or {}
    name = registry.get("model_name")
    if name is not None and name != expected_class:
        raise ValueError(
            f"{path} holds a {name} model (scvi-tools {registry.get('scvi_version', '?')}), not a "
            f"{expected_class}: load it with its own class, e.g. scvi.model.{name}.load(...)."
        )
    if "histovi_setup_" not in attrs:
        raise ValueError(
            f"{path} was not saved by histovi (no histovi_setup_ record): load it with the "
            "package that saved it."
        )
    return saved


def version_note(saved: dict) -> str:
    """' (saved with histovi A, scvi-tools B, torch C; now ...)' when they differ, else ''."""
    old = saved["attr_dict"].get(VERSIONS_ATTR) or {}
    now = current_versions()
    if not old:
        return f" (saved by a histovi release that did not record versions; now histovi {now['histovi']})"
    differ = [k for k in now if str(old.get(k)) != now[k]]
    if not differ:
        return ""
    return (
        " (saved with "
        + ", ".join(f"{k} {old.get(k)}" for k in differ)
        + "; now "
        + ", ".join(f"{k} {now[k]}" for k in differ)
        + ")"
    )


def warn_if_other_version(saved: dict, path) -> None:
    old = saved["attr_dict"].get(VERSIONS_ATTR) or {}
    now = current_versions()
    if old and str(old.get("histovi")) != now["histovi"]:
        warnings.warn(
            f"{path} was saved with histovi {old.get('histovi')}; this is histovi "
            f"{now['histovi']}: it loads, but its latent may differ slightly from the one the "
            "saving version gave. Install the saving version to reproduce it exactly.",
            UserWarning,
            stacklevel=3,
        )


def check_state_dict(saved: dict, module, path) -> None:
    """The saved weights must fit this version's model; name what is missing or extra."""
    saved_state = saved["model_state_dict"]
    ours = module.state_dict()
    skip = {"pyro_param_store"}
    missing = sorted(k for k in ours if k not in saved_state)
    extra = sorted(k for k in saved_state if k not in ours and k not in skip)
    shapes = sorted(
        f"{k} {tuple(saved_state[k].shape)} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if k in saved_state and hasattr(saved_state[k], "shape") and saved_state[k].shape != v.shape
    )
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if extra:
            parts.append(f"unexpected {_few(extra)}")
        if shapes:
            parts.append(f"other shapes {_few(shapes)}")
        raise ValueError(
            f"The weights in {path} do not fit this version's HistoVI{version_note(saved)}: "
            f"{'; '.join(parts)}. Load it with the histovi version that saved it."
        )


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_load_adata(adata: Any, saved: dict, path) -> None:
    """The genes of ``adata`` must be the model's, in the same order (scvi-tools only warns)."""
    from .._validation import check_var_names

    if adata is None or adata is False:
        return
    var_names = saved.get("var_names")
    if var_names is None or isinstance(var_names, dict) or hasattr(adata, "mod"):
        return  # MuData: checked per modality by scvi-tools
    check_var_names(
        adata,
        var_names,
        "the model's",
        f"(model saved in {path}) Subset and order adata like the model "
        "(adata[:, model_genes]), or map it as a query with "
        "HistoVI.prepare_query_anndata(adata, model_dir), which does both.",
    )
