"""Writer contribution: labels -> NIfTI on the source grid; the source image is never written."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Image
from nifti_helpers import blob_volume, write_nifti

from fastsam3d.errors import InputError
from napari_fastsam3d._layers import make_labels_layer
from napari_fastsam3d._reader import napari_get_reader
from napari_fastsam3d._writer import write_labels


def _labels_for(path):
    [(data, kwargs, _)] = napari_get_reader(str(path))(str(path))
    labels = make_labels_layer(Image(data, **kwargs))
    labels.data[5:15, 6:12, 3:9] = 1
    labels.data[20:30, 20:25, 10:20] = 2
    return labels


def _save(labels, path):
    data, attributes, _ = labels.as_layer_data_tuple()
    return write_labels(str(path), data, attributes)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_round_trip_keeps_affine_exactly(oblique_nifti, tmp_path, suffix):
    labels = _labels_for(oblique_nifti)
    out = tmp_path / f"labels{suffix}"
    assert _save(labels, out) == [str(out)]
    source, written = nib.load(str(oblique_nifti)), nib.load(str(out))
    assert np.array_equal(written.affine, source.affine)
    assert written.shape == source.shape
    for field in ("sform_code", "qform_code", "pixdim", "srow_x", "srow_y", "srow_z"):
        assert np.array_equal(written.header[field], source.header[field]), field
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.data)


def test_sample_ct_round_trip(sample_ct_path, tmp_path):
    labels = _labels_for(sample_ct_path)
    out = _save(labels, tmp_path / "ct_labels.nii.gz")[0]
    assert np.array_equal(nib.load(out).affine, nib.load(str(sample_ct_path)).affine)


def test_large_ids_get_a_wider_dtype(oblique_nifti, tmp_path):
    labels = _labels_for(oblique_nifti)
    labels.data[0, 0, 0] = 300
    out = _save(labels, tmp_path / "wide.nii.gz")[0]
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint16
    assert np.asanyarray(written.dataobj)[0, 0, 0] == 300


def test_refuses_to_overwrite_the_source_image(oblique_nifti, tmp_path):
    before = hashlib.sha256(oblique_nifti.read_bytes()).hexdigest()
    labels = _labels_for(oblique_nifti)
    with pytest.raises(InputError, match="source image"):
        _save(labels, oblique_nifti)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(oblique_nifti)
    with pytest.raises(InputError, match="source image"):
        _save(labels, link)
    assert hashlib.sha256(oblique_nifti.read_bytes()).hexdigest() == before


def test_appends_a_suffix(oblique_nifti, tmp_path):
    out = _save(_labels_for(oblique_nifti), tmp_path / "plain")
    assert out == [str(tmp_path / "plain.nii.gz")]
    assert nib.load(out[0]).shape == (40, 36, 24)


def test_layer_without_source_uses_its_transform(tmp_path):
    from napari.layers import Labels

    layer = Labels(np.ones((4, 5, 6), np.int32), scale=(0.5, 2.0, 3.0), translate=(1, 2, 3))
    out = _save(layer, tmp_path / "free.nii")[0]
    expected = np.diag([0.5, 2.0, 3.0, 1.0])
    expected[:3, 3] = [1, 2, 3]
    np.testing.assert_allclose(nib.load(out).affine, expected)


def test_refuses_non_integer_or_negative_labels(tmp_path):
    with pytest.raises(InputError, match="integers"):
        write_labels(str(tmp_path / "f.nii"), np.zeros((3, 3, 3), np.float32), {})
    with pytest.raises(InputError, match="negative"):
        write_labels(str(tmp_path / "n.nii"), -np.ones((3, 3, 3), np.int16), {})


def test_scaled_source_header_does_not_rescale_labels(tmp_path):
    source = write_nifti(tmp_path / "scaled.nii", blob_volume(), np.eye(4))
    with open(source, "r+b") as f:  # NIfTI-1: scl_slope at byte 112, scl_inter at 116
        f.seek(112)
        f.write(np.array([2.0, -1024.0], dtype="<f4").tobytes())
    assert nib.load(str(source)).dataobj.slope == 2.0
    labels = _labels_for(source)
    written = nib.load(_save(labels, tmp_path / "lab.nii.gz")[0])
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.data)
