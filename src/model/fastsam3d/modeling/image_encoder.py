"""3D ViT image encoder of FastSAM3D / SAM-Med3D: (B, 1, 128, 128, 128) -> (B, C, 8, 8, 8).

Two block wirings share one parameter layout (so a wrong choice loads silently):

- ``"sam_med3d"`` (pre-norm, the turbo teacher): ``x = x + Attn(LN1(x)); x = x + MLP(LN2(x))``.
- ``"fastsam3d"`` (the released student): ``x = x + Attn(LN1(x)); y = LN2(x); y + MLP(y)``;
  attention-free blocks compute ``y = LN2(x); y + MLP(y)`` and drop ``x``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RelPosAttention3D
from .common import ChannelLayerNorm, MLPBlock, channel_norm, strided_conv_channels_last
from .quantized import bf16_linear, gemm, int8_product, quantize_passes
from .window_fold import folded_window_attention

BLOCK_STYLES = ("fastsam3d", "sam_med3d")


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """The 27 neighbours of each token (zero padding 1), (B, D, H, W, C) -> (..., 27 * C),
    neighbour-major so that every copy writes whole channel rows (see :func:`_neighbour_kernel`).
    """
    batch, d, h, w, c = x.shape
    padded = F.pad(x, (0, 0, 1, 1, 1, 1, 1, 1))
    shifted = [
        padded[:, i : i + d, j : j + h, k : k + w]
        for i in range(3)
        for j in range(3)
        for k in range(3)
    ]
    return torch.stack(shifted, dim=-2).reshape(batch, d, h, w, 27 * c)


def _neighbour_kernel(conv: nn.Conv3d) -> torch.Tensor:
    """A 3x3x3 convolution's kernel as a view (C_out, 3, 3, 3, C_in): flattened, it matches
    :func:`_neighbours`' order (the int8 path flattens it only when it requantises)."""
    return conv.weight.permute(0, 2, 3, 4, 1)


def neck_channels_last(neck: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The neck on channels-last tokens (B, G, G, G, C) as matrix products -> (B, C', G, G, G).

    The 1x1 convolution is a linear map; the 3x3x3 one gathers its 27 shifted neighbours
    (zero padding 1) and multiplies once by the flattened kernel. In int8 (see
    :func:`.quantized.quantize_int8`) the tokens are quantised with one scale per pass before
    the gathering. In half precision on CUDA, cuDNN's channels-last convolution reads the
    neighbours in place instead (batch 64 on an H200: 0.35 ms against 1.7 ms with the 27-fold
    copy); fp32 keeps the matrix product, whose sums stay exact fp32 (cuDNN would use TF32).
    """
    conv1, norm1, conv3, norm3 = neck
    x = channel_norm(gemm(x, conv1, conv1.weight), norm1)
    batch, d, h, w, c = x.shape
    int8 = getattr(conv3, "int8_weight", None) if x.device.type == "cpu" else None
    half = getattr(conv3, "bf16_weight", None) if x.device.type == "cpu" else None
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        x = F.conv3d(x.permute(0, 4, 1, 2, 3), conv3.weight, padding=1).permute(0, 2, 3, 4, 1)
    elif half is not None:  # gathered in bf16: half the copy
        columns = _neighbours(x.bfloat16()).view(-1, 27 * c)
        x = bf16_linear(columns, _neighbour_kernel(conv3), None, half, conv3.weight)
        x = x.view(batch, d, h, w, -1).to(norm3.weight.dtype)
    elif int8 is None:
        x = gemm(_neighbours(x), conv3, _neighbour_kernel(conv3))
    else:
        weight = _neighbour_kernel(conv3)
        parts = quantize_passes(x.reshape(1, -1).float(), int8.passes)
        columns = [(_neighbours(q.view(x.shape)).view(-1, 27 * c), scale) for q, scale in parts]
        x = sum(int8_product(*p, weight, None, int8, conv3.weight) for p in columns)
        x = x.view(batch, d, h, w, -1).to(norm3.weight.dtype)
    x = channel_norm(x, norm3)
    return x.permute(0, 4, 1, 2, 3)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad (B, D, H, W, C) to multiples of ``window`` and cut it into windows.

    Returns:
        Windows (B * nW, window, window, window, C) and the padded size (Dp, Hp, Wp).
    """
    batch, d, h, w, c = x.shape
    pd, ph, pw = ((window - s % window) % window for s in (d, h, w))
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(batch, dp // window, window, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return windows, (dp, hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding away."""
    dp, hp, wp = padded
    c = windows.shape[-1]
    batch = windows.shape[0] // ((dp // window) * (hp // window) * (wp // window))
    x = windows.view(batch, dp // window, hp // window, wp // window, window, window, window, c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, dp, hp, wp, c)
    d, h, w = size
    return x[:, :d, :h, :w].contiguous()


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> channels-last tokens (B, D', H', W', C).

    ``as_gemm`` computes the strided convolution as one matrix product over flattened
    patches (same sums in another order; much faster than 3D convolution kernels).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_size = patch_size
        self.as_gemm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_gemm:
            return self.proj(x).permute(0, 2, 3, 4, 1)
        return strided_conv_channels_last(x.permute(0, 2, 3, 4, 1), self.proj)


class Block3D(nn.Module):
    """Transformer block with attention (global when ``window_size == 0``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        grid_size: int,
        window_size: int,
        block_style: str,
        sparse_pairs: tuple[tuple[int, int], ...] = (),
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        sparse = bool(sparse_pairs) and not window_size
        self.attn = RelPosAttention3D(
            dim,
            num_heads,
            window_size or grid_size,
            backend="sparse" if sparse else "math",
            sparse_pairs=sparse_pairs if sparse else (),
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.block_style = block_style

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention branch on LN1(x); windowed blocks attend zero-padded windows.

        Outside the "math" reference backend, a single padded window is computed exactly
        with the padding folded into one virtual key (:mod:`.window_fold`).
        """
        x = self.norm1(x)
        if not self.window_size:
            return self.attn(x)
        size = x.shape[1:4]
        if self.attn.backend != "math" and all(s <= self.window_size for s in size):
            return folded_window_attention(self.attn, x)
        windows, padded = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        if self.block_style == "sam_med3d":
            return x + self.mlp(self.norm2(x))
        y = self.norm2(x)
        return y + self.mlp(y)


class AttentionFreeBlock3D(nn.Module):
    """FastSAM3D's attention-free block: ``y = LN2(x); y + MLP(y)`` (keys norm2, mlp)."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(x)
        return y + self.mlp(y)


class ImageEncoderViT3D(nn.Module):
    """ViT encoder with a conv neck; keys match the official ``image_encoder.*`` layout.

    Args:
        img_size: input cube side (128).
        patch_size: patch side (16), giving a grid of img_size // patch_size per axis.
        in_chans: input channels (1).
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width / embed_dim.
        out_chans: neck output channels (= prompt / decoder width).
        attention_free_blocks: how many leading blocks have no attention.
        window_size: window side of windowed blocks (0: every block global).
        global_attn_indexes: absolute indices of global-attention blocks when windowed.
        block_style: ``"fastsam3d"`` or ``"sam_med3d"`` wiring.
        sparse_attention: (segment, dilation) pairs; non-empty makes global blocks use the
            paper's sparse dilated attention instead of dense.
    """

    def __init__(
        self,
        *,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        attention_free_blocks: int = 0,
        window_size: int = 0,
        global_attn_indexes: tuple[int, ...] = (),
        block_style: str = "sam_med3d",
        sparse_attention: tuple[tuple[int, int], ...] = (),
    ) -> None:
        super().__init__()
        if block_style not in BLOCK_STYLES:
            raise ValueError(f"unknown block_style {block_style!r}; choose from {BLOCK_STYLES}")
        grid = img_size // patch_size
        self.img_size = img_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        blocks = []
        for i in range(depth):
            if i < attention_free_blocks:
                blocks.append(AttentionFreeBlock3D(embed_dim, mlp_ratio))
                continue
            window = 0 if i in global_attn_indexes else window_size
            blocks.append(
                Block3D(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    grid,
                    window,
                    block_style,
                    sparse_attention,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            ChannelLayerNorm(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            ChannelLayerNorm(out_chans),
        )

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedding plus every block's output.

        Returns:
            The neck output (B, out_chans, G, G, G) and the list of block outputs, each
            channels-last (B, G, G, G, embed_dim), in block order.
        """
        x = self.patch_embed(x) + self.pos_embed
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return self.apply_neck(x), outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.apply_neck(x)

    def apply_neck(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last tokens -> (B, out_chans, G, G, G); GEMM path with ``as_gemm``."""
        if self.patch_embed.as_gemm:
            return neck_channels_last(self.neck, x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
