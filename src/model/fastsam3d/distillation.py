"""Layer-wise progressive distillation of a student encoder (``fastsam3d distill``).

Stages, run in order within one time budget (``--stage-weights`` splits it):

1. ``layerwise`` (paper Eq. 1-2): ``L = (1/k) sum_{i<=k} MSE(f_t^(m(i))(x), f_s^(i)(x))`` over
   block outputs, with ``m(i) = round(i * depth_teacher / depth_student)`` (``2i`` for 12 -> 6)
   and ``k = ceil(progress * depth_student)`` (the paper's ``ceil(iter * 6 / total)``), clamped
   to [1, depth_student]. When the widths differ, a learned linear map per pair takes the
   student's tokens to the teacher's width.
2. ``embedding``: MSE between the neck embeddings (the official "logit-level" stage).
3. ``logits``: MSE between the students' and the teacher's decoder logits for the same
   simulated clicks (each model decodes with its own previous logits).
4. ``decoder``: interactive fine-tune of the prompt encoder and decoder on the student's frozen
   embeddings (:class:`fastsam3d.training.InteractiveStep`).

Teacher and student each run in their own block wiring (their configs' ``block_style``) and see
the same normalised input. The student's encoder starts from random weights (as the paper
does) unless ``--init-student teacher``; its prompt encoder and decoder are copied from the
teacher when the shapes allow, else random.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import load_model
from .clicks import sample_training_clicks
from .data import SamplingConfig, sample_batch
from .modeling.configs import build_model
from .modeling.sam3d import Sam3D
from .synth import SynthConfig
from .training import (
    InteractiveStep,
    add_runtime_arguments,
    add_sampling_arguments,
    decode_prompts,
    load_seed_bank,
)
from .training_runtime import (
    Budget,
    LoopSettings,
    RunOptions,
    latest_name,
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

STAGES = ("layerwise", "embedding", "logits", "decoder")


def teacher_block(student_block: int, student_depth: int, teacher_depth: int) -> int:
    """1-based teacher block paired with 1-based student block ``i``: round(i * Dt / Ds)."""
    return max(1, min(teacher_depth, round(student_block * teacher_depth / student_depth)))


def active_layers(progress: float, student_depth: int) -> int:
    """k = ceil(progress * depth), clamped to [1, depth] (paper: ceil(iter * 6 / total))."""
    return max(1, min(student_depth, math.ceil(progress * student_depth - 1e-9)))


def layerwise_loss(
    teacher_blocks: list[torch.Tensor],
    student_blocks: list[torch.Tensor],
    k: int,
    projections: nn.ModuleList | None = None,
) -> torch.Tensor:
    """(1/k) sum over the first k student blocks of MSE(teacher block m(i), student block i).

    Args:
        teacher_blocks: all teacher block outputs, channels-last (B, G, G, G, Ct).
        student_blocks: all student block outputs (B, G, G, G, Cs).
        k: how many student blocks take part.
        projections: per student block a map Cs -> Ct (None when the widths match).
    """
    depth_s, depth_t = len(student_blocks), len(teacher_blocks)
    total = 0.0
    for i in range(1, k + 1):
        student = student_blocks[i - 1]
        if projections is not None:
            student = projections[i - 1](student)
        teacher = teacher_blocks[teacher_block(i, depth_s, depth_t) - 1]
        total = total + F.mse_loss(student.float(), teacher.float())
    return total / k


class DistillStep(nn.Module):
    """Student-side forward of one distillation stage (the teacher is passed in, not owned).

    Args:
        student: the student :class:`Sam3D`.
        teacher: the frozen teacher (kept out of the module tree so DDP ignores it).
        stage: one of :data:`STAGES` except "decoder".
        clicks: click rounds for the "logits" stage.
    """

    def __init__(self, student: Sam3D, teacher: Sam3D, stage: str, clicks: int = 4) -> None:
        super().__init__()
        self.model = student
        self._teacher = (teacher,)
        self.stage = stage
        self.clicks = clicks
        self.k = 1
        dim_s = student.config.embed_dim
        dim_t = teacher.config.embed_dim
        self.projections = (
            nn.ModuleList(nn.Linear(dim_s, dim_t) for _ in range(student.config.depth))
            if dim_s != dim_t and stage == "layerwise"
            else None
        )

    @property
    def teacher(self) -> Sam3D:
        return self._teacher[0]

    def forward(self, image, target, valid, generator) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            teacher_emb, teacher_blocks = self.teacher.image_encoder.forward_features(image)
        if self.stage == "layerwise":
            _, student_blocks = self.model.image_encoder.forward_features(image)
            loss = layerwise_loss(teacher_blocks, student_blocks, self.k, self.projections)
            return loss, {}
        student_emb = self.model.image_encoder(image)
        if self.stage == "embedding":
            return F.mse_loss(student_emb.float(), teacher_emb.float()), {}
        return self._logit_loss(student_emb, teacher_emb, target, generator)

    def _logit_loss(self, student_emb, teacher_emb, target, generator):
        batch = target.shape[0]
        low_t = student_emb.new_zeros((batch, 1, *self.model.prompt_encoder.mask_input_size))
        low_s, pred, losses = low_t, torch.zeros_like(target), []
        for index in range(self.clicks):
            with torch.no_grad():
                points, labels = sample_training_clicks(pred, target, generator, index == 0)
                low_t, _ = decode_prompts(self.teacher, teacher_emb, points, labels, low_t)
                pred = self.teacher.upsample_logits(low_t) > 0
            new_low_s, _ = decode_prompts(self.model, student_emb, points, labels, low_s.detach())
            losses.append(F.mse_loss(new_low_s.float(), low_t.float()))
            low_s = new_low_s
        return torch.stack(losses).mean(), {}


def transfer_from_teacher(student: Sam3D, teacher: Sam3D, encoder: bool) -> list[str]:
    """Copy same-shaped tensors from the teacher into the student; returns the copied keys.

    Always the prompt encoder and mask decoder; with ``encoder`` also patch embedding,
    position embedding, neck and student block i <- teacher block m(i) (see
    :func:`teacher_block`).
    """
    source, target = teacher.state_dict(), student.state_dict()
    depth_s, depth_t = student.config.depth, teacher.config.depth
    copied = []
    for key, value in target.items():
        origin = key
        if key.startswith("image_encoder."):
            if not encoder:
                continue
            parts = key.split(".")
            if parts[1] == "blocks":
                parts[2] = str(teacher_block(int(parts[2]) + 1, depth_s, depth_t) - 1)
                origin = ".".join(parts)
        if origin in source and source[origin].shape == value.shape:
            target[key] = source[origin].clone()
            copied.append(key)
    student.load_state_dict(target)
    return copied


@dataclass
class DistillOptions(RunOptions):
    """Everything ``fastsam3d distill`` takes (see :func:`add_parser`)."""

    teacher: str = ""
    student_config: str = "fastsam3d"
    student: str | None = None
    init_student: str = "scratch"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    stage_weights: list[float] = field(default_factory=lambda: [4.0, 2.0, 2.0, 2.0])
    out: str = "runs/distill"
    clicks: int = 4
    lr: float = 4e-4


def build_student(options: DistillOptions, teacher: Sam3D) -> Sam3D:
    """The student: ``--student`` weights, or a fresh ``--student-config`` initialised as asked."""
    if options.student:
        return load_model(options.student, progress=False)
    student = build_model(resolve_config(options.student_config, options.overrides))
    copied = transfer_from_teacher(student, teacher, encoder=options.init_student == "teacher")
    logger.info("student initialised: %d tensors copied from the teacher", len(copied))
    return student


def _stage_budgets(options: DistillOptions) -> list[tuple[float | None, int | None]]:
    if len(options.stage_weights) < len(options.stages):
        raise ValueError("give one --stage-weights entry per stage")
    weights = options.stage_weights[: len(options.stages)]
    shares = [w / sum(weights) for w in weights]
    return [
        (
            None if options.minutes is None else options.minutes * share,
            None if options.steps is None else max(1, round(options.steps * share)),
        )
        for share in shares
    ]


def _stage_module(stage: str, student: Sam3D, teacher: Sam3D, options: DistillOptions):
    """The step module and optimizer of one stage."""
    if stage == "decoder":
        student.image_encoder.requires_grad_(False)
        module = InteractiveStep(student, options.clicks, freeze_encoder=True)
    else:
        student.image_encoder.requires_grad_(True)
        module = DistillStep(student, teacher, stage, options.clicks)
    params = [p for p in module.parameters() if p.requires_grad]
    if stage in ("layerwise", "embedding"):
        params = [p for n, p in module.named_parameters() if "image_encoder" in n or "proj" in n]
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": options.lr, "base_lr": options.lr}],
        weight_decay=options.weight_decay,
    )
    return module, optimizer


def _run_stage(
    stage, budget_spec, student, teacher, bank, generator, runtime, options, stop_minutes
) -> Path | None:
    """Train one stage; None when ``stop_minutes`` ran out first (resume later)."""
    out = Path(options.out)
    module, optimizer = _stage_module(stage, student, teacher, options)
    module.to(runtime.device)
    counters = {"step": 0, "elapsed_s": 0.0}
    if options.resume and (out / f"{latest_name(stage)}.optim.safetensors").is_file():
        counters = load_resume_state(
            out, latest_name(stage), student, optimizer, generator, runtime
        )
    wrapped = module
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
    sampling = SamplingConfig(
        size=options.crop, real_prob=options.real_prob, clip=teacher.config.intensity_clip
    )
    synth = SynthConfig(zoom=tuple(options.zoom))
    budget = Budget(*budget_spec, counters["step"], counters["elapsed_s"], stop_minutes)
    on_step = _layer_schedule(module, student.config.depth) if stage == "layerwise" else None
    settings = LoopSettings(
        out, options.batch, budget_spec[1], options.log_every, options.save_every_minutes, stage
    )
    run_loop(
        wrapped,
        optimizer,
        lambda: sample_batch(bank, options.batch, generator, sampling, synth),
        budget,
        generator,
        runtime,
        settings,
        on_step,
    )
    if budget.progress < 1.0:
        return None
    path = out / f"student-{stage}.safetensors"
    if runtime.is_main:
        save_model(path, student, {"stage": stage, "steps": budget.step})
    return path


def _layer_schedule(module: DistillStep, depth: int):
    def update(progress: float) -> dict:
        module.k = active_layers(progress, depth)
        return {"k": module.k}

    return update


def distill(options: DistillOptions) -> Path | None:
    """Run the requested stages in order; returns the final student weights.

    Writes ``student-STAGE.safetensors`` after each stage, ``STAGE-latest`` resume state and
    ``metrics.jsonl`` under ``options.out``, and ``student.safetensors`` at the end. With
    ``resume``, stages whose ``student-STAGE.safetensors`` exists are skipped. When
    ``stop_after_minutes`` runs out first, returns None (continue with ``resume``).
    """
    unknown = [s for s in options.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
    runtime = setup_runtime(options.device, options.amp)
    generator = seed_everything(options.seed, runtime)
    teacher = load_model(options.teacher, runtime.device, progress=False).requires_grad_(False)
    student = build_student(options, teacher).to(runtime.device).train()
    backend = options.attention or ("sdpa" if runtime.device.type == "cuda" else "math")
    set_attention_backend(teacher, backend)
    set_attention_backend(student, backend)
    bank = load_seed_bank(options, runtime.device)
    out = Path(options.out)
    deadline = None
    if options.stop_after_minutes is not None:
        deadline = time.monotonic() + 60 * options.stop_after_minutes
    for stage, spec in zip(options.stages, _stage_budgets(options), strict=True):
        done = out / f"student-{stage}.safetensors"
        if options.resume and done.is_file():
            student = load_model(done, runtime.device, progress=False).train()
            continue
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0) / 60
        finished = _run_stage(
            stage, spec, student, teacher, bank, generator, runtime, options, left
        )
        if finished is None:
            logger.info("stopped during stage %s: continue with --resume", stage)
            return None
    final = out / "student.safetensors"
    if runtime.is_main:
        save_model(final, student, {"stages": options.stages})
    return final


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastsam3d distill``."""
    parser = subparsers.add_parser("distill", help="layer-wise progressive distillation")
    parser.add_argument("--teacher", required=True, help="teacher weights (path or registry name)")
    parser.add_argument("--student-config", default=DistillOptions.student_config)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a student config field",
    )
    parser.add_argument("--student", help="continue from these student weights")
    parser.add_argument(
        "--init-student",
        choices=["scratch", "teacher"],
        default="scratch",
        help="student encoder: random (paper) or copied blocks m(i) of the teacher",
    )
    parser.add_argument(
        "--stages",
        type=lambda s: s.split(","),
        default=list(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)}",
    )
    parser.add_argument(
        "--stage-weights",
        type=lambda s: [float(v) for v in s.split(",")],
        default=DistillOptions().stage_weights,
        help="share of the budget of each stage",
    )
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--cache", default=DistillOptions.cache)
    parser.add_argument("--out", default=DistillOptions.out)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--minutes", type=float, help="wall-clock budget of all stages")
    parser.add_argument("--steps", type=int, help="step budget of all stages")
    parser.add_argument("--batch", type=int, default=DistillOptions.batch)
    parser.add_argument("--clicks", type=int, default=DistillOptions.clicks)
    parser.add_argument("--lr", type=float, default=DistillOptions.lr)
    parser.add_argument("--weight-decay", type=float, default=DistillOptions.weight_decay)
    parser.add_argument("--crop", type=int, default=DistillOptions.crop)
    add_sampling_arguments(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> str:
    """CLI entry: build :class:`DistillOptions` from ``args`` and distil; returns the report."""
    names = DistillOptions.__dataclass_fields__
    final = distill(DistillOptions(**{k: v for k, v in vars(args).items() if k in names}))
    if final is None:
        return reports("stopped early (--stop-after-minutes): rerun with --resume")
    return reports(f"wrote {final}")
