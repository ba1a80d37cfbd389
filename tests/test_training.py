"""Interactive training: loss, a toy run that learns, checkpoints and resume, DDP, the CLI."""

import argparse
import json
import socket

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastsam3d import training
from fastsam3d.checkpoints import load_model
from fastsam3d.modeling.configs import build_model, get_config
from fastsam3d.training_runtime import (
    Budget,
    Runtime,
    cosine_lr,
    leave_process_group,
    load_resume_state,
    reports,
    resolve_config,
    setup_runtime,
)

TINY = get_config("tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One nnU-Net case: a 2 mm volume with a box and a ball (image = 100 * label + 50)."""
    root = tmp_path_factory.mktemp("train") / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.indices((48, 48, 40))
    labels = np.zeros((48, 48, 40), np.uint8)
    labels[8:24, 10:30, 6:20] = 1
    labels[((grid - np.array([34, 30, 26])[:, None, None, None]) ** 2).sum(0) < 64] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(labels, affine), str(root / "labelsTr" / "toy.nii.gz"))
    image = labels.astype(np.float32) * 100 + 50
    nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / "toy_0000.nii.gz"))
    return root


def options(dataset, tmp_path, **changes):
    base = dict(
        config="tiny",
        data=[str(dataset)],
        cache=str(dataset.parent / "cache"),
        out=str(tmp_path / "run"),
        steps=2,
        batch=1,
        clicks=2,
        log_every=1,
    )
    base.update(changes)
    return training.TrainOptions(**base)


def test_dice_ce_loss_is_small_for_a_perfect_prediction_and_respects_weights():
    target = torch.zeros((2, 1, 4, 4, 4), dtype=torch.bool)
    target[:, :, 1:3, 1:3, 1:3] = True
    perfect = torch.where(target, 20.0, -20.0)
    assert training.dice_ce_loss(perfect, target, torch.ones(2)) < 1e-3
    wrong = -perfect
    assert training.dice_ce_loss(wrong, target, torch.ones(2)) > 1.5
    mixed = torch.cat([perfect[:1], wrong[1:]])
    assert training.dice_ce_loss(mixed, target, torch.tensor([1.0, 0.0])) < 1e-3


def test_plain_loss_is_soft_dice_plus_voxel_mean_bce():
    logits = torch.randn((1, 1, 4, 4, 4))
    target = logits + 0.5 * torch.randn_like(logits) > 0
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum() + 1e-5) / (prob.square().sum() + target.sum() + 1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float())
    loss = training.dice_ce_loss(logits, target, torch.ones(1))
    assert loss.item() == pytest.approx((dice + bce).item(), rel=1e-5)
    assert training.dice_ce_loss(logits, target, torch.ones(1), balanced=True) != loss


def test_interactive_step_rejects_bad_settings():
    model = build_model(TINY)
    with pytest.raises(ValueError, match="unknown loss"):
        training.InteractiveStep(model, clicks=1, loss="focal")
    with pytest.raises(ValueError, match="core_click_prob"):
        training.InteractiveStep(model, clicks=1, core_click_prob=1.5)


def test_cosine_schedule_and_budget():
    assert cosine_lr(1.0, 0.0) < 0.05 and cosine_lr(1.0, 0.03) == pytest.approx(1.0)
    assert cosine_lr(1.0, 1.0) == pytest.approx(0.05)
    budget = Budget(None, 10, start_step=5)
    assert budget.progress == pytest.approx(0.5)


def test_stop_after_minutes_pauses_without_shortening_the_schedule():
    runtime = setup_runtime("cpu", "off")
    budget = Budget(10.0, None, stop_after_minutes=0.0)
    assert budget.done(runtime) and budget.progress < 0.01
    assert not Budget(10.0, None, stop_after_minutes=5.0).done(runtime)


def test_resumed_ranks_draw_different_batches(dataset, tmp_path):
    training.train(options(dataset, tmp_path, steps=1))
    draws = []
    for rank in (0, 1):
        runtime = Runtime(torch.device("cpu"), rank=rank, world_size=2)
        model = build_model(TINY)
        optimizer = training.make_optimizer(model, options(dataset, tmp_path))
        generator = torch.Generator()
        load_resume_state(tmp_path / "run", "latest", model, optimizer, generator, runtime)
        draws.append(torch.rand(4, generator=generator))
    assert not torch.equal(draws[0], draws[1])


def test_resolve_config_overrides():
    config = resolve_config("tiny", ["depth=4", "global_attn_indexes=[1, 3]"])
    assert config.depth == 4 and config.global_attn_indexes == (1, 3)


def test_interactive_loss_decreases_on_a_toy_set():
    torch.manual_seed(0)
    model = build_model(TINY).train()
    step = training.InteractiveStep(model, clicks=1, loss="dice-balanced-bce")
    image = torch.zeros((1, 1, 128, 128, 128))
    target = torch.zeros_like(image, dtype=torch.bool)
    target[:, :, 40:80, 50:90, 45:85] = True
    image[target] = 2.0
    image += 0.1 * torch.randn_like(image)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, dices = [], []
    for _ in range(10):
        generator = torch.Generator().manual_seed(0)
        loss, stats = step(image, target, torch.ones(1, dtype=torch.bool), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        dices.append(stats["dice_last_round"].item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert dices[-1] > 0.3 and dices[-1] > 3 * dices[0]


def test_train_writes_metrics_and_a_loadable_checkpoint_then_resumes(dataset, tmp_path):
    final = training.train(options(dataset, tmp_path))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    model = load_model(final)
    assert model.config == TINY
    latest = load_model(run / "latest.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, latest.state_dict()[key])
    training.train(options(dataset, tmp_path, steps=3, resume=True))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    resumed = load_model(run / "latest.safetensors")
    assert not torch.equal(resumed.image_encoder.pos_embed, model.image_encoder.pos_embed)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_path_with_world_size_one(dataset, tmp_path, monkeypatch):
    for key, value in dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    ).items():
        monkeypatch.setenv(key, value)
    try:
        final = training.train(options(dataset, tmp_path, steps=1, freeze_encoder=True))
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert setup_runtime().distributed
        assert reports("wrote it") == "wrote it"  # rank 0 reports for the job
        monkeypatch.setattr(dist, "get_rank", lambda: 1)
        assert reports("wrote it") == ""  # the other ranks print nothing
    finally:
        leave_process_group()  # what setup_runtime registered to run at exit
    assert not dist.is_initialized()
    leave_process_group()  # a second call (e.g. at exit after the test's) is a no-op
    assert final.is_file()


def test_cli_train_runs_end_to_end(dataset, tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    training.add_parser(sub)
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "train",
            "--config",
            "tiny",
            "--data",
            str(dataset),
            "--cache",
            str(dataset.parent / "cache"),
            "--out",
            str(out),
            "--steps",
            "1",
            "--batch",
            "2",
            "--clicks",
            "1",
        ]
    )
    assert args.func(args).startswith("wrote ")
    assert (out / "final.safetensors").is_file() and (out / "latest.optim.safetensors").is_file()
