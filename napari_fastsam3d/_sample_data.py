"""Sample data contribution: a small real abdominal CT shipped inside the package.

``data/example_ct_sm.nii.gz`` is TotalSegmentator's example CT (122 x 101 x 30 voxels, 3 mm,
CC-BY-4.0); ``data/README.md`` holds its source, licence and checksum.
"""

from __future__ import annotations

from pathlib import Path

from ._reader import LayerData, _open_header, read_nifti_layer

SAMPLE_CT = Path(__file__).parent / "data" / "example_ct_sm.nii.gz"
SAMPLE_NAME = "abdomen CT"


def sample_ct_path() -> Path:
    """Path of the shipped sample CT (read-only package data; never written to)."""
    return SAMPLE_CT


def make_sample_ct() -> list[LayerData]:
    """The sample abdominal CT as one image layer, in the file's world coordinates (mm)."""
    image = _open_header(SAMPLE_CT)
    if image is None:
        raise FileNotFoundError(f"sample CT missing from the installed package: {SAMPLE_CT}")
    return [read_nifti_layer(image, SAMPLE_CT, name=SAMPLE_NAME)]
