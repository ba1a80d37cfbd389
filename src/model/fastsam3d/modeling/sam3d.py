"""Sam3D container: wires the encoder, prompt encoder and decoder; fast entry points."""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import nonzero_box
from . import fused_kernels
from .attention import RelPosAttention3D
from .common import MLP, SCRATCH, MLPBlock, store_input_major
from .derived import parameter_key
from .fast_path import GraphCache, on_device
from .quantized import native_bf16, quantize_int8
from .upsample import positive_in_place, trilinear_upsample

if TYPE_CHECKING:
    from .configs import ModelConfig

ENCODER_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
"""The image encoder's precisions by name, as ``dtype`` of :meth:`Sam3D.prepare_inference`:
fp32 is exact, bf16 and int8 (CPU) are faster opt-ins."""


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
        self._encode_graph: GraphCache | None = None
        self._decode_graphs: dict[tuple[bool, bool], GraphCache] | None = None
        self._dense_pe_cache: tuple[tuple, torch.Tensor] | None = None
        self.sparse_threshold = False
        self.threshold_kernel = False
        self._compiled_encoder = None
        self._compiled_decode = None
        self._int8_encoder = False
        self._weights_keys: dict[str, tuple] = {}
        self._weights_lists: dict[str, tuple[torch.Tensor, ...]] = {}
        self.register_load_state_dict_post_hook(Sam3D._forget_derived)

    @staticmethod
    def _forget_derived(module: Sam3D, _incompatible) -> None:
        """New weights: drop the dense PE and the CUDA graphs, which captured tensors derived
        from the old ones (merged decoder matrices, reshaped kernels)."""
        module._dense_pe_cache = None
        module._weights_lists.clear()
        graphs = [module._encode_graph, *(module._decode_graphs or {}).values()]
        for cache in graphs:
            if cache is not None:
                cache.graphs.clear()

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
        """``prompt_encoder.get_dense_pe()``, computed once per weights / device / dtype.

        Loading a state dict clears the cache; the buffer is never trained.
        """
        if torch.compiler.is_compiling() and self._dense_pe_cache is not None:
            return self._dense_pe_cache[1]  # kept fresh by the eager pass of decode()
        matrix = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (matrix.device, matrix.dtype, matrix.data_ptr())
        if self._dense_pe_cache is None or self._dense_pe_cache[0] != key:
            self._dense_pe_cache = (key, self.prompt_encoder.get_dense_pe())
        return self._dense_pe_cache[1]

    def prepare_inference(
        self,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        attention: str = "sdpa",
        compile_mode: str | None = None,
    ) -> Sam3D:
        """Switch this model to the fastest path that stays within tolerance on its device.

        The encoder runs in ``dtype`` (default fp32 on every device; ``torch.bfloat16`` is
        opt-in: 6.1x (batch 1) to 9.5x (batch 64) faster on an H100, about 2x on a CPU with
        bf16 units; whether its masks stay within the Dice 0.99 the fast paths are held to
        depends on the weights: earlier bundled weights put two of 145 held-out CT masks at
        0.986, the current ones none on a CPU and none or one on an H200, docs/RESULTS.md) with
        fused attention (SDPA, the teacher's padded windows folded exactly) and its
        convolutions as matrix products; in bf16 / fp16 on CUDA each MLP's first product also
        applies its GELU in the product's epilogue (:class:`.common.MLPBlock`) and global
        attention computes its rel-pos bias inside one Triton kernel (:mod:`.relpos_flash`;
        "sdpa" backend, Triton importable). The prompt
        encoder and decoder stay fp32: on a CPU the decoder's token layers keep their weights
        input-major (:func:`.common.store_input_major`), its cross-attention runs "folded" and
        its last upscaling in a buffer reused from click to click; on CUDA, where a click is a
        chain of small kernels, its attention runs "merged"
        (:mod:`.merged_attention`), its ReLUs in the products' epilogues, residual sums with
        their LayerNorms and the mask's upsampling with its threshold as Triton kernels
        (:mod:`.fused_kernels`), independent branches on two streams, and the whole click is
        replayed from a CUDA graph. An
        unprepared model is the exact fp32 reference every fast path is compared with. Call
        after ``.to()``.
        ``compile_mode`` (opt-in, e.g. "default" or "max-autotune-no-cudagraphs") also runs
        the encoder through ``torch.compile`` (seconds to a minute of compilation per input
        shape; worth it for batch work, not for one interactive volume; on a CPU it needs a
        C++ compiler). With int8 on a CPU the compiled graph fuses the activations'
        quantisation into the surrounding elementwise work (about 1.25x the eager int8
        encoder on a 2-core Xeon); it reads the int8 weights of the last eager pass, which
        :meth:`encode` repeats whenever a parameter has changed. On a CPU the decoder is
        compiled too (about 1.2x at the released size; two graphs, one for a single point
        and one for any other number; an eager pass first whenever its weights changed); on
        CUDA it is not: every compiled decoder measured was slower than its CUDA graph
        (docs/BENCHMARKS.md).
        ``dtype=torch.int8`` (CPU, opt-in) runs the encoder's matrix products in int8 (weights
        per channel, activations per row, :mod:`.quantized`; the patch embedding and the neck,
        whose inputs need more than 8 bits, in bf16 on CPUs with native bf16 products, else in
        two int8 passes; on such CPUs the attention's two products in bf16 too, with fp32
        logits and softmax, :func:`.attention.bf16_cpu_attention`), the rest in fp32; parameters
        and state-dict keys stay as they are. Without CUDA graphs the 128^3 mask is
        thresholded sparsely, equal to the full upsampling up to fp32 rounding
        (:meth:`threshold_logits`).
        ``attention`` picks the global blocks' fused backend: "sdpa" (bias as a mask) or
        "flash" (bias folded into the dot product; ``flash_attn`` on CUDA when installed).
        """
        device = self.device
        self._weights_lists.clear()
        self._weights_keys.clear()
        if dtype is None:
            dtype = torch.float32
        if dtype == torch.int8:
            if device.type != "cpu":
                raise ValueError("dtype=torch.int8 is a CPU path; use bfloat16 on GPUs")
            encoder = self.image_encoder
            layers = (encoder.patch_embed.proj, encoder.neck[0], encoder.neck[2])
            bf16 = native_bf16()
            quantize_int8(encoder, layers, passes=2, bf16=bf16)
            self._int8_encoder = True
            for module in encoder.modules():
                if isinstance(module, RelPosAttention3D):
                    module.cpu_bf16 = bf16
            dtype = torch.float32
        self.image_encoder.to(dtype)
        if device.type == "cuda":  # the neck's cuDNN convolution reads channels-last weights
            conv3 = self.image_encoder.neck[2].weight
            conv3.data = conv3.data.contiguous(memory_format=torch.channels_last_3d)
        self.image_encoder.patch_embed.as_gemm = True
        self.mask_decoder.upscale_as_gemm = True
        self.mask_decoder.attention_form = "merged" if device.type == "cuda" else "folded"
        self.prompt_encoder.downscale_as_gemm = True
        self.prompt_encoder.narrow_as_gemm = device.type == "cuda"
        self.prompt_encoder.fast_points = True
        self.prompt_encoder.parallel_streams = device.type == "cuda"
        self.mask_decoder.parallel_streams = device.type == "cuda"
        triton_kernels = device.type == "cuda" and fused_kernels.available()
        self.prompt_encoder.fused_norms = self.mask_decoder.fused_norms = triton_kernels
        reduced = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        for module in self.image_encoder.modules():
            if isinstance(module, RelPosAttention3D):
                if module.backend == "math":
                    module.backend = attention
                if reduced:
                    module.use_relpos_kernel()
            if isinstance(module, MLPBlock) and isinstance(module.act, nn.GELU):
                module.fused_gelu = reduced
                module.int8_gelu = self._int8_encoder and module.act.approximate == "none"
        for module in self.mask_decoder.modules():
            if isinstance(module, MLP) or (
                isinstance(module, MLPBlock) and isinstance(module.act, nn.ReLU)
            ):
                module.fused_relu = device.type == "cuda"
        self.mask_decoder.reuse_buffers = device.type == "cpu"
        if device.type == "cpu":
            for module in self.mask_decoder.modules():
                if isinstance(module, nn.Linear):
                    store_input_major(module)
        graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.sparse_threshold = not graphs
        self.threshold_kernel = triton_kernels
        if compile_mode is not None:
            self._compiled_encoder = torch.compile(
                self._encoder_forward, mode=compile_mode, dynamic=False
            )
            if device.type == "cpu":  # on CUDA the click replays a CUDA graph instead
                self.mask_decoder.reuse_buffers = False  # the compiled graph plans its memory
                self._compiled_decode = torch.compile(
                    functools.partial(self._decode, return_mask=False), mode=compile_mode
                )
        # the graph's input buffer holds the crops in the encoder's dtype: the copy into it
        # is the cast, one pass over the input instead of two
        self._encode_graph = GraphCache(self._encode, (dtype,)) if graphs else None
        self._decode_graphs = (
            {
                (multi, masked): GraphCache(
                    functools.partial(self._decode, multimask_output=multi, return_mask=masked)
                )
                for multi in (False, True)
                for masked in (False, True)
            }
            if graphs
            else None
        )
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed crops (B, 1, 128, 128, 128) -> fp32 (B, C, 8, 8, 8)."""
        x = x.to(self.device)
        with on_device(x.device):
            if self._encode_graph is not None and x.is_cuda:
                return self._encode_graph(x)[0]
            return self._encode(x)[0]

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        # a compiled int8 encoder reads the int8 weights of the last eager pass
        # (DerivedTensors): new weights take one eager pass, which quantises them
        if self._compiled_encoder is None or (
            self._int8_encoder and self._weights_changed("encoder", self.image_encoder)
        ):
            return (self._encoder_forward(x),)
        return (self._compiled_encoder(x),)

    def _weights_changed(self, part: str, *modules: nn.Module) -> bool:
        """Whether the parameters and buffers of ``modules`` changed (storage or version
        counter) since the last call for ``part``: compiled graphs read the tensors that the
        last eager pass derived from them (DerivedTensors, the dense PE). The list of tensors
        is kept until a state dict is loaded (walking the modules costs more than a decode's
        tenth); a parameter replaced by assignment needs ``prepare_inference`` again."""
        tensors = self._weights_lists.get(part)
        if tensors is None:
            tensors = tuple(
                t for m in modules for t in itertools.chain(m.parameters(), m.buffers())
            )
            self._weights_lists[part] = tensors
        key = tuple(parameter_key(t) for t in tensors)
        changed = key != self._weights_keys.get(part)
        self._weights_keys[part] = key
        return changed

    def _encoder_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The image encoder on ``x`` cast to its dtype, returning fp32: what
        ``compile_mode`` compiles and the CUDA graph captures, casts included."""
        return self.image_encoder(x.to(self.image_encoder.pos_embed.dtype)).float()

    def decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        return_mask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decode one set of prompts per batch element.

        Args:
            embedding: (B, C, 8, 8, 8) from :meth:`encode`.
            points: (B, N, 3) voxel coordinates of the 128^3 model grid (tensor dims 2, 3, 4).
            labels: (B, N), 1 = positive, 0 = negative.
            mask_input: previous low-res logits (B, 1, 32, 32, 32); None means a zero volume,
                as the official interactive loop feeds on the first click.
            multimask_output: return the three multimask outputs instead of one.
            return_mask: also threshold the logits upsampled to 128^3 (else mask is None).

        Returns:
            low_res logits (B, M, 32, 32, 32), iou (B, M) and the thresholded mask
            (B, M, 128, 128, 128) bool, with M = 3 if ``multimask_output`` else 1.
        """
        device = self.device
        if mask_input is None:
            size = (points.shape[0], 1, *self.prompt_encoder.mask_input_size)
            mask_input = torch.zeros(size, device=device)
        inputs = (
            embedding.to(device, torch.float32),
            points.to(device, torch.float32),
            labels.to(device, torch.int64),
            mask_input.to(device, torch.float32),
        )
        options = (bool(multimask_output), bool(return_mask))
        with on_device(device):
            if self._decode_graphs is not None and device.type == "cuda":
                outputs = self._decode_graphs[options](*inputs)
            elif self._compiled_decode is not None:
                outputs = self._decode_compiled(*inputs, *options)
            else:
                outputs = self._decode(*inputs, *options)
        return outputs if return_mask else (*outputs, None)

    def _decode_compiled(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor,
        multimask_output: bool,
        return_mask: bool,
    ) -> tuple[torch.Tensor, ...]:
        """The logits from the compiled decoder (CPU; one graph for one point, one for any
        other number), after an eager pass when its weights changed; the mask is thresholded
        eagerly (its box depends on the values)."""
        inputs = (embedding, points, labels, mask_input)
        part = f"decoder, multimask {multimask_output}"  # each derives its own tensors
        if self._weights_changed(part, self.prompt_encoder, self.mask_decoder):
            low_res, iou = self._decode(*inputs, multimask_output, False)
        else:
            torch._dynamo.maybe_mark_dynamic(points, 1)
            torch._dynamo.maybe_mark_dynamic(labels, 1)
            low_res, iou = self._compiled_decode(*inputs, multimask_output=multimask_output)
        if not return_mask:
            return low_res, iou
        return low_res, iou, self.threshold_logits(low_res)

    def _decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor,
        multimask_output: bool,
        return_mask: bool,
    ) -> tuple[torch.Tensor, ...]:
        sparse, dense = self.prompt_encoder(points=(points, labels), boxes=None, masks=mask_input)
        low_res, iou = self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        if not return_mask:
            return low_res, iou
        return low_res, iou, self.threshold_logits(low_res)

    @torch.no_grad()  # a bool mask has no gradient; the sparse path writes in place
    def threshold_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """``upsample_logits(low_res) > mask_threshold`` as a bool mask.

        With ``threshold_kernel`` (set by :meth:`prepare_inference` on CUDA where Triton is
        installed) one kernel upsamples and thresholds (:mod:`.fused_kernels`).
        With ``sparse_threshold`` (set by :meth:`prepare_inference` unless CUDA graphs are on)
        only the box that can be positive is upsampled, as separable products
        (:func:`.upsample.trilinear_upsample`): trilinear interpolation is a convex
        combination, so a voxel whose 2x2x2 low-res neighbours are all <= 0 stays <= 0 in
        floating point too, and a crop with a one-cell margin interpolates with the same
        weights as the whole volume. The values equal the full path's up to fp32 rounding.
        The box's mask is cast from the upsampled logits' ReLU
        (:func:`.upsample.positive_in_place`); logits with a NaN or an infinity take the
        full path.
        """
        if self.threshold_kernel and low_res.is_cuda:
            size = (self.image_size,) * 3
            return fused_kernels.upsample_threshold(low_res, size, self.mask_threshold)
        cells = low_res.shape[2:]
        factor = self.image_size // cells[0]
        if (
            not self.sparse_threshold
            or factor % 2
            or any(n * factor != self.image_size for n in cells)
        ):
            return self.upsample_logits(low_res) > self.mask_threshold
        if self.mask_threshold != 0:
            return trilinear_upsample(low_res, factor) > self.mask_threshold
        # the checks on the host: a few small parallel ops cost more than the copy
        values = low_res.detach().flatten(0, 1).cpu().numpy()
        if not np.isfinite(values).all():
            return self.upsample_logits(low_res) > 0
        size = (self.image_size,) * 3
        box = nonzero_box((values > 0).any(0))
        if box is None:
            return torch.zeros((*low_res.shape[:2], *size), dtype=torch.bool, device=low_res.device)
        crop, out, local = [], [], []
        for s, n in zip(box, cells, strict=True):
            c0, c1 = max(s.start - 1, 0), min(s.stop + 1, n)
            lo = max(factor * s.start - factor // 2, 0)
            hi = min(factor * s.stop + factor // 2, self.image_size)
            crop.append(slice(c0, c1))
            out.append(slice(lo, hi))
            local.append(slice(lo - factor * c0, hi - factor * c0))
        work = None
        if low_res.device.type == "cpu" and low_res.shape[0] * low_res.shape[1] == 1:
            # one mask (a click): a buffer for the largest box, 8 MB kept per thread
            work = SCRATCH.get("upsampled logits", (self.image_size**3,), low_res.dtype)
        upsampled = trilinear_upsample(low_res[(..., *crop)], factor, work)
        inside = positive_in_place(upsampled)[(..., *local)]
        if inside.shape[2:] == size:
            return inside
        mask = torch.zeros((*low_res.shape[:2], *size), dtype=torch.bool, device=low_res.device)
        mask[(..., *out)] = inside
        return mask

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """Trilinear (align_corners=False) upsampling of 32^3 logits to the 128^3 input grid."""
        return F.interpolate(
            low_res, size=(self.image_size,) * 3, mode="trilinear", align_corners=False
        )
