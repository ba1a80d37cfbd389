"""Geometry: Volume checks, RAS / 1.5 mm / ROI transforms, and the exact inverse to voxels."""

from __future__ import annotations

import doctest
import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as ornt_lib
from nifti_helpers import oblique_affine
from scipy import ndimage

from fastsam3d import GeometryError, InputError, Session, Volume
from fastsam3d.cache import EmbeddingCache
from fastsam3d.field import LogitField
from fastsam3d.geometry import ModelGrid, translation, validate_affine
from fastsam3d.roi import STRIDE, Roi, normalise, tile_origins
from fastsam3d.sampling import interpolate_axis_aligned, sample_box
from fastsam3d.stand_in import ThresholdModel


def _affine(linear, offset) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = linear, offset
    return out


# Named regression affines: (affine, shape). Each says where it came from.
NAMED = {
    # Oblique scanner geometry: rotations of 20, -15, 30 degrees (as a tilted head MR acquisition),
    # 0.8 x 0.9 x 2.5 mm, j flipped.
    "oblique": (oblique_affine(), (96, 90, 36)),
    # DICOM/ITK convention stored as is: LPS voxel axes (what SimpleITK writes for an axial CT
    # read without reorientation), 1.2 mm.
    "lps": (_affine(np.diag([-1.2, -1.2, 1.2]), [120.0, 110.0, -40.0]), (80, 84, 70)),
    # Thick-slice clinical MR/CT: 0.3 x 0.3 x 5 mm (pyradiomics-like brain MR, thinner in-plane).
    "anisotropic": (_affine(np.diag([0.3, 0.3, 5.0]), [-30.0, -25.0, -35.0]), (220, 200, 16)),
    # Negative determinant with axes permuted: stored (z, x, y) with x flipped, as written by some
    # converters for sagittal acquisitions.
    "negative_scale": (
        _affine(np.array([[0, -1.1, 0], [0, 0, 1.3], [2.0, 0, 0]]), [50.0, -40.0, -30.0]),
        (36, 80, 64),
    ),
    # Non-cubic, non-multiple-of-4 shape with a small shear (not representable by ITK).
    "non_cubic": (
        _affine(np.array([[1.7, 0.1, 0.0], [0.0, 1.4, 0.05], [0.0, 0.0, 2.2]]), [-60, -50, -40]),
        (71, 93, 37),
    ),
}


def _sphere(affine, shape, radius=22.0, shift=(9.0, -6.0, 4.0)):
    """A bright ball placed in world space; returns (array, truth mask, world centre)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(axis=0) + np.asarray(shift)
    truth = (np.linalg.norm(world - centre, axis=1) < radius).reshape(shape)
    return np.where(truth, 100, 0).astype(np.int16), truth, centre


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ---------------------------------------------------------------- the sphere comes back in place


@pytest.mark.parametrize("name", sorted(NAMED))
def test_world_sphere_round_trip(name):
    affine, shape = NAMED[name]
    array, truth, centre = _sphere(affine, shape)
    volume = Volume(array, affine)
    session = Session(ThresholdModel(), volume, cache=EmbeddingCache())
    click = np.rint(volume.world_to_voxel(centre)).astype(int)
    mask = session.add_point(tuple(click))
    assert mask.shape == array.shape and mask.dtype == bool
    assert _dice(mask, truth) >= 0.95
    found = volume.voxel_to_world(np.argwhere(mask).mean(axis=0))
    assert np.linalg.norm(found - volume.voxel_to_world(np.argwhere(truth).mean(axis=0))) < 1.0


def test_sphere_off_centre_in_roi_is_found_where_it_is():
    """A click near the ball's edge: the ROI is not centred on the ball, the ball stays put."""
    affine, shape = NAMED["oblique"]
    array, truth, centre = _sphere(affine, shape)
    volume = Volume(array, affine)
    session = Session(ThresholdModel(), volume, cache=EmbeddingCache())
    edge = volume.world_to_voxel(centre + np.array([0.0, 0.0, 16.0]))
    mask = session.add_point(tuple(np.rint(edge).astype(int)))
    assert _dice(mask, truth) >= 0.95


# ---------------------------------------------------------------- reorientation, 48 orders


def _orientation_cases():
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield perm, flips


@pytest.mark.parametrize("perm,flips", list(_orientation_cases()))
def test_all_48_orientations_match_nibabel_canonical(perm, flips):
    shape = (5, 6, 7)
    linear = np.zeros((3, 3))
    for col, (row, sign) in enumerate(zip(perm, flips, strict=True)):
        linear[row, col] = 1.5 * sign
    affine = _affine(linear, [3.0, -2.0, 7.5])
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    grid = ModelGrid.build(shape, affine)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    assert grid.shape == canonical.shape
    np.testing.assert_allclose(grid.affine, canonical.affine, atol=1e-9)
    # At 1.5 mm resampling is the identity: every voxel must land exactly.
    np.testing.assert_array_equal(grid.resample(array), np.asarray(canonical.dataobj))
    idx = np.argwhere(np.ones(grid.shape, bool))
    src = np.rint(grid.grid_to_source(idx)).astype(int)
    np.testing.assert_array_equal(array[tuple(src.T)], grid.resample(array)[tuple(idx.T)])


# ---------------------------------------------------------------- matrices and grids


@pytest.mark.parametrize("name", sorted(NAMED))
def test_grid_round_trips_and_world_consistency(name):
    affine, shape = NAMED[name]
    grid = ModelGrid.build(shape, affine)
    np.testing.assert_allclose(grid.to_source @ grid.from_source, np.eye(4), atol=1e-10)
    points = np.random.default_rng(0).uniform(-3, 40, size=(50, 3))
    np.testing.assert_allclose(grid.source_to_grid(grid.grid_to_source(points)), points, atol=1e-9)
    # voxel -> world through the model grid equals voxel -> world of the source
    world_a = nib.affines.apply_affine(grid.affine, points)
    world_b = nib.affines.apply_affine(affine, grid.grid_to_source(points))
    np.testing.assert_allclose(world_a, world_b, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(grid.affine[:3, :3], axis=0), 1.5, atol=1e-9)
    assert "".join(nib.aff2axcodes(grid.affine)) == "RAS"


def test_resampling_keeps_first_corner_and_ceil_shape():
    """tio.Resample: the first voxel's outer corner stays, shape = ceil(extent / 1.5)."""
    affine, shape = NAMED["anisotropic"]
    grid = ModelGrid.build(shape, affine)
    assert grid.shape == (44, 40, 54)  # 220*0.3/1.5, 200*0.3/1.5, ceil(16*5/1.5)
    corner = nib.affines.apply_affine(grid.affine, [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(corner, nib.affines.apply_affine(affine, [-0.5, -0.5, -0.5]))


def test_resampled_values_match_map_coordinates():
    affine, shape = NAMED["oblique"]
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    grid = ModelGrid.build(shape, affine)
    idx = np.indices(grid.shape).reshape(3, -1)
    ref = ndimage.map_coordinates(array, grid.grid_to_source(idx.T).T, order=1, mode="nearest")
    np.testing.assert_allclose(grid.resample(array), ref.reshape(grid.shape), atol=1e-5)


def test_per_roi_sampling_equals_crop_of_resampled_volume():
    """The path for huge volumes (sample each ROI) gives the same input as resample-then-crop."""
    affine, shape = NAMED["negative_scale"]
    array = np.random.default_rng(2).normal(size=shape).astype(np.float32) + 5
    volume = Volume(array, affine)
    grid = volume.model_grid()
    start, size = (-12, 20, -40), (64, 48, 72)
    from_full = volume.model_region(start, size)
    direct = grid.sample_region(array, start, size)
    np.testing.assert_allclose(from_full, direct, atol=1e-5)
    assert np.all(from_full[:12] == 0) and np.all(from_full[:, :, :40] == 0)
    # whole=False (the session's fine grid) samples the box alone and keeps nothing
    other = Volume(array, affine)
    np.testing.assert_array_equal(other.model_region(start, size, whole=False), direct)
    other.model_region(start, size, 0.75, whole=False)
    assert not other._resampled


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16, np.int64, np.float16, np.float64])
def test_every_voxel_type_resamples_like_float32(dtype):
    affine, shape = NAMED["lps"]
    array = np.random.default_rng(6).uniform(0, 3, size=(30, 20, 10)) > 1.5
    array = array.astype(dtype)
    volume = Volume(array, affine)
    expected = volume.model_grid().resample(array.astype(np.float32))
    np.testing.assert_allclose(volume.resampled(), expected, atol=1e-6)


def test_separable_interpolation_equals_affine_transform():
    rng = np.random.default_rng(3)
    field = rng.normal(size=(9, 11, 7)).astype(np.float32)
    matrix = np.zeros((4, 4))
    matrix[[0, 1, 2], [2, 0, 1]] = [0.37, -0.21, 0.29]
    matrix[:3, 3] = [1.3, 8.9, 0.4]
    matrix[3, 3] = 1
    start, shape = np.array([2, -3, 5]), (20, 25, 15)
    ours = interpolate_axis_aligned(field, matrix, start, shape, order=1)
    shifted = matrix @ translation(start)
    ref = ndimage.affine_transform(
        field, shifted[:3, :3], shifted[:3, 3], output_shape=shape, order=1, mode="nearest"
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize(
    "start", [(2, 3, 1), (-30, 4, -9), (60, 70, 50), (-80, -90, -70), (5, 200, 2)]
)
def test_sampling_a_box_reads_only_its_block_and_changes_nothing(start, order):
    """A box sampled from the block it reads, whole or in slabs, equals the box sampled from
    the whole field, bit for bit: inside, across the edges and wholly outside (edge values),
    permuted axes."""
    field = np.random.default_rng(4).normal(size=(40, 50, 30)).astype(np.float32)
    matrix = np.zeros((4, 4))
    matrix[[0, 1, 2], [2, 0, 1]] = [0.37, -0.61, 1.29]
    matrix[:3, 3] = [1.3, 28.9, 0.4]
    matrix[3, 3] = 1
    shape = (16, 12, 20)
    whole = interpolate_axis_aligned(field, matrix, np.asarray(start), shape, order)
    np.testing.assert_array_equal(sample_box(field, matrix, start, shape, order), whole)
    slabs = sample_box(field, matrix, start, shape, order, slab_voxels=500)  # 3-voxel slabs
    np.testing.assert_array_equal(slabs, whole)
    assert slabs.dtype == whole.dtype


# ---------------------------------------------------------------- exact inverse of the decoder


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, -1), (-1, -1, -1)])
@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1)])
def test_inverse_equals_model_upsampling_at_voxel_centres(perm, flips):
    """On a 1.5 mm grid every source voxel is a model voxel: the inverse must reproduce
    ``trilinear(low_res -> 128^3, align_corners=False) > 0`` exactly, without half-voxel shift."""
    shape = (150, 140, 135)
    linear = np.zeros((3, 3))
    for col, (row, sign) in enumerate(zip(perm, flips, strict=True)):
        linear[row, col] = 1.5 * sign
    grid = ModelGrid.build(shape, _affine(linear, [0, 0, 0]))
    roi = Roi((8, -12, 4))
    low = ndimage.gaussian_filter(np.random.default_rng(4).normal(size=(32, 32, 32)), 2)
    low = (low / low.std()).astype(np.float32)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(low)[None, None], size=(128,) * 3, mode="trilinear", align_corners=False
    )[0, 0].numpy()
    field = LogitField(grid.shape, 128)
    field.write(roi, low)
    box = field.source_box(field.tile(roi, ring=1), grid)
    ours = np.zeros(shape, bool)
    ours[box] = field.render(grid, box)
    # expected: model voxel m <-> resampled voxel m + origin <-> source voxel
    idx = np.argwhere(np.ones(shape, bool))
    model = np.rint(grid.source_to_grid(idx)).astype(int) - np.asarray(roi.origin)
    inside = np.all((model >= 0) & (model < 128), axis=1)
    expected = np.zeros(shape, bool)
    values = up[tuple(model[inside].T)]
    expected[tuple(idx[inside].T)] = values > 0
    confident = np.ones(shape, bool)
    confident[tuple(idx[inside].T)] = np.abs(values) > 1e-4
    assert np.array_equal(ours[confident], expected[confident])
    assert inside.sum() > 0.5 * 128**3


@pytest.mark.parametrize("margin", [32, 40, 56])
@pytest.mark.parametrize("shape", [(300, 90, 129), (128, 200, 64)])
def test_precompute_tiles_hold_every_voxel_with_their_margin(shape, margin):
    origins = tile_origins(shape, margin=margin)
    assert all(o % STRIDE == 0 for origin in origins for o in origin)
    rois = [Roi(o) for o in origins]
    rng = np.random.default_rng(margin)
    corners = list(itertools.product(*[(0, n - 1) for n in shape]))
    points = [*corners, *(rng.integers(0, shape) for _ in range(300))]
    for point in points:
        assert any(r.holds(point, margin, shape) for r in rois), point
    fewer = tile_origins(shape, margin=margin - 8)
    assert len(fewer) <= len(origins)
    with pytest.raises(ValueError, match="central part"):
        tile_origins(shape, margin=63)


# ---------------------------------------------------------------- normalisation


def test_normalise_is_z_score_over_positive_voxels_with_clip():
    crop = np.array([-1000.0, 0.0, 200.0, 400.0, 3000.0])
    out = normalise(crop)
    values = crop[crop > 0]
    np.testing.assert_allclose(out, (crop - values.mean()) / values.std(ddof=1), rtol=1e-6)
    clipped = normalise(crop, clip=(-1000.0, 1000.0))
    ref = np.clip(crop, -1000, 1000)
    pos = ref[ref > 0]
    np.testing.assert_allclose(clipped, (ref - pos.mean()) / pos.std(ddof=1), rtol=1e-6)


# ---------------------------------------------------------------- Volume and bad input


def test_volume_properties_and_file_round_trip(tmp_path):
    affine, shape = NAMED["oblique"]
    array = np.random.default_rng(5).integers(-100, 100, size=shape).astype(np.int16)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(array[..., None], affine), str(path))
    volume = Volume.from_file(path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, nib.load(str(path)).affine)
    assert volume.orientation == "".join(nib.aff2axcodes(affine))
    np.testing.assert_allclose(volume.spacing, [0.8, 0.9, 2.5])
    ijk = np.array([[1.0, 2.0, 3.0], [40.5, 7.0, 0.0]])
    np.testing.assert_allclose(volume.world_to_voxel(volume.voxel_to_world(ijk)), ijk, atol=1e-9)
    assert not volume.array.flags.writeable
    stored = nib.load(str(path)).affine
    assert volume.signature == Volume(array, stored).signature
    assert volume.signature != Volume(array + 1, stored).signature
    assert volume.signature != Volume(array, stored @ np.diag([1, 1, 1.01, 1])).signature


@pytest.mark.parametrize(
    "array,words",
    [
        (np.ones((10, 10)), "3-D"),
        (np.random.rand(6, 6, 6, 2), "pick one volume"),
        (np.random.rand(6, 6, 6, 3), "RGB"),
        (np.random.rand(6, 6, 1), "single slice"),
        (np.full((6, 6, 6), 7.0), "constant"),
        (np.where(np.eye(6)[..., None] > 0, np.nan, 1.0) * np.ones((6, 6, 6)), "NaN/Inf"),
        (np.where(np.eye(6)[..., None] > 0, np.inf, 1.0) * np.ones((6, 6, 6)), "NaN/Inf"),
        (np.random.rand(6, 6, 6) + 1j, "not supported"),
    ],
)
def test_bad_arrays_raise_input_error(array, words):
    with pytest.raises(InputError, match=words):
        Volume(array, np.eye(4))


@pytest.mark.parametrize(
    "affine,words",
    [
        (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
        (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "singular"),
        (np.eye(3), "4x4"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN"),
        (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), "last row"),
    ],
)
def test_bad_affines_raise_geometry_error(affine, words):
    with pytest.raises(GeometryError, match=words):
        validate_affine(affine)
    with pytest.raises(GeometryError):
        Volume(np.random.rand(5, 5, 5), affine)


def test_bad_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        Volume.from_file(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        Volume.from_file(junk)
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(InputError, match="RGB"):
        Volume.from_file(path)


def test_orientation_helpers_agree_with_nibabel():
    affine, shape = NAMED["negative_scale"]
    grid = ModelGrid.build(shape, affine)
    expected = ornt_lib.io_orientation(affine)
    assert np.array_equal(
        grid.ornt, ornt_lib.ornt_transform(expected, ornt_lib.axcodes2ornt("RAS"))
    )


@pytest.mark.parametrize("module", ["geometry", "roi", "growth", "cli"])
def test_doctests(module):
    import importlib

    result = doctest.testmod(importlib.import_module(f"fastsam3d.{module}"))
    assert result.attempted > 0 and result.failed == 0
