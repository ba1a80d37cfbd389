"""Shared fixtures. napari/Qt tests run under Xvfb (pytest-xvfb) with no user settings."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("NAPARI_CONFIG", "")
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-runtime-"))

import pytest  # noqa: E402
from nifti_helpers import blob_volume, oblique_affine, write_nifti  # noqa: E402


@pytest.fixture
def oblique_nifti(tmp_path):
    """An oblique, anisotropic, flipped 40 x 36 x 24 int16 volume with a bright ball (.nii.gz)."""
    return write_nifti(tmp_path / "oblique.nii.gz", blob_volume(), oblique_affine())


@pytest.fixture
def sample_ct_path():
    """The real CT shipped with the plugin (read-only; tests never write to it)."""
    from napari_fastsam3d._sample_data import sample_ct_path

    return sample_ct_path()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A random-weight "tiny" FastSAM3D saved as safetensors (a "local file" model)."""
    import torch
    from safetensors.torch import save_file

    import fastsam3d
    from fastsam3d.modeling.configs import get_config

    torch.manual_seed(0)
    model = fastsam3d.build_model(get_config("tiny"))
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
