"""3D prompt encoder: points and low-res mask logits -> sparse and dense embeddings.

Official quirks kept for weight parity: the Fourier encoding is ``[sin, cos, sin]``; the dense
grid encodes cell (i, j, k) as ``((j+.5)/G, (i+.5)/G, (k+.5)/G)`` (first two axes swapped), while
points are encoded in their own (x, y, z) order; a pad point (label -1) is appended when no box
is given.
"""

import math

import torch
from torch import nn

from .common import ChannelLayerNorm, channel_norm_gelu, strided_conv_channels_last
from .derived import DerivedTensors
from .fast_path import in_parallel
from .quantized import gemm


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of coordinates in [0, 1]^3 (buffer is part of the checkpoint)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) in [0, 1] -> (..., 3 * num_pos_feats) as [sin, cos, sin]."""
        matrix = self.positional_encoding_gaussian_matrix
        t = 2 * math.pi * ((2 * coords.to(matrix.dtype) - 1) @ matrix)
        sin = torch.sin(t)
        return torch.cat([sin, torch.cos(t), sin], dim=-1)

    def dense(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Encoding of a grid, (3 * num_pos_feats, X, Y, Z), with the official axis swap."""
        matrix = self.positional_encoding_gaussian_matrix
        axes = [(torch.arange(n, device=matrix.device, dtype=matrix.dtype) + 0.5) / n for n in size]
        a, b, c = torch.meshgrid(*axes, indexing="ij")
        return self.encode(torch.stack([b, a, c], dim=-1)).permute(3, 0, 1, 2)

    def points(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """Voxel coordinates (B, N, 3) of the input cube -> (B, N, 3 * num_pos_feats)."""
        coords = coords + 0.5
        normalised = [coords[..., axis] / size for axis, size in enumerate(image_size)]
        return self.encode(torch.stack(normalised, dim=-1))


def mask_downscaling(conv: type[nn.Module], mask_in_chans: int, embed_dim: int) -> nn.Sequential:
    """SAM's mask path (keys ``mask_downscaling.*``): two stride-2 convolutions, each followed
    by a channel LayerNorm and GELU, then a 1x1 convolution to the prompt width."""
    return nn.Sequential(
        conv(1, mask_in_chans // 4, kernel_size=2, stride=2),
        ChannelLayerNorm(mask_in_chans // 4),
        nn.GELU(),
        conv(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
        ChannelLayerNorm(mask_in_chans),
        nn.GELU(),
        conv(mask_in_chans, embed_dim, kernel_size=1),
    )


def embed_point_labels(
    encoder: nn.Module, points: torch.Tensor, labels: torch.Tensor, pad: bool, encode
) -> torch.Tensor:
    """SAM's point embedding: positional code (``encode(points)``) plus the label's learned
    embedding; label -1 (the pad point appended when ``pad``) keeps only ``not_a_point_embed``."""
    if pad:
        points = torch.cat([points, points.new_zeros(points.shape[0], 1, points.shape[-1])], 1)
        labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
    embedding = encode(points.float())
    labels = labels[..., None]
    embedding = torch.where(labels == -1, torch.zeros_like(embedding), embedding)
    embedding = embedding + (labels == -1) * encoder.not_a_point_embed.weight
    embedding = embedding + (labels == 0) * encoder.point_embeddings[0].weight
    return embedding + (labels == 1) * encoder.point_embeddings[1].weight


class PromptEncoder3D(nn.Module):
    """Embeds point prompts and mask logits for :class:`MaskDecoder3D`.

    Args:
        embed_dim: prompt width (divisible by 3).
        image_embedding_size: token grid (8, 8, 8).
        input_image_size: model input cube (128, 128, 128).
        mask_in_chans: hidden channels of the mask downscaling path.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 384,
        image_embedding_size: tuple[int, int, int] = (8, 8, 8),
        input_image_size: tuple[int, int, int] = (128, 128, 128),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = mask_downscaling(nn.Conv3d, mask_in_chans, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self.downscale_as_gemm = False
        self.narrow_as_gemm = False
        self.fast_points = False
        self.parallel_streams = False
        self.fused_norms = False
        self._point_tables = DerivedTensors()

    @property
    def mask_input_size(self) -> tuple[int, int, int]:
        """Side of the mask logits this encoder takes: 4 x the token grid (32^3)."""
        return tuple(4 * s for s in self.image_embedding_size)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the token grid, (1, embed_dim, 8, 8, 8)."""
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if self.fast_points:
            return self._embed_points_fast(points, labels, pad)
        size = self.input_image_size
        return embed_point_labels(
            self, points, labels, pad, lambda p: self.pe_layer.points(p, size)
        )

    def _point_code(self) -> tuple[torch.Tensor, ...]:
        """The point encoding as one affine map and a sine, and the label embeddings.

        ``2 pi (2 (p + 0.5) / size - 1) @ G`` is ``p @ W + b``; its three copies (the middle
        one shifted by pi / 2, so that its sine is the cosine) give ``[sin, cos, sin]``.
        Returns W (3, 3F), b (3F), the (3, C) table of label -1, 0 and 1's embeddings and
        (3, 1) whether each label keeps the positional code (the pad label -1 does not).
        """
        matrix = self.pe_layer.positional_encoding_gaussian_matrix.double()
        size = torch.tensor(self.input_image_size, dtype=torch.float64, device=matrix.device)
        weight = (4 * math.pi / size)[:, None] * matrix
        bias = 2 * math.pi * ((1 / size - 1) @ matrix)
        dtype = self.no_mask_embed.weight.dtype
        code_bias = torch.cat([bias, bias + math.pi / 2, bias])
        table = torch.cat(
            [self.not_a_point_embed.weight, *(e.weight for e in self.point_embeddings)]
        )
        has_code = torch.tensor([[0.0], [1.0], [1.0]], dtype=dtype, device=table.device)
        return weight.repeat(1, 3).to(dtype), code_bias.to(dtype), table, has_code

    def _embed_points_fast(
        self, points: torch.Tensor, labels: torch.Tensor, pad: bool
    ) -> torch.Tensor:
        """``embed_point_labels`` in a few kernels: one product and one sine for the positional
        code, one lookup for the label embeddings (equal up to fp32 rounding)."""
        sources = [self.pe_layer.positional_encoding_gaussian_matrix, self.not_a_point_embed.weight]
        sources += [e.weight for e in self.point_embeddings]
        weight, bias, table, has_code = self._point_tables.get(sources, self._point_code)
        batch, count = labels.shape
        code = torch.addmm(bias, points.reshape(-1, 3).to(weight.dtype), weight).sin_()
        code = code.view(batch, count, -1)
        index = labels + 1
        embedding = torch.addcmul(table[index], code, has_code[index])
        if not pad:
            return embedding
        return torch.cat([embedding, table[:1].expand(batch, 1, -1)], dim=1)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: (coords, labels): coords (B, N, 3) voxel indices of the model grid in tensor
                dims (2, 3, 4) order; labels (B, N), 1 = positive, 0 = negative, -1 = padding.
            boxes: unsupported by the released weights; must be None.
            masks: previous low-res logits (B, 1, 32, 32, 32), or None for ``no_mask_embed``.

        Returns:
            sparse (B, N + 1, embed_dim) and dense (B, embed_dim, 8, 8, 8) embeddings.
        """
        if boxes is not None:
            raise ValueError("box prompts are not supported by the 3D prompt encoder")
        weight = self.no_mask_embed.weight
        batch = (
            points[0].shape[0] if points is not None else masks.shape[0] if masks is not None else 1
        )
        if points is None:
            sparse = weight.new_empty((batch, 0, self.embed_dim))
        else:
            sparse = self._embed_points(*points, pad=boxes is None)
        if masks is None:
            dense = weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        elif self.parallel_streams and masks.is_cuda and points is not None:
            dense, sparse = in_parallel(
                lambda: self.downscale(masks), lambda: self._embed_points(*points, pad=True)
            )
        else:
            dense = self.downscale(masks)
        return sparse, dense

    def downscale(self, masks: torch.Tensor) -> torch.Tensor:
        """``mask_downscaling`` (32^3 -> 8^3); with ``downscale_as_gemm`` the last (1x1)
        convolution is a matrix product with a channels-last result, and with
        ``narrow_as_gemm`` the two narrow strided convolutions before it too (fewer kernels on
        a GPU; on a CPU they are faster as convolutions), their LayerNorms and GELUs as one
        Triton kernel each with ``fused_norms``."""
        if not self.downscale_as_gemm:
            return self.mask_downscaling(masks)
        if self.narrow_as_gemm:
            conv1, norm1, _, conv2, norm2, _, _ = self.mask_downscaling
            x = strided_conv_channels_last(masks.permute(0, 2, 3, 4, 1), conv1)
            x = channel_norm_gelu(x, norm1, self.fused_norms)
            x = channel_norm_gelu(strided_conv_channels_last(x, conv2), norm2, self.fused_norms)
        else:
            x = self.mask_downscaling[:-1](masks).permute(0, 2, 3, 4, 1)
        conv = self.mask_downscaling[-1]
        return gemm(x, conv, conv.weight, conv.bias).permute(0, 4, 1, 2, 3)
