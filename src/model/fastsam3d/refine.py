"""Snap the model's mask to image edges: a random walker with the model's probability as prior.

The mask decoder's logits come one every 4 voxels of the model grid (every 6 mm on the 1.5 mm
grid), and upsampling them cannot place a boundary between those samples: that alone caps the
Dice of small structures (docs/RESULTS.md, "Fine-to-coarse zoom"). The refinement keeps the
model's decision where it is confident and lets the image decide in the uncertain band around
its boundary: :func:`fastsam3d.walker.random_walker` with ``sigmoid(logits)`` as the prior, the
clicks as seeds (positive 1, negative 0), solved on the bounding box of the band. It runs on
whatever grid it is given: the 1.5 mm crop in ``fastsam3d eval --refine``, the volume's own
voxels in a :class:`fastsam3d.Session`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import MODEL_SPACING
from .walker import random_walker


@dataclass(frozen=True)
class RefineSettings:
    """Parameters of :func:`refine_mask` (defaults: tuned on the held-out CT, docs/RESULTS.md).

    Attributes:
        beta: edge sensitivity of the walker (higher: weaker edges stop it).
        prior_weight: weight of the model's probability per voxel of the 1.5 mm grid (scaled
            with the voxel size so that the result does not depend on the grid; lower trusts
            the image more).
        band: voxels whose probability lies in (band, 1 - band) are uncertain; the walker
            solves on their bounding box.
        margin_mm: the box grows by this much on every side.
        seed_mm: each click fixes the voxels within this distance per axis (at least its own).
        max_spacing_mm: a session does not refine volumes with a voxel side longer than this
            (thick slices: on 6.5 mm MR slices the walker dissolved the first masks, on 2 mm
            CT slices it helped; docs/RESULTS.md).
        max_voxels: a larger box is solved on a grid coarsened by whole factors, then
            interpolated back.
        iterations: conjugate-gradient iterations at most.
        tolerance: stop when the residual falls below this fraction of the right-hand side.
    """

    beta: float = 10.0
    prior_weight: float = 0.01
    band: float = 0.02
    margin_mm: float = 6.0
    seed_mm: float = 1.5
    max_spacing_mm: float = 3.0
    max_voxels: int = 80**3
    iterations: int = 200
    tolerance: float = 1e-2

    def __post_init__(self) -> None:
        if not (self.beta >= 0 and self.prior_weight > 0 and 0 < self.band < 0.5):
            raise InputError(
                "refinement needs beta >= 0, prior_weight > 0 and 0 < band < 0.5, got "
                f"{self.beta}, {self.prior_weight}, {self.band}"
            )
        if self.max_voxels < 1 or self.iterations < 1 or self.margin_mm < 0 or self.seed_mm < 0:
            raise InputError("max_voxels and iterations must be >= 1, margin_mm and seed_mm >= 0")
        if not self.max_spacing_mm > 0:
            raise InputError(f"max_spacing_mm must be positive, got {self.max_spacing_mm}")


def refine_mask(
    image: torch.Tensor,
    logits: torch.Tensor,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    spacing: Sequence[float] = (MODEL_SPACING,) * 3,
    settings: RefineSettings | None = None,
) -> torch.Tensor:
    """The refined mask (bool, the shape of ``image``).

    Args:
        image: (X, Y, Z) intensities (clipped as the model sees them; the scale does not matter).
        logits: (X, Y, Z) the model's logits upsampled to the image's voxels.
        points: click positions in voxel coordinates of ``image`` (outside ones are ignored).
        labels: 1 for a positive click, 0 for a negative one.
        spacing: voxel sizes in mm.
        settings: :class:`RefineSettings`.
    """
    settings = settings or RefineSettings()
    if image.shape != logits.shape or image.dim() != 3:
        raise InputError(f"image {tuple(image.shape)} and logits {tuple(logits.shape)} differ")
    mask = logits > 0
    prob = torch.sigmoid(logits.float())
    band = (prob > settings.band) & (prob < 1 - settings.band)
    box = _band_box(band, spacing, settings.margin_mm)
    if box is None:
        return mask
    start = [s.start for s in box]
    sub_image, sub_prob = image[box].float(), prob[box]
    factors = coarsening(sub_image.shape, spacing, settings.max_voxels)
    shape = sub_image.shape
    if any(f > 1 for f in factors):
        sub_image = _pool(sub_image, factors)
        sub_prob = _pool(sub_prob, factors)
    steps = [h * f for h, f in zip(spacing, factors, strict=True)]
    seeds = torch.full(sub_image.shape, -1, dtype=torch.int8, device=image.device)
    reach = [int(settings.seed_mm // h) for h in steps]
    for point, label in zip(points, labels, strict=True):
        local = [(p - a + 0.5) / f - 0.5 for p, a, f in zip(point, start, factors, strict=True)]
        centre = [int(round(v)) for v in local]
        if all(0 <= c < n for c, n in zip(centre, seeds.shape, strict=True)):
            ball = tuple(
                slice(max(c - r, 0), c + r + 1) for c, r in zip(centre, reach, strict=True)
            )
            seeds[ball] = int(bool(label))
    gamma = settings.prior_weight * (min(steps) / MODEL_SPACING) ** 2
    walked = random_walker(
        sub_image,
        seeds,
        beta=settings.beta,
        prior=sub_prob,
        gamma=gamma,
        spacing=steps,
        iterations=settings.iterations,
        tol=settings.tolerance,
    )
    if walked.shape != shape:
        walked = F.interpolate(walked[None, None], size=tuple(shape), mode="trilinear")[0, 0]
    mask[box] = walked > 0.5
    return mask


def coarsening(shape, spacing: Sequence[float], max_voxels: int) -> list[int]:
    """Whole factors per axis that bring ``shape`` under ``max_voxels``, coarsening the finest
    axis (in mm after coarsening) first."""
    factors = [1, 1, 1]
    while math.prod(math.ceil(n / f) for n, f in zip(shape, factors, strict=True)) > max_voxels:
        steps = [h * f for h, f in zip(spacing, factors, strict=True)]
        axis = min(
            (a for a in range(3) if math.ceil(shape[a] / factors[a]) > 1),
            key=lambda a: steps[a],
        )
        factors[axis] += 1
    return factors


def _pool(array: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Block means over ``factors`` (the last partial block averaged over what it has)."""
    pads = []
    for n, f in zip(reversed(array.shape), reversed(factors), strict=True):
        pads += [0, -n % f]
    padded = F.pad(array[None, None], pads, mode="replicate")
    return F.avg_pool3d(padded, tuple(factors))[0, 0]


def _band_box(band: torch.Tensor, spacing: Sequence[float], margin_mm: float):
    """Bounding box of the band grown by ``margin_mm``, or None if the band is empty."""
    if not bool(band.any()):
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = band.any(dim=other).nonzero()[:, 0]
        grow = int(np.ceil(margin_mm / spacing[axis]))
        lo = max(int(hits[0]) - grow, 0)
        hi = min(int(hits[-1]) + 1 + grow, band.shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)
