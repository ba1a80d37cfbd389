"""TinyViT image encoder as configured by LiteMedSAM (2D, 256^2 input -> 256 x 64^2 embedding).

Layout of the released ``lite_medsam.pth`` (keys ``image_encoder.*``): a stride-1 1x1
convolutional stem, one stage of MBConv blocks at full resolution, then three stages of windowed
attention blocks (per-head bias per absolute window offset, a depthwise 3x3 convolution between
attention and MLP); each stage but the last ends in a convolutional patch merging (stride 2, or 1
where ``merge_strides`` says so); a SAM neck maps to 256 channels. Windows that do not tile the
grid are zero-padded at the bottom/right and the padding takes part in attention as keys (as
released). Convolution + BatchNorm pairs are kept unfused (keys ``c`` and ``bn``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ChannelLayerNorm


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm (keys ``c``, ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False, groups=groups)
        )
        self.add_module("bn", nn.BatchNorm2d(cout))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU after each."""

    def __init__(self, dim: int, expand: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise conv with ``stride``, 1x1 conv (GELU between); (B, C, H, W)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Pre-norm multi-head attention inside a ``window`` x ``window`` window with offset biases.

    The bias of a query/key pair is ``attention_biases[head, |dy| * window + |dx|]``.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        offsets = (rows[:, None] - rows[None]).abs() * window + (cols[:, None] - cols[None]).abs()
        self.register_buffer("bias_index", offsets, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens of N = window^2 -> (B, N, C)."""
        batch, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, n, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise conv (``local_conv``), MLP; input/output (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = nn.Module()
        self.mlp.norm = nn.LayerNorm(dim)
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        batch, h, w, c = x.shape
        size = self.window
        pad_h, pad_w = -h % size, -w % size
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // size, (w + pad_w) // size
        x = x.view(batch, nh, size, nw, size, c).transpose(2, 3).reshape(-1, size * size, c)
        x = self.attn(x).view(batch, nh, nw, size, size, c).transpose(2, 3)
        return x.reshape(batch, nh * size, nw * size, c)[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windows(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.mlp.norm(x))))


class Stage(nn.Module):
    """Blocks then an optional patch merging (keys ``blocks.{i}``, ``downsample``)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None, tokens: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C', H', W')."""
        if self.tokens:
            x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        if self.tokens:
            x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT-5M with LiteMedSAM's stem: (B, 3, S, S) in [0, 1] -> (B, out_chans, S/4, S/4).

    Args:
        embed_dims: channels of the four stages.
        depths: blocks per stage (stage 0 is MBConv).
        num_heads: attention heads of stages 1-3 (index 0 unused).
        window_sizes: attention windows of stages 1-3 (index 0 unused).
        merge_strides: strides of the patch merging after stages 0, 1, 2.
        mlp_ratio: MLP width over the stage width.
        mbconv_expand: MBConv hidden width over the stage width.
        out_chans: neck output channels.
    """

    def __init__(
        self,
        *,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        merge_strides: tuple[int, ...] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand: float = 4.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        first = embed_dims[0]
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(
            ConvBN(3, first // 2), nn.GELU(), ConvBN(first // 2, first)
        )
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            merge = (
                PatchMerging(dim, embed_dims[i + 1], merge_strides[i])
                if i < len(embed_dims) - 1
                else None
            )
            if i == 0:
                blocks = [MBConv(dim, mbconv_expand) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(dim, num_heads[i], window_sizes[i], mlp_ratio)
                    for _ in range(depth)
                ]
            self.layers.append(Stage(blocks, merge, tokens=i > 0))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            ChannelLayerNorm(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            ChannelLayerNorm(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.seq(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
