"""Layer-wise progressive distillation: pairing, schedule, loss, initialisation, the CLI."""

import argparse
import json
import math

import pytest
import torch

from fastsam3d import distillation as D
from fastsam3d.checkpoints import load_model
from fastsam3d.modeling.configs import build_model
from fastsam3d.training_runtime import resolve_config, save_model


@pytest.mark.parametrize(
    ("depth_s", "depth_t", "expected"),
    [(6, 12, [2, 4, 6, 8, 10, 12]), (4, 12, [3, 6, 9, 12]), (6, 6, [1, 2, 3, 4, 5, 6])],
)
def test_student_block_i_pairs_with_teacher_block_ratio_times_i(depth_s, depth_t, expected):
    assert [D.teacher_block(i, depth_s, depth_t) for i in range(1, depth_s + 1)] == expected


def test_k_schedule_is_the_papers_ceil_iter_times_6_over_total():
    total = 600
    for iteration in range(1, total + 1):
        assert D.active_layers(iteration / total, 6) == math.ceil(iteration * 6 / total)
    assert D.active_layers(0.0, 6) == 1 and D.active_layers(1.0, 6) == 6


def test_layerwise_loss_pairs_i_with_2i_and_averages_over_k():
    teacher = [torch.full((1, 2, 2, 2, 3), float(j)) for j in range(1, 13)]
    student = [torch.zeros((1, 2, 2, 2, 3)) for _ in range(6)]
    for k in (1, 3, 6):
        expected = sum((2 * i) ** 2 for i in range(1, k + 1)) / k
        assert D.layerwise_loss(teacher, student, k).item() == pytest.approx(expected)


def test_layerwise_loss_projects_when_widths_differ():
    teacher = [torch.ones((1, 2, 2, 2, 4))] * 4
    student = [torch.ones((1, 2, 2, 2, 3))] * 2
    projections = torch.nn.ModuleList(torch.nn.Linear(3, 4) for _ in range(2))
    assert D.layerwise_loss(teacher, student, 2, projections).shape == ()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    teacher = build_model(resolve_config("tiny", ["depth=4"])).eval().requires_grad_(False)
    student = build_model(resolve_config("tiny", ["depth=2"]))
    return teacher, student


def test_teacher_initialisation_copies_block_m_i(models):
    teacher, _ = models
    student = build_model(resolve_config("tiny", ["depth=2"]))
    copied = D.transfer_from_teacher(student, teacher, encoder=True)
    assert torch.equal(
        student.image_encoder.blocks[1].mlp.lin1.weight,
        teacher.image_encoder.blocks[3].mlp.lin1.weight,
    )
    assert torch.equal(student.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)
    assert "image_encoder.pos_embed" in copied
    fresh = build_model(resolve_config("tiny", ["depth=2"]))
    before = fresh.image_encoder.pos_embed.clone()
    D.transfer_from_teacher(fresh, teacher, encoder=False)
    assert torch.equal(fresh.image_encoder.pos_embed, before)
    assert torch.equal(fresh.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)


def test_layerwise_distillation_loss_decreases(models):
    teacher, student = models
    step = D.DistillStep(student, teacher, "layerwise")
    step.k = 2
    image = torch.randn((1, 1, 128, 128, 128))
    target = torch.zeros_like(image, dtype=torch.bool)
    optimizer = torch.optim.AdamW(student.image_encoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = step(image, target, torch.ones(1, dtype=torch.bool), torch.Generator())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_logit_stage_gives_a_finite_loss_with_gradients_into_the_decoder(models):
    teacher, student = models
    step = D.DistillStep(student, teacher, "logits", clicks=2)
    target = torch.zeros((1, 1, 128, 128, 128), dtype=torch.bool)
    target[..., 40:70, 40:70, 40:70] = True
    loss, _ = step(target.float(), target, torch.ones(1, dtype=torch.bool), torch.Generator())
    loss.backward()
    assert torch.isfinite(loss)
    assert student.mask_decoder.iou_token.weight.grad is not None


def test_cli_distill_runs_all_stages_end_to_end(tmp_path, models):
    teacher, _ = models
    teacher_path = tmp_path / "teacher.safetensors"
    save_model(teacher_path, teacher)
    seeds = _toy_seeds(tmp_path)
    parser = argparse.ArgumentParser()
    D.add_parser(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "distill",
            "--teacher",
            str(teacher_path),
            "--student-config",
            "tiny",
            "--set",
            "depth=2",
            "--data",
            str(seeds),
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch",
            "1",
            "--clicks",
            "1",
            "--log-every",
            "1",
            "--stage-weights",
            "1,1,1,1",
        ]
    )
    assert args.func(args).startswith("wrote ")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == list(D.STAGES)
    student = load_model(out / "student.safetensors")
    assert student.config.depth == 2 and student.config.block_style == "fastsam3d"
    for stage in D.STAGES:
        assert (out / f"student-{stage}.safetensors").is_file()


def _toy_seeds(tmp_path):
    """A folder with one cached seed (.npz) so the test skips NIfTI preprocessing."""
    import numpy as np

    labels = np.zeros((40, 40, 40), np.int16)
    labels[5:25, 8:30, 10:28] = 1
    labels[26:36, 20:34, 4:14] = 2
    folder = tmp_path / "seeds"
    folder.mkdir()
    np.savez(
        folder / "toy.npz",
        labels=labels,
        ids=np.array([0, 1, 2]),
        image=(labels * 100 + 50).astype(np.float32),
    )
    return folder
