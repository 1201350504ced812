"""Readers and writers: AnnData with image files, SpatialData (zarr), H&E region readers."""

from ._folder import read_folder
from ._image_source import MAX_IMAGE_PIXELS, ArraySource, DaskSource, FileSource
from ._spatialdata import from_spatialdata, to_spatialdata

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ArraySource",
    "DaskSource",
    "FileSource",
    "from_spatialdata",
    "read_folder",
    "to_spatialdata",
]
