"""Encoder self-attention with the official 3D decomposed relative-position bias.

The official ``add_decomposed_rel_pos`` broadcasts 5-D per-query projections into a 7-D logit
view in a way that lands every key index on the last (k_w) axis. For query (qd, qh, qw) and key
(kd, kh, kw), with unscaled per-head queries ``q(.)`` and ``R[a, b] = table[a - b + K - 1]``::

    bias = q(qd, qh, qw) . Rd[qd, kw] + q(qd, qh, kd) . Rh[qh, kw] + q(qd, qh, kh) . Rw[kh, kw]

The released weights were trained with exactly this bias, so it is reproduced here.

Backends (chosen once, stored on the layer; see :data:`ATTENTION_BACKENDS`):

- ``"math"``: explicit fp32 logits + softmax, the reference every fast path is compared with.
- ``"sdpa"``: the bias as an additive mask into ``scaled_dot_product_attention``; for CUDA
  half-precision inference with ``relpos_kernel`` on (:meth:`RelPosAttention3D.use_relpos_kernel`),
  the same attention with the bias computed inside one Triton kernel (:mod:`.relpos_flash`).
- ``"flash"``: the bias folded into the dot product (:mod:`.augmented_attention`), run by the
  ``flash_attn`` package when importable on CUDA (the ``[flash]`` extra), else by a bias-free
  ``scaled_dot_product_attention``.
- ``"sparse"``: the paper's dilated segment attention (:mod:`.sparse_attention`) over the
  layer's ``sparse_pairs``; equals dense for one pair (N, 1).
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import relpos_flash
from .augmented_attention import augmented_attention, key_one_hot
from .common import SCRATCH
from .sparse_attention import sparse_dilated_attention

ATTENTION_BACKENDS = ("math", "sdpa", "flash", "sparse")


def relative_position_table(
    size: int, table: torch.Tensor, extent: int | None = None, cols: int | None = None
) -> torch.Tensor:
    """R[a, b] = table[a - b + extent - 1] for a < size, b < cols, shape (size, cols, C).

    ``extent`` is the side the (2 * extent - 1, C) table was made for (default ``size``);
    a smaller ``size`` / ``cols`` (default ``size``) takes the top-left corner, as for the real
    tokens of a padded window.
    """
    extent = size if extent is None else extent
    cols = size if cols is None else cols
    if table.shape[0] != 2 * extent - 1:
        raise ValueError(
            f"relative-position table has {table.shape[0]} rows, expected {2 * extent - 1} "
            f"for an attention extent of {extent}"
        )
    rows = torch.arange(size, device=table.device)[:, None]
    return table[rows - torch.arange(cols, device=table.device)[None, :] + extent - 1]


def rel_pos_terms(
    q: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: int,
    extent: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three terms of the official bias for unscaled queries ``q`` (B*, size**3, C).

    ``extent``: see :func:`relative_position_table`.

    Returns:
        Tensors broadcastable to the 7-D logit view (B*, qd, qh, qw, kd, kh, kw).
    """
    batch, _, dim = q.shape
    r_q = q.reshape(batch, size, size, size, dim)
    rd, rh, rw = (
        relative_position_table(size, t, extent).to(q.dtype)
        for t in (rel_pos_d, rel_pos_h, rel_pos_w)
    )
    # rel_x[b, d, h, w, k] = q(d, h, w) . Rx[axis index, k]; contiguous, so that the sums of
    # broadcast terms below (the CPU bias, the CUDA product's tables) come out contiguous and
    # reshape without another copy
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, rd).contiguous()
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, rh).contiguous()
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, rw).contiguous()
    return (
        rel_d[:, :, :, :, None, None, :],  # q(qd,qh,qw) . Rd[qd, kw]
        rel_h[:, :, :, None, :, None, :],  # q(qd,qh,kd) . Rh[qh, kw]
        rel_w[:, :, :, None, None, :, :],  # q(qd,qh,kh) . Rw[kh, kw]
    )


def rel_pos_projections(
    q: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rel_pos_terms` (same shapes, equal up to fp32 summation order) from one product
    of the queries with the three (2 * size - 1, C) tables, each term then gathered at the
    query's own coordinate: on a CPU a third of the time of three einsums over expanded tables.
    """
    batch = q.shape[0]
    tables = torch.cat([rel_pos_d, rel_pos_h, rel_pos_w]).to(q.dtype)
    proj = (q @ tables.t()).view(batch, size, size, size, 3, 2 * size - 1)
    coords = torch.arange(size, device=q.device)
    row = coords[:, None] - coords[None, :] + size - 1  # [query coordinate, key] -> table row
    full = (batch, size, size, size, size)
    rel_d = proj[..., 0, :].gather(-1, row[:, None, None, :].expand(full))
    rel_h = proj[..., 1, :].gather(-1, row[None, :, None, :].expand(full))
    rel_w = proj[..., 2, :].gather(-1, row[None, None, :, :].expand(full))
    return (
        rel_d[:, :, :, :, None, None, :],
        rel_h[:, :, :, None, :, None, :],
        rel_w[:, :, :, None, None, :, :],
    )


def add_decomposed_rel_pos(
    logits: torch.Tensor, q: torch.Tensor, tables: tuple[torch.Tensor, ...], size: int
) -> torch.Tensor:
    """Add the official bias to logits (B*, N, N), term by term in the official order."""
    batch, n, _ = logits.shape
    out = logits.view(batch, *(size,) * 6)
    for term in rel_pos_terms(q, *tables, size):
        out = out + term
    return out.reshape(batch, n, n)


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """The official rel-pos bias alone, (B*, size**3, size**3), in the dtype of ``q``.

    On CUDA as :func:`rel_pos_bias_product` (a broadcast sum of 7-D views runs at a fraction
    of the memory bandwidth there); on a CPU the broadcast sum of
    :func:`rel_pos_projections` is the faster.
    """
    tables = (rel_pos_d, rel_pos_h, rel_pos_w)
    if q.is_cuda:
        return rel_pos_bias_product(*rel_pos_terms(q, *tables, size), size)
    rel_d, rel_h, rel_w = rel_pos_projections(q, *tables, size)
    return (rel_d + rel_h + rel_w).reshape(q.shape[0], q.shape[1], q.shape[1])


def rel_pos_bias_product(
    rel_d: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, size: int
) -> torch.Tensor:
    """The sum of :func:`rel_pos_terms` as one matrix product: each query's tables of
    (kd, kw) and (kh, kw) times the keys' one-hot coordinates (:mod:`.augmented_attention`),
    (B*, size**3, size**3); the same sums, (rel_d + rel_h) + rel_w."""
    batch, n = rel_d.shape[0], size**3
    tables = torch.cat(
        [
            (rel_d + rel_h).reshape(batch, n, -1),
            rel_w.expand(-1, -1, -1, size, -1, -1, -1).reshape(batch, n, -1),
        ],
        dim=-1,
    )
    return tables @ key_one_hot(size, rel_d.dtype, rel_d.device).t()


def bf16_cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos: tuple[torch.Tensor, ...] | None,
    scale: float,
    size: int,
) -> torch.Tensor:
    """Attention (B, heads, N, head_dim) with bf16 products, fp32 logits and softmax, in
    :data:`SCRATCH` buffers: on a CPU with native bf16 products about 1.5x SDPA's fp32.

    ``rel_pos`` are the three broadcast terms of :func:`rel_pos_projections` (or None); they
    are summed into the logits in place. Returns fp32.
    """
    batch, heads, n, dim = q.shape
    rows = batch * heads
    qb = torch.mul(q, scale, out=SCRATCH.get("q", q.shape, torch.bfloat16)).view(rows, n, dim)
    kb = SCRATCH.get("k", k.shape, torch.bfloat16)
    vb = SCRATCH.get("v", v.shape, torch.bfloat16)
    kb.copy_(k)
    vb.copy_(v)
    scores = torch.bmm(
        qb,
        kb.view(rows, n, dim).transpose(1, 2),
        out=SCRATCH.get("s", (rows, n, n), torch.bfloat16),
    )
    logits = SCRATCH.get("logits", (rows, n, n), torch.float32)
    if rel_pos is None:
        logits.copy_(scores)
    else:
        rel_d, rel_h, rel_w = rel_pos
        torch.add(rel_d + rel_h, rel_w, out=logits.view(rows, *(size,) * 6))
        logits.add_(scores)
    torch.softmax(logits, -1, out=logits)
    scores.copy_(logits)
    out = torch.bmm(
        scores, vb.view(rows, n, dim), out=SCRATCH.get("o", (rows, n, dim), torch.bfloat16)
    )
    return out.view(batch, heads, n, dim).float()


class RelPosAttention3D(nn.Module):
    """Multi-head self-attention over a cube of ``size**3`` tokens with the official bias.

    Args:
        dim: channels.
        num_heads: attention heads (head_dim = dim // num_heads).
        size: side of the attended cube (the token grid, or the window size).
        qkv_bias: whether the qkv projection has a bias.
        use_rel_pos: add the decomposed relative-position bias.
        backend: one of :data:`ATTENTION_BACKENDS`.
        sparse_pairs: (segment length, dilation) pairs of the "sparse" backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        size: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        backend: str = "math",
        sparse_pairs: tuple[tuple[int, int], ...] = (),
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.size = size
        self.use_rel_pos = use_rel_pos
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))
        self.sparse_pairs = tuple(tuple(p) for p in sparse_pairs)
        self.backend = backend
        self.cpu_bf16 = False
        self.relpos_kernel = False

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {name!r}; choose from {ATTENTION_BACKENDS}"
            )
        if name == "sparse" and not self.sparse_pairs:
            raise ValueError("the sparse backend needs sparse_pairs, e.g. ((64, 1), (512, 8))")
        self._backend = name

    def use_relpos_kernel(self) -> bool:
        """Run the "sdpa" backend's CUDA half-precision inference as :mod:`.relpos_flash`
        where it is supported (call after the cast to the inference dtype). Returns whether
        it is on."""
        self.relpos_kernel = (
            self.use_rel_pos
            and self._backend == "sdpa"
            and self.qkv.weight.is_cuda
            and relpos_flash.supported(self.size, self.head_dim, self.qkv.weight.dtype)
        )
        return self.relpos_kernel

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, H, W, C) -> q, k, v each (B, heads, N, head_dim); layout [3][heads][head_dim]."""
        batch = x.shape[0]
        qkv = self.qkv(x).reshape(batch, -1, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    @property
    def rel_pos_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rel_pos_d, self.rel_pos_h, self.rel_pos_w

    def bias(self, q: torch.Tensor) -> torch.Tensor:
        """Rel-pos bias for q of shape (B, heads, N, head_dim) -> (B, heads, N, N)."""
        batch, heads, n, hd = q.shape
        bias = decomposed_rel_pos_bias(
            q.reshape(batch * heads, n, hd), *self.rel_pos_tables, self.size
        )
        return bias.reshape(batch, heads, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, d, h, w, c = x.shape
        if (
            self.relpos_kernel
            and x.is_cuda
            and x.dtype in relpos_flash.DTYPES
            and not torch.is_grad_enabled()
        ):
            qkv = self.qkv(x).reshape(batch, d * h * w, 3 * c)
            out = relpos_flash.relpos_flash_attention(
                qkv, *self.rel_pos_tables, self.num_heads, self.scale
            )
            return self.proj(out.view(batch, d, h, w, c))
        q, k, v = self.split_heads(x)
        if self._backend == "math":
            work = torch.promote_types(q.dtype, torch.float32)
            out = self._math(q.to(work), k.to(work), v.to(work)).to(x.dtype)
        elif self._bf16_on_cpu(x):
            rel_pos = None
            if self.use_rel_pos:
                rows = q.reshape(batch * self.num_heads, -1, self.head_dim)
                rel_pos = rel_pos_projections(rows, *self.rel_pos_tables, self.size)
            out = bf16_cpu_attention(q, k, v, rel_pos, self.scale, self.size)
        elif self._backend == "flash" and self.use_rel_pos:
            tables = tuple(relative_position_table(self.size, t) for t in self.rel_pos_tables)
            out = augmented_attention(q, k, v, tables, self.size, self.scale)
        else:
            bias = self.bias(q) if self.use_rel_pos else None
            if self._backend == "sparse":
                out = sparse_dilated_attention(q, k, v, self.sparse_pairs, self.scale, bias)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, d, h, w, c)
        return self.proj(out)

    def _bf16_on_cpu(self, x: torch.Tensor) -> bool:
        """Whether :func:`bf16_cpu_attention` runs (``cpu_bf16``, set by the int8 CPU path;
        inference only, its buffers are written in place)."""
        return (
            self.cpu_bf16
            and self._backend == "sdpa"
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
        )

    def _math(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Reference path, in the official order of operations (fp32)."""
        batch, heads, n, hd = q.shape
        q, k, v = (t.reshape(batch * heads, n, hd) for t in (q, k, v))
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            tables = tuple(t.to(q.dtype) for t in self.rel_pos_tables)
            logits = add_decomposed_rel_pos(logits, q, tables, self.size)
        return (logits.softmax(dim=-1) @ v).reshape(batch, heads, n, hd)
