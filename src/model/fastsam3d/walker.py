"""Grady's random walker on a voxel grid, solved matrix-free in torch (CPU or GPU).

Minimises, over the voxels that are not seeds (seeds keep their value 0 or 1),

    sum over neighbour pairs (i, j) of w_ij (x_i - x_j)^2
      + gamma * sum over voxels i of [p_i (1 - x_i)^2 + (1 - p_i) x_i^2]

with edge weights ``w_ij = exp(-beta (I_i - I_j)^2 / mean((I_i - I_j)^2))`` (Grady 2006,
"Random walks for image segmentation"; the second term is the prior model of Grady 2005,
"Multilabel random walker image segmentation using prior models", with ``p`` a prior
probability of the foreground). The minimiser solves ``(L + gamma) x = gamma p + (seed
terms)``; Jacobi-preconditioned conjugate gradients find it without building the matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .modeling.fast_path import capture_graph, on_device

CHECK_EVERY = 4
"""Conjugate-gradient steps between two convergence checks."""
EXP_FLOOR = -80.0
"""Edge-weight exponents are clamped here: ``exp(-80)`` is 1.8e-35, below half an ulp of the
1e-6 added to every weight, so the weights stay equal to the bit."""
GRAPH_STEPS = True
"""On CUDA, replay the steps between two checks as one CUDA graph, captured once per solve
after the first ``CHECK_EVERY`` steps ran eagerly: the same kernels without their launch
costs."""


def edge_weights(
    image: torch.Tensor, beta: float, spacing: Sequence[float] | None = None
) -> list[torch.Tensor]:
    """Weights between neighbours along each axis of (X, Y, Z).

    ``exp(-beta * (dI)^2 / mean(dI^2))``, times ``(min(spacing) / spacing[axis])^2`` when
    ``spacing`` is given, so that diffusion is isotropic in millimetres on anisotropic voxels.
    """
    diffs = [image.diff(dim=axis).square() for axis in range(3)]
    scale = torch.cat([d.flatten() for d in diffs]).mean().clamp(min=1e-12)
    # below EXP_FLOOR the exponential adds nothing to the 1e-6 in float32, and its results
    # there reach the subnormal range, which x86 CPUs compute tens of times slower
    weights = [torch.exp((-beta * d / scale).clamp_(min=EXP_FLOOR)) + 1e-6 for d in diffs]
    if spacing is not None:
        finest = min(spacing)
        weights = [w * (finest / h) ** 2 for w, h in zip(weights, spacing, strict=True)]
    return weights


def flat_edges(weights: list[torch.Tensor], shape) -> list[tuple[int, torch.Tensor]]:
    """The edges of :func:`edge_weights` on the flattened grid: per axis, the flat-index
    offset from a voxel to its next neighbour along that axis and the weight of each such
    edge (0 where the next flat index lies on another row or plane), so that every product
    below runs on contiguous memory."""
    size = math.prod(shape)
    edges = []
    for axis, w in enumerate(weights):
        offset = math.prod(shape[axis + 1 :])
        full = w.new_zeros(shape)
        full.narrow(axis, 0, shape[axis] - 1).copy_(w)
        edges.append((offset, full.view(-1)[: size - offset]))
    return edges


def laplacian(
    x: torch.Tensor,
    edges: list[tuple[int, torch.Tensor]],
    diagonal: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Graph Laplacian times x: sum over neighbours j of w_ij (x_i - x_j).

    ``edges`` from :func:`flat_edges`; ``diagonal`` replaces the degree (precomputed, possibly
    plus a constant such as the prior weight: then the product is ``(L + diagonal - degree)
    x``); ``out`` (contiguous) receives the product (a buffer reused across the steps of a
    solve).
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, degree(edges, x.shape) if diagonal is None else diagonal, out=out)
    flat, product, size = x.reshape(-1), out.view(-1), x.numel()
    for offset, w in edges:
        product[: size - offset].addcmul_(w, flat[offset:], value=-1)
        product[offset:].addcmul_(w, flat[: size - offset], value=-1)
    return out


def degree(edges: list[tuple[int, torch.Tensor]], shape) -> torch.Tensor:
    """Sum of each voxel's edge weights (``edges`` from :func:`flat_edges`)."""
    out = edges[0][1].new_zeros(shape)
    flat, size = out.view(-1), out.numel()
    for offset, w in edges:
        flat[: size - offset].add_(w)
        flat[offset:].add_(w)
    return out


def random_walker(
    image: torch.Tensor,
    seeds: torch.Tensor,
    beta: float = 90.0,
    prior: torch.Tensor | None = None,
    gamma: float = 0.0,
    spacing: Sequence[float] | None = None,
    iterations: int = 300,
    tol: float = 1e-4,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probability that a random walker from each voxel first reaches a foreground seed.

    Args:
        image: (X, Y, Z) float intensities (any scale: the weights are scale-free).
        seeds: (X, Y, Z) int8: 1 foreground seed, 0 background seed, -1 unknown.
        beta: edge sensitivity.
        prior: (X, Y, Z) prior foreground probability, used with ``gamma`` > 0; the solve
            starts from it.
        gamma: weight of the prior per voxel (0: the plain random walker, which needs seeds
            of both labels).
        spacing: voxel sizes (see :func:`edge_weights`); None treats voxels as cubes.
        iterations: conjugate-gradient iterations at most.
        tol: stop when the residual norm falls below ``tol`` times the right-hand side's
            (checked every :data:`CHECK_EVERY` steps).
        initial: (X, Y, Z) where the solve starts (default: the prior, else zeros), e.g. the
            solution on a coarser grid upsampled.

    Returns:
        (X, Y, Z) float probabilities in [0, 1] (seeds keep their value).
    """
    # contiguous, so that the solve's buffers (``empty_like``) are too
    image, seeds = image.float().contiguous(), seeds.contiguous()
    edges = flat_edges(edge_weights(image, beta, spacing), image.shape)
    unknown = (seeds < 0).float()
    fixed = (seeds == 1).float()
    diagonal = degree(edges, image.shape)
    rhs = -laplacian(fixed, edges, diagonal)
    if prior is not None and gamma > 0:
        prior = prior.float().contiguous()
        rhs.add_(prior, alpha=gamma)
        diagonal = diagonal + gamma
        x = prior * unknown
    else:
        x = torch.zeros_like(rhs)
    if initial is not None:
        x = initial.float().contiguous() * unknown
    rhs.mul_(unknown)
    stop = tol * rhs.norm().clamp(min=1e-20)

    # Jacobi-preconditioned CG, run as plain CG on the symmetrically scaled system
    # (S A S) y = S rhs with S = diag(unknown / sqrt(diagonal)) and x = S y: the same iterates
    # in exact arithmetic, with a unit diagonal and no preconditioner pass per step. S is zero
    # on the seeds, so y, the residual and every direction stay zero there.
    root = diagonal.clamp(min=1e-12).sqrt_().mul_(unknown)
    scale = torch.where(unknown > 0, 1 / root.clamp(min=1e-12), 0.0)
    scaled = scaled_edges(edges, scale)
    y = x * root
    residual = rhs.mul_(scale).sub_(unit_diagonal_product(y, scaled))
    direction = residual.clone()
    rr = torch.dot(residual.flatten(), residual.flatten())
    rr_new = torch.empty_like(rr)
    a_dir, unscaled = torch.empty_like(y), torch.empty_like(y)

    def steps(count: int) -> None:
        """``count`` conjugate-gradient steps, in place (a CUDA graph can replay them)."""
        for _ in range(count):
            unit_diagonal_product(direction, scaled, out=a_dir)
            alpha = rr / torch.dot(direction.flatten(), a_dir.flatten()).clamp(min=1e-30)
            y.addcmul_(alpha, direction)
            residual.addcmul_(alpha, a_dir, value=-1)
            torch.dot(residual.flatten(), residual.flatten(), out=rr_new)
            torch.addcmul(residual, rr_new / rr, direction, out=direction)
            rr.copy_(rr_new)

    graph = None
    for step in range(0, iterations, CHECK_EVERY):
        # the residual of the unscaled system; on a GPU the comparison waits for the device
        if torch.mul(residual, root, out=unscaled).norm() < stop:
            break
        count = min(CHECK_EVERY, iterations - step)
        if graph is not None and count == CHECK_EVERY:
            graph.replay()
            continue
        steps(count)
        if y.is_cuda and GRAPH_STEPS and count == CHECK_EVERY:
            with on_device(y.device):
                graph = capture_graph(lambda: steps(CHECK_EVERY))
    return (y * scale + fixed).clamp(0, 1)


def scaled_edges(
    edges: list[tuple[int, torch.Tensor]], scale: torch.Tensor
) -> list[tuple[int, torch.Tensor]]:
    """``edges`` (:func:`flat_edges`) with each weight times the ``scale`` of both its ends:
    the off-diagonal of ``S L S`` for ``S = diag(scale)``."""
    flat, size = scale.reshape(-1), scale.numel()
    return [(offset, w * flat[: size - offset] * flat[offset:]) for offset, w in edges]


def unit_diagonal_product(
    x: torch.Tensor, edges: list[tuple[int, torch.Tensor]], out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x - sum over neighbours j of w_ij x_j`` for ``edges`` from :func:`scaled_edges`: the
    scaled system's matrix (unit diagonal) times ``x``, for ``x`` zero wherever the scale is.
    ``out`` (contiguous) receives it; the first edge writes it, so no pass copies ``x``."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flat, product, size = x.reshape(-1), out.view(-1), x.numel()
    (offset, w), *rest = edges
    torch.addcmul(flat[: size - offset], w, flat[offset:], value=-1, out=product[: size - offset])
    product[size - offset :].copy_(flat[size - offset :])
    product[offset:].addcmul_(w, flat[: size - offset], value=-1)
    for offset, w in rest:
        product[: size - offset].addcmul_(w, flat[offset:], value=-1)
        product[offset:].addcmul_(w, flat[: size - offset], value=-1)
    return out


def random_walker_exact(image: torch.Tensor, seeds: torch.Tensor, beta: float = 90.0):
    """:func:`random_walker` without a prior, solved exactly by a sparse LU (scipy, on the
    CPU): for small grids, where it takes a few milliseconds and conjugate gradients would
    need thousands of steps (on a GPU, thousands of kernel launches).

    Needs at least one seed; returns (X, Y, Z) float probabilities on ``image``'s device.
    """
    from scipy.sparse import coo_matrix, diags
    from scipy.sparse.linalg import splu

    shape = tuple(image.shape)
    weights = [w.double().cpu().numpy() for w in edge_weights(image.float(), beta)]
    index = np.arange(int(np.prod(shape))).reshape(shape)
    rows, cols, values = [], [], []
    for axis, w in enumerate(weights):
        first = np.moveaxis(index, axis, 0)[:-1].ravel()
        second = np.moveaxis(index, axis, 0)[1:].ravel()
        w = np.moveaxis(w, axis, 0).ravel()
        rows += [first, second]
        cols += [second, first]
        values += [-w, -w]
    size = index.size
    off = coo_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size)
    ).tocsr()
    lap = (off - diags(np.asarray(off.sum(axis=1)).ravel())).tocsr()
    labels = seeds.cpu().numpy().ravel()
    unknown = labels < 0
    x = (labels == 1).astype(np.float64)
    if unknown.any():
        rhs = -(lap[unknown][:, ~unknown] @ x[~unknown])
        # the system is symmetric: a minimum-degree ordering of A + A^T with symmetric pivoting
        # (SuperLU's advice for such matrices) fills in less than spsolve's default COLAMD
        factors = splu(
            lap[unknown][:, unknown].tocsc(),
            permc_spec="MMD_AT_PLUS_A",
            options={"SymmetricMode": True},
        )
        x[unknown] = factors.solve(rhs)
    out = torch.from_numpy(x.reshape(shape)).float().clamp_(0, 1)
    return out.to(image.device)
