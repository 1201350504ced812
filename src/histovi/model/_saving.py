"""Saving that a crash cannot half-do, and loading that cannot run code and says what does not
match.

:func:`atomic_save` writes the model into a temporary folder beside the target, flushes every
file to disk and only then renames them into the target folder (the model file last), so a crash
while saving leaves the previously saved model complete and loadable.

:func:`write_model` writes ``model.pt`` in histovi's safe format (:mod:`._safe_format`): tensors
and plain values only, so that :func:`read_saved_model` reads it with
``torch.load(weights_only=True)`` and no allowed extra type. A crafted file (one that would run
code when unpickled) is refused and nothing in it is run; a model saved by an earlier histovi in
scvi-tools' pickle format is refused with its version and the fix
(:func:`convert_saved_model`, for files one trusts).

:func:`read_saved_model` turns every way a folder can be wrong into one error that names the file
and the fix: folder or file missing, not a regular file, cut short or corrupted, unsafe, a model
of another class, weights that do not fit this version of histovi. :func:`check_load_adata`
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

from .._files import check_regular_file, fsync_dir, fsync_file
from ._safe_format import (
    FORMAT_KEY,
    FORMAT_VERSION,
    UnsafeFileError,
    decode,
    encode,
    legacy_summary,
    safe_torch_load,
)

MODEL_FILE = "model.pt"
#: attribute saved with every model (scvi-tools saves attributes whose name ends in ``_``)
VERSIONS_ATTR = "histovi_versions_"


def current_versions() -> dict[str, str]:
    import scvi
    import torch

    from .. import __version__

    return {"histovi": __version__, "scvi-tools": scvi.__version__, "torch": torch.__version__}


def atomic_save(save: Callable[..., None], dir_path, prefix: str | None, overwrite: bool, **kwargs):
    """Run ``save`` (e.g. :func:`write_model`) into a temporary folder, then move its files
    into ``dir_path``."""
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
                fsync_file(f)
        target.mkdir(exist_ok=True)
        for f in files:
            dest = target / f.name
            if dest.is_dir() and not dest.is_symlink():
                # a folder of that name was not written by save(): never delete it
                raise ValueError(
                    f"{dest} is a folder, where the model's file {f.name} goes: move it away or "
                    "save into another folder."
                )
            os.replace(f, dest)
        fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_saved_model(dir_path, prefix: str | None = None, expected_class: str = "HistoVI"):
    """The content of a saved model's file, read without running anything in it and checked;
    a clear error for every way it is bad."""
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
    if not path.exists() and not path.is_symlink():
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        raise FileNotFoundError(
            f"{folder} holds no {path.name} (files: {found or 'none'}): it is not a saved model, "
            "or the save into it never completed; pass prefix= if the model was saved with one."
        )
    check_regular_file(path, "model file")
    try:
        raw = safe_torch_load(path, "model file")
    except UnsafeFileError as err:
        raise _unsafe_model_error(path, str(err), expected_class) from None
    except Exception as err:
        raise ValueError(
            f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}): the file is "
            "corrupted or was cut short. Restore it from a backup or save the model again."
        ) from None
    if not isinstance(raw, dict) or raw.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a histovi model file (no {FORMAT_KEY} {FORMAT_VERSION} record): pass "
            "the folder given to HistoVI.save(...)."
        )
    try:
        saved = decode({k: v for k, v in raw.items() if k != FORMAT_KEY})
    except Exception as err:  # noqa: BLE001 - whatever a malformed file makes decode raise
        raise ValueError(
            f"{path} is not a histovi model file ({err}): pass the folder given to "
            "HistoVI.save(...)."
        ) from None
    state = saved.get("model_state_dict")
    if (
        not isinstance(saved.get("attr_dict"), dict)
        or not isinstance(state, dict)
        or not all(isinstance(v, torch.Tensor) for k, v in state.items() if k != "pyro_param_store")
    ):
        raise ValueError(
            f"{path} is not a model saved by HistoVI.save(): it lacks the model state or "
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


def _unsafe_model_error(path: Path, detail: str, expected_class: str) -> ValueError:
    """The error for a model file that only a full unpickler could read: an old histovi model
    (named with its version and the fix), a model of another package, or a crafted file."""
    from .. import __version__

    info = legacy_summary(path)
    name = info.get("model_name")
    convert = (
        "If you trust whoever gave you this model, convert it once: "
        f"histovi.model.convert_saved_model({str(path.parent)!r}, '<new folder>', "
        "trust_pickle=True), then load the new folder; otherwise ask its author to save it again "
        f"with histovi {__version__} or later."
    )
    if name == expected_class or info.get("histovi_setup") == "yes":
        version = info.get("histovi", "before 0.1.0 (no version recorded)")
        return ValueError(
            f"{path} was saved by histovi {version} (scvi-tools {info.get('scvi-tools', info.get('scvi_version', '?'))}) "
            "in scvi-tools' pickle format, which can run code when it is loaded: histovi "
            f"{__version__} does not open it. {convert}"
        )
    if name is not None:
        return ValueError(
            f"{path} holds a {name} model (scvi-tools {info.get('scvi_version', '?')}), not a "
            f"{expected_class}, in a pickle format that can run code when it is loaded: histovi "
            "does not open it. Load it with its own package only if you trust where it comes from."
        )
    return ValueError(
        f"{path} is not a histovi model: it holds Python objects ({detail[:200]}) that would run "
        "code when loaded, so it was not opened. Pass the folder given to HistoVI.save(...); "
        "never load such a file from a source you do not trust."
    )


def write_model(
    model,
    dir_path,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
    legacy_mudata_format: bool = False,
    datamodule=None,
    **anndata_write_kwargs,
) -> None:
    """Write ``model`` into ``dir_path`` as scvi-tools' ``save`` lays it out (``model.pt``, and
    ``adata.h5ad`` / ``mdata.h5mu`` with ``save_anndata``), with ``model.pt`` in histovi's safe
    format: tensors and plain values only."""
    import torch
    from mudata import MuData

    if datamodule is not None:
        raise ValueError("HistoVI.save does not take a datamodule: the model has its AnnData.")
    folder = Path(dir_path)
    folder.mkdir(parents=True, exist_ok=overwrite)
    name = prefix or ""
    state = dict(model.module.state_dict())
    # scvi-tools writes the (empty, for HistoVI) pyro parameter store with every model
    state["pyro_param_store"] = {"params": {}, "constraints": {}}
    attrs = {k: v for k, v in model._get_user_attributes() if k[-1] == "_"}
    try:
        payload = {
            "model_state_dict": encode(state, "model state"),
            "var_names": encode(
                model.get_var_names(legacy_mudata_format=legacy_mudata_format), "var_names"
            ),
            "attr_dict": {k: encode(v, f"model.{k}") for k, v in attrs.items()},
        }
    except TypeError as err:
        raise TypeError(
            f"Cannot save the model: {err}. histovi saves tensors, numbers, strings, numpy "
            "arrays and pandas tables only, so that loading a model never runs code; store "
            "other objects elsewhere (or drop the trailing '_' of the attribute's name)."
        ) from None
    payload[FORMAT_KEY] = FORMAT_VERSION
    torch.save(payload, folder / f"{name}{MODEL_FILE}")
    if save_anndata:
        suffix = "mdata.h5mu" if isinstance(model.adata, MuData) else "adata.h5ad"
        from scvi.model.base._base_model import _write_adata

        _write_adata(model.adata, str(folder / f"{name}{suffix}"), **anndata_write_kwargs)


def convert_saved_model(
    dir_path,
    output_dir_path,
    *,
    trust_pickle: bool = False,
    prefix: str | None = None,
    overwrite: bool = False,
) -> None:
    """Rewrite a HistoVI model saved by an earlier histovi (scvi-tools' pickle format) in
    histovi's safe format, into ``output_dir_path``.

    Reading the old file runs whatever code it names, like ``torch.load(weights_only=False)``:
    only convert files whose origin you trust, and say so with ``trust_pickle=True``. The old
    folder is left as it is; the AnnData saved with it (``adata.h5ad``) is copied.

    Parameters
    ----------
    dir_path
        Folder of the old saved model.
    output_dir_path
        New folder for the converted model (must not exist unless ``overwrite``).
    trust_pickle
        Must be ``True``: you vouch that the file comes from a source you trust.
    prefix
        File name prefix the model was saved with.
    overwrite
        Replace a model in ``output_dir_path``.
    """
    import shutil

    import torch

    if trust_pickle is not True:
        raise ValueError(
            "convert_saved_model reads the old file with a full unpickler, which runs any code "
            "the file names: pass trust_pickle=True only for a model whose origin you trust "
            "(e.g. one you saved yourself); otherwise ask its author to save it again with this "
            "histovi version."
        )
    folder = Path(dir_path).expanduser()
    name = prefix or ""
    path = check_regular_file(folder / f"{name}{MODEL_FILE}", "model file")
    try:
        safe = safe_torch_load(path, "model file")
        if isinstance(safe, dict) and safe.get(FORMAT_KEY) == FORMAT_VERSION:
            raise ValueError(f"{path} is already in histovi's safe format: load it as it is.")
    except UnsafeFileError:
        pass
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or "histovi_setup_" not in (saved.get("attr_dict") or {}):
        raise ValueError(f"{path} is not a HistoVI model saved by histovi: nothing converted.")
    target = Path(output_dir_path).expanduser()
    if target.resolve() == folder.resolve():
        raise ValueError(
            "output_dir_path is the old model's folder: write the converted model into a new "
            "folder (the old one is never changed)."
        )
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists: pass overwrite=True or another folder.")

    def save(tmp, prefix=None, overwrite=True, **_):
        tmp = Path(tmp)
        state = dict(saved["model_state_dict"])
        state.setdefault("pyro_param_store", {"params": {}, "constraints": {}})
        payload = {
            "model_state_dict": encode(state, "model state"),
            "var_names": encode(saved["var_names"], "var_names"),
            "attr_dict": {k: encode(v, f"model.{k}") for k, v in saved["attr_dict"].items()},
            FORMAT_KEY: FORMAT_VERSION,
        }
        torch.save(payload, tmp / f"{name}{MODEL_FILE}")
        for other in ("adata.h5ad", "mdata.h5mu"):
            src = folder / f"{name}{other}"
            if src.is_file():
                shutil.copyfile(src, tmp / f"{name}{other}")

    atomic_save(save, target, prefix, overwrite)


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


def save_model(model, dir_path, prefix, overwrite: bool, save_anndata: bool, /, **kwargs) -> None:
    """The body of :meth:`HistoVI.save` (see there): the versions, then :func:`write_model`
    through :func:`atomic_save`."""
    setattr(model, VERSIONS_ATTR, current_versions())
    # histovi's safe format (tensors and plain values), not scvi-tools' pickle
    atomic_save(
        lambda path, **kw: write_model(model, path, **kw),
        dir_path,
        prefix,
        overwrite,
        save_anndata=save_anndata,
        **kwargs,
    )


def load_checked(cls, dir_path, adata=None, /, **kwargs):
    """The body of :meth:`HistoVI.load` (see there): the folder read and checked, then
    :func:`load_model`."""
    saved = read_saved_model(dir_path, kwargs.get("prefix"))
    check_load_adata(adata, saved, dir_path)
    warn_if_other_version(saved, dir_path)
    try:
        model = load_model(cls, dir_path, adata=adata, saved=saved, **kwargs)
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        detail = " ".join(str(err).split())[:400]
        raise ValueError(
            f"The weights saved in {dir_path} do not fit this version's HistoVI"
            f"{version_note(saved)}: {detail}. Load it with the histovi version that saved "
            "it."
        ) from err
    return model


def warn_if_other_version(saved: dict, path) -> None:
    old = saved["attr_dict"].get(VERSIONS_ATTR) or {}
    now = current_versions()
    if old and str(old.get("histovi")) != now["histovi"]:
        warnings.warn(
            f"{path} was saved with histovi {old.get('histovi')}; this is histovi "
            f"{now['histovi']}: it loads, but its latent may differ slightly from the one the "
            "saving version gave. Install the saving version to reproduce it exactly.",
            UserWarning,
            stacklevel=4,  # the caller of HistoVI.load (through load_checked)
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


# ---------------------------------------------------------------------------- loading
def load_model(
    cls,
    dir_path,
    adata=None,
    accelerator: str = "auto",
    device: int | str = "auto",
    prefix: str | None = None,
    backup_url: str | None = None,
    datamodule=None,
    allowed_classes_names_list: list[str] | None = None,
    saved: dict | None = None,
):
    """scvi-tools' ``BaseModelClass.load`` for HistoVI, on the content of a saved folder read
    with :func:`read_saved_model` (scvi-tools' own ``load`` unpickles the file with
    ``weights_only=False``, which runs any code a crafted file names)."""
    import copy

    from scvi.data._constants import _SETUP_ARGS_KEY, _SETUP_METHOD_NAME
    from scvi.model._utils import parse_device_args
    from scvi.model.base._save_load import _initialize_model, _validate_var_names

    if backup_url is not None:
        raise ValueError(
            "HistoVI.load does not download models (backup_url=): download the folder yourself "
            "and pass it."
        )
    if datamodule is not None:
        raise ValueError("HistoVI.load does not take a datamodule: pass the AnnData.")
    _, _, torch_device = parse_device_args(
        accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
    )
    folder = Path(dir_path).expanduser()
    if saved is None:
        saved = read_saved_model(folder, prefix, expected_class=cls.__name__)
    attr_dict = copy.deepcopy(saved["attr_dict"])
    var_names = saved["var_names"]
    state = dict(saved["model_state_dict"])
    pyro_param_store = state.pop("pyro_param_store", None)
    registry = attr_dict.pop("registry_")
    name = registry.get("model_name")
    if name is not None and name != cls.__name__ and name not in (allowed_classes_names_list or []):
        raise ValueError("It appears you are loading a model from a different class.")
    if adata is None:
        adata = _read_saved_adata(folder, prefix or "", registry)
    if adata:
        if _SETUP_ARGS_KEY not in registry:
            raise ValueError(
                f"{folder} holds no setup arguments of the model: save it again with HistoVI.save."
            )
        _validate_var_names(adata, var_names)
        method_name = registry.get(_SETUP_METHOD_NAME, "setup_anndata")
        if method_name not in ("setup_anndata", "setup_mudata"):
            raise ValueError(f"{folder}: a model set up with {method_name} cannot be loaded.")
        getattr(cls, method_name)(adata, source_registry=registry, **registry[_SETUP_ARGS_KEY])
    model = _initialize_model(cls, adata, registry, attr_dict, None)
    model.module.on_load(model, pyro_param_store=pyro_param_store)
    model.module.load_state_dict(state)
    model.to_device(torch_device)
    model.module.eval()
    if adata:
        model._validate_anndata(adata)
    return model


def _read_saved_adata(folder: Path, prefix: str, registry: dict):
    """The AnnData (MuData) saved with the model (``save_anndata=True``), or ``False`` with
    scvi-tools' warning when there is none."""
    from scvi.data._constants import _SETUP_METHOD_NAME

    is_mudata = registry.get(_SETUP_METHOD_NAME) == "setup_mudata"
    path = folder / f"{prefix}{'mdata.h5mu' if is_mudata else 'adata.h5ad'}"
    if not path.exists():
        warnings.warn(
            "Save path contains no saved anndata and no adata was passed. Model will be loaded "
            "without anndata.",
            UserWarning,
            stacklevel=5,  # the caller of HistoVI.load (through load_checked, load_model)
        )
        return False
    check_regular_file(path, "saved AnnData")
    if is_mudata:
        import mudata

        return mudata.read(str(path))
    import anndata

    return anndata.read_h5ad(path)


class SavedReference:
    """A saved model, read safely, in the shape scvi-tools' query mapping reads a model object
    (``_get_user_attributes``, ``get_var_names``, ``module.state_dict``): scvi-tools reads a
    folder given by name with ``torch.load(weights_only=False)``, a model object without any
    file."""

    def __init__(self, saved: dict):
        import copy

        self._attrs = copy.deepcopy(saved["attr_dict"])
        self._var_names = copy.deepcopy(saved["var_names"])
        state = {k: v for k, v in saved["model_state_dict"].items() if k != "pyro_param_store"}
        self.module = _StateHolder(state)

    def _get_user_attributes(self):
        import copy

        return list(copy.deepcopy(self._attrs).items())

    def get_var_names(self, legacy_mudata_format: bool = False):
        return self._var_names


class _StateHolder:
    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return dict(self._state)


def load_registry(dir_path, prefix: str | None = None) -> dict:
    """The registry of a saved HistoVI (scvi-tools' ``load_registry``, read safely)."""
    return read_saved_model(dir_path, prefix)["attr_dict"]["registry_"]


class SafeLoadingMixin:
    """scvi-tools' readers of a saved folder unpickle its file (``weights_only=False``): these
    read it without running code."""

    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict:
        """The registry saved with a HistoVI model, read without running code."""
        return load_registry(dir_path, prefix)

    @staticmethod
    def view_setup_args(dir_path: str, prefix: str | None = None) -> None:
        """Print the setup arguments of a saved HistoVI model (read without running code)."""
        from scvi.data import AnnDataManager

        AnnDataManager.view_setup_method_args(load_registry(dir_path, prefix))

    @staticmethod
    def prepare_query_mudata(mdata, reference_model, **kwargs):
        """scvi-tools' ``prepare_query_mudata``; a saved folder is read without running code."""
        from scvi.model.base import ArchesMixin

        if isinstance(reference_model, str | os.PathLike):
            reference_model = SavedReference(read_saved_model(reference_model))
        return ArchesMixin.prepare_query_mudata(mdata, reference_model, **kwargs)

    @classmethod
    def convert_legacy_save(cls, *args, **kwargs):
        """Not for HistoVI: its models were never saved in scvi-tools' format before 0.15 (see
        :func:`histovi.model.convert_saved_model` for models of earlier histovi releases)."""
        raise NotImplementedError(
            "HistoVI.convert_legacy_save converts scvi-tools < 0.15 files, which no HistoVI was "
            "saved as. For a model saved by an earlier histovi, use "
            "histovi.model.convert_saved_model(old_dir, new_dir, trust_pickle=True) on files "
            "you trust."
        )
