"""The ``FastSAM3D prompts`` Points layer: snapshots, polarity of clicks, shortcuts (no Qt).

Shortcuts are bound on the prompts layer itself and avoid napari's default keys: napari binds
G, N and Shift+R nowhere, and Ctrl+Z / Ctrl+Shift+Z only on Labels layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._layers import POSITIVE, inside, voxel_index
from ._state import Prompt

SHORTCUTS: dict[str, tuple[str, str]] = {
    "toggle_polarity": ("G", "toggle positive / negative clicks"),
    "commit": ("N", "commit the object, start the next"),
    "undo": ("Control-Z", "undo the last click"),
    "redo": ("Control-Shift-Z", "redo"),
    "reset": ("Shift-R", "reset the current object"),
}
MOUSE_HELP = (
    ("left click", "positive point (add mode)"),
    ("Ctrl + click / right click", "negative point"),
)


def shortcut_help() -> str:
    """The shortcut list shown in the widget (one line each)."""
    keys = [
        (key.replace("Control", "Ctrl").replace("-", "+"), text) for key, text in SHORTCUTS.values()
    ]
    return "\n".join(f"{key}: {text}" for key, text in (*MOUSE_HELP, *keys))


def snapshot(prompts_layer: Any, image_layer: Any) -> tuple[tuple[Prompt, ...], list[int]]:
    """The points as prompts on the image's voxel grid, and the rows that fall outside it.

    Points are converted napari world -> image voxel (i, j, k) with the layers' own transforms,
    rounded to the nearest voxel.
    """
    shape = tuple(image_layer.data.shape[-3:])
    positive = _positive_column(prompts_layer)
    prompts, outside = [], []
    for row, point in enumerate(np.asarray(prompts_layer.data, dtype=np.float64)):
        world = np.asarray(prompts_layer.data_to_world(point), dtype=np.float64)
        index = voxel_index(image_layer, world)
        if inside(shape, index):
            prompts.append(Prompt(index, bool(positive[row]), tuple(world.tolist())))
        else:
            outside.append(row)
    return tuple(prompts), outside


def show_prompts(prompts_layer: Any, prompts: tuple[Prompt, ...]) -> None:
    """Replace the layer's points with ``prompts`` (world positions and polarity)."""
    data = np.array([p.world for p in prompts], dtype=np.float64).reshape(-1, 3)
    data = np.asarray([prompts_layer.world_to_data(w) for w in data]).reshape(-1, 3)
    positive = np.array([p.positive for p in prompts], dtype=bool)
    defaults = dict(prompts_layer.feature_defaults.iloc[0])
    prompts_layer.selected_data = set()
    prompts_layer.data = data
    prompts_layer.features = {POSITIVE: positive}
    prompts_layer.feature_defaults = defaults


def _positive_column(layer: Any) -> np.ndarray:
    n = len(layer.data)
    if POSITIVE not in layer.features:
        return np.ones(n, dtype=bool)
    return np.asarray(layer.features[POSITIVE], dtype=bool)[:n]


def set_default_polarity(prompts_layer: Any, positive: bool) -> None:
    """Polarity given to the next point added (by mouse or from the console)."""
    prompts_layer.feature_defaults = {POSITIVE: bool(positive)}


def polarity_callback(negative_mode: Callable[[], bool], on_3d: Callable[[], None]):
    """A mouse-drag callback run before napari's "add" mode callback.

    It sets the polarity of the point about to be added: negative when the negative mode is on,
    or with Ctrl held, or with the right button (Ctrl in negative mode gives a positive point).
    Clicks in the 3D view are reported through ``on_3d`` (their depth is ambiguous).
    """

    def set_polarity(layer: Any, event: Any):
        if layer.mode != "add":
            return
        if len(getattr(event, "dims_displayed", ())) == 3:
            on_3d()
            return
        flip = "Control" in event.modifiers or "Meta" in event.modifiers
        negative = (negative_mode() != flip) or getattr(event, "button", 1) == 2
        set_default_polarity(layer, not negative)

    return set_polarity


def bind_shortcuts(prompts_layer: Any, actions: dict[str, Callable[[], None]]) -> None:
    """Bind :data:`SHORTCUTS` on the prompts layer to ``actions`` (same keys)."""
    for name, (key, _help) in SHORTCUTS.items():
        action = actions[name]

        def run(_layer, action=action):
            action()

        prompts_layer.bind_key(key, run, overwrite=True)
