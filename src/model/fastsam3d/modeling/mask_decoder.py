"""3D mask decoder: image embedding + prompt embeddings -> 32^3 mask logits and IoU scores."""

import torch
from torch import nn

from .common import MLP, SCRATCH, ChannelLayerNorm, channel_norm_gelu
from .derived import DerivedTensors
from .fast_path import in_parallel
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


def block_kernel(conv: nn.ConvTranspose3d) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel-2, stride-2 transposed convolution as a (8 * C_out, C_in) matrix, sub-voxels
    in (d, h, w) order, and its (8 * C_out) bias."""
    chans, out = conv.weight.shape[:2]
    weight = conv.weight.reshape(chans, out, 8).transpose(1, 2).reshape(chans, 8 * out)
    return weight.t().contiguous(), conv.bias.repeat(8)


def conv_transpose_blocks(
    x: torch.Tensor, conv: nn.ConvTranspose3d, cache: DerivedTensors
) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution on channels-last (..., C_in) ->
    (..., 8, C_out): each voxel's 2x2x2 output block; ``cache`` keeps its :func:`block_kernel`."""
    weight, bias = cache.get(conv.parameters(), lambda: block_kernel(conv))
    y = gemm(x, conv, weight, bias)
    return y.view(*x.shape[:-1], 8, conv.weight.shape[1])


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
    upscaling as matrix products on channels-last tokens; ``attention_form`` says how the
    transformer's attention computes (:data:`.transformer.FORMS`); ``parallel_streams`` (CUDA)
    runs the upscaling on a second stream beside the last attention and the heads, and
    ``fused_norms`` its LayerNorm and GELU as one Triton kernel; ``reuse_buffers`` (CPU) runs
    the second upscaling and its GELU in a buffer kept between clicks (:meth:`masks_in_buffer`;
    inference only, the buffer is written in place).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(conv_transpose=nn.ConvTranspose3d, **kwargs)
        self.upscale_as_gemm = False
        self.attention_form = "projected"
        self._block_kernels = (DerivedTensors(), DerivedTensors())
        self.parallel_streams = False
        self.fused_norms = False
        self.reuse_buffers = False

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
        output_tokens = (self.iou_token.weight, self.mask_tokens.weight)
        tokens = torch.cat(
            [*(t.expand(batch, -1, -1) for t in output_tokens), sparse_prompt_embeddings], dim=1
        )
        src = image_embeddings
        if src.shape[0] != batch:
            src = src.repeat_interleave(batch, dim=0)
        # same sum; its layout follows the first operand (channels-last from ``downscale``)
        src = dense_prompt_embeddings + src
        pos_src = image_pe.expand(batch, -1, -1, -1, -1)
        b, c, x, y, z = src.shape
        form = self.attention_form
        queries, src, src_pe = self.transformer.blocks(src, pos_src, tokens, form)

        def token_outputs() -> tuple[torch.Tensor, torch.Tensor]:
            hs = self.transformer.final_attention(queries, src, src_pe, tokens, form)
            return self.heads(hs, chosen if self.upscale_as_gemm else slice(None))

        if not self.upscale_as_gemm:
            hyper_in, iou = token_outputs()
            upscaled = self.upscale(src.transpose(1, 2).reshape(b, c, x, y, z))
            b, c, x, y, z = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, c, x * y * z)).reshape(b, -1, x, y, z)
            return masks, iou
        if self.reuse_buffers and src.device.type == "cpu" and not torch.is_grad_enabled():
            hyper_in, iou = token_outputs()
            return self.masks_in_buffer(self.upscale_once(src), hyper_in, (x, y, z)), iou
        if self.parallel_streams and src.is_cuda:
            upscaled, (hyper_in, iou) = in_parallel(lambda: self.upscale_tokens(src), token_outputs)
        else:
            upscaled = self.upscale_tokens(src)
            hyper_in, iou = token_outputs()
        return self.masks_from_upscaled(upscaled, hyper_in, (x, y, z)), iou

    def heads(self, hs: torch.Tensor, chosen: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``chosen`` masks' hypernetwork outputs (B, M, C // 8) and all IoU scores from
        the transformer's tokens; on two CUDA streams with ``parallel_streams``."""
        mask_tokens = hs[:, 1 : 1 + self.num_mask_tokens]
        mlps = list(enumerate(self.output_hypernetworks_mlps))[chosen]

        def hyper_in() -> torch.Tensor:
            return torch.stack([mlp(mask_tokens[:, i]) for i, mlp in mlps], dim=1)

        def iou() -> torch.Tensor:
            return self.iou_prediction_head(hs[:, 0])

        if self.parallel_streams and hs.is_cuda:  # the IoU head is off the critical path
            scores, hyper = in_parallel(iou, hyper_in)
            return hyper, scores
        return hyper_in(), iou()

    def upscale_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` of the image tokens (B, N, C) without channels-first copies:
        each token's 4x4x4 block as matrix products -> (B, N * 64, C // 8)."""
        up2, act2 = self.output_upscaling[3:]
        y = act2(conv_transpose_blocks(self.upscale_once(tokens), up2, self._block_kernels[1]))
        return y.reshape(tokens.shape[0], -1, y.shape[-1])

    def upscale_once(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first upscaling with its LayerNorm and GELU: (B, N, C) -> (B, N, 8, C // 4),
        each token's 2x2x2 block."""
        up1, norm = self.output_upscaling[:2]
        y = conv_transpose_blocks(tokens, up1, self._block_kernels[0])
        return channel_norm_gelu(y, norm, self.fused_norms)

    def masks_from_upscaled(
        self, upscaled: torch.Tensor, hyper_in: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """The mask product of :meth:`upscale_tokens`' output and :func:`shuffle_masks`."""
        return shuffle_masks(upscaled @ hyper_in.transpose(1, 2), grid)

    def masks_in_buffer(
        self, upscaled_once: torch.Tensor, hyper_in: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """:meth:`masks_from_upscaled` of :meth:`upscale_once`'s output, the second upscaling
        and its GELU written into one buffer reused from click to click.

        The (N * 64, C // 8) activations are 6 MB at full size: allocated anew at each click
        they cost about 4000 page faults per decode in a process whose allocator hands such
        blocks back to the system (measured in a fresh process that only decodes; not in a
        session that had loaded a volume). The same products, so the same values.
        """
        up2, act2 = self.output_upscaling[3:]
        weight, bias = self._block_kernels[1].get(up2.parameters(), lambda: block_kernel(up2))
        rows = upscaled_once.reshape(upscaled_once.shape[0], -1, upscaled_once.shape[-1])
        masks = rows.new_empty(rows.shape[0], rows.shape[1] * 8, hyper_in.shape[1])
        work = SCRATCH.get("upscaled", (rows.shape[1], weight.shape[0]), rows.dtype)
        for b, image in enumerate(rows):
            upscaled = torch.addmm(bias, image, weight.t(), out=work)
            torch.ops.aten.gelu_(upscaled, approximate=act2.approximate)
            torch.mm(upscaled.view(-1, up2.weight.shape[1]), hyper_in[b].t(), out=masks[b])
        return shuffle_masks(masks, grid)

    def upscale(self, src: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` (8^3 -> 32^3); as matrix products with ``upscale_as_gemm``."""
        if not self.upscale_as_gemm:
            return self.output_upscaling(src)
        up1, norm, act1, up2, act2 = self.output_upscaling
        return act2(conv_transpose_2x(act1(norm(conv_transpose_2x(src, up1))), up2))


def shuffle_masks(masks: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Masks per upscaled token (B, N * 64, M), tokens on a ``grid``, each with its 4x4x4
    block as two nested 2x2x2 ones -> (B, M, 4x, 4h, 4w)."""
    batch = masks.shape[0]
    x, h, w = grid
    # two 2x shuffles: one 11-d permute is several times slower than both
    masks = masks.view(batch, x, h, w, 2, 2, 2, 8, -1).permute(0, 8, 1, 4, 2, 5, 3, 6, 7)
    masks = masks.reshape(batch, -1, 2 * x, 2 * h, 2 * w, 2, 2, 2)
    masks = masks.permute(0, 1, 2, 5, 3, 6, 4, 7)
    return masks.reshape(batch, -1, 4 * x, 4 * h, 4 * w)
