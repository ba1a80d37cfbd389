"""The dock widget end to end under Xvfb: docking, clicks, undo/redo, commit, export."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks
from qtpy.QtCore import Qt

from napari_fastsam3d._layers import LABELS_NAME, PROMPTS_NAME
from napari_fastsam3d._widget import FastSAM3DWidget

PLUGIN = "napari-fastsam3d"
TIMEOUT = 20_000


@pytest.fixture
def no_autoload(monkeypatch):
    monkeypatch.setenv("NAPARI_FASTSAM3D_MODEL", "none")


@pytest.fixture
def stand_in():
    """Thresholding stand-in with the Sam3D encode/decode contract (no trained weights)."""
    from fastsam3d.stand_in import ThresholdModel

    return ThresholdModel()


def dock(viewer) -> FastSAM3DWidget:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN)
    return widget


def ready(qtbot, widget, model) -> None:
    widget.load_model(model, "cpu")
    qtbot.waitUntil(lambda: widget._session_ready, timeout=TIMEOUT)


def click(viewer, widget, index, positive=True):
    """Add a point from the console, at the world position of voxel ``index``."""
    image = widget._image
    world = np.asarray(image.data_to_world(np.asarray(index, dtype=float)))
    prompts = viewer.layers[PROMPTS_NAME]
    prompts.feature_defaults = {"positive": positive}
    prompts.add(prompts.world_to_data(world))


def labels_layer_colour(viewer, label):
    return viewer.layers[LABELS_NAME].colormap.map(np.array([label]))[0]


def wait_for_labels(qtbot, widget, predicate):
    qtbot.waitUntil(lambda: predicate(widget.viewer.layers[LABELS_NAME].data), timeout=TIMEOUT)


@pytest.fixture
def blob_viewer(make_napari_viewer, oblique_nifti, no_autoload):
    viewer = make_napari_viewer()
    viewer.open(str(oblique_nifti), plugin=PLUGIN)
    return viewer


def test_widget_docks_with_its_layers(make_napari_viewer, sample_ct_path, no_autoload):
    viewer = make_napari_viewer()
    viewer.open(str(sample_ct_path), plugin=PLUGIN)
    widget = dock(viewer)
    assert isinstance(widget, FastSAM3DWidget)
    labels, prompts = viewer.layers[LABELS_NAME], viewer.layers[PROMPTS_NAME]
    assert labels.data.shape == (122, 101, 30) and not labels.data.any()
    assert "positive" in prompts.features
    assert viewer.layers.selection.active is prompts and prompts.mode == "add"
    assert "Ctrl+Z" in widget.help_label.text() and "G:" in widget.help_label.text()
    assert widget.worker.alive


def test_click_gives_mask_at_the_clicked_place(qtbot, blob_viewer, stand_in):
    widget = dock(blob_viewer)
    ready(qtbot, widget, stand_in)
    click(blob_viewer, widget, (20, 18, 12))
    wait_for_labels(qtbot, widget, lambda d: d.any())
    labels = blob_viewer.layers[LABELS_NAME].data
    assert labels[20, 18, 12] == 1
    assert labels[2, 2, 2] == 0 and labels[38, 34, 22] == 0
    assert set(np.unique(labels)) == {0, 1}
    assert "last click" in widget.status_label.text() and "cpu" in widget.status_label.text()
    assert "mm grid" in widget.status_label.text()


def test_gui_thread_runs_no_torch(qtbot, blob_viewer, stand_in):
    """Only the model thread runs torch: a second thread that has run torch gives libgomp two
    teams that outnumber a CPU's cores, and every click then takes about twice as long."""
    from torch.overrides import TorchFunctionMode

    class Recorder(TorchFunctionMode):  # torch function modes are per thread
        calls: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(getattr(func, "__name__", repr(func)))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        widget = dock(blob_viewer)
        ready(qtbot, widget, stand_in)
        click(blob_viewer, widget, (20, 18, 12))
        wait_for_labels(qtbot, widget, lambda d: d.any())
        widget.undo()
        wait_for_labels(qtbot, widget, lambda d: not d.any())
    assert recorder.calls == []


def test_snap_to_edges_toggle_renders_the_object_again(qtbot, blob_viewer):
    from fastsam3d.stand_in import ThresholdModel

    class Overshooting(ThresholdModel):
        """Logits raised: masks 6 mm too large with a soft edge, until snapped to the ball."""

        def decode(self, embedding, points, labels, mask_input=None, multimask_output=False):
            low, iou, mask = super().decode(embedding, points, labels, mask_input, multimask_output)
            return low / 2 + 2, iou, mask

    widget = dock(blob_viewer)
    ready(qtbot, widget, Overshooting())
    assert widget.refine_box.isChecked()
    click(blob_viewer, widget, (20, 18, 12))
    wait_for_labels(qtbot, widget, lambda d: d.any())
    snapped = blob_viewer.layers[LABELS_NAME].data.copy()
    widget.refine_box.setChecked(False)
    wait_for_labels(qtbot, widget, lambda d: np.count_nonzero(d) > np.count_nonzero(snapped))
    widget.refine_box.setChecked(True)
    wait_for_labels(qtbot, widget, lambda d: np.array_equal(d, snapped))


def test_refinement_options_follow_the_panel(qtbot, blob_viewer, stand_in):
    widget = dock(blob_viewer)
    ready(qtbot, widget, stand_in)
    engine = widget.worker.engine
    assert widget.walker_combo.currentData() == "ct"
    click(blob_viewer, widget, (20, 18, 12))
    wait_for_labels(qtbot, widget, lambda d: d.any())
    for mode in ("on", "off", "ct"):
        widget.walker_combo.setCurrentIndex(widget.walker_combo.findData(mode))
        qtbot.waitUntil(lambda m=mode: engine.session.settings.refine.click_walker == m)
    assert widget.parts_box.isChecked() and engine.session.settings.refine.clicked_parts_only
    widget.parts_box.setChecked(False)
    qtbot.waitUntil(lambda: not engine.session.settings.refine.clicked_parts_only)
    widget.refine_box.setChecked(False)
    assert not widget.walker_combo.isEnabled() and not widget.parts_box.isEnabled()
    qtbot.waitUntil(lambda: engine.session.settings.refine is None)
    widget.refine_box.setChecked(True)
    assert widget.walker_combo.isEnabled() and widget.parts_box.isEnabled()
    qtbot.waitUntil(lambda: getattr(engine.session.settings.refine, "click_walker", "") == "ct")
    assert not engine.session.settings.refine.clicked_parts_only


def test_mouse_clicks_positive_and_ctrl_negative(qtbot, blob_viewer, stand_in):
    widget = dock(blob_viewer)
    ready(qtbot, widget, stand_in)
    prompts = blob_viewer.layers[PROMPTS_NAME]
    world = np.asarray(widget._image.data_to_world([20.0, 18.0, 12.0]))
    for modifiers in ((), ("Control",)):
        event = SimpleNamespace(
            type="mouse_press",
            pos=np.zeros(2),
            position=world,
            modifiers=modifiers,
            button=1,
            dims_displayed=(1, 2),
            view_direction=None,
            handled=False,
        )
        mouse_press_callbacks(prompts, event)
        event.type = "mouse_release"
        mouse_release_callbacks(prompts, event)
    assert list(prompts.features["positive"]) == [True, False]
    qtbot.waitUntil(lambda: bool(prompts.feature_defaults["positive"][0]), timeout=TIMEOUT)


def test_undo_redo_and_reset(qtbot, blob_viewer, stand_in):
    widget = dock(blob_viewer)
    ready(qtbot, widget, stand_in)
    prompts = blob_viewer.layers[PROMPTS_NAME]
    click(blob_viewer, widget, (20, 18, 12))
    wait_for_labels(qtbot, widget, lambda d: d[20, 18, 12] == 1)
    widget.undo()
    wait_for_labels(qtbot, widget, lambda d: not d.any())
    assert len(prompts.data) == 0
    widget.redo()
    wait_for_labels(qtbot, widget, lambda d: d[20, 18, 12] == 1)
    assert len(prompts.data) == 1
    widget.reset_object()
    wait_for_labels(qtbot, widget, lambda d: not d.any())
    qtbot.waitUntil(lambda: len(prompts.data) == 0, timeout=TIMEOUT)


def test_commit_keeps_earlier_objects_and_export(
    qtbot, make_napari_viewer, tmp_path, no_autoload, stand_in
):
    from nifti_helpers import oblique_affine, write_nifti

    volume = np.full((40, 36, 24), -1000, np.int16)
    volume[5:15, 5:15, 5:12] = 400
    volume[25:35, 20:30, 12:20] = 400
    source = write_nifti(tmp_path / "two.nii.gz", volume, oblique_affine())
    viewer = make_napari_viewer()
    viewer.open(str(source), plugin=PLUGIN)
    widget = dock(viewer)
    ready(qtbot, widget, stand_in)
    click(viewer, widget, (10, 10, 8))
    wait_for_labels(qtbot, widget, lambda d: d[10, 10, 8] == 1)
    widget.commit()
    qtbot.waitUntil(lambda: widget.state.current_id == 2, timeout=TIMEOUT)
    assert len(viewer.layers[PROMPTS_NAME].data) == 0
    click(viewer, widget, (30, 25, 16))
    wait_for_labels(qtbot, widget, lambda d: d[30, 25, 16] == 2)
    labels = viewer.layers[LABELS_NAME].data
    assert labels[10, 10, 8] == 1 and (labels == 1).sum() == widget.state.objects[1].voxels
    assert widget.table.rowCount() == 2
    widget.table.item(0, 2).setCheckState(Qt.Unchecked)  # hide object 1
    assert labels_layer_colour(viewer, 1)[3] == 0 and labels_layer_colour(viewer, 2)[3] > 0
    widget.table.item(0, 2).setCheckState(Qt.Checked)
    assert labels_layer_colour(viewer, 1)[3] > 0
    out = widget.export_labels(str(tmp_path / "two_labels.nii.gz"))
    written = nib.load(out[0])
    assert np.array_equal(written.affine, nib.load(str(source)).affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)


def test_missing_default_model_is_a_notification(qtbot, blob_viewer, monkeypatch, tmp_path):
    from fastsam3d import checkpoints

    monkeypatch.delenv("NAPARI_FASTSAM3D_MODEL")
    monkeypatch.setattr(checkpoints, "BUNDLED_WEIGHTS", tmp_path / "removed.safetensors")
    widget = dock(blob_viewer)
    qtbot.waitUntil(lambda: "not loaded" in widget.status_label.text(), timeout=TIMEOUT)
    assert "Local file" in widget.status_label.text()
    click(blob_viewer, widget, (20, 18, 12))  # kept, no crash, nothing decoded
    assert len(blob_viewer.layers[PROMPTS_NAME].data) == 1
    assert not blob_viewer.layers[LABELS_NAME].data.any()


def test_local_file_model_through_the_panel(qtbot, blob_viewer, tiny_weights):
    widget = dock(blob_viewer)
    qtbot.waitUntil(lambda: widget.device_combo.findData("cpu") >= 0, timeout=TIMEOUT)
    widget.model_combo.setCurrentIndex(widget.model_combo.findData("local file"))
    assert not widget.path_edit.isHidden()
    widget.path_edit.setText(str(tiny_weights))
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    widget.precision_combo.setCurrentIndex(widget.precision_combo.findData("int8"))
    widget.load_button.click()
    qtbot.waitUntil(lambda: widget._session_ready, timeout=TIMEOUT)
    click(blob_viewer, widget, (20, 18, 12))
    qtbot.waitUntil(lambda: widget.state.shown_seq == 1, timeout=TIMEOUT)
    status = widget.status_label.text()
    assert "tiny" in status and "cpu, int8 encoder" in status and "last click" in status


def test_shortcuts_avoid_napari_keys_and_work(qtbot, blob_viewer):
    from app_model.types import KeyBinding
    from napari.components import ViewerModel
    from napari.layers import Points
    from napari.utils.shortcuts import default_shortcuts

    from napari_fastsam3d._prompts import SHORTCUTS

    taken = {str(KeyBinding.validate(k)) for keys in default_shortcuts.values() for k in keys}
    taken |= {str(k) for k in (*Points.class_keymap, *ViewerModel.class_keymap)}
    ours = {name: KeyBinding.validate(key) for name, (key, _) in SHORTCUTS.items()}
    assert not {str(k) for k in ours.values()} & taken
    widget = dock(blob_viewer)
    prompts = blob_viewer.layers[PROMPTS_NAME]
    bound = {str(k): func for k, func in prompts.keymap.items()}
    bound[str(ours["toggle_polarity"])](prompts)
    assert widget.negative_box.isChecked() and widget.state.negative_mode
    assert not bool(prompts.feature_defaults["positive"][0])
    bound[str(ours["toggle_polarity"])](prompts)
    assert bool(prompts.feature_defaults["positive"][0])


def test_clicks_in_the_3d_view_are_refused(qtbot, blob_viewer, stand_in):
    widget = dock(blob_viewer)
    ready(qtbot, widget, stand_in)
    prompts = blob_viewer.layers[PROMPTS_NAME]
    world = np.asarray(widget._image.data_to_world([20.0, 18.0, 12.0]))
    event = SimpleNamespace(
        type="mouse_press",
        pos=np.zeros(2),
        position=world,
        modifiers=(),
        button=1,
        dims_displayed=(0, 1, 2),
        view_direction=np.array([1.0, 0.0, 0.0]),
        handled=False,
    )
    actions = []
    prompts.events.data.connect(lambda e: actions.append(e.action))
    mouse_press_callbacks(prompts, event)
    event.type = "mouse_release"
    mouse_release_callbacks(prompts, event)
    assert "added" in actions  # napari added the point; the widget took it back
    assert len(prompts.data) == 0 and widget.state.sent_seq == 0


def test_removed_layers_are_made_again_without_losing_the_image(qtbot, blob_viewer):
    widget = dock(blob_viewer)
    image = widget._image
    blob_viewer.layers.remove(LABELS_NAME)
    assert widget._image is None and "removed" in widget.status_label.text()
    widget._on_image_chosen(image.name)
    assert LABELS_NAME in blob_viewer.layers and widget._image == image
    widget._on_image_chosen(image.name)  # the same image again: nothing is made twice
    assert [layer.name for layer in blob_viewer.layers].count(PROMPTS_NAME) == 1
    assert len(widget._bound_layers) == 1  # the prompts layer's callbacks are bound once
    assert widget.default_export_path().endswith("oblique_labels.nii.gz")


def test_existing_labels_are_kept_and_new_ids_follow(qtbot, blob_viewer, stand_in):
    existing = np.zeros((40, 36, 24), np.uint16)
    existing[0:4, 0:4, 0:4] = 5
    image = blob_viewer.layers[0]
    grid = {k: getattr(image, k) for k in ("scale", "translate", "rotate", "shear", "affine")}
    blob_viewer.add_labels(existing, name=LABELS_NAME, **grid)
    widget = dock(blob_viewer)
    assert widget.state.current_id == 6 and widget.table.rowCount() == 2
    ready(qtbot, widget, stand_in)
    click(blob_viewer, widget, (20, 18, 12))
    wait_for_labels(qtbot, widget, lambda d: d[20, 18, 12] == 6)
    assert (blob_viewer.layers[LABELS_NAME].data == 5).sum() == 64


def test_labels_of_another_grid_are_kept_aside(qtbot, blob_viewer):
    other = np.zeros((40, 36, 24), np.uint16)
    other[0, 0, 0] = 3
    blob_viewer.add_labels(other, name=LABELS_NAME, scale=(2.0, 2.0, 2.0))  # same shape, other grid
    widget = dock(blob_viewer)
    names = [layer.name for layer in blob_viewer.layers]
    assert f"{LABELS_NAME} (old)" in names and LABELS_NAME in names
    assert not blob_viewer.layers[LABELS_NAME].data.any()
    assert blob_viewer.layers[f"{LABELS_NAME} (old)"].data[0, 0, 0] == 3
    assert widget.state.current_id == 1


def test_points_outside_the_image_are_dropped_with_their_polarity(qtbot, blob_viewer):
    dock(blob_viewer)
    prompts = blob_viewer.layers[PROMPTS_NAME]
    image = blob_viewer.layers[0]
    corner = np.asarray(image.data_to_world([5.0, 5.0, 5.0]))
    with prompts.events.data.blocker():
        prompts.data = np.array([[1e4, 0, 0], corner, [2e4, 0, 0]], dtype=float)
        prompts.features = {"positive": [True, False, True]}
    inside = np.asarray(image.data_to_world([20.0, 18.0, 12.0]))
    prompts.add(inside)  # the event: three points checked, two outside the image
    assert len(prompts.data) == 2
    assert list(prompts.features["positive"]) == [False, True]


def test_progress_bars_follow_the_model_thread(qtbot, blob_viewer):
    from napari_fastsam3d._state import Progress

    widget = dock(blob_viewer)
    widget._on_message(Progress("download", 100, 1000))
    widget._on_message(Progress("download", 600, 1000))
    [bar] = widget._bars._bars.values()
    assert (bar.n, bar.total) == (600, 1000) and widget.cancel_button.isEnabled()
    widget._on_message(Progress("load_model", 0, 0, finished=True))
    assert not widget._bars.active and not widget.cancel_button.isEnabled()
