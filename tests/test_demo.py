"""The README command: `napari-fastsam3d --demo-clicks --screenshot`, and screenshots show masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_fastsam3d._layers import LABELS_NAME, PROMPTS_NAME

PLUGIN = "napari-fastsam3d"
TIMEOUT = 60_000


def _mask_coloured_pixels(rgba: np.ndarray) -> int:
    """Pixels tinted by label 1's colour (red-brown): red well above green and blue."""
    rgb = rgba[..., :3].astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(np.count_nonzero((r - g > 30) & (r - b > 50)))


def test_console_script_demo_saves_a_screenshot_with_the_mask(tmp_path):
    import imageio.v3 as iio

    script = Path(sys.executable).with_name("napari-fastsam3d")
    shot = tmp_path / "demo.png"
    env = {**os.environ, "NAPARI_CONFIG": ""}
    result = subprocess.run(
        [
            str(script),
            "--model",
            "stand-in",
            "--demo-clicks",
            "--screenshot",
            str(shot),
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "demo click (91, 51, 20)" in result.stderr
    image = iio.imread(shot)
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert _mask_coloured_pixels(image) > 2000


def test_screenshot_shows_the_mask(qtbot, make_napari_viewer, sample_ct_path, monkeypatch):
    from fastsam3d.stand_in import ThresholdModel

    monkeypatch.setenv("NAPARI_FASTSAM3D_MODEL", "none")
    viewer = make_napari_viewer(show=True)
    viewer.open(str(sample_ct_path), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN)
    widget.load_model(ThresholdModel(threshold=0.0), "cpu")
    qtbot.waitUntil(lambda: widget._session_ready, timeout=TIMEOUT)
    viewer.dims.order = (2, 1, 0)
    image = widget._image
    world = np.asarray(image.data_to_world([91.0, 51.0, 20.0]))
    viewer.dims.set_point(2, float(world[2]))
    world[2] = viewer.dims.point[2]
    viewer.layers[PROMPTS_NAME].add(world)
    labels = viewer.layers[LABELS_NAME]
    qtbot.waitUntil(lambda: labels.data[80:100, 40:60, 20].any(), timeout=TIMEOUT)
    viewer.reset_view()
    shown = viewer.screenshot(canvas_only=True, flash=False)
    labels.visible = False
    hidden = viewer.screenshot(canvas_only=True, flash=False)
    assert _mask_coloured_pixels(shown) > 1000
    assert _mask_coloured_pixels(hidden) < 50


def latency_benchmark():
    """``benchmarks/plugin_latency.py`` as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plugin_latency.py"
    spec = importlib.util.spec_from_file_location("plugin_latency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_runs_torch_work_on_threads_that_end():
    import threading

    bench = latency_benchmark()
    worker = bench.in_own_thread(threading.current_thread)
    assert worker is not threading.current_thread()
    assert not worker.is_alive()
    assert bench.in_own_thread(sum, [1, 2]) == 3
    with pytest.raises(ValueError):
        bench.in_own_thread(int, "not a number")


def test_benchmark_report_replaces_only_its_own_section(tmp_path):
    bench = latency_benchmark()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## model speed\n\nkeep me\n")
    results = [(1000.0, 900.0, 800.0)] + [(100.0 + i, 90.0, 80.0) for i in range(5)]
    bench.write_section(bench.report(results, results, warmup=1, refine=False), doc)
    bench.write_section(bench.report(results, results, warmup=1, refine=True), doc)
    text = doc.read_text()
    assert text.count(bench.HEADING) == 1 and "keep me" in text
    assert "edge refinement on" in text
    assert "| 102.0 | 102.0 |" in text  # median of 100..104
