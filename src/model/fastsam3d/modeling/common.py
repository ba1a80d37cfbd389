"""Small building blocks shared by the encoder, prompt encoder and decoder."""

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_kernels
from .quantized import gemm, int8_gelu_mlp


class ScratchBuffers(threading.local):
    """Work tensors reused from call to call, one set per thread.

    On a VM each freshly mapped page costs about a microsecond to fault in: the 6 MB logits
    of a 512-token attention, allocated anew at every call, cost as much as their product.
    """

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The CPU tensor ``name`` of this shape and dtype (uninitialised on first use; a
        normal tensor even under ``torch.inference_mode``, so that later calls outside it
        may write to it)."""
        key = (name, tuple(shape), dtype)
        tensor = self.tensors.get(key)
        if tensor is None:
            with torch.inference_mode(False):
                tensor = self.tensors[key] = torch.empty(shape, dtype=dtype, device="cpu")
        return tensor


SCRATCH = ScratchBuffers()


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor (biased variance)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = (-1,) + (1,) * (x.ndim - 2)
        return self.weight.view(shape) * x + self.bias.view(shape)


def channel_norm(x: torch.Tensor, norm: ChannelLayerNorm) -> torch.Tensor:
    """A :class:`ChannelLayerNorm` applied to a channels-last tensor."""
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def channel_norm_gelu(x: torch.Tensor, norm: nn.Module, fused: bool) -> torch.Tensor:
    """``gelu(channel_norm(x, norm))`` of a channels-last tensor; ``fused``: one Triton kernel
    on CUDA (:func:`.fused_kernels.add_layer_norm`)."""
    if fused and x.is_cuda:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return fused_kernels.add_layer_norm(rows, None, norm, gelu=True)[0].view(x.shape)
    return F.gelu(channel_norm(x, norm))


def strided_conv_channels_last(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A convolution whose stride equals its kernel, on channels-last (B, D, H, W, C), as one
    matrix product over flattened patches -> channels-last output."""
    batch, d, h, w, c = x.shape
    p = conv.kernel_size[0]
    patches = x.reshape(batch, d // p, p, h // p, p, w // p, p, c)
    patches = patches.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(batch, d // p, h // p, w // p, -1)
    return gemm(patches, conv, conv.weight, conv.bias)


@torch.library.custom_op("fastsam3d::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(linear(x, weight, bias), approximate="tanh")``; on CUDA one cuBLASLt product
    with the bias and GELU in its epilogue (computed in fp32 before the output is rounded).

    A custom op so that ``torch.compile`` calls it as is instead of splitting it again.
    """
    rows = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        y = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    else:
        y = F.gelu(F.linear(rows, weight, bias), approximate="tanh")
    return y.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_relu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``relu(layer(x))``; on CUDA one cuBLASLt product with the bias and the ReLU in its
    epilogue (the same values: the ReLU is exact)."""
    if not x.is_cuda:
        return torch.relu(layer(x))
    rows = torch._addmm_activation(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t())
    return rows.view(*x.shape[:-1], -1)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (keys ``lin1``, ``lin2``).

    ``fused_gelu`` (set by ``Sam3D.prepare_inference`` for the bf16 encoder on CUDA) computes
    ``lin1`` and a GELU together by :func:`linear_gelu_tanh`: the tanh form differs from the
    exact GELU by at most 5e-4, a thirtieth of a bf16 step at that value. ``fused_relu`` (the
    decoder's ReLU blocks on CUDA) does the same by :func:`linear_relu`, exactly.
    ``int8_gelu`` (the int8 encoder on a CPU) runs :func:`.quantized.int8_gelu_mlp`.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()
        self.fused_gelu = False
        self.fused_relu = False
        self.int8_gelu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_gelu:
            return int8_gelu_mlp(x, self.lin1, self.lin2)
        if self.fused_gelu:
            return self.lin2(linear_gelu_tanh(x, self.lin1.weight, self.lin1.bias))
        if self.fused_relu:
            return self.lin2(linear_relu(x, self.lin1))
        return self.lin2(self.act(self.lin1(x)))


def store_input_major(linear: nn.Linear) -> None:
    """Keep ``linear``'s (out, in) weight in input-major memory (its transpose contiguous), in
    place. ``F.linear`` then multiplies the few rows of the decoder's prompt tokens by a
    contiguous (in, out) matrix, which MKL streams once: on a 2-core Intel Xeon 2-2.5x faster
    per layer than ``W @ x^T`` on the (out, in) layout, and faster than ``F.linear`` on it
    (docs/BENCHMARKS.md). Same parameter, shape and state-dict key; equal up to fp32
    summation order."""
    linear.weight.data = linear.weight.data.t().contiguous().t()


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.{i}``);
    ``fused_relu`` computes each hidden layer by :func:`linear_relu`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))
        self.fused_relu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = linear_relu(x, layer) if self.fused_relu else torch.relu(layer(x))
        return self.layers[-1](x)
