"""Fast inference paths against the exact fp32 reference on the same weights."""

import copy

import pytest
import torch

from fastsam3d.benchmark import format_table, run_benchmarks
from fastsam3d.modeling.configs import build_model
from fastsam3d.modeling.fast_path import GraphCache


def tiny_pair(dtype):
    torch.manual_seed(0)
    reference = build_model("tiny").eval()
    for p in reference.parameters():
        p.data.normal_(0, 0.05)
    return reference, copy.deepcopy(reference).prepare_inference(dtype=dtype, cuda_graphs=False)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_prepared_model_matches_reference(dtype, tolerance):
    reference, fast = tiny_pair(dtype)
    assert fast.image_encoder.blocks[1].attn.backend == "sdpa"
    x = torch.randn(1, 1, 128, 128, 128)
    points = torch.tensor([[[60.0, 64.0, 70.0], [30.0, 40.0, 50.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.inference_mode():
        e_ref, e_fast = reference.encode(x), fast.encode(x)
        low_ref, iou_ref, mask_ref = reference.decode(e_ref, points, labels)
        low_fast, iou_fast, mask_fast = fast.decode(e_fast, points, labels)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_cache_replays_new_inputs():
    cache = GraphCache(lambda a, b: (a * 2 + b,))
    a, b = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    first = cache(a, b)[0]
    second = cache(a * 3, b + 1)[0]
    assert torch.equal(first, torch.full((4,), 2.0, device="cuda"))
    assert torch.equal(second, torch.full((4,), 7.0, device="cuda"))


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


def test_benchmark_report_runs_on_cpu(monkeypatch):
    monkeypatch.setattr("fastsam3d.benchmark.build_model", lambda name: build_model("tiny"))
    report = run_benchmarks("cpu", repeats=1, warmup=0, teacher=True, batch=2)
    names = [r["name"] for r in report["results"]]
    assert names[0] == "student encoder" and names[-1].startswith("teacher")
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
