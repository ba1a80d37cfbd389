"""The decoder's attention layers with their projections multiplied together per head.

A click on a GPU runs the decoder as a chain of small kernels, each a few microseconds, so the
number of kernels sets its time. Per head h (``d`` = head width, ``C`` = token width):

- few queries against the image (token -> image): the scores are
  ``q (Wq_h^T Wk_h) k^T / sqrt(d)`` plus a constant per query, which the softmax cancels, and the
  output is ``sum_h (P_h v) (Wv_h^T Wo_h^T) + (bv Wo^T + bo)``; so one product makes every
  head's query in image-token space, one product scores all heads, one product reads the
  values, one product projects all heads out;
- the image against few tokens (image -> token): the tokens' keys and values are carried into
  image-token space the same way (``Wk_h^T Wq_h``, ``Wv_h^T Wo_h^T``; the query bias becomes one
  extra score per key), so each image token's scores and output are one product each;
- self-attention of the tokens: q and k (and v where they share an input) as one product and
  the attention as one fused kernel;
- the products that feed a residual LayerNorm with a long inner axis (all heads projected out,
  K = H*C; the MLP's second layer) split that axis into :data:`SPLIT_PARTS` parts, one
  batched product, whose sum the LayerNorm kernel adds (:class:`.fused_kernels.PartialSums`):
  with a few rows, cuBLAS's kernel for the whole product keeps few of the GPU's cores busy.

The merged matrices are computed in float64 from the layer's weights and rounded once
(:meth:`.transformer.Attention.merged` keeps them until a weight changes); results equal the
projected form up to fp32 rounding. They are
larger than the projections (``C x H*C`` instead of ``D x C``), which costs nothing on a GPU but
memory traffic on a CPU, so only CUDA uses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_kernels
from .common import linear_relu
from .fast_path import in_parallel

SPLIT_PARTS = 16
"""Parts of the inner axis of a product split for a LayerNorm's residual: on an H200, 7 rows
by (3072, 384) took 10.3 us in one ``addmm``, 4.2 us as 16 batched parts (2048: 11.7 / 3.7)."""


def _per_head(attention: nn.Module) -> tuple[torch.Tensor, ...]:
    """float64 (H, d, C) weights and (H, d) biases of q, k, v; (H, d, C) ``Wo_h^T``; ``bo``."""
    heads = attention.num_heads
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    weights = [p.weight.detach().double().view(heads, -1, p.weight.shape[1]) for p in layers]
    biases = [p.bias.detach().double().view(heads, -1) for p in layers]
    out = attention.out_proj.weight.detach().double()
    out_heads = out.view(out.shape[0], heads, -1).permute(1, 2, 0)
    return (*weights, *biases, out_heads, attention.out_proj.bias.detach().double())


def merge_to_image(attention: nn.Module) -> tuple[torch.Tensor, ...]:
    """Token -> image: (C, H*C) ``Wq_h^T Wk_h / sqrt(d)`` and its bias; (H*C, C)
    ``Wv_h^T Wo_h^T`` and the output bias ``bv Wo^T + bo``."""
    wq, wk, wv, bq, _, bv, wo, bo = _per_head(attention)
    scale = 1 / math.sqrt(wq.shape[1])
    return (
        torch.einsum("hdc,hde->che", wq, wk).flatten(1) * scale,
        torch.einsum("hd,hde->he", bq, wk).flatten() * scale,
        torch.einsum("hdc,hde->hce", wv, wo).flatten(0, 1),
        torch.einsum("hd,hde->e", bv, wo) + bo,
    )


def merge_to_tokens(attention: nn.Module) -> tuple[torch.Tensor, ...]:
    """Image -> token: (C, H*(C+1)) ``Wk_h^T Wq_h / sqrt(d)`` with each head's score bias
    ``Wk_h^T bq_h / sqrt(d)`` as an extra column, and its bias; (C, H*C) ``Wv_h^T Wo_h^T``
    and its bias ``bv_h Wo_h^T``."""
    wq, wk, wv, bq, bk, bv, wo, _ = _per_head(attention)
    scale = 1 / math.sqrt(wq.shape[1])
    keys = torch.cat(
        [torch.einsum("hdc,hde->che", wk, wq), torch.einsum("hdc,hd->ch", wk, bq)[..., None]], 2
    )
    keys_bias = torch.cat(
        [torch.einsum("hd,hde->he", bk, wq), (bk * bq).sum(1, keepdim=True)], dim=1
    )
    return (
        keys.flatten(1) * scale,
        keys_bias.flatten() * scale,
        torch.einsum("hdc,hde->che", wv, wo).flatten(1),
        torch.einsum("hd,hde->he", bv, wo).flatten(),
    )


def merge_self(attention: nn.Module) -> tuple[torch.Tensor, ...]:
    """Self-attention: the (C, 3*D) q, k, v projections side by side and their bias."""
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    return (
        torch.cat([p.weight.detach() for p in layers]).t(),
        torch.cat([p.bias.detach() for p in layers]),
    )


def _matmul_bias(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b + bias`` for a (B, M, K) and b (K, N) or (B, K, N): one product either way."""
    if b.ndim == 2:
        return torch.addmm(bias, a.reshape(-1, a.shape[-1]), b).view(*a.shape[:-1], -1)
    if a.shape[0] == 1:
        return torch.addmm(bias[0] if bias.ndim == 3 else bias, a[0], b[0]).unsqueeze(0)
    return torch.baddbmm(bias, a, b)


def residual_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor | fused_kernels.PartialSums:
    """``x @ weight + bias`` for (B, T, K) ``x`` and a (K, N) ``weight`` (any strides) that a
    residual LayerNorm reads next: on CUDA with the Triton kernels as :data:`SPLIT_PARTS`
    partial products that the LayerNorm's kernel sums, else one product."""
    inner = x.shape[-1]
    if not (x.is_cuda and fused_kernels.available()) or inner % SPLIT_PARTS:
        return _matmul_bias(bias, x, weight)
    rows = x.reshape(-1, SPLIT_PARTS, inner // SPLIT_PARTS).transpose(0, 1)
    parts = torch.bmm(rows, weight.view(SPLIT_PARTS, inner // SPLIT_PARTS, -1))
    return fused_kernels.PartialSums(parts.view(SPLIT_PARTS, *x.shape[:-1], -1), bias)


def mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor | fused_kernels.PartialSums:
    """A decoder :class:`.common.MLPBlock` (ReLU) whose output a residual LayerNorm reads,
    its second product by :func:`residual_product`."""
    hidden = linear_relu(x, block.lin1)
    return residual_product(hidden, block.lin2.weight.t(), block.lin2.bias)


def self_attention(
    attention: nn.Module,
    merged: tuple[torch.Tensor, ...],
    queries: torch.Tensor,
    query_pe: torch.Tensor | None,
) -> torch.Tensor:
    """Self-attention of the tokens (B, T, C), ``query_pe`` added to queries and keys; None:
    the first block's, where q, k and v share one input."""
    qkv, bias = merged
    width = qkv.shape[1] // 3
    if query_pe is None:
        q, k, v = _matmul_bias(bias, queries, qkv).split(width, dim=-1)
    else:
        q, k = _matmul_bias(bias[: 2 * width], queries + query_pe, qkv[:, : 2 * width]).split(
            width, dim=-1
        )
        v = _matmul_bias(bias[2 * width :], queries, qkv[:, 2 * width :])
    batch, tokens = queries.shape[:2]
    heads = attention.num_heads
    q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return attention.out_proj(out.reshape(batch, tokens, width))


def attend_image(
    attention: nn.Module,
    merged: tuple[torch.Tensor, ...],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor | fused_kernels.PartialSums:
    """Token -> image attention: few queries (B, T, C), many keys and values (B, N, C); the
    output for a residual LayerNorm (:func:`residual_product`)."""
    query_keys, query_bias, values_out, out_bias = merged
    batch, tokens, channels = q.shape
    heads = attention.num_heads
    queries = _matmul_bias(query_bias, q, query_keys).view(batch, tokens * heads, channels)
    probabilities = torch.bmm(queries, k.transpose(1, 2)).softmax(dim=-1)
    read = torch.bmm(probabilities, v).view(batch, tokens, heads * channels)
    return residual_product(read, values_out, out_bias)


def attend_tokens(
    attention: nn.Module,
    merged: tuple[torch.Tensor, ...],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Image -> token attention: many queries (B, N, C), few keys and values (B, T, C)."""
    key_queries, key_bias, values_out, values_bias = merged
    batch, tokens, channels = k.shape
    heads = attention.num_heads

    def attention_weights() -> torch.Tensor:
        keys = _matmul_bias(key_bias, k, key_queries).view(batch, tokens * heads, channels + 1)
        scores = _matmul_bias(keys[..., -1:].transpose(1, 2), q, keys[..., :-1].transpose(1, 2))
        return scores.view(batch, -1, tokens, heads).softmax(dim=2)

    def projected_values() -> torch.Tensor:
        return _matmul_bias(values_bias, v, values_out).view(batch, tokens * heads, channels)

    if k.is_cuda:  # two independent chains: the values on a second stream
        values, weights = in_parallel(projected_values, attention_weights)
    else:
        values, weights = projected_values(), attention_weights()
    out_bias = attention.out_proj.bias
    return _matmul_bias(out_bias, weights.view(batch, -1, tokens * heads), values)
