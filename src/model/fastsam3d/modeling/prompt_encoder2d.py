"""2D SAM prompt encoder (LiteMedSAM): points, boxes and mask logits -> prompt embeddings.

Coordinates are (x, y) = (column, row) in pixels of the model input (256^2); half a pixel is
added before the Fourier encoding (pixel centres), as in SAM. Points get a pad point (label -1)
when no box is given; a box adds two corner tokens.
"""

import math

import torch
from torch import nn

from .prompt_encoder import embed_point_labels, mask_downscaling


class PositionEmbeddingRandom2D(nn.Module):
    """Random Fourier features ``[sin, cos]`` of (x, y) in [0, 1]^2 (buffer is in the file)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) in [0, 1] -> (..., 2 * num_pos_feats)."""
        matrix = self.positional_encoding_gaussian_matrix
        t = 2 * math.pi * ((2 * coords.to(matrix.dtype) - 1) @ matrix)
        return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)

    def dense(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the (H, W) grid's cell centres, (2 * num_pos_feats, H, W)."""
        matrix = self.positional_encoding_gaussian_matrix
        h, w = size
        y = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        x = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        return self.encode(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)

    def pixels(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (..., 2) as (x, y) of an (H, W) image -> encodings."""
        coords = coords + 0.5
        return self.encode(
            torch.stack([coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], -1)
        )


class PromptEncoder2D(nn.Module):
    """Embeds point, box and mask prompts for :class:`MaskDecoder2D`.

    Args:
        embed_dim: prompt width (even).
        image_embedding_size: token grid (64, 64).
        input_image_size: model input (256, 256).
        mask_in_chans: hidden channels of the mask downscaling path.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (256, 256),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom2D(embed_dim // 2)
        # 0 negative point, 1 positive point, 2 / 3 top-left / bottom-right box corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = mask_downscaling(nn.Conv2d, mask_in_chans, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the token grid, (1, embed_dim, 64, 64)."""
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        size = self.input_image_size
        return embed_point_labels(
            self, points, labels, pad, lambda p: self.pe_layer.pixels(p, size)
        )

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.pixels(boxes.float().reshape(-1, 2, 2), self.input_image_size)
        corners[:, 0] += self.point_embeddings[2].weight[0]
        corners[:, 1] += self.point_embeddings[3].weight[0]
        return corners

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: (coords, labels): coords (B, N, 2) as (x, y) input pixels; labels (B, N),
                1 = positive, 0 = negative, -1 = padding.
            boxes: (B, 4) as (x0, y0, x1, y1) input pixels, or None.
            masks: low-res logits (B, 1, 256, 256), or None for ``no_mask_embed``.

        Returns:
            sparse (B, N [+1] [+2], embed_dim) and dense (B, embed_dim, 64, 64) embeddings.
        """
        weight = self.no_mask_embed.weight
        batch = next(
            (t.shape[0] for t in (points[0] if points else None, boxes, masks) if t is not None), 1
        )
        sparse = weight.new_empty((batch, 0, self.embed_dim))
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(*points, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense
