"""Sampling helpers on voxel grids: separable interpolation through axis-aligned matrices, crops.

Every map between a volume's voxel grid, the resampled model grid and the low-res logit lattice
is axis-aligned (a permutation with flips and per-axis scales), so trilinear interpolation
factorises into one 1-D interpolation per axis: the same numbers as
``scipy.ndimage.affine_transform(..., order=1, mode="nearest")``, for a fraction of the cost.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _axis_map(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split an axis-aligned 4x4 matrix into (axis permutation, per-axis scale, offset).

    Output coordinate ``a`` equals ``scale[a] * input[perm[a]] + offset[a]``.
    """
    lin = matrix[:3, :3]
    perm = np.argmax(np.abs(lin), axis=1)
    scale = lin[np.arange(3), perm]
    rest = lin.copy()
    rest[np.arange(3), perm] = 0
    if sorted(perm.tolist()) != [0, 1, 2] or np.abs(rest).max() > 1e-9 * np.abs(scale).max():
        raise ValueError("matrix is not axis-aligned")
    return perm, scale, matrix[:3, 3].copy()


def zero_outside(out: np.ndarray, start, grid_shape) -> None:
    """Set the part of a box starting at ``start`` that lies outside ``grid_shape`` to 0."""
    for axis, (s, n) in enumerate(zip(start, grid_shape, strict=True)):
        lo, hi = max(0, -int(s)), max(0, int(n) - int(s))
        index = [slice(None)] * 3
        index[axis] = slice(0, lo)
        out[tuple(index)] = 0
        index[axis] = slice(hi, None)
        out[tuple(index)] = 0


def interpolate_axis_aligned(field: np.ndarray, matrix: np.ndarray, start, shape, order: int):
    """Sample ``field`` on a box of another grid through an axis-aligned 4x4 matrix.

    Equivalent to ``scipy.ndimage.affine_transform(field, matrix, output_shape=shape,
    order=order, mode="nearest")`` with the box origin ``start``, computed separably (one 1-D
    linear interpolation per axis), which is exact for axis-aligned matrices and much faster.

    Args:
        field: the array to sample (3-D).
        matrix: 4x4 map from output voxel coordinates to ``field`` coordinates.
        start: output index of the box's first voxel.
        shape: box shape.
        order: 0 (nearest, rounding half up) or 1 (linear).
    """
    perm, scale, offset = _axis_map(matrix)
    out = field
    # the axes whose samples lie furthest apart first: shrinking axes before growing ones
    # keeps the intermediate arrays small; the order depends on the scales alone, so that a
    # block of ``field`` and the whole of it give the same numbers
    for axis in sorted(range(3), key=lambda a: -abs(scale[a])):
        src = perm[axis]
        coords = scale[axis] * (start[src] + np.arange(shape[src])) + offset[axis]
        out = _sample_axis(out, coords, axis, order)
    return out.transpose(np.argsort(perm))


_SLAB_POOL: tuple[ThreadPoolExecutor, int, int] | None = None
_SLAB_POOL_LOCK = threading.Lock()


def _slab_pool() -> tuple[ThreadPoolExecutor, int]:
    """Threads that sample a box's slabs side by side (numpy's loops release the GIL), one per
    core this process may use, at most 8, and their number; made on first use in each process
    (a forked child does not inherit its parent's threads)."""
    global _SLAB_POOL
    with _SLAB_POOL_LOCK:
        if _SLAB_POOL is None or _SLAB_POOL[2] != os.getpid():
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            workers = max(1, min(cores or os.cpu_count() or 1, 8))
            pool = ThreadPoolExecutor(workers, thread_name_prefix="fastsam3d-sampling")
            _SLAB_POOL = pool, workers, os.getpid()
        return _SLAB_POOL[:2]


def sample_box(
    field: np.ndarray, matrix: np.ndarray, start, shape, order: int, slab_voxels: int = 2**18
) -> np.ndarray:
    """:func:`interpolate_axis_aligned`, reading only the block of ``field`` the box needs, in
    slabs of output planes (about ``slab_voxels`` voxels each), several slabs at a time on
    the cores this process may use.

    Each block spans its slab's corners mapped into ``field`` plus one voxel on each side, so
    every voxel interpolates from the same neighbours with the same weights as from the whole
    ``field`` (edge values beyond it, as there), bit for bit. A small box of a large volume
    costs the box, not the volume, and the slabs keep the temporaries in cache.
    """
    start, shape = np.asarray(start), tuple(int(n) for n in shape)
    thick = max(1, slab_voxels // max(shape[1] * shape[2], 1))
    if thick >= shape[0]:
        return _sample_block(field, matrix, start, shape, order)

    def slab(first: int) -> np.ndarray:
        size = (min(thick, shape[0] - first), *shape[1:])
        return _sample_block(field, matrix, start + (first, 0, 0), size, order)

    pool, workers = _slab_pool()
    firsts = list(range(0, shape[0], thick))
    out = None
    # in waves of one slab per thread: at most that many slabs wait to be copied
    for wave in range(0, len(firsts), workers):
        batch = firsts[wave : wave + workers]
        for first, part in zip(batch, pool.map(slab, batch), strict=True):
            if out is None:
                out = np.empty(shape, dtype=part.dtype)
            out[first : first + part.shape[0]] = part
    return out


def _sample_block(field: np.ndarray, matrix: np.ndarray, start, shape, order: int):
    corners = np.stack([start, start + np.asarray(shape) - 1]) @ matrix[:3, :3].T + matrix[:3, 3]
    last = np.asarray(field.shape) - 1
    lo = np.clip(np.floor(corners.min(axis=0)).astype(int) - 1, 0, last)
    hi = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 2, lo + 1, last + 1)
    block = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    shifted = matrix.copy()
    shifted[:3, 3] -= lo
    return interpolate_axis_aligned(field[block], shifted, start, shape, order)


def _sample_axis(array: np.ndarray, coords: np.ndarray, axis: int, order: int) -> np.ndarray:
    n = array.shape[axis]
    clipped = np.clip(coords, 0, n - 1)
    if order == 0:
        return np.take(array, np.floor(clipped + 0.5).astype(np.intp), axis=axis)
    low = np.minimum(np.floor(clipped).astype(np.intp), max(n - 2, 0))
    weight = (clipped - low).astype(np.float32)
    high = np.minimum(low + 1, n - 1)
    shape = [1, 1, 1]
    shape[axis] = len(coords)
    weight = weight.reshape(shape)
    return np.take(array, low, axis=axis) * (1 - weight) + np.take(array, high, axis=axis) * weight


def crop_padded(array: np.ndarray, start, shape) -> np.ndarray:
    """``array[start : start + shape]`` with zeros where the box leaves the array."""
    out = np.zeros(tuple(shape), dtype=np.float32)
    src, dst = [], []
    for s, n, total in zip(start, shape, array.shape, strict=True):
        lo, hi = max(int(s), 0), min(int(s) + int(n), total)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def nonzero_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box (one slice per axis) of the true entries of ``mask`` (None if none)."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
