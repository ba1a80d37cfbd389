"""Volumes and the exact mapping between a volume's voxel grid and the model grid.

The model sees what it saw in training (official ``utils/data_loader.py`` and
``utils/prepare_uunet.py``): the volume reoriented to the closest canonical RAS axes
(``tio.ToCanonical``), resampled linearly to 1.5 mm isotropic keeping the corner of the first
voxel (``tio.Resample(1.5)``), then a 128^3 crop/pad. Each step is one 4x4 matrix between voxel
grids; they are composed into "resampled voxel -> source voxel" (:attr:`ModelGrid.to_source`) and
its inverse. Orientation comes from :mod:`nibabel.orientations`. Because reorientation is an axis
permutation with flips and resampling scales each canonical axis, the composed matrix is always
axis-aligned (one non-zero per row), also for oblique and sheared affines: resampling is done
along the canonical voxel axes, as TorchIO does, so the model grid keeps the direction cosines.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from functools import cached_property

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_lib

from .errors import GeometryError, InputError
from .sampling import crop_padded, sample_box, zero_outside

logger = logging.getLogger(__name__)

MODEL_SPACING = 1.5
"""Isotropic spacing (mm) of the grid the model was trained on."""

#: Largest resampled grid (voxels) kept in memory; bigger volumes are sampled per ROI instead.
MAX_RESAMPLED_VOXELS = 384**3


def validate_affine(affine: np.ndarray | None) -> np.ndarray:
    """A float64 copy of a 4x4 voxel -> world affine, or :class:`GeometryError`.

    >>> validate_affine(np.diag([2.0, 2.0, 2.0, 1.0]))[0, 0]
    np.float64(2.0)
    """
    if affine is None:
        logger.warning("no affine given: assuming 1 mm voxels in RAS order")
        return np.eye(4)
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise GeometryError(
            f"the affine must be a 4x4 voxel-to-world matrix, got shape {aff.shape}; "
            "pass nibabel's image.affine"
        )
    if not np.all(np.isfinite(aff)):
        raise GeometryError("the affine contains NaN or Inf: fix the file's sform/qform")
    if not np.allclose(aff[3], [0, 0, 0, 1]):
        raise GeometryError(f"the affine's last row must be [0, 0, 0, 1], got {aff[3].tolist()}")
    sizes = np.linalg.norm(aff[:3, :3], axis=0)
    if np.any(sizes == 0) or np.linalg.cond(aff[:3, :3] / sizes) > 1e6:
        raise GeometryError(
            "the affine is singular (voxel sizes "
            f"{np.round(sizes, 4).tolist()}, determinant {np.linalg.det(aff[:3, :3]):.3g}): "
            "fix the file's sform/qform or pass a valid voxel-to-world matrix"
        )
    return aff.copy()


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm): the norms of the affine's first three columns."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def translation(offset) -> np.ndarray:
    """4x4 matrix that adds ``offset`` (3,)."""
    mat = np.eye(4)
    mat[:3, 3] = offset
    return mat


def canonical_transform(shape, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Reorientation to the closest canonical (RAS) axes.

    Returns:
        ``(ornt, matrix, canonical_shape)``: the nibabel orientation that takes the stored array
        to RAS (for :func:`nibabel.orientations.apply_orientation`), the 4x4 matrix canonical
        voxel -> source voxel and the reoriented shape.
    """
    ornt = ornt_lib.ornt_transform(
        ornt_lib.io_orientation(affine), ornt_lib.axcodes2ornt(("R", "A", "S"))
    )
    matrix = ornt_lib.inv_ornt_aff(ornt, shape)
    canonical_shape = tuple(int(shape[int(ax)]) for ax in np.argsort(ornt[:, 0]))
    return ornt, matrix, canonical_shape


def resample_transform(spacing, shape, target: float = MODEL_SPACING) -> tuple[np.ndarray, tuple]:
    """Resampling to ``target`` mm keeping the first voxel's corner (as ``tio.Resample``).

    Args:
        spacing: the canonical grid's voxel sizes (3,).
        shape: the canonical grid's shape.
        target: the new isotropic spacing.

    Returns:
        The 4x4 matrix resampled voxel -> canonical voxel, and the resampled shape
        ``ceil(shape * spacing / target)``.

    >>> resample_transform([3.0, 1.5, 0.75], [10, 10, 10])[1]
    (20, 10, 5)
    """
    scale = target / np.asarray(spacing, dtype=np.float64)
    matrix = np.diag([*scale, 1.0])
    matrix[:3, 3] = 0.5 * (scale - 1.0)
    extent = np.asarray(shape) / scale
    new_shape = tuple(int(n) for n in np.maximum(np.ceil(extent - 1e-6), 1))
    return matrix, new_shape


def apply_affine(matrix: np.ndarray, points) -> np.ndarray:
    """``matrix`` (4x4) applied to points (..., 3)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True, eq=False)
class ModelGrid:
    """The canonical, isotropically resampled grid of a volume (before ROI cropping).

    Attributes:
        source_shape: shape of the stored array.
        source_affine: its voxel -> world affine.
        spacing: isotropic spacing of this grid (mm).
        ornt: nibabel orientation taking the stored array to RAS.
        shape: shape of the resampled canonical grid, axes (x, y, z) = model tensor dims 2, 3, 4.
        to_canonical: 4x4 matrix resampled voxel -> canonical voxel (a diagonal scale + shift).
    """

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    spacing: float
    ornt: np.ndarray
    shape: tuple[int, int, int]
    to_canonical: np.ndarray

    @classmethod
    def build(cls, shape, affine: np.ndarray, spacing: float = MODEL_SPACING) -> ModelGrid:
        """The model grid of a ``(shape, affine)`` volume."""
        affine = validate_affine(affine)
        ornt, canon_to_src, canon_shape = canonical_transform(shape, affine)
        canon_spacing = voxel_sizes(affine @ canon_to_src)
        res_to_canon, res_shape = resample_transform(canon_spacing, canon_shape, spacing)
        source_shape = tuple(int(n) for n in shape)
        return cls(source_shape, affine, float(spacing), ornt, res_shape, res_to_canon)

    @cached_property
    def to_source(self) -> np.ndarray:
        """4x4 matrix resampled voxel -> source voxel."""
        return ornt_lib.inv_ornt_aff(self.ornt, self.source_shape) @ self.to_canonical

    @cached_property
    def from_source(self) -> np.ndarray:
        """4x4 matrix source voxel -> resampled voxel (the exact inverse of ``to_source``)."""
        return np.linalg.inv(self.to_source)

    @property
    def affine(self) -> np.ndarray:
        """Resampled voxel -> world affine."""
        return self.source_affine @ self.to_source

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(int(self.source_shape[int(a)]) for a in np.argsort(self.ornt[:, 0]))

    def source_to_grid(self, points) -> np.ndarray:
        """Source voxel coordinates (..., 3) -> resampled-grid coordinates (..., 3)."""
        return apply_affine(self.from_source, points)

    def grid_to_source(self, points) -> np.ndarray:
        """Resampled-grid coordinates (..., 3) -> source voxel coordinates (..., 3)."""
        return apply_affine(self.to_source, points)

    def canonical_view(self, array: np.ndarray) -> np.ndarray:
        """The stored array seen in canonical axis order (a view: flips and transposes only)."""
        return ornt_lib.apply_orientation(array, self.ornt)

    def resample(self, array: np.ndarray) -> np.ndarray:
        """The whole volume on this grid (float32, linear, edge values beyond the source)."""
        return self.sample_region(array, (0, 0, 0), self.shape)

    def sample_region(self, array: np.ndarray, start, shape, pad_outside: bool = True):
        """Resample the box ``[start, start + shape)`` of this grid from the stored array.

        Voxels of the box outside the grid are 0 when ``pad_outside`` (the crop's padding).
        """
        canonical = self.canonical_view(array)
        out = sample_box(canonical, self.to_canonical, start, shape, order=1)
        out = out.astype(np.float32, copy=False)
        if pad_outside:
            zero_outside(out, start, self.shape)
        return out


def _check_array(array) -> np.ndarray:
    arr = np.asanyarray(array)
    if arr.dtype.names is not None or (arr.ndim == 4 and arr.shape[-1] in (3, 4)):
        raise InputError(
            f"this looks like an RGB image (shape {arr.shape}, dtype {arr.dtype}): "
            "convert it to a single grey-level channel first"
        )
    if arr.ndim != 3:
        hint = (
            "stack the slices into a 3-D array"
            if arr.ndim < 3
            else "pick one volume, e.g. array[..., 0] for the first time point or channel"
        )
        raise InputError(
            f"a volume must be a 3-D array, got {arr.ndim}-D shape {arr.shape}: {hint}"
        )
    if min(arr.shape) < 2:
        raise InputError(
            f"the volume has shape {arr.shape}, a single slice along an axis: FastSAM3D needs "
            "a 3-D volume with at least 2 voxels along every axis"
        )
    if arr.dtype.kind not in "biuf":
        raise InputError(f"voxel type {arr.dtype} is not supported: pass real-valued intensities")
    return arr


def _check_values(arr: np.ndarray) -> None:
    if arr.dtype.kind == "f":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise InputError(
                f"the volume has {bad} NaN/Inf voxels: replace them first, "
                "e.g. np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)"
            )
    low, high = arr.min(), arr.max()
    if low == high:
        raise InputError(
            f"the volume is constant (every voxel is {low}): there is nothing to segment; "
            "check that the right file or channel was loaded"
        )


class Volume:
    """A 3-D image: the stored array and its voxel -> world affine (mm, RAS+ as nibabel gives).

    Args:
        array: intensities in stored voxel order (not copied; treated as read-only).
        affine: 4x4 voxel -> world matrix; None assumes 1 mm RAS voxels.
        header: optional nibabel header of the source file (kept for writing results).
        path: optional source file.

    Raises:
        InputError: the array is not a usable 3-D volume (2-D, 4-D, RGB, NaN/Inf, constant).
        GeometryError: the affine is not a valid voxel -> world matrix.
    """

    def __init__(self, array, affine=None, *, header=None, path=None) -> None:
        arr = _check_array(array)
        self._affine = validate_affine(affine)
        _check_values(arr)
        view = arr.view(np.ndarray)
        view.flags.writeable = False
        self._array = view
        self._affine.flags.writeable = False
        self.header = header
        self.path = None if path is None else os.fspath(path)
        self._lock = threading.Lock()
        self._grids: dict[float, ModelGrid] = {}
        self._resampled: dict[float, np.ndarray] = {}
        self._signature: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Volume:
        """Read a file nibabel understands (.nii, .nii.gz; also .mgz, .mgh, Analyze).

        A trailing axis of length 1 (``X, Y, Z, 1`` NIfTI) is dropped.

        Raises:
            InputError: the file is missing or not an image nibabel can read.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"no such file: {path}")
        try:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)
        except Exception as err:
            raise InputError(
                f"cannot read {path} ({err}); supported are NIfTI (.nii, .nii.gz) and the other "
                "formats nibabel reads (.mgz, .mgh, .img/.hdr): convert other files, e.g. "
                "DICOM with dcm2niix"
            ) from err
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return cls(data, image.affine, header=image.header, path=path)

    @property
    def array(self) -> np.ndarray:
        """The stored intensities (read-only view)."""
        return self._array

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> world (mm) affine (read-only)."""
        return self._affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._array.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the stored axes."""
        return tuple(float(s) for s in voxel_sizes(self._affine))

    @property
    def orientation(self) -> str:
        """Axis codes of the stored axes, e.g. ``"LPS"``."""
        return "".join(nib.aff2axcodes(self._affine))

    def voxel_to_world(self, ijk) -> np.ndarray:
        """Voxel coordinates (..., 3) -> world mm (..., 3)."""
        return apply_affine(self._affine, ijk)

    def world_to_voxel(self, xyz) -> np.ndarray:
        """World mm (..., 3) -> voxel coordinates (..., 3)."""
        return apply_affine(np.linalg.inv(self._affine), xyz)

    def model_grid(self, spacing: float = MODEL_SPACING) -> ModelGrid:
        """The canonical grid resampled to ``spacing`` mm (cached)."""
        with self._lock:
            if spacing not in self._grids:
                self._grids[spacing] = ModelGrid.build(self.shape, self._affine, spacing)
            return self._grids[spacing]

    def resampled(self, spacing: float = MODEL_SPACING) -> np.ndarray | None:
        """The whole volume on :meth:`model_grid`, computed once (None if it would be huge)."""
        grid = self.model_grid(spacing)
        if int(np.prod(grid.shape)) > MAX_RESAMPLED_VOXELS:
            return None
        with self._lock:
            if spacing not in self._resampled:
                logger.info("resampling %s to %s mm: grid %s", self.shape, spacing, grid.shape)
                out = grid.resample(self._array)
                out.flags.writeable = False
                self._resampled[spacing] = out
            return self._resampled[spacing]

    def model_region(
        self, start, shape, spacing: float = MODEL_SPACING, whole: bool = True
    ) -> np.ndarray:
        """A box of the resampled grid (zero outside it), float32.

        ``whole`` reuses :meth:`resampled` (the whole volume resampled once, when not huge);
        False samples only the box, for grids that serve only a few boxes.
        """
        grid = self.model_grid(spacing)
        full = self.resampled(spacing) if whole else None
        if full is None:
            return grid.sample_region(self._array, start, shape)
        return crop_padded(full, start, shape)

    @property
    def signature(self) -> str:
        """Hash of the content, dtype, shape and affine (for cache keys and prompt files)."""
        if self._signature is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(repr((self.shape, self._array.dtype.str)).encode())
            digest.update(np.ascontiguousarray(self._affine).tobytes())
            for plane in self._array:
                digest.update(np.ascontiguousarray(plane).tobytes())
            self._signature = digest.hexdigest()
        return self._signature

    def __repr__(self) -> str:
        spacing = "x".join(f"{s:.3g}" for s in self.spacing)
        return f"Volume(shape={self.shape}, spacing={spacing} mm, {self.orientation})"
