"""CUDA graphs and stream overlap for the fast inference path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")


class GraphCache:
    """CUDA graphs of a function, one per input signature, replayed on static buffers.

    Outputs are cloned, so results of earlier calls stay valid after later replays.
    ``input_dtypes`` (one per leading input, None: the input's own) are the dtypes of the
    static input buffers: the copy into them casts, so ``fn`` receives inputs in those dtypes.
    """

    def __init__(
        self,
        fn: Callable[..., tuple[torch.Tensor, ...]],
        input_dtypes: tuple[torch.dtype | None, ...] = (),
    ) -> None:
        self.fn = fn
        self.input_dtypes = input_dtypes
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self.graphs[key]
        # one call each way instead of one per tensor: host time counts at this size
        torch._foreach_copy_(static_in, inputs)
        graph.replay()
        outputs = [torch.empty_like(t) for t in static_out]
        torch._foreach_copy_(outputs, static_out)
        return tuple(outputs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> tuple:
        dtypes = self.input_dtypes + (None,) * (len(inputs) - len(self.input_dtypes))
        static_in = tuple(
            t.clone() if dtype is None else t.to(dtype, copy=True)
            for t, dtype in zip(inputs, dtypes, strict=True)
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph's default capture stream is made once, on the first device that
        # captures: a model on another GPU must capture on a stream of its own device
        with torch.cuda.graph(graph, stream=stream):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` as the current CUDA device (a no-op elsewhere): streams, CUDA graphs and
    Triton launches follow the current device, not the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn``'s kernels (recorded, not run) on a side stream.

    Unlike ``torch.cuda.graph`` it neither waits for the device nor empties the allocator's
    caches before the capture (later allocations would ask the driver again), and only this
    thread's CUDA calls must be capturable (``thread_local``: a precompute thread may encode
    meanwhile). ``fn`` must have run eagerly before, so that the libraries it calls are
    initialised. Captures on the current device (see :func:`on_device`).
    """
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream(current.device)
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            fn()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def in_parallel(side: Callable[[], T], main: Callable[[], U]) -> tuple[T, U]:
    """``(side(), main())`` with ``side`` on a second CUDA stream, so that the kernels of two
    independent chains overlap (a CUDA graph captures them as two branches); both are done
    on the current stream when this returns."""
    current = torch.cuda.current_stream()
    stream = _SIDE_STREAMS.get(current.device_index)
    if stream is None:
        stream = _SIDE_STREAMS[current.device_index] = torch.cuda.Stream(current.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        side_result = side()
    main_result = main()
    current.wait_stream(stream)
    for tensor in side_result if isinstance(side_result, tuple) else (side_result,):
        tensor.record_stream(current)
    return side_result, main_result
