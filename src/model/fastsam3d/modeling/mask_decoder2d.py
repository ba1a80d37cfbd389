"""2D SAM mask decoder (LiteMedSAM): image + prompt embeddings -> 4x upsampled mask logits.

The two-way transformer is the one of the 3D decoder (it works on flattened tokens of any grid).
"""

import torch
from torch import nn

from .mask_decoder import SamMaskDecoder


class MaskDecoder2D(SamMaskDecoder):
    """The 2D decoder (:class:`.mask_decoder.SamMaskDecoder` with 2D transposed convolutions)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(conv_transpose=nn.ConvTranspose2d, **kwargs)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, 1 or 3, 4H, 4W) and IoU predictions (B, 1 or 3).

        ``image_embeddings`` (B or 1, C, H, W); ``image_pe`` (1, C, H, W); sparse (B, N, C);
        dense (B, C, H, W).
        """
        batch = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings
        if src.shape[0] != batch:
            src = src.repeat_interleave(batch, dim=0)
        src = src + dense_prompt_embeddings
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(batch, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou = self.iou_prediction_head(hs[:, 0])
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]
