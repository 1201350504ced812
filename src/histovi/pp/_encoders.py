"""Tile encoders for :func:`histovi.pp.embed_morphology`.

Two families share one small interface (``preprocess`` runs per tile in DataLoader workers,
``embed`` runs per batch in the main process, on the device):

- :class:`StainTextureEncoder` (``"stain-texture"``): hand-made H&E features that need no weights;
- :class:`TorchEncoder`: any timm model (by name, ``hf-hub:`` id, local weights file) or a user
  :class:`torch.nn.Module`, returning pooled features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ._stain import tissue_mask

logger = logging.getLogger(__name__)

__all__ = ["StainTextureEncoder", "TorchEncoder", "resolve_encoder", "sha256_file"]

STAIN_TEXTURE = "stain-texture"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    from .._files import open_regular

    h = hashlib.sha256()
    with open_regular(path, "file") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_state_dict(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and raw bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# stain-texture
# --------------------------------------------------------------------------------------------
_SCALES_UM = (1.0, 2.0, 4.0)
#: Haematoxylin level (rgb2hed units) below which smoothed pixels never count as nuclei, so that
#: tiles without nuclei do not get blobs from an Otsu split of noise.
_H_FLOOR = 0.04
#: Blobs smaller than this (µm²) are noise, not nuclei.
_MIN_BLOB_UM2 = 8.0


def _stain_texture_names() -> list[str]:
    names = []
    for ch in ("H", "E"):
        names += [f"{ch}_{s}" for s in ("mean", "std", "q10", "q50", "q90")]
    names += ["R_mean", "G_mean", "B_mean", "chroma_mean", "tissue_fraction"]
    for ch in ("H", "gray"):
        for s in _SCALES_UM:
            names += [f"{ch}_grad_{s:g}um", f"{ch}_log_{s:g}um", f"{ch}_locstd_{s:g}um"]
    names += [
        "blob_density_log1p_per_mm2",
        "blob_mean_area_um2",
        "blob_std_area_um2",
        "blob_area_fraction",
    ]
    return names


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    return x[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _texture_stats(x: np.ndarray, sigma: float) -> list[float]:
    """Scale-normalised gradient magnitude, |Laplacian of Gaussian| and local std at ``sigma`` px.

    Coarse scales are computed on a block-averaged copy (sigma kept >= 1.5 px): the statistics
    are scale-normalised, so they barely change, and the filters get much cheaper.
    """
    f = max(int(sigma // 1.5), 1)
    if f > 1 and min(x.shape) // f >= 8:
        x, sigma = _block_mean(x, f), sigma / f
    g = ndimage.gaussian_filter(x, sigma, truncate=3.0)
    gy, gx = np.gradient(g)
    lap = ndimage.laplace(g)
    m1 = ndimage.gaussian_filter(x, 2 * sigma, truncate=3.0)
    m2 = ndimage.gaussian_filter(x * x, 2 * sigma, truncate=3.0)
    return [
        float(np.hypot(gx, gy).mean() * sigma),
        float(np.abs(lap).mean() * sigma * sigma),
        float(np.sqrt(np.maximum(m2 - m1 * m1, 0)).mean()),
    ]


def stain_texture_features(tile: np.ndarray, mpp: float) -> np.ndarray:
    """Fixed-width H&E feature vector of one RGB uint8 tile sampled at ``mpp`` µm per pixel.

    Colour deconvolution (``skimage.color.rgb2hed``) gives haematoxylin (nuclei) and eosin
    (cytoplasm, stroma). Features: intensity statistics of H and E on stained pixels, mean colour,
    stained fraction, texture of H and grey level at 1, 2 and 4 µm (gradient magnitude, scale-
    normalised Laplacian-of-Gaussian energy, local standard deviation), and nuclei-like blobs from
    thresholded H (density per mm², mean and spread of area in µm², area fraction). Scales are in
    µm, so features do not depend on the pixel size chosen for the tiles.
    """
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    rgb = np.ascontiguousarray(tile[..., :3])
    mask = tissue_mask(rgb)
    hed = rgb2hed(rgb)
    h = hed[..., 0].astype(np.float32)
    e = hed[..., 1].astype(np.float32)
    gray = rgb.mean(axis=-1, dtype=np.float32) / 255.0
    sel = mask if mask.sum() >= 16 else np.ones_like(mask)
    f: list[float] = []
    for ch in (h, e):
        v = ch[sel]
        # x10 brings rgb2hed's ~0-0.3 range to order one, like the other features
        f += [10 * v.mean(), 10 * v.std(), *(10 * np.quantile(v, [0.1, 0.5, 0.9]))]
    f += list(rgb.reshape(-1, 3).mean(axis=0) / 255.0)
    f += [float((rgb.max(-1).astype(np.int16) - rgb.min(-1)).mean()) / 255.0, float(mask.mean())]
    for ch, gain in ((h, 10.0), (gray, 1.0)):
        for s_um in _SCALES_UM:
            f += _texture_stats(ch * gain, max(s_um / mpp, 0.5))
    hs = ndimage.gaussian_filter(h, max(1.0 / mpp, 0.5))
    thr = _H_FLOOR
    if mask.sum() >= 16 and np.ptp(hs[mask]) > 1e-6:
        thr = max(thr, float(threshold_otsu(hs[mask])))
    lab, n = ndimage.label(hs > thr)
    px_um2 = mpp * mpp
    areas = np.bincount(lab.ravel())[1:] * px_um2 if n else np.zeros(0)
    areas = areas[areas >= _MIN_BLOB_UM2]
    tissue_mm2 = max(float(mask.sum()) * px_um2 / 1e6, 1e-4)
    f += [
        np.log1p(areas.size / tissue_mm2),
        areas.mean() / 100.0 if areas.size else 0.0,
        areas.std() / 100.0 if areas.size else 0.0,
        areas.sum() / max(float(mask.sum()) * px_um2, 1.0),
    ]
    return np.asarray(f, dtype=np.float32)


class _StainTexturePreprocess:
    """Picklable per-tile feature computation (runs in DataLoader workers)."""

    def __init__(self, mpp: float, dim: int):
        self.mpp, self.dim = mpp, dim

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stain_texture_features(tile, self.mpp))

    def placeholder(self) -> torch.Tensor:
        return torch.full((self.dim,), float("nan"))


class StainTextureEncoder:
    """Built-in encoder from colour deconvolution and texture statistics (no weights)."""

    kind = "builtin"
    name = STAIN_TEXTURE
    weights_sha256 = "none"
    default_mpp = 1.0

    def __init__(self, target_mpp: float):
        self.feature_names = _stain_texture_names()
        self.dim = len(self.feature_names)
        self.preprocess = _StainTexturePreprocess(target_mpp, self.dim)
        self.device = torch.device("cpu")

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return batch.numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.name, "encoder_kind": self.kind, "weights_sha256": "none"}


# --------------------------------------------------------------------------------------------
# torch / timm
# --------------------------------------------------------------------------------------------
class _TorchPreprocess:
    """Picklable tile -> tensor transform; keeps the model out of DataLoader workers."""

    def __init__(self, transform: Callable, input_size: tuple[int, int, int]):
        self.transform, self.input_size = transform, tuple(int(s) for s in input_size)

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        from PIL import Image

        x = self.transform(Image.fromarray(np.ascontiguousarray(tile[..., :3])))
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                "transform must return a torch.Tensor (C, H, W) for each PIL tile; got "
                f"{type(x).__name__}: end it with torchvision.transforms.ToTensor()"
            )
        return x

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(self.input_size)


def _timm_transform(model: torch.nn.Module) -> tuple[Callable, tuple[int, int, int]]:
    """The model's own eval transform from its timm data config, without cropping the tile.

    ``crop_pct=1`` because the tile already is the field of view chosen by ``tile_size_um``: the
    default centre crop would silently drop its border.
    """
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["crop_pct"] = 1.0
    return timm.data.create_transform(**cfg), tuple(cfg["input_size"])


class TorchEncoder:
    """A torch module producing pooled features per tile (timm ``num_classes=0`` models)."""

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        kind: str,
        weights_sha256: str,
        transform: Callable | None = None,
        device: str | torch.device = "cpu",
        extra: Mapping[str, Any] | None = None,
    ):
        self.name, self.kind, self.weights_sha256 = name, kind, weights_sha256
        self.extra = dict(extra or {})
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        if transform is None:
            transform, input_size = _timm_transform(model)
        else:
            input_size = self._probe_size(transform)
        self.preprocess = _TorchPreprocess(transform, input_size)
        with torch.inference_mode():
            probe = self._forward(self.preprocess.placeholder()[None].to(self.device))
        self.dim = int(probe.shape[1])
        self.feature_names = [f"f{i}" for i in range(self.dim)]
        self.default_mpp = 0.5

    @staticmethod
    def _probe_size(transform: Callable) -> tuple[int, int, int]:
        from PIL import Image

        x = transform(Image.new("RGB", (224, 224), (200, 120, 180)))
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(
                "transform must map a PIL RGB image to a (C, H, W) torch.Tensor; got "
                f"{type(x).__name__}: end it with torchvision.transforms.ToTensor()"
            )
        return tuple(x.shape)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:  # feature map: global average pool
            out = out.mean(dim=(2, 3))
        elif out.ndim == 3:  # token sequence (ViT without pooling): mean over tokens
            out = out.mean(dim=1)
        if out.ndim != 2:
            raise ValueError(
                f"encoder output has shape {tuple(out.shape)}; expected (batch, features). "
                "Pass a model that returns pooled features (timm: num_classes=0)"
            )
        return out

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self._forward(batch.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "encoder_kind": self.kind,
            "weights_sha256": self.weights_sha256,
            **self.extra,
        }


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> CUDA if available, else Apple MPS if available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a torch device: use 'auto', 'cpu' or 'cuda'"
        ) from err


def _arch_from_checkpoint(path: Path) -> tuple[str | None, dict]:
    """Architecture name stored with a weights file, if any (HF-style config.json or metadata)."""
    from .._files import open_regular

    cfg_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if cfg_file.exists():
        with open_regular(cfg_file, "encoder config") as fh:
            cfg = json.loads(fh.read().decode())
        arch = cfg.get("architecture") or cfg.get("arch")
        if arch:
            return arch, dict(cfg.get("model_args", {}))
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("architecture"):
            return meta["architecture"], {}
    return None, {}


def _load_weights_file(file: Path) -> Any:
    """A torch weights file read with ``weights_only=True``: tensors and plain values only.

    A file holding a whole pickled module is refused: unpickling it runs whatever code the
    file names (it is how a shared weights file can take over the reader's machine)."""
    from ..model._safe_format import UnsafeFileError, safe_torch_load

    try:
        return safe_torch_load(file, "encoder weights file")
    except UnsafeFileError as err:
        raise ValueError(
            f"encoder weights file {str(file)!r} holds pickled Python objects ({str(err)[:150]}), "
            "e.g. a whole torch module, which run code when loaded: histovi does not unpickle "
            "them. Save its state dict instead (torch.save(module.state_dict(), path)) and pass "
            "encoder='<timm architecture>', checkpoint_path=path; or, if you trust the file, "
            "load the module yourself (torch.load(path, weights_only=False)) and pass it as "
            "encoder=module."
        ) from None


def _weights_in_dir(path: Path) -> Path:
    for fname in ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt"):
        if (path / fname).exists():
            return path / fname
    raise ValueError(
        f"encoder folder {str(path)!r} holds no model.safetensors or pytorch_model.bin: "
        "pass encoder='<timm name>', checkpoint_path='<weights file>' instead"
    )


def _create_timm(
    name: str, pretrained: bool, file: Path | None, model_kwargs: dict
) -> torch.nn.Module:
    import timm

    kwargs = {"num_classes": 0, **model_kwargs}
    if not name.startswith(("hf-hub:", "local-dir:")):
        from timm.models import is_model, split_model_name_tag

        if not is_model(split_model_name_tag(name)[0]):
            raise ValueError(
                f"encoder={name!r} is not a timm model name: see timm.list_models(), use an "
                "'hf-hub:org/name' id, a local weights path, a torch.nn.Module or 'stain-texture'"
            )
    try:
        if file is not None:
            # timm's own loader handles 'state_dict'/'model' wrappers and drops a classifier head
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs
            )
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if file is not None:
            raise ValueError(
                f"weights file {str(file)!r} does not fit timm architecture {name!r}: {err}. "
                "Pass the architecture the weights were trained with as encoder="
            ) from err
        raise
    except Exception as err:
        if pretrained:
            raise RuntimeError(
                f"could not load pretrained weights for encoder={name!r} ({type(err).__name__}: "
                f"{err}). Without network access download the weights elsewhere and pass "
                f"encoder={name!r}, checkpoint_path='<file>' (or pretrained=False for random weights)"
            ) from err
        raise


def resolve_encoder(
    encoder: str | os.PathLike | torch.nn.Module | None,
    *,
    target_mpp: float,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    transform: Callable | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
) -> StainTextureEncoder | TorchEncoder:
    """Build the encoder object for :func:`histovi.pp.embed_morphology`.

    Parameters
    ----------
    encoder
        ``"stain-texture"``, a timm model name (``"resnet50"``), a ``"hf-hub:org/model"`` id, a
        path to a weights file / HF-style folder, or a :class:`torch.nn.Module`.
    target_mpp
        Pixel size (µm) of the tiles given to the encoder.
    pretrained
        Load pretrained weights for timm names (``False`` gives random weights, for tests).
    checkpoint_path
        Local weights file for a timm architecture named by ``encoder``; loads without network.
    transform
        Tile transform (PIL RGB image -> tensor) for a user module; defaults to the model's timm
        data config.
    model_kwargs
        Extra keyword arguments for :func:`timm.create_model` (e.g. ``init_values=1e-5,
        dynamic_img_size=True`` for UNI-like ViTs).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    """
    model_kwargs = dict(model_kwargs or {})
    if encoder is None or (isinstance(encoder, str) and encoder == STAIN_TEXTURE):
        if checkpoint_path is not None or transform is not None:
            raise ValueError(
                "encoder='stain-texture' takes no checkpoint_path or transform: drop them or "
                "name a timm architecture as encoder="
            )
        return StainTextureEncoder(target_mpp)
    dev = resolve_device(device)
    if isinstance(encoder, torch.nn.Module):
        if checkpoint_path is not None:
            raise ValueError(
                "checkpoint_path is for timm names; load the weights into your module yourself "
                "(module.load_state_dict(torch.load(path)))"
            )
        cfg = getattr(encoder, "pretrained_cfg", None) or {}
        name = f"module:{cfg.get('architecture', type(encoder).__name__)}"
        return TorchEncoder(encoder, name, "module", sha256_state_dict(encoder), transform, dev)
    if not isinstance(encoder, (str, os.PathLike)):
        raise ValueError(
            f"encoder must be 'stain-texture', a timm name, a weights path or a torch.nn.Module; "
            f"got {type(encoder).__name__}"
        )
    enc = str(encoder)
    path = Path(enc).expanduser()
    looks_like_path = path.exists() or enc.endswith(_WEIGHT_SUFFIXES)
    if looks_like_path and not enc.startswith("hf-hub:"):
        if not path.exists():
            raise ValueError(f"encoder weights path {enc!r} does not exist: check the path")
        if checkpoint_path is not None:
            raise ValueError("pass either a weights path as encoder= or checkpoint_path=, not both")
        arch, cfg_kwargs = _arch_from_checkpoint(path)
        file = _weights_in_dir(path) if path.is_dir() else path
        if arch is None:
            obj = _load_weights_file(file)
            if isinstance(obj, dict):
                arch = obj.get("arch") or obj.get("architecture")
            if arch is None:
                raise ValueError(
                    f"weights file {enc!r} holds a state dict without its architecture: pass "
                    f"encoder='<timm name>', checkpoint_path={enc!r}"
                )
        model = _create_timm(arch, True, file, {**cfg_kwargs, **model_kwargs})
        return TorchEncoder(
            model,
            arch,
            "checkpoint",
            sha256_file(file),
            transform,
            dev,
            extra={"checkpoint_path": str(file.resolve())},
        )
    if checkpoint_path is not None:
        file = Path(checkpoint_path).expanduser()
        if file.is_dir():
            file = _weights_in_dir(file)
        if not file.exists():
            raise ValueError(
                f"checkpoint_path={str(checkpoint_path)!r} does not exist: check the path"
            )
        model = _create_timm(enc, True, file, model_kwargs)
        return TorchEncoder(
            model,
            enc,
            "checkpoint",
            sha256_file(file),
            transform,
            dev,
            extra={"checkpoint_path": str(file.resolve())},
        )
    model = _create_timm(enc, pretrained, None, model_kwargs)
    kind = "hf-hub" if enc.startswith("hf-hub:") else "timm"
    return TorchEncoder(
        model,
        enc,
        kind,
        sha256_state_dict(model),
        transform,
        dev,
        extra={"pretrained": bool(pretrained)},
    )
