"""The SynthSeg-style generator: shapes, alignment of labels and images, reproducibility."""

import dataclasses

import pytest
import torch

from fastsam3d.synth import (
    SynthConfig,
    add_shapes,
    corrupt,
    gaussian_blur,
    label_intensities,
    random_blobs,
    random_grid,
    random_tubes,
    sample_volume,
    synthesize,
)

STILL = SynthConfig(flip=False, rotation_deg=0.0, scale=(1.0, 1.0), shear=0.0, elastic_std=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def cube_labels(size=24):
    labels = torch.zeros((1, 1, size, size, size))
    labels[..., 4:12, 6:18, 8:20] = 1
    labels[..., 14:20, 2:10, 3:9] = 2
    return labels


def test_identity_grid_reproduces_the_crop_exactly():
    labels = cube_labels()
    coords = random_grid(torch.tensor([[11.5, 11.5, 11.5]]), 24, STILL, gen())
    assert torch.equal(sample_volume(labels, coords, "nearest"), labels)


def test_zoom_shows_a_smaller_region_with_one_factor_for_all_axes():
    centre = torch.tensor([[11.5, 11.5, 11.5]])
    still = random_grid(centre, 24, STILL, gen())
    zoomed = random_grid(centre, 24, dataclasses.replace(STILL, zoom=(0.5, 0.5)), gen())
    torch.testing.assert_close(zoomed - 11.5, (still - 11.5) * 0.5)
    lo, hi = 0.4, 0.9
    grids = random_grid(centre.repeat(64, 1), 8, dataclasses.replace(STILL, zoom=(lo, hi)), gen())
    extent = grids[:, -1, -1, -1] - grids[:, 0, 0, 0]  # (64, 3): 7 voxels times the factor
    factors = extent / 7
    torch.testing.assert_close(factors, factors[:, :1].expand(-1, 3))  # isotropic
    assert lo - 1e-5 <= factors.min() and factors.max() <= hi + 1e-5
    assert factors.max() - factors.min() > 0.2  # drawn per sample


def test_off_centre_crop_shifts_by_the_offset():
    labels = cube_labels()
    coords = random_grid(torch.tensor([[13.5, 11.5, 10.5]]), 16, STILL, gen())
    crop = sample_volume(labels, coords, "nearest")
    assert torch.equal(crop[0, 0], labels[0, 0, 6:22, 4:20, 3:19])


def test_deformed_labels_and_image_stay_aligned():
    """Labels (nearest) and an image made from them (trilinear) sampled on one random grid."""
    labels = cube_labels(32)
    image = labels * 100.0 + 50.0
    centre = torch.full((3, 3), 15.5)
    coords = random_grid(centre, 32, SynthConfig(), gen(1))
    lab = sample_volume(labels, coords, "nearest")
    img = sample_volume(image, coords, "bilinear", fill=50.0)
    for class_id in (1, 2):
        inside = lab == class_id
        # Erode by one voxel: trilinear boundary voxels mix neighbours.
        core = -torch.nn.functional.max_pool3d(-inside.float(), 3, 1, 1) > 0.5
        assert core.sum() > 20
        assert torch.allclose(img[core], torch.tensor(class_id * 100.0 + 50.0), atol=1e-3)


def test_random_grid_is_reproducible_and_varies_with_the_seed():
    centre = torch.full((2, 3), 10.0)
    a, b = (
        random_grid(centre, 8, SynthConfig(), gen(5)),
        random_grid(centre, 8, SynthConfig(), gen(5)),
    )
    c = random_grid(centre, 8, SynthConfig(), gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gaussian_blur_zero_sigma_is_identity_and_preserves_constants():
    x = torch.rand((2, 1, 10, 11, 12))
    assert torch.allclose(gaussian_blur(x, torch.zeros(2, 3)), x, atol=1e-6)
    ones = torch.ones((2, 1, 10, 11, 12))
    assert torch.allclose(
        gaussian_blur(ones, torch.tensor([[1.0, 2.0, 0.5], [0.0, 3.0, 1.0]])), ones
    )


def test_gaussian_blur_uses_each_samples_own_sigma():
    x = torch.zeros((2, 1, 21, 21, 21))
    x[:, :, 10, 10, 10] = 1
    out = gaussian_blur(x, torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    assert out[0, 0, 10, 10, 10] == pytest.approx(1.0)
    assert out[1, 0, 10, 10, 10] < 0.3 and out[1, 0, 12, 10, 10] > 0.05
    assert out[1, 0, 10, 12, 10] == 0


def test_label_intensities_are_constant_per_label_without_noise():
    cfg = dataclasses.replace(SynthConfig(), std_max=0.0)
    labels = cube_labels().long().repeat(2, 1, 1, 1, 1)
    image = label_intensities(labels, cfg, gen())
    for b in range(2):
        for class_id in (0, 1, 2):
            values = image[b][labels[b] == class_id]
            assert values.std() < 1e-6


def test_corrupt_keeps_shapes_and_zero_background():
    cfg = dataclasses.replace(SynthConfig(), blur_max=0.0, thick_slice_prob=0.0)
    image = cube_labels().repeat(2, 1, 1, 1, 1) * 0.7
    out = corrupt(image, cfg, gen())
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert torch.all(out[image == 0] == 0)


def test_procedural_shapes_are_non_empty():
    assert random_blobs(3, 32, gen(), "cpu").flatten(1).any(1).all()
    tubes = random_tubes(3, 32, gen(), "cpu")
    assert tubes.flatten(1).any(1).all()
    assert (tubes.flatten(1).sum(1) < 0.2 * 32**3).all()


def test_add_shapes_adds_new_ids_and_respects_allow():
    labels = cube_labels(32).long().repeat(4, 1, 1, 1, 1)
    cfg = dataclasses.replace(SynthConfig(), shape_prob=1.0, shapes_only_prob=0.0)
    allow = torch.tensor([True, True, False, False])
    out, last = add_shapes(labels, cfg, gen(), allow)
    assert torch.equal(out[2:], labels[2:]) and torch.all(last[2:] == 0)
    for b in range(2):
        assert last[b] > 2 and (out[b] == last[b]).any()
        kept = out[b] <= 2
        assert torch.equal(out[b][kept], labels[b][kept])


def test_synthesize_returns_aligned_image_and_labels():
    labels = cube_labels(32).long().repeat(2, 1, 1, 1, 1)
    image, out_labels, shape_ids = synthesize(labels, SynthConfig(), gen(3))
    assert image.shape == labels.shape == out_labels.shape
    assert shape_ids.shape == (2,) and torch.isfinite(image).all()
