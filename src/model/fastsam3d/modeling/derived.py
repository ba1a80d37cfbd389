"""Tensors derived from parameters (merged matrices, reshaped kernels, int8 and bf16 copies),
kept between calls."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def parameter_key(source: torch.Tensor) -> tuple:
    """What identifies a parameter's current values (its storage and version counter)."""
    # an inference tensor has no version counter (asking raises, which costs 15 us)
    version = None if source.is_inference() else source._version
    return (source.data_ptr(), version, source.shape, source.device)


class DerivedTensors:
    """The result of ``compute()``, recomputed only when one of its source parameters
    changes (its storage or its version counter), so a prepared model follows new weights.

    Inside a region that ``torch.compile`` traces, the values of the last eager call are
    returned as they are (storage pointers cannot be traced): whoever compiles must run the
    module eagerly first, and again whenever its parameters change (see
    ``Sam3D._weights_changed``).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._values: tuple[torch.Tensor, ...] = ()

    def get(
        self,
        sources: Iterable[torch.Tensor],
        compute: Callable[[], Iterable[torch.Tensor]],
    ) -> tuple[torch.Tensor, ...]:
        if torch.compiler.is_compiling():
            if not self._values:
                raise RuntimeError("derived tensors are computed eagerly before compiling")
            return self._values
        key = tuple(parameter_key(s) for s in sources)
        if key != self._key:
            with torch.no_grad():
                self._values = tuple(compute())
            self._key = key
        return self._values
