"""Interactive segmentation of one volume: clicks in, masks out (``SamPredictor`` for volumes).

A click runs only the prompt encoder and mask decoder; ROI embeddings come from an LRU cache
(:mod:`fastsam3d.cache`) and the encoder runs once per ROI. The previous low-res logits are fed
back with every click. Results live in the volume's own voxel grid: the current object's mask
(``Session.mask``) and the instance label map of committed objects (``Session.labels``), both of
``volume.array``'s shape; every call reports the box it changed (:class:`Update`).
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch

from . import growth, prompts, zoom
from .cache import DEFAULT_CACHE, EmbeddingCache
from .errors import InputError, SessionError
from .field import Box, LogitField, Patch, empty_box, intersect_box, union_box
from .geometry import Volume
from .precompute import PrecomputeJob, ProgressCallback
from .predictor import RoiPredictor
from .refine import RefineSettings, refine_mask
from .roi import Roi, centred_roi, tile_origins
from .state import (
    Click,
    CommittedObject,
    Edit,
    ObjectState,
    SessionSettings,
    Update,
    ZoomOut,
    check_labels,
    check_point,
)
from .walker_field import WalkerField, solve_walker_field

logger = logging.getLogger(__name__)

UNKNOWN_LOGIT = -30.0
"""Logit given to lattice cells no ROI has decoded, where the click walker may still reach."""

__all__ = ["Session", "SessionSettings", "Update"]


class Session:
    """Click-based segmentation of one volume with one model.

    Args:
        model: a ``Sam3D`` (from :func:`fastsam3d.load_model` or :func:`fastsam3d.build_model`)
            or any module with the same ``config``, ``signature``, ``encode`` and ``decode``.
        volume: the image (:class:`fastsam3d.Volume`).
        device: "cuda", "mps", "cpu" or None for the best available (cuda > mps > cpu).
        settings: interaction settings (:class:`SessionSettings`).
        cache: embedding cache; by default one shared by all sessions of the process.
        labels: an existing instance label map to add objects to (integer array of the
            volume's shape, written in place); by default a new uint16 map of zeros.

    Raises:
        InputError: ``volume`` is not a :class:`Volume`, or ``labels`` does not fit it.
    """

    def __init__(
        self,
        model,
        volume: Volume,
        device=None,
        *,
        settings: SessionSettings | None = None,
        cache: EmbeddingCache | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        if not isinstance(volume, Volume):
            raise InputError(
                f"volume must be a fastsam3d.Volume, got {type(volume).__name__}: "
                "wrap arrays with fastsam3d.Volume(array, affine)"
            )
        self.volume = volume
        self._settings = settings or SessionSettings()
        self._labels = check_labels(labels, volume.shape)
        self._mask = np.zeros(volume.shape, dtype=bool)
        fine = self._settings.fine_spacing
        self._fine_spacing = (
            fine if zoom.uses_fine_grid(volume.spacing, self._settings.spacing, fine) else None
        )
        spacings = {self._settings.spacing, self._fine_spacing} - {None}
        clip = self._clip = _resolve_clip(self._settings.intensity_clip, model)
        cache = DEFAULT_CACHE if cache is None else cache
        # the fine grid serves one or two ROIs per object: no whole-volume resampling for it
        self._predictors = {
            s: RoiPredictor(model, volume, device, cache, s, clip, s == self._settings.spacing)
            for s in sorted(spacings)
        }
        self._predictor = self._predictors[self._settings.spacing]
        self._grid = volume.model_grid(self._settings.spacing)
        if self._settings.refine is not None and self._refine_settings() is None:
            logger.info(
                "masks are not snapped to edges on this volume: its voxels reach %.3g mm "
                "(refinement stops at %.3g mm)",
                max(volume.spacing),
                self._settings.refine.max_spacing_mm,
            )
        self._committed: list[CommittedObject] = []
        self._object = self._new_object()
        self._minimum: float | None = None  # the volume's, once the click walker asks
        self.last_update = Update()

    # ------------------------------------------------------------------ properties

    @property
    def model(self):
        return self._predictor.model

    @property
    def device(self):
        return self._predictor.device

    @property
    def refines(self) -> bool:
        """Whether masks are snapped to image edges on this volume (``settings.refine`` is set
        and no voxel side exceeds its ``max_spacing_mm``)."""
        return self._refine_settings() is not None

    @property
    def settings(self) -> SessionSettings:
        return self._settings

    @settings.setter
    def settings(self, value: SessionSettings) -> None:
        fixed = ("spacing", "fine_spacing", "intensity_clip")
        if any(getattr(value, name) != getattr(self._settings, name) for name in fixed):
            raise SessionError(
                "spacing, fine_spacing and intensity_clip are fixed per Session: create a new one"
            )
        self._settings = value

    @property
    def labels(self) -> np.ndarray:
        """Instance label map of committed objects (live array, ``volume.array``'s shape)."""
        return self._labels

    @property
    def mask(self) -> np.ndarray:
        """The current object's mask (read-only live view; copy it to keep it)."""
        view = self._mask.view()
        view.flags.writeable = False
        return view

    @property
    def clicks(self) -> tuple[Click, ...]:
        """The current object's clicks in order."""
        return tuple(self._object.clicks)

    @property
    def committed(self) -> tuple[CommittedObject, ...]:
        """Objects committed so far, in order."""
        return tuple(self._committed)

    @property
    def roi(self) -> Roi | None:
        """The current object's ROI (origin on the grid of :attr:`object_spacing`), None
        before a click."""
        return self._object.roi

    @property
    def object_spacing(self) -> float:
        """The grid (mm) the current object is on: ``settings.fine_spacing`` until its mask
        reaches the fine ROI's border, then ``settings.spacing`` (always ``spacing`` when the
        volume's voxels are not finer than it: :func:`fastsam3d.zoom.uses_fine_grid`)."""
        return self._object.spacing

    @property
    def can_undo(self) -> bool:
        return bool(self._object.undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._object.redo)

    # ------------------------------------------------------------------ clicks

    def add_point(self, point, positive: bool = True) -> np.ndarray:
        """Add a click to the current object and return its mask.

        Args:
            point: voxel indices (i, j, k) into ``volume.array`` (floats allowed).
            positive: True to add to the object, False to remove from it.

        Returns:
            The current object's mask, bool, ``volume.array``'s shape (a copy). Use
            :meth:`add_point_result` to get only the changed box.

        Raises:
            InputError: the point is not three numbers inside the volume.
        """
        self.add_point_result(point, positive)
        return self._mask.copy()

    def add_point_result(self, point, positive: bool = True) -> Update:
        """Like :meth:`add_point`, but return the changed box and the mask inside it."""
        source = check_point(point, self.volume.shape)
        spacing = self._object.spacing
        roi = self._choose_roi(source, spacing)
        click = Click(tuple(float(v) for v in source), bool(positive), roi.origin, spacing)
        return self._apply(click)

    def undo(self) -> np.ndarray:
        """Take back the current object's last click; returns its mask (a copy).

        Raises:
            SessionError: there is nothing to undo.
        """
        self.undo_result()
        return self._mask.copy()

    def undo_result(self) -> Update:
        """Like :meth:`undo`, but return the changed box."""
        obj = self._object
        if not obj.undo:
            raise SessionError("nothing to undo: the current object has no click (add_point first)")
        edit = obj.undo.pop()
        obj.clicks.pop()
        obj.roi = edit.roi_before
        obj.redo.append(edit)
        if edit.zoom_out is not None:
            obj.field, obj.spacing = edit.zoom_out.field_before, edit.zoom_out.spacing_before
            return self._refresh_all()
        edit.patch.undo(obj.field)
        return self._refresh(edit.patch.box)

    def redo(self) -> np.ndarray:
        """Re-apply the last undone click; returns the current object's mask (a copy).

        Raises:
            SessionError: there is nothing to redo.
        """
        self.redo_result()
        return self._mask.copy()

    def redo_result(self) -> Update:
        """Like :meth:`redo`, but return the changed box."""
        obj = self._object
        if not obj.redo:
            raise SessionError("nothing to redo: undo() first (a new click clears the redo list)")
        edit = obj.redo.pop()
        obj.clicks.append(edit.click)
        obj.roi = edit.roi_after
        obj.undo.append(edit)
        if edit.zoom_out is not None:
            obj.field, obj.spacing = edit.zoom_out.field_after, edit.zoom_out.spacing_after
            return self._refresh_all()
        edit.patch.redo(obj.field)
        return self._refresh(edit.patch.box)

    def refresh(self) -> Update:
        """Render the current object again, e.g. after ``settings.refine`` was changed."""
        if not self._object.clicks:
            self.last_update = Update()
            return self.last_update
        return self._refresh_all()

    def reset(self) -> Update:
        """Drop the current object (clicks, mask and its undo history); labels are kept."""
        box = self._object.touched
        self._object = self._new_object()
        if box is not None:
            self._mask[box] = False
        self.last_update = Update(box or empty_box(), np.zeros(_box_shape(box), dtype=bool))
        return self.last_update

    def commit(self, overwrite: bool | None = None) -> int:
        """Write the current object into :attr:`labels` under a new id and start a new object.

        Args:
            overwrite: overwrite voxels of objects committed before; default
                ``settings.overwrite_committed`` (False: they are preserved).

        Returns:
            The new label id (one more than the largest id in :attr:`labels` or committed).

        Raises:
            SessionError: the current object is empty.
        """
        return self._commit(overwrite, label=None)

    # ------------------------------------------------------------------ precompute, JSON

    def precompute(
        self, progress: ProgressCallback | None = None, background: bool = True
    ) -> PrecomputeJob:
        """Encode the ROIs that tile the whole volume on the coarse grid, so that later clicks
        there only decode (objects that start on the fine grid, ``settings.fine_spacing``, still
        encode their fine ROI at their first click; tiling the fine grid would take 8x the ROIs).

        Args:
            progress: called as ``progress(done, total)`` after each ROI (from the worker
                thread when ``background``).
            background: run in a daemon thread (cancel with ``job.cancel()``); False runs
                here and returns the finished job. On a CPU, clicks from another thread
                while that thread lives take about twice as long (two threads' OpenMP teams
                outnumber the cores; docs/BENCHMARKS.md, "napari click latency").
        """
        size, margin = self._predictor.roi_size, self._settings.reuse_margin
        rois = [Roi(o, size) for o in tile_origins(self._grid.shape, size, margin)]
        job = PrecomputeJob(self._predictor, rois, progress)
        return job.start() if background else job.run()

    def prompts_to_json(self, path=None) -> str:
        """The prompts of every object as JSON text (also written to ``path`` if given).

        :meth:`from_json` replays them into the same labels and masks.
        """
        return prompts.dump(self, path)

    from_json = prompts.FromJson()

    # ------------------------------------------------------------------ internals

    def _new_object(self) -> ObjectState:
        spacing = self._fine_spacing or self._settings.spacing
        return ObjectState(self._new_field(spacing), spacing)

    def _new_field(self, spacing: float) -> LogitField:
        return LogitField(self.volume.model_grid(spacing).shape, self._predictor.roi_size)

    def _choose_roi(self, source: np.ndarray, spacing: float) -> Roi:
        s, size = self._settings, self._predictor.roi_size
        grid = self.volume.model_grid(spacing)
        point = grid.source_to_grid(source)
        current = self._object.roi if self._object.spacing == spacing else None
        if current is not None and current.holds(point, s.border_margin, grid.shape):
            return current
        if s.reuse_cached_rois:
            candidates = [Roi(o, size) for o in self._predictors[spacing].cached_origins()]
            field = self._object.field if self._object.spacing == spacing else None
            usable = [
                r
                for r in candidates
                if r.holds(point, s.reuse_margin, grid.shape) and (field is None or field.fits(r))
            ]
            if usable:
                return min(usable, key=lambda r: float(np.sum((r.centre - point) ** 2)))
        return centred_roi(point, size)

    def _check_click(self, click: Click, field: LogitField, spacing: float) -> Roi:
        roi = Roi(click.roi, self._predictor.roi_size)
        point = self.volume.model_grid(spacing).source_to_grid(click.point)
        if not field.fits(roi) or not roi.contains(point):
            raise InputError(f"ROI {click.roi} does not hold the click {click.point}")
        return roi

    def _apply(self, click: Click) -> Update:
        obj = self._object
        spacing = self._settings.spacing if click.spacing is None else click.spacing
        if spacing != obj.spacing:
            if spacing != self._settings.spacing:
                raise InputError(
                    f"the click at {click.point} was decoded on a {spacing:g} mm grid that this "
                    f"session does not use for it (the object is on {obj.spacing:g} mm): the "
                    "prompts were made with other settings or for another volume"
                )
            return self._zoom_out(click, encoded=0)  # a replayed click that moved its object
        roi = self._check_click(click, obj.field, spacing)
        obj.clicks.append(click)
        try:
            patch, iou, rois, encoded = self._segment(obj, roi)
        except BaseException:
            obj.clicks.pop()
            raise
        if spacing != self._settings.spacing and self._outgrows(obj, roi):
            patch.undo(obj.field)
            obj.clicks.pop()
            coarse = self._settings.spacing
            roi = self._choose_roi(np.asarray(click.point), coarse)
            moved = Click(click.point, click.positive, roi.origin, coarse)
            return self._zoom_out(moved, encoded)
        self._record(Edit(click, patch, obj.roi, roi))
        return self._refresh(patch.box, iou=iou, rois=rois, encoded=encoded)

    def _record(self, edit: Edit) -> None:
        obj = self._object
        obj.undo.append(edit)
        del obj.undo[: -self._settings.max_undo or None]
        obj.redo.clear()
        obj.roi = edit.roi_after

    def _outgrows(self, obj: ObjectState, roi: Roi) -> bool:
        """Whether the object's logits in ``roi`` reach a border of it inside the volume."""
        shape = self.volume.model_grid(obj.spacing).shape
        inner = [
            (roi.origin[axis] > 0, roi.origin[axis] + roi.size < n) for axis, n in enumerate(shape)
        ]
        return zoom.reaches_border(obj.field.read(roi), inner)

    def _zoom_out(self, click: Click, encoded: int) -> Update:
        """Move the current object to the coarse grid: its clicks are decoded again there, in
        order, as if it had been segmented on the coarse grid from its first click."""
        obj = self._object
        before = (obj.field, obj.spacing, obj.roi)
        coarse = self._settings.spacing
        field = self._new_field(coarse)
        roi = self._check_click(click, field, coarse)
        clicks = [*obj.clicks, click]
        obj.field, obj.spacing = field, coarse
        try:
            for count in range(1, len(clicks) + 1):
                obj.clicks = clicks[:count]
                _, iou, rois, ran = self._segment(obj, roi)
                encoded += ran
        except BaseException:
            obj.clicks = clicks[:-1]
            obj.field, obj.spacing, obj.roi = before
            raise
        change = ZoomOut(before[0], before[1], field, coarse)
        self._record(Edit(click, Patch(), before[2], roi, change))
        logger.info("object moved to the %g mm grid: it reached the fine ROI's border", coarse)
        return self._refresh_all(iou=iou, rois=rois, encoded=encoded)

    def _refresh_all(self, **info) -> Update:
        """Re-render the current object after its logit field was replaced."""
        everything = tuple(slice(0, n) for n in self._object.field.logits.shape)
        return self._refresh(everything, **info)

    def _segment(self, obj: ObjectState, roi: Roi):
        """Decode the clicked ROI, then the neighbours the object continues into (on the
        coarse grid only: an object that outgrows a fine ROI moves to the coarse grid)."""
        patch, decoded, encoded, iou = Patch(), [], 0, None
        queue: deque[Roi] = deque([roi])
        extra = self._settings.max_extra_rois if obj.spacing == self._settings.spacing else 0
        try:
            while queue and len(decoded) <= extra:
                current = queue.popleft()
                if any(d.origin == current.origin for d in decoded) or not obj.field.fits(current):
                    continue
                owned = growth.owned_cells(current, decoded) if decoded else None
                if owned is not None and not owned.any():
                    continue
                result = self._decode(obj, current, continuation=bool(decoded))
                if result is None:
                    continue
                low, score, ran = result
                patch.regions.extend(obj.field.write(current, low, owned).regions)
                iou = score if iou is None else iou
                decoded.append(current)
                encoded += int(ran)
                queue.extend(self._continuations(obj, current, low, owned, decoded))
        except BaseException:
            patch.undo(obj.field)
            raise
        return patch, iou, tuple(d.origin for d in decoded), encoded

    def _continuations(self, obj: ObjectState, roi: Roi, low, owned, decoded) -> list[Roi]:
        if self._settings.max_extra_rois <= 0 or obj.spacing != self._settings.spacing:
            return []
        overlap = self._settings.roi_overlap
        return growth.next_rois(roi, low, owned, self._grid.shape, overlap, decoded)

    def _decode(self, obj: ObjectState, roi: Roi, continuation: bool):
        previous = obj.field.read(roi)
        points, labels = self._prompts(obj, roi)
        if continuation and not any(labels):
            seed = growth.seed_point(previous)
            if seed is None:
                return None
            points, labels = points + [seed], labels + [1]
        if not points:
            return None
        predictor = self._predictors[obj.spacing]
        return predictor.decode(roi, np.stack(points), np.asarray(labels), previous)

    def _prompts(self, obj: ObjectState, roi: Roi) -> tuple[list[np.ndarray], list[int]]:
        """Model coordinates and labels of the clicks fed to the decoder for ``roi``."""
        clicks = obj.clicks[-1:] if self._settings.point_policy == "newest" else obj.clicks
        grid = self.volume.model_grid(obj.spacing)
        points, labels = [], []
        for click in clicks:
            grid_point = grid.source_to_grid(click.point)
            if roi.contains(grid_point):
                points.append(np.clip(roi.to_model(grid_point), 0, roi.size - 1))
                labels.append(int(click.positive))
        return points, labels

    def _refresh(self, cells: Box | None, **info) -> Update:
        """Re-render the current object's mask where the lattice ``cells`` changed.

        Only voxels near positive logits can be in the mask, and only voxels rendered before
        (``touched``) can leave it, so the work is bounded by the object, not the ROI. With
        ``settings.refine`` the whole object is rendered again: the walker's solution depends
        on every click (:meth:`_refined`).
        """
        obj = self._object
        grid = self.volume.model_grid(obj.spacing)
        refine = self._refine_settings()
        render = stale = walker = None
        if cells is not None and refine is not None:
            everything = tuple(slice(0, n) for n in obj.field.logits.shape)
            band = obj.field.positive_cells(
                everything, float(np.log(refine.band / (1 - refine.band)))
            )
            render = None if band is None else self._grow(obj.field.source_box(band, grid), refine)
            walker = self._walker_field(refine)
            if walker is not None:
                reach = walker.source_box(refine.band, self.volume.shape)
                render = union_box(render, None if reach is None else self._grow(reach, refine))
            stale = obj.touched
        elif cells is not None:
            changed = obj.field.source_box(cells, grid)
            positive = obj.field.positive_cells(cells)
            render = (
                intersect_box(obj.field.source_box(positive, grid), changed) if positive else None
            )
            stale = intersect_box(obj.touched, changed)
        box = union_box(render, stale)
        if box is None:
            self.last_update = Update(**info)
            return self.last_update
        if stale is not None:
            self._mask[stale] = False
        if render is not None and refine is not None:
            self._mask[render] = self._refined(grid, render, refine, walker)
        elif render is not None:
            self._mask[render] = obj.field.render(grid, render)
        obj.touched = union_box(obj.touched, render)
        self.last_update = Update(box, self._mask[box].copy(), **info)
        return self.last_update

    def _refine_settings(self) -> RefineSettings | None:
        """The refinement to apply: none when it is off or the volume has thick slices."""
        refine = self._settings.refine
        if refine is not None and max(self.volume.spacing) > refine.max_spacing_mm:
            return None
        return refine

    def _refined(
        self, grid, box: Box, refine: RefineSettings, walker: WalkerField | None
    ) -> np.ndarray:
        """The current object's mask on a source box, snapped to image edges.

        Without the click walker the mask stays where the model's logits are known; with it,
        unknown logits count as background and the walker may reach beyond them.
        """
        obj = self._object
        logits, known = obj.field.sample(grid, box)
        image = self.volume.array[box].astype(np.float32)
        if self._clip is not None:
            image = np.clip(image, *self._clip)
        start = np.array([s.start for s in box])
        device = self._walker_device()
        prior = None
        if walker is not None:
            logits = np.where(known, logits, UNKNOWN_LOGIT).astype(np.float32)
            prior = torch.from_numpy(walker.sample(box)).to(device)
        mask = refine_mask(
            torch.from_numpy(image).to(device),
            torch.from_numpy(logits).to(device),
            [np.asarray(c.point) - start for c in obj.clicks],
            [c.positive for c in obj.clicks],
            self.volume.spacing,
            refine,
            walker=prior,
        )
        mask = mask.cpu().numpy()
        return mask if walker is not None else mask & known

    def _volume_minimum(self) -> float:
        if self._minimum is None:
            self._minimum = float(np.min(self.volume.array))
        return self._minimum

    def _walker_device(self) -> torch.device:
        # the walkers run on CUDA when the session does, else on the CPU: MPS lacked
        # avg_pool3d and trilinear upsampling in some torch releases this project supports
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _walker_field(self, refine: RefineSettings) -> WalkerField | None:
        """The current object's click walker (:mod:`fastsam3d.walker_field`), if it has one."""
        clicks = self._object.clicks
        if not clicks or not refine.walks_clicks(self._volume_minimum()):
            return None
        return solve_walker_field(
            self.volume,
            [c.point for c in clicks],
            [c.positive for c in clicks],
            refine,
            self._clip,
            self._walker_device(),
            self._settings.spacing,
        )

    def _grow(self, box: Box, refine: RefineSettings) -> Box:
        """``box`` grown by the refinement's margin (clamped to the volume)."""
        grow = [int(np.ceil(refine.margin_mm / h)) for h in self.volume.spacing]
        return tuple(
            slice(max(s.start - g, 0), min(s.stop + g, n))
            for s, g, n in zip(box, grow, self.volume.shape, strict=True)
        )

    def _commit(self, overwrite: bool | None, label: int | None) -> int:
        obj = self._object
        box = obj.touched
        if box is None or not self._mask[box].any():
            raise SessionError("the current object is empty: add a positive point before commit()")
        overwrite = self._settings.overwrite_committed if overwrite is None else bool(overwrite)
        if label is None:
            used = [c.label for c in self._committed]
            label = max([int(self._labels.max()), *used]) + 1
        if label > np.iinfo(self._labels.dtype).max:
            raise SessionError(f"label {label} does not fit the labels' dtype {self._labels.dtype}")
        mask, region = self._mask[box], self._labels[box]
        region[mask if overwrite else mask & (region == 0)] = label
        self._committed.append(CommittedObject(label, tuple(obj.clicks), overwrite))
        self._mask[box] = False
        self._object = self._new_object()
        self.last_update = Update(box, np.zeros(_box_shape(box), bool), True, label)
        return label


def _resolve_clip(clip, model):
    """The clipping range: the settings' value, or the model configuration's for "model"."""
    if clip != "model":
        return clip
    value = getattr(getattr(model, "config", None), "intensity_clip", None)
    return None if value is None else (float(value[0]), float(value[1]))


def _box_shape(box: Box | None) -> tuple[int, int, int]:
    if box is None:
        return (0, 0, 0)
    return tuple(s.stop - s.start for s in box)
