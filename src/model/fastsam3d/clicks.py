"""Click simulation: batched GPU sampling for training, exact protocols for evaluation.

Points are (x, y, z) voxel indices of the volume / crop in tensor dims (2, 3, 4) order (the
model's convention); labels are 1 = positive (inside the target), 0 = negative.

Training (:func:`sample_training_clicks`) samples one click per batch element on the device,
uniformly from the error region (FN ∪ FP) or weighted towards the interior of large error
regions (a blurred-error weight that stands in for the distance transform), in one pass.

Evaluation protocols (numpy / scipy, exact, one volume at a time):

- ``ritm`` (:func:`ritm_click`): the official FastSAM3D "default" click: EDT of FN and FP with
  a zero border, the larger map wins, a uniformly random voxel whose EDT exceeds half the
  larger maximum.
- ``random`` (:func:`random_click`): a uniformly random voxel of FN ∪ FP.
- ``cvpr25`` (:func:`cvpr25_click`): the voxel of maximal EDT inside the largest
  26-connected component of the error (ties broken at random).

Every function returns ``None`` when the prediction is already perfect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .synth import gaussian_blur


def _race_argmax(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per row an index drawn with probability proportional to ``weights`` (B, N) >= 0.

    Exponential race: argmin of E_i / w_i with E_i ~ Exp(1), one vectorised pass.
    """
    uniform = torch.rand(weights.shape, generator=generator, device=weights.device)
    keys = -torch.log(uniform.clamp(min=1e-20)) / weights.clamp(min=1e-30)
    keys = torch.where(weights > 0, keys, torch.full_like(keys, float("inf")))
    return keys.argmin(1)


def _coarse_blur(mask: torch.Tensor, sigma: float, factor: int = 4) -> torch.Tensor:
    """Gaussian blur of a (B, 1, X, Y, Z) float mask computed on a ``factor`` x coarser grid."""
    if any(s % factor for s in mask.shape[2:]):
        factor = 1
    coarse = F.avg_pool3d(mask, factor) if factor > 1 else mask
    sigmas = torch.full((mask.shape[0], 3), sigma / factor, device=mask.device)
    blurred = gaussian_blur(coarse, sigmas)
    return F.interpolate(blurred, size=mask.shape[2:], mode="trilinear", align_corners=False)


def sample_training_clicks(
    pred: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator,
    core: torch.Tensor | bool = False,
    core_sigma: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per sample from the error region, on the tensors' device.

    Args:
        pred: (B, 1, X, Y, Z) bool current prediction.
        target: (B, 1, X, Y, Z) bool ground truth.
        generator: random source on that device.
        core: bool or (B,) bool: weight voxels by the blurred error squared, which favours the
            inner core of the largest error regions (like the official RITM click).
        core_sigma: blur width (voxels) for ``core``.

    Returns:
        points (B, 1, 3) float voxel indices and labels (B, 1) long: 1 for a false negative,
        0 for a false positive, -1 (padding point, ignored by the prompt encoder) when the
        prediction is perfect.
    """
    batch = pred.shape[0]
    fn = target & ~pred
    error = (fn | (pred & ~target)).float()
    core = torch.as_tensor(core, device=pred.device).expand(batch)
    if bool(core.any()):
        weighted = error * _coarse_blur(error, core_sigma).square()
        error = torch.where(core[:, None, None, None, None], weighted, error)
    flat = error.flatten(1)
    index = _race_argmax(flat, generator)
    shape = pred.shape[2:]
    points = torch.stack(torch.unravel_index(index, shape), dim=-1).float()[:, None]
    positive = fn.flatten(1).gather(1, index[:, None]).long()
    labels = torch.where(flat.amax(1, keepdim=True) > 0, positive, torch.full_like(positive, -1))
    return points, labels


@dataclass(frozen=True)
class Click:
    """One simulated click: (x, y, z) voxel index and whether it is positive."""

    point: tuple[int, int, int]
    positive: bool


def _edt_black_border(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the nearest False voxel, the outside of the array counting as False.

    Matches ``edt.edt(mask, black_border=True)`` (the official code pads by one zero voxel).
    """
    padded = np.pad(mask, 1)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1, 1:-1]


def _click_at(index, gt: np.ndarray) -> Click:
    point = tuple(int(i) for i in index)
    return Click(point, bool(gt[point]))


def random_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Click | None:
    """A uniformly random voxel of FN ∪ FP (official ``'random'``)."""
    candidates = np.argwhere(pred != gt)
    if not len(candidates):
        return None
    return _click_at(candidates[rng.integers(len(candidates))], gt)


def ritm_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Click | None:
    """Official FastSAM3D ``'default'`` / ``'ritm'`` click.

    EDT (zero border) of FN and of FP; the map with the larger maximum wins (FN on ties loses,
    as ``maxFN > maxFP`` is required for a positive click); a uniformly random voxel of that map
    whose distance exceeds half of the larger maximum.
    """
    fn, fp = gt & ~pred, pred & ~gt
    if not (fn.any() or fp.any()):
        return None
    dist_fn, dist_fp = _edt_black_border(fn), _edt_black_border(fp)
    top_fn, top_fp = dist_fn.max(), dist_fp.max()
    chosen = dist_fn if top_fn > top_fp else dist_fp
    candidates = np.argwhere(chosen > max(top_fn, top_fp) / 2)
    return _click_at(candidates[rng.integers(len(candidates))], gt)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool volume (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def cvpr25_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Click | None:
    """CVPR'25 challenge click: the deepest voxel of the largest 26-connected error component.

    The EDT is computed inside the component's bounding box padded by 25 % per side (zero
    outside the component); ties are broken uniformly at random.
    """
    component = largest_component(pred != gt)
    if not component.any():
        return None
    coords = np.argwhere(component)
    low, high = coords.min(0), coords.max(0) + 1
    pad = np.ceil((high - low) * 0.25).astype(int)
    low, high = np.maximum(low - pad, 0), np.minimum(high + pad, gt.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    dist = _edt_black_border(component[box])
    best = np.argwhere(dist == dist.max())
    return _click_at(best[rng.integers(len(best))] + low, gt)


PROTOCOLS = ("fastsam3d", "cvpr25")


def protocol_click(
    protocol: str, index: int, pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator
) -> Click | None:
    """The click number ``index`` (0-based) of an evaluation protocol.

    ``fastsam3d``: RITM for clicks 1-2, then uniformly random error voxels (official schedule).
    ``cvpr25``: :func:`cvpr25_click` every time.

    Raises:
        ValueError: unknown protocol.
    """
    if protocol == "fastsam3d":
        return (ritm_click if index < 2 else random_click)(pred, gt, rng)
    if protocol == "cvpr25":
        return cvpr25_click(pred, gt, rng)
    raise ValueError(f"unknown click protocol {protocol!r}; choose from {PROTOCOLS}")
