"""Synthetic NIfTI volumes for the plugin tests (made up here, no external data)."""

from __future__ import annotations

import numpy as np


def oblique_affine() -> np.ndarray:
    """Voxel -> world affine: rotated about all three axes, anisotropic, one flipped axis.

    Made up for the tests (not from a scanner): a 0.8 x 0.9 x 2.5 mm grid with the j axis flipped
    (LPS-like handedness) and rotations of 20, -15 and 30 degrees about x, y, z, so that any
    axis-order, sign or spacing mistake moves voxels by millimetres.
    """

    def rotation(axis: int, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        return r

    linear = rotation(2, 30) @ rotation(1, -15) @ rotation(0, 20) @ np.diag([0.8, -0.9, 2.5])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-97.25, 41.5, -20.125]
    return affine


def write_nifti(path, data: np.ndarray, affine: np.ndarray, **header_fields):
    """Save ``data`` as NIfTI-1 through nibabel (sform and qform set, codes 1 = scanner)."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    for key, value in header_fields.items():
        image.header[key] = value
    nib.save(image, str(path))
    return path


def blob_volume(shape=(40, 36, 24), centre=(20, 18, 12), radius=6.0) -> np.ndarray:
    """An int16 CT-like volume (-1000 background, +300 in a ball) with a smooth ramp."""
    grid = np.indices(shape, dtype=np.float32)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    volume = np.where(dist <= radius, 300, -1000) + grid[0].astype(np.int16)
    return volume.astype(np.int16)
