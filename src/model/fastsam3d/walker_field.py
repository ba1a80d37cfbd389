"""A session's click walker: the plain random walker from one object's clicks, on a cube of the
volume, sampled onto the boxes the session renders (:mod:`fastsam3d.refine`, "click walker").

The cube is ``walker_side`` voxels of ``walker_step_mm`` (192 mm by default, the span of a
1.5 mm ROI; blocks of the model grid averaged), centred on the bounding box of the object's
positive clicks and cut at the volume's edges. Its faces inside the volume are background;
faces at the volume's edge are not (an organ may end there without an edge), so a cube that
holds the whole volume needs a negative click.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .field import Box
from .geometry import MODEL_SPACING, Volume, apply_affine, translation
from .refine import RefineSettings, block_mean, click_walker
from .sampling import nonzero_box, sample_box


@dataclass(frozen=True)
class WalkerField:
    """The click walker's probability on its cube.

    Attributes:
        prob: (X, Y, Z) float32, the cube padded by one voxel of zeros on every side.
        to_cube: 4x4 matrix, source voxel -> index into ``prob``.
    """

    prob: np.ndarray
    to_cube: np.ndarray

    def sample(self, box: Box) -> np.ndarray:
        """The probability on a box of source voxels (linear; 0 beyond the cube)."""
        shape = tuple(s.stop - s.start for s in box)
        return sample_box(self.prob, self.to_cube, [s.start for s in box], shape, order=1)

    def source_box(self, threshold: float, source_shape) -> Box | None:
        """Source voxels where the probability can exceed ``threshold`` (None: nowhere)."""
        cells = nonzero_box(self.prob > threshold)
        if cells is None:
            return None
        lo = np.array([s.start - 1.0 for s in cells])
        hi = np.array([s.stop + 0.0 for s in cells])
        to_source = np.linalg.inv(self.to_cube)
        corners = np.stack([lo, hi]) @ to_source[:3, :3].T + to_source[:3, 3]
        shape = np.asarray(source_shape)
        start = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, shape)
        stop = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))


def solve_walker_field(
    volume: Volume,
    points: Sequence[Sequence[float]],
    labels: Sequence[bool],
    settings: RefineSettings,
    clip: tuple[float, float] | None = None,
    device: torch.device | str = "cpu",
    spacing: float = MODEL_SPACING,
) -> WalkerField | None:
    """The click walker of an object with these clicks (source voxel coordinates).

    The cube's image is the volume on the ``spacing`` grid (the model's, shared with the
    encoder's crops) averaged over blocks of ``walker_step_mm``: averaging, not point
    sampling, keeps noise from cutting uniform regions apart.

    Returns None without a positive click, or without background (see the module's note).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    positive = np.asarray(labels, dtype=bool)
    if not positive.any():
        return None
    factor = max(1, round(settings.walker_step_mm / spacing))
    grid = volume.model_grid(spacing)
    # cube index = (grid coordinate + 0.5) / factor - 0.5
    to_cube = np.diag([1 / factor] * 3 + [1.0])
    to_cube[:3, 3] = 0.5 / factor - 0.5
    on_cube = apply_affine(to_cube @ grid.from_source, points)
    centre = (on_cube[positive].min(axis=0) + on_cube[positive].max(axis=0)) / 2
    start = np.round(centre).astype(int) - settings.walker_side // 2
    stop = start + settings.walker_side
    shape = -(-np.asarray(grid.shape) // factor)
    closed = np.stack([start > 0, stop < shape], axis=1)
    start, stop = np.clip(start, 0, shape), np.clip(stop, 0, shape)
    if np.any(stop - start < 2):
        return None
    fine_stop = np.minimum(stop * factor, grid.shape)
    fine = volume.model_region(start * factor, fine_stop - start * factor, spacing)
    if clip is not None:
        fine = np.clip(fine, *clip)
    image = block_mean(torch.from_numpy(fine).to(device), [factor] * 3)
    prob = click_walker(
        image,
        on_cube - start,
        positive.astype(int).tolist(),
        closed,
        radius=settings.walker_seed_radius_mm(len(points)) / (factor * spacing),
    )
    if prob is None:
        return None
    padded = np.pad(prob.cpu().numpy().astype(np.float32), 1)
    return WalkerField(padded, translation(1 - start) @ to_cube @ grid.from_source)
