"""Reader contribution: accepts 3D NIfTI, rejects the rest, world coordinates = file affine."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Image
from nifti_helpers import blob_volume, oblique_affine, write_nifti

from napari_fastsam3d._layers import image_affine
from napari_fastsam3d._reader import napari_get_reader
from napari_fastsam3d._sample_data import make_sample_ct


def _read_one(path):
    reader = napari_get_reader(str(path))
    assert callable(reader)
    layers = reader(str(path))
    assert len(layers) == 1
    return layers[0]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_reads_voxels_in_stored_order(tmp_path, suffix):
    volume = blob_volume()
    path = write_nifti(tmp_path / f"vol{suffix}", volume, oblique_affine())
    data, kwargs, kind = _read_one(path)
    assert kind == "image"
    assert kwargs["name"] == "vol"
    np.testing.assert_array_equal(np.asarray(data), volume)
    assert data.dtype == np.int16


def test_world_coordinates_are_the_file_affine(oblique_nifti):
    data, kwargs, _ = _read_one(oblique_nifti)
    layer = Image(data, **kwargs)
    affine = nib.load(str(oblique_nifti)).affine
    rng = np.random.default_rng(0)
    voxels = rng.uniform(0, 20, size=(20, 3))
    world = np.array([layer.data_to_world(v) for v in voxels])
    expected = voxels @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(world, expected, atol=1e-9)
    back = np.array([layer.world_to_data(w) for w in expected])
    np.testing.assert_allclose(back, voxels, atol=1e-6)  # napari inverts in float32


def test_metadata_keeps_exact_affine_and_header(oblique_nifti):
    data, kwargs, _ = _read_one(oblique_nifti)
    stored = nib.load(str(oblique_nifti))
    meta = kwargs["metadata"]
    assert np.array_equal(meta["affine"], stored.affine)
    assert isinstance(meta["header"], nib.Nifti1Header)
    assert int(meta["header"]["sform_code"]) == 1
    assert meta["source_path"] == str(oblique_nifti.resolve())
    assert np.array_equal(image_affine(Image(data, **kwargs)), stored.affine)


def test_axis_aligned_file_has_no_rotation_or_shear(tmp_path):
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = [-10, 20, 30]
    path = write_nifti(tmp_path / "ras.nii", blob_volume(), affine)
    _, kwargs, _ = _read_one(path)
    np.testing.assert_allclose(kwargs["scale"], [0.7, 0.7, 3.0])
    np.testing.assert_allclose(kwargs["translate"], [-10, 20, 30])
    np.testing.assert_array_equal(kwargs["rotate"], np.eye(3))
    np.testing.assert_array_equal(kwargs["shear"], np.zeros(3))


def test_trailing_singleton_axis_is_dropped(tmp_path):
    volume = blob_volume()[..., None]
    path = write_nifti(tmp_path / "vol4d.nii.gz", volume, np.eye(4))
    data, _, _ = _read_one(path)
    assert data.shape == volume.shape[:3]


@pytest.mark.parametrize("name", ["image.tif", "volume.nii.txt", "notes.txt"])
def test_rejects_other_suffixes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 400)
    assert napari_get_reader(str(path)) is None


def test_rejects_corrupt_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti file at all")
    assert napari_get_reader(str(corrupt)) is None
    assert napari_get_reader(str(tmp_path / "missing.nii")) is None


def test_rejects_time_series_and_2d(tmp_path):
    series = write_nifti(tmp_path / "series.nii", np.zeros((8, 8, 8, 3), np.int16), np.eye(4))
    flat = write_nifti(tmp_path / "flat.nii", np.zeros((8, 8), np.int16), np.eye(4))
    assert napari_get_reader(str(series)) is None
    assert napari_get_reader(str(flat)) is None


def test_path_lists(oblique_nifti):
    assert callable(napari_get_reader([str(oblique_nifti)]))
    assert napari_get_reader([str(oblique_nifti), str(oblique_nifti)]) is None


def test_sample_ct_is_real_and_in_mm(sample_ct_path):
    [(data, kwargs, kind)] = make_sample_ct()
    assert kind == "image"
    assert data.shape == (122, 101, 30)
    assert data.min() <= -1000 and data.max() > 500  # Hounsfield units: air and bone
    np.testing.assert_allclose(kwargs["scale"], [3.0, 3.0, 3.0])
    assert kwargs["contrast_limits"] == [-160.0, 240.0]  # soft-tissue window for CT
    assert np.array_equal(kwargs["metadata"]["affine"], nib.load(str(sample_ct_path)).affine)
    assert (sample_ct_path.parent / "README.md").read_text().count("CC-BY-4.0") >= 1
