"""Writing label maps as NIfTI with the source image's affine and header."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError
from .geometry import Volume

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_output_path(output: str | os.PathLike, source: str | os.PathLike | None) -> Path:
    """The output path, refused if it is not NIfTI or would overwrite ``source``.

    Raises:
        InputError: wrong suffix, or the path is the input image.
    """
    out = Path(output)
    if not out.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"the output must end in .nii or .nii.gz, got {out.name}")
    if source is not None:
        src = Path(source)
        same = out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src))
        if same:
            raise InputError(f"refusing to overwrite the input image {src}: choose another -o path")
    if not out.parent.is_dir():
        raise InputError(f"the output folder {out.parent} does not exist")
    return out


def save_labels(labels: np.ndarray, volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``labels`` (``volume.array``'s shape) with the volume's affine and header.

    The source NIfTI header is copied (sform/qform with their codes, units, description); only
    the data type, scaling and display range change. Other sources get a NIfTI-1 header with the
    affine as both sform and qform (code 1, scanner).
    """
    out = check_output_path(path, volume.path)
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise InputError(f"labels of shape {labels.shape} do not fit the volume {volume.shape}")
    image = _labels_image(labels.reshape(_stored_shape(volume)), volume)
    nib.save(image, str(out))
    logger.info("wrote %s", out)
    return out


def _stored_shape(volume: Volume) -> tuple[int, ...]:
    """The source file's data shape when it only adds trailing length-1 axes (X, Y, Z, 1)."""
    header = volume.header
    shape = tuple(header.get_data_shape()) if hasattr(header, "get_data_shape") else ()
    if shape[:3] == tuple(volume.shape) and all(n == 1 for n in shape[3:]):
        return shape
    return tuple(volume.shape)


def _labels_image(labels: np.ndarray, volume: Volume) -> nib.Nifti1Image:
    header = volume.header
    if isinstance(header, nib.Nifti1Header):
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        image = cls(labels, np.asarray(volume.affine), header=header.copy())
    else:
        image = nib.Nifti1Image(labels, np.asarray(volume.affine))
        image.set_qform(np.asarray(volume.affine), code=1)
        image.set_sform(np.asarray(volume.affine), code=1)
    image.set_data_dtype(labels.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    return image
