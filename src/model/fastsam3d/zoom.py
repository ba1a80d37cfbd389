"""Fine-to-coarse zoom of one object: where it starts and when it moves to the coarse grid.

A new object is segmented on a fine grid (:data:`FINE_SPACING`): its 128^3 ROI spans 96 mm and
the 32^3 logits come every 3 mm, so ribs, vessels and small tumours keep their shape. On the
1.5 mm training grid the logits come every 6 mm: with perfect logits, the 31 held-out CT
structures could reach only a mean Dice of 0.60 there (docs/RESULTS.md). An object whose mask
reaches the fine ROI's border is larger than the fine view; it moves to the coarse grid, where
the ROI spans 192 mm and neighbouring ROIs continue it (as in nnInteractive's auto-zoom, but
from fine to coarse).
"""

from __future__ import annotations

import numpy as np

FINE_SPACING = 0.75
"""mm; half the training spacing (the model was fine-tuned on such zoomed-in crops)."""
BORDER_CELLS = 1
"""Positive logits in this many outer low-res cells of the fine ROI mean the object is larger."""


def uses_fine_grid(voxel_mm, spacing: float, fine_spacing: float | None) -> bool:
    """Whether objects of a volume with these voxel sizes start on the fine grid.

    Only where the image has detail the coarse grid loses (its finest voxel side is below
    ``spacing``): a 3 mm scan resampled to 0.75 mm is only blur the model was not trained on
    (on the 3 mm TotalSegmentator CT one structure fell from Dice 0.20 to 0.02 after its first
    click on the fine grid).
    """
    return fine_spacing is not None and float(min(voxel_mm)) < spacing


def reaches_border(low_res, inner_faces=None, cells: int = BORDER_CELLS) -> bool:
    """Whether positive low-res logits (X, Y, Z) lie within ``cells`` of the ROI's border.

    Args:
        low_res: logits (X, Y, Z), numpy or torch.
        inner_faces: (3, 2) booleans, True where the face (low, high) of an axis lies inside
            the volume; faces at or beyond the volume's edge do not count. None: all count.
        cells: width of the border band in low-res cells.
    """
    positive = np.asarray(low_res > 0)
    faces = np.ones((3, 2), dtype=bool) if inner_faces is None else np.asarray(inner_faces)
    for axis in range(3):
        moved = np.moveaxis(positive, axis, 0)
        if faces[axis, 0] and moved[:cells].any():
            return True
        if faces[axis, 1] and moved[-cells:].any():
            return True
    return False
