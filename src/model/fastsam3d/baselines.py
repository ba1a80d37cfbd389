"""Comparison methods driven by the same simulated clicks as the model (``fastsam3d eval``).

Every segmenter has the interface of :class:`fastsam3d.evaluation.Segmenter`: ``start(crop)``
once per structure with the raw and the normalised 128^3 crop, then ``predict(points, labels)``
after every click, returning a bool mask of the crop.

- :class:`RandomWalkerSegmenter`: Grady's random walker (2006), solved matrix-free by Jacobi-
  preconditioned conjugate gradients in torch (GPU-fast, no extra dependency). Seeds: a small
  ball around every click (its label) and the crop border (background).
- The 2D slice-wise SAM (LiteMedSAM) lives in :mod:`fastsam3d.slicewise`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _edge_weights(image: torch.Tensor, beta: float) -> list[torch.Tensor]:
    """exp(-beta * (dI)^2 / mean(dI^2)) between neighbours along each axis of (X, Y, Z)."""
    diffs = [image.diff(dim=axis).square() for axis in range(3)]
    scale = torch.cat([d.flatten() for d in diffs]).mean().clamp(min=1e-12)
    return [torch.exp(-beta * d / scale) + 1e-6 for d in diffs]


def _laplacian(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Graph Laplacian times x: sum over neighbours j of w_ij (x_i - x_j)."""
    out = torch.zeros_like(x)
    for axis, w in enumerate(weights):
        flux = w * x.diff(dim=axis)
        n = x.shape[axis]
        out.narrow(axis, 0, n - 1).sub_(flux)
        out.narrow(axis, 1, n - 1).add_(flux)
    return out


def _degree(weights: list[torch.Tensor], shape) -> torch.Tensor:
    degree = torch.zeros(shape, device=weights[0].device)
    for axis, w in enumerate(weights):
        n = shape[axis]
        degree.narrow(axis, 0, n - 1).add_(w)
        degree.narrow(axis, 1, n - 1).add_(w)
    return degree


def random_walker(
    image: torch.Tensor,
    seeds: torch.Tensor,
    beta: float = 90.0,
    iterations: int = 300,
    tol: float = 1e-4,
) -> torch.Tensor:
    """Probability that a random walker from each voxel first reaches a foreground seed.

    Args:
        image: (X, Y, Z) float intensities (normalised).
        seeds: (X, Y, Z) int8: 1 foreground seed, 0 background seed, -1 unknown.
        beta: edge sensitivity.
        iterations: conjugate-gradient iterations at most.
        tol: stop when the residual norm falls below ``tol`` times the initial one.

    Returns:
        (X, Y, Z) float probabilities in [0, 1] (seeds keep their value).
    """
    weights = _edge_weights(image.float(), beta)
    unknown = (seeds < 0).float()
    fixed = (seeds == 1).float()
    rhs = -_laplacian(fixed, weights) * unknown
    inverse_diag = unknown / _degree(weights, image.shape).clamp(min=1e-12)
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    z = residual * inverse_diag
    direction = z.clone()
    rz = (residual * z).sum()
    start = residual.norm().clamp(min=1e-20)
    for _ in range(iterations):
        a_dir = _laplacian(direction, weights) * unknown
        alpha = rz / (direction * a_dir).sum().clamp(min=1e-30)
        x = x + alpha * direction
        residual = residual - alpha * a_dir
        if residual.norm() < tol * start:
            break
        z = residual * inverse_diag
        rz_new = (residual * z).sum()
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return (x * unknown + fixed).clamp(0, 1)


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
        shape = self.image.shape
        seeds = torch.full(shape, -1, dtype=torch.int8, device=self.device)
        for axis in range(3):
            seeds.narrow(axis, 0, 1).fill_(0)
            seeds.narrow(axis, shape[axis] - 1, 1).fill_(0)
        axes = [torch.arange(n, device=self.device, dtype=torch.float32) for n in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        radius = max(self.radius / self.factor, 0.75)
        for point, label in zip(points, labels, strict=True):
            centre = torch.tensor(point, dtype=torch.float32, device=self.device)
            centre = (centre + 0.5) / self.factor - 0.5
            ball = (grid - centre).square().sum(-1) <= radius**2
            seeds[ball] = int(label)
        return seeds
