"""Layer names, layer creation and layer geometry: the one place that builds our napari layers.

Geometry: an image layer's voxel -> world affine is the file's affine when the layer came from our
reader; for any other layer it is derived from the layer's own transform. The Labels layer shares
the image's voxel grid and transform; the prompts layer has the identity transform, so its data
are napari world coordinates (mm for NIfTI files).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Points

logger = logging.getLogger(__name__)

PROMPTS_NAME = "FastSAM3D prompts"
LABELS_NAME = "FastSAM3D labels"
READER_TAG = "napari-fastsam3d"
POSITIVE = "positive"
POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"

Box = tuple[slice, ...]


def transform_kwargs(affine: np.ndarray) -> dict[str, Any]:
    """napari layer keywords (scale, translate, rotate, shear) equal to a 4x4 voxel -> world affine.

    napari decomposes the linear part as rotate @ shear @ scale; a reflection ends up in
    ``rotate``. Round-off shear (below 1e-9) is set to zero so that axis-aligned volumes are
    displayed without napari's non-orthogonal slicing path.
    """
    from napari.utils.transforms import Affine

    transform = Affine(affine_matrix=np.asarray(affine, dtype=np.float64))
    shear = np.where(np.abs(transform.shear) < 1e-9, 0.0, transform.shear)
    return {
        "scale": np.asarray(transform.scale),
        "translate": np.asarray(transform.translate),
        "rotate": np.asarray(transform.rotate),
        "shear": shear,
    }


def layer_affine(layer: Any) -> np.ndarray:
    """The 4x4 data -> world affine of a 3D napari layer, read through its public transform."""
    origin = np.asarray(layer.data_to_world(np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    for axis in range(3):
        unit = np.zeros(3)
        unit[axis] = 1.0
        affine[:3, axis] = np.asarray(layer.data_to_world(unit), dtype=np.float64) - origin
    affine[:3, 3] = origin
    return affine


def image_affine(layer: Any) -> np.ndarray:
    """Voxel -> world (mm) affine of an image layer.

    The exact affine kept by our reader in ``metadata["affine"]`` wins when it agrees with what
    napari displays; otherwise (other readers, moved layers) the layer's transform is used.
    """
    shown = layer_affine(layer)
    stored = layer.metadata.get("affine") if isinstance(layer.metadata, dict) else None
    if stored is not None:
        stored = np.asarray(stored, dtype=np.float64)
        if stored.shape == (4, 4) and np.allclose(stored, shown, rtol=1e-6, atol=1e-4):
            return stored
        logger.warning(
            "layer %r: metadata affine differs from its transform; using the latter", layer.name
        )
    return shown


def voxel_index(image_layer: Any, world_point: np.ndarray) -> tuple[int, int, int]:
    """Nearest voxel (i, j, k) of an image layer to a napari world point (not bounds-checked)."""
    data = np.asarray(image_layer.world_to_data(np.asarray(world_point, dtype=np.float64)))
    return tuple(int(v) for v in np.rint(data[-3:]))


def inside(shape: tuple[int, ...], index: tuple[int, ...]) -> bool:
    """Whether a voxel index lies inside an array of the given shape."""
    return all(0 <= i < n for i, n in zip(index, shape, strict=True))


def make_prompts_layer(image_layer: Image) -> Points:
    """An empty 3D Points layer for clicks: identity transform (data = world), feature ``positive``.

    New points are positive unless ``feature_defaults`` says otherwise.
    """
    from napari.layers import Points

    spacing = np.abs(np.asarray(image_layer.scale, dtype=float)[-3:])
    layer = Points(
        np.zeros((0, 3)),
        ndim=3,
        name=PROMPTS_NAME,
        features={POSITIVE: np.zeros(0, dtype=bool)},
        face_color=POSITIVE,
        face_color_cycle={True: POSITIVE_COLOR, False: NEGATIVE_COLOR},
        border_color="white",
        size=float(max(3.0 * spacing.max(), 1.0)),
    )
    layer.feature_defaults = {POSITIVE: True}
    return layer


def make_labels_layer(image_layer: Image) -> Labels:
    """An empty instance Labels layer on the image's voxel grid, with its geometry in metadata."""
    from napari.layers import Labels

    shape = tuple(image_layer.data.shape[-3:])
    metadata = {
        "affine": image_affine(image_layer),
        "source_path": image_layer.metadata.get("source_path"),
        "header": image_layer.metadata.get("header"),
        "image_layer": image_layer.name,
    }
    return Labels(
        np.zeros(shape, dtype=np.uint16),
        name=LABELS_NAME,
        metadata=metadata,
        scale=image_layer.scale,
        translate=image_layer.translate,
        rotate=image_layer.rotate,
        shear=image_layer.shear,
        affine=image_layer.affine,
        opacity=0.6,
    )


def export_path(image_layer: Any) -> str:
    """``<image>_labels.nii.gz`` beside the image's source file, else in the working folder."""
    import os

    source = image_layer.metadata.get("source_path") if image_layer is not None else None
    if not source:
        return os.path.abspath("fastsam3d_labels.nii.gz")
    stem = os.path.basename(source)
    for suffix in (".nii.gz", ".nii"):
        stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
    return os.path.join(os.path.dirname(source), f"{stem}_labels.nii.gz")


def same_grid(labels_layer: Any, image_layer: Any) -> bool:
    """Whether a labels layer lies on the image's voxel grid (shape and voxel -> world affine)."""
    if tuple(labels_layer.data.shape) != tuple(image_layer.data.shape[-3:]):
        return False
    stored = labels_layer.metadata.get("affine")
    affine = layer_affine(labels_layer) if stored is None else np.asarray(stored)
    return bool(np.allclose(affine, image_affine(image_layer), rtol=1e-6, atol=1e-4))


def object_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxel count of every non-zero id (a new, empty label map costs one max())."""
    if labels.max(initial=0) == 0:
        return {}
    ids, counts = np.unique(labels, return_counts=True)
    return {int(i): int(n) for i, n in zip(ids, counts, strict=True) if i}


def find_layer(viewer: napari.Viewer, name: str, kind: type) -> Any | None:
    """The layer of that name and type in the viewer, or None."""
    layer = viewer.layers[name] if name in viewer.layers else None
    return layer if isinstance(layer, kind) else None


def paste_box(labels_layer: Labels, box: Box, block: np.ndarray) -> None:
    """Write ``block`` into ``labels_layer.data[box]`` in place and redraw (no full-volume copy)."""
    labels_layer.data[box] = block
    labels_layer.refresh(highlight=False, extent=False)
    labels_layer.events.data(value=labels_layer.data)


def merge_object(old: np.ndarray, mask: np.ndarray, object_id: int) -> np.ndarray:
    """New labels for a box: object ``object_id`` becomes ``mask`` where no other object is.

    Voxels of other objects are never changed (committed objects stay); voxels that were this
    object and are no longer in the mask become background.
    """
    new = old.copy()
    new[old == object_id] = 0
    new[mask & (new == 0)] = object_id
    return new


def apply_visibility(labels_layer: Labels, objects: dict, cyclic: Any = None) -> Any:
    """Hide the objects whose record says ``visible=False`` (a transparent colour), show others.

    Args:
        labels_layer: the labels.
        objects: object id -> record with a ``visible`` attribute.
        cyclic: the layer's own cyclic colormap saved by an earlier call (None the first time).

    Returns:
        The cyclic colormap to pass next time; it is restored once every object is visible,
        so that ids keep their colours.
    """
    from napari.utils.colormaps import CyclicLabelColormap, DirectLabelColormap

    if isinstance(labels_layer.colormap, CyclicLabelColormap):
        cyclic = labels_layer.colormap
    if cyclic is None:
        return None
    hidden = {i for i, record in objects.items() if not record.visible}
    if not hidden:
        labels_layer.colormap = cyclic
        return cyclic
    ids = np.arange(1, max(objects, default=0) + 65)
    table = {0: np.zeros(4), None: np.zeros(4)}
    for i, color in zip(ids.tolist(), cyclic.map(ids), strict=True):
        table[i] = np.zeros(4) if i in hidden else color
    labels_layer.colormap = DirectLabelColormap(color_dict=table)
    return cyclic
