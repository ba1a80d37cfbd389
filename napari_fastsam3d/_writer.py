"""NIfTI writer contribution: a Labels layer -> ``.nii`` / ``.nii.gz`` on the source image's grid.

The affine and header come from ``layer.metadata`` (set by our reader and copied onto the
``FastSAM3D labels`` layer); the header's stored sform/qform fields are kept as they are, so a
reader sees exactly the source affine. The source image file itself is never overwritten.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from fastsam3d.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_SUFFIX = ".nii.gz"


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one Labels layer as a NIfTI file with the source image's affine and header.

    Args:
        path: Output file; ``.nii.gz`` is appended when it has no NIfTI suffix.
        data: Label array in the source image's stored voxel order (I, J, K).
        attributes: napari layer attributes; ``metadata`` may hold ``affine``, ``header`` and
            ``source_path`` (the image the labels belong to).

    Returns:
        The written path, in a one-element list.

    Raises:
        InputError: When ``path`` is the source image, or the labels are not integers.
    """
    import nibabel as nib

    out = _with_suffix(path)
    metadata = attributes.get("metadata") or {}
    _refuse_source(out, metadata.get("source_path"))
    labels = _as_label_array(data)
    affine = _affine_of(attributes)
    header = _header_of(metadata, labels)
    image = nib.Nifti1Image(labels, affine, header=header)
    image.set_data_dtype(labels.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, float(labels.max(initial=0))
    image.header["descrip"] = b"napari-fastsam3d labels"
    image.header.set_intent("label", name="labels")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    nib.save(image, out)
    logger.info("wrote labels %s (%s, max id %d)", out, labels.dtype, labels.max(initial=0))
    return [out]


def _with_suffix(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path if path.lower().endswith((".nii", ".nii.gz")) else path + DEFAULT_SUFFIX


def _refuse_source(out: str, source: str | None) -> None:
    if not source:
        return
    same = Path(out).resolve() == Path(source).resolve()
    if not same and os.path.exists(out) and os.path.exists(source):
        same = os.path.samefile(out, source)
    if same:
        raise InputError(
            f"Refusing to overwrite the source image {source} with labels; "
            "choose another file name, e.g. one ending in '_labels.nii.gz'."
        )


def _as_label_array(data: Any) -> np.ndarray:
    labels = np.asarray(data)
    if labels.dtype.kind not in "iub":
        raise InputError(f"Labels must be integers, got dtype {labels.dtype}; convert the layer.")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError("Labels must not be negative; remove negative ids before saving.")
    top = int(labels.max(initial=0))
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return labels.astype(dtype, copy=False)
    raise InputError(f"Label id {top} does not fit in 32 bits; relabel before saving.")


def _affine_of(attributes: dict) -> np.ndarray:
    """Voxel -> world affine: the exact one in metadata, else napari's transform of the layer."""
    stored = (attributes.get("metadata") or {}).get("affine")
    if stored is not None:
        return np.asarray(stored, dtype=np.float64)
    from napari.utils.transforms import Affine

    transform = Affine(
        scale=attributes.get("scale", (1, 1, 1)),
        translate=attributes.get("translate", (0, 0, 0)),
        rotate=attributes.get("rotate"),
        shear=attributes.get("shear"),
    )
    extra = np.asarray(attributes.get("affine", np.eye(4)), dtype=np.float64)
    logger.warning("labels have no source affine in metadata; using the layer's transform")
    return extra @ transform.affine_matrix


def _header_of(metadata: dict, labels: np.ndarray) -> Any:
    import nibabel as nib

    header = metadata.get("header")
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
        header = nib.Nifti1Header.from_header(header)
    else:
        header = nib.Nifti1Header()
    header.set_data_shape(labels.shape)
    return header
