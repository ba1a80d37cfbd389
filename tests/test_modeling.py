"""Parity of the model with outputs of the official modules (tests/data/official_parity_a.pt)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsam3d.modeling.configs import CONFIGS, ModelConfig, build_model, infer_config

DATA = Path(__file__).parent / "data"
RTOL = 1e-4  # max abs error <= RTOL * max abs reference value (fixture README)
# The fixture's random-weight decoder amplifies rounding about 1e5-fold (attention logits near
# 50), so its two decoder tests hold to RTOL only where the fp32 sums come out as they did for
# the fixture: on this project's CI machine type they are bit-identical, while one CPU thread
# instead of two moves the low-res logits by 0.018 (of 1.08) and an Intel Xeon host with torch
# 2.11 by 0.015. The encoder tests hold to RTOL on both.
MAX_MASK_VOXELS_OFF = 10


@pytest.fixture(scope="module")
def fixture():
    return torch.load(DATA / "official_parity_a.pt", weights_only=True)


def assert_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    assert actual.shape == reference.shape
    err = (actual.float() - reference.float()).abs().max().item()
    assert err <= RTOL * reference.abs().max().item(), f"max abs error {err}"


def student_config(fx) -> ModelConfig:
    c = fx["config"]["student"]
    return ModelConfig(
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        attention_free_blocks=c["skip_layer"],
        prompt_dim=fx["config"]["prompt_dim"],
        block_style="fastsam3d",
    )


def teacher_config(fx) -> ModelConfig:
    c = fx["config"]["teacher"]
    return ModelConfig(
        embed_dim=c["embed_dim"],
        depth=c["depth"],
        num_heads=c["num_heads"],
        attention_free_blocks=0,
        window_size=c["window_size"],
        global_attn_indexes=tuple(c["global_attn_indexes"]),
        prompt_dim=fx["config"]["prompt_dim"],
        block_style="sam_med3d",
    )


def teacher_state(fx) -> dict:
    """Teacher encoder + the student's prompt encoder and decoder (as the fixture defines)."""
    state = dict(fx["teacher"]["state_dict"])
    state.update({k: v for k, v in fx["student"]["state_dict"].items() if "image_encoder" not in k})
    return state


@pytest.fixture(scope="module")
def student(fixture):
    model = build_model(student_config(fixture))
    model.load_state_dict(fixture["student"]["state_dict"], strict=True)
    return model.eval()


@pytest.mark.parametrize("wiring", ["student", "teacher"])
def test_encoder_blocks_and_embedding_match_official(fixture, wiring):
    config = student_config(fixture) if wiring == "student" else teacher_config(fixture)
    model = build_model(config).eval()
    state = fixture["student"]["state_dict"] if wiring == "student" else teacher_state(fixture)
    model.load_state_dict(state, strict=True)
    with torch.inference_mode():
        embedding, blocks = model.image_encoder.forward_features(fixture["image"].float())
        plain = model.image_encoder(fixture["image"].float())
    reference = fixture[wiring]
    assert len(blocks) == len(reference["block_outputs"])
    for ours, theirs in zip(blocks, reference["block_outputs"], strict=True):
        assert_close(ours, theirs)
    assert_close(embedding, reference["embedding"])
    assert torch.equal(plain, embedding)


def test_wrong_wiring_is_detectably_different(fixture):
    """The two block wirings share keys; the parity test must be able to tell them apart."""
    model = build_model(student_config(fixture).replace(block_style="sam_med3d")).eval()
    model.load_state_dict(fixture["student"]["state_dict"], strict=True)
    with torch.inference_mode():
        embedding = model.image_encoder(fixture["image"].float())
    err = (embedding - fixture["student"]["embedding"]).abs().max()
    assert err > 100 * RTOL * fixture["student"]["embedding"].abs().max()


def test_prompt_encoder_and_decoder_match_official(fixture, student):
    ref = fixture["prompt_decoder"]
    embedding = fixture["student"]["embedding"]
    with torch.inference_mode():
        pe = student.prompt_encoder.get_dense_pe()
        sparse, dense = student.prompt_encoder(
            points=(ref["points"], ref["labels"]), boxes=None, masks=ref["mask_input"]
        )
        outputs = {
            multimask: student.mask_decoder(
                image_embeddings=embedding,
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            for multimask in (False, True)
        }
        sparse_nm, dense_nm = student.prompt_encoder(
            points=(ref["points"], ref["labels"]), boxes=None, masks=None
        )
        low_nm, iou_nm = student.mask_decoder(
            image_embeddings=embedding,
            image_pe=pe,
            sparse_prompt_embeddings=sparse_nm,
            dense_prompt_embeddings=dense_nm,
            multimask_output=False,
        )
    assert_close(pe, ref["dense_pe"])
    assert_close(sparse, ref["sparse"])
    assert_close(dense, ref["dense"])
    assert_close(outputs[False][0], ref["low_res"])
    assert_close(outputs[False][1], ref["iou"])
    assert_close(outputs[True][0], ref["low_res_multimask"])
    assert_close(outputs[True][1], ref["iou_multimask"])
    assert_close(dense_nm, ref["no_mask"]["dense"])
    assert_close(low_nm, ref["no_mask"]["low_res"])
    assert_close(iou_nm, ref["no_mask"]["iou"])


def test_interactive_click_sequence_matches_official(fixture, student):
    """Image -> encode once -> 3 clicks, newest point only, previous logits fed back."""
    with torch.inference_mode():
        embedding = student.encode(fixture["image"].float())
        previous = None
        for click in fixture["click_sequence"]:
            points = torch.tensor([[click["point"]]], dtype=torch.float32)
            labels = torch.tensor([[click["label"]]])
            low_res, iou, mask = student.decode(embedding, points, labels, previous)
            assert_close(low_res, click["low_res"])
            assert_close(iou, click["iou"])
            reference = np.unpackbits(click["mask_packed"].numpy()).astype(bool)
            assert mask.dtype == torch.bool and mask.shape == (1, 1, 128, 128, 128)
            assert (mask.numpy().ravel() != reference).sum() <= MAX_MASK_VOXELS_OFF
            previous = low_res


def test_first_click_zero_mask_differs_from_no_mask_embedding(fixture, student):
    zeros = torch.zeros(1, 1, 32, 32, 32)
    with torch.inference_mode():
        _, dense_zero = student.prompt_encoder(points=None, boxes=None, masks=zeros)
        _, dense_none = student.prompt_encoder(points=None, boxes=None, masks=None)
    assert not torch.allclose(dense_zero, dense_none)


@pytest.mark.parametrize(
    ("name", "manifest"),
    [("fastsam3d", "FastSAM3D.pth"), ("sam-med3d-turbo", "sam_med3d_turbo.pth")],
)
def test_full_size_configs_have_the_released_keys_and_shapes(name, manifest):
    expected = json.loads((DATA / "checkpoint_manifests.json").read_text())[manifest]
    with torch.device("meta"):
        model = build_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected
    assert infer_config(model.state_dict()) == CONFIGS[name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_registered_configs_round_trip_through_inference(name):
    with torch.device("meta"):
        model = build_model(name)
    assert infer_config(model.state_dict()) == CONFIGS[name]


def _prompt_and_decoder_shapes(model) -> dict:
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}


def test_lite_teacher_shares_the_lite_students_prompt_encoder_and_decoder():
    with torch.device("meta"):
        teacher, student = build_model("fastsam3d-lite-teacher"), build_model("fastsam3d-lite")
    assert _prompt_and_decoder_shapes(teacher) == _prompt_and_decoder_shapes(student)
    assert teacher.config.depth == 2 * student.config.depth


def test_tiny_model_encode_decode_shapes():
    model = build_model("tiny").eval()
    with torch.inference_mode():
        embedding = model.encode(torch.randn(2, 1, 128, 128, 128))
        points = torch.tensor([[[64.0, 60.0, 70.0]], [[10.0, 20.0, 30.0]]])
        low, iou, mask = model.decode(embedding, points, torch.tensor([[1], [0]]))
        low3, iou3, mask3 = model.decode(
            embedding, points, torch.tensor([[1], [1]]), low, multimask_output=True
        )
    assert embedding.shape == (2, 48, 8, 8, 8)
    assert low.shape == (2, 1, 32, 32, 32) and iou.shape == (2, 1)
    assert mask.shape == (2, 1, 128, 128, 128) and mask.dtype == torch.bool
    assert low3.shape == (2, 3, 32, 32, 32) and iou3.shape == (2, 3) and mask3.shape[1] == 3
    upsampled = model.upsample_logits(low)
    assert torch.equal(mask, upsampled > 0)
