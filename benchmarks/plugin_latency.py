"""Click -> Labels-layer-updated latency of the napari plugin on a 512 x 512 x 300 volume.

Measures what a user waits for: from the moment a point lands in ``FastSAM3D prompts`` until
``FastSAM3D labels`` shows the new mask (model thread, queued signal, box-only layer update and
re-slice), and beside it the engine alone (``Session.add_point_result`` on the same clicks, same
process, no napari) as the reference. Medians after warm-up; first clicks (ROI encoding)
reported separately.

Model: the FastSAM3D architecture with random weights (real encoder and decoder compute) whose
mask output is replaced by a 30 mm ball at the click, because random weights give masks that
fill whole ROIs and no trained weights are published yet. Run under a display (Xvfb works):

    python benchmarks/plugin_latency.py                    # prints, and updates docs/BENCHMARKS.md
    python benchmarks/plugin_latency.py --clicks 10 --no-write [--no-refine]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastsam3d.benchmark import ball_logits

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
HEADING = "## napari click latency"
SHAPE = (512, 512, 300)
SPACING = (0.7, 0.7, 1.0)


class BallMaskModel(nn.Module):
    """Runs a real model's encoder and decoder, but returns a ball around the newest click.

    Args:
        model: a ``Sam3D`` (its compute is what is timed).
        radius: ball radius in model voxels (1.5 mm each).
    """

    def __init__(self, model: nn.Module, radius: float = 20.0) -> None:
        super().__init__()
        self.model, self.radius, self.config = model, radius, model.config

    @property
    def signature(self) -> str:
        return f"ball{self.radius}:{self.model.signature}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def decode(self, embedding, points, labels, mask_input=None, multimask_output=False):
        low, iou, _ = self.model.decode(
            embedding, points, labels, mask_input, multimask_output, return_mask=False
        )
        ball = ball_logits(points[0, -1].tolist(), self.radius, low.device).to(low)
        return ball, iou, None  # Session uses the low-res logits only


def make_volume() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume: air, an elliptic body of soft tissue, a brighter organ."""
    i, j, k = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = (i - 256) ** 2 / 200**2 + (j - 256) ** 2 / 150**2 <= 1
    organ = (i - 300) ** 2 / 60**2 + (j - 230) ** 2 / 50**2 + (k - 150) ** 2 / 70**2 <= 1
    volume = np.where(body, np.int16(40), np.int16(-1000)) + np.where(organ, 60, 0)
    volume = np.broadcast_to(volume, SHAPE).astype(np.int16)
    affine = np.diag([*SPACING, 1.0])
    return volume, affine


def click_positions(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Clicks scattered inside the organ, within one model ROI (decoder-only after the first)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in (300, 230, 150) + rng.integers(-12, 13, 3)) for _ in range(n)]


def build_model() -> nn.Module:
    import fastsam3d
    from fastsam3d.modeling.configs import get_config

    torch.manual_seed(0)
    model = fastsam3d.build_model(get_config("fastsam3d")).eval().prepare_inference()
    return BallMaskModel(model)


def reference_session(model, volume, affine, refine: bool):
    """A bare ``Session`` on the same volume (no napari): the reference path."""
    import fastsam3d
    from fastsam3d.session import SessionSettings

    settings = SessionSettings() if refine else SessionSettings(refine=None)
    return fastsam3d.Session(model, fastsam3d.Volume(volume, affine), "cpu", settings=settings)


def reference_click(session, index) -> float:
    """Milliseconds of ``Session.add_point_result`` for one click on a new object."""
    start = time.perf_counter()
    session.add_point_result(index)
    elapsed = (time.perf_counter() - start) * 1e3
    session.reset()
    return elapsed


def reference_clicks(model, volume, affine, clicks, refine: bool) -> list[float]:
    """:func:`reference_click` for each click, in a fresh reference session."""
    session = reference_session(model, volume, affine, refine)
    return [reference_click(session, index) for index in clicks]


def in_own_thread(fn, *args):
    """``fn(*args)`` on a thread of its own, which ends before this returns.

    torch's OpenMP threads belong to the Python thread that started them and end with it.
    Once two Python threads of a process have run torch on a CPU, their OpenMP threads
    outnumber the cores, libgomp spin-waits 100 times instead of 300,000 before sleeping
    (its ``GOMP_SPINCOUNT`` rule), and every click takes about 1.8x as long on 2 cores
    (measured here). The plugin runs all torch work on its model thread, so the benchmark
    keeps every other torch call off the threads that outlive it.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as error:  # re-raised on the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def measure(model, volume, affine, clicks, show=True, refine=True, timeout: float = 600.0):
    """Per click: (click -> layer updated ms, engine ms, reference ms).

    The plugin figures are the widget's own. The reference runs the same clicks on a bare
    session once the plugin's model thread has stopped (:func:`in_own_thread` says why they
    do not alternate).
    """
    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from fastsam3d.cache import DEFAULT_CACHE
    from napari_fastsam3d._widget import FastSAM3DWidget

    DEFAULT_CACHE.clear()  # the first click of each run encodes its ROI
    viewer = napari.Viewer(show=show)
    image = viewer.add_image(volume, scale=SPACING, name="volume")
    widget = FastSAM3DWidget(viewer, model=model, device="cpu")
    viewer.window.add_dock_widget(widget, name="FastSAM3D")
    app = QApplication.instance()

    ticker = QTimer()  # wakes the blocking event wait below now and then
    ticker.start(20)
    blocking = QEventLoop.AllEvents | QEventLoop.WaitForMoreEvents

    def wait(predicate) -> None:
        """Run napari's event loop as napari would (idle in Qt, not polling) until true."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the plugin did not answer in time")
            app.processEvents(blocking)

    wait(lambda: widget._session_ready)
    widget.refine_box.setChecked(refine)
    results = []
    for index in clicks:
        world = np.array(image.data_to_world(np.asarray(index, dtype=float)), dtype=float)
        for axis in viewer.dims.not_displayed:
            viewer.dims.set_point(axis, float(world[axis]))
            world[axis] = viewer.dims.point[axis]
        sent = widget.state.sent_seq
        widget.prompts_layer.add(world)
        wait(lambda sent=sent: widget.state.shown_seq > sent)
        plugin = (widget.state.last_latency_ms, widget.state.last_engine_ms)
        widget.reset_object()
        wait(lambda: len(widget.prompts_layer.data) == 0)
        app.processEvents()
        results.append(plugin)
    ticker.stop()
    widget.close_worker()
    viewer.close()
    references = in_own_thread(reference_clicks, model, volume, affine, clicks, refine)
    return [(*plugin, ms) for plugin, ms in zip(results, references, strict=True)]


def report(shown, hidden, warmup: int, refine: bool) -> str:
    """The Markdown section, from runs with the window drawn and hidden."""
    med = statistics.median

    def column(results, index):
        return med(r[index] for r in results[warmup:])

    cpu = platform.processor() or platform.machine()
    rows = [
        ("click -> `FastSAM3D labels` updated (the status line's figure)", 0),
        ("of which on the model thread (engine)", 1),
        ("reference: `Session.add_point_result` alone, same clicks, no napari", 2),
    ]
    lines = [
        HEADING,
        "",
        f"`python benchmarks/plugin_latency.py` on {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads), "
        f"volume {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16 at {SPACING} mm, "
        "FastSAM3D architecture (`prepare_inference()`, as the plugin loads it) with random "
        "weights whose mask is a 30 mm ball (see the script); session defaults, edge "
        f"refinement {'on' if refine else 'off (`--no-refine`)'}"
        f"{' (with the click walker: the volume is CT-like)' if refine else ''}.",
        f"Medians of {len(shown) - warmup} clicks after {warmup} warm-up click(s); each click "
        "starts a new object in an already encoded ROI (decoder only); the reference runs "
        "the same clicks after the plugin's model thread has stopped, on a thread of its own "
        "(torch on two live threads slows both, see `in_own_thread`). *Drawn*: napari's "
        "window is shown (Xvfb, Mesa llvmpipe: OpenGL drawn by the same 2 CPU cores); "
        "*hidden*: same run without drawing.",
        "",
        "| median ms | drawn | hidden |",
        "|---|---|---|",
        *[f"| {name} | {column(shown, i):.1f} | {column(hidden, i):.1f} |" for name, i in rows],
        f"| first click of the run (ROI encoding included; one sample) | {shown[0][0]:.0f} "
        f"| {hidden[0][0]:.0f} |",
        "",
        f"Plugin / reference: {column(shown, 0) / column(shown, 2):.2f} drawn, "
        f"{column(hidden, 0) / column(hidden, 2):.2f} hidden: the plugin's own work is the "
        "hidden difference; drawing in software on the same two cores slows the decoder. Load "
        f"average when the run ended: {os.getloadavg()[0]:.1f} (other jobs shared the machine: "
        "expect run-to-run differences of tens of percent). A figure, not a pass/fail "
        "threshold; GPU figures belong in the sections that measure the model.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = DOC) -> None:
    """Replace (or append) our section of docs/BENCHMARKS.md, keeping the other sections."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = old.find(HEADING)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(HEADING))
        new = old[:start] + text + (old[end + 1 :] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-refine", action="store_true", help="edge refinement off")
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_CONFIG", "")
    volume, affine = make_volume()
    model = in_own_thread(build_model)
    clicks = click_positions(args.clicks)
    refine = not args.no_refine
    shown = measure(model, volume, affine, clicks, show=True, refine=refine)
    hidden = measure(model, volume, affine, clicks, show=False, refine=refine)
    text = report(shown, hidden, args.warmup, refine)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
