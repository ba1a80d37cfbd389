"""``fastsam3d bench``: fast paths beside the exact fp32 reference, measured in the same run.

Timings are medians of synchronised runs after warm-up, with random weights at the released
sizes (speed does not depend on the values). The reference is this project's unprepared fp32
model (official order of operations, math attention, 3D convolutions, generic trilinear
upsampling); the fast path is the same model after :meth:`Sam3D.prepare_inference` (fp32),
and rows marked "opt-in" time the variants a user can ask for (int8 products on CPUs, a bf16
encoder on GPUs, each also through ``torch.compile``).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .modeling.configs import build_model
from .modeling.sam3d import Sam3D

logger = logging.getLogger(__name__)


@dataclass
class Measurement:
    """One benchmarked path: reference and fast medians (ms), peak memory (MiB, CUDA)."""

    name: str
    batch: int
    reference_ms: float | None
    fast_ms: float
    reference_peak_mib: float | None = None
    fast_peak_mib: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.reference_ms / self.fast_ms if self.reference_ms else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms, synchronised, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _pair(name, batch, reference, fast, device, repeats, warmup) -> Measurement:
    ref_ms = time_median(reference, device, repeats, warmup) if reference else None
    fast_ms = time_median(fast, device, repeats, warmup)
    return Measurement(
        name=name,
        batch=batch,
        reference_ms=ref_ms,
        fast_ms=fast_ms,
        reference_peak_mib=_peak_mib(reference, device) if reference else None,
        fast_peak_mib=_peak_mib(fast, device),
    )


def _models(name: str, device: torch.device) -> tuple[Sam3D, Sam3D]:
    reference = build_model(name).eval().to(device)
    fast = copy.deepcopy(reference).prepare_inference()
    return reference, fast


def _click(model: Sam3D, embedding, points, labels, previous):
    return model.decode(embedding, points, labels, previous)


def ball_logits(centre, radius: float = 20.0, device=None) -> torch.Tensor:
    """Low-res logits (1, 1, 32, 32, 32) of a ball (model voxels, 20 = 30 mm) at ``centre``,
    the size of an organ: random weights give masks that fill the whole ROI."""
    lattice = torch.arange(32, dtype=torch.float32, device=device) * 4 + 1.5
    axes = [(lattice - c) ** 2 for c in centre]
    dist = (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]).sqrt()
    return (radius - dist).clamp(-8, 8)[None, None]


def opt_in_variants(device: torch.device) -> list[tuple[str, dict]]:
    """Opt-in fast paths benched beside the default: int8 (+ compile) on CPUs, bf16 (+
    compile) on GPUs."""
    if device.type == "cpu":
        return [
            ("int8 products", {"dtype": torch.int8}),
            ("int8 products + torch.compile", {"dtype": torch.int8, "compile_mode": "default"}),
        ]
    variants = [("bf16", {"dtype": torch.bfloat16})]
    if device.type == "cuda":
        variants.append(
            ("bf16 + torch.compile", {"dtype": torch.bfloat16, "compile_mode": "default"})
        )
    return variants


def run_benchmarks(
    device: str | torch.device = "cpu",
    repeats: int = 20,
    warmup: int = 5,
    teacher: bool = True,
    batch: int = 64,
    student: str = "fastsam3d",
) -> dict:
    """Benchmark encoder, click path, teacher encoder and batch throughput.

    Returns:
        A JSON-ready dict with the device description and one entry per measurement.
    """
    device = torch.device(device)
    results: list[Measurement] = []
    slow_repeats = max(3, repeats // 4) if device.type == "cpu" else repeats

    def add_opt_in(models, label: str, size: int, call, runs: int, warm: int) -> None:
        """One row per opt-in variant, beside the last row's reference; a variant that fails
        to compile here is reported and left out."""
        reference_ms = results[-1].reference_ms
        for name, model in models:
            try:
                fast_ms = time_median(functools.partial(call, model), device, runs, warm)
            except torch._dynamo.exc.TorchDynamoException as error:
                logger.warning("%s, %s: left out (%s)", label, name, error)
                continue
            results.append(Measurement(f"{label}, {name} (opt-in)", size, reference_ms, fast_ms))

    def prepared(model: Sam3D) -> list[tuple[str, Sam3D]]:
        return [
            (name, copy.deepcopy(model).prepare_inference(**options))
            for name, options in opt_in_variants(device)
        ]

    with torch.inference_mode():
        reference, fast = _models(student, device)
        variants = prepared(reference)
        x = torch.randn(1, 1, 128, 128, 128, device=device)
        results.append(
            _pair(
                "student encoder",
                1,
                lambda: reference.encode(x),
                lambda: fast.encode(x),
                device,
                slow_repeats,
                warmup,
            )
        )
        add_opt_in(variants, "student encoder", 1, lambda m: m.encode(x), slow_repeats, warmup)
        emb = reference.encode(x)
        points = torch.tensor([[[64.0, 60.0, 70.0]]], device=device)
        labels = torch.ones(1, 1, dtype=torch.int64, device=device)
        previous = torch.randn(1, 1, 32, 32, 32, device=device)
        results.append(
            _pair(
                "click (prompt + decoder + 128^3 upsample + threshold)",
                1,
                lambda: _click(reference, emb, points, labels, previous),
                lambda: _click(fast, emb, points, labels, previous),
                device,
                repeats,
                warmup,
            )
        )
        # a compiled encoder leaves the decoder as it was, except on CPUs (compiled too)
        decoder_variants = [
            (name, model)
            for name, model in variants
            if model._compiled_encoder is None or model._compiled_decode is not None
        ]
        add_opt_in(
            [
                (name, model)
                for name, model in decoder_variants
                if model._compiled_decode is not None
            ],
            "click (prompt + decoder + 128^3 upsample + threshold)",
            1,
            lambda m: _click(m, emb, points, labels, previous),
            repeats,
            warmup,
        )
        results.append(
            _pair(
                "decode without the 128^3 mask (what Session runs)",
                1,
                lambda: reference.decode(emb, points, labels, previous, return_mask=False),
                lambda: fast.decode(emb, points, labels, previous, return_mask=False),
                device,
                repeats,
                warmup,
            )
        )
        add_opt_in(
            decoder_variants,
            "decode without the 128^3 mask",
            1,
            lambda m: m.decode(emb, points, labels, previous, return_mask=False),
            repeats,
            warmup,
        )
        ball = ball_logits((64.0, 60.0, 70.0), device=device)
        results.append(
            _pair(
                "upsample + threshold of a 30 mm object's logits",
                1,
                lambda: reference.upsample_logits(ball) > reference.mask_threshold,
                lambda: fast.threshold_logits(ball),
                device,
                repeats,
                warmup,
            )
        )
        if batch > 1:
            xb = torch.randn(batch, 1, 128, 128, 128, device=device)
            runs = max(3, slow_repeats // 2)
            results.append(
                _pair(
                    "student encoder (batch)",
                    batch,
                    lambda: reference.encode(xb),
                    lambda: fast.encode(xb),
                    device,
                    runs,
                    2,
                )
            )
            if device.type != "cpu":
                add_opt_in(
                    variants, "student encoder (batch)", batch, lambda m: m.encode(xb), runs, 2
                )
        del reference, fast, variants
        if teacher:
            reference, fast = _models("sam-med3d-turbo", device)
            results.append(
                _pair(
                    "teacher encoder (SAM-Med3D turbo)",
                    1,
                    lambda: reference.encode(x),
                    lambda: fast.encode(x),
                    device,
                    slow_repeats,
                    2,
                )
            )
            if device.type != "cpu":
                add_opt_in(
                    prepared(reference),
                    "teacher encoder",
                    1,
                    lambda m: m.encode(x),
                    slow_repeats,
                    2,
                )
    return {
        "device": describe_device(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [asdict(m) | {"speedup": m.speedup} for m in results],
    }


def describe_device(device: torch.device) -> str:
    """A human-readable device name (GPU model or CPU description)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def format_table(report: dict) -> str:
    """Markdown table of a :func:`run_benchmarks` report."""
    lines = [
        f"Device: {report['device']}, torch {report['torch']}",
        "",
        "| path | batch | reference fp32 (ms) | fast (ms) | speedup | per volume (ms) "
        "| peak MiB ref / fast |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ref = f"{r['reference_ms']:.3f}" if r["reference_ms"] else "-"
        speed = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        mem = (
            f"{r['reference_peak_mib']:.0f} / {r['fast_peak_mib']:.0f}"
            if r["fast_peak_mib"] is not None
            else "-"
        )
        per = r["fast_ms"] / r["batch"]
        lines.append(
            f"| {r['name']} | {r['batch']} | {ref} | {r['fast_ms']:.3f} | {speed} | "
            f"{per:.3f} | {mem} |"
        )
    return "\n".join(lines)


def add_bench_command(sub) -> None:
    """Register ``fastsam3d bench``."""
    p = sub.add_parser("bench", help="time the fast paths beside the fp32 reference")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per path")
    p.add_argument("--batch", type=int, default=64, help="batch size of the throughput run")
    p.add_argument("--student", default="fastsam3d", help="student config (e.g. fastsam3d-lite)")
    p.add_argument("--no-teacher", action="store_true", help="skip the 12-block teacher")
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> str:
    from .predictor import resolve_device

    device = resolve_device(args.device)
    report = run_benchmarks(
        device, args.repeats, teacher=not args.no_teacher, batch=args.batch, student=args.student
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return format_table(report)
