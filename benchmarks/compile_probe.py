"""The GPU fast path with and without ``torch.compile``, beside each other.

Usage: ``python benchmarks/compile_probe.py [--mode default] [--model fastsam3d]
[--dtype bfloat16|float32] [--json F]``.
Random weights, CUDA only; both variants replay CUDA graphs; medians of synchronised runs.
"""

import argparse
import copy
import json
import time

import torch

from fastsam3d.benchmark import time_median
from fastsam3d.modeling.configs import build_model


def timed_first_call(fn) -> float:
    """Seconds of the first call (compilation and graph capture)."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def encoder_row(fast, compiled, x: torch.Tensor) -> dict:
    """Medians of both encoders on ``x``, the first compiled call, and their difference."""
    first = timed_first_call(lambda: compiled.encode(x))
    ref, out = fast.encode(x), compiled.encode(x)
    return {
        "fast_ms": time_median(lambda: fast.encode(x), x.device, 50, 10),
        "compiled_ms": time_median(lambda: compiled.encode(x), x.device, 50, 10),
        "first_call_s": first,
        "max_rel_diff": ((out - ref).abs().max() / ref.abs().max()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--model", default="fastsam3d")
    parser.add_argument("--dtype", default="bfloat16", help="encoder precision of both paths")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    reference = build_model(args.model).eval().to(device)
    dtype = getattr(torch, args.dtype)
    fast = copy.deepcopy(reference).prepare_inference(dtype=dtype)
    compiled = copy.deepcopy(reference).prepare_inference(dtype=dtype, compile_mode=args.mode)
    report = {"device": torch.cuda.get_device_name(), "mode": args.mode, "model": args.model}
    report["dtype"] = args.dtype
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, 1, 128, 128, 128, device=device)
            report[f"encoder batch {batch}"] = encoder_row(fast, compiled, x)
        emb = fast.encode(torch.randn(1, 1, 128, 128, 128, device=device))
        points = torch.tensor([[[64.0, 60.0, 70.0], [50.0, 70.0, 66.0]]], device=device)
        labels = torch.tensor([[1, 0]], device=device)
        previous = torch.randn(1, 1, 32, 32, 32, device=device)
        first = timed_first_call(lambda: compiled.decode(emb, points, labels, previous))
        ref, out = (
            fast.decode(emb, points, labels, previous),
            compiled.decode(emb, points, labels, previous),
        )
        report["click"] = {
            "fast_ms": time_median(
                lambda: fast.decode(emb, points, labels, previous), device, 100, 20
            ),
            "compiled_ms": time_median(
                lambda: compiled.decode(emb, points, labels, previous), device, 100, 20
            ),
            "first_call_s": first,
            "max_abs_diff_logits": (out[0] - ref[0]).abs().max().item(),
            "mask_voxels_equal": (out[2] == ref[2]).float().mean().item(),
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
