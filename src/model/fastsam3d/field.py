"""One object's low-res logits on a lattice shared by all ROIs, and their exact inverse mapping.

Low-res logit ``u`` of an ROI with origin ``o`` sits at resampled-grid coordinate
``o + 4 u + 1.5`` (trilinear upsampling 32^3 -> 128^3 with ``align_corners=False``). ROI origins
are multiples of 4, so all ROIs of a volume share the lattice ``r = 4 n + 1.5``. A
:class:`LogitField` stores the newest logits per lattice cell plus which cells are known.

The mask in the volume's own voxel grid is read straight from the lattice: source voxel ->
lattice coordinate by one composed axis-aligned matrix, logits interpolated linearly (edge
values beyond the known cells, as ``align_corners=False`` clamps), thresholded once at 0, and
kept where the nearest lattice cell is known (the union of ROI boxes ``[-0.5, 127.5)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import ModelGrid
from .roi import STRIDE, Roi
from .sampling import nonzero_box, sample_box

Box = tuple[slice, slice, slice]


def empty_box() -> Box:
    return (slice(0, 0),) * 3


def union_box(a: Box | None, b: Box | None) -> Box | None:
    """Smallest box holding both (None and empty boxes are ignored)."""
    boxes = [x for x in (a, b) if x is not None and all(s.stop > s.start for s in x)]
    if not boxes:
        return None
    return tuple(
        slice(min(x[i].start for x in boxes), max(x[i].stop for x in boxes)) for i in range(3)
    )


def intersect_box(a: Box | None, b: Box | None) -> Box | None:
    """The common part of two boxes (None if they do not overlap)."""
    if a is None or b is None:
        return None
    pairs = zip(a, b, strict=True)
    box = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in pairs)
    return box if all(s.stop > s.start for s in box) else None


@dataclass
class Patch:
    """Lattice regions one edit changed, holding the values the field does not hold now.

    After the edit a region keeps the values from before it; :meth:`undo` and :meth:`redo`
    swap them with the field's, so one copy per region is kept either way.
    """

    regions: list[list] = field(default_factory=list)

    @property
    def box(self) -> Box | None:
        out = None
        for region in self.regions:
            out = union_box(out, region[0])
        return out

    def undo(self, target: LogitField) -> None:
        for region in reversed(self.regions):
            _swap(region, target)

    def redo(self, target: LogitField) -> None:
        for region in self.regions:
            _swap(region, target)


def _swap(region: list, target: LogitField) -> None:
    box, logits, known = region
    region[1], region[2] = target.logits[box].copy(), target.known[box].copy()
    target.logits[box], target.known[box] = logits, known


class LogitField:
    """Low-res logits of one object over the whole resampled grid.

    Args:
        grid_shape: shape of the resampled grid.
        roi_size: model input size (ROI edge, voxels).
    """

    def __init__(self, grid_shape, roi_size: int) -> None:
        self.cells = roi_size // STRIDE
        self.margin = self.cells
        shape = tuple(int(np.ceil(n / STRIDE)) + 2 * self.margin for n in grid_shape)
        self.logits = np.zeros(shape, dtype=np.float32)
        self.known = np.zeros(shape, dtype=bool)

    def tile(self, roi: Roi, ring: int = 0) -> Box:
        """Lattice cells of an ROI, grown by ``ring`` cells."""
        start = np.asarray(roi.origin) // STRIDE + self.margin - ring
        stop = start + self.cells + 2 * ring
        if np.any(start < 0) or np.any(stop > np.asarray(self.logits.shape)):
            raise IndexError(f"ROI {roi.origin} leaves the lattice")
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))

    def fits(self, roi: Roi) -> bool:
        try:
            self.tile(roi, ring=1)
        except IndexError:
            return False
        return True

    def read(self, roi: Roi) -> np.ndarray | None:
        """The ROI's previous logits (0 where unknown), or None if no cell is known."""
        box = self.tile(roi)
        known = self.known[box]
        if not known.any():
            return None
        return np.where(known, self.logits[box], 0).astype(np.float32)

    def write(self, roi: Roi, low_res: np.ndarray, owned: np.ndarray | None = None) -> Patch:
        """Store an ROI's logits in the cells it owns (all if ``owned`` is None).

        Unknown cells in a one-cell ring around the ROI get the edge values, so that linear
        interpolation at the ROI border matches the model's clamped upsampling.
        """
        box, ring = self.tile(roi), self.tile(roi, ring=1)
        before = (self.logits[ring].copy(), self.known[ring].copy())
        own = np.ones(low_res.shape, dtype=bool) if owned is None else owned
        self.logits[box] = np.where(own, low_res, self.logits[box])
        self.known[box] |= own
        padded = np.pad(self.logits[box], 1, mode="edge")
        self.logits[ring] = np.where(self.known[ring], self.logits[ring], padded)
        return Patch([[ring, *before]])

    def positive_cells(self, cells: Box, threshold: float = 0.0) -> Box | None:
        """Bounding box of the known cells with logit > ``threshold`` inside ``cells`` (None
        if none)."""
        box = nonzero_box((self.logits[cells] > threshold) & self.known[cells])
        if box is None:
            return None
        return tuple(
            slice(c.start + b.start, c.start + b.stop) for c, b in zip(cells, box, strict=True)
        )

    def lattice_to_grid(self) -> np.ndarray:
        """4x4 matrix lattice index -> resampled-grid coordinate."""
        mat = np.diag([STRIDE, STRIDE, STRIDE, 1.0])
        mat[:3, 3] = (STRIDE - 1) / 2 - STRIDE * self.margin
        return mat

    def source_to_lattice(self, grid: ModelGrid) -> np.ndarray:
        """4x4 matrix source voxel -> lattice coordinate (composed, axis-aligned)."""
        return np.linalg.inv(self.lattice_to_grid()) @ grid.from_source

    def source_box(self, cells: Box, grid: ModelGrid) -> Box:
        """Source voxels whose mask depends on the given lattice cells."""
        lo = np.array([s.start - 1.0 for s in cells])
        hi = np.array([s.stop + 0.0 for s in cells])
        to_source = np.linalg.inv(self.source_to_lattice(grid))
        corners = np.stack([lo, hi]) @ to_source[:3, :3].T + to_source[:3, 3]
        start = np.floor(corners.min(axis=0)).astype(int)
        stop = np.ceil(corners.max(axis=0)).astype(int) + 1
        shape = np.asarray(grid.source_shape)
        start, stop = np.clip(start, 0, shape), np.clip(stop, 0, shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))

    def render(self, grid: ModelGrid, box: Box) -> np.ndarray:
        """The object's mask (bool) on a box of the source voxel grid."""
        logits, known = self.sample(grid, box)
        return (logits > 0) & known

    def sample(self, grid: ModelGrid, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """The logits (linear interpolation) and where they are known, on a source box."""
        shape = tuple(s.stop - s.start for s in box)
        if min(shape) <= 0:
            return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=bool)
        start = [s.start for s in box]
        matrix = self.source_to_lattice(grid)
        logits = sample_box(self.logits, matrix, start, shape, order=1)
        known = sample_box(self.known, matrix, start, shape, order=0)
        return logits, known
