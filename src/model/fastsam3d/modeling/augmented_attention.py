"""The official rel-pos bias folded into the dot product, so bias-free (flash) kernels run it.

For query i = (qd, qh, qw) and key j = (kd, kh, kw) the bias is (see :mod:`.attention`)
``T1[i, kw] + T2[qd, qh, kd, kw] + T3[qd, qh, kh, kw]`` with T1 = q(qd,qh,qw).Rd[qd, kw],
T2 = q(qd,qh,kd).Rh[qh, kw], T3 = q(qd,qh,kh).Rw[kh, kw]. Appending to each query the tables
``T1 + T2`` (indexed by (kd, kw)) and ``T3`` (indexed by (kh, kw)), and to each key the one-hot
vectors of its (kd, kw) and (kh, kw), gives ``q_aug . k_aug = scale q.k + bias`` exactly: head
dims grow by 2 K^2 (128 for the 8^3 grid: 128 + 128 = 256 for the released student). Values are
zero-padded to the same width, as flash kernels want equal head dims.
"""

import torch
import torch.nn.functional as F


def augment_queries_keys(
    q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, ...], size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, size**3, D) -> q_aug, k_aug (B, H, size**3, D + 2 * size**2).

    ``tables`` are the expanded R_d, R_h, R_w, each (size, size, D) (R[a, b] = table[a - b + size
    - 1], see :func:`.attention.relative_position_table`).
    """
    batch, heads, n, dim = q.shape
    r_q = q.reshape(batch, heads, size, size, size, dim)
    rd, rh, rw = (t.to(q.dtype) for t in tables)
    t1 = torch.einsum("bndhwc,dkc->bndhwk", r_q, rd)  # (.., qd, qh, qw, kw)
    t2 = torch.einsum("bndhwc,hkc->bndhwk", r_q, rh)  # (.., qd, qh, kd, kw): query at w = kd
    t3 = torch.einsum("bndhwc,wkc->bndhwk", r_q, rw)  # (.., qd, qh, kh, kw): query at w = kh
    first = t2[:, :, :, :, None] + t1[..., None, :]  # (.., qd, qh, qw, kd, kw)
    second = t3[:, :, :, :, None].expand(-1, -1, -1, -1, size, -1, -1)
    q_aug = torch.cat(
        [q * scale, first.reshape(batch, heads, n, -1), second.reshape(batch, heads, n, -1)], -1
    )
    hot = key_one_hot(size, q.dtype, q.device)
    k_aug = torch.cat([k, hot.expand(batch, heads, -1, -1)], dim=-1)
    return q_aug, k_aug


def key_one_hot(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size**3, 2 * size**2): for key (kd, kh, kw) the one-hot of (kd, kw), then of (kh, kw)."""
    eye = torch.eye(size, dtype=dtype, device=device)
    hot_dw = (eye[:, None, None, :, None] * eye[None, None, :, None, :]).expand(
        -1, size, -1, -1, -1
    )
    hot_hw = (eye[None, :, None, :, None] * eye[None, None, :, None, :]).expand(
        size, -1, -1, -1, -1
    )
    n = size**3
    return torch.cat([hot_dw.reshape(n, -1), hot_hw.reshape(n, -1)], dim=-1)


def augmented_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables, size: int, scale: float
) -> torch.Tensor:
    """Exact biased attention through a bias-free kernel: ``flash_attn`` when importable on
    CUDA in fp16/bf16, else ``scaled_dot_product_attention`` without a mask."""
    q_aug, k_aug = augment_queries_keys(q, k, tables, size, scale)
    dim = v.shape[-1]
    v_pad = F.pad(v, (0, q_aug.shape[-1] - dim))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None:
            out = flash_attn_func(
                *(t.transpose(1, 2) for t in (q_aug, k_aug, v_pad)), softmax_scale=1.0
            )
            return out.transpose(1, 2)[..., :dim]
    return F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0)[..., :dim]
