"""3D mask decoder: image embedding + prompt embeddings -> 32^3 mask logits and IoU scores."""

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, ChannelLayerNorm
from .quantized import gemm


def conv_transpose_2x(x: torch.Tensor, conv: nn.ConvTranspose3d) -> torch.Tensor:
    """A kernel-2, stride-2 transposed 3D convolution as one matrix product.

    Each input voxel writes its own 2x2x2 output block (no overlap), so the layer is a linear
    map per voxel followed by a pixel shuffle.
    """
    batch, chans, d, h, w = x.shape
    out = conv.weight.shape[1]
    y = x.permute(0, 2, 3, 4, 1).reshape(-1, chans) @ conv.weight.reshape(chans, out * 8)
    y = y.view(batch, d, h, w, out, 2, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return y.reshape(batch, out, 2 * d, 2 * h, 2 * w) + conv.bias.view(1, -1, 1, 1, 1)


def conv_transpose_blocks(x: torch.Tensor, conv: nn.ConvTranspose3d) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution on channels-last (..., C_in) ->
    (..., 8, C_out): each voxel's 2x2x2 output block, sub-voxels in (d, h, w) order."""
    chans, out = conv.weight.shape[:2]
    weight = conv.weight.reshape(chans, out, 8).transpose(1, 2).reshape(chans, 8 * out)
    y = gemm(x, conv, weight.t(), conv.bias.repeat(8))
    return y.view(*x.shape[:-1], 8, out)


class SamMaskDecoder(nn.Module):
    """The parameters every SAM-style decoder shares (keys match ``mask_decoder.*``): IoU and
    mask tokens, a two-step transposed-convolution upscaling, hypernetwork MLPs and the IoU head.

    Args:
        transformer_dim: token / image channel width.
        transformer: the two-way transformer module.
        conv_transpose: ``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``.
        num_multimask_outputs: masks predicted besides the single-mask output.
        iou_head_depth: layers of the IoU head.
        iou_head_hidden_dim: hidden width of the IoU head.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        conv_transpose: type[nn.Module],
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            conv_transpose(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            ChannelLayerNorm(transformer_dim // 4),
            nn.GELU(),
            conv_transpose(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )


class MaskDecoder3D(SamMaskDecoder):
    """The 3D decoder (:class:`SamMaskDecoder` with 3D transposed convolutions).

    ``upscale_as_gemm`` (the fast path, set by ``Sam3D.prepare_inference``) runs the
    upscaling as matrix products on channels-last tokens and the transformer ``folded``.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(conv_transpose=nn.ConvTranspose3d, **kwargs)
        self.upscale_as_gemm = False

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Args:
            image_embeddings: (B or 1, C, 8, 8, 8).
            image_pe: (1, C, 8, 8, 8) from ``prompt_encoder.get_dense_pe()``.
            sparse_prompt_embeddings: (B, N, C).
            dense_prompt_embeddings: (B, C, 8, 8, 8).
            multimask_output: return masks 1..3 instead of mask 0.

        Returns:
            Low-res logits (B, 1 or 3, 32, 32, 32) and IoU predictions (B, 1 or 3).
        """
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, chosen
        )
        return masks if self.upscale_as_gemm else masks[:, chosen], iou[:, chosen]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        chosen: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks and IoU scores; with ``upscale_as_gemm`` only the
        ``chosen`` masks (the others are not needed)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings
        if src.shape[0] != batch:
            src = src.repeat_interleave(batch, dim=0)
        # same sum; its layout follows the first operand (channels-last from ``downscale``)
        src = dense_prompt_embeddings + src
        pos_src = image_pe.expand(batch, -1, -1, -1, -1)
        b, c, x, y, z = src.shape
        hs, src = self.transformer(src, pos_src, tokens, folded=self.upscale_as_gemm)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        mlps = enumerate(self.output_hypernetworks_mlps)
        if self.upscale_as_gemm:
            mlps = list(mlps)[chosen]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in mlps], dim=1)
        if self.upscale_as_gemm:
            masks = self.masks_channels_last(src, hyper_in, (x, y, z))
        else:
            upscaled = self.upscale(src.transpose(1, 2).reshape(b, c, x, y, z))
            b, c, x, y, z = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, c, x * y * z)).reshape(b, -1, x, y, z)
        return masks, self.iou_prediction_head(iou_token_out)

    def masks_channels_last(
        self, tokens: torch.Tensor, hyper_in: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """Upscaling and mask product on the image tokens (B, N, C) without channels-first
        copies: each token's 4x4x4 block as matrix products, one shuffle of the small masks."""
        up1, norm, act1, up2, act2 = self.output_upscaling
        batch = tokens.shape[0]
        y = conv_transpose_blocks(tokens, up1)
        y = act2(
            conv_transpose_blocks(
                act1(F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, norm.eps)), up2
            )
        )
        masks = y.reshape(batch, -1, y.shape[-1]) @ hyper_in.transpose(1, 2)
        x, h, w = grid
        # two 2x shuffles: one 11-d permute is several times slower than both
        masks = masks.view(batch, x, h, w, 2, 2, 2, 8, -1).permute(0, 8, 1, 4, 2, 5, 3, 6, 7)
        masks = masks.reshape(batch, -1, 2 * x, 2 * h, 2 * w, 2, 2, 2)
        masks = masks.permute(0, 1, 2, 5, 3, 6, 4, 7)
        return masks.reshape(batch, -1, 4 * x, 4 * h, 4 * w)

    def upscale(self, src: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` (8^3 -> 32^3); as matrix products with ``upscale_as_gemm``."""
        if not self.upscale_as_gemm:
            return self.output_upscaling(src)
        up1, norm, act1, up2, act2 = self.output_upscaling
        return act2(conv_transpose_2x(act1(norm(conv_transpose_2x(src, up1))), up2))
