"""Regions of interest on the resampled grid, and the model input of one ROI.

An ROI is a ``size^3`` box of the resampled (canonical, 1.5 mm) grid. Its origin is a multiple of
the low-res stride (4), so the 32^3 low-res logits of every ROI fall on one lattice (see
:mod:`fastsam3d.field`) and neighbouring ROIs can exchange logits without interpolation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

ROI_SIZE = 128
STRIDE = 4
"""Low-res logits cover the ROI at this stride (128^3 input -> 32^3 logits)."""
REUSE_MARGIN = 40
"""A session reuses an encoded ROI for a click at least this many voxels from its borders
(``SessionSettings.reuse_margin``; through the session on the held-out CT, 32 lost up to 0.04
of mean Dice at some click counts against 40, 0.013 averaged over 10 clicks; docs/RESULTS.md)."""


@dataclass(frozen=True)
class Roi:
    """A box ``[origin, origin + size)`` of the resampled grid.

    Attributes:
        origin: resampled-grid index of model voxel (0, 0, 0); multiples of :data:`STRIDE`.
        size: edge length in voxels (the model's image size).
    """

    origin: tuple[int, int, int]
    size: int = ROI_SIZE

    @property
    def centre(self) -> np.ndarray:
        """Centre in resampled-grid coordinates."""
        return np.asarray(self.origin, dtype=np.float64) + (self.size - 1) / 2

    def to_model(self, points) -> np.ndarray:
        """Resampled-grid coordinates (..., 3) -> model voxel coordinates (x, y, z)."""
        return np.asarray(points, dtype=np.float64) - np.asarray(self.origin)

    def contains(self, point) -> bool:
        """Whether a resampled-grid point lies in the box (voxel centres -0.5 .. size - 0.5)."""
        local = self.to_model(point)
        return bool(np.all(local >= -0.5) and np.all(local < self.size - 0.5))

    def holds(self, point, margin: float, grid_shape) -> bool:
        """Whether ``point`` is inside and at least ``margin`` voxels from every border.

        A border that lies at or beyond the edge of the grid does not count: moving the ROI
        across it would only add padding.
        """
        if not self.contains(point):
            return False
        local = self.to_model(point)
        for axis, n in enumerate(grid_shape):
            low, high = self.origin[axis], self.origin[axis] + self.size
            if low > 0 and local[axis] < margin:
                return False
            if high < n and local[axis] > self.size - 1 - margin:
                return False
        return True

    def overlaps(self, grid_shape) -> bool:
        """Whether the box shares at least one voxel with the grid."""
        return all(
            o < n and o + self.size > 0 for o, n in zip(self.origin, grid_shape, strict=True)
        )


def snap(value: float) -> int:
    """The multiple of :data:`STRIDE` nearest to ``value``."""
    return int(STRIDE * np.round(value / STRIDE))


def centred_roi(point, size: int = ROI_SIZE) -> Roi:
    """The ROI whose centre is nearest to ``point`` (resampled-grid coordinates)."""
    return Roi(tuple(snap(p - (size - 1) / 2) for p in point), size)


def neighbour_roi(roi: Roi, axis: int, direction: int, grid_shape, overlap: int) -> Roi:
    """The ROI next to ``roi`` across one face, overlapping it by at least ``overlap`` voxels.

    Its origin is clamped so that its centre stays inside the grid while it still covers
    everything beyond the face.
    """
    step = roi.size - overlap
    origin = list(roi.origin)
    if direction > 0:
        limit = STRIDE * int(np.floor((grid_shape[axis] - roi.size / 2) / STRIDE))
        origin[axis] = max(min(origin[axis] + step, limit), origin[axis] + STRIDE)
    else:
        limit = -STRIDE * int(np.floor(roi.size / 2 / STRIDE))
        origin[axis] = min(max(origin[axis] - step, limit), origin[axis] - STRIDE)
    return Roi(tuple(origin), roi.size)


def tile_origins(
    grid_shape, size: int = ROI_SIZE, margin: int = REUSE_MARGIN
) -> list[tuple[int, int, int]]:
    """ROIs whose central parts (at least ``margin`` voxels from the borders) cover the grid,
    for precomputing: every voxel is then held by some ROI with that margin.

    An axis no longer than ``size`` gets one ROI centred on it.
    """
    stride = size - 2 * margin
    if stride < STRIDE:
        raise ValueError(f"a margin of {margin} leaves no central part of a {size}^3 ROI")
    per_axis = []
    for n in grid_shape:
        if n <= size:
            per_axis.append([snap((n - size) / 2)])
        else:
            count = int(np.ceil(n / stride))
            per_axis.append([snap(k * stride - margin) for k in range(count)])
    return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def normalise(crop: np.ndarray, clip: tuple[float, float] | None = None) -> np.ndarray:
    """Training normalisation of one crop: optional clip, then z-score over voxels > 0.

    Mirrors ``tio.ZNormalization(masking_method=lambda x: x > 0)`` on the cropped volume
    (unbiased std, applied to every voxel). If no voxel is > 0, all voxels are used.

    >>> [round(float(v), 3) for v in normalise(np.array([0.0, 1.0, 3.0]))]
    [-1.414, -0.707, 0.707]
    """
    out = np.asarray(crop, dtype=np.float32)
    if clip is not None:
        out = np.clip(out, clip[0], clip[1])
    values = out[out > 0]
    if values.size < 2:
        logger.warning("no voxel > 0 in the ROI: normalising over all voxels")
        values = out.ravel()
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64, ddof=1))
    return ((out - mean) / (std if std > 0 else 1.0)).astype(np.float32)
