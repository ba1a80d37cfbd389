"""Dynamic int8 matrix products for the CPU fast path.

Weights are quantised once per output channel, activations per row at each call (symmetric,
scale = max |value| / 127); ``torch._int_mm`` multiplies the int8 matrices into int32, which are
scaled back to float. Layers whose inputs need more than 8 bits (the image patches: soft-tissue
contrast is a few HU in a range of thousands) take two passes: the int8 residual of the first
quantisation is multiplied too, leaving an error of about 2^-15 of each row's maximum. On CPUs
that multiply bf16 natively (:func:`native_bf16`) those layers run as bf16 products instead:
one pass at 2.5x the fp32 rate is faster than two int8 passes with their quantisation.
Layers keep their fp32 parameters and state-dict keys, so a prepared model still saves and
loads like the reference; the int8 copy follows the weights when they change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .derived import DerivedTensors

# torch._int_mm wants more than 16 rows; smaller products stay fp32 (too small to matter).
MIN_ROWS = 17

# |GELU(y)| < 0.16998 for every y <= 0 (its minimum, at y = -0.7518)
GELU_NEGATIVE_PEAK = 0.17


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row of a 2D tensor -> (int8 values, (M, 1) scales)."""
    peak = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    return x.mul(127 / peak).round_().to(torch.int8), peak / 127


def quantize_passes(x: torch.Tensor, passes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`quantize_rows` of ``x`` and then of each remaining residual, ``passes`` times."""
    parts = [quantize_rows(x)]
    for _ in range(passes - 1):
        q, scale = parts[-1]
        x = x - q.float() * scale
        parts.append(quantize_rows(x))
    return parts


class Int8Weight:
    """A weight (N, K) quantised per output channel, refreshed when the weight changes; its
    activations are quantised in ``passes`` passes (1 or 2)."""

    def __init__(self, passes: int = 1) -> None:
        self.passes = passes
        self._derived = DerivedTensors()

    def get(self, weight: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, N) int8 values (column-major, as ``_int_mm`` is fastest) and (1, N) scales of
        ``weight``, a function of the layer parameter ``source`` (requantised when it changes)."""

        def quantise() -> tuple[torch.Tensor, torch.Tensor]:
            values, scale = quantize_rows(weight.detach().float().reshape(weight.shape[0], -1))
            return values.t(), scale.t().contiguous()

        return self._derived.get([source], quantise)


class Bf16Weight:
    """A bf16 copy (N, K) of a weight, refreshed when the layer parameter changes."""

    def __init__(self) -> None:
        self._derived = DerivedTensors()

    def get(self, weight: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        (values,) = self._derived.get(
            [source], lambda: (weight.detach().reshape(weight.shape[0], -1).bfloat16(),)
        )
        return values


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16): its bf16 products then run at
    about 2.5x the fp32 rate (386 against 141 GFLOP/s on the 2-core Zen 4 of docs/BENCHMARKS.md)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())


def _fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The plain product, for inputs the reduced-precision products do not take."""
    return F.linear(x, weight.reshape(weight.shape[0], -1).to(x.dtype), bias)


def bf16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: Bf16Weight,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as a bf16 product with fp32 output and bias."""
    if x.device.type != "cpu":
        return _fp32_linear(x, weight, bias)
    source = weight if source is None else source
    y = F.linear(x.bfloat16(), cache.get(weight, source)).float()
    return y if bias is None else y.add_(bias)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: Int8Weight,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with dynamic int8 products (fp32 below ``MIN_ROWS`` rows)."""
    rows = x.numel() // x.shape[-1]
    if rows < MIN_ROWS or x.device.type != "cpu":
        return _fp32_linear(x, weight, bias)
    source = weight if source is None else source
    parts = quantize_passes(x.reshape(rows, -1).float(), cache.passes)
    y = int8_product(*parts[0], weight, bias, cache, source)
    for q, scale in parts[1:]:
        y.add_(int8_product(q, scale, weight, None, cache, source))
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def int8_product(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cache: Int8Weight,
    source: torch.Tensor,
) -> torch.Tensor:
    """Rows ``q`` (M, K) int8 with scales ``scale`` ((M, 1) or (1, 1)) times the quantised
    ``weight`` (N, K), plus ``bias`` -> fp32 (M, N)."""
    values, w_scale = cache.get(weight, source)
    y = torch._int_mm(q, values).float().mul_(scale).mul_(w_scale)
    return y if bias is None else y.add_(bias)


def gemm(
    x: torch.Tensor, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a layer computed as a matrix product (e.g. a convolution
    with its kernel flattened), in int8 when :func:`quantize_int8` marked the layer."""
    half = getattr(layer, "bf16_weight", None)
    if half is not None:
        return bf16_linear(x, weight, bias, half, layer.weight)
    cache = getattr(layer, "int8_weight", None)
    if cache is None:
        # as rows: F.linear on a strided N-d input (a permuted channels-first tensor) runs a
        # batch of small products, on a CPU twice as slow as one product of the copied rows
        rows = x.reshape(-1, x.shape[-1])
        y = F.linear(rows, weight.reshape(weight.shape[0], -1), bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    return int8_linear(x, weight, bias, cache, layer.weight)


def int8_gelu_mlp(x: torch.Tensor, lin1: nn.Linear, lin2: nn.Linear) -> torch.Tensor:
    """``lin2(GELU(lin1(x)))`` with both products in int8 (layers marked by
    :func:`quantize_int8`).

    The hidden rows are quantised with max(largest pre-activation, 0.17) as their peak: a
    bound of |GELU| (GELU(y) <= y for y > 0), so the row's largest value is found before the
    GELU and the GELU runs once instead of twice (compiled: 1.7 against 2.75 ms per block on
    the 2-core Xeon of docs/BENCHMARKS.md). Where the pre-activations reach a few units, as
    they do, the scale is that of the exact peak to within a fraction of a percent.
    """
    hidden = lin1(x)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if rows.shape[0] < MIN_ROWS or x.device.type != "cpu":
        return lin2(F.gelu(hidden))
    peak = rows.float().amax(dim=1, keepdim=True).clamp_min(GELU_NEGATIVE_PEAK)
    q = F.gelu(rows.float()).mul(127 / peak).round_().to(torch.int8)
    y = int8_product(q, peak / 127, lin2.weight, lin2.bias, lin2.int8_weight, lin2.weight)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class Int8Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`int8_linear`; same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.bias, self.int8_weight)


def quantize_int8(
    module: nn.Module, layers: tuple[nn.Module, ...] = (), passes: int = 1, bf16: bool = False
) -> nn.Module:
    """Switch every ``nn.Linear`` inside ``module`` to dynamic int8 products, and the ``layers``
    that :func:`gemm` computes to int8 products in ``passes`` passes (or, with ``bf16``, to
    bf16 products), in place."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = Int8Linear
            child.int8_weight = Int8Weight()
    for layer in layers:
        if bf16:
            layer.bf16_weight = Bf16Weight()
        else:
            layer.int8_weight = Int8Weight(passes)
    return module
