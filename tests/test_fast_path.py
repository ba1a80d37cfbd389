"""Fast inference paths against the exact fp32 reference on the same weights."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from test_modeling import DATA, student_config

from fastsam3d.benchmark import format_table, run_benchmarks
from fastsam3d.modeling import fused_kernels, merged_attention, sam3d
from fastsam3d.modeling.attention import RelPosAttention3D
from fastsam3d.modeling.common import MLPBlock, store_input_major
from fastsam3d.modeling.configs import build_model
from fastsam3d.modeling.fast_path import GraphCache
from fastsam3d.modeling.quantized import (
    MIN_ROWS,
    Int8Weight,
    int8_linear,
    quantize_int8,
    quantize_passes,
    quantize_rows,
)
from fastsam3d.modeling.transformer import add_norm
from fastsam3d.modeling.upsample import trilinear_upsample

FIXTURE = DATA / "official_parity_a.pt"


def tiny_pair(dtype):
    torch.manual_seed(0)
    reference = build_model("tiny").eval()
    for p in reference.parameters():
        p.data.normal_(0, 0.05)
    return reference, copy.deepcopy(reference).prepare_inference(dtype=dtype, cuda_graphs=False)


def encode_and_click(*models):
    """(embedding, low-res logits, mask) of each model for one random crop and two clicks."""
    x = torch.randn(1, 1, 128, 128, 128)
    points = torch.tensor([[[60.0, 64.0, 70.0], [30.0, 40.0, 50.0]]])
    labels = torch.tensor([[1, 0]])
    outputs = []
    with torch.inference_mode():
        for model in models:
            embedding = model.encode(x)
            low, _, mask = model.decode(embedding, points, labels)
            outputs.append((embedding, low, mask))
    return outputs


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_prepared_model_matches_reference(dtype, tolerance):
    reference, fast = tiny_pair(dtype)
    assert fast.image_encoder.blocks[1].attn.backend == "sdpa"
    (e_ref, low_ref, mask_ref), (e_fast, low_fast, mask_fast) = encode_and_click(reference, fast)
    assert e_fast.dtype == torch.float32
    assert (e_fast - e_ref).abs().max() <= tolerance * e_ref.abs().max()
    assert (low_fast - low_ref).abs().max() <= 10 * tolerance * low_ref.abs().max()
    dice = 2 * (mask_ref & mask_fast).sum() / (mask_ref.sum() + mask_fast.sum())
    assert dice >= 0.99


def test_decode_without_mask_and_batch_prompts():
    reference, fast = tiny_pair(torch.float32)
    with torch.inference_mode():
        emb = fast.encode(torch.randn(1, 1, 128, 128, 128))
        points = torch.tensor([[[60.0, 64.0, 70.0]], [[20.0, 30.0, 40.0]]])
        low, iou, mask = fast.decode(
            emb, points, torch.ones(2, 1, dtype=torch.int64), return_mask=False
        )
    assert mask is None and low.shape == (2, 1, 32, 32, 32) and iou.shape == (2, 1)


def test_input_major_linear_equals_linear_and_keeps_the_keys():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 96)
    input_major = copy.deepcopy(layer)
    store_input_major(input_major)
    assert input_major.weight.stride() == (1, 96) and input_major.weight.shape == (96, 48)
    with torch.inference_mode():
        for shape in ((1, 7, 48), (3, 48), (2, 100, 48)):
            x = torch.randn(*shape)
            torch.testing.assert_close(input_major(x), layer(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(input_major.state_dict()["weight"], layer.state_dict()["weight"])
    store_input_major(input_major)  # a second call keeps the layout
    assert input_major.weight.stride() == (1, 96)


def test_cpu_fast_path_stores_only_the_decoders_linear_weights_input_major():
    reference, fast = tiny_pair(torch.float32)
    decoder = [m for m in fast.mask_decoder.modules() if isinstance(m, torch.nn.Linear)]
    encoder = [m for m in fast.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert decoder and encoder
    assert all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in decoder)
    assert all(m.weight.is_contiguous() for m in encoder)
    assert fast.state_dict().keys() == reference.state_dict().keys()


def test_fused_gelu_mlp_is_the_tanh_gelu_within_its_bound():
    torch.manual_seed(0)
    block = MLPBlock(16, 64).eval()
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        exact = block(x)
        block.fused_gelu = True
        fused = block(x)
        by_hand = block.lin2(F.gelu(block.lin1(x), approximate="tanh"))
    torch.testing.assert_close(fused, by_hand)
    bound = 5e-4 * block.lin2.weight.abs().sum(1)  # |gelu_tanh - gelu| <= 4.8e-4
    assert ((fused - exact).abs() <= bound).all()
    assert not torch.equal(fused, exact)


def test_gelu_fusion_only_for_reduced_precision_cuda_encoders():
    _, bf16_cpu = tiny_pair(torch.bfloat16)
    assert not any(m.fused_gelu for m in bf16_cpu.modules() if isinstance(m, MLPBlock))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_bf16_encoder_fuses_gelu_and_matches_reference():
    reference, _ = tiny_pair(torch.float32)
    reference = reference.cuda()
    fast = copy.deepcopy(reference).prepare_inference(dtype=torch.bfloat16)
    fused = [m.fused_gelu for m in fast.image_encoder.modules() if isinstance(m, MLPBlock)]
    assert fused and all(fused)
    assert not fast.mask_decoder.transformer.layers[0].mlp.fused_gelu  # ReLU stays exact
    x = torch.randn(1, 1, 128, 128, 128, device="cuda")
    with torch.inference_mode():
        e_ref, e_fast = reference.encode(x), fast.encode(x)
    assert (e_fast - e_ref).abs().max() <= 3e-2 * e_ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_cache_replays_new_inputs():
    cache = GraphCache(lambda a, b: (a * 2 + b,))
    a, b = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    first = cache(a, b)[0]
    second = cache(a * 3, b + 1)[0]
    assert torch.equal(first, torch.full((4,), 2.0, device="cuda"))
    assert torch.equal(second, torch.full((4,), 7.0, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_cache_casts_into_its_input_buffers():
    seen = []
    cache = GraphCache(
        lambda a, b: seen.append((a.dtype, b.dtype)) or (a.float() + b,), (torch.bfloat16,)
    )
    a = torch.tensor([1.0, 1 + 2**-10, 3.0], device="cuda")  # 1 + 2^-10 rounds to 1 in bf16
    out = cache(a, torch.zeros(3, device="cuda"))[0]
    assert set(seen) == {(torch.bfloat16, torch.float32)}
    assert torch.equal(out, torch.tensor([1.0, 1.0, 3.0], device="cuda"))
    assert torch.equal(cache(a * 2, torch.ones(3, device="cuda"))[0], out * 2 + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_bf16_encoder_graph_equals_its_eager_run():
    """The graph's input buffer casts the crops to bf16 as they are copied in: the same
    embedding as the cast inside the encoder, to the bit."""
    reference, _ = tiny_pair(torch.float32)
    fast = copy.deepcopy(reference).cuda().prepare_inference(dtype=torch.bfloat16)
    x = torch.randn(2, 1, 128, 128, 128, device="cuda")
    with torch.inference_mode():
        eager = fast._encode(x)[0]
        graphed = [fast.encode(x) for _ in range(2)]  # capture, then replay
    assert eager.dtype == torch.float32
    assert all(torch.equal(g, eager) for g in graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fast_path_matches_reference():
    reference, _ = tiny_pair(torch.float32)
    reference = reference.cuda()
    fast = copy.deepcopy(reference).prepare_inference()
    x = torch.randn(1, 1, 128, 128, 128, device="cuda")
    points = torch.tensor([[[60.0, 64.0, 70.0]]], device="cuda")
    labels = torch.ones(1, 1, dtype=torch.int64, device="cuda")
    with torch.inference_mode():
        e_ref = reference.encode(x)
        for _ in range(2):  # second call replays the captured graphs
            e_fast = fast.encode(x)
            _, _, mask_fast = fast.decode(e_fast, points, labels)
        _, _, mask_ref = reference.decode(e_ref, points, labels)
    assert (e_fast - e_ref).abs().max() <= 3e-2 * e_ref.abs().max()
    assert 2 * (mask_ref & mask_fast).sum() / (mask_ref.sum() + mask_fast.sum()) >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_fast_decoder_matches_reference_to_fp32_rounding():
    """The CUDA click: merged attention, fused ReLUs, GEMM mask path, the threshold kernel and
    CUDA graphs, against the reference's logits and mask from the same embedding."""
    reference, _ = tiny_pair(torch.float32)
    reference = reference.cuda()
    fast = copy.deepcopy(reference).prepare_inference()
    assert fast.mask_decoder.attention_form == "merged" and fast.threshold_kernel
    emb = torch.randn(1, 48, 8, 8, 8, device="cuda")
    points = torch.tensor([[[60.0, 64.0, 70.0], [30.0, 40.0, 50.0]]], device="cuda")
    labels = torch.tensor([[1, 0]], device="cuda")
    previous = blob_logits(torch.Generator().manual_seed(2), 1, 1, 1).cuda() * 20
    with torch.inference_mode():
        low, iou, mask = reference.decode(emb, points, labels, previous)
        for _ in range(2):  # the second call replays the captured graph
            fast_low, fast_iou, fast_mask = fast.decode(emb, points, labels, previous)
    assert (fast_low - low).abs().max() <= 1e-5 * low.abs().max()
    assert (fast_iou - iou).abs().max() <= 1e-5 * iou.abs().max()
    assert (fast_mask != mask).sum() <= 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_follow_loaded_weights():
    reference, _ = tiny_pair(torch.float32)
    fast = copy.deepcopy(reference).cuda().prepare_inference()
    emb = torch.randn(1, 48, 8, 8, 8, device="cuda")
    points = torch.tensor([[[60.0, 64.0, 70.0]]], device="cuda")
    labels = torch.ones(1, 1, dtype=torch.int64, device="cuda")
    state = {k: v * 1.5 for k, v in reference.state_dict().items()}
    with torch.inference_mode():
        before = fast.decode(emb, points, labels)[0]
        fast.load_state_dict(state)
        after = fast.decode(emb, points, labels)[0]
        fresh = build_model("tiny").eval()
        fresh.load_state_dict(state)
        expected = fresh.cuda().prepare_inference().decode(emb, points, labels)[0]
    assert not torch.equal(after, before)
    assert (after - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.skipif(not fused_kernels.available(), reason="needs a GPU and Triton")
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_threshold_kernel_equals_the_full_upsample(threshold):
    generator = torch.Generator().manual_seed(4)
    cases = [blob_logits(generator, 2, 3, t) for t in range(25)] + [torch.randn(2, 3, 32, 32, 32)]
    for low in cases:
        low = low.cuda()
        up = F.interpolate(low, size=(128,) * 3, mode="trilinear", align_corners=False)
        mask = fused_kernels.upsample_threshold(low, (128,) * 3, threshold)
        differ = mask != (up > threshold)
        # same weights, same order; at most an FMA's rounding apart, so only at the threshold
        assert ((up[differ] - threshold).abs() <= 1e-6 * (1 + low.abs().max())).all()
        assert differ.sum() <= 10


@pytest.mark.skipif(not fused_kernels.available(), reason="needs a GPU and Triton")
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_layer_norm_kernel_equals_the_layers(with_residual):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(48).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 48, 512, device="cuda").transpose(1, 2)  # strided, as the image tokens
    residual = torch.randn(2, 512, 48, device="cuda") if with_residual else None
    pe = torch.randn(1, 48, 512, device="cuda").transpose(1, 2)  # broadcast over the batch
    with torch.inference_mode():
        out, out_pe = fused_kernels.add_layer_norm(x, residual, norm, pe)
        expected = norm(x if residual is None else x + residual)
        alone, none = fused_kernels.add_layer_norm(x, residual, norm)
        gelu, _ = fused_kernels.add_layer_norm(x, residual, norm, gelu=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_pe, expected + pe, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gelu, F.gelu(expected), rtol=1e-5, atol=1e-5)
    assert torch.equal(alone, out) and none is None


@pytest.mark.skipif(not fused_kernels.available(), reason="needs a GPU and Triton")
def test_add_layer_norm_kernel_sums_partial_products():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(384).cuda()
    x = torch.randn(1, 7, 2048, device="cuda")
    weight, bias = torch.randn(2048, 384, device="cuda") / 45, torch.randn(384, device="cuda")
    queries, pe = torch.randn(1, 7, 384, device="cuda"), torch.randn(1, 7, 384, device="cuda")
    with torch.inference_mode():
        split = merged_attention.residual_product(x, weight, bias)
        out, out_pe = fused_kernels.add_layer_norm(queries, split, norm, pe)
    assert isinstance(split, fused_kernels.PartialSums)
    assert split.parts.shape == (merged_attention.SPLIT_PARTS, 1, 7, 384)
    product = x.double() @ weight.double() + bias.double()
    assert (split.total().double() - product).abs().max() <= 1e-5 * product.abs().max()
    expected = norm(queries + product.float())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_pe, expected + pe, rtol=1e-5, atol=1e-5)


def test_partial_sums_without_the_kernel_are_added_before_the_norm():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    x, parts, bias = torch.randn(2, 5, 16), torch.randn(4, 2, 5, 16), torch.randn(16)
    residual = fused_kernels.PartialSums(parts, bias)
    with torch.no_grad():
        out, _ = add_norm(x, residual, norm, None, fused=False)
        torch.testing.assert_close(out, norm(x + parts.sum(0) + bias))
        # on a CPU the split is not worth it: one product
        product = merged_attention.residual_product(x, torch.randn(16, 8), torch.zeros(8))
    assert isinstance(product, torch.Tensor) and product.shape == (2, 5, 8)


def test_benchmark_report_runs_on_cpu(monkeypatch):
    monkeypatch.setattr("fastsam3d.benchmark.build_model", lambda name: build_model("tiny"))
    report = run_benchmarks("cpu", repeats=1, warmup=0, teacher=True, batch=2)
    names = [r["name"] for r in report["results"]]
    assert names[0] == "student encoder" and names[-1].startswith("teacher")
    assert names[1] == "student encoder, int8 products (opt-in)"
    assert names[2] == "student encoder, int8 products + torch.compile (opt-in)"
    assert all(r["fast_ms"] > 0 and r["reference_ms"] > 0 for r in report["results"])
    assert "| student encoder | 1 |" in format_table(report)


def test_dense_pe_cache_follows_loaded_weights():
    model = build_model("tiny")
    before = model.dense_pe().clone()
    state = model.state_dict()
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    state[key] = state[key] + 1.0
    model.load_state_dict(state)
    assert not torch.allclose(model.dense_pe(), before)
    assert torch.equal(model.dense_pe(), model.prompt_encoder.get_dense_pe())


def test_gemm_convolutions_equal_the_convolution_layers():
    torch.manual_seed(0)
    model = build_model("tiny").double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(1, 1, 128, 128, 128, dtype=torch.float64)
    src = torch.randn(2, 48, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref_emb, ref_up = model.image_encoder(x), model.mask_decoder.upscale(src)
        model.image_encoder.patch_embed.as_gemm = True
        model.mask_decoder.upscale_as_gemm = True
        emb, up = model.image_encoder(x), model.mask_decoder.upscale(src)
    assert torch.allclose(emb, ref_emb, atol=1e-12)
    assert torch.allclose(up, ref_up, atol=1e-12)


def test_channels_last_mask_path_equals_the_layers():
    torch.manual_seed(0)
    model = build_model("tiny").double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    decoder, prompts = model.mask_decoder, model.prompt_encoder
    tokens = torch.randn(2, 512, 48, dtype=torch.float64)
    hyper = torch.randn(2, 3, 6, dtype=torch.float64)
    previous = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        upscaled = decoder.upscale(tokens.transpose(1, 2).reshape(2, 48, 8, 8, 8))
        expected = (hyper @ upscaled.flatten(2)).reshape(2, 3, 32, 32, 32)
        dense = prompts.downscale(previous)
        prompts.downscale_as_gemm = True
        masks = decoder.masks_from_upscaled(decoder.upscale_tokens(tokens), hyper, (8, 8, 8))
        in_buffer = decoder.masks_in_buffer(decoder.upscale_once(tokens), hyper, (8, 8, 8))
        dense_gemm = prompts.downscale(previous)
    assert torch.allclose(masks, expected, atol=1e-12)
    assert torch.equal(in_buffer, masks)
    assert torch.allclose(dense_gemm, dense, atol=1e-12)


def blob_logits(generator: torch.Generator, batch: int, masks: int, trial: int) -> torch.Tensor:
    """Negative logits with a few positive blobs (some at the borders), exact zeros, tiny values."""
    low = -5 * torch.rand(batch, masks, 32, 32, 32, generator=generator)
    for _ in range(1 + trial % 3):
        centre = torch.randint(0, 32, (3,), generator=generator)
        radius = torch.randint(1, 6, (3,), generator=generator)
        box = tuple(
            slice(max(int(c - r), 0), int(c + r)) for c, r in zip(centre, radius, strict=True)
        )
        scale = 1e-38 if trial % 5 == 4 else 3.0
        values = torch.randn(low[(0, 0, *box)].shape, generator=generator) * scale
        low[(trial % batch, trial % masks, *box)] = values
    if trial % 5 == 3:
        low[low.abs() < 0.5] = 0.0
    return low


def agree_away_from_zero(mask: torch.Tensor, upsampled: torch.Tensor) -> bool:
    """``mask`` equals ``upsampled > 0`` wherever the value is not within fp32 rounding of 0."""
    decided = upsampled.abs() > 1e-6 * upsampled.abs().amax().clamp(min=1.0)
    return torch.equal(mask[decided], upsampled[decided] > 0)


@pytest.mark.parametrize(
    ("shape", "factor"), [((1, 1, 32, 32, 32), 4), ((2, 3, 5, 1, 7), 2), ((1, 2, 3, 4, 6), 4)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_separable_upsample_equals_interpolate(shape, factor, dtype):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(factor))
    expected = F.interpolate(x, scale_factor=factor, mode="trilinear", align_corners=False)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(trilinear_upsample(x, factor), expected, rtol=0, atol=tolerance)
    with pytest.raises(ValueError, match="even factor"):
        trilinear_upsample(x, 3)


@pytest.mark.parametrize(("batch", "masks"), [(1, 1), (2, 3)])
def test_sparse_threshold_equals_full_upsample(batch, masks):
    model = build_model("tiny").eval().prepare_inference(cuda_graphs=False)
    assert model.sparse_threshold
    generator = torch.Generator().manual_seed(batch)
    cases = [blob_logits(generator, batch, masks, t) for t in range(25)]
    cases += [torch.randn(batch, masks, 32, 32, 32), -torch.ones(batch, masks, 32, 32, 32)]
    for low in cases:
        assert agree_away_from_zero(model.threshold_logits(low), model.upsample_logits(low))
    assert not model.threshold_logits(cases[-1]).any()
    model.mask_threshold = -0.5
    low = cases[0]
    assert agree_away_from_zero(model.threshold_logits(low), model.upsample_logits(low) + 0.5)


def test_sparse_threshold_of_non_finite_logits_is_the_comparison():
    model = build_model("tiny").eval().prepare_inference(cuda_graphs=False)
    low = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    low[0, 0, 10, 11, 12] = float("nan")
    low[0, 0, 20, 5, 7] = float("inf")
    expected = model.upsample_logits(low) > 0
    mask = model.threshold_logits(low)
    assert torch.equal(mask, expected)
    assert not mask[0, 0, 40:44, 44:48, 48:52].any()  # NaN > 0 is False


def test_fast_decode_mask_is_the_thresholded_full_upsample():
    _, fast = tiny_pair(torch.float32)
    previous = blob_logits(torch.Generator().manual_seed(3), 1, 1, 1) * 20
    with torch.inference_mode():
        emb = fast.encode(torch.randn(1, 1, 128, 128, 128))
        low, _, mask = fast.decode(
            emb, torch.tensor([[[60.0, 64.0, 70.0]]]), torch.ones(1, 1), previous
        )
    assert mask.any()
    assert agree_away_from_zero(mask, fast.upsample_logits(low))


def test_int8_products_stay_close_and_fall_back_to_fp32_when_small():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(3, 40, 64)
    q, scale = quantize_rows(x.reshape(-1, 64))
    assert (q.float() * scale - x.reshape(-1, 64)).abs().le(scale / 2 + 1e-6).all()
    (q1, s1), (q2, s2) = quantize_passes(x.reshape(-1, 64), 2)
    two_pass = q1.float() * s1 + q2.float() * s2
    assert s2.le(s1 / 254 * 1.001).all()
    assert (two_pass - x.reshape(-1, 64)).abs().le(s2 / 2 + 1e-6).all()
    cache = Int8Weight()
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    approx = int8_linear(x, layer.weight, layer.bias, cache)
    assert (approx - expected).norm() <= 0.02 * expected.norm()
    small = x[:1, : MIN_ROWS - 1]
    assert torch.equal(int8_linear(small, layer.weight, layer.bias, cache), layer(small))


def test_int8_gelu_mlp_bounds_the_hidden_rows_before_the_gelu():
    """The hidden rows' scale comes from the pre-activations: as close to fp32 as the scale
    of the exact peak, and nothing clipped in a row whose pre-activations are all negative
    (|GELU| <= 0.17 there)."""
    torch.manual_seed(0)
    block = MLPBlock(64, 256)
    x = torch.randn(40, 64)
    x[0] = 0
    with torch.no_grad():
        block.lin1.bias[:] = -torch.rand(256) * 3  # row 0: every pre-activation negative
        exact = block(x)
        assert (block.lin1(x[:1]) < 0).all()
        quantize_int8(block)
        per_row = block(x)  # the peak of |GELU| itself
        block.int8_gelu = True
        bounded = block(x)

    def error(y):
        return (y - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)

    assert not torch.equal(bounded, per_row)
    assert error(bounded).max() <= 1.2 * error(per_row).max()
    assert error(bounded)[0] <= 1.2 * error(per_row)[0]


def test_int8_encoder_keeps_the_state_dict_and_follows_new_weights():
    reference, _ = tiny_pair(torch.float32)
    int8 = copy.deepcopy(reference).prepare_inference(dtype=torch.int8)
    state = int8.state_dict()
    assert state.keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in state.items())
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        before, exact = int8.encode(x), reference.encode(x)
        assert (before - exact).norm() <= 0.05 * exact.norm()
        changed = ("mlp.lin1.weight", "patch_embed.proj.weight", "neck.2.weight")
        state = {k: v * 1.5 if k.endswith(changed) else v for k, v in state.items()}
        int8.load_state_dict(state)
        fresh = build_model("tiny").eval()
        fresh.load_state_dict(state)
        fresh.prepare_inference(dtype=torch.int8)
        assert torch.equal(int8.encode(x), fresh.encode(x))
        assert not torch.equal(int8.encode(x), before)


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_int8_encoder_has_no_graph_break_and_follows_new_weights(monkeypatch, bf16):
    """torch.compile traces the int8 encoder whole (its int8 weights come from the last eager
    pass) and an eager pass requantises weights that changed since."""
    monkeypatch.setattr(sam3d, "native_bf16", lambda: bf16)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reference, _ = tiny_pair(torch.float32)
    model = copy.deepcopy(reference).prepare_inference(dtype=torch.int8, compile_mode="default")
    x = torch.randn(1, 1, 128, 128, 128)

    def eager_int8(state):
        fresh = build_model("tiny").eval()
        fresh.load_state_dict(state)
        return fresh.prepare_inference(dtype=torch.int8).encode(x)

    with torch.inference_mode():
        state = reference.state_dict()
        model.encode(x)  # eager: quantises the weights that the compiled graph reads
        compiled, eager = model.encode(x), eager_int8(state)
        assert (compiled - eager).norm() <= 0.01 * eager.norm()
        changed = ("mlp.lin1.weight", "patch_embed.proj.weight", "neck.2.weight", "qkv.weight")
        torch.manual_seed(1)
        state = {
            k: v + 0.05 * torch.randn_like(v) if k.endswith(changed) else v
            for k, v in state.items()
        }
        model.load_state_dict(state)
        model.encode(x)
        recompiled, eager_new = model.encode(x), eager_int8(state)
        assert (eager_new - eager).norm() >= 0.1 * eager.norm()
        assert (recompiled - eager_new).norm() <= 0.01 * eager_new.norm()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compiled_cpu_decoder_equals_the_eager_one_for_any_number_of_points():
    """compile_mode on a CPU also compiles the decoder: one graph for one point, one for any
    other number, no graph break, the eager logits, and new weights followed."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reference, eager = tiny_pair(torch.float32)
    compiled = copy.deepcopy(reference).prepare_inference(compile_mode="default")
    embedding = torch.randn(1, *reference.image_encoder.neck[2].weight.shape[:1], 8, 8, 8)
    previous = torch.randn(1, 1, 32, 32, 32)

    def clicks(model):
        outputs = []
        for n in (1, 2, 3, 5, 1):
            points = torch.rand(1, n, 3, generator=torch.Generator().manual_seed(n)) * 127
            labels = (torch.arange(n) % 3 != 1).long()[None]
            for multimask in (False, True):
                outputs.append(model.decode(embedding, points, labels, previous, multimask))
        return outputs

    with torch.inference_mode():
        clicks(compiled)  # the first call of each kind is eager: it derives what graphs read
        for got, expected in zip(clicks(compiled), clicks(eager), strict=True):
            torch.testing.assert_close(
                got[0], expected[0], rtol=1e-4, atol=1e-4 * expected[0].abs().max()
            )
            torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
            assert (got[2] != expected[2]).float().mean() < 1e-4
        torch.manual_seed(1)
        state = {k: v + 0.05 * torch.randn_like(v) for k, v in reference.state_dict().items()}
        for model in (compiled, eager):
            model.load_state_dict(state)
        clicks(compiled)
        for got, expected in zip(clicks(compiled), clicks(eager), strict=True):
            torch.testing.assert_close(
                got[0], expected[0], rtol=1e-4, atol=1e-4 * expected[0].abs().max()
            )
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4  # {1, n points} x multimask


@pytest.mark.parametrize("bf16", [False, True])
def test_int8_encoder_layers_that_need_more_bits(monkeypatch, bf16):
    """The patch embedding and the neck: bf16 products where the CPU has them, else two int8
    passes; both stay close to fp32."""
    monkeypatch.setattr(sam3d, "native_bf16", lambda: bf16)
    reference, _ = tiny_pair(torch.float32)
    model = copy.deepcopy(reference).prepare_inference(dtype=torch.int8)
    for layer in (model.image_encoder.patch_embed.proj, *model.image_encoder.neck[::2]):
        assert hasattr(layer, "bf16_weight") is bf16 and hasattr(layer, "int8_weight") is not bf16
    attention = [m for m in model.modules() if isinstance(m, RelPosAttention3D)]
    assert attention and all(m.cpu_bf16 is bf16 for m in attention)
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        exact, approx = reference.encode(x), model.encode(x)
    assert (approx - exact).norm() <= 0.05 * exact.norm()


def test_int8_embedding_of_the_official_fixture_within_four_percent():
    """The official student (random weights, reduced width) on the fixture image.

    Masks are not compared: this fixture's random decoder amplifies any rounding chaotically
    (docs/RESULTS.md); mask agreement is measured on real volumes with trained weights.
    """
    fixture = torch.load(FIXTURE, weights_only=True)
    reference = build_model(student_config(fixture)).eval()
    reference.load_state_dict(fixture["student"]["state_dict"])
    int8 = copy.deepcopy(reference).prepare_inference(dtype=torch.int8)
    with torch.inference_mode():
        exact = reference.encode(fixture["image"].float())
        approx = int8.encode(fixture["image"].float())
    assert torch.allclose(
        exact, fixture["student"]["embedding"], rtol=0, atol=1e-4 * exact.abs().max()
    )
    assert (approx - exact).norm() <= 0.04 * exact.norm()


def test_compiled_fast_path_matches_the_fp32_fast_path():
    reference, fast = tiny_pair(torch.float32)
    compiled = copy.deepcopy(reference).prepare_inference(
        dtype=torch.float32, cuda_graphs=False, compile_mode="default"
    )
    assert compiled.state_dict().keys() == reference.state_dict().keys()
    (e_fast, low_fast, mask_fast), (e_compiled, low_compiled, mask_compiled) = encode_and_click(
        fast, compiled
    )
    assert compiled._compiled_encoder is not None
    assert (e_compiled - e_fast).abs().max() <= 1e-4 * e_fast.abs().max()
    assert (low_compiled - low_fast).abs().max() <= 1e-3 * low_fast.abs().max()
    dice = 2 * (mask_fast & mask_compiled).sum() / (mask_fast.sum() + mask_compiled.sum())
    assert dice >= 0.99


def test_benchmark_leaves_out_a_variant_that_fails_to_compile(monkeypatch, caplog):
    def timer(fn, device, repeats, warmup):
        if isinstance(fn, functools.partial):  # the opt-in rows
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")
        return 1.0

    monkeypatch.setattr("fastsam3d.benchmark.build_model", lambda name: build_model("tiny"))
    monkeypatch.setattr("fastsam3d.benchmark.time_median", timer)
    report = run_benchmarks("cpu", repeats=1, warmup=0, teacher=False, batch=1)
    names = [r["name"] for r in report["results"]]
    assert names and not any("opt-in" in name for name in names)
    assert "left out (no C++ compiler)" in caplog.text


@pytest.mark.skipif(
    not fused_kernels.available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_triton_kernels_run_on_their_inputs_device():
    """Triton launches on the current device: each kernel must switch to its inputs' GPU."""
    torch.manual_seed(0)
    low = torch.randn(1, 1, 32, 32, 32)
    norm = torch.nn.LayerNorm(48)
    x = torch.randn(1, 512, 48)
    attention = RelPosAttention3D(128, 2, 8)
    for table in attention.rel_pos_tables:
        table.data.normal_(0, 0.3)
    tokens = torch.randn(2, 8, 8, 8, 128)
    results = {}
    with torch.inference_mode():
        for device in ("cuda:0", "cuda:1"):
            layer = copy.deepcopy(attention).to(device).bfloat16()
            layer.backend = "sdpa"
            assert layer.use_relpos_kernel()
            results[device] = (
                fused_kernels.upsample_threshold(low.to(device), (128,) * 3, 0.0).cpu(),
                fused_kernels.add_layer_norm(x.to(device), None, norm.to(device))[0].cpu(),
                layer(tokens.to(device).bfloat16()).cpu(),
            )
        torch.cuda.synchronize("cuda:1")
    for first, second in zip(results["cuda:0"], results["cuda:1"], strict=True):
        assert torch.equal(first, second)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphed_model_on_the_second_gpu_equals_the_first():
    """CUDA graphs and side streams follow the current device: a model on cuda:1 must make
    it current, or its graphs capture nothing and replay stale outputs."""
    reference, _ = tiny_pair(torch.float32)
    points = torch.tensor([[[60.0, 64.0, 70.0]]])
    outputs = {}
    for device in ("cuda:0", "cuda:1"):
        model = copy.deepcopy(reference).to(device).prepare_inference()
        with torch.inference_mode():
            for seed in (1, 2):  # capture, then replay with new inputs
                x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(seed))
                embedding = model.encode(x)
                low, _, mask = model.decode(embedding, points + seed, torch.tensor([[1]]))
                outputs[device, seed] = (embedding.cpu(), low.cpu(), mask.cpu())
    for seed in (1, 2):
        for first, second in zip(outputs["cuda:0", seed], outputs["cuda:1", seed], strict=True):
            assert torch.equal(first, second)
    assert not torch.equal(outputs["cuda:1", 1][0], outputs["cuda:1", 2][0])
