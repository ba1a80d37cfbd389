"""Two-way transformer of the 3D mask decoder (tokens <-> image embedding)."""

import functools
import math

import torch
from torch import nn

from . import fused_kernels, merged_attention
from .common import MLPBlock
from .derived import DerivedTensors

FORMS = ("projected", "folded", "merged")
"""How the decoder's attention layers compute, all equal up to rounding: "projected" (the
official order), "folded" (cross-attention projections moved to the few prompt tokens, the
CPU fast path) and "merged" (projections multiplied together per head,
:mod:`.merged_attention`, the CUDA fast path: fewest kernels)."""


class Attention(nn.Module):
    """Attention with separate q/k/v projections to ``embedding_dim // downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the width {self.internal_dim}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self._merged: dict[str, DerivedTensors] = {}

    def merged(self, merge) -> tuple[torch.Tensor, ...]:
        """``merge(self)`` (a function of :mod:`.merged_attention`) in this layer's dtype,
        kept until a weight changes."""
        cache = self._merged.setdefault(merge.__name__, DerivedTensors())
        dtype = self.q_proj.weight.dtype
        return cache.get(self.parameters(), lambda: (t.to(dtype).contiguous() for t in merge(self)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, c = x.shape
        return x.reshape(batch, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(k)),
            self._heads(self.v_proj(v)),
        )
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], self.internal_dim))

    def _head_weights(self, linear: nn.Linear) -> torch.Tensor:
        """(H, d, C) per-head rows of a projection to the internal width."""
        return linear.weight.view(self.num_heads, -1, linear.weight.shape[1])

    def attend_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``forward`` for few queries (B, T, C) and many keys / values (B, N, C).

        The key and value projections move to the query side: scores are ``(q Wk) k^T`` (the
        key bias adds a constant per query, which softmax cancels) and the output is
        ``(attn v) Wv^T + bv`` (attention rows sum to 1), so no (N, C) tensor is projected.
        """
        batch, t, _ = q.shape
        q = self._heads(self.q_proj(q))
        q = (q / math.sqrt(q.shape[-1])) @ self._head_weights(self.k_proj)
        attn = (q.reshape(batch, -1, q.shape[-1]) @ k.transpose(1, 2)).softmax(dim=-1)
        out = (attn @ v).view(batch, self.num_heads, t, -1)
        out = out @ self._head_weights(self.v_proj).transpose(1, 2)
        out = (out + self.v_proj.bias.view(self.num_heads, 1, -1)).transpose(1, 2)
        return self.out_proj(out.reshape(batch, t, self.internal_dim))

    def attend_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``forward`` for many queries (B, N, C) and few keys / values (B, T, C).

        The query and output projections move to the key side: scores are
        ``q (Wq^T k^T) + bq k^T`` and the output is ``attn (v Wo^T) + bo``, one (N, H * T)
        product each way instead of two (N, C) projections.
        """
        batch, n, _ = q.shape
        k, v = self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        heads, t, d = k.shape[1:]
        k = k / math.sqrt(d)
        keys = (k @ self._head_weights(self.q_proj)).reshape(batch, heads * t, -1)
        bias = (k @ self.q_proj.bias.view(heads, d, 1)).reshape(batch, heads * t, 1)
        # (B, H * T, N): softmax over T is then a vectorised inner-axis reduction
        attn = torch.baddbmm(bias, keys, q.transpose(1, 2)).view(batch, heads, t, n)
        attn = attn.softmax(dim=2).view(batch, heads * t, n)
        values = v @ self.out_proj.weight.view(-1, heads, d).permute(1, 2, 0)
        return torch.baddbmm(
            self.out_proj.bias, attn.transpose(1, 2), values.reshape(batch, heads * t, -1)
        )


class TwoWayAttentionBlock3D(nn.Module):
    """Self-attention on tokens, token->image, MLP, image->token (LayerNorm eps 1e-5).

    The first block's self-attention has no positional encoding and no residual.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        form: str = "projected",
        keys_pe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block, its attention computed in ``form`` (one of :data:`FORMS`).

        ``keys_pe`` is ``keys + key_pe`` where the caller has it (the previous block's third
        output). Returns the new queries, keys and ``keys + key_pe``.
        """
        fused = form == "merged"
        self_pe = None if self.skip_first_layer_pe else query_pe
        if fused:
            merged = self.self_attn.merged(merged_attention.merge_self)
            attended = merged_attention.self_attention(self.self_attn, merged, queries, self_pe)
        elif self_pe is None:
            attended = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            attended = self.self_attn(q, q, queries)
        if self_pe is None:
            queries, q = add_norm(attended, None, self.norm1, query_pe, fused)
        else:
            queries, q = add_norm(queries, attended, self.norm1, query_pe, fused)
        k = keys + key_pe if keys_pe is None else keys_pe
        to_image = cross_attention(self.cross_attn_token_to_image, "image", form)
        queries, _ = add_norm(queries, to_image(q, k, keys), self.norm2, None, fused)
        mlp = merged_attention.mlp(self.mlp, queries) if fused else self.mlp(queries)
        queries, q = add_norm(queries, mlp, self.norm3, query_pe, fused)
        to_tokens = cross_attention(self.cross_attn_image_to_token, "tokens", form)
        return queries, *add_norm(keys, to_tokens(k, q, queries), self.norm4, key_pe, fused)


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | fused_kernels.PartialSums | None,
    norm: nn.LayerNorm,
    pe: torch.Tensor | None,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = norm(x + residual)`` (``norm(x)`` without a residual) and ``y + pe`` (None
    without ``pe``); ``fused``: in one Triton kernel on CUDA
    (:func:`.fused_kernels.add_layer_norm`)."""
    if fused and x.is_cuda and fused_kernels.available():
        return fused_kernels.add_layer_norm(x, residual, norm, pe)
    if isinstance(residual, fused_kernels.PartialSums):
        residual = residual.total()
    y = norm(x if residual is None else x + residual)
    return y, (None if pe is None else y + pe)


def cross_attention(attention: Attention, towards: str, form: str):
    """``attention``'s call in ``form`` for few queries against the image (``towards`` =
    "image") or the image against few tokens ("tokens")."""
    if form == "projected":
        return attention
    if form == "folded":
        return attention.attend_image if towards == "image" else attention.attend_tokens
    if form != "merged":
        raise ValueError(f"unknown attention form {form!r}; expected one of {FORMS}")
    if towards == "image":
        merged = attention.merged(merged_attention.merge_to_image)
        return functools.partial(merged_attention.attend_image, attention, merged)
    merged = attention.merged(merged_attention.merge_to_tokens)
    return functools.partial(merged_attention.attend_tokens, attention, merged)


class TwoWayTransformer3D(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock3D` plus a final token->image attention."""

    def __init__(
        self,
        *,
        depth: int = 2,
        embedding_dim: int = 384,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(
                embedding_dim, num_heads, mlp_dim, attention_downsample_rate, i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        form: str = "projected",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, C) attend the image (B, C, X, Y, Z); returns (tokens, image tokens).

        ``form`` (one of :data:`FORMS`) says how the attention layers compute; all give the
        same result up to fp32 rounding.
        """
        queries, keys, keys_pe = self.blocks(image_embedding, image_pe, point_embedding, form)
        return self.final_attention(queries, keys, keys_pe, point_embedding, form), keys

    def blocks(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        form: str = "projected",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The blocks of :meth:`forward`: (tokens, image tokens, image tokens + their PE)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries, keys_pe = point_embedding, None
        for layer in self.layers:
            queries, keys, keys_pe = layer(queries, keys, point_embedding, key_pe, form, keys_pe)
        return queries, keys, keys_pe

    def final_attention(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        keys_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        form: str = "projected",
    ) -> torch.Tensor:
        """The last token -> image attention of :meth:`forward` -> tokens."""
        q = queries + point_embedding
        attn = cross_attention(self.final_attn_token_to_image, "image", form)(q, keys_pe, keys)
        return add_norm(queries, attn, self.norm_final_attn, None, form == "merged")[0]
