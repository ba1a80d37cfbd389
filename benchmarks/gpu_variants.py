"""Encoder and click latency of the GPU fast path's opt-in variants, side by side.

Usage: ``python benchmarks/gpu_variants.py [--model fastsam3d] [--json F]``.
Random weights. On CUDA every variant replays CUDA graphs (``prepare_inference``); rows
differ in encoder attention backend ("sdpa": rel-pos bias as a mask, "flash": bias folded
into the dot product) and ``torch.compile`` mode. Each row also gives the
largest difference from the first row's output. A variant that fails is reported, not fatal.
"""

import argparse
import copy
import json
import logging
import time

import torch

from fastsam3d.benchmark import time_median
from fastsam3d.modeling.configs import build_model

logger = logging.getLogger(__name__)

ENCODER_VARIANTS = {
    "bf16, sdpa": {"dtype": torch.bfloat16},
    "bf16, flash": {"dtype": torch.bfloat16, "attention": "flash"},
    "bf16, sdpa, compiled": {"dtype": torch.bfloat16, "compile_mode": "default"},
    "bf16, flash, compiled": {
        "dtype": torch.bfloat16,
        "attention": "flash",
        "compile_mode": "default",
    },
}
CLICK_VARIANTS = {"fp32 decoder": {}}  # compile_mode compiles the encoder only


def first_and_median(fn, device, iters: int) -> tuple[float, float, torch.Tensor]:
    """Seconds of the first call, then the median of ``iters`` synchronised calls (ms)."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    return first, time_median(fn, device, iters, 10), out


def run_variants(reference, variants: dict, call, device, iters: int) -> dict:
    """Time ``call(model)`` for every variant; differences against the first one's output."""
    rows, baseline = {}, None
    for name, options in variants.items():
        try:
            model = copy.deepcopy(reference).prepare_inference(**options)
            first, median, out = first_and_median(lambda m=model: call(m), device, iters)
        except Exception as error:  # a compile failure must not end the benchmark
            logger.warning("%s failed: %s", name, error)
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        out = out.float()
        baseline = out if baseline is None else baseline
        diff = ((out - baseline).abs().max() / baseline.abs().max()).item()
        rows[name] = {"ms": median, "first_call_s": first, "max_rel_diff_vs_first": diff}
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fastsam3d")
    parser.add_argument("--batch", type=int, default=64, help="the throughput rows' batch")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script out")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = build_model(args.model).eval().to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = {"device": name, "model": args.model}
    x = torch.randn(1, 1, 128, 128, 128, device=device)
    batch = torch.randn(args.batch, 1, 128, 128, 128, device=device)
    with torch.inference_mode():
        emb = reference.encode(x)
        points = torch.tensor([[[64.0, 60.0, 70.0], [50.0, 70.0, 66.0]]], device=device)
        labels = torch.tensor([[1, 0]], device=device)
        previous = torch.randn(1, 1, 32, 32, 32, device=device)
        report["encoder, batch 1"] = run_variants(
            reference, ENCODER_VARIANTS, lambda m: m.encode(x), device, 100
        )
        report[f"encoder, batch {args.batch}"] = run_variants(
            reference, ENCODER_VARIANTS, lambda m: m.encode(batch), device, 20
        )
        report["click (with the 128^3 mask)"] = run_variants(
            reference,
            CLICK_VARIANTS,
            lambda m: m.decode(emb, points, labels, previous)[0],
            device,
            200,
        )
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
