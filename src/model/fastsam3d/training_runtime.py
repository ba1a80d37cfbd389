"""Shared training machinery: devices, DDP, mixed precision, schedules, checkpoints, metrics.

Used by ``training.py`` (interactive SAM-style training) and ``distillation.py``. Everything is
device-agnostic: CUDA (NCCL, bf16 autocast) when available, else CPU (gloo, fp32).

Checkpoints are two safetensors files per name: ``NAME.safetensors`` holds the model weights in
the official layout (loadable by :func:`fastsam3d.load_model`; the :class:`ModelConfig` is in
the metadata under ``config``) and ``NAME.optim.safetensors`` holds the optimizer state, the
random-generator states and the loop counters, so ``--resume`` continues where it stopped.
"""

from __future__ import annotations

import ast
import atexit
import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .errors import CheckpointError, InputError
from .modeling.configs import ModelConfig, get_config
from .modeling.sam3d import Sam3D

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Runtime:
    """Where this process runs: device, rank, world size, autocast dtype (None: fp32)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def autocast(self):
        """Mixed-precision context for forward passes (no-op in fp32)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(device: str | None = None, amp: str = "auto") -> Runtime:
    """Pick the device, join the torchrun process group if there is one, choose precision.

    Args:
        device: "cuda", "cpu", ... (None: cuda if available, else cpu).
        amp: "auto" (bf16 on CUDA, fp32 elsewhere), "bf16", "fp16" or "off".
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(f"cuda:{local}" if name == "cuda" else name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(leave_process_group)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
    if amp == "auto":
        amp_dtype = torch.bfloat16 if dev.type == "cuda" else None
    elif amp in dtypes:
        amp_dtype = dtypes[amp]
    else:
        raise InputError(f"unknown --amp {amp!r}; choose auto, bf16, fp16 or off")
    return Runtime(dev, rank, world, amp_dtype)


def leave_process_group() -> None:
    """Leave the torchrun process group, if one is joined (at exit: NCCL warns otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reports(text: str) -> str:
    """``text`` on the process that reports for a run (rank 0, or no process group), else ""
    (the other ranks of a torchrun job print nothing)."""
    joined = dist.is_available() and dist.is_initialized()
    return text if not joined or dist.get_rank() == 0 else ""


def seed_everything(seed: int, runtime: Runtime) -> torch.Generator:
    """Seed torch globally and return this rank's device generator (seed + rank)."""
    torch.manual_seed(seed + runtime.rank)
    generator = torch.Generator(device=runtime.device)
    generator.manual_seed(seed + 1000003 * runtime.rank)
    return generator


def _literal(text: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return _tuples(value)


def _tuples(value):
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


@dataclasses.dataclass
class RunOptions:
    """Options every training command shares: data, budget, precision, device, logging."""

    overrides: list[str] = dataclasses.field(default_factory=list)
    data: list[str] = dataclasses.field(default_factory=list)
    cache: str = ".cache/fastsam3d-seeds"
    resume: bool = False
    minutes: float | None = None
    steps: int | None = None
    batch: int = 2
    weight_decay: float = 0.1
    crop: int = 128
    real_prob: float = 0.3
    class_size_power: float = 0.0
    zoom: tuple[float, float] = (1.0, 1.0)
    amp: str = "auto"
    attention: str | None = None
    device: str | None = None
    seed: int = 2023
    log_every: int = 10
    save_every_minutes: float = 5.0
    stop_after_minutes: float | None = None


def resolve_config(name: str, overrides: list[str] | None = None) -> ModelConfig:
    """A registered config with ``key=value`` overrides (values as Python literals).

    Raises:
        InputError: malformed override or unknown field.
    """
    config = get_config(name)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise InputError(
                f"bad override {item!r}: use FIELD=VALUE with FIELD in {sorted(fields)}"
            )
        changes[key] = _literal(value)
    return config.replace(**changes) if changes else config


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def save_model(path: Path, model: Sam3D, extra: dict | None = None) -> None:
    """Write weights as safetensors (atomic), with the config and ``extra`` as JSON metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"config": model.config.to_json()}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    directory: Path, name: str, model: Sam3D, optimizer, counters: dict, generator
) -> Path:
    """Write ``NAME.safetensors`` (weights) and ``NAME.optim.safetensors`` (resume state)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory / f"{name}.safetensors", model, {"counters": counters})
    tensors, meta = _optimizer_tensors(optimizer)
    tensors["rng.device"] = generator.get_state().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    meta["counters"] = counters
    tmp = directory / f"{name}.optim.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"resume": json.dumps(meta)})
    tmp.replace(directory / f"{name}.optim.safetensors")
    return directory / f"{name}.safetensors"


def load_resume_state(
    directory: Path, name: str, model: Sam3D, optimizer, generator, runtime: Runtime | None = None
) -> dict:
    """Restore weights, optimizer and random states written by :func:`save_checkpoint`.

    Only rank 0's generator state is saved, so under DDP every rank's generator is re-seeded
    from its rank and the step instead (ranks must not draw the same batches).

    Returns:
        The loop counters stored with them.

    Raises:
        CheckpointError: no checkpoint to resume from.
    """
    from .checkpoints import load_state

    weights, extra = directory / f"{name}.safetensors", directory / f"{name}.optim.safetensors"
    if not (weights.is_file() and extra.is_file()):
        raise CheckpointError(f"nothing to resume in {directory}: {weights.name} is missing")
    load_state(model, load_file(str(weights)), str(weights))
    tensors = load_file(str(extra))
    with safe_open(str(extra), "pt") as handle:
        meta = json.loads(handle.metadata()["resume"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, field = key.split(".", 2)
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["rng.device"])
    torch.set_rng_state(tensors["rng.torch"])
    counters = meta["counters"]
    if runtime is not None and runtime.world_size > 1:
        offset = 7919 * (runtime.rank + 1) + counters["step"]
        generator.manual_seed(int(generator.initial_seed()) + offset)
    return counters


class Budget:
    """Training progress in [0, 1] from steps and wall-clock minutes, whichever ends first.

    ``stop_after_minutes`` ends this process's share early (a run split over several
    ``--resume`` calls) without changing the schedule. All ranks agree on when to stop: the
    decision is all-reduced when distributed.
    """

    def __init__(
        self,
        minutes: float | None,
        max_steps: int | None,
        start_step: int = 0,
        spent_s: float = 0.0,
        stop_after_minutes: float | None = None,
    ) -> None:
        if minutes is None and max_steps is None:
            raise InputError("give a time budget (--minutes) or a step count (--steps)")
        self.seconds = None if minutes is None else 60.0 * minutes
        self.max_steps = max_steps
        self.step = start_step
        self.spent_s = spent_s
        self.stop_s = None if stop_after_minutes is None else 60.0 * stop_after_minutes
        self._start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return self.spent_s + time.monotonic() - self._start

    @property
    def progress(self) -> float:
        parts = []
        if self.seconds:
            parts.append(self.elapsed / self.seconds)
        if self.max_steps:
            parts.append(self.step / self.max_steps)
        return min(max(parts), 1.0)

    def done(self, runtime: Runtime) -> bool:
        paused = self.stop_s is not None and time.monotonic() - self._start >= self.stop_s
        flag = torch.tensor([float(self.progress >= 1.0 or paused)], device=runtime.device)
        if runtime.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def cosine_lr(base: float, progress: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to floor * base."""
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    t = (progress - warmup) / max(1.0 - warmup, 1e-8)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class MetricsLog:
    """Append-only JSON-lines metrics file, written by rank 0 only."""

    def __init__(self, path: Path, runtime: Runtime) -> None:
        self.path = path if runtime.is_main else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def set_attention_backend(model: torch.nn.Module, backend: str) -> None:
    """Switch every encoder attention layer on the "math" reference path to ``backend``.

    Layers built for another backend by their config (e.g. "sparse") keep it.
    """
    for module in model.modules():
        if getattr(module, "backend", None) == "math" and hasattr(module, "rel_pos_tables"):
            module.backend = backend


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """What :func:`run_loop` needs besides the model: output folder, batch, logging, saving."""

    out: Path
    batch: int
    steps: int | None
    log_every: int
    save_every_minutes: float
    tag: str

    @classmethod
    def from_options(cls, options, tag: str) -> LoopSettings:
        return cls(
            Path(options.out),
            options.batch,
            options.steps,
            options.log_every,
            options.save_every_minutes,
            tag,
        )


def _optimizer_step(loss, model, optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()


def run_loop(
    step_module,
    optimizer,
    next_batch,
    budget: Budget,
    generator,
    runtime: Runtime,
    settings: LoopSettings,
    on_step=None,
) -> None:
    """The shared optimisation loop until ``budget`` is spent.

    Args:
        step_module: module (maybe DDP-wrapped, with ``.model``) whose forward takes
            ``(image, target, valid, generator)`` and returns ``(loss, stats)``, stats being
            tensors averaged into the metrics.
        optimizer: with ``base_lr`` in every param group (cosine schedule on progress).
        next_batch: returns a :class:`fastsam3d.data.Batch`.
        budget: steps / minutes.
        generator: the device generator (saved with checkpoints).
        runtime: device, rank, precision.
        settings: output folder (``metrics.jsonl``, ``TAG-latest`` checkpoints), logging.
        on_step: called with the progress before every step (e.g. a layer schedule); may
            return a dict of extra metrics.
    """
    model = unwrap(step_module).model
    metrics = MetricsLog(settings.out / "metrics.jsonl", runtime)
    scaler = torch.amp.GradScaler(enabled=runtime.amp_dtype == torch.float16)
    bar = tqdm(
        total=settings.steps,
        initial=budget.step,
        disable=not runtime.is_main,
        desc=settings.tag,
        dynamic_ncols=True,
    )
    last_save = tick = time.monotonic()
    window: list[dict] = []
    while not budget.done(runtime):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(group["base_lr"], budget.progress)
        extra = on_step(budget.progress) if on_step is not None else None
        with torch.no_grad():
            batch = next_batch()
        with runtime.autocast():
            loss, stats = step_module(batch.image, batch.target, batch.valid, generator)
        _optimizer_step(loss, model, optimizer, scaler)
        budget.step += 1
        bar.update(1)
        window.append(
            {"loss": loss.detach(), **{k: v.detach().float().nanmean() for k, v in stats.items()}}
        )
        if budget.step % settings.log_every == 0:
            record = _record(window, budget, optimizer, settings, time.monotonic() - tick, runtime)
            metrics.write({**record, **(extra or {})})
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            tick, window = time.monotonic(), []
        if runtime.is_main and time.monotonic() - last_save > 60 * settings.save_every_minutes:
            _save_latest(settings, model, optimizer, budget, generator)
            last_save = time.monotonic()
    bar.close()
    if runtime.is_main:
        _save_latest(settings, model, optimizer, budget, generator)


def _save_latest(settings: LoopSettings, model, optimizer, budget: Budget, generator) -> None:
    counters = {"step": budget.step, "elapsed_s": budget.elapsed}
    save_checkpoint(settings.out, latest_name(settings.tag), model, optimizer, counters, generator)


def latest_name(tag: str) -> str:
    """Checkpoint name of a loop's resumable state (``latest`` for plain training)."""
    return "latest" if tag == "train" else f"{tag}-latest"


def _record(window, budget: Budget, optimizer, settings: LoopSettings, seconds: float, runtime):
    means = {k: torch.stack([w[k] for w in window]).nanmean().item() for k in window[0]}
    return {
        "stage": settings.tag,
        "step": budget.step,
        "elapsed_s": round(budget.elapsed, 2),
        "progress": round(budget.progress, 4),
        **means,
        "lr": optimizer.param_groups[0]["lr"],
        "samples_per_s": len(window) * settings.batch * runtime.world_size / max(seconds, 1e-9),
    }
