"""Attention backends against the fp32 / fp64 reference path on the same layer."""

import copy
import threading

import pytest
import torch

from fastsam3d.modeling import relpos_flash
from fastsam3d.modeling.attention import (
    RelPosAttention3D,
    decomposed_rel_pos_bias,
    rel_pos_bias_product,
    rel_pos_projections,
    rel_pos_terms,
)
from fastsam3d.modeling.common import SCRATCH
from fastsam3d.modeling.configs import ModelConfig, build_model
from fastsam3d.modeling.sparse_attention import (
    dilated_indices,
    scatter_tokens,
    sparse_dilated_attention,
)


def random_layer(dtype=torch.float32, dim=32, heads=4, size=8, sparse_pairs=()):
    torch.manual_seed(0)
    layer = RelPosAttention3D(dim, heads, size, sparse_pairs=sparse_pairs).to(dtype)
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    return layer


def run(layer, x, backend):
    layer.backend = backend
    with torch.no_grad():
        return layer(x)


def test_sdpa_matches_math_reference():
    layer = random_layer()
    x = torch.randn(2, 8, 8, 8, 32)
    ref, fast = run(layer, x, "math"), run(layer, x, "sdpa")
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_bf16_cpu_attention_stays_within_bf16_rounding(use_rel_pos):
    """bf16 products with fp32 logits: close to the fp32 reference, and a second call with
    new inputs reuses the scratch buffers without keeping anything of the first."""
    layer = random_layer()
    layer.use_rel_pos = use_rel_pos
    layer.cpu_bf16 = True
    for seed in (1, 2):
        x = torch.randn(2, 8, 8, 8, 32, generator=torch.Generator().manual_seed(seed))
        ref, fast = run(layer, x, "math"), run(layer, x, "sdpa")
        assert (fast - ref).norm() <= 1e-2 * ref.norm()
        assert (fast - ref).abs().max() <= 3e-2 * ref.abs().max()
    logits = SCRATCH.get("logits", (2 * 4, 512, 512), torch.float32)
    run(layer, x, "sdpa")
    assert SCRATCH.get("logits", (2 * 4, 512, 512), torch.float32).data_ptr() == logits.data_ptr()


def test_scratch_buffers_are_per_thread():
    mine = SCRATCH.get("t", (4,), torch.float32)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(SCRATCH.get("t", (4,), torch.float32)))
    thread.start()
    thread.join()
    assert SCRATCH.get("t", (4,), torch.float32) is mine
    assert theirs[0].data_ptr() != mine.data_ptr()


def test_scratch_buffer_made_in_inference_mode_is_writable_outside_it():
    with torch.inference_mode():
        made = SCRATCH.get("inference", (4,), torch.float32)
    with torch.no_grad():
        torch.mul(torch.ones(4), 2, out=SCRATCH.get("inference", (4,), torch.float32))
    assert SCRATCH.get("inference", (4,), torch.float32) is made
    assert torch.equal(made, torch.full((4,), 2.0))


def test_teacher_window_fold_is_exact():
    """Padded 14^3 windows folded into one virtual key equal the padded computation."""
    config = ModelConfig(
        embed_dim=32,
        depth=2,
        num_heads=2,
        attention_free_blocks=0,
        window_size=14,
        global_attn_indexes=(1,),
        block_style="sam_med3d",
        prompt_dim=48,
    )
    model = build_model(config).double().eval()
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    block = model.image_encoder.blocks[0]
    x = torch.randn(2, 8, 8, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        block.attn.backend = "math"
        padded = block.attention(x)
        block.attn.backend = "sdpa"
        folded = block.attention(x)
    # float64 rounding, amplified by softmax over logits of about +-50 (weights of std 0.5):
    # 2.7e-15 of the largest output on most runs, 6e-11 on one CI run on an Intel Xeon. Mis-
    # weighting the padded keys by 0.1 % moves the output by 1.8e-4.
    assert (folded - padded).abs().max() <= 1e-9 * padded.abs().max()


def test_sparse_with_one_full_segment_equals_dense():
    n = 512
    layer = random_layer(sparse_pairs=((n, 1),))
    x = torch.randn(1, 8, 8, 8, 32)
    dense, sparse = run(layer, x, "math"), run(layer, x, "sparse")
    assert (sparse - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_dilated_gather_and_scatter_are_exact_inverses():
    n, heads = 64, 4
    x = torch.randn(1, heads, n, 3)
    for segment, dilation in [(64, 1), (16, 1), (16, 2), (32, 4)]:
        idx = dilated_indices(n, segment, dilation, heads)
        assert idx.shape == (heads, n // segment, segment // dilation)
        gathered = x.gather(2, idx.reshape(1, heads, -1, 1).expand(1, -1, -1, 3))
        back = scatter_tokens(gathered.view(1, heads, *idx.shape[1:], 3), idx, n, fill=7.0)
        for h in range(heads):
            chosen = idx[h].flatten()
            assert len(set(chosen.tolist())) == chosen.numel()
            assert torch.equal(back[0, h, chosen], x[0, h, chosen])
            others = torch.ones(n, dtype=torch.bool)
            others[chosen] = False
            assert torch.all(back[0, h, others] == 7.0)
        covered = torch.zeros(n, dtype=torch.bool)
        covered[idx.flatten()] = True
        assert covered.all() == (heads >= dilation)


def test_segments_attend_only_within_themselves():
    """A change to a token in segment 0 leaves outputs of segment 1 unchanged."""
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    out = sparse_dilated_attention(q, k, v, ((16, 1),), scale=0.3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3] += 5.0
    v2[:, :, 3] += 5.0
    out2 = sparse_dilated_attention(q, k2, v2, ((16, 1),), scale=0.3)
    assert torch.allclose(out[:, :, 16:], out2[:, :, 16:])
    assert not torch.allclose(out[:, :, :16], out2[:, :, :16])


def test_mixing_identical_pairs_is_a_no_op():
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    single = sparse_dilated_attention(q, k, v, ((16, 2),), scale=0.3)
    double = sparse_dilated_attention(q, k, v, ((16, 2), (16, 2)), scale=0.3)
    assert torch.allclose(single, double, atol=1e-6)


def test_gradients_flow_through_sparse_attention():
    layer = random_layer(sparse_pairs=((64, 1), (512, 8)))
    layer.backend = "sparse"
    layer(torch.randn(1, 8, 8, 8, 32)).square().sum().backward()
    for name in ("qkv.weight", "proj.weight", "rel_pos_d", "rel_pos_w"):
        grad = dict(layer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_sparse_config_builds_and_runs():
    config = ModelConfig(
        embed_dim=32,
        depth=2,
        num_heads=2,
        attention_free_blocks=1,
        prompt_dim=48,
        decoder_mlp_dim=32,
        iou_head_hidden_dim=16,
        sparse_attention=((64, 1), (512, 8)),
    )
    model = build_model(config).eval()
    assert model.image_encoder.blocks[1].attn.backend == "sparse"
    with torch.no_grad():
        assert model.encode(torch.randn(1, 1, 128, 128, 128)).shape == (1, 48, 8, 8, 8)


def test_bad_backend_and_pairs_are_refused():
    layer = random_layer()
    with pytest.raises(ValueError, match="unknown attention backend"):
        layer.backend = "fast"
    with pytest.raises(ValueError, match="sparse_pairs"):
        layer.backend = "sparse"
    with pytest.raises(ValueError, match="divide"):
        dilated_indices(512, 48, 1, 2)


def test_bias_folded_into_the_dot_product_is_exact():
    """The "flash" backend: augmented q / k through a bias-free kernel."""
    layer = random_layer(torch.float64)
    x = torch.randn(2, 8, 8, 8, 32, dtype=torch.float64)
    ref, flash = run(layer, x, "math"), run(layer, x, "flash")
    assert (flash - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_bias_as_one_product_equals_the_broadcast_sum():
    """The CUDA form of the sdpa bias: per-query tables times one-hot key coordinates."""
    torch.manual_seed(0)
    q = torch.randn(3, 512, 16, dtype=torch.float64)
    tables = [torch.randn(15, 16, dtype=torch.float64) for _ in range(3)]
    terms = rel_pos_terms(q, *tables, 8)
    product = rel_pos_bias_product(*terms, 8)
    assert product.shape == (3, 512, 512)
    assert torch.equal(product, sum(terms).reshape(3, 512, 512))


def test_cpu_bias_from_one_projection_matches_the_official_terms():
    """The CPU form: one product with the stacked tables, gathered per query coordinate."""
    torch.manual_seed(0)
    q = torch.randn(3, 512, 16, dtype=torch.float64)
    tables = [torch.randn(15, 16, dtype=torch.float64) for _ in range(3)]
    terms = rel_pos_terms(q, *tables, 8)
    for projected, term in zip(rel_pos_projections(q, *tables, 8), terms, strict=True):
        assert projected.shape == term.shape
        assert (projected - term).abs().max() <= 1e-12 * term.abs().max()
    broadcast = sum(terms).reshape(3, 512, 512)
    bias = decomposed_rel_pos_bias(q, *tables, 8)
    assert (bias - broadcast).abs().max() <= 1e-12 * broadcast.abs().max()


def test_flash_backend_through_prepare_inference_keeps_the_masks():
    torch.manual_seed(0)
    reference = build_model("tiny").eval()
    for p in reference.parameters():
        p.data.normal_(0, 0.05)
    fast = copy.deepcopy(reference).prepare_inference(torch.float32, False, attention="flash")
    assert fast.image_encoder.blocks[1].attn.backend == "flash"
    x = torch.randn(1, 1, 128, 128, 128)
    points, labels = torch.tensor([[[60.0, 64.0, 70.0]]]), torch.tensor([[1]])
    with torch.inference_mode():
        e_ref, e_fast = reference.encode(x), fast.encode(x)
        mask_ref = reference.decode(e_ref, points, labels)[2]
        mask_fast = fast.decode(e_fast, points, labels)[2]
    assert (e_fast - e_ref).abs().max() <= 1e-5 * e_ref.abs().max()
    assert 2 * (mask_ref & mask_fast).sum() / (mask_ref.sum() + mask_fast.sum()) >= 0.99


needs_kernel = pytest.mark.skipif(
    not relpos_flash.supported(8, 64, torch.bfloat16), reason="needs CUDA and Triton"
)


@needs_kernel
@pytest.mark.parametrize(("dim", "heads", "size"), [(768, 6, 8), (768, 12, 8), (256, 4, 4)])
def test_relpos_kernel_matches_the_reference_closer_than_sdpa(dim, heads, size):
    """One Triton kernel with the bias gathered in fp32: within bf16 rounding of the fp32
    reference, and no further from it than SDPA with the bias written out in bf16."""
    torch.manual_seed(0)
    layer = RelPosAttention3D(dim, heads, size).cuda()
    for p in layer.parameters():  # unit-scale queries and keys, a bias of a few units
        p.data.normal_(0, dim**-0.5)
    for table in layer.rel_pos_tables:
        table.data.normal_(0, 0.3)
    x = torch.randn(3, size, size, size, dim, device="cuda")
    half = copy.deepcopy(layer).bfloat16()
    half.backend = "sdpa"
    exact = copy.deepcopy(half).float()  # the same (bf16-rounded) weights in fp32
    ref = run(exact, x, "math")
    sdpa = run(half, x.bfloat16(), "sdpa").float()
    assert half.use_relpos_kernel()
    fused = run(half, x.bfloat16(), "sdpa").float()
    assert (fused - ref).norm() <= 3e-2 * ref.norm()
    assert (fused - ref).norm() <= (sdpa - ref).norm()
    # the bias matters at this scale: without it the output moves far beyond that
    exact.use_rel_pos = False
    assert (run(exact, x, "math") - ref).norm() >= 0.5 * ref.norm()


def test_relpos_kernel_only_for_half_precision_cuda_inference():
    layer = random_layer(dim=256, heads=4)
    assert not layer.use_relpos_kernel()  # fp32 on the CPU
    assert not copy.deepcopy(layer).bfloat16().use_relpos_kernel()  # bf16 on the CPU
    odd = random_layer(dim=96, heads=4)  # head_dim 24: not a power of two
    assert not relpos_flash.supported(8, odd.head_dim, torch.bfloat16)
    assert not relpos_flash.supported(14, 64, torch.bfloat16)  # a 14^3 window


@needs_kernel
def test_prepared_bf16_encoder_runs_the_relpos_kernel_in_its_graph():
    torch.manual_seed(0)
    reference = build_model(
        ModelConfig(name="t", embed_dim=128, depth=2, num_heads=2, attention_free_blocks=1)
    ).eval()
    for p in reference.parameters():
        p.data.normal_(0, 0.05)
    reference = reference.cuda()
    fast = copy.deepcopy(reference).prepare_inference(dtype=torch.bfloat16)
    assert fast.image_encoder.blocks[1].attn.relpos_kernel
    x = torch.randn(2, 1, 128, 128, 128, device="cuda")
    with torch.inference_mode():
        e_ref, eager = reference.encode(x), fast._encode(x)[0]
        graphed = [fast.encode(x) for _ in range(2)]
    assert all(torch.equal(g, eager) for g in graphed)
    assert (eager - e_ref).abs().max() <= 3e-2 * e_ref.abs().max()
