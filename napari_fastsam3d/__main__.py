"""``napari-fastsam3d``: napari with the sample CT (or your image), the widget docked, a model.

    napari-fastsam3d                        # sample CT, bundled default model
    napari-fastsam3d scan.nii.gz --model ~/weights/FastSAM3D.pth --device cuda
    napari-fastsam3d --demo-clicks --screenshot shot.png   # scripted clicks, save, quit

``--model stand-in`` uses the thresholding stand-in of :mod:`fastsam3d.stand_in` (no weights;
for demos and tests of the plumbing, not a segmentation model).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fastsam3d.cli import PRECISIONS

from ._engine import STAND_IN

logger = logging.getLogger(__name__)

# Voxels (i, j, k) of the sample CT: liver and spleen, inside TotalSegmentator's masks of them.
SAMPLE_CLICKS = ((91, 51, 20), (21, 33, 20))
STEP_MS = 50


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-fastsam3d",
        description="Open napari with FastSAM3D interactive 3D segmentation docked.",
    )
    parser.add_argument("image", nargs="?", help="a .nii / .nii.gz volume (default: sample CT)")
    parser.add_argument(
        "--model",
        default=None,
        help="registry name (default, fastsam3d, sam-med3d-turbo), a weights "
        f"file, or '{STAND_IN}' (default: $NAPARI_FASTSAM3D_MODEL or the "
        "bundled default)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:N, mps, cpu"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="image encoder precision: fp32 (exact, default), bf16, int8 (CPU); see the README",
    )
    parser.add_argument(
        "--demo-clicks",
        action="store_true",
        help="click scripted points (one object each), committing in between",
    )
    parser.add_argument(
        "--screenshot",
        metavar="PATH",
        help="save a screenshot of the window after the demo, then quit",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the scripted demo may take before giving up",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import napari

    viewer = napari.Viewer(title="FastSAM3D")
    viewer.window.resize(1500, 950)
    image = _open_image(viewer, args.image)
    from ._widget import FastSAM3DWidget

    widget = FastSAM3DWidget(viewer, model=args.model, device=args.device, precision=args.precision)
    viewer.window.add_dock_widget(widget, name="FastSAM3D", area="right")
    _show_axial(viewer, image)
    if not (args.demo_clicks or args.screenshot):
        napari.run()
        return 0
    clicks = _clicks(image, args.image) if args.demo_clicks else ()
    demo = Demo(viewer, widget, clicks, args.screenshot, args.timeout)
    demo.start()
    napari.run()
    return demo.status


def _open_image(viewer, path: str | None):
    if path is None:
        from ._sample_data import make_sample_ct

        [(data, kwargs, _)] = make_sample_ct()
        return viewer.add_image(data, **kwargs)
    return viewer.open(path, plugin="napari-fastsam3d")[0]


def _show_axial(viewer, image) -> None:
    """Axial slices in radiological view (patient right on the left, anterior up)."""
    if image.ndim != 3:
        return
    viewer.dims.order = (2, 1, 0)
    try:
        viewer.camera.orientation2d = ("up", "left")
    except (AttributeError, ValueError):  # older napari: keep its default orientation
        logger.debug("camera orientation not supported by this napari")
    viewer.reset_view()


def _clicks(image, path: str | None) -> tuple[tuple[int, int, int], ...]:
    if path is None:
        return SAMPLE_CLICKS
    return (tuple(int(n) // 2 for n in image.data.shape),)


class Demo:
    """Scripted clicks driven by a Qt timer: click, wait for the mask, commit, ..., screenshot."""

    def __init__(self, viewer, widget, clicks, screenshot: str | None, timeout: float) -> None:
        self.viewer, self.widget, self.clicks = viewer, widget, clicks
        self.screenshot, self.deadline = screenshot, time.monotonic() + timeout
        self.status = 1
        self._steps: Iterator[bool] = self._script()

    def start(self) -> None:
        from qtpy.QtCore import QTimer

        self._timer = QTimer()
        self._timer.timeout.connect(self._tick)
        self._timer.start(STEP_MS)

    def _tick(self) -> None:
        try:
            if time.monotonic() > self.deadline:
                raise TimeoutError("the scripted demo did not finish in time")
            next(self._steps)
        except StopIteration:
            self._finish(0)
        except Exception as err:  # report, then quit with an error status
            logger.error("demo failed: %s", err)
            self._finish(1)

    def _script(self) -> Iterator[bool]:
        widget = self.widget
        while not widget._session_ready:
            if widget.model_error is not None:
                if self.clicks:
                    raise RuntimeError(f"no model: {widget.model_error}")
                break
            yield False
        for n, index in enumerate(self.clicks):
            if n:
                widget.commit()
                target = widget.state.current_id
                while widget.state.current_id == target:
                    yield False
            sent = widget.state.sent_seq
            self._go_to_slice(index)
            self._click(index)
            while widget.state.shown_seq <= sent:
                yield False
            logger.info(
                "demo click %s: %d voxels, %.0f ms",
                index,
                widget.current_voxels,
                widget.state.last_latency_ms,
            )
        yield True

    def _click(self, index) -> None:
        """Click like the mouse does: in-plane at the voxel, depth at the current slice."""
        image = self.widget._image
        world = np.array(image.data_to_world(np.asarray(index, dtype=float)), dtype=float)
        for axis in self.viewer.dims.not_displayed:
            world[axis] = self.viewer.dims.point[axis]
        prompts = self.widget.prompts_layer
        prompts.add(prompts.world_to_data(world))

    def _go_to_slice(self, index) -> None:
        world = self.widget._image.data_to_world(np.asarray(index, dtype=float))
        for axis in self.viewer.dims.not_displayed:
            self.viewer.dims.set_point(axis, float(world[axis]))

    def _finish(self, status: int) -> None:
        self._timer.stop()
        self.status = status
        if self.screenshot:
            _close_toasts()
            self.viewer.reset_view()
            Path(self.screenshot).parent.mkdir(parents=True, exist_ok=True)
            self.viewer.screenshot(self.screenshot, canvas_only=False)
            logger.info("screenshot saved to %s", self.screenshot)
            self.widget.close_worker()
            self.viewer.close()


def _close_toasts() -> None:
    """Close napari's notification pop-ups so that they do not cover the screenshot."""
    from qtpy.QtWidgets import QApplication

    for widget in QApplication.allWidgets():
        if type(widget).__name__ == "NapariQtNotification":
            widget.close()


if __name__ == "__main__":
    sys.exit(main())
