"""Region readers for H&E images held in memory, in files or in (multiscale) dask arrays.

Every reader exposes resolution levels (downsample factors relative to its base level) so the
caller can read at the level closest to the pixel size it needs, and ``read(y0, y1, x0, x1)``
returning an RGB uint8 region of the selected level. Readers are picklable and open files
lazily, so each DataLoader worker opens its own handle.

- :class:`ArraySource`: a numpy array (scanpy/squidpy ``uns['spatial'][lib]['images']``);
- :class:`FileSource`: TIFF (tiled/pyramidal; read region by region through tifffile's zarr
  store) or any PIL format (JPEG/PNG). Baseline JPEG cannot be decoded region-wise, so it is
  decoded once per process at the coarsest DCT scale (1, 1/2, 1/4, 1/8) that still resolves the
  requested pixel size (``PIL.Image.draft``); convert very large slides to tiled TIFF or
  SpatialData for true region-wise reading;
- :class:`DaskSource`: the levels of a SpatialData image (dask-backed, read lazily per region).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._files import check_regular_file, open_regular

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ArraySource",
    "DaskSource",
    "FileSource",
    "ImageReadError",
    "open_image",
    "pil_pixel_limit",
    "to_uint8_rgb",
]

#: The most pixels (width x height) of a JPEG / PNG / untiled TIFF histovi opens: 1 gigapixel,
#: a 31,600-pixel square (3 GB of RGB once decoded). Pillow's own guard against decompression
#: bombs (a small file that declares a huge image) stops at 89 million pixels, below some H&E
#: scans; histovi raises it to this limit only while it opens an image, and puts Pillow's back
#: afterwards. Set ``histovi.io.MAX_IMAGE_PIXELS`` to open larger images you trust, or convert
#: them to a tiled TIFF (read region by region, without this limit).
MAX_IMAGE_PIXELS = 1_000_000_000


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded (corrupted, truncated, not an image, not a
    regular file, or larger than :data:`MAX_IMAGE_PIXELS`)."""

    def __init__(self, path: str, err: BaseException):
        if isinstance(err, ImageTooLargeError | NotRegularFileError):
            message = str(err)  # names the file and the fix
        else:
            message = (
                f"image file {path!r} cannot be read ({type(err).__name__}: {err}): it is "
                "corrupted, cut short or not an image; replace it (or remove its entry to embed "
                "the other samples)"
            )
        super().__init__(message)


class ImageTooLargeError(ValueError):
    """An image declaring more pixels than :data:`MAX_IMAGE_PIXELS`."""


class NotRegularFileError(ValueError):
    """A path that is not a regular file (FIFO, device, folder)."""


def max_image_pixels() -> int:
    """The limit in force: ``histovi.io.MAX_IMAGE_PIXELS`` (which a user may change)."""
    import histovi.io

    return int(getattr(histovi.io, "MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))


def _too_large(pixels: int, where: str) -> ImageTooLargeError:
    limit = max_image_pixels()
    return ImageTooLargeError(
        f"{where} declares {pixels:,} pixels, more than histovi.io.MAX_IMAGE_PIXELS "
        f"({limit:,}): it is a decompression bomb or a scan too large to decode whole. Convert it "
        "to a tiled TIFF (read region by region), or, if you trust the file, raise "
        "histovi.io.MAX_IMAGE_PIXELS."
    )


@contextlib.contextmanager
def pil_pixel_limit():
    """Pillow's decompression-bomb guard at :data:`MAX_IMAGE_PIXELS` for the ``with`` block, as
    an error (Pillow only warns between its limit and twice it); Pillow's own setting is put
    back afterwards."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def open_image(path, what: str = "image file"):
    """Open an image with Pillow (header only, decoded when used): a regular file only (a FIFO
    would block), within :data:`MAX_IMAGE_PIXELS` (``ImageTooLargeError`` otherwise)."""
    from PIL import Image

    try:
        f = open_regular(path, what)
    except ValueError as err:
        raise NotRegularFileError(str(err)) from None
    try:
        with pil_pixel_limit():
            im = Image.open(f)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        f.close()
        import re

        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = int(found.group(1)) if found else max_image_pixels() + 1
        raise _too_large(pixels, f"{what} {str(path)!r}") from None
    except BaseException:
        f.close()
        raise
    return im


def to_uint8_rgb(region: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) from uint8/uint16/float images, grey or with alpha."""
    a = np.asarray(region)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    elif a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        # scanpy stores images as float32 in [0, 1]
        scale = 255.0 if np.nanmax(a, initial=0) <= 1.0 + 1e-6 else 1.0
        return np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8)
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


class _Source:
    #: (height, width) of each level, finest first
    shapes: list[tuple[int, int]]
    #: downsample factor of each level relative to level 0
    factors: list[float]
    level: int = 0

    def select_level(self, mpp0: float, target_mpp: float) -> int:
        """Choose the coarsest level whose pixels are no larger than ``target_mpp``.

        If even level 0 is coarser than ``target_mpp`` (tiles will be upsampled), use level 0.
        """
        ok = [i for i, f in enumerate(self.factors) if mpp0 * f <= target_mpp * (1 + 1e-6)]
        self.level = max(ok, key=lambda i: self.factors[i]) if ok else 0
        return self.level

    @property
    def shape(self) -> tuple[int, int]:
        return self.shapes[self.level]

    @property
    def factor(self) -> float:
        return self.factors[self.level]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class ArraySource(_Source):
    """An image array in memory, (h, w, c) or (h, w)."""

    def __init__(self, array: np.ndarray):
        a = np.asarray(array)
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
            raise ValueError(
                f"image array has shape {a.shape}; expected (height, width, 3) RGB as in "
                "uns['spatial'][library_id]['images']"
            )
        self.array = a
        self.shapes = [a.shape[:2]]
        self.factors = [1.0]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return to_uint8_rgb(self.array[y0:y1, x0:x1])


_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf")


class FileSource(_Source):
    """An image file: tiled/pyramidal TIFF read region-wise, other formats through PIL."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not Path(self.path).exists():
            raise FileNotFoundError(self.path)
        try:
            check_regular_file(self.path, "image file")
        except ValueError as err:  # a FIFO would block the reader forever
            raise ImageReadError(self.path, NotRegularFileError(str(err))) from None
        self.is_tiff = self.path.lower().endswith(_TIFF_SUFFIXES)
        self._handle: Any = None
        try:
            shapes = self._read_header()
        except Exception as err:  # PIL / tifffile raise many kinds of errors on bad files
            raise ImageReadError(self.path, err) from err
        self.shapes = shapes
        self.factors = [shapes[0][1] / s[1] for s in shapes]

    def _read_header(self) -> list[tuple[int, int]]:
        """Level shapes; a cut-short or corrupted file fails here rather than mid-embedding."""
        if self.is_tiff:
            import tifffile

            # a regular file (checked in __init__): tifffile needs the name, not a handle
            with tifffile.TiffFile(self.path) as tf:
                series = tf.series[0]
                self._axes = series.axes
                shapes = [self._yx(lv.shape, lv.axes) for lv in series.levels]
                # an untiled level is decoded in strips as tall as the file says: bound it
                for lv, (h, w) in zip(series.levels, shapes, strict=True):
                    page = lv.keyframe
                    rows = int(getattr(page, "rowsperstrip", 0) or h)
                    if not page.is_tiled and min(rows, h) * w > max_image_pixels():
                        raise _too_large(h * w, f"untiled TIFF {self.path!r}")
                return shapes
        with open_image(self.path) as im:
            w, h = im.size
            fmt = im.format
            if fmt == "JPEG":
                im.draft("RGB", (max(w // 8, 1), max(h // 8, 1)))
                im.load()  # a 1/8-scale decode finds a truncated file cheaply
            else:
                im.verify()  # checks the file's structure (PNG chunk checksums) without decoding
        scales = (1, 2, 4, 8) if fmt == "JPEG" else (1,)
        return [(-(-h // s), -(-w // s)) for s in scales]

    @staticmethod
    def _yx(shape: tuple[int, ...], axes: str) -> tuple[int, int]:
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None  # each worker opens its own
        return state

    def release(self) -> None:
        """Drop the decoded image / open file (read again on the next ``read``)."""
        self._handle = None

    def _open(self) -> Any:
        if self._handle is not None and self._handle[0] == self.level:
            return self._handle[1]
        if self.is_tiff:
            import tifffile
            import zarr

            store = tifffile.imread(self.path, aszarr=True, level=self.level)
            arr = zarr.open(store, mode="r")
            self._handle = (self.level, arr)
        else:
            with open_image(self.path) as im:
                h, w = self.shapes[self.level]
                if self.level:
                    im.draft("RGB", (w, h))  # JPEG DCT-domain downscale: decodes less
                arr = np.asarray(im.convert("RGB"))
            self.shapes[self.level] = arr.shape[:2]
            self._handle = (self.level, arr)
        return self._handle[1]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            return self._read(y0, y1, x0, x1)
        except ImageReadError:
            raise
        except Exception as err:  # decoding errors of PIL / tifffile / zarr
            raise ImageReadError(self.path, err) from err

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        arr = self._open()
        if not self.is_tiff:
            return arr[y0:y1, x0:x1]
        axes = self._axes
        index = []
        for ax in axes:
            if ax == "Y":
                index.append(slice(y0, y1))
            elif ax == "X":
                index.append(slice(x0, x1))
            elif ax in "SC":
                index.append(slice(None))
            else:
                index.append(0)  # first plane of any extra axis (Z, T)
        region = np.asarray(arr[tuple(index)])
        kept = [ax for ax in axes if ax in "YXSC"]
        if kept.index("Y") > kept.index("X"):
            raise ValueError(f"TIFF {self.path!r} has axes {axes!r}; expected Y before X")
        if kept[0] in "SC":  # planar (C, Y, X)
            region = np.moveaxis(region, 0, -1)
        return to_uint8_rgb(region)


class DaskSource(_Source):
    """Levels of a SpatialData image as (c, y, x) dask/numpy arrays, finest first."""

    def __init__(self, levels: list[Any]):
        if not levels:
            raise ValueError("DaskSource needs at least one image level")
        self.levels = levels
        self.shapes = [(int(a.shape[-2]), int(a.shape[-1])) for a in levels]
        self.factors = [self.shapes[0][1] / s[1] for s in self.shapes]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        region = self.levels[self.level][:, y0:y1, x0:x1]
        if hasattr(region, "compute"):
            region = region.compute()
        return to_uint8_rgb(np.moveaxis(np.asarray(region), 0, -1))
