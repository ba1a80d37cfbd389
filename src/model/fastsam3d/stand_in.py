"""A stand-in for ``Sam3D`` with the same ``encode`` / ``decode`` contract, for tests and demos.

It segments by thresholding what the encoder saw, so it returns the true mask of a bright object
in model space: geometry and session logic can be tested without trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn


@dataclass(frozen=True)
class StandInConfig:
    name: str = "stand-in"
    image_size: int = 128
    intensity_clip: tuple[float, float] | None = None


class ThresholdModel(nn.Module):
    """Encoder folds the input into the embedding; decoder thresholds it.

    Args:
        threshold: foreground is model input > threshold; None takes the midpoint between the
            crop's minimum and maximum.
        connected: keep only the connected components that hold a positive point (and drop
            those holding a negative point); False keeps all foreground.
        config: reported ``model.config``.

    Attributes:
        calls: ``("encode", None)`` or ``("decode", (points, labels, mask_input))`` per call,
            tensors copied to numpy (mask_input None when not given).
    """

    def __init__(
        self,
        threshold: float | None = None,
        connected: bool = True,
        config: StandInConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or StandInConfig()
        self.threshold, self.connected = threshold, connected
        self.register_buffer("_anchor", torch.zeros(1))
        self.calls: list[tuple[str, object]] = []

    @property
    def signature(self) -> str:
        return f"{self.config.name}:{self.threshold}:{self.connected}:{self.config.image_size}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) -> (B, S^3 / 512, 8, 8, 8), losslessly."""
        self.calls.append(("encode", None))
        return x.reshape(x.shape[0], -1, 8, 8, 8).clone()

    def decode(self, embedding, points, labels, mask_input=None, multimask_output=False):
        """Low-res logits = signed distance (voxels) to the foreground, averaged over 4^3.

        With ``connected``, the foreground is the thresholded components that hold a positive
        point or overlap ``mask_input > 0``, minus those holding a negative point.
        """
        record = (points.cpu().numpy(), labels.cpu().numpy())
        self.calls.append(
            ("decode", (*record, None if mask_input is None else mask_input.cpu().numpy()))
        )
        size = self.config.image_size
        images = embedding.reshape(embedding.shape[0], size, size, size).cpu().numpy()
        previous = [None] * len(images)
        if mask_input is not None:
            previous = (_upsample(mask_input.float(), size)[:, 0] > 0).cpu().numpy()
        lows = [self._logits(*args) for args in zip(images, *record, previous, strict=True)]
        low = torch.from_numpy(np.stack(lows)[:, None]).to(embedding.device)
        up = _upsample(low, size)
        iou = torch.ones(low.shape[0], 1, device=embedding.device)
        return low, iou, up > 0

    def _logits(self, image, points, labels, previous) -> np.ndarray:
        threshold = self.threshold
        if threshold is None:
            threshold = 0.5 * (float(image.min()) + float(image.max()))
        fg = image > threshold
        if self.connected:
            fg = _components(fg, points, labels, previous)
        signed = _signed_distance(fg, limit=8)
        s = image.shape[0] // 4
        return signed.reshape(s, 4, s, 4, s, 4).mean(axis=(1, 3, 5)).astype(np.float32)


def _upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    return nn.functional.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=False)


def _signed_distance(fg: np.ndarray, limit: int) -> np.ndarray:
    """Distance to the boundary (voxels; > 0 inside), clipped to +-limit, computed near fg."""
    out = np.full(fg.shape, -float(limit), dtype=np.float32)
    if not fg.any():
        return out
    where = np.argwhere(fg)
    lo = np.maximum(where.min(axis=0) - limit - 1, 0)
    hi = np.minimum(where.max(axis=0) + limit + 2, fg.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = fg[box]
    inside = ndimage.distance_transform_edt(sub)
    outside = ndimage.distance_transform_edt(~sub)
    out[box] = np.clip(inside - outside, -limit, limit)
    return out


def _components(fg, points, labels, previous) -> np.ndarray:
    """Foreground components holding a positive point or overlapping the previous mask, minus
    those holding a negative point (a crude model of click + previous-logits behaviour)."""
    comps, _ = ndimage.label(fg)
    idx = np.clip(np.rint(points).astype(int), 0, fg.shape[0] - 1)
    ids = comps[idx[:, 0], idx[:, 1], idx[:, 2]]
    keep = set(ids[labels == 1].tolist())
    if previous is not None:
        keep |= set(np.unique(comps[previous]).tolist())
    keep = keep - set(ids[labels == 0].tolist()) - {0}
    return np.isin(comps, list(keep)) if keep else np.zeros_like(fg)
