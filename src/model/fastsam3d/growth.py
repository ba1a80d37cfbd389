"""Objects larger than one ROI: which neighbouring ROIs to continue into, and who owns a cell.

When a decoded mask reaches a face of its ROI (positive logits in the outermost low-res layer)
and the volume continues beyond that face, the object continues into the neighbouring ROI
(overlapping by ``overlap`` voxels), seeded with the logits already known there. Each lattice
cell is finally owned by the ROI, among those decoded for the click that contain it, whose centre
is nearest: every cell's logits come from the ROI that saw it with the most context.
"""

from __future__ import annotations

import numpy as np

from .roi import STRIDE, Roi, neighbour_roi


def _cell_centres(roi: Roi) -> np.ndarray:
    """Resampled-grid coordinates of an ROI's low-res cell centres along one axis, per axis."""
    cells = roi.size // STRIDE
    return np.asarray(roi.origin, dtype=np.float64)[:, None] + STRIDE * np.arange(cells) + 1.5


def owned_cells(roi: Roi, decoded: list[Roi]) -> np.ndarray:
    """Cells of ``roi`` (32^3 bool) nearer its centre than any ROI in ``decoded`` holding them."""
    centres = _cell_centres(roi)
    own = _sq_distance(centres, roi.centre)
    best = np.full(own.shape, np.inf)
    for other in decoded:
        inside = [
            (c >= o - 0.5) & (c < o + other.size - 0.5)
            for c, o in zip(centres, other.origin, strict=True)
        ]
        holds = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        best = np.where(holds, np.minimum(best, _sq_distance(centres, other.centre)), best)
    return own < best


def _sq_distance(centres: np.ndarray, point: np.ndarray) -> np.ndarray:
    d = [(c - p) ** 2 for c, p in zip(centres, point, strict=True)]
    return d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :]


def touched_faces(low_res: np.ndarray, owned: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Faces ``(axis, -1 | +1)`` whose outermost layer of (owned) cells has positive logits."""
    positive = low_res > 0
    if owned is not None:
        positive &= owned
    faces = []
    for axis in range(3):
        if np.take(positive, 0, axis=axis).any():
            faces.append((axis, -1))
        if np.take(positive, -1, axis=axis).any():
            faces.append((axis, 1))
    return faces


def _beyond_face_covered(roi: Roi, axis: int, direction: int, decoded: list[Roi]) -> bool:
    beyond = roi.origin[axis] - 1 if direction < 0 else roi.origin[axis] + roi.size
    others = [a for a in range(3) if a != axis]
    return any(
        all(d.origin[a] == roi.origin[a] for a in others)
        and d.origin[axis] <= beyond < d.origin[axis] + d.size
        for d in decoded
    )


def next_rois(
    roi: Roi, low_res: np.ndarray, owned, grid_shape, overlap: int, decoded: list[Roi]
) -> list[Roi]:
    """Neighbouring ROIs the object continues into from ``roi``."""
    out = []
    for axis, direction in touched_faces(low_res, owned):
        low, high = roi.origin[axis], roi.origin[axis] + roi.size
        interior = low > 0 if direction < 0 else high < grid_shape[axis]
        if not interior or _beyond_face_covered(roi, axis, direction, decoded):
            continue
        out.append(neighbour_roi(roi, axis, direction, grid_shape, overlap))
    return out


def seed_point(mask_input: np.ndarray | None) -> np.ndarray | None:
    """Model coordinates of the most confident known positive cell, or None.

    >>> logits = np.zeros((32, 32, 32)); logits[0, 1, 2] = 3.0
    >>> seed_point(logits).tolist()
    [1.5, 5.5, 9.5]
    """
    if mask_input is None or not (mask_input > 0).any():
        return None
    cell = np.unravel_index(int(np.argmax(mask_input)), mask_input.shape)
    return STRIDE * np.asarray(cell, dtype=np.float64) + (STRIDE - 1) / 2
