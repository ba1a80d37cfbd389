"""Pieces of the fast inference path: exact trilinear upsampling and CUDA graphs."""

from __future__ import annotations

from collections.abc import Callable

import torch


def upsample_trilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=factor, mode="trilinear", align_corners=False)``.

    Computed separably, one axis at a time: output voxel ``factor * u + r`` lies at offset
    ``(r + 0.5) / factor - 0.5`` from input voxel ``u``, so each output phase is a fixed
    two-tap blend of ``u`` and a neighbour; replicating the edge voxel reproduces torch's
    clamping at the borders. Several times faster on CPU than the generic kernel.
    """
    for dim in range(2, x.dim()):
        x = _upsample_axis(x, dim, factor)
    return x


def _upsample_axis(x: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    n = x.shape[dim]
    left = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim) - x
    right = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim) - x
    phases = []
    for r in range(factor):
        offset = (r + 0.5) / factor - 0.5
        phases.append(x + abs(offset) * (left if offset < 0 else right))
    shape = list(x.shape)
    shape[dim] = factor * n
    return torch.stack(phases, dim + 1).reshape(shape)


class GraphCache:
    """CUDA graphs of a function, one per input signature, replayed on static buffers.

    Outputs are cloned, so results of earlier calls stay valid after later replays.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self.graphs[key]
        for buffer, value in zip(static_in, inputs, strict=True):
            buffer.copy_(value)
        graph.replay()
        return tuple(t.clone() for t in static_out)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> tuple:
        static_in = tuple(t.clone() for t in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out
