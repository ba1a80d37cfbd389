"""Snap the model's mask to image edges: a random walker with the model's probability as prior.

The mask decoder's logits come one every 4 voxels of the model grid (every 6 mm on the 1.5 mm
grid), and upsampling them cannot place a boundary between those samples: that alone caps the
Dice of small structures (docs/RESULTS.md, "Fine-to-coarse zoom"). The refinement keeps the
model's decision where it is confident and lets the image decide in the uncertain band around
its boundary: :func:`fastsam3d.walker.random_walker` with ``sigmoid(logits)`` as the prior, the
clicks as seeds (positive 1, negative 0), solved on the bounding box of the band. It runs on
whatever grid it is given: the 1.5 mm crop in ``fastsam3d eval --refine``, the volume's own
voxels in a :class:`fastsam3d.Session`.

On CT a second opinion enters the prior first (``RefineSettings.click_walker``): the plain
random walker from the clicks alone (:func:`click_walker`, the random-walker baseline on a
192 mm cube of 3 mm voxels). The prior is their noisy OR, ``1 - (1 - p_model)(1 - p_walker)``:
a first click in a large, uniform organ, where the model's mask covers only a part, gets the
organ. On T1 brain MR the same walker leaked out of the subcortical structures, so by default
it runs only on CT (docs/RESULTS.md, "Click walker").

Last, where the click walker ran, the mask keeps only its parts that hold a positive click
(``clicked_parts_only``, :func:`clicked_parts`; docs/RESULTS.md, "Only the parts that hold a
positive click").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import InputError
from .geometry import MODEL_SPACING
from .sampling import nonzero_box
from .walker import random_walker, random_walker_exact

CLICK_WALKER_MODES = ("ct", "on", "off")
CT_AIR_BELOW = -500.0
"""A volume with intensities below this holds air in Hounsfield units: a CT."""


def looks_like_ct(volume_minimum: float) -> bool:
    """Whether a volume with this lowest intensity is a CT in Hounsfield units (air about
    -1000; MR and most other images have no negative values)."""
    return float(volume_minimum) < CT_AIR_BELOW


CLICK_SEED_MM = 4.5
"""Radius of the ball a click fixes in the click walker (the random-walker baseline's 3 voxels
of 1.5 mm); :class:`RefineSettings` uses it for an object's first click."""


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
        click_walker: merge the plain random walker from the clicks into the prior
            (:func:`click_walker`): ``"ct"`` on CT volumes only (:func:`looks_like_ct`),
            ``"on"`` everywhere, ``"off"`` never (also in prompt files written before it
            existed).
        walker_step_mm: voxel side of the click walker's grid.
        walker_side: voxels per side of its cube (64 x 3 mm: the 192 mm of a 1.5 mm ROI).
        walker_seed_mm: radius of the ball that an object's only click fixes in the click
            walker.
        walker_later_seed_mm: the same radius for every click of an object once it has two
            or more: corrections land near edges, where a wider ball seeds both sides
            (docs/RESULTS.md, session 23). 4.5 mm in prompt files written before it existed.
        clicked_parts_only: where the click walker ran, keep only the parts of the mask
            (26-connected components) that hold a positive click (:func:`clicked_parts`;
            applied to every mask, it cost a BraTS oedema Dice on MR). False in prompt files
            written before it existed.
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
    click_walker: str = "ct"
    walker_step_mm: float = 3.0
    walker_side: int = 64
    walker_seed_mm: float = CLICK_SEED_MM
    walker_later_seed_mm: float = 3.0
    clicked_parts_only: bool = True

    def walks_clicks(self, volume_minimum: float) -> bool:
        """Whether the click walker runs on a volume with this lowest intensity."""
        if self.click_walker == "ct":
            return looks_like_ct(volume_minimum)
        return self.click_walker == "on"

    def walker_seed_radius_mm(self, clicks: int) -> float:
        """The click walker's seed ball radius for an object with this many clicks."""
        return self.walker_seed_mm if clicks <= 1 else self.walker_later_seed_mm

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
        if not (self.walker_seed_mm >= 0 and self.walker_later_seed_mm >= 0):
            raise InputError(
                "walker_seed_mm and walker_later_seed_mm must be >= 0, got "
                f"{self.walker_seed_mm}, {self.walker_later_seed_mm}"
            )
        if self.click_walker not in CLICK_WALKER_MODES:
            raise InputError(
                f"click_walker must be one of {CLICK_WALKER_MODES}, got {self.click_walker!r}"
            )
        if not (self.walker_step_mm > 0 and self.walker_side >= 2):
            raise InputError("walker_step_mm must be positive and walker_side at least 2")


def refine_mask(
    image: torch.Tensor,
    logits: torch.Tensor,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    spacing: Sequence[float] = (MODEL_SPACING,) * 3,
    settings: RefineSettings | None = None,
    walker: torch.Tensor | None = None,
) -> torch.Tensor:
    """The refined mask (bool, the shape of ``image``).

    Args:
        image: (X, Y, Z) intensities (clipped as the model sees them; the scale does not matter).
        logits: (X, Y, Z) the model's logits upsampled to the image's voxels.
        points: click positions in voxel coordinates of ``image`` (outside ones are ignored).
        labels: 1 for a positive click, 0 for a negative one.
        spacing: voxel sizes in mm.
        settings: :class:`RefineSettings`.
        walker: (X, Y, Z) the click walker's probability on the same voxels
            (:func:`click_walker`), merged into the prior by a noisy OR; None: the model alone.
    """
    settings = settings or RefineSettings()
    if image.shape != logits.shape or image.dim() != 3:
        raise InputError(f"image {tuple(image.shape)} and logits {tuple(logits.shape)} differ")
    prob = torch.sigmoid(logits.float())
    if walker is not None:
        if walker.shape != prob.shape:
            raise InputError(f"walker {tuple(walker.shape)} and logits {tuple(prob.shape)} differ")
        prob = 1 - (1 - prob) * (1 - walker.float().clamp(0, 1))
    mask = logits > 0 if walker is None else prob > 0.5
    band = (prob > settings.band) & (prob < 1 - settings.band)
    box = _band_box(band, spacing, settings.margin_mm)
    only_clicked = settings.clicked_parts_only and walker is not None
    if box is None:
        return clicked_parts(mask, points, labels) if only_clicked else mask
    start = [s.start for s in box]
    sub_image, sub_prob = image[box].float(), prob[box]
    factors = coarsening(sub_image.shape, spacing, settings.max_voxels)
    shape = sub_image.shape
    if any(f > 1 for f in factors):
        sub_image = block_mean(sub_image, factors)
        sub_prob = block_mean(sub_prob, factors)
    steps = [h * f for h, f in zip(spacing, factors, strict=True)]
    seeds = torch.full(sub_image.shape, -1, dtype=torch.int8, device=image.device)
    reach = [int(settings.seed_mm // h) for h in steps]
    for point, label in zip(points, labels, strict=True):
        (local,) = block_coordinates([np.subtract(point, start)], factors)
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
    return clicked_parts(mask, points, labels) if only_clicked else mask


def clicked_parts(
    mask: torch.Tensor, points: Sequence[Sequence[float]], labels: Sequence[int]
) -> torch.Tensor:
    """``mask`` without its 26-connected components that hold no positive click.

    A part of the mask that no positive click reached is the model's or the walker's guess,
    mostly a leak into a neighbouring structure of similar intensity; the user adds a part
    they want with a click in it. Unchanged when no positive click lies in the mask.
    """
    array = mask.cpu().numpy()
    box = nonzero_box(array)
    if box is None:
        return mask
    # the components lie inside the mask's bounding box: label only that
    parts, count = ndimage.label(array[box], structure=np.ones((3, 3, 3), dtype=bool))
    clicked = set()
    for point, label in zip(points, labels, strict=True):
        voxel = tuple(int(round(v)) - s.start for v, s in zip(point, box, strict=True))
        if label and all(0 <= v < n for v, n in zip(voxel, parts.shape, strict=True)):
            clicked.add(int(parts[voxel]))
    clicked.discard(0)
    if not clicked or len(clicked) == count:
        return mask
    keep = np.zeros(count + 1, dtype=bool)
    keep[list(clicked)] = True
    kept = np.zeros_like(array)
    kept[box] = keep[parts]
    return torch.from_numpy(kept).to(mask.device)


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


def block_mean(array: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Block means over ``factors`` (a partial last block padded with copies of the last
    plane).

    On a CPU ``avg_pool3d`` shares its work out by batch and channel, so the first axis is
    cut into one slab of whole blocks per thread, given as a batch: the same windows, the
    same values (the planes that make the slabs even are dropped from the result).
    """
    pads = []
    for n, f in zip(reversed(array.shape), reversed(factors), strict=True):
        pads += [0, -n % f]
    rows = -(-array.shape[0] // factors[0])
    parts = max(1, min(torch.get_num_threads(), rows)) if array.device.type == "cpu" else 1
    pads[-1] += (-rows % parts) * factors[0]
    padded = F.pad(array[None, None], pads, mode="replicate")[0, 0]
    means = F.avg_pool3d(padded.reshape(parts, 1, -1, *padded.shape[1:]), tuple(factors))
    return means.reshape(-1, *means.shape[-2:])[:rows]


def block_coordinates(points, factors) -> list[np.ndarray]:
    """Voxel coordinates of ``points`` on the grid :func:`block_mean` gives for ``factors``
    (one factor for every axis, or one per axis)."""
    factors = np.asarray(factors, dtype=np.float64)
    return [(np.asarray(p, dtype=np.float64) + 0.5) / factors - 0.5 for p in points]


def _band_box(band: torch.Tensor, spacing: Sequence[float], margin_mm: float):
    """Bounding box of the band grown by ``margin_mm``, or None if the band is empty."""
    # the occupied rows of each axis from one projection and one reduction over the outer
    # axes, as a maximum over bytes: on a CPU several times faster than ``any`` over bools
    flags = band.view(torch.uint8)
    plane = flags.amax(dim=2)
    if not bool(plane.any()):
        return None
    profiles = (plane.amax(dim=1), plane.amax(dim=0), flags.flatten(0, 1).amax(dim=0))
    box = []
    for axis, profile in enumerate(profiles):
        hits = profile.nonzero()[:, 0]
        grow = int(np.ceil(margin_mm / spacing[axis]))
        lo = max(int(hits[0]) - grow, 0)
        hi = min(int(hits[-1]) + 1 + grow, band.shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)


CLICK_WALKER_BETA = 90.0
"""Edge sensitivity of the click walker (the random-walker baseline's)."""


COARSEST_SIDE = 16
"""The click walker's grids are halved along every axis at least this long."""


def click_seeds(
    shape, points, labels, radius: float, closed_faces=None, device=None
) -> torch.Tensor:
    """Seeds (int8: 1 foreground, 0 background, -1 unknown) of a plain random walker.

    Every click fixes the voxels within ``radius`` (at least its nearest voxel) to its label;
    the faces marked in ``closed_faces`` ((3, 2) booleans, low and high face per axis; None:
    all) are background.
    """
    seeds = torch.full(tuple(shape), -1, dtype=torch.int8, device=device)
    faces = np.ones((3, 2), dtype=bool) if closed_faces is None else np.asarray(closed_faces)
    for axis in range(3):
        if faces[axis, 0]:
            seeds.narrow(axis, 0, 1).fill_(0)
        if faces[axis, 1]:
            seeds.narrow(axis, shape[axis] - 1, 1).fill_(0)
    radius = max(float(radius), 0.75)
    for point, label in zip(points, labels, strict=True):
        centre = np.asarray(point, dtype=np.float64)
        lo = np.maximum(np.ceil(centre - radius).astype(int), 0)
        hi = np.minimum(np.floor(centre + radius).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        axes = [
            (torch.arange(a, b, dtype=torch.float64, device=device) - c).square()
            for a, b, c in zip(lo, hi, centre, strict=True)
        ]
        distance = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        seeds[box][distance <= radius**2] = int(bool(label))
    return seeds


def click_walker(
    image: torch.Tensor,
    points,
    labels,
    closed_faces=None,
    radius: float = CLICK_SEED_MM / 3.0,
    tolerance: float = 1e-2,
    iterations: int = 300,
) -> torch.Tensor | None:
    """The plain random walker from the clicks: the probability that a walk from each voxel
    meets a positive click before a negative click or a closed face of the box.

    Solved coarse to fine: the solution on a grid twice as coarse along every axis of at
    least :data:`COARSEST_SIDE` voxels (recursively; the coarsest grid is solved exactly by
    :func:`fastsam3d.walker.random_walker_exact`) starts the solve, so that the probability
    has already spread through large uniform regions: a residual test alone stops a solve
    from zero long before that.

    Args:
        image: (X, Y, Z) intensities on an isotropic grid (clipped as the model sees them).
        points: click positions in voxel coordinates of ``image``.
        labels: 1 for a positive click, 0 for a negative one.
        closed_faces: (3, 2) booleans, the faces of the box that count as background (None:
            all); faces at the volume's edge should be open.
        radius: seed ball radius in voxels.
        tolerance, iterations: of the conjugate-gradient solve on the finest grid.

    Returns:
        (X, Y, Z) probabilities, or None without a positive click in the box or without any
        background (no closed face and no negative click in the box).
    """
    seeds = click_seeds(image.shape, points, labels, radius, closed_faces, image.device)
    if not bool((seeds == 1).any()) or not bool((seeds == 0).any()):
        return None
    factors = [2 if n >= COARSEST_SIDE else 1 for n in image.shape]
    if all(f == 1 for f in factors):  # the coarsest grid: solved exactly
        return random_walker_exact(image, seeds, beta=CLICK_WALKER_BETA)
    coarse = click_walker(
        block_mean(image.float(), factors),
        block_coordinates(points, factors),
        labels,
        closed_faces,
        radius / 2,
        tolerance,
        iterations,
    )
    initial = None
    if coarse is not None:
        initial = F.interpolate(coarse[None, None], size=tuple(image.shape), mode="trilinear")[0, 0]
    return random_walker(
        image,
        seeds,
        beta=CLICK_WALKER_BETA,
        iterations=iterations,
        tol=tolerance,
        initial=initial,
    )
