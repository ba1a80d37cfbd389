"""Comparison methods driven by the same simulated clicks as the model (``fastsam3d eval``).

Every segmenter has the interface of :class:`fastsam3d.evaluation.Segmenter`: ``start(crop)``
once per structure with the raw and the normalised 128^3 crop, then ``predict(points, labels)``
after every click, returning a bool mask of the crop.

- :class:`RandomWalkerSegmenter`: Grady's random walker (2006, :mod:`fastsam3d.walker`). Seeds:
  a small ball around every click (its label) and the crop border (background).
- The 2D slice-wise SAM (LiteMedSAM) lives in :mod:`fastsam3d.slicewise`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .refine import block_coordinates, click_seeds
from .walker import random_walker


class RandomWalkerSegmenter:
    """Random walker from the clicks (all clicks so far), on a ``factor`` x coarser grid.

    Args:
        device: where to solve.
        factor: downsampling of the 128^3 crop before solving (2: 64^3).
        radius: seed ball radius around each click, in crop voxels.
    """

    name = "random-walker"

    def __init__(self, device: str | torch.device = "cpu", factor: int = 2, radius: float = 3.0):
        self.device = torch.device(device)
        self.factor = factor
        self.radius = radius
        self.image: torch.Tensor | None = None

    def start(self, raw: torch.Tensor, normalised: torch.Tensor) -> None:
        """Take the crop (X, Y, Z) of a new structure."""
        image = normalised.float().to(self.device)[None, None]
        if self.factor > 1:
            image = F.avg_pool3d(image, self.factor)
        self.image = image[0, 0]

    def predict(self, points: list[tuple[int, int, int]], labels: list[int]) -> torch.Tensor:
        """Mask (X, Y, Z) bool of the full crop from every click given so far."""
        seeds = self._seeds(points, labels)
        prob = random_walker(self.image, seeds)
        if self.factor > 1:
            prob = F.interpolate(prob[None, None], scale_factor=self.factor, mode="trilinear")[0, 0]
        return prob > 0.5

    def _seeds(self, points, labels) -> torch.Tensor:
        coarse = block_coordinates(points, self.factor)
        radius = self.radius / self.factor
        return click_seeds(self.image.shape, coarse, labels, radius, device=self.device)
