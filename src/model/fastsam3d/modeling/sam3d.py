"""Sam3D container: wires the encoder, prompt encoder and decoder; fast entry points."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .configs import ModelConfig


class Sam3D(nn.Module):
    """Image encoder + prompt encoder + mask decoder in the official state-dict layout.

    Args:
        image_encoder: (B, 1, 128, 128, 128) -> (B, C, 8, 8, 8).
        prompt_encoder: :class:`PromptEncoder3D`.
        mask_decoder: :class:`MaskDecoder3D`.
        config: the configuration it was built from.
    """

    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config
        self.weights_id = f"random-{id(self):x}"
        self._dense_pe_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def signature(self) -> str:
        """Identifies the configuration and weights (for embedding cache keys)."""
        name = self.config.name if self.config is not None else "custom"
        return f"{name}:{self.weights_id}"

    @property
    def device(self) -> torch.device:
        return self.image_encoder.pos_embed.device

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    def dense_pe(self) -> torch.Tensor:
        """``prompt_encoder.get_dense_pe()``, computed once per weights / device / dtype."""
        matrix = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (matrix.device, matrix.dtype, matrix.data_ptr(), matrix._version)
        if self._dense_pe_cache is None or self._dense_pe_cache[0] != key:
            self._dense_pe_cache = (key, self.prompt_encoder.get_dense_pe())
        return self._dense_pe_cache[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed crops (B, 1, 128, 128, 128) -> (B, C, 8, 8, 8)."""
        return self.image_encoder(x.to(self.device, self.image_encoder.pos_embed.dtype))

    def decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode one set of prompts per batch element.

        Args:
            embedding: (B, C, 8, 8, 8) from :meth:`encode`.
            points: (B, N, 3) voxel coordinates of the 128^3 model grid (tensor dims 2, 3, 4).
            labels: (B, N), 1 = positive, 0 = negative.
            mask_input: previous low-res logits (B, 1, 32, 32, 32); None means a zero volume,
                as the official interactive loop feeds on the first click.
            multimask_output: return the three multimask outputs instead of one.

        Returns:
            low_res logits (B, M, 32, 32, 32), iou (B, M) and the thresholded mask
            (B, M, 128, 128, 128) bool, with M = 3 if ``multimask_output`` else 1.
        """
        device, dtype = self.device, embedding.dtype
        batch = points.shape[0]
        if mask_input is None:
            mask_input = torch.zeros(
                (batch, 1, *self.prompt_encoder.mask_input_size), device=device, dtype=dtype
            )
        sparse, dense = self.prompt_encoder(
            points=(points.to(device), labels.to(device)), boxes=None, masks=mask_input.to(device)
        )
        low_res, iou = self.mask_decoder(
            image_embeddings=embedding.to(device),
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        return low_res, iou, self.upsample_logits(low_res) > self.mask_threshold

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """Trilinear (align_corners=False) upsampling of 32^3 logits to the 128^3 input grid."""
        return F.interpolate(
            low_res, size=(self.image_size,) * 3, mode="trilinear", align_corners=False
        )
