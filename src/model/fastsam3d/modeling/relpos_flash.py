"""Global attention with the official rel-pos bias computed inside one Triton flash kernel.

The bias (see :mod:`.attention`) for query (qd, qh, qw) and key (kd, kh, kw) is::

    P[(qd, qh, qw), Rd(qd - kw)] + P[(qd, qh, kd), Rh(qh - kw)] + P[(qd, qh, kh), Rw(kh - kw)]

where ``P = q @ [table_d; table_h; table_w].T`` holds each token's unscaled query against the
3 (2K - 1) rows of the layer's tables. SDPA needs the bias written out, (B, heads, 512, 512)
per block (200 MB at batch 64 in bf16), and the heads split into their own tensors. Here each
program takes one head and one query plane (qd) of K^2 tokens: every row of P the plane's bias
needs belongs to a token of the same plane. It reads q, k and v in place from the qkv
projection's output, computes the plane's P in fp32 (one product, kept in a scratch tile),
gathers each key plane's bias from it, runs an online softmax in fp32 and writes the heads
side by side, as the output projection reads them.

For CUDA half-precision inference (:func:`supported`). Against the fp32 reference it is closer
than SDPA with the bias written out in half precision (tests/test_attention.py).
"""

from __future__ import annotations

import functools

import torch

from . import fused_kernels

DTYPES = (torch.bfloat16, torch.float16)


def supported(size: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel covers a cube of side ``size`` with heads of ``head_dim`` in
    ``dtype`` (planes and heads powers of two, as Triton's tiles are)."""
    plane = size * size
    return (
        fused_kernels.available()
        and dtype in DTYPES
        and 16 <= plane <= 128
        and plane & (plane - 1) == 0
        and 16 <= head_dim <= 128
        and head_dim & (head_dim - 1) == 0
    )


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def relpos_flash_kernel(
        qkv, table_d, table_h, table_w, scratch, out, scale, heads, qkv_b, qkv_n, out_b, out_n,
        SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TABLE_ROWS: tl.constexpr,
    ):  # fmt: skip
        PLANE: tl.constexpr = SIZE * SIZE
        TABLE: tl.constexpr = 2 * SIZE - 1
        LOG2E: tl.constexpr = 1.4426950408889634
        plane = tl.program_id(0)
        b = tl.program_id(1) // heads
        h = tl.program_id(1) % heads
        dim = heads * HEAD_DIM
        rows = tl.arange(0, PLANE)  # query (qh, qw) within the plane qd
        cols = tl.arange(0, PLANE)  # key (kh, kw) within the plane kd
        qh = rows // SIZE
        kh = cols // SIZE
        kw = cols % SIZE
        channels = h * HEAD_DIM + tl.arange(0, HEAD_DIM)
        base = qkv + b * qkv_b
        q = tl.load(base + (plane * PLANE + rows)[:, None] * qkv_n + channels[None, :])
        # the plane's P in fp32 (against the three tables stacked, zero rows after them),
        # through a scratch tile that the gathers below read back
        table_rows = tl.arange(0, TABLE_ROWS)
        table_dims = tl.arange(0, HEAD_DIM)[None, :]
        row_d = table_rows[:, None]
        row_h = row_d - TABLE
        row_w = row_d - 2 * TABLE
        stacked = tl.load(table_d + row_d * HEAD_DIM + table_dims, mask=row_d < TABLE, other=0.0)
        live_h = (row_h >= 0) & (row_h < TABLE)
        stacked += tl.load(table_h + row_h * HEAD_DIM + table_dims, mask=live_h, other=0.0)
        live_w = (row_w >= 0) & (row_w < TABLE)
        stacked += tl.load(table_w + row_w * HEAD_DIM + table_dims, mask=live_w, other=0.0)
        tile = scratch + (tl.program_id(1) * SIZE + plane) * (PLANE * TABLE_ROWS)
        projected = tl.dot(q, tl.trans(stacked))
        tl.store(tile + rows[:, None] * TABLE_ROWS + table_rows[None, :], projected)
        tl.debug_barrier()
        own = tile + rows[:, None] * TABLE_ROWS
        borrowed = tile + qh[:, None] * (SIZE * TABLE_ROWS)
        # the key plane's first and last terms do not depend on kd
        bias_dw = tl.load(own + (plane - kw + SIZE - 1)[None, :])
        bias_dw += tl.load(
            borrowed + kh[None, :] * TABLE_ROWS + 2 * TABLE + (kh - kw + SIZE - 1)[None, :]
        )
        h_column = TABLE + qh[:, None] - kw[None, :] + SIZE - 1
        top = tl.full((PLANE,), float("-inf"), tl.float32)
        total = tl.zeros((PLANE,), tl.float32)
        acc = tl.zeros((PLANE, HEAD_DIM), tl.float32)
        for kd in range(SIZE):
            keys = base + (kd * PLANE + cols)[:, None] * qkv_n + channels[None, :]
            k = tl.load(keys + dim)
            v = tl.load(keys + 2 * dim)
            bias_h = tl.load(borrowed + kd * TABLE_ROWS + h_column)
            logits = tl.dot(q, tl.trans(k)) * scale + (bias_dw + bias_h)
            new_top = tl.maximum(top, tl.max(logits, axis=1))
            weights = tl.exp2((logits - new_top[:, None]) * LOG2E)
            decay = tl.exp2((top - new_top) * LOG2E)
            total = total * decay + tl.sum(weights, axis=1)
            acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v)
            top = new_top
        result = acc / total[:, None]
        target = out + b * out_b + (plane * PLANE + rows)[:, None] * out_n + channels[None, :]
        tl.store(target, result.to(out.dtype.element_ty))

    return relpos_flash_kernel


@torch.library.custom_op("fastsam3d::relpos_flash_attention", mutates_args=())
def relpos_flash_attention(
    qkv: torch.Tensor,
    table_d: torch.Tensor,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    heads: int,
    scale: float,
) -> torch.Tensor:
    """Attention over the K^3 tokens of a cube with the official bias.

    Args:
        qkv: the qkv projection's output (B, K^3, 3 * C), laid out [3][heads][head_dim], its
            channels contiguous.
        table_d, table_h, table_w: the layer's contiguous (2K - 1, head_dim) rel-pos tables.

    Returns:
        (B, K^3, C), the heads side by side.
    """
    batch, tokens, width3 = qkv.shape
    dim = width3 // 3
    size = (table_d.shape[0] + 1) // 2
    table_rows = max(16, 1 << (3 * table_d.shape[0] - 1).bit_length())
    out = torch.empty((batch, tokens, dim), dtype=qkv.dtype, device=qkv.device)
    scratch = torch.empty(
        (batch * heads * size, size * size, table_rows), dtype=torch.float32, device=qkv.device
    )
    with torch.cuda.device(qkv.device):  # Triton launches on the current device
        _kernel()[(size, batch * heads)](
            qkv, table_d, table_h, table_w, scratch, out, scale, heads,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
            SIZE=size, HEAD_DIM=dim // heads, TABLE_ROWS=table_rows, num_warps=4, num_stages=1,
        )  # fmt: skip
    return out


@relpos_flash_attention.register_fake
def _(qkv, table_d, table_h, table_w, heads, scale):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
