"""The fast decoder (folded cross-attention, exact up to rounding) and the int8 mode's decoder."""

import copy

import pytest
import torch

from fastsam3d.modeling.configs import build_model
from fastsam3d.modeling.merged_attention import merge_to_image


def random_model(name: str = "tiny", std: float = 0.05):
    torch.manual_seed(0)
    model = build_model(name).eval()
    for p in model.parameters():
        p.data.normal_(0, std)
    return model


@pytest.mark.parametrize("form", ["folded", "merged"])
@pytest.mark.parametrize("batch", [1, 2])
def test_attention_forms_equal_the_reference_formulation(form, batch):
    transformer = random_model().double().mask_decoder.transformer
    src = torch.randn(batch, 48, 8, 8, 8, dtype=torch.float64)
    pe = torch.randn(1, 48, 8, 8, 8).double().expand(batch, -1, -1, -1, -1)
    tokens = torch.randn(batch, 7, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = transformer(src, pe, tokens)
        actual = transformer(src, pe, tokens, form=form)
    for value, reference in zip(actual, expected, strict=True):
        assert torch.allclose(value, reference, rtol=0, atol=1e-12)


def test_merged_weights_follow_the_layer_weights():
    attention = random_model().mask_decoder.transformer.final_attn_token_to_image
    before = attention.merged(merge_to_image)
    assert attention.merged(merge_to_image) is before
    with torch.no_grad():
        attention.k_proj.weight.mul_(2)
    after = attention.merged(merge_to_image)
    assert after is not before
    assert torch.allclose(after[0], 2 * before[0], rtol=1e-6)


def decode_pair(reference, dtype):
    fast = copy.deepcopy(reference).prepare_inference(dtype=dtype, cuda_graphs=False)
    points = torch.tensor([[[60.0, 64.0, 70.0], [30.0, 40.0, 50.0]]])
    labels = torch.tensor([[1, 0]])
    previous = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        emb = reference.encode(torch.randn(1, 1, 128, 128, 128))
        exact = reference.decode(emb, points, labels, previous)
        approx = fast.decode(emb, points, labels, previous)
    return fast, exact, approx


def test_fp32_fast_decoder_matches_the_reference_to_fp32_rounding():
    _, (low, iou, mask), (fast_low, fast_iou, fast_mask) = decode_pair(
        random_model(), torch.float32
    )
    assert (fast_low - low).abs().max() <= 1e-5 * low.abs().max()
    assert (fast_iou - iou).abs().max() <= 1e-5 * iou.abs().max()
    assert (fast_mask != mask).sum() <= 10


def test_cpu_decoder_reuses_its_upscaling_buffer_outside_autograd():
    """The prepared CPU decoder writes its second upscaling into one buffer per thread; with
    autograd on it computes without the buffer (in-place products take no gradients) and gives
    the same values."""
    fast = random_model().prepare_inference(cuda_graphs=False)
    assert fast.mask_decoder.reuse_buffers
    emb = torch.randn(1, 48, 8, 8, 8)
    points, labels = torch.tensor([[[60.0, 64.0, 70.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        first = fast.decode(emb, points, labels)[0]
        again = fast.decode(emb, points, labels)[0]
    tracked = fast.decode(emb.requires_grad_(), points, labels)[0]
    assert torch.equal(first, again)
    assert tracked.requires_grad
    assert torch.allclose(tracked.detach(), first, rtol=0, atol=1e-6)


def test_int8_mode_keeps_the_decoder_fp32_and_the_state_dict():
    """``dtype=torch.int8`` quantises the encoder only: int8 products in the decoder did not
    pay (int8 upscaling: Dice min 0.97 against fp32 on real CT; token layers: no faster), so
    from the same embedding its decoder matches the fp32 reference to fp32 rounding."""
    reference = random_model()
    fast, (low, iou, mask), (int8_low, int8_iou, int8_mask) = decode_pair(reference, torch.int8)
    assert not any(hasattr(m, "int8_weight") for m in fast.mask_decoder.modules())
    assert (int8_low - low).abs().max() <= 1e-5 * low.abs().max()
    assert (int8_iou - iou).abs().max() <= 1e-5 * iou.abs().max()
    assert (int8_mask != mask).sum() <= 10
    state, expected = fast.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in state.items())
    names = [n for n, _ in fast.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()]


@pytest.mark.parametrize("multimask", [False, True])
def test_cuda_decoder_layout_matches_the_reference_on_cpu(multimask):
    """The CUDA fast path's decoder layout (merged attention, mask downscaling as products),
    run on the CPU, where CI checks it: batch 2, one or three masks."""
    reference = random_model()
    fast = copy.deepcopy(reference).prepare_inference(cuda_graphs=False)
    fast.mask_decoder.attention_form = "merged"
    fast.prompt_encoder.narrow_as_gemm = True
    generator = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 48, 8, 8, 8, generator=generator)
    points = torch.rand(2, 3, 3, generator=generator) * 127
    labels = torch.tensor([[1, 0, 1], [1, 1, -1]])
    previous = torch.randn(2, 1, 32, 32, 32, generator=generator)
    with torch.inference_mode():
        low, iou, _ = reference.decode(emb, points, labels, previous, multimask, False)
        fast_low, fast_iou, _ = fast.decode(emb, points, labels, previous, multimask, False)
    assert fast_low.shape == low.shape == (2, 3 if multimask else 1, 32, 32, 32)
    assert (fast_low - low).abs().max() <= 1e-5 * low.abs().max()
    assert (fast_iou - iou).abs().max() <= 1e-5 * iou.abs().max()
