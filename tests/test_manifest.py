"""The npe2 manifest: valid, discovered, shipped inside the package (editable and wheel builds)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-fastsam3d"


def test_npe2_validate_with_imports():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", PLUGIN, "--imports"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()


def test_plugin_is_discovered_with_every_contribution():
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest(PLUGIN)
    contributions = manifest.contributions
    assert contributions.readers[0].filename_patterns == ["*.nii", "*.nii.gz"]
    assert contributions.writers[0].layer_types == ["labels"]
    assert [w.display_name for w in contributions.widgets] == ["FastSAM3D"]
    assert [s.key for s in contributions.sample_data] == ["abdomen_ct"]
    assert "napari/layers/segment" in contributions.menus
    for command in contributions.commands:
        module, _, name = command.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), command.id


def test_installed_manifest_is_the_repository_manifest():
    shipped = resources.files("napari_fastsam3d").joinpath("napari.yaml").read_text()
    assert shipped == (ROOT / "napari.yaml").read_text()


def test_discovery_imports_neither_torch_nor_qt():
    code = (
        "import sys; import napari_fastsam3d._reader, napari_fastsam3d._writer, "
        "napari_fastsam3d._sample_data; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt5') if m in sys.modules]; "
        "print(*bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_ships_manifest_and_sample(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = tmp_path.glob("napari_fastsam3d-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert archive.read("napari_fastsam3d/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = archive.read(entry_points).decode()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "napari_fastsam3d/data/example_ct_sm.nii.gz" in names
    assert "napari_fastsam3d/data/README.md" in names
    assert "napari-fastsam3d = napari_fastsam3d:napari.yaml" in text
    assert "napari-fastsam3d = napari_fastsam3d.__main__:main" in text
    assert "Classifier: Framework :: napari" in metadata


@pytest.mark.parametrize("suffix", [".nii.gz"])
def test_viewer_opens_nifti_and_sample_through_the_plugin(
    make_napari_viewer, oblique_nifti, suffix
):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(oblique_nifti), plugin=PLUGIN)
    assert layer.metadata["source_path"].endswith("oblique" + suffix)
    [sample] = viewer.open_sample(PLUGIN, "abdomen_ct")
    assert sample.data.shape == (122, 101, 30)
