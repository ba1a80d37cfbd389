"""GPU-vectorised SynthSeg-style generator: label maps -> random-contrast training images.

Every function works on a whole batch at once (one kernel per step, no per-voxel Python), on
whatever device its inputs live on, and draws its randomness from an explicit
:class:`torch.Generator` on that device so runs are reproducible.

The pipeline (see :func:`synthesize`):

1. a random spatial transform per sample (flip, rotation, scale, shear, smooth elastic field)
   turned into a sampling grid (:func:`random_grid`), applied to the seed label map with
   nearest-neighbour sampling (:func:`sample_labels`, in ``data.py``'s crop step);
2. procedural shapes (random deformed ellipsoids and tubes) overlaid as new labels
   (:func:`add_shapes`);
3. per-label Gaussian intensity mixtures (:func:`label_intensities`);
4. partial volume and slice thickness as an anisotropic per-sample Gaussian blur
   (:func:`gaussian_blur`), a smooth multiplicative bias field, gamma and Gaussian noise
   (:func:`corrupt`).

Volumes are (B, 1, X, Y, Z) with tensor dims (2, 3, 4) = RAS (x, y, z), as the model expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the random generator (voxel units are 1.5 mm model voxels)."""

    flip: bool = True
    rotation_deg: float = 20.0
    scale: tuple[float, float] = (0.8, 1.25)
    zoom: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.05
    elastic_std: float = 3.0
    elastic_grid: int = 5
    shape_prob: float = 0.5
    shapes_only_prob: float = 0.1
    max_blobs: int = 3
    max_tubes: int = 2
    std_max: float = 0.08
    background_zero_prob: float = 0.4
    blur_max: float = 1.0
    thick_slice_prob: float = 0.3
    thick_slice_max: float = 2.5
    bias_std: float = 0.3
    gamma_std: float = 0.25
    noise_max: float = 0.06


def _uniform(shape, low, high, generator: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, 3, 3) from Euler angles (B, 3) in radians (R = Rz Ry Rx)."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1)
    return rz.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rx.view(-1, 3, 3)


def random_affine(
    batch: int, config: SynthConfig, generator: torch.Generator, device
) -> torch.Tensor:
    """Random linear maps (B, 3, 3) from output to source voxel offsets.

    Composes a rotation, a shear, per-axis scales and (optionally) per-axis flips. A
    ``config.zoom`` range other than (1, 1) also draws one isotropic factor per sample
    (log-uniform; below 1 the crop shows a smaller region, as a finer inference grid does).
    """
    angles = _uniform((batch, 3), -1.0, 1.0, generator, device) * math.radians(config.rotation_deg)
    log_lo, log_hi = (math.log(v) for v in config.scale)
    scales = _uniform((batch, 3), log_lo, log_hi, generator, device).exp()
    if tuple(config.zoom) != (1.0, 1.0):
        zoom_lo, zoom_hi = (math.log(v) for v in config.zoom)
        scales = scales * _uniform((batch, 1), zoom_lo, zoom_hi, generator, device).exp()
    if config.flip:
        scales = scales * torch.where(
            torch.rand((batch, 3), generator=generator, device=device) < 0.5, -1.0, 1.0
        )
    shear = torch.eye(3, device=device).repeat(batch, 1, 1)
    shear = shear + _uniform((batch, 3, 3), -config.shear, config.shear, generator, device) * (
        1 - torch.eye(3, device=device)
    )
    return _rotation(angles) @ shear @ torch.diag_embed(scales)


def elastic_field(
    batch: int, size: int, config: SynthConfig, generator: torch.Generator, device
) -> torch.Tensor:
    """Smooth random displacements (B, size, size, size, 3) in voxels (cubic-upsampled noise)."""
    grid = config.elastic_grid
    coarse = torch.randn((batch, 3, grid, grid, grid), generator=generator, device=device)
    coarse = (
        coarse
        * config.elastic_std
        * torch.rand((batch, 1, 1, 1, 1), generator=generator, device=device)
    )
    field = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)
    return field.permute(0, 2, 3, 4, 1)


def random_grid(
    centers: torch.Tensor, size: int, config: SynthConfig, generator: torch.Generator
) -> torch.Tensor:
    """Source voxel coordinates (B, size, size, size, 3) of a randomly deformed crop.

    Args:
        centers: (B, 3) source voxel coordinates (x, y, z) the crop centre maps to.
        size: crop side.
        config: transform ranges.
        generator: random source on the device of ``centers``.

    Returns:
        For each output voxel, the (x, y, z) source coordinate to sample.
    """
    device, batch = centers.device, centers.shape[0]
    axis = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    offsets = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    linear = random_affine(batch, config, generator, device)
    coords = torch.einsum("bij,xyzj->bxyzi", linear, offsets)
    coords = coords + elastic_field(batch, size, config, generator, device)
    return coords + centers.float()[:, None, None, None, :]


def sample_volume(
    volume: torch.Tensor, coords: torch.Tensor, mode: str, fill: float = 0.0
) -> torch.Tensor:
    """Sample one volume (1, 1, X, Y, Z) at voxel coordinates (N, S, S, S, 3).

    Args:
        volume: source volume (float).
        coords: (x, y, z) voxel coordinates in the source's tensor dims (2, 3, 4).
        mode: "nearest" (labels) or "bilinear" (trilinear intensities).
        fill: value outside the source.

    Returns:
        (N, 1, S, S, S) samples.
    """
    shape = torch.tensor(volume.shape[2:], device=coords.device, dtype=coords.dtype)
    grid = (2 * coords / (shape - 1).clamp(min=1) - 1).flip(-1)
    source = volume - fill if fill else volume
    out = F.grid_sample(
        source.expand(coords.shape[0], -1, -1, -1, -1),
        grid.to(volume.dtype),
        mode=mode,
        padding_mode="zeros",
        align_corners=True,
    )
    return out + fill if fill else out


def _unit_grid(size: int, device) -> torch.Tensor:
    axis = torch.arange(size, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def random_blobs(batch: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """One random deformed ellipsoid per sample, (B, 1, S, S, S) bool."""
    grid = _unit_grid(size, device)
    center = _uniform((batch, 1, 1, 1, 3), 0.25 * size, 0.75 * size, generator, device)
    radii = _uniform((batch, 1, 1, 1, 3), 0.04 * size, 0.2 * size, generator, device)
    rot = _rotation(_uniform((batch, 3), -math.pi, math.pi, generator, device))
    local = torch.einsum("bij,bxyzj->bxyzi", rot.transpose(1, 2), grid - center) / radii
    noise = torch.randn((batch, 1, 4, 4, 4), generator=generator, device=device)
    noise = F.interpolate(noise, size=(size,) * 3, mode="trilinear", align_corners=True)[:, 0]
    return ((local.square().sum(-1) + 0.4 * noise) < 1.0)[:, None]


def random_tubes(batch: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """One random curved tube (quadratic Bezier centreline) per sample, (B, 1, S, S, S) bool.

    The distance to the centreline is computed on a 4x coarser grid and upsampled trilinearly
    (distance fields are 1-Lipschitz, so this is accurate to well under a voxel at these radii).
    """
    coarse = max(size // 4, 2)
    ctrl = _uniform((batch, 3, 1, 3), 0.0, size - 1.0, generator, device)
    t = torch.linspace(0, 1, 48, device=device)[None, None, :, None]
    curve = (1 - t) ** 2 * ctrl[:, 0:1] + 2 * (1 - t) * t * ctrl[:, 1:2] + t**2 * ctrl[:, 2:3]
    grid = _unit_grid(coarse, device).view(1, -1, 1, 3) * (size - 1) / max(coarse - 1, 1)
    dist = (grid - curve).square().sum(-1).min(-1).values.sqrt()
    dist = F.interpolate(
        dist.view(batch, 1, coarse, coarse, coarse),
        size=(size,) * 3,
        mode="trilinear",
        align_corners=True,
    )
    radius = _uniform((batch, 1, 1, 1, 1), 1.5, 0.05 * size + 1.5, generator, device)
    return dist < radius


def add_shapes(
    labels: torch.Tensor,
    config: SynthConfig,
    generator: torch.Generator,
    allow: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlay procedural shapes as new label ids; some samples become shapes-only scenes.

    Args:
        labels: (B, 1, S, S, S) integer label crops (0 = background).
        config: probabilities and counts.
        generator: random source on the labels' device.
        allow: (B,) bool, samples that may be changed (default all).

    Returns:
        The new label crops and, per sample, the id of the last shape added (0: none).
    """
    batch, size, device = labels.shape[0], labels.shape[-1], labels.device
    allow = torch.ones(batch, dtype=torch.bool, device=device) if allow is None else allow
    wipe = allow & (torch.rand(batch, generator=generator, device=device) < config.shapes_only_prob)
    labels = torch.where(wipe[:, None, None, None, None], torch.zeros_like(labels), labels)
    use = wipe | allow & (torch.rand(batch, generator=generator, device=device) < config.shape_prob)
    next_id = labels.flatten(1).amax(1) + 1
    last = torch.zeros(batch, dtype=labels.dtype, device=device)
    makers = [random_blobs] * config.max_blobs + [random_tubes] * config.max_tubes
    for index, make in enumerate(makers):
        keep = torch.rand(batch, generator=generator, device=device) < (1.0 if index == 0 else 0.5)
        active = use & keep
        shape = make(batch, size, generator, device) & active[:, None, None, None, None]
        labels = torch.where(shape, next_id[:, None, None, None, None], labels)
        last = torch.where(active, next_id, last)
        next_id = next_id + 1
    return labels, last


def label_intensities(
    labels: torch.Tensor, config: SynthConfig, generator: torch.Generator
) -> torch.Tensor:
    """Per-label Gaussian intensity mixture: voxel ~ N(mean[label], std[label]), (B, 1, S, S, S).

    Means are uniform in [0, 1]; with ``background_zero_prob`` label 0 is set to exactly 0
    (skull-stripped MR, air-like background).
    """
    batch, device = labels.shape[0], labels.device
    count = int(labels.max().item()) + 1
    means = torch.rand((batch, count), generator=generator, device=device)
    stds = torch.rand((batch, count), generator=generator, device=device) * config.std_max
    zero_bg = torch.rand(batch, generator=generator, device=device) < config.background_zero_prob
    means[:, 0] = torch.where(zero_bg, 0.0, means[:, 0])
    stds[:, 0] = torch.where(zero_bg, 0.0, stds[:, 0])
    flat = labels.flatten(1).long()
    image = means.gather(1, flat) + stds.gather(1, flat) * torch.randn(
        flat.shape, generator=generator, device=device
    )
    return image.view(labels.shape)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1D Gaussian kernels (N, 2 * radius + 1); sigma 0 gives a delta."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma.clamp(min=1e-3)[:, None]).square())
    return kernel / kernel.sum(1, keepdim=True)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with its own per-axis sigma for every sample.

    Args:
        image: (B, 1, X, Y, Z).
        sigma: (B, 3) standard deviations in voxels along x, y, z.

    Returns:
        The blurred image, same shape (zero padding at the borders, renormalised).
    """
    batch = image.shape[0]
    radius = max(int(math.ceil(3 * float(sigma.max()))), 1)
    out = image.reshape(1, batch, *image.shape[2:])
    ones = torch.ones_like(out)
    for axis in range(3):
        kernel = _gaussian_kernels(sigma[:, axis], radius).to(image.dtype)
        shape = [batch, 1, 1, 1, 1]
        shape[2 + axis] = kernel.shape[1]
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, kernel.view(shape), padding=padding, groups=batch)
        ones = F.conv3d(ones, kernel.view(shape), padding=padding, groups=batch)
    return (out / ones).view_as(image)


def bias_field(
    batch: int, size: int, std: float, generator: torch.Generator, device
) -> torch.Tensor:
    """Smooth positive multiplicative field (B, 1, S, S, S): exp of upsampled 4^3 noise."""
    coarse = torch.randn((batch, 1, 4, 4, 4), generator=generator, device=device) * std
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True).exp()


def corrupt(image: torch.Tensor, config: SynthConfig, generator: torch.Generator) -> torch.Tensor:
    """Blur (partial volume / thick slices), bias field, gamma and noise on images in [0, ~1]."""
    batch, size, device = image.shape[0], image.shape[-1], image.device
    sigma = _uniform((batch, 3), 0.0, config.blur_max, generator, device)
    thick = torch.rand(batch, generator=generator, device=device) < config.thick_slice_prob
    axis = torch.randint(0, 3, (batch,), generator=generator, device=device)
    thick_sigma = _uniform((batch,), 1.0, config.thick_slice_max, generator, device)
    sigma = torch.where(thick[:, None] & (F.one_hot(axis, 3) > 0), thick_sigma[:, None], sigma)
    image = gaussian_blur(image, sigma)
    image = image * bias_field(batch, size, config.bias_std, generator, device)
    peak = image.flatten(1).amax(1).clamp(min=1e-6)[:, None, None, None, None]
    gamma = (
        torch.randn((batch, 1, 1, 1, 1), generator=generator, device=device) * config.gamma_std
    ).exp()
    image = (image / peak).clamp(min=0) ** gamma
    noise = _uniform((batch, 1, 1, 1, 1), 0.0, config.noise_max, generator, device)
    return image + noise * torch.randn(image.shape, generator=generator, device=device) * (
        image > 0
    )


def synthesize(
    labels: torch.Tensor,
    config: SynthConfig,
    generator: torch.Generator,
    allow_shapes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random-contrast images for deformed label crops, after overlaying procedural shapes.

    Args:
        labels: (B, 1, S, S, S) integer label crops (already spatially deformed).
        config: generator ranges.
        generator: random source on the labels' device.
        allow_shapes: (B,) bool, samples that may get procedural shapes (default all).

    Returns:
        Images (B, 1, S, S, S) float32 (not yet normalised), the final label crops, and per
        sample the id of the last procedural shape (0: none).
    """
    labels, shape_ids = add_shapes(labels, config, generator, allow_shapes)
    image = corrupt(label_intensities(labels, config, generator), config, generator)
    return image, labels, shape_ids
