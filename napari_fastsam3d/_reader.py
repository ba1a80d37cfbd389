"""NIfTI reader contribution: ``*.nii`` / ``*.nii.gz`` with the file's world coordinates (mm).

The layer's data are in stored voxel order (i, j, k) = napari dims (0, 1, 2), and its transform
is the file's voxel -> world affine (scale, rotation, shear and translation decomposed by napari),
so napari's world coordinates are the file's world coordinates in millimetres. The exact affine
and the NIfTI header are kept in ``layer.metadata`` for the writer and for the segmentation engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import READER_TAG, transform_kwargs

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")

LayerData = tuple[Any, dict, str]


def napari_get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """Return a reader for a 3D NIfTI file, or None for anything this plugin cannot read.

    Never raises: a file with a NIfTI suffix whose header cannot be parsed, or whose image is not
    a single 3D scalar volume, gets None so that napari can try other readers.

    Args:
        path: A path, or a list holding exactly one path.

    Returns:
        A function that takes the path and returns one image layer-data tuple, or None.
    """
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, str | os.PathLike) or not _has_nifti_suffix(path):
        return None
    image = _open_header(path)
    if image is None or _volume_shape(image) is None:
        return None

    def read(_path: str | list[str]) -> list[LayerData]:
        return [read_nifti_layer(image, path)]

    return read


def read_nifti_layer(image: Any, path: str | os.PathLike, name: str | None = None) -> LayerData:
    """Read the voxels of an opened nibabel image into one image layer-data tuple.

    Args:
        image: A nibabel Nifti1/Nifti2 image whose header was read (data are read here, once).
        path: The file it came from; kept as ``metadata["source_path"]``.
        name: Layer name; defaults to the file name without its NIfTI suffix.

    Returns:
        ``(data, kwargs, "image")`` with data of shape (I, J, K) in stored voxel order.
    """
    data = np.asanyarray(image.dataobj)
    data = data.reshape(_volume_shape(image))
    affine = np.array(image.affine, dtype=np.float64)
    metadata = {
        "affine": affine,
        "header": image.header.copy(),
        "source_path": str(Path(path).resolve()),
        "reader": READER_TAG,
    }
    kwargs = {
        "name": name or _stem(path),
        "metadata": metadata,
        "colormap": "gray",
        "contrast_limits": _contrast_limits(data),
        **transform_kwargs(affine),
    }
    logger.info("read %s: shape %s, dtype %s", path, data.shape, data.dtype)
    return data, kwargs, "image"


def _has_nifti_suffix(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _open_header(path: str | os.PathLike) -> Any | None:
    """Load a NIfTI header lazily (no voxel data); None when the file is not a readable NIfTI."""
    try:
        import nibabel as nib

        image = nib.load(os.fspath(path), mmap=False)  # no memory map: the file may change
    except Exception as err:  # any failure means "not ours": napari tries the next reader
        logger.debug("not a readable NIfTI file %s: %s", path, err)
        return None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        return None
    return image


def _volume_shape(image: Any) -> tuple[int, int, int] | None:
    """Shape (I, J, K) of a scalar 3D volume (trailing singleton axes allowed), else None."""
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    dtype = image.get_data_dtype()
    if len(shape) != 3 or min(shape) < 1 or dtype.fields is not None or dtype.kind == "c":
        return None
    return shape


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


CT_WINDOW = (-160.0, 240.0)
"""Soft-tissue window (Hounsfield units) shown for CT volumes."""


def _contrast_limits(data: np.ndarray) -> list[float]:
    """Display range: a soft-tissue window for CT (values in HU), else robust percentiles."""
    sample = np.asarray(data[:: max(1, data.shape[0] // 64)], dtype=np.float32).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return [0.0, 1.0]
    low, high = np.percentile(sample, [0.5, 99.5])
    if low <= -900 and high >= 0:  # air at about -1000 HU: a CT in Hounsfield units
        return list(CT_WINDOW)
    if high <= low:
        high = low + 1.0
    return [float(low), float(high)]
