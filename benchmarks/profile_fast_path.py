"""Where the fast path spends its time: top kernels of one encoder call and one click.

Usage: ``python benchmarks/profile_fast_path.py [--device cuda] [--model fastsam3d]``.
Each table is preceded by the number of device kernels and their summed time. On CUDA the
click is also timed as its CUDA graph's replay alone (CUDA events), which leaves out the host
work of ``decode`` (input copies, output clones).
"""

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from fastsam3d.modeling.configs import build_model


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 500) -> float:
    """Mean time of one replay of ``graph``, in ms, after a warm-up."""
    for _ in range(20):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="fastsam3d")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(args.model).eval().to(device)
    fast = copy.deepcopy(model).prepare_inference(cuda_graphs=False)
    x = torch.randn(1, 1, 128, 128, 128, device=device)
    points = torch.tensor([[[64.0, 60.0, 70.0]]], device=device)
    labels = torch.ones(1, 1, dtype=torch.int64, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with torch.inference_mode():
        emb = fast.encode(x)
        fast.decode(emb, points, labels)
        for name, fn in [
            ("encoder", lambda: fast.encode(x)),
            ("click", lambda: fast.decode(emb, points, labels)),
        ]:
            with profile(activities=activities) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            print(f"== {args.model} fast {name} on {device}")
            if kernels:
                total = sum(e.device_time for e in kernels)
                print(f"{len(kernels)} device kernels, {total:.0f} µs summed")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
        if device.type == "cuda":
            graphed = copy.deepcopy(model).prepare_inference()
            graphed.decode(emb, points, labels)
            cache = graphed._decode_graphs[(False, True)]
            graph = next(iter(cache.graphs.values()))[0]
            print(f"click as a CUDA graph replay alone: {replay_ms(graph):.3f} ms")


if __name__ == "__main__":
    main()
