"""Training data: case discovery, a RAS / 1.5 mm preprocessing cache, GPU-resident sampling.

A *case* is a label map (one multi-class file, or a folder with one binary file per class) with
an optional image. Cases come from nnU-Net-style folders (``imagesTr/`` + ``labelsTr/``,
images ``CASE_0000.nii.gz`` or ``CASE.nii.gz``) or from the project's shared real-data folder
(:data:`REAL_DATA_PAIRS`; its held-out test cases are never used, see :data:`HELD_OUT`).

:func:`prepare_cases` puts each case on its model grid (``geometry.ModelGrid``: RAS, 1.5 mm;
labels nearest, images linear, as inference resamples) and caches it as ``.npz``.
:class:`SeedBank` keeps every cached volume on the training device; :func:`sample_batch` draws
(volume, class, 128^3 crop) triples, deforms the crops and synthesises random-contrast images
(``synth.py``) or uses the real image, all as batched tensor operations on that device.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError
from .synth import SynthConfig, random_grid, sample_volume, synthesize

if TYPE_CHECKING:
    from .geometry import Volume

logger = logging.getLogger(__name__)

PREPROCESSING_VERSION = "model-grid-v2"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
# Held-out visible test set: never used for training.
HELD_OUT = ("example_ct_dicom", "example_seg_dicom", "brats")
# (label map, image) pairs of the shared real-data folder that may be used for training.
REAL_DATA_PAIRS = (
    ("totalseg/example_seg.nii.gz", "totalseg/example_ct_sm.nii.gz"),
    ("totalseg/example_seg_mr.nii.gz", "totalseg/example_mr_sm.nii.gz"),
    ("niivue_fs/aparc.a2009s+aseg.mgz", "niivue_fs/norm.mgz"),
)


@dataclass(frozen=True)
class Case:
    """One labelled volume: ``labels`` is a multi-class file or a list of binary class files."""

    name: str
    labels: Path | tuple[Path, ...]
    image: Path | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.endswith(IMAGE_SUFFIXES)


def _match_image(images_dir: Path | None, name: str) -> Path | None:
    if images_dir is None:
        return None
    for stem in (f"{name}_0000", name):
        for suffix in IMAGE_SUFFIXES:
            if (images_dir / f"{stem}{suffix}").is_file():
                return images_dir / f"{stem}{suffix}"
    return None


def find_cases(labels_dir: str | Path, images_dir: str | Path | None = None) -> list[Case]:
    """Cases of an nnU-Net-style folder pair.

    Args:
        labels_dir: ``CASE.nii.gz`` multi-class maps, or ``CASE/`` folders of binary class files
            (class ids 1, 2, ... in sorted file-name order).
        images_dir: ``CASE_0000.nii.gz`` or ``CASE.nii.gz`` images (optional).

    Raises:
        InputError: the folder is missing or holds no label files.
    """
    labels_dir = Path(labels_dir)
    images_dir = Path(images_dir) if images_dir is not None else None
    if not labels_dir.is_dir():
        raise InputError(f"no label folder at {labels_dir}")
    cases = []
    for entry in sorted(labels_dir.iterdir()):
        if _is_volume(entry):
            name, labels = _stem(entry), entry
        elif entry.is_dir() and (files := tuple(sorted(filter(_is_volume, entry.iterdir())))):
            name, labels = entry.name, files
        else:
            continue
        cases.append(Case(name, labels, _match_image(images_dir, name)))
    if not cases:
        raise InputError(f"{labels_dir} holds no label maps ({', '.join(IMAGE_SUFFIXES)})")
    return cases


def cached_files(root: str | Path) -> list[Path]:
    """The ``.npz`` files of a folder written by :func:`prepare_cases` (empty if none)."""
    root = Path(root)
    return sorted(root.glob("*.npz")) if root.is_dir() else []


def discover_cases(root: str | Path) -> list[Case]:
    """Training cases under ``root``: an nnU-Net dataset or the shared real-data folder.

    Held-out cases (:data:`HELD_OUT`) are always removed.
    """
    root = Path(root)
    if (root / "labelsTr").is_dir():
        cases = find_cases(root / "labelsTr", root / "imagesTr")
    else:
        cases = [
            Case(_stem(root / lab), root / lab, root / img)
            for lab, img in REAL_DATA_PAIRS
            if (root / lab).is_file()
        ]
    cases = [c for c in cases if not _is_held_out(c)]
    if not cases:
        raise InputError(f"no training cases under {root} (nnU-Net folders or shared real data)")
    return cases


def _is_held_out(case: Case) -> bool:
    paths = case.labels if isinstance(case.labels, tuple) else (case.labels,)
    text = " ".join(str(p) for p in (*paths, case.image) if p is not None)
    return any(tag in text for tag in HELD_OUT)


def _to_model_grid(volume: Volume, order: int) -> np.ndarray:
    """A volume on its model grid (:class:`fastsam3d.geometry.ModelGrid`: RAS, 1.5 mm).

    ``order`` 1 is the grid's own linear resampling; 0 (labels) applies the same matrix with
    nearest-neighbour interpolation.
    """
    grid = volume.model_grid()
    if order == 1:
        return grid.resample(volume.array)
    return ndimage.affine_transform(
        grid.canonical_view(volume.array),
        np.diag(grid.to_canonical)[:3],
        grid.to_canonical[:3, 3],
        output_shape=grid.shape,
        order=0,
        mode="nearest",
    )


def _read_labels(case: Case) -> Volume:
    from .geometry import Volume

    if isinstance(case.labels, Path):
        return Volume.from_file(case.labels)
    first = Volume.from_file(case.labels[0])
    combined = np.zeros(first.shape, dtype=np.int32)
    for class_id, path in enumerate(case.labels, start=1):
        combined[Volume.from_file(path).array > 0] = class_id
    return Volume(combined, first.affine)


def preprocess_case(case: Case) -> dict[str, np.ndarray]:
    """Model-grid (RAS, 1.5 mm) arrays of one case: compact labels, original ids, image.

    Returns:
        ``labels`` (X, Y, Z) int16 compact ids (0 = background), ``ids`` the original label
        value of each compact id, and ``image`` (X, Y, Z) float32 when the case has one.
    """
    from .geometry import Volume

    labels = _read_labels(case)
    ids, compact = np.unique(labels.array, return_inverse=True)
    if ids[0] != 0:
        ids, compact = np.concatenate([[0], ids]), compact + 1
    compact = Volume(compact.reshape(labels.shape).astype(np.int16), labels.affine)
    out = {"labels": _to_model_grid(compact, order=0).astype(np.int16), "ids": ids}
    if case.image is not None:
        image = Volume.from_file(case.image)
        if image.shape != labels.shape:
            raise InputError(f"{case.image} and its labels have different shapes")
        out["image"] = _to_model_grid(image, order=1).astype(np.float32)
    return out


def _cache_key(case: Case) -> str:
    paths = case.labels if isinstance(case.labels, tuple) else (case.labels,)
    parts = [PREPROCESSING_VERSION]
    for path in (*paths, case.image):
        if path is not None:
            stat = Path(path).stat()
            parts.append(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def prepare_cases(cases: list[Case], cache_dir: str | Path) -> list[Path]:
    """Preprocess every case once into ``cache_dir`` (``NAME-KEY.npz``); returns the files."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for case in cases:
        path = cache_dir / f"{case.name}-{_cache_key(case)}.npz"
        if not path.is_file():
            logger.info("preprocessing %s -> %s", case.name, path)
            arrays = preprocess_case(case)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(path)
        files.append(path)
    return files


def normalize_intensity(
    image: torch.Tensor, clip: tuple[float, float] | None = None
) -> torch.Tensor:
    """Official FastSAM3D normalisation per sample: optional clip, then z-score over voxels > 0.

    Args:
        image: (B, 1, X, Y, Z) raw intensities.
        clip: (low, high) applied first (None: no clip).

    Returns:
        ``(image - mean) / std`` with mean and std of the voxels > 0 (all voxels if none).
    """
    if clip is not None:
        image = image.clamp(*clip)
    flat = image.flatten(1).float()
    mask = flat > 0
    mask = torch.where(mask.any(1, keepdim=True), mask, torch.ones_like(mask))
    count = mask.sum(1, keepdim=True)
    mean = (flat * mask).sum(1, keepdim=True) / count
    var = ((flat - mean).square() * mask).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    out = (flat - mean) / var.sqrt().clamp(min=1e-8)
    return out.view_as(image)


@dataclass
class Batch:
    """Training crops: images (B, 1, S, S, S) normalised, targets bool, valid (B,) bool."""

    image: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor


class SeedBank:
    """Cached cases resident on one device, with a table of (volume, class) pairs to sample.

    Args:
        files: ``.npz`` files written by :func:`prepare_cases`.
        device: where the volumes live.
        min_voxels: classes with fewer voxels (at 1.5 mm) are never chosen as targets.
        points_per_class: how many random voxels of each class are kept as crop centres.
        size_power: volumes are drawn uniformly, then a class with probability proportional to
            its voxel count to this power (0: every class alike; 0.5 favours large organs over
            the many small parcels of an atlas).
    """

    def __init__(
        self,
        files,
        device,
        min_voxels: int = 200,
        points_per_class: int = 64,
        size_power: float = 0.0,
    ) -> None:
        rng = np.random.default_rng(0)
        self.device = torch.device(device)
        self.labels: list[torch.Tensor] = []
        self.images: list[torch.Tensor | None] = []
        pairs, points, weights = [], [], []
        for index, path in enumerate(files):
            with np.load(path) as arrays:
                labels = arrays["labels"]
                image = arrays["image"] if "image" in arrays else None
            self.labels.append(self._to_device(labels))
            self.images.append(None if image is None else self._to_device(image))
            found = _class_points(labels, min_voxels, points_per_class, rng)
            sizes = np.array([size for _, size, _ in found], dtype=np.float64) ** size_power
            for (class_id, _, coords), size in zip(found, sizes, strict=True):
                pairs.append((index, class_id))
                points.append(coords)
                weights.append(size / sizes.sum())
        if not pairs:
            raise InputError("no class in the training cases is large enough to sample")
        table = torch.tensor(pairs, dtype=torch.long)
        self.pair_volume = table[:, 0].to(self.device)
        self.pair_class = table[:, 1].to(self.device)
        self.pair_weight = torch.tensor(weights, dtype=torch.float32, device=self.device)
        self.pair_points = torch.from_numpy(np.stack(points)).float().to(self.device)
        self.has_image = torch.tensor([im is not None for im in self.images], device=self.device)
        logger.info("seed bank: %d volumes, %d (volume, class) pairs", len(files), len(pairs))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.astype(np.float32))[None, None].to(self.device)


def _class_points(labels: np.ndarray, min_voxels: int, count: int, rng) -> list:
    """(class id, voxels, (count, 3) random voxel coordinates) per class with >= min_voxels."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(flat.max() + 2))
    found = []
    for class_id in range(1, int(flat.max()) + 1):
        members = order[bounds[class_id] : bounds[class_id + 1]]
        if members.size >= min_voxels:
            chosen = rng.choice(members, size=count, replace=members.size < count)
            coords = np.stack(np.unravel_index(chosen, labels.shape), -1)
            found.append((class_id, members.size, coords))
    return found


@dataclass(frozen=True)
class SamplingConfig:
    """Crop sampling: crop side, centre jitter (voxels), real-image fraction, target size."""

    size: int = 128
    jitter: float = 24.0
    real_prob: float = 0.3
    min_voxels: int = 200
    shape_target_prob: float = 0.5
    clip: tuple[float, float] | None = None


def _sample_crops(bank: SeedBank, volumes, coords, real) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (nearest) and raw real images (trilinear) of every crop, one call per volume."""
    batch, size = coords.shape[0], coords.shape[1]
    labels = coords.new_zeros((batch, 1, size, size, size))
    images = coords.new_zeros((batch, 1, size, size, size))
    for index in volumes.unique().tolist():
        members = (volumes == index).nonzero()[:, 0]
        labels[members] = sample_volume(bank.labels[index], coords[members], "nearest")
        image = bank.images[index]
        wanted = members[real[members]]
        if image is not None and wanted.numel():
            fill = float(image.min())
            images[wanted] = sample_volume(image, coords[wanted], "bilinear", fill=fill)
    return labels.round().long(), images


def _choose_targets(labels, preferred, config: SamplingConfig, generator):
    """Per sample the preferred id if large enough, else a random large-enough class."""
    batch = labels.shape[0]
    count = int(torch.maximum(labels.max(), preferred.max())) + 1
    flat = labels.flatten(1)
    sizes = torch.zeros((batch, count), device=labels.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float32)
    )
    sizes[:, 0] = 0
    ok = sizes >= config.min_voxels
    keep = ok.gather(1, preferred[:, None])[:, 0]
    weights = ok.float()
    weights[:, 0] = (~ok.any(1)).float()  # nothing usable: background, marked invalid below
    fallback = torch.multinomial(weights, 1, generator=generator)[:, 0]
    chosen = torch.where(keep, preferred, fallback)
    return labels == chosen[:, None, None, None, None], chosen > 0


def sample_batch(
    bank: SeedBank,
    batch: int,
    generator: torch.Generator,
    sampling: SamplingConfig | None = None,
    synth: SynthConfig | None = None,
) -> Batch:
    """Draw ``batch`` (volume, class, crop) samples and build images and binary targets.

    Real images are used (when the volume has one) with probability ``sampling.real_prob``;
    otherwise a random-contrast image is synthesised from the deformed label crop, with
    procedural shapes that may become the target.
    """
    sampling = sampling or SamplingConfig()
    synth = synth or SynthConfig()
    device = bank.device
    pairs = torch.multinomial(bank.pair_weight, batch, replacement=True, generator=generator)
    volumes = bank.pair_volume[pairs]
    pick = torch.randint(0, bank.pair_points.shape[1], (batch,), generator=generator, device=device)
    jitter = (torch.rand((batch, 3), generator=generator, device=device) * 2 - 1) * sampling.jitter
    centers = bank.pair_points[pairs, pick] + jitter
    coords = random_grid(centers, sampling.size, synth, generator)
    real = bank.has_image[volumes] & (
        torch.rand(batch, generator=generator, device=device) < sampling.real_prob
    )
    labels, real_images = _sample_crops(bank, volumes, coords, real)
    synthetic, labels, shape_ids = synthesize(labels, synth, generator, allow_shapes=~real)
    use_shape = (shape_ids > 0) & (
        torch.rand(batch, generator=generator, device=device) < sampling.shape_target_prob
    )
    preferred = torch.where(use_shape, shape_ids, bank.pair_class[pairs])
    target, valid = _choose_targets(labels, preferred, sampling, generator)
    image = torch.where(
        real[:, None, None, None, None],
        normalize_intensity(real_images, sampling.clip),
        normalize_intensity(synthetic),
    )
    return Batch(image=image, target=target, valid=valid)
