"""Tensors derived from parameters (merged matrices, reshaped kernels), kept between calls."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .quantized import _parameter_key


class DerivedTensors:
    """The result of ``compute()``, recomputed only when one of its source parameters
    changes (its storage or its version counter), so a prepared model follows new weights."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._values: tuple[torch.Tensor, ...] = ()

    def get(
        self,
        sources: Iterable[torch.Tensor],
        compute: Callable[[], Iterable[torch.Tensor]],
    ) -> tuple[torch.Tensor, ...]:
        key = tuple(_parameter_key(s) for s in sources)
        if key != self._key:
            with torch.no_grad():
                self._values = tuple(compute())
            self._key = key
        return self._values
