"""The FastSAM3D dock widget: controls, and the GUI side of every interaction.

The GUI thread never runs torch: it sends prompt snapshots to the model thread
(:class:`._worker.ModelWorker`) and applies the results it gets back through a queued Qt signal,
writing the Labels layer only inside the changed box. Per-widget state is a
:class:`._state.PluginState`, replaced as a whole when the image changes.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points
from napari.utils.events import Event
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from . import _layers, _prompts
from ._engine import DEFAULT_MODEL, ENV_MODEL
from ._panel import Panel
from ._qt_link import Outbox, ProgressBars, closer
from ._state import (
    Committed,
    DevicesFound,
    Failure,
    MaskUpdate,
    ModelReady,
    ObjectRecord,
    PluginState,
    Progress,
    VolumeReady,
)
from ._worker import DecodeRequest, ModelWorker

logger = logging.getLogger(__name__)


class FastSAM3DWidget(Panel):
    """Interactive FastSAM3D segmentation of the chosen image layer.

    Args:
        napari_viewer: the viewer (napari passes it).
        model: what to load at start: a registry name, a path, a ``Sam3D``-like module, "" for
            nothing; default ``$NAPARI_FASTSAM3D_MODEL`` or the bundled default.
        device: "auto" (cuda > mps > cpu), "cuda", "cuda:N" (one GPU of several), "mps" or
            "cpu".
        precision: the image encoder's, "fp32" (exact), "bf16" or "int8" (CPU).
    """

    def __init__(
        self, napari_viewer: Any, model: Any = None, device: str = "auto", precision: str = "fp32"
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = PluginState()
        self._image: Image | None = None
        self.labels_layer: Labels | None = None
        self.prompts_layer: Points | None = None
        self._session_ready = False
        self._syncing = False
        self._bars = ProgressBars()
        self.current_voxels = 0
        self.model_error: str | None = None
        self._outbox = Outbox()
        self._outbox.bridge.message.connect(self._on_message)
        self.worker = ModelWorker(self._outbox)
        self.destroyed.connect(closer(self._outbox, self.worker))
        self._bound_layers: set[str] = set()
        self._connect_panel()
        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            emitter.connect(self._refresh_images)
        self._refresh_images()
        self.precision_combo.setCurrentIndex(max(self.precision_combo.findData(precision), 0))
        self._autoload(model, device, precision)

    def close_worker(self) -> None:
        """Stop the model thread (also done when the widget is destroyed)."""
        closer(self._outbox, self.worker)()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.close_worker()
        super().closeEvent(event)

    # ------------------------------------------------------------ public actions

    def load_model(
        self, source: Any, device: str | None = None, precision: str | None = None
    ) -> None:
        """Load a model on the model thread (registry name, file path or module); ``device``
        and the encoder ``precision`` default to the panel's choices."""
        self.state.model_name, self._session_ready, self.model_error = None, False, None
        label = source if isinstance(source, str) else type(source).__name__
        self.set_status(f"loading model {label} …")
        self.show_model_source(source)
        self.worker.load_model(
            source, device or self.device_choice(), precision or self.precision_choice()
        )

    def set_image(self, layer: Image) -> None:
        """Segment this image layer (3D); makes the prompts and labels layers for it."""
        if self._image is not None and layer == self._image:  # napari may hand out proxies
            return
        if layer.ndim != 3 or getattr(layer, "rgb", False) or layer.multiscale:
            show_warning(f"FastSAM3D needs a single-channel 3D image; {layer.name!r} is not one.")
            return
        self._image = layer
        self.state = PluginState(
            image_key=f"{layer.name}@{layer.unique_id}",
            model_name=self.state.model_name,
            device=self.state.device,
        )
        self.labels_layer = self.prompts_layer = None  # (re)made below
        self.labels_layer = self._ensure_labels(layer)
        self.prompts_layer = self._ensure_prompts(layer)
        self._load_objects()
        self.select_image(layer.name)
        self._open_session()

    def commit(self) -> None:
        """Commit the current object (keeps its voxels) and start the next one."""
        if self._image is None or not len(self.prompts_layer.data):
            show_info("FastSAM3D: add a positive point before committing an object.")
            return
        self.worker.commit()

    def undo(self) -> None:
        self.worker.undo()

    def redo(self) -> None:
        self.worker.redo()

    def reset_object(self) -> None:
        self.worker.reset()

    def toggle_polarity(self) -> None:
        self.negative_box.setChecked(not self.negative_box.isChecked())

    def cancel(self) -> None:
        self.worker.cancel()

    def export_labels(self, path: str) -> list[str]:
        """Save ``FastSAM3D labels`` through the plugin's NIfTI writer (source affine, header)."""
        if self.labels_layer is None:
            show_info("FastSAM3D: nothing to export yet; choose an image and click.")
            return []
        try:
            written = self.labels_layer.save(path, plugin="napari-fastsam3d")
        except Exception as err:
            show_error(f"FastSAM3D export failed: {err}")
            return []
        show_info(f"FastSAM3D labels saved to {', '.join(written)}")
        return written

    def default_export_path(self) -> str:
        """``<image>_labels.nii.gz`` beside the source file (or in the working folder)."""
        return _layers.export_path(self._image)

    # ------------------------------------------------------------ layers

    def _ensure_labels(self, image: Image) -> Labels:
        layer = _layers.find_layer(self.viewer, _layers.LABELS_NAME, Labels)
        if layer is not None and _layers.same_grid(layer, image):
            return layer
        if layer is not None:  # belongs to another image: keep it under another name
            layer.name = f"{_layers.LABELS_NAME} ({layer.metadata.get('image_layer', 'old')})"
        return self.viewer.add_layer(_layers.make_labels_layer(image))

    def _ensure_prompts(self, image: Image) -> Points:
        layer = _layers.find_layer(self.viewer, _layers.PROMPTS_NAME, Points)
        if layer is None:
            layer = self.viewer.add_layer(_layers.make_prompts_layer(image))
        else:
            self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
            with self._sync():
                _prompts.show_prompts(layer, ())
        if layer.unique_id not in self._bound_layers:
            layer.events.data.connect(self._on_prompts_changed)
            layer.mouse_drag_callbacks.insert(
                0, _prompts.polarity_callback(lambda: self.state.negative_mode, self._on_3d_click)
            )
            _prompts.bind_shortcuts(
                layer,
                {
                    "toggle_polarity": self.toggle_polarity,
                    "commit": self.commit,
                    "undo": self.undo,
                    "redo": self.redo,
                    "reset": self.reset_object,
                },
            )
            self._bound_layers.add(layer.unique_id)
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
        return layer

    def _load_objects(self) -> None:
        counts = _layers.object_counts(self.labels_layer.data)
        self.state.objects = {i: ObjectRecord(i, n) for i, n in counts.items()}
        self.state.current_id = max(self.state.objects, default=0) + 1
        self._refresh_table()

    def _open_session(self) -> None:
        """Start an engine session on the current image (after a model is ready)."""
        self._session_ready = False
        if self._image is None or self.state.model_name is None:
            return
        seed = np.array(self.labels_layer.data, dtype=np.uint16)
        seed[seed == self.state.current_id] = 0
        self.worker.set_volume(
            self._image.data, _layers.image_affine(self._image), self.state.image_key, seed
        )
        self.set_status("preparing the image …")

    # ------------------------------------------------------------ prompts -> model thread

    def _on_prompts_changed(self, event: Event) -> None:
        if self._syncing or getattr(event, "action", "changed") not in (
            "added",
            "removed",
            "changed",
        ):
            return
        if event.action == "added" and self._reject_3d:
            self._reject_3d = False
            return self._drop_rows(list(range(len(self.prompts_layer.data)))[-1:])
        if event.action == "added":  # napari copies the new point's features into the defaults
            QTimer.singleShot(0, self._restore_polarity)
        try:
            self._send_prompts()
        except Exception as err:  # never let a prompt event break napari's event loop
            logger.exception("FastSAM3D: sending prompts failed")
            show_error(f"FastSAM3D: {type(err).__name__}: {err}")

    def _restore_polarity(self) -> None:
        if self._image is not None:
            _prompts.set_default_polarity(self.prompts_layer, not self.state.negative_mode)

    _reject_3d = False

    def _on_3d_click(self) -> None:
        self._reject_3d = True
        show_info("FastSAM3D: switch to the 2D view (Ctrl+Y) to place prompts on a slice.")

    def _send_prompts(self) -> None:
        if self._image is None:
            return
        prompts, outside = _prompts.snapshot(self.prompts_layer, self._image)
        if outside:
            show_warning("FastSAM3D: points outside the image were removed.")
            self._drop_rows(outside)
        if not self._session_ready:
            if self.state.model_name is None:
                show_info("FastSAM3D: load a model first; your points are kept.")
            return
        seq = self.state.next_seq()
        self.worker.decode(DecodeRequest(seq, self.state.current_id, prompts, time.perf_counter()))

    def _drop_rows(self, rows: list[int]) -> None:
        """Remove points (their features go with them), without a new decode request."""
        with self._sync():
            self.prompts_layer.selected_data = {int(r) for r in rows}
            self.prompts_layer.remove_selected()

    @contextmanager
    def _sync(self):
        """Changes to the prompts layer made here are not sent to the model thread."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    # ------------------------------------------------------------ results from the model thread

    def _on_message(self, message: object) -> None:
        try:
            handler = getattr(self, f"_on_{type(message).__name__}")
            handler(message)
        except Exception as err:  # a bug here must not take napari down
            logger.exception("FastSAM3D: handling %s failed", type(message).__name__)
            show_error(f"FastSAM3D: {type(err).__name__}: {err}")

    def _on_DevicesFound(self, message: DevicesFound) -> None:
        self.set_devices(message.devices)

    def _on_ModelReady(self, message: ModelReady) -> None:
        device = message.device
        if message.precision != "fp32":
            device = f"{device}, {message.precision} encoder"
        self.state.model_name, self.state.device = message.name, device
        show_info(
            f"FastSAM3D: model {message.name} ready on {device} "
            f"(warm-up {message.warmup_ms:.0f} ms)"
        )
        self._open_session()
        self.refresh_status()

    def _on_VolumeReady(self, message: VolumeReady) -> None:
        if message.key != self.state.image_key:
            return
        self._session_ready = True
        if message.note:
            show_info(f"FastSAM3D: {message.note}")
        self.state.current_id = message.next_id
        self.labels_layer.selected_label = message.next_id
        self.refresh_status()
        if len(self.prompts_layer.data):
            self._send_prompts()

    def _on_MaskUpdate(self, message: MaskUpdate) -> None:
        if message.object_id != self.state.current_id or self._image is None:
            return
        old = self.labels_layer.data[message.box]
        _layers.paste_box(
            self.labels_layer,
            message.box,
            _layers.merge_object(old, message.mask, message.object_id),
        )
        if message.resync:
            with self._sync():
                _prompts.show_prompts(self.prompts_layer, message.prompts)
        else:
            self.state.last_latency_ms = (time.perf_counter() - message.sent_at) * 1e3
            self.state.last_engine_ms = message.engine_ms
            self.state.shown_seq = message.seq
        self.state.cache = message.cache or self.state.cache
        self.state.grid_mm = message.grid_mm or self.state.grid_mm
        self.current_voxels = message.voxels
        self._refresh_table()
        self.refresh_status()

    def _on_Committed(self, message: Committed) -> None:
        if self._image is None:
            return
        block = np.array(self.labels_layer.data[message.box])
        block[block == self.state.current_id] = 0
        block[message.labels == message.object_id] = message.object_id
        _layers.paste_box(self.labels_layer, message.box, block)
        self.state.objects[message.object_id] = ObjectRecord(message.object_id, message.voxels)
        self.state.current_id = message.next_id
        self.state.grid_mm = None  # the next object's grid is known after its first click
        self.labels_layer.selected_label = message.next_id
        self.current_voxels = 0
        with self._sync():
            _prompts.show_prompts(self.prompts_layer, ())
        self._refresh_table()
        self.refresh_status()

    def _on_Progress(self, message: Progress) -> None:
        self._bars.show(message)
        self.cancel_button.setEnabled(self._bars.active)

    def _on_Failure(self, message: Failure) -> None:
        if message.cancelled:
            show_info(f"FastSAM3D: {message.message}")
        elif message.expected:
            show_warning(f"FastSAM3D: {message.message}")
        else:
            show_error(f"FastSAM3D ({message.task}): {message.message}")
        if message.task == "load_model":
            self.model_error = message.message
            self.set_status(f"model not loaded: {message.message}")

    # ------------------------------------------------------------ panel glue

    def _refresh_images(self, event: Event | None = None) -> None:
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        self.set_image_choices([layer.name for layer in images])
        if self._image is not None and not self._layers_present(images):
            self._image, self._session_ready = None, False
            self.set_status("the image or a FastSAM3D layer was removed: choose an image")
        if getattr(event, "type", None) == "removed":
            return  # never add layers while napari removes them (e.g. on close)
        if self._image is None and images:
            active = self.viewer.layers.selection.active
            self.set_image(active if isinstance(active, Image) else images[-1])

    def _layers_present(self, images: list) -> bool:
        layers = list(self.viewer.layers)
        ours = [x for x in (self.labels_layer, self.prompts_layer) if x is not None]
        return self._image in images and all(layer in layers for layer in ours)

    def _on_image_chosen(self, name: str) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if isinstance(layer, Image):
            self.set_image(layer)

    def _on_polarity_toggled(self, negative: bool) -> None:
        self.state.negative_mode = bool(negative)
        if self._image is not None:
            _prompts.set_default_polarity(self.prompts_layer, not negative)

    def _on_refine_toggled(self, enabled: bool) -> None:
        self.walker_combo.setEnabled(bool(enabled))
        self.parts_box.setEnabled(bool(enabled))
        self.worker.set_refine(enabled)

    def _on_walker_chosen(self, _index: int) -> None:
        self.worker.set_click_walker(self.walker_combo.currentData())

    def _on_parts_toggled(self, enabled: bool) -> None:
        self.worker.set_clicked_parts_only(enabled)

    def _on_visibility_changed(self, object_id: int, visible: bool) -> None:
        record = self.state.objects.get(object_id)
        if record is not None:
            record.visible = visible
        self._cyclic = _layers.apply_visibility(
            self.labels_layer, self.state.objects, getattr(self, "_cyclic", None)
        )

    def _refresh_table(self) -> None:
        self.show_objects(self.state.objects, self.state.current_id, self.current_voxels)

    def refresh_status(self) -> None:
        self.set_status(self.state.status_line())

    def _autoload(self, model: Any, device: str, precision: str) -> None:
        if model is None:
            model = os.environ.get(ENV_MODEL, DEFAULT_MODEL)
        if isinstance(model, str) and model.strip().lower() in ("", "none"):
            self.set_status("no model loaded: choose one above")
            return
        self.load_model(model, device, precision)
