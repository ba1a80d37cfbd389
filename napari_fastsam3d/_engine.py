"""The model thread's side of the plugin: model, ``fastsam3d.Session`` and prompt reconciliation.

Used only from the model thread (:mod:`._worker`). The GUI sends full prompt snapshots; the
engine turns the difference to what the session holds into ``add_point`` calls (or a reset and
a replay when points were moved or removed) and reports the union of the changed boxes. No Qt.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastsam3d.field import union_box

from ._state import Box, CacheInfo, Prompt

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
ENV_MODEL = "NAPARI_FASTSAM3D_MODEL"
STAND_IN = "stand-in"
"""The thresholding stand-in of ``fastsam3d.stand_in`` (no weights; demos and tests only)."""


@dataclass(frozen=True)
class Change:
    """The current object's mask inside ``box`` after a call, and the prompts behind it."""

    object_id: int
    box: Box
    mask: np.ndarray
    prompts: tuple[Prompt, ...]
    voxels: int
    cache: CacheInfo
    grid_mm: float | None = None


def _key(prompts) -> list[tuple]:
    return [(p.index, p.positive) for p in prompts]


def _bbox(mask: np.ndarray, box: Box) -> Box | None:
    """Bounding box (in volume slices) of the True voxels of ``mask``, the content of ``box``."""
    plane = mask.any(axis=2)
    rows, cols, depth = plane.any(axis=1), plane.any(axis=0), mask.any(axis=(0, 1))
    if not rows.any():
        return None
    spans = []
    for flags, outer in zip((rows, cols, depth), box, strict=True):
        hits = np.flatnonzero(flags)
        spans.append(slice(outer.start + int(hits[0]), outer.start + int(hits[-1]) + 1))
    return tuple(spans)


class Engine:
    """Model + session owner. Every method runs on the model thread.

    Args:
        progress: ``progress(task, done, total)``; may raise to cancel the running task.
        cancelled: whether the user asked to cancel (checked between encoder blocks).
    """

    def __init__(self, progress: Callable[[str, int, int], None], cancelled: Callable[[], bool]):
        self._progress = progress
        self._cancelled = cancelled
        self.model: Any = None
        self.model_name: str | None = None
        self.device: str | None = None
        self.session: Any = None
        self.refine = True
        self.click_walker = "ct"
        self.clicked_parts_only = True
        self._prompts: list[Prompt] = []
        self._redo: list[Prompt] = []
        self._touched: Box | None = None
        self._last_hit: bool | None = None
        self._hooks: list[Any] = []
        self._next_id = 1
        self._shown: Box | None = None

    # ------------------------------------------------------------ model and volume

    def devices(self) -> tuple[str, ...]:
        """Devices torch can use here, best first (each GPU by index when there are several)."""
        import torch

        found = []
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            found += ["cuda"] if count == 1 else [f"cuda:{i}" for i in range(count)]
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            found.append("mps")
        return (*found, "cpu")

    def load(self, source: Any, device: str, precision: str = "fp32") -> tuple[str, str, float]:
        """Load a model (registry name, path, or an ``nn.Module``), move it, warm it up.

        ``precision`` is the image encoder's ("fp32" exact; "bf16", "int8" on a CPU: faster,
        see ``fastsam3d.modeling.sam3d.ENCODER_PRECISIONS``); a model without a fast path
        (the stand-in) ignores it. A model that cannot be prepared leaves the previous one
        in place.

        Returns:
            (display name, device used, warm-up milliseconds).
        """
        from fastsam3d.errors import InputError
        from fastsam3d.modeling.sam3d import ENCODER_PRECISIONS
        from fastsam3d.predictor import resolve_device

        if precision not in ENCODER_PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; choose {list(ENCODER_PRECISIONS)}")
        used = resolve_device(device)
        if source == STAND_IN:
            from fastsam3d.stand_in import ThresholdModel

            source = ThresholdModel(threshold=0.0)
        if hasattr(source, "encode") and hasattr(source, "decode"):
            model, name = source, getattr(getattr(source, "config", None), "name", "custom")
        else:
            model, name = self._load_weights(str(source), used), _display_name(str(source))
        model = model.to(used)
        if hasattr(model, "prepare_inference"):  # the fast path for this device
            try:
                model = model.prepare_inference(dtype=ENCODER_PRECISIONS[precision])
            except ValueError as err:  # e.g. int8 asked for on a GPU
                raise InputError(f"{precision} encoder on {used}: {err}") from None
        self._detach_hooks()
        self.session = None  # a session belongs to one model: the GUI opens a new one
        self.model, self.model_name, self.device = model, name, str(used)
        warmup_ms = self._warm_up()
        if used.type != "cuda":  # CUDA encodes in milliseconds (and replays captured graphs)
            self._attach_hooks()
        return name, self.device, warmup_ms

    def _load_weights(self, source: str, device) -> Any:
        import fastsam3d
        from fastsam3d.errors import CheckpointError

        def report(done: int, total: int) -> None:
            self._progress("download", int(done), int(total))

        try:
            return fastsam3d.load_model(source, device=device, progress=report)
        except CheckpointError as err:
            if source != DEFAULT_MODEL:
                raise
            raise CheckpointError(
                "the bundled default weights are not part of this installation. Choose "
                "'FastSAM3D (download)' or 'Local file…' in the FastSAM3D panel, or set "
                f"${ENV_MODEL} to a weights file. ({err})"
            ) from err

    def _warm_up(self) -> float:
        """One encoder and one decoder call on zeros, so that the first click is not slow."""
        import torch

        from fastsam3d.modeling.sam3d import Sam3D

        size = int(getattr(getattr(self.model, "config", None), "image_size", 128))
        skip_mask = {"return_mask": False} if isinstance(self.model, Sam3D) else {}  # as Session
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.zeros((1, 1, size, size, size), device=self.device)
            emb = self.model.encode(x)
            centre = torch.full((1, 1, 3), size / 2, device=self.device)
            label = torch.ones((1, 1), dtype=torch.int64, device=self.device)
            self.model.decode(emb, centre, label, None, False, **skip_mask)
        if self.device and self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - start) * 1e3

    def _attach_hooks(self) -> None:
        """Encoder progress and cancellation, one step per transformer block."""
        blocks = getattr(getattr(self.model, "image_encoder", None), "blocks", None)
        if blocks is None:
            return
        total = len(blocks)
        for i, block in enumerate(blocks):

            def hook(_module, _inputs, i=i):
                self._progress("encoding", i, total)

            self._hooks.append(block.register_forward_pre_hook(hook))

    def _detach_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def open(self, array: Any, affine: Any, labels: np.ndarray | None = None) -> None:
        """Start a session on a volume; ``labels`` seeds the committed objects (copied)."""
        import fastsam3d

        if self.model is None:
            raise _session_error("load a model first (choose one in the FastSAM3D panel)")
        volume = fastsam3d.Volume(np.asarray(array), np.asarray(affine, dtype=np.float64))
        seed = None if labels is None else np.array(labels, dtype=np.uint16)
        self.session = fastsam3d.Session(
            self.model, volume, device=self.device, labels=seed, settings=self._settings()
        )
        self._prompts, self._redo, self._touched, self._last_hit = [], [], None, None
        self._shown = None
        self._next_id = 1 if seed is None else int(seed.max(initial=0)) + 1

    @property
    def has_session(self) -> bool:
        return self.session is not None

    @property
    def current_id(self) -> int:
        """The id the current object will get on commit (the session's largest id + 1)."""
        return self._next_id

    # ------------------------------------------------------------ prompts

    def apply_prompts(self, object_id: int, prompts: tuple[Prompt, ...]) -> Change | None:
        """Make the session hold exactly ``prompts`` for the current object.

        Returns None when nothing changed or the request is for an object already committed.
        """
        self._require_session()
        if object_id != self.current_id:
            logger.debug("dropping prompts for object %d (current %d)", object_id, self.current_id)
            return None
        if _key(prompts) == _key(self._prompts):
            self._prompts = list(prompts)
            return None
        box = None
        if _key(prompts[: len(self._prompts)]) != _key(self._prompts):
            box = union_box(box, self.session.reset().box)
            self._prompts, self._touched = [], None
        for prompt in prompts[len(self._prompts) :]:
            update = self.session.add_point_result(prompt.index, prompt.positive)
            self._prompts.append(prompt)
            self._redo = []
            self._note(update)
            box = union_box(box, update.box)
        return self._change(box)

    def undo(self) -> Change | None:
        self._require_session()
        if not self.session.can_undo:
            return None
        update = self.session.undo_result()
        self._redo.append(self._prompts.pop())
        return self._change(update.box)

    def redo(self) -> Change | None:
        self._require_session()
        if not self.session.can_redo:
            return None
        update = self.session.redo_result()
        self._prompts.append(self._redo.pop())
        return self._change(update.box)

    def reset(self) -> Change | None:
        self._require_session()
        update = self.session.reset()
        self._prompts, self._redo, self._touched = [], [], None
        return self._change(update.box)

    def commit(self) -> tuple[int, int, int, Box, np.ndarray]:
        """Commit the current object.

        Returns:
            (its id, its voxel count, the next object's id, the changed box, the session's
            label map inside that box).
        """
        self._require_session()
        voxels = self._voxels()
        object_id = int(self.session.commit())
        box = self.session.last_update.box
        self._prompts, self._redo, self._touched, self._shown = [], [], None, None
        self._next_id = max(self._next_id, object_id + 1)
        return object_id, voxels, self._next_id, box, np.array(self.session.labels[box])

    def volume_note(self) -> str:
        """What the user should know about the open volume (empty when nothing)."""
        session = self.session
        if session is None or session.settings.refine is None or session.refines:
            return ""
        limit = session.settings.refine.max_spacing_mm
        return (
            f"masks are not snapped to image edges on this volume: its voxels are up to "
            f"{max(session.volume.spacing):.3g} mm long (the refinement stops at {limit:g} mm)."
        )

    def set_refine(self, enabled: bool) -> Change | None:
        """Snap masks to image edges or not (:mod:`fastsam3d.refine`); re-renders the object."""
        self.refine = bool(enabled)
        return self._rerender()

    def set_click_walker(self, mode: str) -> Change | None:
        """When the snapping adds the click walker (``RefineSettings.click_walker``: "ct",
        "on" or "off"); re-renders the object."""
        from fastsam3d.errors import InputError
        from fastsam3d.refine import CLICK_WALKER_MODES

        if mode not in CLICK_WALKER_MODES:
            raise InputError(f"click walker mode must be one of {CLICK_WALKER_MODES}, got {mode!r}")
        self.click_walker = mode
        return self._rerender()

    def set_clicked_parts_only(self, enabled: bool) -> Change | None:
        """Whether the snapping drops mask parts that hold no positive click
        (``RefineSettings.clicked_parts_only``); re-renders the object."""
        self.clicked_parts_only = bool(enabled)
        return self._rerender()

    def _rerender(self) -> Change | None:
        """Apply :meth:`_settings` to the session and render the current object again."""
        if self.session is None:
            return None
        self.session.settings = self._settings()
        return self._change(self.session.refresh().box)

    def _settings(self):
        from fastsam3d.refine import RefineSettings
        from fastsam3d.session import SessionSettings

        current = SessionSettings() if self.session is None else self.session.settings
        refine = (
            RefineSettings(
                click_walker=self.click_walker, clicked_parts_only=self.clicked_parts_only
            )
            if self.refine
            else None
        )
        return current.replace(refine=refine)

    def current_change(self) -> Change:
        """The current state, for resynchronising the GUI after a failure."""
        return self._change(self._touched)

    def close(self) -> None:
        self._detach_hooks()
        self.session = self.model = None

    # ------------------------------------------------------------ internals

    def _require_session(self) -> None:
        if self.session is None:
            raise _session_error("no image is open in the FastSAM3D panel yet: choose an image")

    def _note(self, update) -> None:
        self._touched = union_box(self._touched, update.box)
        if update.rois:
            self._last_hit = update.encoded == 0

    def _voxels(self) -> int:
        """Voxels of the current object (all inside the bounding box last sent)."""
        if self._shown is None:
            return 0
        return int(np.count_nonzero(self.session.mask[self._shown]))

    def _change(self, box: Box | None) -> Change:
        """The update for the GUI: only where the mask was or is (not the whole changed ROI).

        The session reports every voxel whose logits were rewritten (whole ROIs); the GUI
        needs the union of the old and the new mask's bounding boxes, usually far smaller.
        """
        from fastsam3d.cache import DEFAULT_CACHE

        mask = self.session.mask
        if box is not None and all(s.stop > s.start for s in box):
            self._touched = union_box(self._touched, box)
            tight = _bbox(mask[box], box)
            send, self._shown = union_box(self._shown, tight), tight
        else:
            send = self._shown
        send = send or (slice(0, 0),) * 3
        return Change(
            object_id=self.current_id,
            box=send,
            mask=np.array(mask[send], dtype=bool),
            prompts=tuple(self._prompts),
            voxels=self._voxels(),
            cache=CacheInfo(len(DEFAULT_CACHE), self._last_hit),
            grid_mm=self.session.object_spacing,
        )


def _display_name(source: str) -> str:
    return os.path.basename(source) if os.path.sep in source else source


def _session_error(message: str) -> Exception:
    from fastsam3d.errors import SessionError

    return SessionError(message)
