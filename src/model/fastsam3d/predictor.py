"""Model calls for one volume: ROI input, cached embeddings, decoding. Torch lives here."""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np
import torch

from .cache import PREPROCESSING_VERSION, EmbeddingCache, EmbeddingKey
from .errors import InputError
from .geometry import Volume
from .modeling.sam3d import Sam3D
from .roi import Roi, normalise

logger = logging.getLogger(__name__)

_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """One lock per model, so that sessions and background jobs take turns on it."""
    with _LOCKS_GUARD:
        try:
            lock = _MODEL_LOCKS.get(model)
            if lock is None:
                lock = _MODEL_LOCKS[model] = threading.RLock()
        except TypeError:  # not hashable or not weak-referenceable: keep a lock on the model
            lock = _lock_attribute(model)
        return lock


def _lock_attribute(model) -> threading.RLock:
    lock = getattr(model, "_fastsam3d_lock", None)
    if lock is None:
        lock = threading.RLock()
        try:
            object.__setattr__(model, "_fastsam3d_lock", lock)
        except (AttributeError, TypeError):
            logger.warning("cannot attach a lock to %s: do not share it across threads", model)
    return lock


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the best available one (cuda > mps > cpu) when None or "auto".

    Raises:
        InputError: the requested device is not available.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r}: use 'cpu', 'cuda', 'mps' or 'auto'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available (torch reports no GPU): use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise InputError(
            f"there is no GPU {device!r}: torch sees {count} (cuda:0 to cuda:{count - 1})"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("MPS is not available on this machine: use device='cpu'")
    return dev


def _model_device(model) -> torch.device | None:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return None if param is None else param.device


class RoiPredictor:
    """Encodes and decodes ROIs of one volume with one model.

    Args:
        model: a Sam3D-like module with ``config``, ``signature``, ``encode`` and ``decode``.
        volume: the volume.
        device: where the model runs (the model is moved there if needed).
        cache: where embeddings are kept.
        spacing: model grid spacing (mm).
        clip: intensity clipping before normalisation, or None.
        whole_volume: resample the whole volume once and crop ROIs from it (False: sample each
            ROI on its own, for a grid that serves only a few ROIs).
    """

    def __init__(
        self,
        model,
        volume: Volume,
        device,
        cache: EmbeddingCache,
        spacing,
        clip,
        whole_volume: bool = True,
    ):
        self.model, self.volume, self.cache = model, volume, cache
        self.whole_volume = whole_volume
        self.device = resolve_device(device)
        current = _model_device(model)
        if current is not None and current != self.device:
            logger.info("moving the model from %s to %s", current, self.device)
            model.to(self.device)
        self.roi_size = int(getattr(getattr(model, "config", None), "image_size", 128))
        self.spacing, self.clip = float(spacing), clip
        self.lock = model_lock(model)

    @property
    def model_signature(self) -> str:
        signature = getattr(self.model, "signature", None)
        return (
            signature
            if signature is not None
            else f"{type(self.model).__name__}@{id(self.model):x}"
        )

    @property
    def scope(self) -> tuple[str, str, str, str]:
        prep = f"v{PREPROCESSING_VERSION}:{self.spacing}:{self.roi_size}:{self.clip}"
        return (self.volume.signature, self.model_signature, prep, str(self.device))

    def key(self, roi: Roi) -> EmbeddingKey:
        return EmbeddingKey(*self.scope, origin=tuple(int(o) for o in roi.origin))

    def cached_origins(self) -> list[tuple[int, int, int]]:
        return self.cache.origins(self.scope)

    def model_input(self, roi: Roi) -> np.ndarray:
        """The normalised crop (x, y, z) the encoder sees, float32 ``size^3``."""
        shape = (roi.size,) * 3
        crop = self.volume.model_region(roi.origin, shape, self.spacing, self.whole_volume)
        return normalise(crop, self.clip)

    def embedding(self, roi: Roi) -> tuple[torch.Tensor, bool]:
        """The ROI's embedding and whether the encoder had to run for it."""
        key = self.key(roi)
        emb = self.cache.get(key)
        if emb is not None:
            return emb, False
        x = torch.from_numpy(self.model_input(roi))[None, None].to(self.device)
        with self.lock, torch.inference_mode():
            emb = self.model.encode(x)
        self.cache.put(key, emb)
        logger.debug("encoded ROI %s", roi.origin)
        return emb, True

    def decode(self, roi: Roi, points: np.ndarray, labels: np.ndarray, mask_input):
        """Decode one prompt set in one ROI.

        Args:
            roi: the ROI.
            points: (N, 3) model voxel coordinates (x, y, z).
            labels: (N,) 1 = positive, 0 = negative.
            mask_input: previous low-res logits (32, 32, 32) or None.

        Returns:
            ``(low_res, iou, encoded)``: logits (32, 32, 32) float32 on the CPU, the predicted
            IoU and whether the encoder ran.
        """
        emb, encoded = self.embedding(roi)
        with self.lock, torch.inference_mode():
            pts = torch.as_tensor(np.asarray(points)[None], dtype=torch.float32, device=self.device)
            lab = torch.as_tensor(np.asarray(labels)[None], dtype=torch.int64, device=self.device)
            prev = None
            if mask_input is not None:
                prev = torch.as_tensor(mask_input[None, None], device=self.device).to(emb.dtype)
            # Sam3D can skip the 128^3 mask: the session maps the logits itself.
            skip_mask = {"return_mask": False} if isinstance(self.model, Sam3D) else {}
            low, iou, _ = self.model.decode(emb, pts, lab, prev, False, **skip_mask)
            low_np = low[0, 0].float().cpu().numpy()
        return low_np, float(iou.reshape(-1)[0]), encoded
