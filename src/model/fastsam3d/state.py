"""Typed interaction state of a :class:`~fastsam3d.session.Session` (no model, no torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .field import Box, LogitField, Patch, empty_box
from .geometry import MODEL_SPACING
from .refine import CLICK_SEED_MM, RefineSettings
from .roi import REUSE_MARGIN, ROI_SIZE, STRIDE, Roi
from .zoom import FINE_SPACING

POINT_POLICIES = ("newest", "all")


@dataclass(frozen=True)
class SessionSettings:
    """How a session turns clicks into masks.

    Attributes:
        point_policy: ``"newest"`` feeds only the newest click plus the previous low-res
            logits, as the official evaluation does; ``"all"`` feeds every click of the object
            inside the ROI. "all" is the default: with the bundled model on the held-out real
            cases (31 CT structures + BraTS oedema, official clicks, same clicks for both) the
            mean Dice after 3 / 4 / 5 clicks was 0.339 / 0.370 / 0.370 for "all" against
            0.293 / 0.270 / 0.282 for "newest" (docs/RESULTS.md). Re-measure with better
            weights.
        border_margin: a click within this many voxels (1.5 mm grid) of the current ROI's
            border moves the ROI (borders at the edge of the volume do not count).
        reuse_cached_rois: a click that needs a new ROI takes an already encoded ROI that
            holds it at least ``reuse_margin`` voxels from its borders instead of encoding a
            new centred one (this is what makes :meth:`Session.precompute` useful).
        reuse_margin: see ``reuse_cached_rois``; :meth:`Session.precompute` tiles the volume
            so that every voxel is this far inside some ROI.
        max_extra_rois: how many neighbouring ROIs one click may add when the mask touches
            the ROI border (0 keeps every object inside one ROI).
        roi_overlap: overlap (voxels) between an ROI and a neighbour it continues into.
        overwrite_committed: whether :meth:`Session.commit` overwrites voxels of objects
            committed before (default: they are preserved).
        intensity_clip: clip intensities to (low, high) before normalisation, None for no
            clipping, or "model" to use the model configuration's ``intensity_clip``.
        spacing: model grid spacing in mm (the training value is 1.5).
        fine_spacing: a new object starts on a grid of this spacing (a 128^3 ROI then spans
            96 mm at 0.75 mm and the logits come every 3 mm instead of 6, so thin and small
            structures keep their shape); as soon as its mask reaches that ROI's border it
            moves to ``spacing`` for good (:mod:`fastsam3d.zoom`). None: every object on
            ``spacing``; also when the volume's voxels are not finer than ``spacing``
            (:func:`fastsam3d.zoom.uses_fine_grid`). Measured in docs/RESULTS.md.
        max_undo: undo levels kept per object.
        refine: snap the current object's mask to image edges on the volume's own voxels: a
            random walker with the model's probability as prior and the clicks as seeds
            (:mod:`fastsam3d.refine`), on CT merged first with the plain random walker from the
            clicks (``refine.click_walker``); None shows the thresholded logits. On the
            held-out CT it raised the mean Dice after 5 clicks by about 0.16 (docs/RESULTS.md).
            Volumes with voxels longer than ``refine.max_spacing_mm`` are not refined.
    """

    point_policy: str = "all"
    border_margin: int = 8
    reuse_cached_rois: bool = True
    reuse_margin: int = REUSE_MARGIN
    max_extra_rois: int = 8
    roi_overlap: int = 32
    overwrite_committed: bool = False
    intensity_clip: tuple[float, float] | None | str = "model"
    spacing: float = MODEL_SPACING
    fine_spacing: float | None = FINE_SPACING
    max_undo: int = 100
    refine: RefineSettings | None = RefineSettings()

    def __post_init__(self) -> None:
        if self.point_policy not in POINT_POLICIES:
            raise InputError(
                f"point_policy must be one of {POINT_POLICIES}, got {self.point_policy!r}"
            )
        for name in ("border_margin", "reuse_margin", "max_extra_rois", "roi_overlap", "max_undo"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.reuse_margin > (ROI_SIZE - STRIDE) // 2:
            raise InputError(
                f"reuse_margin must leave a central part of the {ROI_SIZE}^3 ROI, got "
                f"{self.reuse_margin}"
            )
        if self.roi_overlap % 4 or self.roi_overlap >= 64:
            raise InputError(
                f"roi_overlap must be a multiple of 4 below 64, got {self.roi_overlap}"
            )
        if not self.spacing > 0:
            raise InputError(f"spacing must be positive, got {self.spacing}")
        if self.fine_spacing is not None and not 0 < self.fine_spacing < self.spacing:
            raise InputError(
                f"fine_spacing must be None or between 0 and spacing ({self.spacing}), "
                f"got {self.fine_spacing}"
            )
        clip = self.intensity_clip
        if clip != "model" and clip is not None:
            if len(clip) != 2 or not float(clip[0]) < float(clip[1]):
                raise InputError(f"intensity_clip must be (low, high) with low < high, got {clip}")
            object.__setattr__(self, "intensity_clip", (float(clip[0]), float(clip[1])))
        if self.refine is not None and not isinstance(self.refine, RefineSettings):
            raise InputError(f"refine must be a RefineSettings or None, got {self.refine!r}")

    def replace(self, **changes) -> SessionSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SessionSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("intensity_clip"), list):
            values["intensity_clip"] = tuple(values["intensity_clip"])
        # files written before the refinement (or its click walker, its clicked parts, or
        # its smaller seeds after an object's first click) existed replay as they were made
        refine = values.get("refine")
        if isinstance(refine, dict):
            known = {f.name for f in dataclasses.fields(RefineSettings)}
            made = {k: v for k, v in refine.items() if k in known}
            before = {
                "click_walker": "off",
                "clicked_parts_only": False,
                "walker_later_seed_mm": CLICK_SEED_MM,
            }
            refine = RefineSettings(**{**before, **made})
        values["refine"] = refine
        return cls(**values)


@dataclass(frozen=True)
class Click:
    """One prompt point.

    Attributes:
        point: voxel coordinates (i, j, k) into ``volume.array``.
        positive: True adds to the object, False removes.
        roi: origin of the ROI that was decoded for this click (voxels of the grid of
            ``spacing``).
        spacing: the grid (mm) the object was on after this click; None: the session's
            ``spacing`` (prompt files written before the fine grid existed).
    """

    point: tuple[float, float, float]
    positive: bool
    roi: tuple[int, int, int]
    spacing: float | None = None

    def to_dict(self) -> dict:
        point = [int(v) if float(v).is_integer() else float(v) for v in self.point]
        data = {"point": point, "positive": self.positive, "roi": list(self.roi)}
        if self.spacing is not None:
            data["spacing"] = self.spacing
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Click:
        spacing = data.get("spacing")
        return cls(
            tuple(float(v) for v in data["point"]),
            bool(data.get("positive", True)),
            tuple(int(v) for v in data["roi"]),
            None if spacing is None else float(spacing),
        )


@dataclass
class Edit:
    """One undoable step of an object: the click it added and the lattice cells it changed."""

    click: Click
    patch: Patch
    roi_before: Roi | None
    roi_after: Roi
    zoom_out: ZoomOut | None = None


@dataclass
class ZoomOut:
    """An edit that moved the object to the coarse grid: both logit fields and spacings."""

    field_before: LogitField
    spacing_before: float
    field_after: LogitField
    spacing_after: float


@dataclass
class ObjectState:
    """The object being segmented: its clicks, logits, current ROI and history."""

    field: LogitField
    spacing: float
    clicks: list[Click] = field(default_factory=list)
    roi: Roi | None = None
    undo: list[Edit] = field(default_factory=list)
    redo: list[Edit] = field(default_factory=list)
    touched: Box | None = None


@dataclass(frozen=True)
class CommittedObject:
    """An object written into the label map."""

    label: int
    clicks: tuple[Click, ...]
    overwrite: bool


@dataclass(frozen=True)
class Update:
    """What a call changed, so that a viewer can redraw only that box.

    Attributes:
        box: slices into ``volume.array`` (and ``Session.labels``) of the region that changed;
            empty slices when nothing changed.
        mask: the current object's mask inside ``box`` (bool copy).
        labels_changed: whether ``Session.labels`` changed inside ``box`` (commit).
        label: the label id written by a commit, else None.
        iou: the model's predicted IoU for the clicked ROI, else None.
        rois: origins (resampled grid) of the ROIs decoded, clicked ROI first.
        encoded: how many ROI embeddings the encoder computed for this call.
    """

    box: Box = field(default_factory=empty_box)
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=bool))
    labels_changed: bool = False
    label: int | None = None
    iou: float | None = None
    rois: tuple[tuple[int, int, int], ...] = ()
    encoded: int = 0

    @property
    def empty(self) -> bool:
        return any(s.stop <= s.start for s in self.box)


def check_point(point, shape) -> np.ndarray:
    """A click as float64 (3,) voxel coordinates inside ``shape``, or :class:`InputError`."""
    try:
        source = np.asarray(point, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        source = np.zeros(0)
    if source.shape != (3,) or not np.all(np.isfinite(source)):
        raise InputError(
            f"a click is three voxel indices (i, j, k) into volume.array, got {point!r}"
        )
    if np.any(source < 0) or np.any(source > np.asarray(shape) - 1):
        raise InputError(
            f"click {tuple(source.tolist())} is outside the volume of shape {tuple(shape)}: "
            "each index must be within 0 .. n - 1"
        )
    return source


def check_labels(labels, shape) -> np.ndarray:
    """A label map to write into (a new uint16 one for None), or :class:`InputError`."""
    if labels is None:
        return np.zeros(shape, dtype=np.uint16)
    if not isinstance(labels, np.ndarray) or labels.shape != tuple(shape):
        raise InputError(f"labels must be an integer array of shape {tuple(shape)}")
    if labels.dtype.kind not in "iu":
        raise InputError(f"labels must have an integer dtype, got {labels.dtype}")
    return labels
