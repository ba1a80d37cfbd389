"""Training data: case discovery, the RAS / 1.5 mm cache, normalisation and crop sampling."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from fastsam3d import data
from fastsam3d.errors import InputError


def write(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def toy_dataset(root: Path, cases=2, shape=(30, 28, 16), zooms=(2.0, 2.0, 3.0)) -> Path:
    """nnU-Net folders with a two-class LPS-oriented map and an image = 100 * label + 50."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    for index in range(cases):
        labels = np.zeros(shape, np.uint8)
        labels[4:20, 6:22, 3:12] = 1
        labels[23:29, 2:10, 2:9] = 3
        write(root / "labelsTr" / f"case{index}.nii.gz", labels, affine)
        image = labels.astype(np.float32) * 100 + 50
        write(root / "imagesTr" / f"case{index}_0000.nii.gz", image, affine)
    return root


def test_find_cases_pairs_images_and_reads_per_class_folders(tmp_path):
    root = toy_dataset(tmp_path / "ds")
    per_class = root / "labelsTr" / "case9"
    per_class.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        write(per_class / name, np.ones((4, 4, 4), np.uint8), np.eye(4))
    cases = data.find_cases(root / "labelsTr", root / "imagesTr")
    assert [c.name for c in cases] == ["case0", "case1", "case9"]
    assert cases[0].image.name == "case0_0000.nii.gz"
    assert isinstance(cases[2].labels, tuple) and cases[2].image is None


def test_find_cases_rejects_an_empty_folder(tmp_path):
    with pytest.raises(InputError):
        data.find_cases(tmp_path)


def test_shared_real_data_layout_never_yields_held_out_cases(tmp_path):
    """A folder laid out like shared/data/real (tiny files): training pairs only."""
    root = tmp_path / "real"
    tiny = np.ones((4, 4, 4), np.uint8)
    for labels, image in data.REAL_DATA_PAIRS:
        for name in (labels, image):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            suffix = ".mgz" if name.endswith(".mgz") else ".nii.gz"
            target = (root / name).with_name(Path(name).name.removesuffix(suffix) + ".nii.gz")
            write(target, tiny, np.eye(4)).rename(root / name)
    for held_out in ("totalseg/example_seg_dicom.nii.gz", "brats/BraTS2021_01646_edema.nii.gz"):
        (root / held_out).parent.mkdir(parents=True, exist_ok=True)
        write(root / held_out, tiny, np.eye(4))
    cases = data.discover_cases(root)
    assert len(cases) == len(data.REAL_DATA_PAIRS)
    text = " ".join(str(c.labels) + str(c.image) for c in cases)
    assert not any(tag in text for tag in data.HELD_OUT)
    nnunet = toy_dataset(tmp_path / "ds", cases=1)
    write(nnunet / "labelsTr" / "brats_01646.nii.gz", tiny, np.eye(4))
    write(nnunet / "imagesTr" / "brats_01646_0000.nii.gz", tiny, np.eye(4))
    assert [c.name for c in data.discover_cases(nnunet)] == ["case0"]


def test_preprocessing_reorients_to_ras_and_resamples_to_1p5mm(tmp_path):
    root = toy_dataset(tmp_path / "ds", cases=1)
    (case,) = data.find_cases(root / "labelsTr", root / "imagesTr")
    arrays = data.preprocess_case(case)
    labels, image = arrays["labels"], arrays["image"]
    assert labels.shape == image.shape
    # 30 x 2 mm -> 40 voxels at 1.5 mm (nibabel keeps the field of view)
    assert abs(labels.shape[0] - 40) <= 1 and abs(labels.shape[2] - 32) <= 1
    assert list(arrays["ids"]) == [0, 1, 3]
    # LPS -> RAS flips x: class 3 (stored at high i) lands at low x
    xs = np.argwhere(labels == 2)[:, 0]
    assert xs.max() < labels.shape[0] / 2
    inner = ndimage.binary_erosion(labels == 1)
    assert inner.sum() > 100 and np.allclose(image[inner], 150, atol=1e-3)


def test_prepare_cases_caches_once(tmp_path):
    root = toy_dataset(tmp_path / "ds", cases=1)
    cases = data.find_cases(root / "labelsTr", root / "imagesTr")
    (first,) = data.prepare_cases(cases, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    (second,) = data.prepare_cases(cases, tmp_path / "cache")
    assert second == first and second.stat().st_mtime_ns == stamp


def test_normalize_intensity_matches_the_official_masked_zscore():
    x = torch.tensor([[0.0, 1.0, 3.0, -5.0]]).view(1, 1, 4, 1, 1)
    values = np.array([1.0, 3.0])
    expected = (x.numpy().ravel() - values.mean()) / values.std(ddof=1)
    assert np.allclose(data.normalize_intensity(x).numpy().ravel(), expected, atol=1e-6)
    clipped = data.normalize_intensity(x, clip=(0.0, 2.0)).numpy().ravel()
    assert np.allclose(clipped, ([0, 1, 2, 0] - np.mean([1, 2])) / np.std([1, 2], ddof=1))


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Cubic erosion of a (1, X, Y, Z) bool mask; outside the array counts as background."""
    padded = torch.nn.functional.pad(mask.float(), (radius,) * 6)
    return -torch.nn.functional.max_pool3d(-padded[None], 2 * radius + 1, 1)[0] > 0.5


@pytest.fixture(scope="module")
def bank_files(tmp_path_factory):
    root = toy_dataset(tmp_path_factory.mktemp("bank") / "ds")
    cases = data.find_cases(root / "labelsTr", root / "imagesTr")
    return data.prepare_cases(cases, root.parent / "cache")


@pytest.fixture(scope="module")
def bank(bank_files):
    return data.SeedBank(bank_files, "cpu", min_voxels=50, points_per_class=8)


def test_seed_bank_lists_every_large_class(bank):
    assert sorted(set(bank.pair_class.tolist())) == [1, 2]
    assert bank.pair_points.shape[1:] == (8, 3)


def test_sample_batch_targets_are_valid_binary_crops(bank):
    sampling = data.SamplingConfig(size=32, min_voxels=20)
    batch = data.sample_batch(bank, 4, torch.Generator().manual_seed(0), sampling)
    assert batch.image.shape == batch.target.shape == (4, 1, 32, 32, 32)
    assert batch.target.dtype == torch.bool and torch.isfinite(batch.image).all()
    sizes = batch.target.flatten(1).sum(1)
    assert torch.all(sizes[batch.valid] >= 20)


def test_real_images_are_aligned_with_their_targets(bank):
    """Real-image crops: the image is constant (one class intensity) inside the eroded target.

    Erosion by two voxels: linear resampling to 1.5 mm and trilinear crop sampling each blur
    the class boundary by up to one voxel. The elastic field is scaled down to the small
    crop (its default strength is meant for 128^3 crops).
    """
    from fastsam3d.synth import SynthConfig

    sampling = data.SamplingConfig(size=32, real_prob=1.0, min_voxels=20, jitter=0.0)
    synth = SynthConfig(shape_prob=0.0, shapes_only_prob=0.0, elastic_std=0.75)
    batch = data.sample_batch(bank, 4, torch.Generator().manual_seed(1), sampling, synth)
    for b in range(4):
        core = erode(batch.target[b], 2)
        assert core.sum() > 5
        assert batch.image[b][core].std() < 1e-3


def test_class_size_power_weights_classes_by_their_voxel_count(bank, bank_files):
    weighted = data.SeedBank(bank_files, "cpu", min_voxels=50, points_per_class=8, size_power=1)
    for volume in weighted.pair_volume.unique():
        members = weighted.pair_volume == volume
        assert torch.isclose(weighted.pair_weight[members].sum(), torch.tensor(1.0))
        labels = weighted.labels[int(volume)]
        sizes = torch.stack([(labels == c).sum() for c in weighted.pair_class[members]]).float()
        assert torch.allclose(weighted.pair_weight[members], sizes / sizes.sum())
        uniform = bank.pair_weight[bank.pair_volume == volume]
        assert torch.allclose(uniform, torch.full_like(uniform, 1 / len(uniform)))
