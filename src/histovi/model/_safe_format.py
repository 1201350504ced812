"""Model and checkpoint files that cannot run code when they are read.

A file written by ``torch.save`` is a Python pickle: read with ``torch.load(weights_only=False)``
(what scvi-tools does), a crafted one runs any code it likes on the reader's machine. histovi's
files are written so that ``torch.load(weights_only=True)`` reads them with no extra allowed
type: every value is a tensor, a number, a string, ``None``, or a list, tuple or dict of those.
The few other types a saved model holds (numpy arrays, the pandas tables of the training
history, scvi-tools' ``defaultdict`` registry) are written as tagged plain values
(:func:`encode`) and rebuilt after the safe read (:func:`decode`).

Models saved by histovi before this format are refused with their version and the fix
(:func:`legacy_summary` reads the version without running anything in the file); a user who
trusts such a file converts it once with :func:`histovi.model.convert_saved_model`.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np

#: key of the format marker in histovi's model files
FORMAT_KEY = "histovi_format"
FORMAT_VERSION = 1
#: key of the type tag of an encoded value (a dict with this key is never user data)
TAG = "__histovi_type__"

#: numpy dtypes written as a tensor (exact bytes); other numeric dtypes go as lists
_TENSOR_DTYPES = {
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
}
_KEY_TYPES = (str, int, float, bool, type(None))


class UnsafeFileError(ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses: it holds Python objects whose
    loading would run code named in the file."""


def encode(value: Any, where: str = "value") -> Any:
    """``value`` as plain values and tensors only (readable with ``weights_only=True``).

    ``TypeError`` naming ``where`` for a value of any other type: it would need a pickle to
    be written, and a pickle to be read."""
    import pandas as pd
    import torch

    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, str):  # str subclasses: numpy strings, torch's TorchVersion
        return str(value)
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where} is a {type(value).__name__}, not a plain tensor")
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return _encode_array(value, where)
    if isinstance(value, pd.DataFrame):
        return {
            TAG: "DataFrame",
            "columns": encode(value.columns, f"{where}.columns"),
            "index": encode(value.index, f"{where}.index"),
            "data": [
                _encode_array(value.iloc[:, i].to_numpy(), f"{where}[{i}]")
                for i in range(value.shape[1])
            ],
            "dtypes": [str(dt) for dt in value.dtypes],
        }
    if isinstance(value, pd.Series):
        return {
            TAG: "Series",
            "index": encode(value.index, f"{where}.index"),
            "data": _encode_array(value.to_numpy(), where),
            "dtype": str(value.dtype),
            "name": encode(value.name, f"{where}.name"),
        }
    if isinstance(value, pd.RangeIndex):
        return {
            TAG: "RangeIndex",
            "start": int(value.start),
            "stop": int(value.stop),
            "step": int(value.step),
            "name": encode(value.name, f"{where}.name"),
        }
    if isinstance(value, pd.MultiIndex):
        raise TypeError(f"{where} is a pandas MultiIndex")
    if isinstance(value, pd.Index):
        return {
            TAG: "Index",
            "data": _encode_array(value.to_numpy(), where),
            "dtype": str(value.dtype),
            "name": encode(value.name, f"{where}.name"),
        }
    if isinstance(value, slice):
        return {
            TAG: "slice",
            "args": [encode(v, where) for v in (value.start, value.stop, value.step)],
        }
    if isinstance(value, set | frozenset):
        return {
            TAG: type(value).__name__,
            "items": [encode(v, f"{where} item") for v in value],
        }
    if isinstance(value, defaultdict):
        factory = value.default_factory
        if factory not in (dict, list, None):
            raise TypeError(f"{where} is a defaultdict of {factory!r}")
        return {
            TAG: "defaultdict",
            "factory": None if factory is None else factory.__name__,
            "items": _encode_dict(value, where),
        }
    if isinstance(value, dict) and type(value) in (dict, OrderedDict):
        return _encode_dict(value, where)
    if type(value) is list:
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value) is tuple:
        return tuple(encode(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which histovi "
        "cannot write without a pickle"
    )


def _encode_dict(value: dict, where: str) -> dict:
    if TAG in value:
        raise TypeError(f"{where} has the reserved key {TAG!r}")
    out = {}
    for key, item in value.items():
        if isinstance(key, np.generic):
            key = key.item()
        if not isinstance(key, _KEY_TYPES) and not (
            type(key) is tuple and all(isinstance(k, _KEY_TYPES) for k in key)
        ):
            raise TypeError(f"{where} has a key of type {type(key).__name__}")
        if isinstance(key, str):
            key = str(key)
        out[key] = encode(item, f"{where}/{key}")
    return out


def _encode_array(arr: np.ndarray, where: str) -> dict:
    import torch

    arr = np.asarray(arr)
    name = arr.dtype.name
    if name in _TENSOR_DTYPES:
        data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))
        return {TAG: "ndarray", "dtype": name, "tensor": torch.from_numpy(data.copy())}
    if arr.dtype.kind in "iuf":  # e.g. uint32, float128: exact as Python numbers
        return {
            TAG: "ndarray",
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "items": [encode(v, where) for v in arr.ravel().tolist()],
        }
    if arr.dtype.kind in "OU":
        items = [encode(v, f"{where} item") for v in arr.ravel().tolist()]
        return {
            TAG: "ndarray",
            "dtype": "object" if arr.dtype.kind == "O" else arr.dtype.str,
            "shape": list(arr.shape),
            "items": items,
        }
    raise TypeError(f"{where} is a numpy array of dtype {arr.dtype}")


def decode(value: Any) -> Any:
    """The values :func:`encode` was given, rebuilt from what ``weights_only=True`` read.

    ``ValueError`` for anything :func:`encode` does not write."""
    import torch

    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return value
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode(v) for v in value)
    if isinstance(value, dict):
        if TAG not in value:
            return {k: decode(v) for k, v in value.items()}
        return _decode_tagged(value)
    raise ValueError(f"unexpected value of type {type(value).__name__}")


def _decode_tagged(value: dict) -> Any:
    import pandas as pd

    kind = value[TAG]
    if kind == "ndarray":
        return _decode_array(value)
    if kind == "DataFrame":
        columns = decode(value["columns"])
        data = [_decode_array(d) for d in value["data"]]
        frame = pd.DataFrame(
            dict(enumerate(data)), index=decode(value["index"]), columns=range(len(data))
        )
        for i, dtype in enumerate(value["dtypes"]):
            frame[i] = _as_dtype(frame[i], dtype)
        frame.columns = columns
        return frame
    if kind == "Series":
        data = _decode_array(value["data"])
        series = pd.Series(data, index=decode(value["index"]), name=decode(value["name"]))
        return _as_dtype(series, value["dtype"])
    if kind == "RangeIndex":
        return pd.RangeIndex(
            int(value["start"]), int(value["stop"]), int(value["step"]), name=value["name"]
        )
    if kind == "Index":
        index = pd.Index(_decode_array(value["data"]), name=decode(value["name"]))
        return _as_dtype(index, value["dtype"])
    if kind == "slice":
        return slice(*[decode(v) for v in value["args"]])
    if kind in ("set", "frozenset"):
        items = [decode(v) for v in value["items"]]
        return set(items) if kind == "set" else frozenset(items)
    if kind == "defaultdict":
        factory = {"dict": dict, "list": list, None: None}[value["factory"]]
        return defaultdict(factory, decode(value["items"]))
    raise ValueError(f"unknown tagged value {kind!r}")


def _decode_array(value: dict) -> np.ndarray:
    import torch

    if not isinstance(value, dict) or value.get(TAG) != "ndarray":
        raise ValueError("expected an encoded array")
    if "tensor" in value:
        tensor = value["tensor"]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError("expected a tensor")
        arr = tensor.numpy()
        if arr.dtype.name != value["dtype"]:
            raise ValueError(f"array dtype {arr.dtype.name} is not {value['dtype']}")
        return arr
    dtype = np.dtype(value["dtype"])
    if dtype.kind not in "iufOU":
        raise ValueError(f"unexpected array dtype {dtype}")
    items = [decode(v) for v in value["items"]]
    if dtype.kind == "O":
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
    else:
        arr = np.asarray(items, dtype=dtype)
    return arr.reshape([int(s) for s in value["shape"]])


def _as_dtype(obj, dtype: str):
    """``obj.astype(dtype)`` for the dtypes pandas names itself; as it is otherwise."""
    import pandas as pd

    if str(obj.dtype) == dtype:
        return obj
    try:
        return obj.astype(pd.api.types.pandas_dtype(dtype))
    except (TypeError, ValueError):
        return obj


# ---------------------------------------------------------------------------- reading
def safe_torch_load(path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` of a regular file (no allowed extra type).

    :class:`UnsafeFileError` when the file holds objects that only a full unpickler (which
    runs code named in the file) could build; ``ValueError`` when it is not a torch file or is
    cut short."""
    import torch

    from .._files import open_regular

    with open_regular(path, what) as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights only" in str(err).lower() or "weights_only" in str(err):
                raise UnsafeFileError(_unsafe_detail(err)) from None
            raise


def _unsafe_detail(err: BaseException) -> str:
    """The globals a refused file names (torch's message says which), without the advice to
    load it unsafely that torch's message gives."""
    import re

    text = str(err)
    found = re.findall(r"GLOBAL ([\w.]+)", text) or re.findall(r"global ([\w.]+)", text)
    return ", ".join(dict.fromkeys(found)) or "objects outside tensors and plain values"


class _Stub:
    """Stands for every class or function a pickle names: builds nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Inspector(pickle.Unpickler):
    """An unpickler that resolves every global to :class:`_Stub` (the restriction of the
    Python documentation's "Restricting Globals", taken to the end): the dicts, lists and
    strings of the file come out as they are, every other object as a stub."""

    def find_class(self, module, name):
        return _Stub

    def persistent_load(self, pid):
        return None


#: the most bytes of a pickle :func:`legacy_summary` reads
_MAX_PICKLE_BYTES = 512 * 1024 * 1024


def legacy_summary(path) -> dict[str, str]:
    """What an old-format (full pickle) model file says about itself, read without running
    anything in it: ``model_name`` (scvi-tools' registry), ``scvi_version``, and the
    ``histovi`` / ``scvi-tools`` / ``torch`` versions histovi recorded, as far as present."""
    from .._files import open_regular

    try:
        with open_regular(path, "model file") as f:
            with zipfile.ZipFile(f) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                if not names or z.getinfo(names[0]).file_size > _MAX_PICKLE_BYTES:
                    return {}
                data = z.read(names[0])
        obj = _Inspector(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - a summary for a message; unreadable means unknown
        return {}
    out: dict[str, str] = {}
    attrs = obj.get("attr_dict") if isinstance(obj, dict) else None
    if not isinstance(attrs, dict):
        return out
    registry = attrs.get("registry_")
    if isinstance(registry, dict):
        for key in ("model_name", "scvi_version"):
            if isinstance(registry.get(key), str):
                out[key] = registry[key]
    versions = attrs.get("histovi_versions_")
    if isinstance(versions, dict):
        for key in ("histovi", "scvi-tools", "torch"):
            if isinstance(versions.get(key), str):
                out[key] = versions[key]
    out["histovi_setup"] = "yes" if isinstance(attrs.get("histovi_setup_"), dict) else "no"
    return out
