"""3D sparse (dilated) attention of the FastSAM3D paper (§2.3), done as described.

Tokens (flattened in d, h, w order) are cut into segments of ``w`` tokens; in each segment every
``r``-th token is kept (head ``h`` starts at offset ``h % r``, so heads cover different tokens);
all segments of all heads are attended in one batched call; outputs go back to their places by
the exact inverse of the gather. Several (w, r) pairs are mixed LongNet-style: each pair's output
is weighted by its softmax denominator, which equals one softmax over the union of the pairs'
keys when they are disjoint. A token that no pair selects for a head gets a zero output there.

The official repository's version of this is dead code with a transposed output
(official-reference §2); the released weights were trained with dense attention, so dense stays
the default for them.
"""

import torch


def dilated_indices(
    num_tokens: int, segment: int, dilation: int, num_heads: int, device=None
) -> torch.Tensor:
    """Token indices each head attends, (heads, num_segments, segment // dilation).

    Raises:
        ValueError: ``segment`` does not divide ``num_tokens`` or ``dilation`` ``segment``.
    """
    if num_tokens % segment or segment % dilation:
        raise ValueError(
            f"segment length {segment} must divide the {num_tokens} tokens and the dilation "
            f"{dilation} must divide the segment length"
        )
    base = torch.arange(num_tokens, device=device).view(num_tokens // segment, segment)
    offsets = torch.arange(num_heads, device=device) % dilation
    picks = offsets[:, None] + dilation * torch.arange(segment // dilation, device=device)
    return base[:, picks].permute(1, 0, 2)  # (heads, segments, kept)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, C), idx (H, S, M) -> (B, H, S, M, C)."""
    batch, heads, _, dim = x.shape
    flat = idx.reshape(1, heads, -1, 1).expand(batch, -1, -1, dim)
    return x.gather(2, flat).view(batch, heads, *idx.shape[1:], dim)


def _gather_bias(bias: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """bias (B, H, N, N), idx (H, S, M) -> (B, H, S, M, M) = bias[.., idx_i, idx_j]."""
    batch, heads, n, _ = bias.shape
    segments, kept = idx.shape[1:]
    rows = bias.gather(2, idx.reshape(1, heads, -1, 1).expand(batch, -1, -1, n))
    rows = rows.view(batch, heads, segments, kept, n)
    cols = idx.view(1, heads, segments, 1, kept).expand(batch, -1, -1, kept, -1)
    return rows.gather(4, cols)


def scatter_tokens(values: torch.Tensor, idx: torch.Tensor, num_tokens: int, fill: float):
    """Inverse of the gather: (B, H, S, M, C) -> (B, H, N, C); unselected tokens get ``fill``."""
    batch, heads, _, _, dim = values.shape
    out = values.new_full((batch, heads, num_tokens, dim), fill)
    flat = idx.reshape(1, heads, -1, 1).expand(batch, -1, -1, dim)
    return out.scatter(2, flat, values.reshape(batch, heads, -1, dim))


def sparse_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pairs: tuple[tuple[int, int], ...],
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dilated segment attention mixed over ``pairs`` of (segment length, dilation).

    Args:
        q, k, v: (B, heads, N, head_dim).
        pairs: ((w, r), ...).
        scale: logit scale.
        bias: optional additive bias (B, heads, N, N), gathered for the selected pairs.

    Returns:
        (B, heads, N, head_dim).
    """
    heads, n = q.shape[1], q.shape[2]
    outputs, log_denominators = [], []
    for segment, dilation in pairs:
        idx = dilated_indices(n, segment, dilation, heads, q.device)
        qs, ks, vs = (_gather_tokens(t, idx) for t in (q, k, v))
        logits = (qs * scale) @ ks.transpose(-2, -1)
        if bias is not None:
            logits = logits + _gather_bias(bias, idx)
        lse = logits.float().logsumexp(dim=-1, keepdim=True)
        out = (torch.exp(logits.float() - lse).to(vs.dtype)) @ vs
        outputs.append(scatter_tokens(out, idx, n, 0.0))
        log_denominators.append(scatter_tokens(lse, idx, n, float("-inf")))
    weights = torch.stack(log_denominators).softmax(dim=0).nan_to_num(0.0)
    return (weights.to(q.dtype) * torch.stack(outputs)).sum(dim=0)
