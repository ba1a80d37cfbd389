"""Triton kernels of the CUDA click, each replacing several PyTorch kernels.

A click on a GPU is a chain of small kernels whose number sets its time, so:

- :func:`upsample_threshold`: ``F.interpolate(..., mode="trilinear") > threshold`` writes the
  whole upsampled float volume (8 MB for 128^3) and reads it back; this kernel computes each
  output voxel from its eight low-res neighbours with PyTorch's weights, in PyTorch's order of
  operations, and writes only the bool mask;
- :func:`add_layer_norm`: a residual sum, its LayerNorm and (optionally) a GELU, or the
  normalised tokens plus their positional encoding, which the next attention reads, in one
  pass. The residual may come as :class:`PartialSums`, a few-row product split over its inner
  axis: one batched product keeps more of the GPU busy than cuBLAS's few-row kernel, and this
  kernel adds the parts.

Used on CUDA when Triton is importable (:func:`available`); results equal the PyTorch
operations up to fp32 rounding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

BLOCK = 1024


class PartialSums(NamedTuple):
    """``parts.sum(0) + bias``: (S, B, N, C) partial products and a (C,) bias, left for
    :func:`add_layer_norm` to add."""

    parts: torch.Tensor
    bias: torch.Tensor

    def total(self) -> torch.Tensor:
        """The sum, computed (for paths without the kernel)."""
        return self.parts.sum(0) + self.bias


@functools.cache
def available() -> bool:
    """Whether the kernels can run here (Triton importable, a CUDA device present)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def source_index(out, scale, size):
        """``area_pixel_compute_source_index`` (align_corners=False): the lower and upper
        neighbour and the upper one's weight."""
        position = tl.maximum(scale * (out.to(tl.float32) + 0.5) - 0.5, 0.0)
        lower = position.to(tl.int32)
        upper = lower + (lower < size - 1).to(tl.int32)
        return lower, upper, position - lower.to(tl.float32)

    @triton.jit
    def plane(base, d, h0, h1, lh, w0, w1, lw, in_h, in_w, live):
        """Bilinear value in low-res plane ``d``."""
        row0 = base + (d * in_h + h0) * in_w
        row1 = base + (d * in_h + h1) * in_w
        top = (1 - lw) * tl.load(row0 + w0, mask=live) + lw * tl.load(row0 + w1, mask=live)
        bottom = (1 - lw) * tl.load(row1 + w0, mask=live) + lw * tl.load(row1 + w1, mask=live)
        return (1 - lh) * top + lh * bottom

    @triton.jit
    def upsample_threshold_kernel(
        logits, mask, total, threshold, scale_d, scale_h, scale_w,
        in_d: tl.constexpr, in_h: tl.constexpr, in_w: tl.constexpr,
        out_d: tl.constexpr, out_h: tl.constexpr, out_w: tl.constexpr,
        block: tl.constexpr,
    ):  # fmt: skip
        index = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)
        live = index < total
        within = index % (out_d * out_h * out_w)
        base = logits + (index // (out_d * out_h * out_w)) * (in_d * in_h * in_w)
        d0, d1, ld = source_index(within // (out_h * out_w), scale_d, in_d)
        h0, h1, lh = source_index((within // out_w) % out_h, scale_h, in_h)
        w0, w1, lw = source_index(within % out_w, scale_w, in_w)
        first = plane(base, d0, h0, h1, lh, w0, w1, lw, in_h, in_w, live)
        second = plane(base, d1, h0, h1, lh, w0, w1, lw, in_h, in_w, live)
        value = (1 - ld) * first + ld * second
        tl.store(mask + index, (value > threshold).to(tl.uint8), mask=live)

    @triton.jit
    def add_layer_norm_kernel(
        x, residual, residual_bias, pe, out, out_pe, weight, bias, rows, channels, eps,
        x_b, x_n, x_c, r_s, r_b, r_n, r_c, p_b, p_n, p_c,
        residual_parts: tl.constexpr, has_residual_bias: tl.constexpr, has_pe: tl.constexpr,
        gelu: tl.constexpr, block: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        b, n = row // rows, row % rows
        column = tl.arange(0, block)
        live = column < channels
        value = tl.load(x + b * x_b + n * x_n + column * x_c, mask=live, other=0.0)
        for part in tl.static_range(residual_parts):
            value += tl.load(
                residual + part * r_s + b * r_b + n * r_n + column * r_c, mask=live, other=0.0
            )
        if has_residual_bias:
            value += tl.load(residual_bias + column, mask=live, other=0.0)
        mean = tl.sum(value, axis=0) / channels
        centred = tl.where(live, value - mean, 0.0)
        variance = tl.sum(centred * centred, axis=0) / channels
        normed = centred * tl.rsqrt(variance + eps)
        normed = normed * tl.load(weight + column, mask=live) + tl.load(bias + column, mask=live)
        if gelu:
            normed = 0.5 * normed * (1 + tl.math.erf(normed * 0.7071067811865476))
        tl.store(out + row * channels + column, normed, mask=live)
        if has_pe:
            position = tl.load(pe + b * p_b + n * p_n + column * p_c, mask=live)
            tl.store(out_pe + row * channels + column, normed + position, mask=live)

    return triton, upsample_threshold_kernel, add_layer_norm_kernel


def upsample_threshold(
    low_res: torch.Tensor, size: tuple[int, int, int], threshold: float
) -> torch.Tensor:
    """``F.interpolate(low_res, size, mode="trilinear") > threshold`` for CUDA (B, M, d, h, w)
    fp32 logits, as a bool (B, M, *size) mask."""
    triton, kernel, _ = _kernels()
    low_res = low_res.float().contiguous()
    mask = torch.empty((*low_res.shape[:2], *size), dtype=torch.bool, device=low_res.device)
    cells = low_res.shape[2:]
    scales = [n / s for n, s in zip(cells, size, strict=True)]
    grid = (triton.cdiv(mask.numel(), BLOCK),)
    with torch.cuda.device(low_res.device):  # Triton launches on the current device
        kernel[grid](
            low_res, mask.view(torch.uint8), mask.numel(), float(threshold), *scales, *cells,
            *size, block=BLOCK,
        )  # fmt: skip
    return mask


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | PartialSums | None,
    norm: torch.nn.Module,
    pe: torch.Tensor | None = None,
    gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = norm(x + residual)`` (then the exact GELU with ``gelu``) and ``y + pe`` (None
    without ``pe``) for CUDA fp32 (B, N, C) tensors of any strides (``pe`` may be broadcast
    over the batch); ``norm`` is a LayerNorm over C (``weight``, ``bias``, ``eps``); a
    :class:`PartialSums` residual is summed here."""
    triton, _, kernel = _kernels()
    batch, rows, channels = x.shape
    out = torch.empty((batch, rows, channels), device=x.device, dtype=x.dtype)
    out_pe = torch.empty_like(out) if pe is not None else out
    if isinstance(residual, PartialSums):
        parts, residual_bias = residual.parts, residual.bias
    else:
        parts = (x if residual is None else residual).unsqueeze(0)
        residual_bias = None
    pe_ = pe.expand(batch, -1, -1) if pe is not None else x
    with torch.cuda.device(x.device):
        kernel[(batch * rows,)](
            x, parts, x if residual_bias is None else residual_bias, pe_, out, out_pe,
            norm.weight, norm.bias, rows, channels, norm.eps,
            *x.stride(), *parts.stride(), *pe_.stride(),
            residual_parts=0 if residual is None else parts.shape[0],
            has_residual_bias=residual_bias is not None, has_pe=pe is not None, gelu=gelu,
            block=triton.next_power_of_2(channels),
        )  # fmt: skip
    return out, (out_pe if pe is not None else None)
