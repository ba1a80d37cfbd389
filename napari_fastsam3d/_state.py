"""Plugin state and the messages between the GUI thread and the model thread (no Qt, no torch).

One :class:`PluginState` belongs to one widget; "reset" replaces the object instead of clearing
fields. Messages are small frozen dataclasses: requests go GUI -> model thread, results come back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Index = tuple[int, int, int]
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Prompt:
    """One click: voxel index (i, j, k) of the image, its polarity and where it was in the world."""

    index: Index
    positive: bool
    world: tuple[float, ...]


# ---------------------------------------------------------------- results (model thread -> GUI)


@dataclass(frozen=True)
class CacheInfo:
    """Encoder cache state after a task: number of cached ROI embeddings, hit or miss."""

    entries: int
    last_hit: bool | None


@dataclass(frozen=True)
class ModelReady:
    """A model was loaded on ``device`` with its encoder in ``precision`` and warmed up."""

    name: str
    device: str
    warmup_ms: float
    precision: str = "fp32"


@dataclass(frozen=True)
class DevicesFound:
    """Devices torch can use here, best first (cuda > mps > cpu)."""

    devices: tuple[str, ...]


@dataclass(frozen=True)
class VolumeReady:
    """A session was created for the image with this key; its first object gets ``next_id``."""

    key: str
    next_id: int
    note: str = ""  # shown to the user when set (e.g. why masks are not snapped to edges)


@dataclass(frozen=True)
class MaskUpdate:
    """The current object's mask changed inside ``box`` (voxel slices of the image).

    ``mask`` is the object's new mask inside ``box`` (bool, shape of the box). ``prompts`` are
    the prompts the engine now holds for the object; ``resync`` asks the GUI to show exactly
    those (after undo / redo / reset / a failed decode).
    """

    seq: int
    object_id: int
    box: Box
    mask: np.ndarray
    prompts: tuple[Prompt, ...]
    voxels: int
    sent_at: float
    engine_ms: float
    resync: bool = False
    cache: CacheInfo | None = None
    grid_mm: float | None = None


@dataclass(frozen=True)
class Committed:
    """The current object was committed with ``object_id``; the next object is ``next_id``.

    ``labels`` is the engine's committed label map inside ``box``.
    """

    object_id: int
    voxels: int
    next_id: int
    box: Box
    labels: np.ndarray


@dataclass(frozen=True)
class Progress:
    """Long task progress (download in bytes, encoding in blocks); ``total`` 0 = unknown."""

    task: str
    done: int
    total: int
    finished: bool = False


@dataclass(frozen=True)
class Failure:
    """A task failed; ``message`` says what to do.

    ``cancelled``: the user cancelled it. ``expected``: an error the user can cause (bad file,
    bad click, missing weights), shown as a warning rather than as an error.
    """

    task: str
    message: str
    cancelled: bool = False
    expected: bool = False


# ---------------------------------------------------------------- per-widget state (GUI thread)


@dataclass
class ObjectRecord:
    """One committed object: id, voxel count and visibility in the object table."""

    object_id: int
    voxels: int
    visible: bool = True


@dataclass
class PluginState:
    """Everything the widget knows between events. Replaced as a whole on image change / reset."""

    image_key: str | None = None
    current_id: int = 1
    objects: dict[int, ObjectRecord] = field(default_factory=dict)
    sent_seq: int = 0
    shown_seq: int = 0
    model_name: str | None = None
    device: str = "not loaded"
    cache: CacheInfo | None = None
    grid_mm: float | None = None
    last_latency_ms: float | None = None
    last_engine_ms: float | None = None
    negative_mode: bool = False

    def next_seq(self) -> int:
        """A new, strictly increasing request sequence number."""
        self.sent_seq += 1
        return self.sent_seq

    def status_line(self) -> str:
        """One line for the widget: device, model, cache state, the current object's grid
        (0.75 mm until it outgrows the fine ROI) and the last click's latency."""
        model = self.model_name or "no model"
        if self.cache is None:
            cache = "cache empty"
        else:
            hit = {True: ", last hit", False: ", last miss", None: ""}[self.cache.last_hit]
            cache = f"cache {self.cache.entries} ROI{'s' if self.cache.entries != 1 else ''}{hit}"
        latency = (
            "no click yet"
            if self.last_latency_ms is None
            else f"last click {self.last_latency_ms:.0f} ms"
        )
        grid = "" if self.grid_mm is None else f" · object on the {self.grid_mm:g} mm grid"
        return f"{self.device} · {model} · {cache}{grid} · {latency}"
