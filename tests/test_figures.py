"""benchmarks/make_figures.py draws the docs' figures from the tools' JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("make_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dice_and_latency_figures_are_written(figures, tmp_path):
    report = {"summary": {"mean_dice_per_click": [0.4, 0.6, 0.7], "structures": 2}}
    oracle = {**report, "oracle": True}
    (tmp_path / "model_ct.json").write_text(json.dumps(report))
    (tmp_path / "box_ct.json").write_text(json.dumps(oracle))
    bench = {
        "device": "test CPU",
        "torch": "x",
        "results": [
            {"name": "click (prompt)", "batch": 1, "reference_ms": 3.0, "fast_ms": 1.0},
            {"name": "teacher", "batch": 1, "reference_ms": None, "fast_ms": 2.0},
        ],
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    out = tmp_path / "images"
    out.mkdir()
    dice = figures.plot_dice_vs_clicks(
        {"CT": sorted(map(str, tmp_path.glob("*_ct.json")))}, out / "dice.png"
    )
    latency = figures.plot_latency([str(tmp_path / "bench.json")], out)
    assert dice.stat().st_size > 10_000 and latency.stat().st_size > 10_000
    assert figures.method_label(oracle, "x/box_ct.json") == "box (oracle)"
