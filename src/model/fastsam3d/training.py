"""SAM-style interactive training of any :class:`ModelConfig` (``fastsam3d train``).

Per batch the encoder runs once; then ``clicks`` rounds of simulated clicks, each fed to the
prompt encoder with the previous round's low-res logits (detached), as in the official
training: one new click per round sampled from the current error (the first from the target's
core), the newest point only or all points so far (chosen at random per batch), plus two
mask-only rounds (one at a random round, one at the end) where the decoder sees only the
previous logits. Loss: Dice + BCE on the 128^3 upsampled logits, plus MSE of the predicted IoU,
averaged over rounds. Data come from :mod:`fastsam3d.data` (synthetic + real crops made on the
training device). Scale-out, precision, checkpoints and metrics: :mod:`.training_runtime`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import load_model
from .clicks import sample_training_clicks
from .data import (
    SamplingConfig,
    SeedBank,
    cached_files,
    discover_cases,
    prepare_cases,
    sample_batch,
)
from .modeling.configs import build_model
from .modeling.sam3d import Sam3D
from .synth import SynthConfig
from .training_runtime import (
    Budget,
    LoopSettings,
    RunOptions,
    Runtime,
    load_resume_state,
    reports,
    resolve_config,
    run_loop,
    save_model,
    seed_everything,
    set_attention_backend,
    setup_runtime,
)

logger = logging.getLogger(__name__)


LOSSES = ("dice-bce", "dice-balanced-bce")


def dice_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, balanced: bool = False
) -> torch.Tensor:
    """Soft Dice (squared denominators) + BCE per sample, weighted mean over samples.

    The BCE is the voxel mean (SAM-Med3D's DiceCE), or with ``balanced`` the mean over target
    voxels plus the mean over background voxels, halved. The balanced form keeps gradients
    alive from a random start (a voxel-mean run from scratch collapsed to empty masks once) but
    shifts the optimum threshold: a model trained with it over-segments by 10-100x on held-out
    structures, so fine-tuning uses the plain form.

    Args:
        logits: (B, 1, X, Y, Z).
        target: (B, 1, X, Y, Z) bool.
        weight: (B,) float (0 drops a sample).
        balanced: class-balanced BCE instead of the voxel mean.
    """
    logits, target = logits.float().flatten(1), target.float().flatten(1)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum(1) + 1e-5) / (
        prob.square().sum(1) + target.square().sum(1) + 1e-5
    )
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if balanced:
        positives = target.sum(1)
        bce = 0.5 * (
            (bce * target).sum(1) / positives.clamp(min=1)
            + (bce * (1 - target)).sum(1) / (target.shape[1] - positives).clamp(min=1)
        )
    else:
        bce = bce.mean(1)
    return ((dice + bce) * weight).sum() / weight.sum().clamp(min=1)


def decode_prompts(model: Sam3D, embedding, points, labels, mask_input):
    """Prompt encoder + decoder; ``points`` None runs a mask-only round."""
    prompt = None if points is None else (points, labels)
    sparse, dense = model.prompt_encoder(points=prompt, boxes=None, masks=mask_input)
    return model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


def batch_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per sample (1 when both are empty)."""
    inter = (pred & target).flatten(1).sum(1).float()
    total = (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


class InteractiveStep(nn.Module):
    """One interactive training step as a module, so DDP sees a single forward.

    Args:
        model: the :class:`Sam3D` being trained.
        clicks: click rounds per sample.
        freeze_encoder: embed under ``no_grad`` (decoder fine-tune on fixed embeddings).
        loss: one of :data:`LOSSES` (see :func:`dice_ce_loss`).
        core_click_prob: chance that a later click aims at the core of the error (as users
            and the ``cvpr25`` protocol click) rather than at a uniformly random error voxel
            (the official protocol); the first click always aims at the core.
    """

    def __init__(
        self,
        model: Sam3D,
        clicks: int,
        freeze_encoder: bool = False,
        loss: str = "dice-bce",
        core_click_prob: float = 0.3,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
        if not 0.0 <= core_click_prob <= 1.0:
            raise ValueError(f"core_click_prob must be in [0, 1], got {core_click_prob}")
        self.model = model
        self.clicks = clicks
        self.freeze_encoder = freeze_encoder
        self.balanced = loss == "dice-balanced-bce"
        self.core_click_prob = core_click_prob

    def forward(self, image, target, valid, generator) -> tuple[torch.Tensor, dict]:
        model, batch = self.model, image.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            embedding = model.image_encoder(image)
        low = image.new_zeros((batch, 1, *model.prompt_encoder.mask_input_size))
        pred = torch.zeros_like(target)
        points = image.new_zeros((batch, 0, 3))
        labels = torch.zeros((batch, 0), dtype=torch.long, device=image.device)
        accumulate = bool(torch.rand((), generator=generator, device=image.device) < 0.5)
        mask_only = int(
            torch.randint(1, max(self.clicks, 2), (), generator=generator, device=image.device)
        )
        weight, losses = valid.float(), []
        for index in range(self.clicks):
            with torch.no_grad():
                core = (
                    index == 0
                    or torch.rand(batch, generator=generator, device=image.device)
                    < self.core_click_prob
                )
                new_points, new_labels = sample_training_clicks(pred, target, generator, core)
            points = torch.cat([points, new_points], 1) if accumulate else new_points
            labels = torch.cat([labels, new_labels], 1) if accumulate else new_labels
            rounds = [(points, labels)] + ([(None, None)] if index == mask_only else [])
            for round_points, round_labels in rounds:
                low, loss, pred = self._round(
                    embedding, round_points, round_labels, low, target, weight
                )
                losses.append(loss)
            if index == 0:
                first = batch_dice(pred, target)[valid]
        low, loss, pred = self._round(embedding, None, None, low, target, weight)
        losses.append(loss)
        last = batch_dice(pred, target)[valid]
        return torch.stack(losses).mean(), {"dice_first_click": first, "dice_last_round": last}

    def _round(self, embedding, points, labels, low, target, weight):
        model = self.model
        new_low, iou = decode_prompts(model, embedding, points, labels, low.detach())
        logits = model.upsample_logits(new_low)
        pred = logits.detach() > 0
        inter = (pred & target).flatten(1).sum(1).float()
        union = (pred | target).flatten(1).sum(1).float().clamp(min=1)
        iou_loss = (
            (iou[:, 0].float() - inter / union).square() * weight
        ).sum() / weight.sum().clamp(min=1)
        loss = dice_ce_loss(logits, target, weight, self.balanced)
        return new_low, loss + iou_loss, pred


@dataclass
class TrainOptions(RunOptions):
    """Everything ``fastsam3d train`` takes (see :func:`add_parser` for meanings)."""

    config: str = "tiny"
    out: str = "runs/train"
    init: str | None = None
    clicks: int = 8
    lr: float = 2e-4
    decoder_lr: float | None = None
    freeze_encoder: bool = False
    loss: str = "dice-bce"
    core_click_prob: float = 0.3


def build_or_load(options: TrainOptions, runtime: Runtime) -> Sam3D:
    """The model to train: ``--init`` weights if given, else a fresh ``--config`` model."""
    if options.init:
        model = load_model(options.init, progress=False)
    else:
        model = build_model(resolve_config(options.config, options.overrides))
    backend = options.attention or ("sdpa" if runtime.device.type == "cuda" else "math")
    set_attention_backend(model, backend)
    return model.to(runtime.device).train()


def make_optimizer(model: Sam3D, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW with an encoder group (lr) and a prompt-encoder/decoder group (decoder_lr)."""
    encoder = [p for p in model.image_encoder.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    groups = [
        {
            "params": rest,
            "lr": options.decoder_lr or options.lr,
            "base_lr": options.decoder_lr or options.lr,
        }
    ]
    if not options.freeze_encoder:
        groups.insert(0, {"params": encoder, "lr": options.lr, "base_lr": options.lr})
    return torch.optim.AdamW(groups, weight_decay=options.weight_decay, betas=(0.9, 0.999))


def seed_files(data_roots: list[str], cache: str) -> list[Path]:
    """Cached ``.npz`` files of every root: a cache folder as is, else discovered + prepared."""
    files = []
    for root in data_roots:
        files += cached_files(root) or prepare_cases(discover_cases(root), cache)
    return files


def load_seed_bank(options: RunOptions, device, min_voxels: int = 200) -> SeedBank:
    """Discover, preprocess (cached) and load every training case of ``options`` onto ``device``."""
    files = seed_files(options.data, options.cache)
    return SeedBank(files, device, min_voxels=min_voxels, size_power=options.class_size_power)


def train(options: TrainOptions) -> Path:
    """Run interactive training; returns the path of the final weights (``final.safetensors``).

    Writes ``latest.safetensors`` + ``latest.optim.safetensors`` every
    ``save_every_minutes`` and at the end, and ``metrics.jsonl``, under ``options.out``.
    """
    runtime = setup_runtime(options.device, options.amp)
    generator = seed_everything(options.seed, runtime)
    model = build_or_load(options, runtime)
    if options.freeze_encoder:
        model.image_encoder.requires_grad_(False)
    optimizer = make_optimizer(model, options)
    out = Path(options.out)
    counters = {"step": 0, "elapsed_s": 0.0}
    if options.resume:
        counters = load_resume_state(out, "latest", model, optimizer, generator, runtime)
    step_module = InteractiveStep(
        model, options.clicks, options.freeze_encoder, options.loss, options.core_click_prob
    )
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_module = DistributedDataParallel(
            step_module, device_ids=ids, find_unused_parameters=True
        )
    bank = load_seed_bank(options, runtime.device)
    sampling = SamplingConfig(
        size=options.crop, real_prob=options.real_prob, clip=model.config.intensity_clip
    )
    synth = SynthConfig(zoom=tuple(options.zoom))
    budget = Budget(
        options.minutes,
        options.steps,
        counters["step"],
        counters["elapsed_s"],
        options.stop_after_minutes,
    )
    run_loop(
        step_module,
        optimizer,
        lambda: sample_batch(bank, options.batch, generator, sampling, synth),
        budget,
        generator,
        runtime,
        LoopSettings.from_options(options, tag="train"),
    )
    final = out / "final.safetensors"
    if runtime.is_main:
        save_model(final, model, {"counters": {"step": budget.step}})
        logger.info("saved %s", final)
    return final


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastsam3d train``."""
    parser = subparsers.add_parser("train", help="interactive SAM-style training")
    parser.add_argument("--config", default="tiny", help="registered model config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field (repeatable)",
    )
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        help="nnU-Net dataset folder, the shared real-data folder or a folder of cached .npz "
        "seeds (repeatable)",
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="only fill the preprocessing cache, then exit"
    )
    parser.add_argument("--cache", default=TrainOptions.cache, help="preprocessing cache folder")
    parser.add_argument("--out", default=TrainOptions.out, help="checkpoint / metrics folder")
    parser.add_argument("--init", help="start from these weights instead of random")
    parser.add_argument("--resume", action="store_true", help="continue OUT/latest")
    parser.add_argument("--minutes", type=float, help="wall-clock budget of the training loop")
    parser.add_argument("--steps", type=int, help="step budget")
    parser.add_argument("--batch", type=int, default=TrainOptions.batch, help="per-GPU batch")
    parser.add_argument("--clicks", type=int, default=TrainOptions.clicks)
    parser.add_argument("--lr", type=float, default=TrainOptions.lr)
    parser.add_argument("--decoder-lr", type=float)
    parser.add_argument("--weight-decay", type=float, default=TrainOptions.weight_decay)
    parser.add_argument(
        "--freeze-encoder", action="store_true", help="train only the prompt encoder and decoder"
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default=TrainOptions.loss,
        help="Dice + voxel-mean BCE, or Dice + class-balanced BCE (for a random start)",
    )
    parser.add_argument(
        "--core-click-prob",
        type=float,
        default=TrainOptions.core_click_prob,
        help="chance that a later click aims at the error's core instead of a random error voxel",
    )
    parser.add_argument(
        "--crop", type=int, default=TrainOptions.crop, help="crop side (the model needs 128)"
    )
    add_sampling_arguments(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How training crops are drawn from the seed bank."""
    parser.add_argument("--real-prob", type=float, default=RunOptions.real_prob)
    parser.add_argument(
        "--class-size-power",
        type=float,
        default=RunOptions.class_size_power,
        help="draw a volume's classes in proportion to voxels**POWER (0: uniform; 0.5 "
        "favours organs over small parcels)",
    )
    parser.add_argument(
        "--zoom",
        type=float,
        nargs=2,
        default=RunOptions.zoom,
        metavar=("LOW", "HIGH"),
        help="isotropic crop scale range, log-uniform (0.5 shows half the field of view, as "
        "the session's fine grid does; default 1 1: off)",
    )


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Device, precision, attention backend, seed, logging and checkpoint-interval flags."""
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument(
        "--attention",
        choices=["math", "sdpa"],
        help="encoder attention backend (default sdpa on CUDA)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=TrainOptions.seed)
    parser.add_argument("--log-every", type=int, default=TrainOptions.log_every)
    parser.add_argument("--save-every-minutes", type=float, default=TrainOptions.save_every_minutes)
    parser.add_argument(
        "--stop-after-minutes",
        type=float,
        help="end this run early (checkpoint saved) without shortening the schedule; "
        "continue with --resume",
    )


def run(args: argparse.Namespace) -> str:
    """CLI entry: build :class:`TrainOptions` from ``args`` and train; returns the report."""
    if args.prepare_only:
        return "\n".join(str(path) for path in seed_files(args.data, args.cache))
    names = TrainOptions.__dataclass_fields__
    options = TrainOptions(**{k: v for k, v in vars(args).items() if k in names})
    return reports(f"wrote {train(options)}")
